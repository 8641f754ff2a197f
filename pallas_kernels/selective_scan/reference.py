"""Pure-JAX oracle for the Mamba-1 selective scan (``selective_scan_ref`` semantics).

Layout is channels-last: ``u, delta, z: [batch, L, dim]``, ``A: [dim, N]``,
``B, C: [batch, L, N]`` or ``[batch, L, G, N]`` (channel ``d`` uses group
``d // (dim // G)``), ``D, delta_bias: [dim]``.  Per batch the state is
``h: [dim, N]`` and, with ``dt = softplus?(delta + delta_bias)``::

    h_t = exp(dt_t[:, None] * A) * h_{t-1} + (dt_t * u_t)[:, None] * B_t[None, :]
    y_t = h_t @ C_t + D * u_t            ;  y *= silu(z) if z is given

Everything is computed in float32; ``y`` is returned in ``u.dtype`` and the last
state (if asked) as float32 ``[batch, dim, N]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _shape(x):
    return tuple(getattr(x, "shape", ()))


def validate(u, delta, A, B, C, D=None, z=None, delta_bias=None):
    """Check shapes; return ``(batch, L, dim, N, G)`` (``G=None`` without group axis)."""
    if getattr(u, "ndim", None) != 3:
        raise ValueError(f"u must have rank 3 [batch, L, dim], got shape {_shape(u)}")
    b, l, dim = u.shape
    if _shape(delta) != (b, l, dim):
        raise ValueError(f"delta must have shape {(b, l, dim)} like u, got {_shape(delta)}")
    if getattr(A, "ndim", None) != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape [dim={dim}, N], got {_shape(A)}")
    if jnp.iscomplexobj(A):
        raise ValueError("A must be real (complex A is not supported)")
    n = A.shape[1]
    g = None
    for name, x in (("B", B), ("C", C)):
        if getattr(x, "ndim", None) == 3:
            if x.shape != (b, l, n):
                raise ValueError(f"{name} must have shape {(b, l, n)} or [batch, L, G, N], got {x.shape}")
            xg = None
        elif getattr(x, "ndim", None) == 4:
            if x.shape[:2] != (b, l) or x.shape[3] != n:
                raise ValueError(f"{name} must have shape [batch={b}, L={l}, G, N={n}], got {x.shape}")
            xg = x.shape[2]
            if xg < 1 or dim % xg:
                raise ValueError(f"dim={dim} must be divisible by the number of groups G={xg} of {name}")
        else:
            raise ValueError(f"{name} must have rank 3 or 4, got shape {_shape(x)}")
        if name == "B":
            g = xg
        elif xg != g:
            raise ValueError(f"B and C must have the same group layout, got {_shape(B)} and {_shape(C)}")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and _shape(x) != (dim,):
            raise ValueError(f"{name} must have shape [dim={dim}], got {_shape(x)}")
    if z is not None and _shape(z) != (b, l, dim):
        raise ValueError(f"z must have shape {(b, l, dim)} like u, got {_shape(z)}")
    return b, l, dim, n, g


def expand_groups(x, dim):
    """``[..., G, N]`` -> ``[..., dim, N]`` (channel d takes group d // (dim // G))."""
    return jnp.repeat(x, dim // x.shape[-2], axis=-2)


def _dt(delta, delta_bias, delta_softplus):
    dt = delta.astype(jnp.float32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(jnp.float32)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    return dt


def reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
              return_last_state=False, interpret=None, block_d=None, chunk=None):
    """Sequential ``lax.scan`` selective scan in float32 (the test oracle).

    ``interpret`` / ``block_d`` / ``chunk`` are accepted for signature parity with
    :func:`selective_scan` and ignored.
    """
    del interpret, block_d, chunk
    b, l, dim, n, g = validate(u, delta, A, B, C, D, z, delta_bias)
    f32 = jnp.float32
    dt = _dt(delta, delta_bias, delta_softplus)                # [b, l, dim]
    uf = u.astype(f32)
    Af = A.astype(f32)
    Bf, Cf = B.astype(f32), C.astype(f32)
    if g is None:
        Bf, Cf = Bf[:, :, None, :], Cf[:, :, None, :]            # [b, l, 1, n]
    else:
        Bf, Cf = expand_groups(Bf, dim), expand_groups(Cf, dim)  # [b, l, dim, n]

    def step(h, xs):
        dt_t, u_t, b_t, c_t = xs                                 # [b,dim] [b,dim] [b,dim|1,n]
        h = jnp.exp(dt_t[..., None] * Af) * h + (dt_t * u_t)[..., None] * b_t
        y = jnp.sum(h * c_t, axis=-1)
        return h, y

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (dt, uf, Bf, Cf))
    h0 = jnp.zeros((b, dim, n), f32)
    h_last, y = lax.scan(step, h0, xs)
    y = jnp.moveaxis(y, 0, 1)                                    # [b, l, dim]
    if D is not None:
        y = y + uf * D.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    y = y.astype(u.dtype)
    return (y, h_last) if return_last_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step.  ``state [batch, dim, N]``, ``x, dt, z [batch, dim]``,
    ``B, C [batch, N]`` or ``[batch, G, N]``.  Returns ``(y [batch, dim] in x.dtype,
    new_state)`` with ``new_state`` in ``state.dtype`` (math in float32)."""
    if getattr(state, "ndim", None) != 3:
        raise ValueError(f"state must have rank 3 [batch, dim, N], got shape {_shape(state)}")
    b, dim, n = state.shape
    if _shape(x) != (b, dim):
        raise ValueError(f"x must have shape {(b, dim)}, got {_shape(x)}")
    if _shape(dt) != (b, dim):
        raise ValueError(f"dt must have shape {(b, dim)}, got {_shape(dt)}")
    if _shape(A) != (dim, n):
        raise ValueError(f"A must have shape {(dim, n)}, got {_shape(A)}")
    if z is not None and _shape(z) != (b, dim):
        raise ValueError(f"z must have shape {(b, dim)}, got {_shape(z)}")
    for name, v in (("D", D), ("dt_bias", dt_bias)):
        if v is not None and _shape(v) != (dim,):
            raise ValueError(f"{name} must have shape [dim={dim}], got {_shape(v)}")
    f32 = jnp.float32
    mats = []
    for name, v in (("B", B), ("C", C)):
        if getattr(v, "ndim", None) == 2 and v.shape == (b, n):
            mats.append(v.astype(f32)[:, None, :])
        elif getattr(v, "ndim", None) == 3 and v.shape[0] == b and v.shape[2] == n:
            if dim % v.shape[1]:
                raise ValueError(f"dim={dim} must be divisible by the number of groups "
                                 f"G={v.shape[1]} of {name}")
            mats.append(expand_groups(v.astype(f32), dim))
        else:
            raise ValueError(f"{name} must have shape {(b, n)} or [batch, G, N={n}], got {_shape(v)}")
    Bf, Cf = mats
    dtf = _dt(dt, dt_bias, dt_softplus)
    xf = x.astype(f32)
    new = (jnp.exp(dtf[..., None] * A.astype(f32)) * state.astype(f32)
           + (dtf * xf)[..., None] * Bf)
    y = jnp.sum(new * Cf, axis=-1)
    if D is not None:
        y = y + xf * D.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    return y.astype(x.dtype), new.astype(state.dtype)
