"""Rotary position embeddings (RoFormer), "rotate-half" layout as in GPT-NeoX/Llama.

For a head vector x = [x1, x2] (halves) at position p with frequencies
w_i = theta^(-2i/D):  rope(x) = [x1 cos(p w) - x2 sin(p w), x2 cos(p w) + x1 sin(p w)].
"""
import jax.numpy as jnp


def rotary_angles(positions, head_dim, theta=10000.0):
    """positions ``[B, T]`` int -> (cos, sin) each ``[B, T, 1, head_dim // 2]`` float32."""
    freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, D/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rotary(x, cos, sin):
    """x ``[B, T, H, D]``; cos/sin from :func:`rotary_angles`. Computed in float32."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
