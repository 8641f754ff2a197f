"""Sparse causal flash attention (SCFA, Pagliardini et al. 2023) as Pallas kernels.

Two dynamic-sparsity patterns, one kernel:

* **Hash-sparse** (:func:`hash_attention`): query ``i`` sees key ``j`` iff
  ``j <= i`` and ``q_buckets[i] == k_buckets[j]``.
* **QK-sparse** (:func:`qk_sparse_attention`): query ``i`` sees key ``j`` iff
  ``j <= i and q_keep[i] and k_keep[j]``; dropped queries output 0.

Reordering (plain JAX, per batch row and head, as in the paper / the authors'
Triton code): tokens are *stably* sorted by a per-token group id, carrying
their original position.  Hash: group = bucket (stable ``argsort`` of the
buckets).  QK: kept tokens first in their original order (stable sort of
``~keep``, i.e. compaction), group 0 for every token; a dropped query gets
position ``-1`` (sees no key) and a dropped key position ``2**30`` (seen by no
query).  Both ops then run ONE generalised flash kernel on the sorted tokens:

    visible(r, c) = (k_group[c] == q_group[r]) & (k_pos[c] <= q_pos[r])

and the output is gathered back to the original token order (the inverse
permutation).  Rows that see no key give 0 (``l = 0``; their ``lse`` is
``+inf`` so the backward's ``P = exp(S - lse)`` is 0 there).  Sequences are
padded to the tile size with queries at position ``-1`` and keys at
``2**30`` (groups edge-repeated, so tile bounds never widen).

Tile skipping.  Per tile (outside the kernel, plain JAX, :func:`_tile_bounds`):
the min and max group and a position bound (max for q tiles, min for k tiles)
of the tokens of the first group, of the last group and of the whole tile.  As
groups are sorted, a q tile and a k tile share the groups ``[max gmin, min
gmax]``; the pair is computed iff that range is non-empty and, for a single
shared group, ``k_pos bound <= q_pos bound`` of *that group's* tokens (the
first/last-group bounds; the whole tile's when it is interior), for several
shared groups of the whole tiles (:func:`_may_interact`; it never drops a pair
with a visible entry).  From the ``[nq, nk]`` predicate each q tile gets the
first/last interacting k tile ``[lo, hi)`` (each k tile, per query head, the
same over q tiles for dK/dV); the kernels loop ``fori_loop(lo, hi)`` and run a
block body under ``lax.cond(predicate)`` only (scalars from the tile tables),
as the flash kernel's segment bounds.  :func:`hash_tile_count` /
:func:`qk_sparse_tile_count` count the computed pairs from the same tables (no
kernel; inputs checked as the kernels check them), and ``return_tile_count=True``
makes the forward kernel itself count the bodies it ran (GPU layout only: refused
under TPU interpret mode and on a TPU backend; not differentiable, its VJP raises).

Kernels (FlashAttention-2 in base 2, as :mod:`pallas_kernels.flash_attention`,
whose helpers and ``_Layout`` are reused): forward and dQ with grid
``(n_q_tiles, B, Hq)`` and the kv head's whole sorted K/V in the block, dK/dV
with grid ``(n_k_tiles, B, Hkv)`` summing over the ``Hq // Hkv`` query heads
of its GQA group (each query head has its own order; keys are sorted per kv
head).  GPU (Triton) vs TPU (Mosaic) differ only as in the flash kernel:
``[B, H, T, D]`` layout, tiles of ``max(128, block)`` rows and 128-lane head dim,
row statistics and per-token query ids as ``[rows, 1]`` columns, key ids as
``[1, bk]`` rows per k tile, the tile tables flat in SMEM, dK/dV in the ``S`` orientation.
Compiled calls carry both variants and ``lax.platform_dependent`` picks one at
lowering time; ``interpret=pltpu.InterpretParams()`` runs the TPU variant.

Deviations from the authors' code (``epfml/dynamic-sparse-flash-attention``):
their hash kernel masks with ``q_idx > k_idx`` (strict: a query never sees
itself, Reformer-style shared-QK); here, as the issue asks, ``j <= i``.  Their
QK-sparse compaction truncates the buffer to the largest kept count over
heads; here sequences keep length ``T`` and dropped tokens are simply never
visited (tile skipping makes the tail free).  The authors skip tiles by a
contiguous range scan of their per-tile hash/index (min, max); here the range
is computed outside the kernel, each pair re-tested, and the causal test uses
the positions of the shared bucket only (fewer or equal tiles).
Known TPU costs: the tile tables of all (batch, head) pairs sit whole in SMEM
(``(7 * nq + 5 * nk + 2 * nk) * 4`` bytes per (batch, query head)); as in the
flash kernel, dK/dV holds the whole Q/dO of a GQA group in VMEM and its
``[T, 1]`` columns (lse, D and here the query groups / positions) take 128
lanes each (:func:`tpu_vmem_bytes`: ~20 MiB at T=4096, D=64, no GQA; ~80 MiB
with 4 query heads per kv head at D=128).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ..flash_attention.kernel import (LOG2E, host_int32_ids, _MIN_BLOCK, _TPU_BLOCK, _Layout,
                                      _dot_nn, _dot_nt, _dot_tn,
                                      _rows_slice, _tile_bytes, static_sm_scale)
from .._common import (SQ, AttentionPlan, by_platform, check_arrays, check_flag, check_int, check_qkv,
                       compiler_params, check_qkv_shapes, idiv, int32_ids, is_int, next_pow2,
                       resolve_interpret, round_up, select_plan)

POS_NEVER = 2 ** 30   # position of a key no query sees (dropped or padding)
POS_BLIND = -1        # position of a query that sees no key (dropped or padding)
_NB = 5                  # tile bounds: gmin, gmax, pos bound of the gmin tokens, of the gmax ones, of all
_QT, _KT, _DT = _NB + 2, _NB, 2  # rows of the q-tile (bounds, lo, hi) / k-tile / dK-dV range tables


# --------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True, kw_only=True)
class _Plan(AttentionPlan):
    """Everything static about one call (hashable).  Field names shared with the flash
    ``_Plan`` (``b``, ``hq``, ``tq_pad``, ``d``, ``dp``, ``tpu``) let ``_Layout`` serve both."""

    t: int
    t_pad: int
    bq: int
    bk: int

    @property
    def tq_pad(self) -> int:  # _Layout's name
        return self.t_pad

    @property
    def nq(self) -> int:
        return self.t_pad // self.bq

    @property
    def nk(self) -> int:
        return self.t_pad // self.bk


def _make_plan(q, k, sm_scale, block_q, block_k, num_warps, num_stages, interpret,
               platform="gpu") -> _Plan:
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    tpu = platform == "tpu"

    def eff(block):
        if tpu:
            return max(_TPU_BLOCK, min(block, next_pow2(t)))
        return min(block, max(_MIN_BLOCK, next_pow2(t)))

    bq, bk = eff(block_q), eff(block_k)
    dp = round_up(d, _TPU_BLOCK) if tpu else max(_MIN_BLOCK, next_pow2(d))
    return _Plan(b=b, t=t, hq=hq, hkv=hkv, d=d, dp=dp, t_pad=round_up(t, max(bq, bk)), bq=bq,
                 bk=bk, sm_scale=float(d ** -0.5 if sm_scale is None else sm_scale),
                 interpret=interpret, num_warps=num_warps or (4 if dp <= 64 else 8),
                 num_stages=num_stages, platform=platform)


# ---------------------------------------------------------------------- reordering
def _sort_tokens(key):
    """``key [B, T, H]`` -> ``(order, sorted key)``, both ``[B, H, T]``: a stable sort per head."""
    key = jnp.swapaxes(key, 1, 2)
    order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    return order, jnp.take_along_axis(key, order, axis=-1)


def _gather_tokens(x, order):
    """``x [B, T, H, D]`` in the per-head ``order [B, H, T]``."""
    return jnp.take_along_axis(x, jnp.swapaxes(order, 1, 2)[..., None], axis=1)


def _hash_meta(q_buckets, k_buckets):
    q_buckets, k_buckets = int32_ids(q_buckets, k_buckets)
    qo, qg = _sort_tokens(q_buckets)
    ko, kg = _sort_tokens(k_buckets)
    return qo, ko, (qg, qo, kg, ko)


def _qk_meta(q_keep, k_keep):
    qo, qdrop = _sort_tokens((~q_keep).astype(jnp.int32))  # kept first, original order
    ko, kdrop = _sort_tokens((~k_keep).astype(jnp.int32))
    qp = jnp.where(qdrop == 0, qo, POS_BLIND)
    kp = jnp.where(kdrop == 0, ko, POS_NEVER)
    return qo, ko, (jnp.zeros_like(qo), qp, jnp.zeros_like(ko), kp)


# --------------------------------------------------------------------- tile tables
def _pad_meta(plan, qg, qp, kg, kp):
    """Pad the sorted ``[B, H, T]`` ids to ``T_pad``: groups edge-repeated, blind / never positions."""
    n = plan.t_pad - plan.t
    if n == 0:
        return qg, qp, kg, kp
    pad = ((0, 0), (0, 0), (0, n))
    return (jnp.pad(qg, pad, mode="edge"), jnp.pad(qp, pad, constant_values=POS_BLIND),
            jnp.pad(kg, pad, mode="edge"), jnp.pad(kp, pad, constant_values=POS_NEVER))


def _tile_bounds(g, p, block, reduce, fill):
    """Per-tile ``(gmin, gmax, bound(p | g == gmin), bound(p | g == gmax), bound(p))`` with
    ``bound`` = ``reduce`` (max for queries, min for keys); ``g, p`` ``[B, H, T_pad]``."""
    b, h, t = g.shape
    g, p = g.reshape(b, h, t // block, block), p.reshape(b, h, t // block, block)
    gmin, gmax = g.min(-1), g.max(-1)
    first = reduce(jnp.where(g == gmin[..., None], p, fill), axis=-1)
    last = reduce(jnp.where(g == gmax[..., None], p, fill), axis=-1)
    return gmin, gmax, first, last, reduce(p, axis=-1)


def _may_interact(qb, kb):
    """The tile skip predicate on ``_tile_bounds`` tuples (arrays or in-kernel scalars).

    Tiles share the groups ``[lo, hi] = [max gmin, min gmax]`` (groups are sorted).  For a
    single shared group the position bounds of exactly that group's tokens are used when it is
    the tile's first or last group (the only partial ones); otherwise those of the whole tile.
    Conservative: it never drops a pair with a visible entry.
    """
    qgmin, qgmax, qfirst, qlast, qall = qb
    kgmin, kgmax, kfirst, klast, kall = kb
    lo, hi = jnp.maximum(qgmin, kgmin), jnp.minimum(qgmax, kgmax)
    qpos = jnp.where(lo == qgmin, qfirst, jnp.where(lo == qgmax, qlast, qall))
    kpos = jnp.where(lo == kgmin, kfirst, jnp.where(lo == kgmax, klast, kall))
    return (lo <= hi) & jnp.where(lo == hi, kpos <= qpos, kall <= qall)


def _tile_tables(bq, bk, group, qg, qp, kg, kp):
    """Per-tile bounds and loop ranges from padded sorted ids.

    Returns ``qtab [B, Hq, 7, nq]`` (the 5 bounds of :func:`_tile_bounds`, then lo, hi: the
    k tiles ``[lo, hi)`` that may interact), ``ktab [B, Hkv, 5, nk]`` (bounds), ``dtab
    [B, Hq, 2, nk]`` (the q tiles ``[lo, hi)`` of that query head that may interact with k
    tile ``j``) and the predicate ``[B, Hq, nq, nk]``.
    """
    qb = _tile_bounds(qg, qp, bq, jnp.max, POS_BLIND)
    kb = _tile_bounds(kg, kp, bk, jnp.min, POS_NEVER)
    pred = _may_interact([x[..., :, None] for x in qb],
                         [jnp.repeat(x, group, axis=1)[..., None, :] for x in kb])

    def span(p):  # [..., n] bool -> first true, last true + 1 (0, 0 when none)
        n = p.shape[-1]
        anyp = p.any(-1)
        lo = jnp.argmax(p, axis=-1)
        hi = n - jnp.argmax(p[..., ::-1], axis=-1)
        return jnp.where(anyp, lo, 0).astype(jnp.int32), jnp.where(anyp, hi, 0).astype(jnp.int32)

    lo, hi = span(pred)
    dlo, dhi = span(jnp.swapaxes(pred, -1, -2))
    qtab = jnp.stack(list(qb) + [lo, hi], axis=2).astype(jnp.int32)
    ktab = jnp.stack(kb, axis=2).astype(jnp.int32)
    dtab = jnp.stack([dlo, dhi], axis=2)
    return qtab, ktab, dtab, pred


class _Tab:
    """Scalar view ``tab(h, r, c)`` of a tile table.

    GPU: the ``(rows, n)`` block of one head, or ``(heads, rows, n)`` of a GQA group.
    TPU: the whole table flat in SMEM (Mosaic reads scalars only from SMEM), offset to the
    program's batch row and first head.
    """

    def __init__(self, plan, ref, rows, n, heads_total, b, head0, grouped):
        self.ref, self.rows, self.n, self.grouped, self.tpu = ref, rows, n, grouped, plan.tpu
        if plan.tpu:
            self.base = (b * heads_total + head0) * rows * n

    def __call__(self, h, r, c):
        if self.tpu:
            return self.ref[self.base + (h * self.rows + r) * self.n + c]
        return self.ref[h, r, c] if self.grouped else self.ref[r, c]


def _interact(qt, kt, h, i, j):
    """The skip predicate (:func:`_may_interact`, as in :func:`_tile_tables`) inside a kernel."""
    return _may_interact([qt(h, r, i) for r in range(_NB)], [kt(0, r, j) for r in range(_NB)])


# --------------------------------------------------------------------------- layout
class _MetaLayout:
    """Where the per-token ids live.  GPU: ``[B, H, T_pad]`` rows.  TPU: query ids as
    ``[B, H, T_pad, 1]`` columns, key ids as one ``[1, bk]`` row per k tile
    ``[B, H, nk, 1, bk]``; tile tables flat (SMEM)."""

    def __init__(self, plan):
        self.plan, self.tpu = plan, plan.tpu

    def q_arg(self, x):
        return x[..., None] if self.tpu else x

    def k_arg(self, x):
        p = self.plan
        return x.reshape(p.b, x.shape[1], p.nk, 1, p.bk) if self.tpu else x

    def q_block(self, rows, heads, idx):  # idx(*grid) -> (batch, head block, row block)
        if self.tpu:
            return pl.BlockSpec((SQ, heads, rows, 1), lambda *a: tuple(idx(*a)) + (0,))
        return pl.BlockSpec((SQ, heads, rows), lambda *a: tuple(idx(*a)))

    def k_whole(self, idx):  # idx(*grid) -> (batch, head)
        p = self.plan
        if self.tpu:
            return pl.BlockSpec((SQ, SQ, p.nk, 1, p.bk), lambda *a: tuple(idx(*a)) + (0, 0, 0))
        return pl.BlockSpec((SQ, SQ, p.t_pad), lambda *a: tuple(idx(*a)) + (0,))

    def k_tile(self, idx):  # idx(*grid) -> (batch, head, tile)
        p = self.plan
        if self.tpu:
            return pl.BlockSpec((SQ, SQ, SQ, 1, p.bk), lambda *a: tuple(idx(*a)) + (0, 0))
        return pl.BlockSpec((SQ, SQ, p.bk), lambda *a: tuple(idx(*a)))

    def table(self, x, rows, heads, idx):  # idx(*grid) -> (batch, head block)
        if self.tpu:
            from jax.experimental.pallas import tpu as pltpu
            return x.reshape(-1), pl.BlockSpec(memory_space=pltpu.SMEM)
        return x, pl.BlockSpec((SQ, heads, rows, x.shape[-1]), lambda *a: tuple(idx(*a)) + (0, 0))

    def params(self, plan):
        if self.tpu:
            return compiler_params(0, 0, platform="tpu", dimension_semantics=("parallel",) * 3)
        return compiler_params(plan.num_warps, plan.num_stages)


# --------------------------------------------------------------------------- kernels
def _col(plan, x):
    """A ``[n]`` (GPU) / ``[n, 1]`` (TPU) per-row vector as a ``[n, 1]`` column."""
    return x if plan.tpu else x[:, None]


def _fwd_kernel(qg_ref, qp_ref, kg_ref, kp_ref, qtab_ref, ktab_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *cnt, plan: _Plan):
    bq, bk, tpu = plan.bq, plan.bk, plan.tpu
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    qt = _Tab(plan, qtab_ref, _QT, plan.nq, plan.hq, b, h, False)
    kt = _Tab(plan, ktab_ref, _KT, plan.nk, plan.hkv, b, idiv(h, plan.group), False)
    q = q_ref[...]
    qg, qp = _col(plan, qg_ref[...]), _col(plan, qp_ref[...])   # [bq, 1]
    col = (lambda x: x) if tpu else (lambda x: x[:, None])  # noqa: E731
    scale2 = plan.sm_scale * LOG2E

    def step_j(j, carry):
        def step(carry):
            acc, m, l = carry[:3]
            sl = _rows_slice(plan, j * bk, bk)
            k, v = k_ref[sl, :], v_ref[sl, :]
            kg = kg_ref[j] if tpu else kg_ref[sl][None, :]       # [1, bk]
            kp = kp_ref[j] if tpu else kp_ref[sl][None, :]
            s = _dot_nt(q, k) * scale2
            s = jnp.where((qg == kg) & (kp <= qp), s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=tpu))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp2(m - m_use)
            p = jnp.exp2(s - col(m_use))
            l = alpha * l + jnp.sum(p, axis=1, keepdims=tpu)
            acc = acc * col(alpha) + _dot_nn(p.astype(v.dtype), v)
            return (acc, m_new, l) + ((carry[3] + 1,) if cnt else ())
        return lax.cond(_interact(qt, kt, 0, i, j), step, lambda c: c, carry)

    stat = (bq, 1) if tpu else (bq,)
    carry = (jnp.zeros((bq, plan.dp), jnp.float32), jnp.full(stat, -jnp.inf, jnp.float32),
             jnp.zeros(stat, jnp.float32))
    if cnt:
        carry += (jnp.zeros((), jnp.int32),)
    carry = lax.fori_loop(qt(0, _NB, i), qt(0, _NB + 1, i), step_j, carry)
    acc, m, l = carry[:3]
    seen = l > 0.0
    o_ref[...] = (acc / col(jnp.where(seen, l, 1.0))).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)
    if cnt:
        cnt[0][...] = jnp.full(cnt[0].shape, carry[3], jnp.int32)


def _dq_kernel(qg_ref, qp_ref, kg_ref, kp_ref, qtab_ref, ktab_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, dl_ref, dq_ref, *, plan: _Plan):
    bk, tpu = plan.bk, plan.tpu
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    qt = _Tab(plan, qtab_ref, _QT, plan.nq, plan.hq, b, h, False)
    kt = _Tab(plan, ktab_ref, _KT, plan.nk, plan.hkv, b, idiv(h, plan.group), False)
    q, do = q_ref[...], do_ref[...]
    lse, delta = _col(plan, lse_ref[...]), _col(plan, dl_ref[...])
    qg, qp = _col(plan, qg_ref[...]), _col(plan, qp_ref[...])
    scale2 = plan.sm_scale * LOG2E

    def step_j(j, dq):
        def step(dq):
            sl = _rows_slice(plan, j * bk, bk)
            k, v = k_ref[sl, :], v_ref[sl, :]
            kg = kg_ref[j] if tpu else kg_ref[sl][None, :]
            kp = kp_ref[j] if tpu else kp_ref[sl][None, :]
            s = _dot_nt(q, k) * scale2
            s = jnp.where((qg == kg) & (kp <= qp), s, -jnp.inf)
            p = jnp.exp2(s - lse)                          # P = exp(S - L)
            ds = p * (_dot_nt(do, v) - delta)              # dS = P * (dO V^T - D)
            return dq + _dot_nn(ds.astype(k.dtype), k)     # dQ += dS K
        return lax.cond(_interact(qt, kt, 0, i, j), step, lambda c: c, dq)

    dq = lax.fori_loop(qt(0, _NB, i), qt(0, _NB + 1, i), step_j,
                       jnp.zeros((plan.bq, plan.dp), jnp.float32))
    dq_ref[...] = (dq * plan.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(qg_ref, qp_ref, kg_ref, kp_ref, qtab_ref, ktab_ref, dtab_ref, q_ref, k_ref, v_ref,
                 do_ref, lse_ref, dl_ref, dk_ref, dv_ref, *, plan: _Plan):
    bq, tpu, g = plan.bq, plan.tpu, plan.group
    j, b, hk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    qt = _Tab(plan, qtab_ref, _QT, plan.nq, plan.hq, b, hk * g, True)
    dt = _Tab(plan, dtab_ref, _DT, plan.nk, plan.hq, b, hk * g, True)
    kt = _Tab(plan, ktab_ref, _KT, plan.nk, plan.hkv, b, hk, False)
    k, v = k_ref[...], v_ref[...]                     # [bk, Dp]
    kg, kp = kg_ref[...], kp_ref[...]                 # TPU [1, bk]; GPU [bk]
    if not tpu:
        kg, kp = kg[:, None], kp[:, None]             # keys index the rows of S^T [bk, bq]
    scale2 = plan.sm_scale * LOG2E

    def head(h, carry):
        def step_i(i, carry):
            def step(carry):
                dk, dv = carry
                sl = _rows_slice(plan, i * bq, bq)
                if tpu:   # S [bq, bk]; row statistics as [bq, 1] columns
                    q, do = q_ref[h, sl, :], do_ref[h, sl, :]
                    lse, delta = lse_ref[h, sl, :], dl_ref[h, sl, :]
                    qg, qp = qg_ref[h, sl, :], qp_ref[h, sl, :]
                    s = _dot_nt(q, k) * scale2
                    s = jnp.where((qg == kg) & (kp <= qp), s, -jnp.inf)
                    p = jnp.exp2(s - lse)
                    dv = dv + _dot_tn(p.astype(do.dtype), do)      # dV += P^T dO
                    ds = p * (_dot_nt(do, v) - delta)
                    dk = dk + _dot_tn(ds.astype(q.dtype), q)       # dK += dS^T Q
                else:     # S^T [bk, bq]; row statistics as [1, bq] rows
                    q, do = q_ref[sl, h, :], do_ref[sl, h, :]
                    lse, delta = lse_ref[h, sl][None, :], dl_ref[h, sl][None, :]
                    qg, qp = qg_ref[h, sl][None, :], qp_ref[h, sl][None, :]
                    st = _dot_nt(k, q) * scale2
                    st = jnp.where((kg == qg) & (kp <= qp), st, -jnp.inf)
                    pt = jnp.exp2(st - lse)
                    dv = dv + _dot_nn(pt.astype(do.dtype), do)
                    dst = pt * (_dot_nt(v, do) - delta)
                    dk = dk + _dot_nn(dst.astype(q.dtype), q)
                return dk, dv
            return lax.cond(_interact(qt, kt, h, i, j), step, lambda c: c, carry)
        return lax.fori_loop(dt(h, 0, j), dt(h, 1, j), step_i, carry)

    zeros = jnp.zeros((plan.bk, plan.dp), jnp.float32)
    dk, dv = lax.fori_loop(0, g, head, (zeros, zeros))
    dk_ref[...] = (dk * plan.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------ pallas calls
def _prepare_meta(plan, meta):
    qg, qp, kg, kp = _pad_meta(plan, *meta)
    qtab, ktab, dtab, _ = _tile_tables(plan.bq, plan.bk, plan.group, qg, qp, kg, kp)
    return (qg, qp, kg, kp), (qtab, ktab, dtab)


def _forward(plan: _Plan, qs, ks, vs, meta, count=False):
    """Sorted-space forward: padded ``o`` and ``lse`` (log2) in ``_Layout`` [, counts [B, Hq, nq]]."""
    lay, ml = _Layout(plan), _MetaLayout(plan)
    (qg, qp, kg, kp), (qtab, ktab, _) = _prepare_meta(plan, meta)
    g = plan.group
    qp_, kp_ = lay.seq(qs, plan.t_pad), lay.seq(ks, plan.t_pad)
    vp_ = lay.seq(vs, plan.t_pad)
    qspec = lay.block(plan.bq, SQ, lambda i, b, h: (b, i, h))
    kvspec = lay.block(plan.t_pad, SQ, lambda i, b, h: (b, 0, idiv(h, g)))
    qmeta = ml.q_block(plan.bq, SQ, lambda i, b, h: (b, h, i))
    kmeta = ml.k_whole(lambda i, b, h: (b, idiv(h, g)))
    qtab_a, qtab_s = ml.table(qtab, _QT, SQ, lambda i, b, h: (b, h))
    ktab_a, ktab_s = ml.table(ktab, _KT, SQ, lambda i, b, h: (b, idiv(h, g)))
    out_shape = [jax.ShapeDtypeStruct(qp_.shape, qs.dtype),
                 jax.ShapeDtypeStruct(lay.stats_shape(), jnp.float32)]
    out_specs = [qspec, lay.stats(plan.bq, SQ, lambda i, b, h: (b, i, h))]
    if count:
        out_shape.append(jax.ShapeDtypeStruct((plan.b, plan.hq, plan.nq), jnp.int32))
        out_specs.append(pl.BlockSpec((SQ, SQ, 1), lambda i, b, h: (b, h, i)))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        out_shape=out_shape,
        grid=(plan.nq, plan.b, plan.hq),
        in_specs=[qmeta, qmeta, kmeta, kmeta, qtab_s, ktab_s, qspec, kvspec, kvspec],
        out_specs=out_specs,
        interpret=plan.interpret,
        name="sparse_attention_fwd",
        **ml.params(plan),
    )(ml.q_arg(qg), ml.q_arg(qp), ml.k_arg(kg), ml.k_arg(kp), qtab_a, ktab_a, qp_, kp_, vp_)


def _fwd_variant(plan, qs, ks, vs, meta):
    lay = _Layout(plan)
    o, lse = _forward(plan, qs, ks, vs, meta)
    return lay.unseq(o, plan.t), lay.from_stats(lse)[:, :, :plan.t]


def _bwd_variant(plan, res, do):
    qs, ks, vs, meta, o, lse = res
    lay, ml = _Layout(plan), _MetaLayout(plan)
    (qg, qp, kg, kp), (qtab, ktab, dtab) = _prepare_meta(plan, meta)
    g, tp = plan.group, plan.t_pad
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    pad = ((0, 0), (0, 0), (0, tp - plan.t))
    lse = lay.to_stats(jnp.pad(lse, pad, constant_values=jnp.inf))
    delta = lay.to_stats(jnp.pad(delta, pad))
    qp_, dop = lay.seq(qs, tp), lay.seq(do.astype(qs.dtype), tp)
    kp_, vp_ = lay.seq(ks, tp), lay.seq(vs, tp)
    params = ml.params(plan)
    metas = (ml.q_arg(qg), ml.q_arg(qp), ml.k_arg(kg), ml.k_arg(kp))

    # dQ: grid (q tile, batch, q head), loop over the interacting k tiles.
    qspec = lay.block(plan.bq, SQ, lambda i, b, h: (b, i, h))
    kvspec = lay.block(tp, SQ, lambda i, b, h: (b, 0, idiv(h, g)))
    rowspec = lay.stats(plan.bq, SQ, lambda i, b, h: (b, i, h))
    qmeta = ml.q_block(plan.bq, SQ, lambda i, b, h: (b, h, i))
    kmeta = ml.k_whole(lambda i, b, h: (b, idiv(h, g)))
    qtab_a, qtab_s = ml.table(qtab, _QT, SQ, lambda i, b, h: (b, h))
    ktab_a, ktab_s = ml.table(ktab, _KT, SQ, lambda i, b, h: (b, idiv(h, g)))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct(qp_.shape, qs.dtype),
        grid=(plan.nq, plan.b, plan.hq),
        in_specs=[qmeta, qmeta, kmeta, kmeta, qtab_s, ktab_s, qspec, kvspec, kvspec, qspec,
                  rowspec, rowspec],
        out_specs=qspec,
        interpret=plan.interpret,
        name="sparse_attention_bwd_dq",
        **params,
    )(*metas, qtab_a, ktab_a, qp_, kp_, vp_, dop, lse, delta)

    # dK, dV: grid (k tile, batch, kv head), loop over (q head of the group, interacting q tile).
    qgspec = lay.block(tp, g, lambda j, b, h: (b, 0, h))
    kspec = lay.block(plan.bk, SQ, lambda j, b, h: (b, j, h))
    rowgspec = lay.stats(tp, g, lambda j, b, h: (b, 0, h))
    qmeta = ml.q_block(tp, g, lambda j, b, h: (b, h, 0))
    kmeta = ml.k_tile(lambda j, b, h: (b, h, j))
    qtab_a, qtab_s = ml.table(qtab, _QT, g, lambda j, b, h: (b, h))
    ktab_a, ktab_s = ml.table(ktab, _KT, SQ, lambda j, b, h: (b, h))
    dtab_a, dtab_s = ml.table(dtab, _DT, g, lambda j, b, h: (b, h))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, plan=plan),
        out_shape=[jax.ShapeDtypeStruct(kp_.shape, ks.dtype),
                   jax.ShapeDtypeStruct(vp_.shape, vs.dtype)],
        grid=(plan.nk, plan.b, plan.hkv),
        in_specs=[qmeta, qmeta, kmeta, kmeta, qtab_s, ktab_s, dtab_s, qgspec, kspec, kspec,
                  qgspec, rowgspec, rowgspec],
        out_specs=[kspec, kspec],
        interpret=plan.interpret,
        name="sparse_attention_bwd_dkdv",
        **params,
    )(*metas, qtab_a, ktab_a, dtab_a, qp_, kp_, vp_, dop, lse, delta)
    return lay.unseq(dq, plan.t), lay.unseq(dk, plan.t), lay.unseq(dv, plan.t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sorted_attention(qs, ks, vs, meta, plan):
    return by_platform(plan, _fwd_variant, qs, ks, vs, meta)[0]


def _sorted_fwd(qs, ks, vs, meta, plan):
    o, lse = by_platform(plan, _fwd_variant, qs, ks, vs, meta)
    return o, (qs, ks, vs, meta, o, lse)


def _sorted_bwd(plan, res, do):
    dq, dk, dv = by_platform(plan, _bwd_variant, res, do)
    return dq, dk, dv, (None,) * 4


_sorted_attention.defvjp(_sorted_fwd, _sorted_bwd)


# ------------------------------------------------------------- counted forward (GPU only)
_COUNT_TPU = ("return_tile_count=True runs the GPU-layout (Triton) forward kernel only and cannot "
              "be {}; call without return_tile_count (or count the tiles with "
              "hash_tile_count / qk_sparse_tile_count, platform='tpu')")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _counted_attention(qs, ks, vs, meta, plan):
    """Sorted-space forward with the kernel's own tile count: ``(o, counts [B, Hq])``.  GPU layout
    only; not differentiable (its VJP raises a ``ValueError``)."""
    o, _, cnt = _forward(plan, qs, ks, vs, meta, count=True)
    return _Layout(plan).unseq(o, plan.t), cnt.sum(-1)


def _counted_fwd(qs, ks, vs, meta, plan):
    return _counted_attention(qs, ks, vs, meta, plan), None


def _counted_bwd(plan, res, ct):
    raise ValueError("return_tile_count=True: the counted forward is not differentiable; "
                     "differentiate a call without return_tile_count (same output)")


_counted_attention.defvjp(_counted_fwd, _counted_bwd)


# ------------------------------------------------------------------------- validation
_PLATFORMS = ("gpu", "tpu")


def _check_labels(q_lab, k_lab, names, label_kind, b, t, hq, hkv):
    """``ValueError`` naming the argument unless ``q_lab [B, T, Hq]`` / ``k_lab [B, T, Hkv]``
    have these shapes and the dtype of ``label_kind`` (``"bool"`` keep masks or ``"int"``
    buckets: any integer dtype but bool)."""
    for name, lab, h, which in ((names[0], q_lab, hq, "q"), (names[1], k_lab, hkv, "k/v")):
        if not (hasattr(lab, "shape") and hasattr(lab, "dtype")):  # e.g. a (nested) list
            raise ValueError(f"{name} must be {'a bool' if label_kind == 'bool' else 'an integer'} "
                             f"array of shape [B, T, H] = {(b, t, h)}, got {type(lab).__name__}")
        shape = tuple(getattr(lab, "shape", ()))
        if shape != (b, t, h):
            raise ValueError(f"{name} must have shape [B, T, H] = {(b, t, h)} (H: the heads of "
                             f"{which}), got {shape}")
        dtype = getattr(lab, "dtype", None)
        ok = (dtype == jnp.bool_) if label_kind == "bool" else (
            dtype is not None and jnp.issubdtype(dtype, jnp.integer) and dtype != jnp.bool_)
        if not ok:
            raise ValueError(f"{name} must be {'a bool' if label_kind == 'bool' else 'an integer'} "
                             f"[B, T, H] array, got dtype {dtype}")


def _check_blocks(block_q, block_k):
    """``(block_q, block_k)`` as Python ints: positive powers of two."""
    return check_int("block_q", block_q, pow2=True), check_int("block_k", block_k, pow2=True)


def _check_knobs(num_warps, num_stages):
    """The Triton knobs as Python ints, checked on every platform (ignored in interpret mode and
    on TPU; a bad one would otherwise fail only when Triton compiles the kernel)."""
    return (check_int("num_warps", num_warps, pow2=True, none_ok=True),
            check_int("num_stages", num_stages))


def _check_platform(platform):
    if not isinstance(platform, str) or platform not in _PLATFORMS:
        raise ValueError(f"platform must be one of {_PLATFORMS} (the kernel variant whose tiles are "
                         f"counted), got {platform!r}")


def validate_inputs(q, k, v, q_lab, k_lab, names, label_kind):
    """The kernels' array checks, shared with the oracles (:mod:`.reference`): q/k/v
    (:func:`check_qkv`, self-attention) and the labels' shapes and dtype (:func:`_check_labels`)."""
    check_qkv(q, k, v, self_attention=True)
    (b, t, hq), hkv = q.shape[:3], k.shape[2]
    _check_labels(q_lab, k_lab, names, label_kind, b, t, hq, hkv)


def _validate(q, k, v, q_lab, k_lab, names, label_kind, block_q, block_k, num_warps, num_stages):
    """The kernels' input checks (a ``ValueError`` naming the argument); returns the static
    knobs ``(block_q, block_k, num_warps, num_stages)`` as Python ints (``num_warps`` may be None)."""
    validate_inputs(q, k, v, q_lab, k_lab, names, label_kind)
    return _check_blocks(block_q, block_k) + _check_knobs(num_warps, num_stages)


def _validate_counts(q_lab, k_lab, names, label_kind, block_q, block_k, platform):
    """The tile counters' checks: the kernels' label, shape and block checks, with the shapes taken
    from the labels (``q_lab [B, T, Hq]``, ``k_lab [B, T, Hkv]``, ``Hq % Hkv == 0``), and
    ``platform`` in ``("gpu", "tpu")``."""
    qshape, kshape = tuple(getattr(q_lab, "shape", ())), tuple(getattr(k_lab, "shape", ()))
    if len(qshape) != 3 or min(qshape) < 1:
        raise ValueError(f"{names[0]} must be a non-empty [B, T, Hq] array, got shape {qshape}")
    b, t, hq = qshape
    if len(kshape) != 3 or kshape[:2] != (b, t) or kshape[2] < 1 or hq % kshape[2]:
        raise ValueError(f"{names[1]} must have shape [B, T, Hkv] = {(b, t)} + (Hkv,) with Hq = {hq} "
                         f"a multiple of Hkv, got {kshape}")
    _check_labels(q_lab, k_lab, names, label_kind, b, t, hq, kshape[2])
    _check_platform(platform)
    return _check_blocks(block_q, block_k)


def _plans(q, k, sm_scale, block_q, block_k, num_warps, num_stages, interpret):
    interpret = resolve_interpret(interpret)
    return select_plan(functools.partial(_make_plan, q, k, sm_scale, block_q, block_k, num_warps,
                                         num_stages, interpret), interpret)


@functools.partial(jax.jit, static_argnames=("kind", "sm_scale", "block_q", "block_k",
                                             "num_warps", "num_stages", "interpret",
                                             "return_tile_count"))
def _sparse_attention(q, k, v, q_lab, k_lab, *, kind, sm_scale, block_q, block_k, num_warps,
                      num_stages, interpret, return_tile_count):
    qo, ko, meta = (_hash_meta if kind == "hash" else _qk_meta)(q_lab, k_lab)
    qs, ks, vs = _gather_tokens(q, qo), _gather_tokens(k, ko), _gather_tokens(v, ko)
    plan = _plans(q, k, sm_scale, block_q, block_k, num_warps, num_stages, interpret)
    inv = jnp.argsort(qo, axis=-1).astype(jnp.int32)  # sorted slot of each original token
    if return_tile_count:
        if plan.tpu:
            raise ValueError(_COUNT_TPU.format("run in TPU interpret mode (pltpu.InterpretParams); "
                                               "use interpret=True or a GPU"))
        if not plan.interpret and jax.default_backend() == "tpu":
            raise ValueError(_COUNT_TPU.format("compiled on a TPU"))
        o, cnt = _counted_attention(qs, ks, vs, meta, dataclasses.replace(plan, tpu_plan=None))
        return _gather_tokens(o, inv), cnt
    return _gather_tokens(_sorted_attention(qs, ks, vs, meta, plan), inv)


def hash_attention(q, k, v, q_buckets, k_buckets, *, sm_scale=None, interpret=None,
                   block_q=64, block_k=64, num_warps=None, num_stages=2,
                   return_tile_count=False):
    """Hash-sparse causal flash attention.

    Args:
      q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA: query head
        ``h`` reads kv head ``h // (Hq // Hkv)``).
      q_buckets: ``[B, T, Hq]`` integer; k_buckets: ``[B, T, Hkv]`` integer (any values).
        Query ``i`` attends key ``j`` iff ``j <= i`` and ``q_buckets[i] == k_buckets[j]``.
      sm_scale: logit scale, default ``D ** -0.5`` (a concrete number).
      interpret: ``None`` -> interpret mode on a CPU backend; ``False`` compiled (Triton when
        lowered for GPU, Mosaic for TPU); ``pltpu.InterpretParams()`` the TPU variant in
        Pallas' TPU interpreter.
      block_q, block_k: GPU tile sizes (powers of two; shrunk for short sequences).  The TPU
        variant's tiles are ``max(128, block)`` rows (128 for sequences up to 128).
      num_warps, num_stages: Triton knobs of the compiled GPU kernels (``num_warps``: None -> 4
        for head dims up to 64, else 8, or a power of two; ``num_stages`` a positive int);
        checked everywhere, used only by the Triton variant.
      return_tile_count: a bool; ``True`` also returns ``[B, Hq]`` int32, the (q tile, k tile)
        bodies the forward kernel ran.  GPU layout only: a ``ValueError`` under
        ``pltpu.InterpretParams`` or on a TPU backend.  Not
        differentiable: the forward runs, but its VJP (``jax.grad``, calling ``jax.vjp``'s
        function) raises a ``ValueError``.

    Returns:
      ``[B, T, Hq, D]`` in q's dtype, in the original token order; rows with no visible key
      are 0.  The kernels compute in float32 whatever the input dtype: float64 inputs
      (``jax_enable_x64``) give a float64 result at float32 precision (about 1e-7 relative
      error).  Differentiable in q, k, v (Pallas backward kernels).
    """
    q_buckets, k_buckets = host_int32_ids(q_buckets, k_buckets)  # numpy int64: no silent wrap
    block_q, block_k, num_warps, num_stages = _validate(
        q, k, v, q_buckets, k_buckets, ("q_buckets", "k_buckets"), "int", block_q, block_k,
        num_warps, num_stages)
    return _sparse_attention(q, k, v, q_buckets, k_buckets, kind="hash",
                             sm_scale=static_sm_scale(sm_scale), block_q=block_q,
                             block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                             interpret=interpret,
                             return_tile_count=check_flag("return_tile_count", return_tile_count))


def qk_sparse_attention(q, k, v, q_keep, k_keep, *, sm_scale=None, interpret=None,
                        block_q=64, block_k=64, num_warps=None, num_stages=2,
                        return_tile_count=False):
    """QK-sparse causal flash attention (query / key dropping).

    ``q_keep [B, T, Hq]`` and ``k_keep [B, T, Hkv]`` bool: query ``i`` attends key ``j`` iff
    ``j <= i and q_keep[i] and k_keep[j]``; dropped queries and rows without a visible key
    output 0.  Kept tokens are compacted (stable) to the front per head, so dropped ones cost
    nothing.  Other arguments and the return value (float32 math, float64 inputs included)
    as :func:`hash_attention`.
    """
    block_q, block_k, num_warps, num_stages = _validate(
        q, k, v, q_keep, k_keep, ("q_keep", "k_keep"), "bool", block_q, block_k, num_warps,
        num_stages)
    return _sparse_attention(q, k, v, q_keep, k_keep, kind="qk",
                             sm_scale=static_sm_scale(sm_scale), block_q=block_q,
                             block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                             interpret=interpret,
                             return_tile_count=check_flag("return_tile_count", return_tile_count))


# ------------------------------------------------------------------------ tile counts
@functools.partial(jax.jit, static_argnames=("kind", "block_q", "block_k", "platform"))
def _tile_count_jit(q_lab, k_lab, *, kind, block_q, block_k, platform):
    b, t, hq = q_lab.shape
    hkv = k_lab.shape[2]
    plan = _make_plan(jax.ShapeDtypeStruct((b, t, hq, 1), jnp.float32),
                      jax.ShapeDtypeStruct((b, t, hkv, 1), jnp.float32), None, block_q, block_k,
                      None, 2, True, platform=platform)
    _, _, meta = (_hash_meta if kind == "hash" else _qk_meta)(q_lab, k_lab)
    qg, qp, kg, kp = _pad_meta(plan, *meta)
    *_, pred = _tile_tables(plan.bq, plan.bk, plan.group, qg, qp, kg, kp)
    return pred.sum((-1, -2))


def _tile_count(kind, q_lab, k_lab, names, block_q, block_k, platform):
    check_arrays(**{names[0]: q_lab, names[1]: k_lab})  # a list is refused, as by the kernels
    q_lab, k_lab = jnp.asarray(q_lab), jnp.asarray(k_lab)
    block_q, block_k = _validate_counts(q_lab, k_lab, names, "int" if kind == "hash" else "bool",
                                        block_q, block_k, platform)
    return np.asarray(_tile_count_jit(q_lab, k_lab, kind=kind, block_q=block_q, block_k=block_k,
                                      platform=platform))


def hash_tile_count(q_buckets, k_buckets, *, block_q=64, block_k=64, platform="gpu"):
    """``[B, Hq]``: the (q tile, k tile) pairs :func:`hash_attention`'s forward computes, from
    the same tables the kernels skip by (``platform="tpu"``: the TPU variant's tiles,
    ``max(128, block)`` rows).

    Inputs are checked as the kernel checks them (a ``ValueError`` naming the argument):
    ``q_buckets [B, T, Hq]`` / ``k_buckets [B, T, Hkv]`` integer (not bool) arrays with
    ``Hq % Hkv == 0``, ``block_q`` / ``block_k`` powers of two, ``platform`` ``"gpu"`` or
    ``"tpu"``."""
    q_buckets, k_buckets = host_int32_ids(q_buckets, k_buckets)
    return _tile_count("hash", q_buckets, k_buckets, ("q_buckets", "k_buckets"), block_q, block_k,
                       platform)


def qk_sparse_tile_count(q_keep, k_keep, *, block_q=64, block_k=64, platform="gpu"):
    """``[B, Hq]``: the (q tile, k tile) pairs :func:`qk_sparse_attention` computes.  Checks as
    :func:`hash_tile_count`, with bool ``q_keep [B, T, Hq]`` / ``k_keep [B, T, Hkv]`` (an
    integer 0/1 mask is rejected, as by the kernel)."""
    return _tile_count("qk", q_keep, k_keep, ("q_keep", "k_keep"), block_q, block_k, platform)


def causal_tile_count(t, *, block_q=64, block_k=64, platform="gpu"):
    """(q tile, k tile) pairs a dense causal flash kernel with the same tiles computes
    (``t`` a positive int; blocks and ``platform`` checked as :func:`hash_tile_count`)."""
    if not is_int(t) or t < 1:
        raise ValueError(f"t must be a positive int (the sequence length), got {t!r}")
    block_q, block_k = _check_blocks(block_q, block_k)
    _check_platform(platform)
    t = int(t)
    shp = jax.ShapeDtypeStruct((1, t, 1, 1), jnp.float32)
    plan = _make_plan(shp, shp, None, block_q, block_k, None, 2, True, platform=platform)
    return sum(min(plan.nk, -(-min((i + 1) * plan.bq, t) // plan.bk)) for i in range(-(-t // plan.bq)))


# ---------------------------------------------------------------------------- VMEM
def tpu_vmem_bytes(q_shape, k_shape, dtype) -> dict:
    """VMEM the TPU block specs imply per grid step, per kernel (double-buffered inputs and
    outputs; in-kernel temporaries not counted; the SMEM tile tables not included).

    ``q_shape`` ``(B, Tq, Hq, D)`` / ``k_shape`` ``(B, Tk, Hkv, D)``: positive ints (numpy ints too) with
    ``Tq == Tk`` and ``Hq % Hkv == 0``, as the kernels take them; ``dtype``: q/k/v's floating dtype.
    A bad argument is a ``ValueError`` naming it."""
    q, k = check_qkv_shapes(q_shape, k_shape, dtype, self_attention=True)
    plan = _make_plan(q, k, None, 128, 128, None, 2, False, platform="tpu")
    isz = jnp.dtype(dtype).itemsize
    dp, g, tp, bq, bk = plan.dp, plan.group, plan.t_pad, plan.bq, plan.bk
    col = lambda n: _tile_bytes((n, 1), 4)  # noqa: E731 - [n, 1] int32 / float32 column
    krow = plan.nk * _tile_bytes((1, bk), 4)
    fwd = 2 * _tile_bytes((bq, dp), isz) + 2 * _tile_bytes((tp, dp), isz) + 3 * col(bq) + 2 * krow
    dq = 3 * _tile_bytes((bq, dp), isz) + 2 * _tile_bytes((tp, dp), isz) + 4 * col(bq) + 2 * krow
    dkdv = (2 * g * _tile_bytes((tp, dp), isz) + 4 * _tile_bytes((bk, dp), isz)
            + 4 * g * col(tp) + 2 * _tile_bytes((1, bk), 4))
    return {"sparse_attention_fwd": 2 * fwd, "sparse_attention_bwd_dq": 2 * dq,
            "sparse_attention_bwd_dkdv": 2 * dkdv}
