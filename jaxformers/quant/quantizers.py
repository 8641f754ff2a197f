"""Quantizers: round-to-nearest fake quantization, clipping search, GPTQ, int4 packing and a
real int8 matmul path.

Uniform quantization of a group of values ``x`` (one output channel, one group of
``groupsize`` inputs, one token, one head) to ``b`` bits::

    symmetric:   s = c * max|x| / (2^(b-1) - 1),   q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1),   x^ = s q
    asymmetric:  s = c * (max(max x, 0) - min(min x, 0)) / (2^b - 1),  z = round(-c min(min x, 0) / s),
                 q = clamp(round(x / s) + z, 0, 2^b - 1),   x^ = s (q - z)

(the asymmetric range always holds 0, as the authors' quantizer; ``round`` is half-to-even, as
``torch.round``; a row or group of zeros gets ``s = 1``).

``c`` is the clipping ratio (1 = no clipping).  Weights: per output channel (or per group of
input channels), ``c`` searched per channel on the grid ``1 - i / 100``, ``i < 80``, to
minimise ``sum |w - w^|^2.4`` (the GPTQ/QuaRot ``mse`` search, their grid); activations: per
token (QuaRot: symmetric, ``c = 0.9``); KV cache: per head (group = head dim; QuaRot:
asymmetric, ``c = 0.95``).  ``bits >= 16`` means no quantization.

Deviation from the authors' GPTQ (spcl/QuaRot ``gptq_utils.py``) for dead inputs (``H_jj = 0``:
never active in the calibration data), whose weights both zero: a per-channel scale comes
from the weights after that zeroing (theirs: before it, so a dead input's original weight can
set a row's scale), and act-order sorts dead inputs last (theirs: at ``H_jj = 1`` of their
``2 / n_samples``-scaled Hessian, a rank our unscaled ``X^T X`` cannot reproduce), which moves
group boundaries when act-order and groups meet dead inputs.  Without dead inputs the two agree.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import check_flag  # (sym="False" is truthy: a ValueError, not symmetric)
from ..utils import is_int


def _check_bits(bits) -> int:
    """``bits`` as a Python int (a numpy ``int8(8)`` would overflow in ``2 ** (bits - 1)``)."""
    if not is_int(bits) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in [2, 16] (16 = no quantization), got {bits!r}")
    return int(bits)


def _check_clip(clip):
    """A clipping ratio in (0, 1] (a number, or an array of them; not checked when traced):
    ``clip <= 0`` made every scale fall back to 1, silently rounding to integers."""
    from ..utils import concrete
    c = concrete(clip)
    if c is None:
        return
    if c.dtype == bool or not np.issubdtype(c.dtype, np.number) or not np.all((c > 0) & (c <= 1)):
        raise ValueError(f"clip must be a clipping ratio in (0, 1] (1 = no clipping), got {clip!r}")


def _grouped(x, groupsize):
    """``[..., n] -> [..., n / g, g]`` (``g = n`` when ``groupsize`` is None)."""
    n = x.shape[-1]
    g = n if groupsize is None else groupsize
    if not is_int(g) or g <= 0 or n % g:
        raise ValueError(f"groupsize must be a positive divisor of the quantized axis ({n}) or "
                         f"None, got {groupsize!r}")
    return x.reshape(x.shape[:-1] + (n // g, g))


def quant_params(x, bits, *, sym=True, clip=1.0, xp=jnp):
    """Scale and zero point of each row of ``x [..., g]`` (reduced over the last axis) ->
    ``(scale [..., 1], zero [..., 1], qmin, qmax)``."""
    if sym:
        qmax = 2 ** (bits - 1) - 1
        amax = xp.max(xp.abs(x), axis=-1, keepdims=True) * clip
        scale = xp.where(amax > 0, amax / qmax, 1.0)
        return scale, xp.zeros_like(scale), -(qmax + 1), qmax
    qmax = 2 ** bits - 1
    hi = xp.maximum(xp.max(x, axis=-1, keepdims=True), 0) * clip
    lo = xp.minimum(xp.min(x, axis=-1, keepdims=True), 0) * clip
    scale = xp.where(hi > lo, (hi - lo) / qmax, 1.0)
    zero = xp.round(-lo / scale)
    return scale, zero, 0, qmax


def quantize_int(x, scale, zero, qmin, qmax, xp=jnp):
    return xp.clip(xp.round(x / scale) + zero, qmin, qmax)


def fake_quant(x, bits: int, *, groupsize: Optional[int] = None, sym: bool = True,
               clip: float = 1.0):
    """Quantize-dequantize ``x`` over its last axis (one scale per row, or per ``groupsize``
    block of the last axis); computed in float32, returned in ``x``'s dtype."""
    bits = _check_bits(bits)
    _check_clip(clip)
    sym = check_flag("sym", sym)
    if bits >= 16:
        return x
    _check_float_x(x)
    if len(x.shape) == 0:
        raise ValueError("x must have at least one axis (the quantized last axis), got a scalar")
    xg = _grouped(x.astype(jnp.float32), groupsize)
    scale, zero, qmin, qmax = quant_params(xg, bits, sym=sym, clip=clip)
    q = quantize_int(xg, scale, zero, qmin, qmax)
    return ((q - zero) * scale).reshape(x.shape).astype(x.dtype)


# --------------------------------------------------------------------------- weights
_CLIP = dict(grid=100, max_shrink=0.8, norm=2.4)  # the authors' clipping search: grid and error norm


def _check_clip_grid(grid) -> int:
    if not is_int(grid) or grid < 2:
        raise ValueError(f"clip_grid must be an int >= 2 (the search tries 1 - i / clip_grid for i < "
                         f"0.8 clip_grid), got {grid!r}")
    return int(grid)


def clip_ratios(grid=_CLIP["grid"], max_shrink=_CLIP["max_shrink"]):
    """The clipping ratios the search tries, as the authors' ``WeightQuantizer``:
    ``1 - i / grid`` for ``i < int(max_shrink * grid)`` (grid 100: 80 ratios, 1.0 .. 0.21)."""
    return [1.0 - i / grid for i in range(int(max_shrink * grid))]


def _clip_search(w, bits, sym, grid=_CLIP["grid"], max_shrink=_CLIP["max_shrink"], norm=_CLIP["norm"]):
    """Per-row clipping ratio of ``w [..., g]`` (numpy) minimising ``sum |w - Q_c(w)|^norm``
    over the ratios ``c`` of :func:`clip_ratios`: ``[..., 1]`` float64.  The errors are
    computed in float32 by one jitted XLA computation (on the accelerator when there is one;
    ~6x faster than numpy float64 on 2 CPU cores, whose choices it reproduces up to near-ties)."""
    idx = np.asarray(_clip_search_index(jnp.asarray(w, jnp.float32), bits, sym, grid, max_shrink, norm))
    return 1.0 - idx.astype(np.float64) / grid


def _clip_ratio(x, bits, sym, grid=_CLIP["grid"]):
    """The searched clipping ratio of each row of ``x [..., g]`` (traceable; ``[..., 1]`` in
    ``x``'s dtype, the search itself in float32 as in :func:`_clip_search`)."""
    idx = _clip_search_index(x.astype(jnp.float32), bits, sym, grid, _CLIP["max_shrink"], _CLIP["norm"])
    return 1.0 - idx.astype(x.dtype) / grid


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _clip_search_index(w, bits, sym, grid, max_shrink, norm):
    """The grid index ``i`` of the best ratio ``1 - i / grid`` per row of ``w [..., g]`` (the
    first of equal errors, as the authors' strict ``err < best``; a loop, not unrolled: an
    unrolled search keeps every candidate's temporaries alive, 3.4 GB more at ``[11008, 4096]``)."""
    clips = jnp.asarray(clip_ratios(grid, max_shrink), w.dtype)

    def body(i, carry):
        best, index = carry
        s, z, lo, hi = quant_params(w, bits, sym=sym, clip=clips[i])
        err = jnp.sum(jnp.abs((quantize_int(w, s, z, lo, hi) - z) * s - w) ** norm, -1, keepdims=True)
        better = err < best
        return jnp.where(better, err, best), jnp.where(better, i, index)
    init = (jnp.full(w.shape[:-1] + (1,), jnp.inf, w.dtype), jnp.zeros(w.shape[:-1] + (1,), jnp.int32))
    return jax.lax.fori_loop(0, len(clips), body, init)[1]


def _params_rows(w, bits, sym, clip_search, clip_grid=_CLIP["grid"]):
    """Quantization parameters for the rows of ``w [..., g]`` (numpy float64)."""
    clip = _clip_search(w, bits, sym, clip_grid) if clip_search else 1.0
    return quant_params(w, bits, sym=sym, clip=clip, xp=np)


def rtn_weight(w, bits: int, *, groupsize=None, sym=True, clip_search=True, return_int=False,
               dtype=jnp.float32, clip_grid=_CLIP["grid"]):
    """Round-to-nearest weight quantization of ``w [in, out]`` per output channel (or per group
    of ``groupsize`` inputs), as one jitted XLA computation in ``dtype`` (float32, as the
    authors' code; float64 needs ``jax_enable_x64``), on the accelerator when there is one.
    ``clip_search``: each channel's (group's) clipping ratio minimises ``sum |w - w^|^2.4`` over
    the ratios of :func:`clip_ratios` (``clip_grid`` 100: the authors' 80 ratios).
    Returns the dequantized ``[in, out]`` (numpy, ``dtype``), or with ``return_int`` also
    ``(q [in, out] int32, scale [in / g, out], zero [in / g, out])``; ``bits >= 16``: ``w``
    unquantized as numpy float64 (not rounded to ``dtype``: QuaRot's rotated float64 weights
    keep their precision until the model's cast) and ``None`` for the rest.
    :func:`rtn_weight_reference` is the numpy float64 version it is tested against."""
    bits = _check_bits(bits)
    sym, clip_search = check_flag("sym", sym), check_flag("clip_search", clip_search)
    return_int = check_flag("return_int", return_int)
    if bits >= 16:
        w = np.asarray(w, np.float64)
        return (w, None, None, None) if return_int else w
    if np.ndim(w) != 2 or 0 in np.shape(w):
        raise ValueError(f"w must be a 2-D weight [in, out] (in, out >= 1), got shape {np.shape(w)}")
    _check_dtype(dtype)
    _grouped(np.empty((0, np.shape(w)[0])), groupsize)  # before jit: a ValueError naming it
    clip_grid = _check_clip_grid(clip_grid)
    out = _rtn_columns(jnp.asarray(w, dtype), bits, groupsize, bool(sym), clip_grid if clip_search else 0)
    deq, q, scale, zero = (np.asarray(a) for a in out)
    return (deq, q, scale, zero) if return_int else deq


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _rtn_columns(w, bits, groupsize, sym, clip_grid):
    """``w [in, out]`` -> dequantized ``[in, out]``, ints ``[in, out]`` and scale / zero
    ``[in / g, out]`` (the clipping ratio searched in float32, as everywhere)."""
    wg = _grouped(w.T, groupsize)                                 # [out, G, g]
    clip = _clip_ratio(wg, bits, sym, clip_grid) if clip_grid else 1.0
    s, z, lo, hi = quant_params(wg, bits, sym=sym, clip=clip)
    q = quantize_int(wg, s, z, lo, hi)
    deq = ((q - z) * s).reshape(w.shape[1], w.shape[0]).T
    return deq, q.reshape(w.shape[1], -1).T.astype(jnp.int32), s[..., 0].T, z[..., 0].T


def rtn_weight_reference(w, bits: int, *, groupsize=None, sym=True, clip_search=True, return_int=False,
                         clip_grid=_CLIP["grid"]):
    """:func:`rtn_weight` in numpy float64 (the clipping search in float32 XLA, as there)."""
    bits = _check_bits(bits)
    sym, clip_search = check_flag("sym", sym), check_flag("clip_search", clip_search)
    return_int = check_flag("return_int", return_int)
    w = np.asarray(w, np.float64)
    if bits >= 16:
        return (w, None, None, None) if return_int else w
    wg = _grouped(w.T, groupsize)                                 # [out, G, g]
    clip_grid = _check_clip_grid(clip_grid)
    s, z, lo, hi = _params_rows(wg, bits, sym, clip_search, clip_grid)
    q = quantize_int(wg, s, z, lo, hi, xp=np)
    deq = ((q - z) * s).reshape(w.shape[1], w.shape[0]).T
    if return_int:
        return deq, q.reshape(w.shape[1], -1).T.astype(np.int32), s[..., 0].T, z[..., 0].T
    return deq


def gptq_weight(w, hessian, bits: int, *, groupsize=None, sym=True, clip_search=True,
                percdamp=0.01, blocksize=128, return_int=False, dtype=jnp.float32, act_order=False,
                clip_grid=_CLIP["grid"]):
    """GPTQ (Frantar et al., 2023) of ``w [in, out]`` given ``hessian = X^T X [in, in]`` of the
    calibration inputs: columns (inputs) quantized in order, each one's error spread over the
    not-yet-quantized ones through the upper Cholesky factor ``U`` of the damped inverse
    Hessian (:func:`gptq_hinv`)::

        q_j = Q(w_j),   e_j = (w_j - q_j) / U_jj,   w_k -= e_j U_jk   (k > j)

    with the updates of a block of ``blocksize`` columns applied to the later columns at
    once (lazy batching).  One jitted XLA computation in ``dtype`` (float32, as the authors'
    code; float64 needs ``jax_enable_x64``), on the accelerator when there is one.  Rows
    (output channels) are independent, so linears sharing an input can be quantized as one
    ``[in, sum(out)]`` matrix with one Hessian inversion (``quantize`` does).

    Group parameters (scale, zero, clipping ratio) come from the current, error-updated
    weights of the group when it starts (blocks are aligned with groups so those are always
    up to date; the original GPTQ code reads weights that miss the current block's updates
    when groups and blocks are not aligned, which they are at its defaults); no act-order
    by default (the authors' default for QuaRot); ``act_order=True`` quantizes the inputs in
    order of decreasing ``H_jj`` (GPTQ's ``act_order`` / ``desc_act``; groups are then
    consecutive in that order, so ``return_int`` with groups is refused: their parameters
    would not follow the input order).  Returns the dequantized ``[in, out]``
    (numpy, ``dtype``), with ``return_int`` also ``(q [in, out] int32, scale [in / g, out],
    zero [in / g, out])`` as :func:`rtn_weight` (``clip_search``, ``clip_grid``, ``bits >= 16``
    as there).  :func:`gptq_weight_reference` is the
    readable one-column-at-a-time float64 algorithm it is tested against."""
    bits = _check_bits(bits)
    sym, clip_search = check_flag("sym", sym), check_flag("clip_search", clip_search)
    return_int = check_flag("return_int", return_int)
    if bits >= 16:
        w = np.asarray(w, np.float64)
        return (w, None, None, None) if return_int else w
    w, n, g = _check_gptq_inputs(w, hessian, groupsize)
    clip_grid = _check_clip_grid(clip_grid)
    if _act_order_requested(act_order, groupsize, return_int):
        kw = dict(groupsize=groupsize, sym=sym, clip_search=clip_search, percdamp=percdamp,
                  blocksize=blocksize, dtype=dtype, return_int=True, clip_grid=clip_grid)
        out = _in_act_order(lambda w, h: gptq_weight(w, h, bits, **kw), w, hessian)
        return out if return_int else out[0]
    if not is_int(blocksize) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    blocksize = int(blocksize)
    _check_dtype(dtype)
    u, dead = gptq_hinv(jnp.asarray(hessian, dtype), percdamp)
    W = jnp.where(dead[None, :], 0, jnp.asarray(w, dtype).T)       # [out, in]
    bs = _gptq_block_size(n, groupsize, blocksize)
    pad = -n % bs  # zero columns with U = I: quantized exactly, their error is 0
    if pad:
        W = jnp.pad(W, ((0, 0), (0, pad)))
        u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(n + pad) >= n).astype(u.dtype)
    qi, S, Z = _gptq_columns(W, u, bits, groupsize, sym, clip_grid if clip_search else 0, bs)
    qi, S, Z = np.asarray(qi[:, :n]), np.asarray(S[:, :n // g]), np.asarray(Z[:, :n // g])
    deq = _dequantize_groups(qi, S, Z).astype(S.dtype).T
    if return_int:
        return deq, qi.T, S.T, Z.T
    return deq


def _dequantize_groups(q, scale, zero):
    """``(q - zero) * scale`` for ``q [out, n]`` with one ``scale, zero [out, G]`` per group of
    ``n / G`` consecutive inputs -> ``[out, n]``."""
    out, n = q.shape
    g = n // scale.shape[1]
    return ((q.reshape(out, -1, g) - zero[..., None]) * scale[..., None]).reshape(out, n)


def _check_dtype(dtype):
    """The compute dtype of the jitted weight quantizers: float32, or float64 under x64."""
    try:
        ok = jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype=float64 needs jax_enable_x64 (e.g. `with jax.enable_x64(True):`)")


def _check_gptq_inputs(w, hessian, groupsize):
    if np.ndim(w) != 2 or 0 in np.shape(w):
        raise ValueError(f"w must be a [in, out] matrix (in, out >= 1), got shape {np.shape(w)}")
    n = np.shape(w)[0]
    if np.shape(hessian) != (n, n):
        raise ValueError(f"hessian must be [in, in] = [{n}, {n}] for w of shape {np.shape(w)}, "
                         f"got shape {np.shape(hessian)}")
    g = _grouped(np.empty((0, n)), groupsize).shape[-1]   # validates groupsize
    return w, n, g


def _act_order_requested(act_order, groupsize, return_int):
    if not isinstance(act_order, bool):
        raise ValueError(f"act_order must be a bool, got {act_order!r}")
    if act_order and groupsize is not None and return_int:
        raise ValueError("act_order=True with groupsize: the groups follow the act-order "
                         "permutation, not the input order, so return_int is not available")
    return act_order


def _in_act_order(run, w, hessian):
    """GPTQ's act-order: ``run(w, hessian) -> (deq, q, scale, zero)`` on the inputs sorted by
    decreasing ``H_jj`` (stable among ties), ``deq`` and ``q`` put back in input order."""
    h = np.asarray(hessian)
    perm = np.argsort(-np.diagonal(h), kind="stable")
    inv = np.argsort(perm)
    deq, q, scale, zero = run(np.asarray(w)[perm], h[np.ix_(perm, perm)])
    return deq[inv], q[inv], scale, zero


def _check_percdamp(percdamp):
    if (isinstance(percdamp, (bool, np.bool_)) or not isinstance(percdamp, (int, float, np.integer, np.floating))
            or not 0 <= percdamp < float("inf")):
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")


def gptq_hinv(hessian, percdamp=0.01):
    """GPTQ's preconditioner of ``hessian = X^T X [in, in]``: ``(U [in, in], dead [in] bool)``,
    ``U`` the upper Cholesky factor of ``(H + percdamp mean(diag H) I)^-1`` after the
    ``dead`` inputs (``H_jj = 0``: never active in the calibration data) get ``H_jj = 1``.
    In ``hessian``'s float dtype when it is float32 or float64, else (integers, and floats
    narrower than float32, which XLA's Cholesky does not take) in float32; raises when the
    damped Hessian is not positive definite in that precision (a larger ``percdamp`` helps)."""
    _check_percdamp(percdamp)
    h = jnp.asarray(hessian)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] == 0:
        raise ValueError(f"hessian must be a square [in, in] matrix X^T X, got shape {tuple(h.shape)}")
    if not isinstance(h, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(h))):  # (on the device)
        # (else 'not positive definite ...: raise percdamp')
        raise ValueError("hessian has NaN / inf entries (the calibration activations overflowed)")
    if not jnp.issubdtype(h.dtype, jnp.floating) or jnp.dtype(h.dtype).itemsize < 4:
        h = h.astype(jnp.float32)  # bf16 / f16: an XLA NotImplementedError ('Unsupported dtype')
    u, dead = _gptq_hinv(h, float(percdamp))
    if not bool(jnp.all(jnp.isfinite(u))):
        raise ValueError(f"GPTQ: the damped Hessian is not positive definite in {h.dtype} "
                         f"(percdamp={percdamp}); raise percdamp")
    return u, dead


@functools.partial(jax.jit, static_argnums=1)
def _gptq_hinv(h, percdamp):
    """``U`` without forming ``H^-1``: with ``P`` the reversal permutation and
    ``P H P = L L^T``, ``H^-1 = V^T V`` for the upper triangular ``V = P L^-1 P``: one
    Cholesky and one triangular inverse (half the flops of inverse-then-Cholesky, and no
    explicit inverse to lose precision in)."""
    n = h.shape[0]
    eye = jnp.eye(n, dtype=h.dtype)
    dead = jnp.diagonal(h) == 0
    h = jnp.where(dead[:, None] & (eye > 0), 1.0, h)
    h = h + percdamp * jnp.mean(jnp.diagonal(h)) * eye
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    return jax.scipy.linalg.solve_triangular(lower, eye, lower=True)[::-1, ::-1], dead


def _gptq_block_size(n, groupsize, blocksize):
    """The lazy-batch width: ``blocksize``, or for groups the nearest width such that a group
    never starts inside a block it does not fit in (a multiple of ``g <= blocksize``, or a
    divisor of ``g > blocksize``), so a group's weights are all current when it starts."""
    if groupsize is None:
        return min(blocksize, n)
    if groupsize <= blocksize:
        return groupsize * max(1, min(blocksize, n) // groupsize)
    return _largest_divisor(groupsize, blocksize)


def _largest_divisor(n, at_most, also=lambda d: True):
    return max(d for d in range(1, at_most + 1) if n % d == 0 and also(d))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _gptq_columns(W, u, bits, groupsize, sym, clip_grid, bs):
    """GPTQ's column loop: ``W [out, n]`` (``n`` a multiple of ``bs``), ``u [n, n]`` upper ->
    ``(q int32 [out, n], scale [out, G], zero [out, G])``.

    Lazy batching on two levels: blocks of ``bs`` columns, each in sub-blocks of ``sub <= 32``
    columns, each a loop over its columns.  A column's error updates only its sub-block; a
    sub-block's errors ``E [out, sub]`` update the rest of its block in one matmul, a
    block's ``E [out, bs]`` the later columns.  Static shapes: the later-column updates run
    over all the columns from the start of a chunk of blocks (``U``'s rows masked to the
    later columns); the ``n / 1024`` (at most 8) chunks, unrolled, bring the flops near the
    triangle's.  A group's parameters are computed from the level its width fits in (the
    sub-block, the block, or the columns from the block's start), whose weights are all
    current when the group starts (groups and the two levels are aligned)."""
    out, n = W.shape
    g = n if groupsize is None else groupsize
    sub = _largest_divisor(bs, 32, lambda d: g % d == 0 or d % g == 0)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    hp = jax.lax.Precision.HIGHEST
    dyn = jax.lax.dynamic_slice

    def group_params(x):                                     # x [out, g] -> scale, zero [out]
        clip = _clip_ratio(x, bits, sym, clip_grid) if clip_grid else 1.0  # searched in float32
        s, z, _, _ = quant_params(x, bits, sym=sym, clip=clip)
        return s[:, 0], z[:, 0]

    def later(E, rows, start, first_later):
        """``E [out, k] @ rows [k, m]`` with the columns before ``first_later`` masked
        (``rows``' columns are ``start, start + 1, ...``)."""
        cols = start + jnp.arange(rows.shape[1])
        return jnp.dot(E, jnp.where(cols[None, :] >= first_later, rows, 0), precision=hp)

    def run_block(a, Wt, i1, S, Z, s, z):
        """Block at column ``i1`` of the tail ``Wt = W[:, a:]`` (current up to the block)
        -> (errors ``E [out, bs]``, integers ``[out, bs]``, S, Z, s, z)."""
        W1 = dyn(Wt, (0, i1 - a), (out, bs))
        U1 = dyn(u, (i1, i1), (bs, bs))

        def run_sub(m, c):
            W1, E, Q1, S, Z, s, z = c
            j = m * sub
            W2, U2 = dyn(W1, (0, j), (out, sub)), dyn(U1, (j, j), (sub, sub))

            def column(i, c):
                W2, E2, Q2, S, Z, s, z = c
                col = i1 + j + i

                def start_group(args):
                    S, Z, _, _ = args
                    x = (dyn(W2, (0, i), (out, g)) if g <= sub else dyn(W1, (0, j), (out, g))
                         if g <= bs else dyn(Wt, (0, i1 - a), (out, g)))
                    s, z = group_params(x)
                    return S.at[:, col // g].set(s), Z.at[:, col // g].set(z), s, z
                if g <= n - a:  # (a group wider than the tail cannot start in it)
                    S, Z, s, z = jax.lax.cond(col % g == 0, start_group, lambda x: x, (S, Z, s, z))
                x = jax.lax.dynamic_index_in_dim(W2, i, 1, keepdims=False)
                qi = quantize_int(x, s, z, qmin, qmax)
                e = (x - (qi - z) * s) / U2[i, i]
                W2 = W2 - e[:, None] * U2[i][None, :]         # U2[i, :i] = 0
                return W2, E2.at[:, i].set(e), Q2.at[:, i].set(qi.astype(jnp.int32)), S, Z, s, z
            zeros = (jnp.zeros((out, sub), W.dtype), jnp.zeros((out, sub), jnp.int32))
            _, E2, Q2, S, Z, s, z = jax.lax.fori_loop(0, sub, column, (W2, *zeros, S, Z, s, z))
            W1 = W1 - later(E2, dyn(U1, (j, 0), (sub, bs)), 0, j + sub)
            return (W1, jax.lax.dynamic_update_slice(E, E2, (0, j)),
                    jax.lax.dynamic_update_slice(Q1, Q2, (0, j)), S, Z, s, z)
        zeros = (jnp.zeros((out, bs), W.dtype), jnp.zeros((out, bs), jnp.int32))
        _, E, Q1, S, Z, s, z = jax.lax.fori_loop(0, bs // sub, run_sub, (W1, *zeros, S, Z, s, z))
        return E, Q1, S, Z, s, z

    nb = n // bs
    n_chunks = max(1, min(nb, n // 1024, 8))
    edges = [bs * (nb * c // n_chunks) for c in range(n_chunks + 1)]
    Q = jnp.zeros((out, n), jnp.int32)
    S = Z = jnp.zeros((out, n // g), W.dtype)
    s = z = jnp.zeros((out,), W.dtype)
    for a, b in zip(edges[:-1], edges[1:]):        # unrolled: W holds the columns from a on
        def block(k, c, a=a):
            Wt, Q, S, Z, s, z = c
            i1 = a + k * bs
            E, Q1, S, Z, s, z = run_block(a, Wt, i1, S, Z, s, z)
            Wt = Wt - later(E, dyn(u, (i1, a), (bs, n - a)), a, i1 + bs)
            return Wt, jax.lax.dynamic_update_slice(Q, Q1, (0, i1)), S, Z, s, z
        W, Q, S, Z, s, z = jax.lax.fori_loop(0, (b - a) // bs, block, (W, Q, S, Z, s, z))
        W = W[:, b - a:]
    return Q, S, Z


def gptq_weight_reference(w, hessian, bits: int, *, groupsize=None, sym=True, clip_search=True,
                          percdamp=0.01, act_order=False, clip_grid=_CLIP["grid"]):
    """GPTQ one column at a time in numpy float64: the readable algorithm and the oracle of
    :func:`gptq_weight` (same arguments and return value as its ``return_int=True``)::

        U = chol((H + damp I)^-1)^T
        for j in 0 .. in - 1:
            (group start) scale, zero <- the current w[:, j : j + g]
            q_j = Q(w_j);  w[:, j:] -= ((w_j - q_j) / U_jj) U[j, j:]
    """
    bits = _check_bits(bits)
    sym, clip_search = check_flag("sym", sym), check_flag("clip_search", clip_search)
    _check_percdamp(percdamp)
    w, n, g = _check_gptq_inputs(w, hessian, groupsize)
    clip_grid = _check_clip_grid(clip_grid)
    if _act_order_requested(act_order, None, True):  # (with groups: scale / zero in act order)
        kw = dict(groupsize=groupsize, sym=sym, clip_search=clip_search, percdamp=percdamp, clip_grid=clip_grid)
        return _in_act_order(lambda w, h: gptq_weight_reference(w, h, bits, **kw), w, hessian)
    h = np.array(hessian, np.float64)
    W = np.asarray(w, np.float64).T.copy()                        # [out, in]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    W[:, dead] = 0.0
    h[np.diag_indices(n)] += percdamp * np.mean(np.diag(h))
    U = np.linalg.cholesky(np.linalg.inv(h)).T
    Q, S, Z = np.zeros(W.shape, np.int32), [], []
    for j in range(n):
        if j % g == 0:
            s, z, lo, hi = _params_rows(W[:, j:j + g], bits, sym, clip_search, clip_grid)
            S.append(s[:, 0])
            Z.append(z[:, 0])
        qi = quantize_int(W[:, j:j + 1], s, z, lo, hi, xp=np)
        err = (W[:, j] - ((qi - z) * s)[:, 0]) / U[j, j]
        W[:, j:] -= np.outer(err, U[j, j:])
        Q[:, j] = qi[:, 0]
    S, Z = np.stack(S, 1), np.stack(Z, 1)                         # [out, G]
    deq = _dequantize_groups(Q, S, Z).T
    return deq, Q.T, S.T, Z.T


# --------------------------------------------------------------------------- int4 packing
def pack_int4(q):
    """Signed 4-bit values ``q [..., 2k]`` (ints in [-8, 7]) -> ``uint8 [..., k]``, two per
    byte: element ``2i`` in the low nibble, ``2i + 1`` in the high one.  Values outside
    [-8, 7] or not integral are a ``ValueError`` when they are known (outside ``jit``); under a
    trace they would wrap modulo 16."""
    from ..utils import concrete
    q = jnp.asarray(q)
    if q.ndim == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last axis, got shape {q.shape}")
    values = concrete(q)
    if values is not None and values.size:
        if not (np.issubdtype(values.dtype, np.integer) or np.all(np.mod(values, 1) == 0)):
            raise ValueError("pack_int4 needs integer values in [-8, 7], got non-integral values")
        if values.min() < -8 or values.max() > 7:
            raise ValueError(f"pack_int4 needs values in [-8, 7], got values from {values.min()} to {values.max()}")
    u = (q.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p):
    """Inverse of :func:`pack_int4`: ``uint8 [..., k]`` -> ``int8 [..., 2k]`` in [-8, 7] (the
    bytes may also come as int8, the same bit patterns; floats are refused: they were truncated)."""
    p = jnp.asarray(p)
    if p.dtype not in (jnp.dtype(jnp.uint8), jnp.dtype(jnp.int8)) or p.ndim == 0:
        raise ValueError(f"p must be packed int4 bytes (uint8 [..., k], from pack_int4), got dtype {p.dtype} "
                         f"shape {tuple(p.shape)}")
    p = p.astype(jnp.uint8).astype(jnp.int32)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    both = jnp.stack([lo, hi], axis=-1).reshape(p.shape[:-1] + (2 * p.shape[-1],))
    return jnp.where(both >= 8, both - 16, both).astype(jnp.int8)


# --------------------------------------------------------------------------- real int8 path
def quantize_rows_int8(x, *, bits: int = 8, clip=1.0):
    """Per-row symmetric ``bits``-bit integers (``bits <= 8``) stored as int8: ``x [..., n]`` ->
    ``(q int8 [..., n], scale float32 [..., 1])``; ``s q`` is :func:`fake_quant`'s value."""
    if not is_int(bits) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8] (int8 storage), got {bits!r}")
    bits = int(bits)
    _check_float_x(x)
    _check_clip(clip)
    scale, _, qmin, qmax = quant_params(x.astype(jnp.float32), bits, sym=True, clip=clip)
    return quantize_int(x.astype(jnp.float32), scale, 0.0, qmin, qmax).astype(jnp.int8), scale


def _check_float_x(x):
    """The real int8 path quantizes float activations: an integer ``x`` came back as an integer
    array (the float result truncated to ``x``'s dtype) without a word."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array (the activations), got dtype {dtype}")


def int_matmul(x, w_int8, w_scale, *, a_bits: int = 8, clip=1.0, out_dtype=None):
    """Integer linear ``x [..., K] @ w [K, *out]``: ``x`` quantized per row (token) to
    ``a_bits`` symmetric integers in int8, int8 x int8 products accumulated in int32, then

        y = s_x s_w (q_x @ q_w)        (s_w ``[*out]``: per output channel)

    -> ``[..., *out]`` in ``out_dtype`` (default ``x.dtype``)."""
    if getattr(w_int8, "dtype", None) != jnp.int8:
        raise ValueError(f"w_int8 must be an int8 array (the integer weights; e.g. rtn_weight(..., "
                         f"return_int=True)'s q as int8), got dtype {getattr(w_int8, 'dtype', None)}")
    if not is_int(a_bits) or not 2 <= a_bits <= 8:
        raise ValueError(f"a_bits must be an int in [2, 8] (activations stored as int8; a_bits=16, "
                         f"weight-only, is x @ (scale * w), not this integer product), got {a_bits!r}")
    _check_float_x(x)
    if w_int8.ndim < 1 or x.ndim < 1 or x.shape[-1] != w_int8.shape[0]:
        raise ValueError(f"x's last axis must match w_int8's first (input) axis: x {tuple(x.shape)}, "
                         f"w_int8 {tuple(w_int8.shape)}")
    n_out = w_int8.ndim - 1
    out_shape, s_shape = tuple(w_int8.shape[1:]), tuple(np.shape(w_scale))
    lead = s_shape[:len(s_shape) - n_out] if len(s_shape) >= n_out else None
    if s_shape and (lead is None or s_shape[len(lead):] != out_shape or any(d != 1 for d in lead)):
        # (a grouped scale [G, out] broadcast against the tokens: silently wrong when T == G)
        raise ValueError(f"w_scale must be one scale per output channel, shape {out_shape} (or [1, ...] of it, "
                         f"or a scalar), got shape {s_shape}: the integer path has no input groups")
    qx, sx = quantize_rows_int8(x, bits=a_bits, clip=clip)
    acc = jax.lax.dot_general(qx, w_int8, (((qx.ndim - 1,), (0,)), ((), ())),
                              preferred_element_type=jnp.int32)
    sx = sx.reshape(sx.shape[:-1] + (1,) * n_out)
    y = acc.astype(jnp.float32) * sx * jnp.asarray(w_scale, jnp.float32)
    return y.astype(out_dtype or x.dtype)


def int8_linear(x, w_int8, w_scale, *, clip=1.0, out_dtype=None):
    """W8A8 linear with integer accumulation: ``x [..., in]`` float, ``w_int8 [in, out]`` int8,
    ``w_scale [out]`` (per output channel) -> ``[..., out]``.

        y = (s_x s_w) * (q_x @ q_w)      q_x = per-token int8 of x, int32 accumulation

    ``lax.dot_general(..., preferred_element_type=int32)`` lowers to int8 tensor-core MMAs
    (IMMA) on NVIDIA GPUs from Turing on, H100/H200 (Hopper) included; Hopper has no native
    int4 tensor-core MMA (its MMA types are fp64/tf32/bf16/fp16/fp8/int8), so W4A4 runs there
    as int4 storage unpacked to int8 (or fp8) for the matmul, as QuaRot's CUTLASS kernels do
    on Ampere (which does have int4 MMA).  Equal to the fake-quant computation up to float32
    rounding (tested).  The model's version is :class:`jaxformers.quant.model.IntLinear`."""
    return int_matmul(x, w_int8, w_scale, a_bits=8, clip=clip, out_dtype=out_dtype)
