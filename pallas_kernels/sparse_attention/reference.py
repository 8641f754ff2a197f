"""Plain-JAX float32 oracles for the sparse causal flash-attention kernels (SCFA).

Dense masked softmax over the whole ``[T, T]`` score matrix, no reordering:

* :func:`hash_reference`: query ``i`` sees key ``j`` iff ``j <= i`` and
  ``q_buckets[i] == k_buckets[j]``;
* :func:`qk_sparse_reference`: query ``i`` sees key ``j`` iff ``j <= i`` and
  ``q_keep[i]`` and ``k_keep[j]``.

Shapes: q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0``
(query head ``h`` reads kv head ``h // (Hq // Hkv)``); per-token labels of the
queries ``[B, T, Hq]``, of the keys ``[B, T, Hkv]``.  Rows that see no key
(and dropped queries) return zeros.  The oracles check their arguments as the kernels do
(q/k/v, the labels' shapes and dtypes, a concrete ``sm_scale``: a ``ValueError`` naming the
argument); a traced ``sm_scale`` is used unchecked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .._common import check_qkv, host_int32_ids, is_int, shape_of
from ..flash_attention.reference import reference_sm_scale
from .kernel import validate_inputs


def sparse_mask(q_labels, k_labels, hq: int, hkv: int):
    """``[B, Hq, T, T]`` visibility: causal and ``q_labels[i] == k_labels[j]`` (GQA-broadcast).

    Labels: ``[B, T, Hq]`` / ``[B, T, Hkv]`` (bucket ids, or any comparable ids); other shapes
    (or ``Hq % Hkv != 0``) raise a ``ValueError`` naming the argument."""
    for name, lab in (("q_labels", q_labels), ("k_labels", k_labels)):
        if not (hasattr(lab, "shape") and hasattr(lab, "dtype")):  # e.g. a (nested) list
            raise ValueError(f"{name} must be an array [B, T, H], got {type(lab).__name__}")
    qs, ks = shape_of(q_labels), shape_of(k_labels)
    if not (is_int(hkv) and is_int(hq) and hkv >= 1 and hq >= 1 and hq % hkv == 0):
        raise ValueError(f"hq and hkv must be positive ints with hq % hkv == 0, got hq={hq!r}, hkv={hkv!r}")
    if len(qs) != 3 or qs[2] != hq:
        raise ValueError(f"q_labels must have shape [B, T, Hq={hq}], got {qs}")
    if len(ks) != 3 or ks != qs[:2] + (hkv,):
        raise ValueError(f"k_labels must have shape [B, T, Hkv] = {qs[:2] + (hkv,)}, got {ks}")
    t = q_labels.shape[1]
    g = hq // hkv
    ql = jnp.swapaxes(q_labels, 1, 2)                         # [B, Hq, T]
    kl = jnp.repeat(jnp.swapaxes(k_labels, 1, 2), g, axis=1)  # [B, Hq, T]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [i, j]: j <= i
    return causal[None, None] & (ql[..., :, None] == kl[..., None, :])


def masked_attention(q, k, v, mask, sm_scale=None):
    """``softmax(q k^T * sm_scale, masked) v`` in float32 with a bool ``mask [B, Hq, Tq, Tk]``
    (or any rank-4 shape that broadcasts to it; ``Tq < Tk`` when decoding against a cache);
    q ``[B, Tq, Hq, D]``, k/v ``[B, Tk, Hkv, D]`` with ``Hq % Hkv == 0``.
    Rows without a visible key give 0.  Returns q's dtype (float64 inputs are computed in
    float32 too: float64 result at float32 precision, like the kernels).
    Raises ``ValueError`` naming the argument for bad q/k/v, a mask that is not such a bool
    array, or a concrete ``sm_scale`` that is not a finite number > 0."""
    check_qkv(q, k, v, self_attention=False)
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    full = (b, hq, tq, tk)
    mshape = shape_of(mask)
    if getattr(mask, "dtype", None) != jnp.bool_:
        raise ValueError(f"mask must be a bool [B, Hq, Tq, Tk] = {full} array (True = visible), got "
                         f"dtype {getattr(mask, 'dtype', type(mask).__name__)}")
    if len(mshape) != 4 or any(m not in (1, f) for m, f in zip(mshape, full)):
        raise ValueError(f"mask must have shape [B, Hq, Tq, Tk] = {full} (or broadcast to it), "
                         f"got {mshape}")
    g = hq // hkv
    scale = reference_sm_scale(sm_scale, d)
    hi = jax.lax.Precision.HIGHEST
    qf = q.astype(jnp.float32)
    kf = jnp.repeat(k.astype(jnp.float32), g, axis=2)
    vf = jnp.repeat(v.astype(jnp.float32), g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=hi) * scale
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=hi).astype(q.dtype)


def hash_reference(q, k, v, q_buckets, k_buckets, *, sm_scale=None, interpret=None):
    """Hash-sparse causal attention, dense float32 (``interpret`` accepted and ignored); the
    arguments are checked as :func:`~.kernel.hash_attention` checks them (integer buckets)."""
    del interpret
    q_buckets, k_buckets = host_int32_ids(q_buckets, k_buckets)  # numpy int64: no silent wrap
    validate_inputs(q, k, v, q_buckets, k_buckets, ("q_buckets", "k_buckets"), "int")
    mask = sparse_mask(q_buckets, k_buckets, q.shape[2], k.shape[2])
    return masked_attention(q, k, v, mask, sm_scale)


def qk_sparse_reference(q, k, v, q_keep, k_keep, *, sm_scale=None, interpret=None):
    """QK-sparse causal attention, dense float32: dropped queries / keys take part in nothing.
    The arguments are checked as :func:`~.kernel.qk_sparse_attention` checks them (bool masks)."""
    del interpret
    validate_inputs(q, k, v, q_keep, k_keep, ("q_keep", "k_keep"), "bool")
    hq, hkv = q.shape[2], k.shape[2]
    mask = sparse_mask(jnp.zeros(q_keep.shape, jnp.int32), jnp.zeros(k_keep.shape, jnp.int32),
                       hq, hkv)
    qk = jnp.swapaxes(q_keep.astype(bool), 1, 2)[..., :, None]
    kk = jnp.repeat(jnp.swapaxes(k_keep.astype(bool), 1, 2), hq // hkv, axis=1)[..., None, :]
    return masked_attention(q, k, v, mask & qk & kk, sm_scale)
