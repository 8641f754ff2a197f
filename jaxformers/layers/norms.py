"""Normalisation layers (computed in float32, returned in the compute dtype).

LayerNorm:  y = (x - mean(x)) / sqrt(var(x) + eps) * scale      (no bias, as llm-baselines)
RMSNorm:    y = x / sqrt(mean(x^2) + eps) * scale                (Llama)
"""
import math
import numbers
from typing import Optional

import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from ..sharding import EMBED, param_init
from .common import dtype_of


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    axis_name: str = EMBED  # the scale's logical axis (``head_dim`` for attention's qk_norm)
    #: None: one scale ``[D]``; a logical axis name (``heads`` / ``kv_heads``): a scale per row of
    #: x's second-to-last axis, ``[H, D]`` (qk_norm_per_head); the statistic is over D either way
    head_axis: Optional[str] = None

    @nn.compact
    def __call__(self, x):  # [..., D], or [..., H, D] with head_axis
        _check_eps(self)
        axes, shape = (self.axis_name,), (x.shape[-1],)
        if self.head_axis is not None:
            axes, shape = (self.head_axis, *axes), (x.shape[-2], *shape)
        scale = self.param("scale", param_init(nn.initializers.ones, axes), shape, dtype_of(self.param_dtype))
        x32 = x.astype(jnp.float32)
        y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return (y * scale.astype(jnp.float32)).astype(dtype_of(self.dtype))


class LayerNorm(nn.Module):
    eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):  # [..., D]
        _check_eps(self)
        scale = self.param("scale", param_init(nn.initializers.ones, (EMBED,)), (x.shape[-1],),
                           dtype_of(self.param_dtype))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps))
        return (y * scale.astype(jnp.float32)).astype(dtype_of(self.dtype))


def _check_eps(norm) -> None:
    """``ValueError`` unless ``eps`` is a finite number > 0 (as the config's ``norm_eps``): a negative
    or NaN eps gives NaN, 0 gives NaN for an all-zero (or, LayerNorm, constant) input."""
    eps = norm.eps
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{type(norm).__name__} eps must be a finite number > 0, got {eps!r}")


def make_norm(config, name=None):
    cls = RMSNorm if config.norm == "rmsnorm" else LayerNorm
    return cls(eps=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, name=name)
