"""Mask and block-skipping logic shared by the flash-attention kernels.

Conventions (same as :mod:`.reference`): query row ``r`` in ``[0, Tq)`` sits at
absolute position ``q_offset + r`` with ``q_offset = Tk - Tq`` (queries aligned
with the *last* keys, decode style); key ``c`` sits at position ``c``.  Key ``c``
is visible from row ``r`` (position ``p``) when

    causal:                 c <= p
    causal + window w:      p - w < c <= p
    non-causal + window w:  |p - c| < w
    segments:               q_ids[r] == kv_ids[c]
    padding:                c < Tk          (keys past Tk are internal padding)

A kernel tiles rows into blocks of ``block_q`` and keys into blocks of
``block_k``.  For a (q-block, kv-block) pair there are three cases:

* **empty** - no visible entry: the pair is never visited;
* **full**  - every (real row, real key) entry is visible by position: the
  block body runs without the elementwise position mask;
* **partial** - the body applies :meth:`MaskSpec.position_mask`.

:meth:`MaskSpec.kv_block_range` gives, for a q-block, the visited kv blocks
``[lo, hi)`` and the full sub-range ``[full_lo, full_hi)``;
:meth:`MaskSpec.q_block_range` is the transpose (for the dK/dV kernel).  Both
are closed form, so a kernel loops ``lax.fori_loop(lo, hi, ...)`` and never
touches empty blocks.

Data-dependent sparsity (segments here; hash buckets or dropped queries/keys
in future sparse kernels) goes through per-block *id bounds*:
:func:`block_id_bounds` reduces an id array ``[B, T]`` to ``[B, 2, n_blocks]``
(min, max) outside the kernel, and :func:`blocks_may_interact` tests inside the
kernel whether two blocks can contain equal ids (interval overlap; exact for
sorted ids such as packed documents or bucket-sorted hash ids).  A sparse kernel
that permutes tokens can reuse the same pieces by feeding the *gathered*
positions to :meth:`MaskSpec.position_mask` (it takes arbitrary broadcastable
position arrays) and per-block position bounds to :func:`blocks_may_interact`.

Every index helper works on Python ints (host-side planning, tests,
benchmarks) and on traced int32 scalars (inside a kernel, Triton-lowerable:
only min/max/select and truncating division of non-negative values).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_INT = (int, np.integer)


def _static(*xs) -> bool:
    return all(isinstance(x, _INT) for x in xs)


def _max(a, b):
    return max(int(a), int(b)) if _static(a, b) else jnp.maximum(a, b)


def _min(a, b):
    return min(int(a), int(b)) if _static(a, b) else jnp.minimum(a, b)


def _clip(x, lo, hi):
    return _min(_max(x, lo), hi)


def _div(a, b: int):
    """floor(a / b) for a >= 0 (callers clamp first), b a positive Python int."""
    if _static(a):
        return int(a) // b
    return lax.div(a, jnp.asarray(b, dtype=a.dtype))


def _cdiv(a, b: int):
    """ceil(a / b) for a >= 0."""
    return _div(a + (b - 1), b)


def _select(c, a, b):
    if isinstance(c, (bool, np.bool_)) and _static(a, b):
        return int(a) if c else int(b)
    # Python-int operands as int32 arrays: Pallas' Triton lowering mistypes a
    # ``where`` between two weakly-typed literals (caught by tests/test_gpu_lowering.py).
    as_i32 = lambda x: jnp.asarray(x, jnp.int32) if _static(x) else x  # noqa: E731
    return jnp.where(c, as_i32(a), as_i32(b))


class BlockRange(NamedTuple):
    """Visited blocks ``[lo, hi)``; ``[full_lo, full_hi)`` (inside it) needs no position mask."""

    lo: object
    hi: object
    full_lo: object
    full_hi: object

    @property
    def num_visited(self):
        return self.hi - self.lo


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of a positional attention mask (hashable, jit-static).

    ``q_len``/``kv_len`` are the *real* (unpadded) lengths ``Tq``/``Tk``.
    """

    causal: bool
    window: int | None
    q_len: int
    kv_len: int

    @property
    def q_offset(self) -> int:
        return self.kv_len - self.q_len

    def needs_position_mask(self, kv_padded: bool) -> bool:
        return self.causal or self.window is not None or kv_padded

    # ------------------------------------------------------------------ ranges
    def kv_block_range(self, q_block, block_q: int, block_k: int) -> BlockRange:
        """kv blocks touched by q-block ``q_block`` (rows ``[q_block*block_q, +block_q)``)."""
        tq, tk, w, off = self.q_len, self.kv_len, self.window, self.q_offset
        n_full_keys = (tk // block_k) * block_k  # keys in blocks without padding
        row0 = q_block * block_q
        row1 = _min(row0 + block_q, tq) - 1  # last real row (may be < row0: no rows)
        p0, p1 = off + row0, off + row1      # first / last absolute position
        # Visible key interval [k_lo, k_hi) of the union over the block's rows.
        k_lo, k_hi = 0, tk
        if self.causal:
            k_hi = _min(k_hi, p1 + 1)
        elif w is not None:
            k_hi = _min(k_hi, p1 + w)
        if w is not None:
            k_lo = _max(k_lo, p0 - w + 1)
        k_hi = _max(k_hi, 0)
        k_lo = _min(k_lo, k_hi)
        nonempty = (k_hi > k_lo) & (row1 >= row0)
        lo = _div(k_lo, block_k)
        hi = _select(nonempty, _cdiv(k_hi, block_k), lo)
        # Key interval visible from *every* row of the block, restricted to
        # unpadded blocks: [f_lo, f_hi) in key units, then whole blocks inside it.
        f_lo, f_hi = 0, n_full_keys
        if self.causal:
            f_hi = _min(f_hi, _max(p0 + 1, 0))
        elif w is not None:
            f_hi = _min(f_hi, _max(p0 + w, 0))
        if w is not None:
            f_lo = _max(f_lo, p1 - w + 1)
        full_lo = _clip(_cdiv(_max(f_lo, 0), block_k), lo, hi)
        full_hi = _clip(_div(_max(f_hi, 0), block_k), full_lo, hi)
        # An empty full range sits at hi so the masked loops cover [lo, hi).
        ok = full_hi > full_lo
        full_lo = _select(ok, full_lo, hi)
        full_hi = _select(ok, full_hi, hi)
        return BlockRange(lo, hi, full_lo, full_hi)

    def q_block_range(self, kv_block, block_q: int, block_k: int) -> BlockRange:
        """q blocks that see kv-block ``kv_block`` (keys ``[kv_block*block_k, +block_k)``)."""
        tq, tk, w, off = self.q_len, self.kv_len, self.window, self.q_offset
        n_full_rows = (tq // block_q) * block_q
        c0 = kv_block * block_k
        c1 = _min(c0 + block_k, tk) - 1  # last real key
        # Rows (not positions) that see some key of the block: [r_lo, r_hi).
        r_lo, r_hi = 0, tq
        if self.causal:
            r_lo = _max(r_lo, c0 - off)
        elif w is not None:
            r_lo = _max(r_lo, c0 - w + 1 - off)
        if w is not None:
            r_hi = _min(r_hi, c1 + w - off)
        r_hi = _max(r_hi, 0)
        r_lo = _min(r_lo, r_hi)
        nonempty = (r_hi > r_lo) & (c1 >= c0)
        lo = _div(r_lo, block_q)
        hi = _select(nonempty, _cdiv(r_hi, block_q), lo)
        # Rows that see *every* key of the block (and the block has no padded key).
        f_lo, f_hi = 0, n_full_rows
        if self.causal:
            f_lo = _max(f_lo, c1 - off)
        elif w is not None:
            f_lo = _max(f_lo, c1 - w + 1 - off)
        if w is not None:
            f_hi = _min(f_hi, _max(c0 + w - off, 0))
        key_block_full = c0 + block_k <= tk
        full_lo = _clip(_cdiv(_max(f_lo, 0), block_q), lo, hi)
        full_hi = _clip(_div(_max(f_hi, 0), block_q), full_lo, hi)
        ok = (full_hi > full_lo) & key_block_full
        full_lo = _select(ok, full_lo, hi)
        full_hi = _select(ok, full_hi, hi)
        return BlockRange(lo, hi, full_lo, full_hi)

    # -------------------------------------------------------------- elementwise
    def position_mask(self, q_rows, k_cols, kv_padded: bool):
        """Boolean mask from row indices ``q_rows`` and key indices ``k_cols``.

        The two arrays are broadcast against each other (e.g. ``[bq, 1]`` and
        ``[1, bk]`` for an ``S`` tile, or ``[1, bq]`` and ``[bk, 1]`` for
        ``S^T``).  Returns None when nothing needs masking.
        """
        p = q_rows + self.q_offset
        mask = None

        def _and(m, x):
            return x if m is None else m & x

        if self.causal:
            mask = _and(mask, k_cols <= p)
        if self.window is not None:
            mask = _and(mask, k_cols > p - self.window)
            if not self.causal:
                mask = _and(mask, k_cols < p + self.window)
        if kv_padded:
            mask = _and(mask, k_cols < self.kv_len)
        return mask


# ---------------------------------------------------------------- id bounds
def block_id_bounds(ids: jax.Array, block: int, padded_len: int) -> jax.Array:
    """Per-block ``(min, max)`` of ``ids [B, T]`` -> ``[B, 2, padded_len // block]`` int32.

    Padding past ``T`` repeats the last id, so it never widens a block's range.
    """
    ids = ids.astype(jnp.int32)
    t = ids.shape[1]
    if padded_len > t:
        ids = jnp.pad(ids, ((0, 0), (0, padded_len - t)), mode="edge")
    blocks = ids.reshape(ids.shape[0], padded_len // block, block)
    return jnp.stack([blocks.min(-1), blocks.max(-1)], axis=1)


def blocks_may_interact(q_bounds_ref, kv_bounds_ref, q_block, kv_block):
    """In-kernel test: can q-block and kv-block share an id?  Refs are ``[2, n]``."""
    q_min, q_max = q_bounds_ref[0, q_block], q_bounds_ref[1, q_block]
    k_min, k_max = kv_bounds_ref[0, kv_block], kv_bounds_ref[1, kv_block]
    return (q_min <= k_max) & (k_min <= q_max)


def visited_blocks(spec: MaskSpec, block_q: int, block_k: int, q_ids=None, kv_ids=None):
    """Host-side count of visited (q-block, kv-block) pairs, per batch row.

    Mirrors what the forward kernel iterates over (analytic range, then the
    id-bounds test); returns an int numpy array ``[B or 1]``.
    """
    nq = -(-spec.q_len // block_q)
    nk = -(-spec.kv_len // block_k)
    if q_ids is None:
        qb = kb = None
        batch = 1
    else:
        qb = np.asarray(block_id_bounds(jnp.asarray(q_ids), block_q, nq * block_q))
        kb = np.asarray(block_id_bounds(jnp.asarray(kv_ids), block_k, nk * block_k))
        batch = qb.shape[0]
    out = np.zeros(batch, np.int64)
    for i in range(nq):
        r = spec.kv_block_range(i, block_q, block_k)
        for j in range(r.lo, r.hi):
            if qb is None:
                out += 1
            else:
                out += (qb[:, 0, i] <= kb[:, 1, j]) & (kb[:, 0, j] <= qb[:, 1, i])
    return out
