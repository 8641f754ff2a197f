"""Fast Walsh-Hadamard transform over the last axis (Pallas, GPU Triton + TPU Mosaic).

    y = scale * x @ H_n          x, y ``[..., n]``,  scale defaults to ``n ** -0.5``

(the orthonormal transform QuaRot uses; Dao's ``fast_hadamard_transform`` defaults to
``scale=1``, pass ``scale=1.0`` for that).

``H_n = H_m (x) H_{2^k}`` (see :mod:`.reference`).  The power-of-two part runs in the
kernel; the factor ``H_m`` (m = 12, 20, 28, 44, ..., 172) is a small dense ``[m, m]`` matmul
over the ``m`` axis in XLA afterwards, as the authors' ``matmul_hadU`` does it
(spcl/QuaRot: their CUDA ``fast_hadamard_transform`` for ``2^k``, then ``hadK``).

Kernel (one grid step = ``bm`` rows ``[bm, N]``, ``N = 2^k``): ``H_N = H_{N/c} (x) H_c``
with a chunk ``c = min(N, 128)``.  Each of the ``N / c`` column chunks ``X_j [bm, c]`` is
multiplied by the dense ``H_c`` (tensor cores / MXU), then the chunks are combined by
``log2(N / c)`` butterfly stages of adds (``(a, b) -> (a + b, a - b)``), i.e.
``O(N (c + log N))`` work per row instead of the dense ``O(N^2)``.  For ``N < 16`` (below
Triton's smallest dot) the chunk is one column and the whole transform is butterflies.
All chunks of a row block stay live in registers, so the kernel transforms at most
``2^11`` columns: compiled for sm_90, ``N = 2048`` takes 252 registers a thread without
spilling, ``4096`` spilled 504 bytes and ``8192`` 22 KB (``experiments.kernel_report``).  A
wider ``2^k = s * 2048`` is split as ``H_s (x) H_2048`` and ``H_s`` joins the small dense
factor below (one XLA matmul by ``H_m (x) H_s``).  On every platform, for one code path
(the TPU variant, in VMEM, could take wider rows).  QuaRot's online transforms are small
(head dim, number of heads, the ``2^k`` of the MLP width: 64 for LLaMA-2-7B, 512-1024 for
LLaMA-3), so they never split.

``H`` is symmetric for powers of two, so the VJP is the same kernel applied to the
cotangent (``jax.custom_vjp``); the ``H_m`` matmul is differentiated by JAX.

float32 dots follow the default matmul precision of the backend (TF32 on GPU unless
``JAX_DEFAULT_MATMUL_PRECISION=highest``); bf16/fp16 inputs accumulate in float32 and the
butterflies run in float32 (float64 inputs, under ``jax_enable_x64``, in float64; TPUs have no
float64); the output has the input dtype.  For ``n = m 2^k`` the kernel's ``2^k`` part is
rounded to the input dtype before the ``H_m`` matmul (which accumulates as above), as the authors'
``matmul_hadU_cuda`` rounds between ``fast_hadamard_transform`` and ``hadK``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from .._common import (KernelPlan, by_platform, check_int, compiler_params, concrete_real, is_float_dtype,
                       resolve_interpret, round_up, select_plan, tpu_tile_bytes)
from .reference import factor_matrix, split_size, sylvester

_CHUNK = 128      # dense chunk of the power-of-two part (one MXU tile / a wgmma-friendly width)
_MIN_DOT = 16     # Triton's smallest dot dimension
_MAX_N = 2048     # widest power of two the kernel transforms (wider spills registers on sm_90)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Plan(KernelPlan):
    n: int            # power-of-two size transformed in the kernel
    rows: int         # rows (flattened leading dims)
    bm: int           # rows per grid step
    chunk: int        # dense chunk c (1: butterflies only)
    scale: float
    acc: str = "float32"  # accumulation dtype: float64 for float64 inputs, else float32

    @property
    def rows_pad(self) -> int:
        return round_up(max(self.rows, 1), self.bm)


def _make_plan(n, rows, dtype, scale, interpret, platform="gpu") -> _Plan:
    tpu = platform == "tpu"
    if tpu:
        chunk = min(n, _CHUNK) if n >= 8 else 1
        sub = 8 * max(1, 4 // jnp.dtype(dtype).itemsize)
        bm = int(min(256, max(sub, 1 << max(0, (65536 // n).bit_length() - 1))))
        bm = min(bm, round_up(max(rows, 1), sub))
    else:
        chunk = min(n, _CHUNK) if n >= _MIN_DOT else 1
        bm = int(min(64, max(16, 1 << max(0, (8192 // n).bit_length() - 1))))
    return _Plan(n=n, rows=rows, bm=bm, chunk=chunk, scale=float(scale), acc=_acc_dtype(dtype).name,
                 interpret=interpret, platform=platform)


def _acc_dtype(dtype):
    """float64 inputs (``jax_enable_x64``) accumulate in float64, every other dtype in float32."""
    wide = jax.dtypes.canonicalize_dtype(dtype) == jnp.float64  # not without x64 (numpy input)
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def _kernel(x_ref, h_ref, o_ref, *, plan: _Plan):
    c, nc, acc = plan.chunk, plan.n // plan.chunk, jnp.dtype(plan.acc)
    if c > 1:
        h = h_ref[...]
        parts = [jnp.dot(x_ref[:, pl.ds(j * c, c)], h, preferred_element_type=acc)
                 for j in range(nc)]
    else:
        parts = [x_ref[:, pl.ds(j, 1)].astype(acc) for j in range(nc)]
    span = 1
    while span < nc:  # Sylvester butterflies over the chunks: H_{2s} = [[H_s, H_s], [H_s, -H_s]]
        for start in range(0, nc, 2 * span):
            for i in range(start, start + span):
                a, b = parts[i], parts[i + span]
                parts[i], parts[i + span] = a + b, a - b
        span *= 2
    for j in range(nc):
        o_ref[:, pl.ds(j * c, c)] = (parts[j] * plan.scale).astype(o_ref.dtype)


def _variant(plan: _Plan, x2):
    """x2 ``[rows_pad, n]`` -> ``[rows_pad, n]`` through one ``pallas_call``."""
    c = plan.chunk
    h = jnp.asarray(sylvester(max(c, 1)), x2.dtype)
    if plan.platform == "tpu":
        params = compiler_params(0, 0, platform="tpu", dimension_semantics=("parallel",))
    else:
        params = compiler_params(4 if plan.bm * plan.n <= 8192 else 8, 1)
    return pl.pallas_call(
        functools.partial(_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype),
        grid=(plan.rows_pad // plan.bm,),
        in_specs=[pl.BlockSpec((plan.bm, plan.n), lambda i: (i, 0)),
                  pl.BlockSpec((c, c), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((plan.bm, plan.n), lambda i: (i, 0)),
        interpret=plan.interpret,
        name="hadamard_transform",
        **params,
    )(x2, h)


def _run(plan: _Plan, x2):
    pad = plan.rows_pad - x2.shape[0]
    xp = jnp.pad(x2, ((0, pad), (0, 0))) if pad else x2
    y = by_platform(plan, _variant, xp)
    return y[:x2.shape[0]] if pad else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fwht(x2, plan):
    return _run(plan, x2)


def _fwht_fwd(x2, plan):
    return _run(plan, x2), None


def _fwht_bwd(plan, _, g):
    return (_run(plan, g),)  # H_{2^k} is symmetric: the VJP is the same transform


_fwht.defvjp(_fwht_fwd, _fwht_bwd)


def _plans(n, rows, dtype, scale, interpret):
    interpret = resolve_interpret(interpret)
    return select_plan(functools.partial(_make_plan, n, rows, dtype, scale, interpret), interpret)


def _static_scale(scale) -> float:
    """``scale`` as a Python float (static: baked into the kernel): a concrete finite real scalar
    (Python / numpy number or 0-d array).  A string (``float("0.5")`` would read it), a bool, a
    complex or non-scalar value, NaN / inf (an all-NaN output) or a traced value: ``ValueError``."""
    value = concrete_real("scale", scale, "baked into the kernel", "a finite real number")
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite real number (Python float) or None, got {scale!r}")
    return value


def hadamard_transform(x, *, scale=None, interpret=None):
    """``scale * x @ H_n`` over the last axis; x ``[..., n]`` floating, any leading shape.

    ``n`` a power of two or ``m * 2^k`` with a Paley or Goethals-Seidel factor ``m`` (12, 20,
    24, 28, 36, 44, ..., 172 for LLaMA-2-7B's 11008; every multiple of 4 up to 256 but 188
    and 236; see :func:`pallas_kernels.hadamard.reference.split_size`).  ``scale``: a concrete
    finite real number (Python / numpy; default ``n ** -0.5``: orthonormal; ``1.0``: the
    unnormalised +-1 transform); a bool, string, NaN / inf or traced value is a ``ValueError``.
    ``interpret``: None (interpret mode on CPU), a bool, or ``pltpu.InterpretParams()`` (the
    TPU variant in Pallas' TPU interpreter).  Differentiable (custom VJP through the kernel).
    """
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or getattr(x, "ndim", 0) < 1:
        raise ValueError(f"x must be a floating-point array [..., n], got dtype {dtype} and "
                         f"shape {getattr(x, 'shape', None)}")
    n = x.shape[-1]
    try:
        m, p = kernel_split(n)
    except ValueError as e:
        raise ValueError(f"x: shape {tuple(x.shape)}, the transformed last axis: {e}") from None
    scale = n ** -0.5 if scale is None else _static_scale(scale)
    lead = x.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64)) * m
    if rows == 0:
        return x
    plan = _plans(p, rows, dtype, scale, interpret)
    y = _fwht(x.reshape(rows, p), plan)
    if m > 1:  # the small dense factor: y[a, :] = sum_i H_m[i, a] z[i, :]
        acc = _acc_dtype(dtype)
        hm = jnp.asarray(_outer_factor(n), acc)
        y = jnp.einsum("rip,ia->rap", y.reshape(-1, m, p).astype(acc), hm,
                       precision=lax.Precision.HIGHEST).astype(dtype)
    return y.reshape(x.shape)


def kernel_split(n: int):
    """``(m, p)`` with ``n = m p``: the kernel transforms ``p`` (a power of two, at most
    ``_MAX_N``), a dense ``[m, m]`` matmul the rest (``H_m (x) H_s`` with ``s`` the part of
    ``2^k`` above ``_MAX_N``)."""
    m, p = split_size(n)
    s = max(1, p // _MAX_N)
    return m * s, p // s


def _outer_factor(n: int) -> np.ndarray:
    """The ``[m, m]`` +-1 matrix of :func:`kernel_split` (``H_n = outer (x) H_p``)."""
    m0, p0 = split_size(n)
    s = kernel_split(n)[0] // m0
    return sylvester(s) if m0 == 1 else np.kron(factor_matrix(m0), sylvester(s))


def tpu_vmem_bytes(n, dtype, rows=4096) -> dict:
    """VMEM the TPU block specs imply per grid step (double-buffered input, output and the
    ``H_c`` block; in-kernel float32 temporaries not counted).  ``n``: the transformed size (as
    :func:`hadamard_transform` takes it), ``dtype``: x's floating dtype, ``rows``: the leading
    rows of x (a positive int); a bad one is a ``ValueError`` naming it."""
    rows = check_int("rows", rows)
    if not is_float_dtype(dtype):
        raise ValueError(f"dtype must be a floating dtype (that of x), got {dtype!r}")
    m, p = kernel_split(n)
    plan = _make_plan(p, rows * m, dtype, 1.0, False, platform="tpu")
    isz = jnp.dtype(dtype).itemsize
    c = max(plan.chunk, 1)
    return {"hadamard_transform": 2 * (2 * tpu_tile_bytes((plan.bm, p), isz)
                                       + tpu_tile_bytes((c, c), isz))}
