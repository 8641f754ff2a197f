"""Linear projection over several input/output axes with logically-named parameters.

y[..., o1, o2] = sum_{i1, i2} x[..., i1, i2] W[i1, i2, o1, o2] (+ b[o1, o2])

Unlike ``flax.linen.DenseGeneral`` the kernel is created at its full shape, so
its logical axis names (one per kernel dimension) stay valid under sharding
rules (DenseGeneral initialises a flat 2-D kernel and reshapes it).
"""
from typing import Sequence, Tuple, Union

import jax
import flax.linen as nn

from ..sharding import param_init
from ..utils import is_int
from .common import dtype_of, normal


class Linear(nn.Module):
    features: Union[int, Tuple[int, ...]]
    kernel_axes: Sequence[str]  # logical names: input axes then output axes
    in_axes: int = 1  # how many trailing axes of x are contracted
    std: float = 0.02
    use_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    kernel_init: object = None  # overrides normal(std)
    bias_init: object = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        if not is_int(self.in_axes) or not 1 <= self.in_axes <= x.ndim:
            raise ValueError(f"in_axes must be an int in [1, x.ndim={x.ndim}] (the trailing axes of x to "
                             f"contract), got {self.in_axes!r}")
        f = self.features
        out_shape = (f,) if is_int(f) else tuple(f) if isinstance(f, (tuple, list)) else None
        if not out_shape or not all(is_int(f) and f >= 1 for f in out_shape):
            raise ValueError(f"features must be a positive int or a non-empty tuple of them, got {self.features!r}")
        out_shape = tuple(int(f) for f in out_shape)
        in_shape = tuple(x.shape[-self.in_axes:])
        if len(self.kernel_axes) != len(in_shape) + len(out_shape):
            raise ValueError(f"kernel_axes {tuple(self.kernel_axes)} must name {len(in_shape)} input and "
                             f"{len(out_shape)} output axes")
        init = self.kernel_init or normal(self.std)
        kernel = self.param("kernel", param_init(init, self.kernel_axes), in_shape + out_shape,
                            dtype_of(self.param_dtype))
        dtype = dtype_of(self.dtype)
        n = len(in_shape)
        contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))
        if self.use_bias:
            bias = self.param("bias", param_init(self.bias_init, self.kernel_axes[n:]), out_shape,
                              dtype_of(self.param_dtype))
            y = y + bias.astype(dtype)
        return y
