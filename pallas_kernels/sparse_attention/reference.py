"""Plain-JAX float32 oracles for the sparse causal flash-attention kernels (SCFA).

Dense masked softmax over the whole ``[T, T]`` score matrix, no reordering:

* :func:`hash_reference`: query ``i`` sees key ``j`` iff ``j <= i`` and
  ``q_buckets[i] == k_buckets[j]``;
* :func:`qk_sparse_reference`: query ``i`` sees key ``j`` iff ``j <= i`` and
  ``q_keep[i]`` and ``k_keep[j]``.

Shapes: q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0``
(query head ``h`` reads kv head ``h // (Hq // Hkv)``); per-token labels of the
queries ``[B, T, Hq]``, of the keys ``[B, T, Hkv]``.  Rows that see no key
(and dropped queries) return zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sparse_mask(q_labels, k_labels, hq: int, hkv: int):
    """``[B, Hq, T, T]`` visibility: causal and ``q_labels[i] == k_labels[j]`` (GQA-broadcast).

    Labels: ``[B, T, Hq]`` / ``[B, T, Hkv]`` (bucket ids, or any comparable ids)."""
    t = q_labels.shape[1]
    g = hq // hkv
    ql = jnp.swapaxes(q_labels, 1, 2)                         # [B, Hq, T]
    kl = jnp.repeat(jnp.swapaxes(k_labels, 1, 2), g, axis=1)  # [B, Hq, T]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [i, j]: j <= i
    return causal[None, None] & (ql[..., :, None] == kl[..., None, :])


def masked_attention(q, k, v, mask, sm_scale=None):
    """``softmax(q k^T * sm_scale, masked) v`` in float32 with ``mask [B, Hq, T, T]``;
    rows without a visible key give 0.  Returns q's dtype (float64 inputs are computed in
    float32 too: float64 result at float32 precision, like the kernels)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
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
    """Hash-sparse causal attention, dense float32 (``interpret`` accepted and ignored)."""
    del interpret
    mask = sparse_mask(q_buckets, k_buckets, q.shape[2], k.shape[2])
    return masked_attention(q, k, v, mask, sm_scale)


def qk_sparse_reference(q, k, v, q_keep, k_keep, *, sm_scale=None, interpret=None):
    """QK-sparse causal attention, dense float32: dropped queries / keys take part in nothing."""
    del interpret
    hq, hkv = q.shape[2], k.shape[2]
    mask = sparse_mask(jnp.zeros(q_keep.shape, jnp.int32), jnp.zeros(k_keep.shape, jnp.int32),
                       hq, hkv)
    qk = jnp.swapaxes(q_keep.astype(bool), 1, 2)[..., :, None]
    kk = jnp.repeat(jnp.swapaxes(k_keep.astype(bool), 1, 2), hq // hkv, axis=1)[..., None, :]
    return masked_attention(q, k, v, mask & qk & kk, sm_scale)
