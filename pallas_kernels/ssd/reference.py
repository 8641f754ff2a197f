"""Pure-JAX oracle for Mamba-2 state-space duality (SSD), sequential in float32.

``x: [batch, L, H, P]``, ``dt: [batch, L, H]``, ``A: [H]`` (negative real: one
scalar decay per head), ``B, C: [batch, L, G, N]`` (head ``h`` uses group
``h // (H // G)``), ``D: [H]`` or ``[H, P]``, ``z`` like ``x``, states
``[batch, H, P, N]`` float32.  Per head, with ``dt = softplus?(dt + dt_bias)``::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t[:, None] * B_t[None, :]   # [P, N]
    y_t = h_t @ C_t + D * x_t            ;  y *= silu(z) if z is given

``y`` is returned in ``x.dtype``; the final state (if asked) in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _shape(x):
    return tuple(getattr(x, "shape", ()))


def validate(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None):
    """Check shapes; return ``(batch, L, H, P, G, N)``."""
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must have rank 4 [batch, L, H, P], got shape {_shape(x)}")
    b, l, h, p = x.shape
    if _shape(dt) != (b, l, h):
        raise ValueError(f"dt must have shape {(b, l, h)} [batch, L, H], got {_shape(dt)}")
    if _shape(A) != (h,):
        raise ValueError(f"A must have shape [H={h}] (one scalar per head), got {_shape(A)}")
    if getattr(B, "ndim", None) != 4 or B.shape[:2] != (b, l):
        raise ValueError(f"B must have shape [batch={b}, L={l}, G, N], got {_shape(B)}")
    g, n = B.shape[2], B.shape[3]
    if g < 1 or h % g:
        raise ValueError(f"number of heads H={h} must be divisible by the number of groups G={g} of B")
    if _shape(C) != (b, l, g, n):
        raise ValueError(f"C must have the same shape as B {(b, l, g, n)}, got {_shape(C)}")
    if D is not None and _shape(D) not in ((h,), (h, p)):
        raise ValueError(f"D must have shape [H={h}] or [H={h}, P={p}], got {_shape(D)}")
    if z is not None and _shape(z) != (b, l, h, p):
        raise ValueError(f"z must have the same shape as x {(b, l, h, p)}, got {_shape(z)}")
    if dt_bias is not None and _shape(dt_bias) != (h,):
        raise ValueError(f"dt_bias must have shape [H={h}], got {_shape(dt_bias)}")
    if initial_states is not None and _shape(initial_states) != (b, h, p, n):
        raise ValueError(f"initial_states must have shape {(b, h, p, n)} [batch, H, P, N], "
                         f"got {_shape(initial_states)}")
    return b, l, h, p, g, n


def process_dt(dt, dt_bias, dt_softplus):
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    return dt


def _d_term(D, x):
    """``D * x`` for ``D [H]`` or ``[H, P]`` and ``x [..., H, P]`` (float32)."""
    D = D.astype(jnp.float32)
    return x * (D[:, None] if D.ndim == 1 else D)


def reference(x, dt, A, B, C, *, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
              initial_states=None, return_final_states=False, interpret=None, block_p=None):
    """Sequential ``lax.scan`` SSD in float32 (the test oracle).

    ``chunk_size`` / ``interpret`` / ``block_p`` are accepted for signature parity
    with :func:`ssd` and ignored.
    Returns ``y`` or ``(y, final_states)``.
    """
    del chunk_size, interpret, block_p
    b, l, h, p, g, n = validate(x, dt, A, B, C, D, z, dt_bias, initial_states)
    f32 = jnp.float32
    dtf = process_dt(dt, dt_bias, dt_softplus)                     # [b, l, h]
    xf = x.astype(f32)
    Bh = jnp.repeat(B.astype(f32), h // g, axis=2)                 # [b, l, h, n]
    Ch = jnp.repeat(C.astype(f32), h // g, axis=2)
    Af = A.astype(f32)

    def step(s, xs):
        dt_t, x_t, b_t, c_t = xs                  # [b,h] [b,h,p] [b,h,n] [b,h,n]
        s = (jnp.exp(dt_t * Af)[..., None, None] * s
             + (dt_t[..., None] * x_t)[..., None] * b_t[:, :, None, :])
        y = jnp.einsum("bhpn,bhn->bhp", s, c_t)
        return s, y

    s0 = (jnp.zeros((b, h, p, n), f32) if initial_states is None
          else initial_states.astype(f32))
    xs = tuple(jnp.moveaxis(v, 1, 0) for v in (dtf, xf, Bh, Ch))
    s_last, y = lax.scan(step, s0, xs)
    y = jnp.moveaxis(y, 0, 1)                                      # [b, l, h, p]
    if D is not None:
        y = y + _d_term(D, xf)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    y = y.astype(x.dtype)
    return (y, s_last) if return_final_states else y


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step.  ``state [batch, H, P, N]``, ``x, z [batch, H, P]``,
    ``dt [batch, H]``, ``B, C [batch, G, N]``.  Returns ``(y [batch, H, P] in x.dtype,
    new_state in state.dtype)``; math in float32."""
    if getattr(state, "ndim", None) != 4:
        raise ValueError(f"state must have rank 4 [batch, H, P, N], got shape {_shape(state)}")
    b, h, p, n = state.shape
    if _shape(x) != (b, h, p):
        raise ValueError(f"x must have shape {(b, h, p)}, got {_shape(x)}")
    if _shape(dt) != (b, h):
        raise ValueError(f"dt must have shape {(b, h)}, got {_shape(dt)}")
    if _shape(A) != (h,):
        raise ValueError(f"A must have shape [H={h}], got {_shape(A)}")
    if getattr(B, "ndim", None) != 3 or B.shape[0] != b or B.shape[2] != n:
        raise ValueError(f"B must have shape [batch={b}, G, N={n}], got {_shape(B)}")
    g = B.shape[1]
    if g < 1 or h % g:
        raise ValueError(f"number of heads H={h} must be divisible by the number of groups G={g} of B")
    if _shape(C) != (b, g, n):
        raise ValueError(f"C must have the same shape as B {(b, g, n)}, got {_shape(C)}")
    if D is not None and _shape(D) not in ((h,), (h, p)):
        raise ValueError(f"D must have shape [H={h}] or [H={h}, P={p}], got {_shape(D)}")
    if z is not None and _shape(z) != (b, h, p):
        raise ValueError(f"z must have shape {(b, h, p)}, got {_shape(z)}")
    if dt_bias is not None and _shape(dt_bias) != (h,):
        raise ValueError(f"dt_bias must have shape [H={h}], got {_shape(dt_bias)}")
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
