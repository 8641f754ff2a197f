"""Pure-JAX oracle for the Mamba-1 selective scan (``selective_scan_ref`` semantics).

Layout is length-major, channels-last (mamba_ssm's ``[B, D, L]`` inputs must be
transposed): ``x, dt, z: [B, L, D]``, ``A: [D, N]`` (``<= 0``: Mamba's ``-exp(A_log)``),
``B, C: [B, L, N]`` or
``[B, L, G, N]`` (channel ``d`` uses group ``d // (D // G)``), ``D, dt_bias: [D]``,
state ``h: [B, D, N]`` float32.  With ``dt = softplus?(dt + dt_bias)`` (without softplus
``dt + dt_bias`` should be ``>= 0``: a negative step makes ``exp(dt * A) > 1`` and the state
grow like a positive ``A``; it is computed as given, unchecked, as the kernels do) and
``r_t = 1`` where a packed segment starts (``segment_ids[t] != segment_ids[t-1]``,
``t > 0``; else 0)::

    h_{-1} = initial_state (or 0)
    h_t = (1 - r_t) * exp(dt_t[:, None] * A) * h_{t-1} + (dt_t * x_t)[:, None] * B_t[None, :]
    y_t = h_t @ C_t + D * x_t            ;  y *= silu(z) if z is given

so the state restarts from zero at every segment start and ``initial_state``
only reaches the first segment.  Everything is computed in float32; ``y`` is
returned in ``x.dtype`` and the final state (if asked) as float32 ``[B, D, N]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .._common import (LAYOUT_HINT, check_decay, check_flag, check_float, check_segment_ids, process_dt,
                       segment_resets, shape_of, check_arrays, check_state_size)

_shape = shape_of


def validate(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, segment_ids=None):
    """Check shapes and dtypes; return ``(batch, L, dim, N, G)`` (``G=None`` without group axis)."""
    check_arrays(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"x must have rank 3 [B, L, D], got shape {_shape(x)}")
    check_float("x", x, "[B, L, D]")
    if getattr(A, "ndim", None) != 2:
        raise ValueError(f"A must have rank 2 [D, N], got shape {_shape(A)}")
    if jnp.iscomplexobj(A):
        raise ValueError("A must be real (complex A is not supported)")
    check_float("A", A, "[D, N]")
    check_decay(A, "[D, N]")
    b, l, dim = x.shape
    if A.shape[0] != dim:
        if x.shape[1] == A.shape[0]:
            raise ValueError(f"x has shape {x.shape} but A {A.shape} says D={A.shape[0]}: expected "
                             f"x as [B, L, D] = [{b}, {dim}, {A.shape[0]}] ({LAYOUT_HINT})")
        raise ValueError(f"A must have shape [D={dim}, N] (D = x.shape[-1]), got {A.shape}")
    if min(b, l, dim) < 1:
        raise ValueError(f"x must be non-empty: expected [B, L, D] with B, L, D >= 1 (at least one "
                         f"time step), got shape {x.shape}")
    n = A.shape[1]
    check_state_size("A", A.shape, n, "[D, N]")
    if _shape(dt) != (b, l, dim):
        hint = f" ({LAYOUT_HINT})" if _shape(dt) == (b, dim, l) else ""
        raise ValueError(f"dt must have shape [B, L, D] = {(b, l, dim)} like x, got {_shape(dt)}{hint}")
    check_float("dt", dt, "[B, L, D]")
    g = None
    for name, v in (("B", B), ("C", C)):
        if getattr(v, "ndim", None) == 3:
            if v.shape != (b, l, n):
                hint = f" ({LAYOUT_HINT})" if v.shape == (b, n, l) else ""
                raise ValueError(f"{name} must have shape [B, L, N] = {(b, l, n)} or [B, L, G, N], "
                                 f"got {v.shape}{hint}")
            vg = None
        elif getattr(v, "ndim", None) == 4:
            if v.shape[:2] != (b, l) or v.shape[3] != n:
                hint = f" ({LAYOUT_HINT})" if v.shape[0] == b and v.shape[2:] == (n, l) else ""
                raise ValueError(f"{name} must have shape [B={b}, L={l}, G, N={n}], got {v.shape}{hint}")
            vg = v.shape[2]
            if vg < 1 or dim % vg:
                raise ValueError(f"D={dim} must be divisible by the number of groups G={vg} of {name}")
        else:
            raise ValueError(f"{name} must have rank 3 [B, L, N] or 4 [B, L, G, N], got shape {_shape(v)}")
        check_float(name, v, "[B, L, N] or [B, L, G, N]")
        if name == "B":
            g = vg
        elif vg != g:
            raise ValueError(f"B and C must have the same group layout, got {_shape(B)} and {_shape(C)}")
    for name, v in (("D", D), ("dt_bias", dt_bias)):
        if v is not None:
            if _shape(v) != (dim,):
                raise ValueError(f"{name} must have shape [D={dim}], got {_shape(v)}")
            check_float(name, v, f"[D={dim}]")
    if z is not None:
        if _shape(z) != (b, l, dim):
            raise ValueError(f"z must have shape [B, L, D] = {(b, l, dim)} like x, got {_shape(z)}")
        check_float("z", z, "[B, L, D]")
    if initial_state is not None:
        if _shape(initial_state) != (b, dim, n):
            raise ValueError(f"initial_state must have shape [B, D, N] = {(b, dim, n)}, "
                             f"got {_shape(initial_state)}")
        check_float("initial_state", initial_state, "[B, D, N]")
    if segment_ids is not None:
        check_segment_ids(segment_ids, b, l)
    return b, l, dim, n, g


def expand_groups(x, dim):
    """``[..., G, N]`` -> ``[..., dim, N]`` (channel d takes group d // (dim // G))."""
    return jnp.repeat(x, dim // x.shape[-2], axis=-2)


def reference(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
              initial_state=None, segment_ids=None, return_final_state=False,
              chunk_size=64, interpret=None, block_d=None):
    """Sequential ``lax.scan`` selective scan in float32 (the test oracle).

    Same arguments and results as :func:`pallas_kernels.selective_scan.selective_scan`
    (recurrence in the module docstring); ``chunk_size`` / ``interpret`` /
    ``block_d`` are accepted for signature parity and ignored.  Returns ``y
    [B, L, D]`` (``x.dtype``) or ``(y, final_state [B, D, N] float32)``.
    """
    del chunk_size, interpret, block_d
    b, l, dim, n, g = validate(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids)
    f32 = jnp.float32
    dtf = process_dt(dt, dt_bias, dt_softplus)                 # [b, l, dim]
    xf = x.astype(f32)
    Af = A.astype(f32)
    Bf, Cf = B.astype(f32), C.astype(f32)
    if g is None:
        Bf, Cf = Bf[:, :, None, :], Cf[:, :, None, :]            # [b, l, 1, n]
    else:
        Bf, Cf = expand_groups(Bf, dim), expand_groups(Cf, dim)  # [b, l, dim, n]
    keep = (jnp.ones((b, l), f32) if segment_ids is None
            else 1.0 - segment_resets(segment_ids).astype(f32))  # 0 where a segment starts

    def step(h, xs):
        dt_t, x_t, b_t, c_t, k_t = xs                            # [b,dim] [b,dim] [b,dim|1,n] [b]
        decay = jnp.exp(dt_t[..., None] * Af) * k_t[:, None, None]
        h = decay * h + (dt_t * x_t)[..., None] * b_t
        y = jnp.sum(h * c_t, axis=-1)
        return h, y

    xs = tuple(jnp.moveaxis(v, 1, 0) for v in (dtf, xf, Bf, Cf, keep))
    h0 = jnp.zeros((b, dim, n), f32) if initial_state is None else initial_state.astype(f32)
    h_last, y = lax.scan(step, h0, xs)
    y = jnp.moveaxis(y, 0, 1)                                    # [b, l, dim]
    if D is not None:
        y = y + xf * D.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    y = y.astype(x.dtype)
    return (y, h_last) if check_flag('return_final_state', return_final_state) else y


def selective_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step of the recurrence in the module docstring (no segment reset)::

        new_state = exp(dt[:, :, None] * A) * state + (dt * x)[:, :, None] * B[:, None, :]
        y = new_state @ C + D * x            ;  y *= silu(z) if z is given

    ``state [B, D, N]``, ``x, dt, z [B, D]``, ``A [D, N]``, ``B, C [B, N]`` or
    ``[B, G, N]``, ``D, dt_bias [D]``.  Returns ``(y [B, D] in x.dtype, new_state
    [B, D, N] in state.dtype)``; math in float32.  ``dt`` is ``softplus?(dt + dt_bias)``
    (``dt_softplus`` a bool), as in the scan.  ``A`` must be ``<= 0`` (a concrete
    positive entry raises a ``ValueError``; a traced one is not checked).
    """
    check_arrays(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    # every shape derives from the arguments that define it (x: B, D; A: N), so a mismatch
    # blames the argument that disagrees (a wrong state is named as such, not A or B)
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must have rank 2 [B, D], got shape {_shape(x)}")
    b, dim = x.shape
    if getattr(A, "ndim", None) != 2:
        raise ValueError(f"A must have rank 2 [D, N], got shape {_shape(A)}")
    if A.shape[0] != dim:
        if _shape(dt) == (b, A.shape[0]):  # dt sides with A: x is the odd one out
            raise ValueError(f"x must have shape [B, D] = {(b, A.shape[0])} (D from A {A.shape} "
                             f"and dt {dt.shape}), got {x.shape}")
        raise ValueError(f"A must have shape [D={dim}, N] (D = x.shape[-1]), got {_shape(A)}")
    n = A.shape[1]
    check_state_size("A", A.shape, n, "[D, N]")
    if _shape(dt) != (b, dim):
        raise ValueError(f"dt must have shape [B, D] = {(b, dim)} like x, got {_shape(dt)}")
    if z is not None and _shape(z) != (b, dim):
        raise ValueError(f"z must have shape [B, D] = {(b, dim)} like x, got {_shape(z)}")
    for name, v in (("D", D), ("dt_bias", dt_bias)):
        if v is not None and _shape(v) != (dim,):
            raise ValueError(f"{name} must have shape [D={dim}], got {_shape(v)}")
    f32 = jnp.float32
    mats = []
    for name, v in (("B", B), ("C", C)):
        if getattr(v, "ndim", None) == 2 and v.shape == (b, n):
            mats.append(v.astype(f32)[:, None, :])
        elif getattr(v, "ndim", None) == 3 and v.shape[0] == b and v.shape[2] == n:
            if v.shape[1] < 1 or dim % v.shape[1]:
                raise ValueError(f"D={dim} must be divisible by the number of groups "
                                 f"G={v.shape[1]} of {name}")
            mats.append(expand_groups(v.astype(f32), dim))
        else:
            raise ValueError(f"{name} must have shape [B, N] = {(b, n)} or [B, G, N={n}] (B from x, "
                             f"N from A), got {_shape(v)}")
    if _shape(state) != (b, dim, n):
        raise ValueError(f"state must have shape [B, D, N] = {(b, dim, n)} (B, D from x {_shape(x)}, "
                         f"N from A {_shape(A)}), got {_shape(state)}")
    for name, v, shp in (("state", state, "[B, D, N]"), ("x", x, "[B, D]"), ("dt", dt, "[B, D]"),
                         ("A", A, "[D, N]"), ("B", B, "[B, N]"), ("C", C, "[B, N]"), ("D", D, "[D]"),
                         ("z", z, "[B, D]"), ("dt_bias", dt_bias, "[D]")):
        if v is not None:
            check_float(name, v, shp)
    check_decay(A, "[D, N]")
    Bf, Cf = mats
    dtf = process_dt(dt, dt_bias, dt_softplus)
    xf = x.astype(f32)
    new = (jnp.exp(dtf[..., None] * A.astype(f32)) * state.astype(f32)
           + (dtf * xf)[..., None] * Bf)
    y = jnp.sum(new * Cf, axis=-1)
    if D is not None:
        y = y + xf * D.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    return y.astype(x.dtype), new.astype(state.dtype)
