"""Pure-JAX oracle for Mamba-2 state-space duality (SSD), sequential in float32.

Length-major layout: ``x: [B, L, H, P]``, ``dt: [B, L, H]``, ``A: [H]`` (negative
real: one scalar decay per head), ``B, C: [B, L, G, N]`` (head ``h`` uses group
``h // (H // G)``), ``D: [H]`` or ``[H, P]``, ``z`` like ``x``, states
``[B, H, P, N]`` float32.  Per head, with ``dt = softplus?(dt + dt_bias)`` (without softplus
``dt + dt_bias`` should be ``>= 0``: a negative step makes ``exp(dt * A) > 1`` and the state
grow like a positive ``A``; it is computed as given, unchecked, as the kernels do) and
``r_t = 1`` where a packed segment starts (``segment_ids[t] != segment_ids[t-1]``,
``t > 0``; else 0)::

    h_{-1} = initial_state (or 0)
    h_t = (1 - r_t) * exp(dt_t * A) * h_{t-1} + dt_t * x_t[:, None] * B_t[None, :]   # [P, N]
    y_t = h_t @ C_t + D * x_t            ;  y *= silu(z) if z is given

so the state restarts from zero at every segment start and ``initial_state``
only reaches the first segment.  ``y`` is returned in ``x.dtype``; the final
state (if asked) in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .._common import (LAYOUT_HINT, check_decay, check_flag, check_float, check_segment_ids, process_dt,
                       segment_resets, shape_of, check_arrays, check_state_size)

_shape = shape_of


def validate(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, segment_ids=None):
    """Check shapes and dtypes; return ``(batch, L, H, P, G, N)``."""
    check_arrays(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must have rank 4 [B, L, H, P], got shape {_shape(x)}")
    check_float("x", x, "[B, L, H, P]")
    b, l, h, p = x.shape
    if getattr(A, "ndim", None) != 1:
        raise ValueError(f"A must have shape [H] (one scalar per head), got {_shape(A)}")
    check_float("A", A, "[H]")
    check_decay(A, "[H]")
    if A.shape[0] != h:
        if x.shape[1] == A.shape[0]:
            raise ValueError(f"x has shape {x.shape} but A {A.shape} says H={A.shape[0]}: expected "
                             f"x as [B, L, H, P] ({LAYOUT_HINT})")
        raise ValueError(f"A must have shape [H={h}] (one scalar per head), got {_shape(A)}")
    if min(b, l, h) < 1:
        raise ValueError(f"x must be non-empty: expected [B, L, H, P] with B, L, H >= 1 (at least one "
                         f"time step), got shape {x.shape}")
    if p < 1:
        raise ValueError(f"the head dim P (x.shape[-1]) must be >= 1: expected x as [B, L, H, P] "
                         f"with P >= 1, got shape {x.shape}")
    if _shape(dt) != (b, l, h):
        hint = f" ({LAYOUT_HINT})" if _shape(dt) == (b, h, l) else ""
        raise ValueError(f"dt must have shape [B, L, H] = {(b, l, h)}, got {_shape(dt)}{hint}")
    check_float("dt", dt, "[B, L, H]")
    if getattr(B, "ndim", None) != 4 or B.shape[:2] != (b, l):
        hint = f" ({LAYOUT_HINT})" if getattr(B, "ndim", None) == 4 and B.shape[-1] == l else ""
        raise ValueError(f"B must have shape [B={b}, L={l}, G, N], got {_shape(B)}{hint}")
    check_float("B", B, "[B, L, G, N]")
    g, n = B.shape[2], B.shape[3]
    check_state_size("B", B.shape, n, "[B, L, G, N]")
    if g < 1 or h % g:
        raise ValueError(f"number of heads H={h} must be divisible by the number of groups G={g} of B")
    if _shape(C) != (b, l, g, n):
        raise ValueError(f"C must have the same shape as B {(b, l, g, n)}, got {_shape(C)}")
    check_float("C", C, "[B, L, G, N]")
    if D is not None:
        if _shape(D) not in ((h,), (h, p)):
            raise ValueError(f"D must have shape [H={h}] or [H={h}, P={p}], got {_shape(D)}")
        check_float("D", D, "[H] or [H, P]")
    if z is not None:
        if _shape(z) != (b, l, h, p):
            raise ValueError(f"z must have the same shape as x {(b, l, h, p)}, got {_shape(z)}")
        check_float("z", z, "[B, L, H, P]")
    if dt_bias is not None:
        if _shape(dt_bias) != (h,):
            raise ValueError(f"dt_bias must have shape [H={h}], got {_shape(dt_bias)}")
        check_float("dt_bias", dt_bias, "[H]")
    if initial_state is not None:
        if _shape(initial_state) != (b, h, p, n):
            raise ValueError(f"initial_state must have shape [B, H, P, N] = {(b, h, p, n)}, "
                             f"got {_shape(initial_state)}")
        check_float("initial_state", initial_state, "[B, H, P, N]")
    if segment_ids is not None:
        check_segment_ids(segment_ids, b, l)
    return b, l, h, p, g, n


def _d_term(D, x):
    """``D * x`` for ``D [H]`` or ``[H, P]`` and ``x [..., H, P]`` (float32)."""
    D = D.astype(jnp.float32)
    return x * (D[:, None] if D.ndim == 1 else D)


def reference(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
              initial_state=None, segment_ids=None, return_final_state=False,
              chunk_size=64, interpret=None, block_p=None):
    """Sequential ``lax.scan`` SSD in float32 (the test oracle).

    Same arguments and results as :func:`pallas_kernels.ssd.ssd` (recurrence in
    the module docstring); ``chunk_size`` / ``interpret`` / ``block_p`` are
    accepted for signature parity and ignored.  Returns ``y [B, L, H, P]``
    (``x.dtype``) or ``(y, final_state [B, H, P, N] float32)``.
    """
    del chunk_size, interpret, block_p
    b, l, h, p, g, n = validate(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids)
    f32 = jnp.float32
    dtf = process_dt(dt, dt_bias, dt_softplus)                     # [b, l, h]
    xf = x.astype(f32)
    Bh = jnp.repeat(B.astype(f32), h // g, axis=2)                 # [b, l, h, n]
    Ch = jnp.repeat(C.astype(f32), h // g, axis=2)
    Af = A.astype(f32)
    keep = (jnp.ones((b, l), f32) if segment_ids is None
            else 1.0 - segment_resets(segment_ids).astype(f32))  # 0 where a segment starts

    def step(s, xs):
        dt_t, x_t, b_t, c_t, k_t = xs             # [b,h] [b,h,p] [b,h,n] [b,h,n] [b]
        decay = jnp.exp(dt_t * Af) * k_t[:, None]
        s = (decay[..., None, None] * s
             + (dt_t[..., None] * x_t)[..., None] * b_t[:, :, None, :])
        y = jnp.einsum("bhpn,bhn->bhp", s, c_t)
        return s, y

    s0 = (jnp.zeros((b, h, p, n), f32) if initial_state is None
          else initial_state.astype(f32))
    xs = tuple(jnp.moveaxis(v, 1, 0) for v in (dtf, xf, Bh, Ch, keep))
    s_last, y = lax.scan(step, s0, xs)
    y = jnp.moveaxis(y, 0, 1)                                      # [b, l, h, p]
    if D is not None:
        y = y + _d_term(D, xf)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    y = y.astype(x.dtype)
    return (y, s_last) if check_flag('return_final_state', return_final_state) else y


def ssd_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step of the recurrence in the module docstring (no segment reset), per head::

        new_state = exp(dt * A) * state + dt * x[:, None] * B[None, :]     # [P, N]
        y = new_state @ C + D * x            ;  y *= silu(z) if z is given

    ``state [B, H, P, N]``, ``x, z [B, H, P]``, ``dt [B, H]``, ``A [H]``, ``B, C
    [B, G, N]``, ``D [H]`` or ``[H, P]``, ``dt_bias [H]``.  Returns ``(y [B, H, P]
    in x.dtype, new_state [B, H, P, N] in state.dtype)``; math in float32.  ``dt`` is
    ``softplus?(dt + dt_bias)`` (``dt_softplus`` a bool), as in the scan.  ``A`` must be
    ``<= 0`` (a concrete positive entry raises a ``ValueError``; a traced one is not checked).
    """
    check_arrays(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    # every shape derives from the arguments that define it (x: B, H, P; B: G, N), so a
    # mismatch blames the argument that disagrees (a wrong state is named as such, not A or B)
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"x must have rank 3 [B, H, P], got shape {_shape(x)}")
    b, h, p = x.shape
    if getattr(A, "ndim", None) != 1:
        raise ValueError(f"A must have shape [H] (one scalar per head), got {_shape(A)}")
    if A.shape[0] != h and _shape(dt) == (b, A.shape[0]):  # dt sides with A: x is the odd one out
        raise ValueError(f"x must have shape [B, H, P] = {(b, A.shape[0], p)} (H from A {A.shape} "
                         f"and dt {dt.shape}), got {x.shape}")
    if _shape(dt) != (b, h):
        raise ValueError(f"dt must have shape [B, H] = {(b, h)} (from x), got {_shape(dt)}")
    if _shape(A) != (h,):
        raise ValueError(f"A must have shape [H={h}] (H = x.shape[1]), got {_shape(A)}")
    if getattr(B, "ndim", None) != 3 or B.shape[0] != b:
        raise ValueError(f"B must have shape [batch={b}, G, N] (batch from x), got {_shape(B)}")
    if p < 1:
        raise ValueError(f"the head dim P (x.shape[-1]) must be >= 1: expected x as [B, H, P] with "
                         f"P >= 1, got shape {x.shape}")
    g, n = B.shape[1], B.shape[2]
    check_state_size("B", B.shape, n, "[B, G, N]")
    if g < 1 or h % g:
        raise ValueError(f"number of heads H={h} must be divisible by the number of groups G={g} of B")
    if _shape(C) != (b, g, n):
        raise ValueError(f"C must have the same shape as B {(b, g, n)}, got {_shape(C)}")
    if D is not None and _shape(D) not in ((h,), (h, p)):
        raise ValueError(f"D must have shape [H={h}] or [H={h}, P={p}], got {_shape(D)}")
    if z is not None and _shape(z) != (b, h, p):
        raise ValueError(f"z must have shape {(b, h, p)} like x, got {_shape(z)}")
    if dt_bias is not None and _shape(dt_bias) != (h,):
        raise ValueError(f"dt_bias must have shape [H={h}], got {_shape(dt_bias)}")
    if _shape(state) != (b, h, p, n):
        raise ValueError(f"state must have shape [B, H, P, N] = {(b, h, p, n)} (B, H, P from x "
                         f"{_shape(x)}, N from B {_shape(B)}), got {_shape(state)}")
    for name, v, shp in (("state", state, "[B, H, P, N]"), ("x", x, "[B, H, P]"), ("dt", dt, "[B, H]"),
                         ("A", A, "[H]"), ("B", B, "[B, G, N]"), ("C", C, "[B, G, N]"),
                         ("D", D, "[H] or [H, P]"), ("z", z, "[B, H, P]"), ("dt_bias", dt_bias, "[H]")):
        if v is not None:
            check_float(name, v, shp)
    check_decay(A, "[H]")
    f32 = jnp.float32
    dtf = process_dt(dt, dt_bias, dt_softplus)                     # [b, h]
    xf = x.astype(f32)
    Bh = jnp.repeat(B.astype(f32), h // g, axis=1)                 # [b, h, n]
    Ch = jnp.repeat(C.astype(f32), h // g, axis=1)
    new = (jnp.exp(dtf * A.astype(f32))[..., None, None] * state.astype(f32)
           + (dtf[..., None] * xf)[..., None] * Bh[:, :, None, :])
    y = jnp.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + _d_term(D, xf)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    return y.astype(x.dtype), new.astype(state.dtype)
