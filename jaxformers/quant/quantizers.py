"""Quantizers: round-to-nearest fake quantization, clipping search, GPTQ, int4 packing and a
real int8 matmul path.

Uniform quantization of a group of values ``x`` (one output channel, one group of
``groupsize`` inputs, one token, one head) to ``b`` bits::

    symmetric:   s = c * max|x| / (2^(b-1) - 1),   q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1),   x^ = s q
    asymmetric:  s = c * (max x - min x) / (2^b - 1),  z = round(-c min x / s),
                 q = clamp(round(x / s) + z, 0, 2^b - 1),   x^ = s (q - z)

``c`` is the clipping ratio (1 = no clipping).  Weights: per output channel (or per group of
input channels), ``c`` searched per channel on a grid to minimise ``sum |w - w^|^2.4`` (the
GPTQ/QuaRot ``mse`` search); activations: per token (QuaRot: symmetric, ``c = 0.9``); KV
cache: per head (group = head dim; QuaRot: asymmetric, ``c = 0.95``).  ``bits >= 16`` means
no quantization.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def _check_bits(bits):
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in [2, 16] (16 = no quantization), got {bits!r}")


def _grouped(x, groupsize):
    """``[..., n] -> [..., n / g, g]`` (``g = n`` when ``groupsize`` is None)."""
    n = x.shape[-1]
    g = n if groupsize is None else groupsize
    if not isinstance(g, int) or g <= 0 or n % g:
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
    _check_bits(bits)
    if bits >= 16:
        return x
    xg = _grouped(x.astype(jnp.float32), groupsize)
    scale, zero, qmin, qmax = quant_params(xg, bits, sym=sym, clip=clip)
    q = quantize_int(xg, scale, zero, qmin, qmax)
    return ((q - zero) * scale).reshape(x.shape).astype(x.dtype)


# --------------------------------------------------------------------------- weights
def _clip_search(w, bits, sym, grid=20, max_shrink=0.8, norm=2.4):
    """Per-row clipping ratio of ``w [..., g]`` (numpy) minimising ``sum |w - Q_c(w)|^norm``
    over ``c = 1, 1 - 1/grid, ..., 1 - max_shrink``: ``[..., 1]`` float64.  The errors are
    computed in float32 by one jitted XLA computation (on the accelerator when there is one;
    ~6x faster than numpy float64 on 2 CPU cores, whose choices it reproduces up to near-ties)."""
    idx = np.asarray(_clip_search_index(jnp.asarray(w, jnp.float32), bits, sym, grid, max_shrink, norm))
    return 1.0 - idx.astype(np.float64) / grid


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _clip_search_index(w, bits, sym, grid, max_shrink, norm):
    """The grid index ``i`` of the best ratio ``1 - i / grid`` per row of ``w [..., g]`` (a
    loop, not unrolled: an unrolled search keeps every candidate's temporaries alive, 3.4 GB
    more at ``[11008, 4096]``)."""
    clips = jnp.asarray([1.0 - i / grid for i in range(int(max_shrink * grid) + 1)], w.dtype)

    def body(i, carry):
        best, index = carry
        s, z, lo, hi = quant_params(w, bits, sym=sym, clip=clips[i])
        err = jnp.sum(jnp.abs((quantize_int(w, s, z, lo, hi) - z) * s - w) ** norm, -1, keepdims=True)
        better = err < best
        return jnp.where(better, err, best), jnp.where(better, i, index)
    init = (jnp.full(w.shape[:-1] + (1,), jnp.inf, w.dtype), jnp.zeros(w.shape[:-1] + (1,), jnp.int32))
    return jax.lax.fori_loop(0, len(clips), body, init)[1]


def _params_rows(w, bits, sym, clip_search):
    """Quantization parameters for the rows of ``w [..., g]`` (numpy float64)."""
    clip = _clip_search(w, bits, sym) if clip_search else 1.0
    return quant_params(w, bits, sym=sym, clip=clip, xp=np)


def rtn_weight(w, bits: int, *, groupsize=None, sym=True, clip_search=True, return_int=False):
    """Round-to-nearest weight quantization of ``w [in, out]`` (numpy), per output channel
    (or per group of ``groupsize`` inputs).  Returns the dequantized ``[in, out]`` float64, or
    with ``return_int`` also ``(q [in, out] int, scale [in / g, out], zero [in / g, out])``."""
    _check_bits(bits)
    w = np.asarray(w, np.float64)
    if bits >= 16:
        return (w, None, None, None) if return_int else w
    wg = _grouped(w.T, groupsize)                                 # [out, G, g]
    s, z, lo, hi = _params_rows(wg, bits, sym, clip_search)
    q = quantize_int(wg, s, z, lo, hi, xp=np)
    deq = ((q - z) * s).reshape(w.shape[1], w.shape[0]).T
    if return_int:
        return deq, q.reshape(w.shape[1], -1).T.astype(np.int32), s[..., 0].T, z[..., 0].T
    return deq


def gptq_weight(w, hessian, bits: int, *, groupsize=None, sym=True, clip_search=True,
                percdamp=0.01, blocksize=128, return_int=False):
    """GPTQ (Frantar et al., 2023) of ``w [in, out]`` given ``hessian = X^T X [in, in]`` of the
    calibration inputs: columns (inputs) quantized in order, each one's error spread over the
    not-yet-quantized ones through the inverse Hessian's Cholesky factor, in blocks of
    ``blocksize``; damping ``percdamp * mean(diag H)``.  Numpy float64; returns ``[in, out]``.

    Group parameters come from the current (error-updated) weights when a group starts, as in
    the reference implementation; no act-order (the authors' default for QuaRot is
    ``act_order=False`` too).  ``return_int``: also the integers, scales and zero points, as
    :func:`rtn_weight` returns them."""
    _check_bits(bits)
    w = np.asarray(w, np.float64)
    if bits >= 16:
        return (w, None, None, None) if return_int else w
    h = np.array(hessian, np.float64)
    W = w.T.copy()                                                # [out, in]
    n = W.shape[1]
    if groupsize is not None:
        _grouped(W, groupsize)  # validates
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    W[:, dead] = 0.0
    h[np.diag_indices(n)] += percdamp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T                # upper Cholesky of H^-1
    params = None if groupsize is not None else _params_rows(W, bits, sym, clip_search)
    Q, Qi, S, Z = np.zeros_like(W), np.zeros_like(W), np.zeros_like(W), np.zeros_like(W)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, Err = W[:, i1:i2].copy(), np.zeros((W.shape[0], i2 - i1))
        for i in range(i2 - i1):
            col = i1 + i
            if groupsize is not None and col % groupsize == 0:
                params = _params_rows(np.concatenate([W1[:, i:], W[:, i2:]], 1)[:, :groupsize],
                                      bits, sym, clip_search)
            s, z, lo, hi = params
            x = W1[:, i:i + 1]
            qi = quantize_int(x, s, z, lo, hi, xp=np)
            q = (qi - z) * s
            Q[:, col], Qi[:, col], S[:, col], Z[:, col] = q[:, 0], qi[:, 0], s[:, 0], z[:, 0]
            err = (x - q)[:, 0] / hinv[col, col]
            W1[:, i:] -= np.outer(err, hinv[col, col:i2])
            Err[:, i] = err
        W[:, i2:] -= Err @ hinv[i1:i2, i2:]
    if return_int:
        step = n if groupsize is None else groupsize
        return Q.T, Qi.T.astype(np.int32), S[:, ::step].T, Z[:, ::step].T
    return Q.T


# --------------------------------------------------------------------------- int4 packing
def pack_int4(q):
    """Signed 4-bit values ``q [..., 2k]`` (ints in [-8, 7]) -> ``uint8 [..., k]``, two per
    byte: element ``2i`` in the low nibble, ``2i + 1`` in the high one."""
    q = jnp.asarray(q)
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last axis, got shape {q.shape}")
    u = (q.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p):
    """Inverse of :func:`pack_int4`: ``uint8 [..., k]`` -> ``int8 [..., 2k]`` in [-8, 7]."""
    p = jnp.asarray(p, jnp.uint8).astype(jnp.int32)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    both = jnp.stack([lo, hi], axis=-1).reshape(p.shape[:-1] + (2 * p.shape[-1],))
    return jnp.where(both >= 8, both - 16, both).astype(jnp.int8)


# --------------------------------------------------------------------------- real int8 path
def quantize_rows_int8(x, *, bits: int = 8, clip=1.0):
    """Per-row symmetric ``bits``-bit integers (``bits <= 8``) stored as int8: ``x [..., n]`` ->
    ``(q int8 [..., n], scale float32 [..., 1])``; ``s q`` is :func:`fake_quant`'s value."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8] (int8 storage), got {bits!r}")
    scale, _, qmin, qmax = quant_params(x.astype(jnp.float32), bits, sym=True, clip=clip)
    return quantize_int(x.astype(jnp.float32), scale, 0.0, qmin, qmax).astype(jnp.int8), scale


def int_matmul(x, w_int8, w_scale, *, a_bits: int = 8, clip=1.0, out_dtype=None):
    """Integer linear ``x [..., K] @ w [K, *out]``: ``x`` quantized per row (token) to
    ``a_bits`` symmetric integers in int8, int8 x int8 products accumulated in int32, then

        y = s_x s_w (q_x @ q_w)        (s_w ``[*out]``: per output channel)

    -> ``[..., *out]`` in ``out_dtype`` (default ``x.dtype``)."""
    qx, sx = quantize_rows_int8(x, bits=a_bits, clip=clip)
    n_out = w_int8.ndim - 1
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
