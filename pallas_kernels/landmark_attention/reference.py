"""Plain-JAX float32 oracle for landmark attention (Mohtashami & Jaggi 2023, arXiv:2305.16300).

Blocks of ``block_size = L`` tokens; the last token of every *complete* block
(``t % L == L - 1``) is its landmark.  For a query ``i`` in block ``b`` with
scores ``s_ij = sm_scale * q_i . k_j``, the grouped softmax is

    outer logits  {s_i,lm(c) : c < b}  U  {s_ij : j in block b, j <= i, j not a landmark}
    P_outer       = softmax over that set
    weight(j in earlier block c) = P_outer(lm(c)) * softmax_{j' in c, non-landmark}(s_ij')
    weight(j in block b)         = P_outer(j)
    weight(landmark keys)        = 0   (they carry no value mass)

    o_i = sum_j weight_ij v_j

Landmark *queries* use the same rule (the authors' code excludes the current
block's landmark even when it is the query itself), so a landmark query
attends like the other queries of its block with all ``L - 1`` of its
non-landmark keys visible.  A trailing partial block has no landmark; it is
only ever the current block of its own queries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .._common import check_flag, check_int, check_qkv, is_int
from ..flash_attention.reference import reference_sm_scale


def check_block_size(block_size, name: str = "block_size") -> None:
    """``ValueError`` naming ``name`` unless ``block_size`` (tokens per block, landmark
    included) is an int >= 2 (numpy ints too, not bool)."""
    if not is_int(block_size) or block_size < 2:
        raise ValueError(f"{name} must be an int >= 2 (tokens per block incl. the landmark), "
                         f"got {block_size!r}")


def _validate(q, k, v, block_size, q_offset=None) -> None:
    check_qkv(q, k, v, self_attention=False)   # (decoding: fewer queries than keys)
    check_block_size(block_size)
    tq, t = q.shape[1], k.shape[1]
    if q_offset is None and tq > t:
        raise ValueError(f"q has more positions than k (Tq={tq} > T={t}): the queries are the last Tq "
                         "of the T key positions unless q_offset is given")
    _check_q_offset(q_offset, tq, t)


def _check_q_offset(q_offset, tq: int, t: int) -> None:
    """None, or an integer scalar (may be traced) in ``[0, T - Tq]`` when concrete."""
    if q_offset is not None and (getattr(q_offset, "ndim", 0) != 0 or not (
            is_int(q_offset) or jnp.issubdtype(getattr(q_offset, "dtype", bool), jnp.integer))):
        # a float (1.5) made fractional positions: blocks and causal edges off, silently
        raise ValueError(f"q_offset must be an integer scalar (Python / numpy int or a 0-d integer "
                         f"array, may be traced), got {q_offset!r}")
    if q_offset is not None and not isinstance(q_offset, jax.core.Tracer) \
            and not 0 <= int(q_offset) <= t - tq:
        raise ValueError(f"q_offset must be in [0, T - Tq = {t - tq}] (queries at q_offset .. "
                         f"q_offset + Tq - 1 < T={t}), got {q_offset!r}")


def _expand_kv(x, hq):
    return jnp.repeat(x, hq // x.shape[2], axis=2)


def _check_chunk_len(chunk_len, block_size) -> None:
    if chunk_len is not None and (not is_int(chunk_len) or chunk_len < block_size
                                  or chunk_len % block_size):
        raise ValueError(f"chunk_len must be None or a positive multiple of block_size={block_size}, "
                         f"got {chunk_len!r}")


def _first_visible_block(qblk, block_size: int, chunk_len):
    """Per query block: the first block it may see, 0, or its chunk's first block."""
    if chunk_len is None:
        return jnp.zeros_like(qblk)
    per = chunk_len // block_size
    return (qblk // per) * per


def landmark_masks(t: int, block_size: int, tq: int | None = None, q_offset=None, chunk_len=None):
    """Index structure for keys ``0..T-1`` and queries at ``q_offset + i`` (default: the last
    ``tq`` positions; ``tq = T``: self-attention).  ``chunk_len`` (a multiple of
    ``block_size``): a query sees only the keys of its own chunk (positions
    ``[c * chunk_len, (c + 1) * chunk_len)``).  ``t`` / ``tq``: positive ints (numpy ints too),
    ``q_offset``: an integer scalar (may be traced) in ``[0, t - tq]``; a bad argument is a
    ``ValueError`` naming it.

    Returns ``(blk_k [T], is_landmark [T], q_blk [Tq], early [Tq, T], current [Tq, T])``:
    ``early[i, j]``: key ``j`` is a non-landmark key of a block before query ``i``'s (and in
    its chunk);
    ``current[i, j]``: key ``j <= pos_i`` is a non-landmark key of query ``i``'s block.
    """
    t, tq = check_int("t", t), check_int("tq", tq, none_ok=True)
    check_block_size(block_size)
    _check_chunk_len(chunk_len, block_size)
    tq = t if tq is None else tq
    if q_offset is None and tq > t:
        raise ValueError(f"tq={tq} > t={t}: the queries are the last tq of the t key positions "
                         f"unless q_offset is given")
    _check_q_offset(q_offset, tq, t)
    q_offset = t - tq if q_offset is None else q_offset
    block_size = min(int(block_size), t + 1)  # L > T: no landmark, as L = T + 1 (and int32-safe)
    pos = jnp.arange(t)
    qpos = q_offset + jnp.arange(tq)
    blk, qblk = pos // block_size, qpos // block_size
    is_lm = pos % block_size == block_size - 1
    first = _first_visible_block(qblk, block_size, chunk_len)
    early = (blk[None, :] < qblk[:, None]) & (blk[None, :] >= first[:, None]) & ~is_lm[None, :]
    current = (blk[None, :] == qblk[:, None]) & (pos[None, :] <= qpos[:, None]) & ~is_lm[None, :]
    return blk, is_lm, qblk, early, current


def landmark_attention_reference(q, k, v, *, block_size: int, sm_scale=None, q_offset=None,
                                 return_lse=False, chunk_len=None):
    """Grouped-softmax landmark attention, written out literally, in float32.

    Args:
      q: ``[B, Tq, Hq, D]``; k, v: ``[B, T, Hkv, D]`` (``Hq % Hkv == 0``, GQA).
      block_size: ``L >= 2``, tokens per block including its landmark.
      q_offset: position of query 0 (scalar, may be traced; default ``T - Tq``): decoding
        against a cache whose slots past the query positions are simply never visible.
      chunk_len: ``None``, or a multiple of ``block_size``: each query sees only the keys of its
        own chunk of ``chunk_len`` positions (the local part of a landmark model's memory
        decoding, :mod:`jaxformers.models.landmark`).
    Returns:
      ``[B, Tq, Hq, D]`` in q's dtype; with ``return_lse`` also the natural-log
      normaliser of the outer softmax ``[B, Hq, Tq]`` float32.  Float64 inputs
      (``jax_enable_x64``) are computed in float32 too (float64 result at float32 precision).
    Raises:
      ValueError naming the argument unless q, k, v have rank 4, k and v one shape, q and k
      one batch size and head dim, ``Hq % Hkv == 0``, ``block_size`` is an int >= 2,
      ``chunk_len`` None or a positive multiple of it, a concrete ``sm_scale`` None or a finite
      number > 0 (the kernel's rule; a traced one is used unchecked), and the queries lie within the keys
      (``0 <= q_offset <= T - Tq`` where ``q_offset`` is concrete; ``Tq <= T`` by default);
      ``q_offset`` must be an integer scalar (not a float or bool).
    """
    _validate(q, k, v, block_size, q_offset)
    b, tq, hq, d = q.shape
    t = k.shape[1]
    L = min(int(block_size), t + 1)  # every L > T is L = T + 1 (no complete block, no landmark)
    scale = reference_sm_scale(sm_scale, d)
    hi = jax.lax.Precision.HIGHEST
    qf = q.astype(jnp.float32)
    kf, vf = (_expand_kv(x, hq).astype(jnp.float32) for x in (k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=hi) * scale     # [B, H, Tq, T]
    blk, is_lm, qblk, early, current = landmark_masks(t, block_size, tq, q_offset, chunk_len)
    nb = -(-t // L)
    # inner softmax per (query, block) over the block's non-landmark keys
    s_in = jnp.where(is_lm, -jnp.inf, s)
    s_pad = jnp.pad(s_in, ((0, 0), (0, 0), (0, 0), (0, nb * L - t)), constant_values=-jnp.inf)
    lse_in = jax.nn.logsumexp(s_pad.reshape(b, hq, tq, nb, L), axis=-1)   # [B, H, Tq, nb]
    inner = jnp.exp(s_in - lse_in[..., blk])                              # per key, within block
    # outer logits: landmarks of earlier (complete) blocks + current-block keys
    lm_idx = jnp.arange(nb) * L + L - 1
    has_lm = lm_idx < t
    a = jnp.where(has_lm, s[..., jnp.minimum(lm_idx, t - 1)], -jnp.inf)   # [B, H, Tq, nb]
    blocks = jnp.arange(nb)[None, :]
    first = _first_visible_block(qblk, L, chunk_len)
    a = jnp.where((blocks < qblk[:, None]) & (blocks >= first[:, None]), a, -jnp.inf)
    cur = jnp.where(current, s, -jnp.inf)
    lse = jax.nn.logsumexp(jnp.concatenate([a, cur], axis=-1), axis=-1)   # [B, H, Tq]
    p_lm = jnp.exp(a - lse[..., None])
    p_cur = jnp.exp(cur - lse[..., None])
    w = p_cur + jnp.where(early, p_lm[..., blk] * inner, 0.0)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, vf, precision=hi).astype(q.dtype)
    return (o, lse) if check_flag("return_lse", return_lse) else o
