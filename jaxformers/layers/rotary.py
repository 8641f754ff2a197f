"""Rotary position embeddings (RoFormer), "rotate-half" layout as in GPT-NeoX/Llama.

For a head vector x = [x1, x2] (halves) at position p with frequencies
w_i = theta^(-2i/D):  rope(x) = [x1 cos(p w) - x2 sin(p w), x2 cos(p w) + x1 sin(p w)].

The angles ``p * w`` are computed in float32, as in HF transformers' ``LlamaRotaryEmbedding``
(and Meta's Llama): at large positions they carry float32's rounding (about ``p * 6e-8``
radians, ~0.004 at p = 100k), the same error as the checkpoints' own implementation.
"""
import math
import numbers

import jax.numpy as jnp


def rotary_angles(positions, head_dim, theta=10000.0):
    """positions ``[B, T]`` int -> (cos, sin) each ``[B, T, 1, head_dim // 2]`` float32."""
    if getattr(positions, "ndim", None) != 2:
        raise ValueError(f"positions must be [B, T], got shape {getattr(positions, 'shape', None)}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be an even int >= 2 (rotate-half pairs), got {head_dim!r}")
    if isinstance(theta, numbers.Real) and not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"theta must be a finite number > 0, got {theta!r}")
    head_dim = int(head_dim)
    if isinstance(theta, numbers.Real):  # a Python int above 2**31 would overflow as a jnp int32
        theta = float(theta)
    freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, D/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rotary(x, cos, sin):
    """x ``[B, T, H, D]``; cos/sin from :func:`rotary_angles`. Computed in float32."""
    if x.ndim != 4:
        raise ValueError(f"x must be [B, T, H, D], got shape {x.shape}")
    if cos.shape != sin.shape or cos.ndim != 4 or cos.shape[2] != 1 or 2 * cos.shape[-1] != x.shape[-1] \
            or any(c not in (1, n) for c, n in zip(cos.shape[:2], x.shape[:2])):
        raise ValueError(f"cos/sin {cos.shape}/{sin.shape} do not fit x {x.shape}: expected "
                         f"[B|1, T|1, 1, D/2] = [{x.shape[0]}, {x.shape[1]}, 1, {x.shape[-1] // 2}] "
                         "(rotary_angles(positions [B, T], head_dim=D))")
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
