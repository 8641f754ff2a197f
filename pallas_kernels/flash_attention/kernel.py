"""FlashAttention-2 forward and backward as Pallas kernels (Triton on GPU, Mosaic on TPU).

Notation (FlashAttention-2, Dao 2023, arXiv:2307.08691): for one head,
``S = sm_scale * Q K^T`` (masked entries -inf), ``P = softmax(S)``, ``O = P V``,
``L = logsumexp(S)`` per row.

* Forward (Alg. 1), one program per (q-block, batch, q-head); loop over the
  visited kv blocks keeping the running max ``m``, sum ``l`` and unnormalised
  ``acc``:  ``m' = max(m, rowmax(S_j))``, ``P_j = exp(S_j - m')``,
  ``l' = e^{m - m'} l + rowsum(P_j)``, ``acc' = e^{m - m'} acc + P_j V_j``;
  finally ``O = acc / l`` and ``L = m + log l``.  Exponentials are base 2 with
  ``log2(e)`` folded into the scale; ``L`` is stored in the log2 domain.
* Backward (Alg. 2, split into two kernels so nothing needs atomics):
  ``D = rowsum(dO * O)`` (plain JAX), ``P = exp(S - L)``, ``dP = dO V^T``,
  ``dS = P * (dP - D)``; the dQ kernel (one program per q-block) accumulates
  ``dQ = sm_scale * dS K`` over kv blocks, the dK/dV kernel (one program per
  kv-block and kv head) accumulates ``dV = P^T dO`` and
  ``dK = sm_scale * dS^T Q`` over q blocks *and over the query heads of its GQA
  group*, so dK/dV come out already summed per kv head.

Layout: q/o ``[B, Tq, Hq, D]``, k/v ``[B, Tk, Hkv, D]`` are used in place (no
transposes, no GQA repeat).  Forward and dQ grids are ``(n_q_blocks, B, Hq)``
(q-blocks fastest so programs sharing one K/V stream are adjacent; heaviest
causal blocks first); their K/V BlockSpec covers the whole (padded) sequence of
kv head ``h // (Hq // Hkv)`` and the kernel slices ``block_k`` rows per loop
step with ``pl.ds`` (on Triton that is just a pointer offset).  The dK/dV grid
is ``(n_kv_blocks, B, Hkv)`` with the group's ``Hq // Hkv`` query heads in one
BlockSpec.  Sequences are zero-padded to a multiple of the largest block and
the head dim to a power of two >= 16; padded keys are masked, padded rows
sliced off.

Skipping: every kernel loops only over the blocks that :mod:`.masks` says are
visible (closed-form ``[lo, hi)`` from causal/window), runs the interior
``[full_lo, full_hi)`` without the elementwise position mask, and with segment
ids wraps the block body in ``lax.cond`` on the per-block (min, max) id bounds.

Rows that see no key get ``l = 0``: the output is 0 and ``L = +inf`` so that
``P = exp(S - L) = 0`` in the backward (no NaN).

TPU variant (Mosaic).  Compiled calls carry both variants and
``lax.platform_dependent`` picks one when lowering (``jax.export(...,
platforms=("tpu",))`` or a TPU backend -> Mosaic, otherwise Triton);
``interpret=pltpu.InterpretParams()`` runs the TPU variant in Pallas' TPU
interpreter.  Same kernels, same math, same grids and block skipping; what
differs is only what Mosaic needs: a ``[B, H, T, D]`` layout (transposed
outside the kernel) so each block's last two dims are ``(rows, D)``; the head
dim zero-padded to a multiple of 128 lanes (64 -> 128; D = 128 / 256 unpadded);
every sequence tile a multiple of 128 (``max(128, block)``, sequences padded to
it, decode queries included); row statistics (``m``, ``l``, ``lse``, ``D``)
kept as ``[rows, 1]`` columns and the lse stored as ``[B, H, T, 1]``; segment
ids as ``[T, 1]`` columns / ``[1, block_k]`` rows and the per-block id bounds
flat in SMEM (Mosaic reads scalars only from SMEM); dK/dV works on ``S`` rather
than ``S^T`` with transposed-lhs matmuls; ``pltpu.CompilerParams`` with every
grid axis ``"parallel"`` (each program owns its output block; the kv / q
loops are in-kernel ``fori_loop``s).  The forward and dQ kernels keep the whole
K/V sequence of one head in VMEM, dK/dV the whole Q/dO of one GQA group: see
``experiments.kernel_report`` / :func:`tpu_vmem_bytes` for the VMEM each
implies.  Known cost: ``[T, 1]`` columns occupy 128 lanes in VMEM, so in dK/dV
the whole-sequence lse / D (and q ids) take more VMEM than Q itself.
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

from .masks import MaskSpec, block_id_bounds, blocks_may_interact
from .reference import check_ids, effective_window, split_segment_ids, static_sm_scale, static_window
from .._common import (SQ, AttentionPlan, by_platform, check_flag, check_int, check_qkv, compiler_params,
                       check_qkv_shapes, idiv, host_int32_ids, int32_ids, is_tpu_interpret, next_pow2,
                       resolve_interpret, round_up, select_plan)

LOG2E = math.log2(math.e)
_MIN_BLOCK = 16  # smallest tile Triton's tl.dot accepts
_TPU_BLOCK = 128  # Mosaic TPU: sequence tiles and the head dim are whole 128-lane vregs


# --------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and GPU (Triton) tuning knobs.

    ``block_q``/``block_k`` tile the forward; the ``*_dq`` / ``*_dkv`` fields
    tile the two backward kernels and default to the forward values.  Blocks are
    powers of two; a block larger than the (padded) sequence shrinks to it.
    ``num_warps`` / ``num_stages`` only matter for the compiled GPU kernel
    (``None`` warps: 4 for head_dim <= 64 else 8).
    """

    block_q: int = 128
    block_k: int = 128
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None
    num_warps: int | None = None
    num_stages: int = 2
    num_warps_bwd: int | None = None
    num_stages_bwd: int = 2

    @classmethod
    def get_default(cls, head_dim: int = 128) -> "BlockSizes":
        """GPU starting point by head dim (FlashAttention-2 Triton-style shapes:
        wide-q tiles for fwd/dQ, wide-kv tiles for dK/dV).  Checked to compile for
        sm_90 without register spills or shared-memory overflow
        (``experiments.kernel_report``; D=64's backward needs 8 warps for that),
        not yet timed on hardware: run ``experiments.bench_attention`` to tune."""
        if head_dim <= 64:
            return cls(128, 64, 128, 32, 32, 128, num_warps=4, num_stages=2,
                       num_warps_bwd=8, num_stages_bwd=2)
        if head_dim <= 128:
            return cls(128, 64, 64, 32, 32, 64, num_warps=8, num_stages=2,
                       num_warps_bwd=8, num_stages_bwd=2)
        return cls(64, 32, 32, 32, 32, 32, num_warps=8, num_stages=2,
                   num_warps_bwd=8, num_stages_bwd=2)

    def resolved(self):
        """``(block_q, block_k, block_q_dq, block_k_dq, block_q_dkv, block_k_dkv)``."""
        bq, bk = self.block_q, self.block_k
        return tuple(int(x) for x in (bq, bk, self.block_q_dq or bq, self.block_k_dq or bk,
                                      self.block_q_dkv or bq, self.block_k_dkv or bk))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Plan(AttentionPlan):
    """Everything static about one call (hashable: a jit/custom_vjp static arg)."""

    tq: int
    tk: int
    tq_pad: int
    tk_pad: int
    blocks: tuple   # effective (bq, bk, bq_dq, bk_dq, bq_dkv, bk_dkv)
    causal: bool
    window: int | None
    segments: bool
    num_warps_bwd: int
    num_stages_bwd: int

    @property
    def spec(self) -> MaskSpec:
        return MaskSpec(self.causal, self.window, self.tq, self.tk)

    @property
    def kv_padded(self) -> bool:
        return self.tk_pad != self.tk


# ----------------------------------------------------------------------- validation
def _validate(q, k, v, q_ids, kv_ids, window, sm_scale, block_sizes):
    """The arguments past q/k/v (:func:`check_qkv` has checked those; ``window`` and ``sm_scale``
    are already :func:`static_window` / :func:`static_sm_scale`'s, done by the public entries)."""
    check_ids(q_ids, kv_ids, q.shape[0], q.shape[1], k.shape[1])
    _check_block_sizes(block_sizes)


def _check_block_sizes(block_sizes) -> None:
    """``ValueError`` naming the field unless ``block_sizes`` is a :class:`BlockSizes` of
    powers of two (``None`` allowed past ``block_q`` / ``block_k``) and positive stage counts."""
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes or None, got {type(block_sizes)}")
    for f in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv",
              "num_warps", "num_warps_bwd"):
        check_int(f"block_sizes.{f}", getattr(block_sizes, f), pow2=True,
                  none_ok=f not in ("block_q", "block_k"))
    for f in ("num_stages", "num_stages_bwd"):
        check_int(f"block_sizes.{f}", getattr(block_sizes, f))


def _make_plan(q, k, q_ids, causal, window, sm_scale, block_sizes, interpret,
               platform="gpu") -> _Plan:
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    bs = block_sizes.resolved()
    tpu = platform == "tpu"

    def eff(block, t):
        if tpu:  # every tile a multiple of 128 rows: S's lane dim and the S^T transposes stay aligned
            return max(_TPU_BLOCK, min(block, next_pow2(t)))
        return min(block, max(_MIN_BLOCK, next_pow2(t)))

    blocks = (eff(bs[0], tq), eff(bs[1], tk), eff(bs[2], tq), eff(bs[3], tk),
              eff(bs[4], tq), eff(bs[5], tk))
    tq_pad = round_up(tq, max(blocks[0::2]))
    tk_pad = round_up(tk, max(blocks[1::2]))
    dp = round_up(d, _TPU_BLOCK) if tpu else max(_MIN_BLOCK, next_pow2(d))
    warps = int(block_sizes.num_warps or (4 if dp <= 64 else 8))
    warps_bwd = int(block_sizes.num_warps_bwd or warps)
    return _Plan(b=b, tq=tq, tk=tk, hq=hq, hkv=hkv, d=d, dp=dp, tq_pad=tq_pad, tk_pad=tk_pad,
                 blocks=blocks, causal=bool(causal), window=None if window is None else int(window),
                 sm_scale=float(d ** -0.5 if sm_scale is None else sm_scale),
                 segments=q_ids is not None,
                 interpret=interpret if is_tpu_interpret(interpret) else bool(interpret),
                 num_warps=warps, num_stages=int(block_sizes.num_stages),
                 num_warps_bwd=warps_bwd, num_stages_bwd=int(block_sizes.num_stages_bwd),
                 platform=platform)


# --------------------------------------------------------------------------- helpers
def _dot_nt(a, b):
    """``a [m, k] @ b[n, k]^T -> [m, n]`` in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    """``a [m, k] @ b [k, n] -> [m, n]`` in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """``a [k, m]^T @ b [k, n] -> [m, n]`` in float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _iota(n: int, axis: int):
    shape = (n, 1) if axis == 0 else (1, n)
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _and(a, b):
    return b if a is None else (a if b is None else a & b)


def _pad_seq(x, t_pad, d_pad=None):
    """Zero-pad ``[B, T, H, D]`` to ``[B, t_pad, H, d_pad]``."""
    pt = t_pad - x.shape[1]
    pd = 0 if d_pad is None else d_pad - x.shape[3]
    if pt == 0 and pd == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, pt), (0, 0), (0, pd)))


def _pad_ids(ids, t_pad):
    ids = ids.astype(jnp.int32)
    if t_pad == ids.shape[1]:
        return ids
    return jnp.pad(ids, ((0, 0), (0, t_pad - ids.shape[1])), mode="edge")


def _three_phase_loop(r, masked_needed: bool, body, carry):
    """Run ``body(masked)`` over ``[lo, full_lo)`` masked, the interior unmasked, ``[full_hi, hi)`` masked."""
    if not masked_needed:
        return lax.fori_loop(r.lo, r.hi, body(False), carry)
    carry = lax.fori_loop(r.lo, r.full_lo, body(True), carry)
    carry = lax.fori_loop(r.full_lo, r.full_hi, body(False), carry)
    return lax.fori_loop(r.full_hi, r.hi, body(True), carry)


def _maybe_skip(enabled, pred_fn, step, carry):
    """``step(carry)`` if the block pair can interact (segment bounds), else ``carry``."""
    if not enabled:
        return step(carry)
    return lax.cond(pred_fn(), step, lambda c: c, carry)


# ---------------------------------------------------------------------------- forward
class _FlatBounds:
    """TPU view of one batch row of ``[B, 2, n]`` id bounds kept flat in SMEM.

    Mosaic reads scalars from SMEM only, and SMEM arrays are best 1-D; this
    gives :func:`.masks.blocks_may_interact` the ``ref[r, c]`` it expects.
    """

    def __init__(self, ref, b, n):
        self.ref, self.base, self.n = ref, b * 2 * n, n

    def __getitem__(self, idx):
        r, c = idx
        return self.ref[self.base + r * self.n + c]


def _bounds(plan, qb_ref, kb_ref, nq, nk, b_axis):
    if not plan.tpu:
        return qb_ref, kb_ref
    b = pl.program_id(b_axis)
    return _FlatBounds(qb_ref, b, nq), _FlatBounds(kb_ref, b, nk)


def _rows_slice(plan, start, size):
    """``pl.ds`` along a sublane (row) axis; on TPU with the alignment hint Mosaic wants."""
    if plan.tpu:
        start = pl.multiple_of(start, size)
    return pl.ds(start, size)


def _fwd_kernel(*refs, plan: _Plan, count_blocks: bool):
    bq, bk = plan.blocks[0], plan.blocks[1]
    nq, nk = plan.tq_pad // bq, plan.tk_pad // bk
    spec, seg, tpu = plan.spec, plan.segments, plan.tpu
    if seg:
        q_ref, k_ref, v_ref, qid_ref, kvid_ref, qb_ref, kb_ref, *outs = refs
        qb_ref, kb_ref = _bounds(plan, qb_ref, kb_ref, nq, nk, 1)
    else:
        q_ref, k_ref, v_ref, *outs = refs
    o_ref, lse_ref = outs[0], outs[1]
    i = nq - 1 - pl.program_id(0)  # heaviest (last, for causal) q-blocks launch first
    q = q_ref[...]                  # [bq, Dp]
    rows = i * bq + _iota(bq, 0)    # [bq, 1]
    # Row statistics: [bq] vectors on GPU, [bq, 1] columns on TPU (rows on sublanes).
    col = (lambda x: x) if tpu else (lambda x: x[:, None])  # noqa: E731
    qid = (qid_ref[...] if tpu else qid_ref[...][:, None]) if seg else None
    scale2 = plan.sm_scale * LOG2E

    def body(masked):
        def step_j(j, carry):
            def step(carry):
                acc, m, l = carry[:3]
                sl = _rows_slice(plan, j * bk, bk)
                k = k_ref[sl, :]
                v = v_ref[sl, :]
                s = _dot_nt(q, k) * scale2                        # [bq, bk], log2 units
                mask = spec.position_mask(rows, j * bk + _iota(bk, 1), plan.kv_padded) if masked else None
                if seg:
                    kvid = kvid_ref[j] if tpu else kvid_ref[sl][None, :]  # [1, bk]
                    mask = _and(mask, qid == kvid)
                if mask is not None:
                    s = jnp.where(mask, s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=tpu))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # fully-masked row so far
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(s - col(m_use))
                l = alpha * l + jnp.sum(p, axis=1, keepdims=tpu)
                acc = acc * col(alpha) + _dot_nn(p.astype(v.dtype), v)
                return (acc, m_new, l) + ((carry[3] + 1,) if count_blocks else ())

            return _maybe_skip(seg, lambda: blocks_may_interact(qb_ref, kb_ref, i, j), step, carry)
        return step_j

    stat = (bq, 1) if tpu else (bq,)
    carry = (jnp.zeros((bq, plan.dp), jnp.float32),
             jnp.full(stat, -jnp.inf, jnp.float32),
             jnp.zeros(stat, jnp.float32))
    if count_blocks:
        carry += (jnp.zeros((), jnp.int32),)
    r = spec.kv_block_range(i, bq, bk)
    carry = _three_phase_loop(r, spec.needs_position_mask(plan.kv_padded), body, carry)
    acc, m, l = carry[:3]
    seen = l > 0.0
    o_ref[...] = (acc / col(jnp.where(seen, l, 1.0))).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)
    if count_blocks:
        outs[2][...] = jnp.full(outs[2].shape, carry[3], jnp.int32)


class _Layout:
    """Where each backend wants the axes; the one place the GPU and TPU variants differ
    outside the kernel bodies.

    GPU (Triton): q/k/v/o ``[B, T_pad, H, Dp]``, row statistics ``[B, H, T_pad]``, segment
    ids ``[B, T_pad]`` with block id bounds ``[B, 2, n_blocks]``.
    TPU (Mosaic): ``[B, H, T_pad, Dp]`` (T, D on sublanes, lanes), row statistics as columns
    ``[B, H, T_pad, 1]``, q ids as columns ``[B, Tq_pad, 1]``, kv ids as one ``[1, bk]`` row per
    kv block ``[B, nk, 1, bk]``, block id bounds flat in SMEM.

    Block specs take ``idx(*grid) -> (batch, row block, head block)``; ``heads`` is ``SQ``
    (one squeezed head) or a head count.
    """

    def __init__(self, plan: _Plan):
        self.plan, self.tpu = plan, plan.tpu

    def seq(self, x, t_pad):
        x = _pad_seq(x, t_pad, self.plan.dp)
        return jnp.swapaxes(x, 1, 2) if self.tpu else x

    def unseq(self, x, t):
        x = jnp.swapaxes(x, 1, 2) if self.tpu else x
        return x[:, :t, :, :self.plan.d]

    def block(self, rows, heads, idx):
        dp = self.plan.dp
        if self.tpu:
            return pl.BlockSpec((SQ, heads, rows, dp), lambda *a: _pick(idx(*a), 0, 2, 1) + (0,))
        return pl.BlockSpec((SQ, rows, heads, dp), lambda *a: tuple(idx(*a)) + (0,))

    def stats(self, rows, heads, idx):
        if self.tpu:
            return pl.BlockSpec((SQ, heads, rows, 1), lambda *a: _pick(idx(*a), 0, 2, 1) + (0,))
        return pl.BlockSpec((SQ, heads, rows), lambda *a: _pick(idx(*a), 0, 2, 1))

    def stats_shape(self):
        p = self.plan
        return (p.b, p.hq, p.tq_pad) + ((1,) if self.tpu else ())

    def to_stats(self, x):    # [B, H, T_pad] -> this layout's row statistics
        return x[..., None] if self.tpu else x

    def from_stats(self, x):  # this layout's row statistics -> [B, H, T_pad]
        return x[..., 0] if self.tpu else x

    def segments(self, q_ids, kv_ids, bq, bk, q_blk=None, kv_blk=None):
        """Segment inputs and specs; ``q_blk`` / ``kv_blk``: ``grid -> (batch, block)`` for the
        blocked side, ``None`` for the side each program reads whole."""
        p = self.plan
        nq, nk = p.tq_pad // bq, p.tk_pad // bk
        whole = lambda *a: (a[1], 0)  # noqa: E731  (grid = (block, batch, head))
        q_blk, kv_blk = q_blk or whole, kv_blk or whole
        q_rows = bq if q_blk is not whole else p.tq_pad
        if self.tpu:
            from jax.experimental.pallas import tpu as pltpu
            smem = pl.BlockSpec(memory_space=pltpu.SMEM)
            args = (_pad_ids(q_ids, p.tq_pad)[:, :, None],
                    _pad_ids(kv_ids, p.tk_pad).reshape(p.b, nk, 1, bk),
                    block_id_bounds(q_ids, bq, p.tq_pad).reshape(-1),
                    block_id_bounds(kv_ids, bk, p.tk_pad).reshape(-1))
            kv_spec = (pl.BlockSpec((SQ, nk, 1, bk), lambda *a: (a[1], 0, 0, 0)) if kv_blk is whole else
                       pl.BlockSpec((SQ, SQ, 1, bk), lambda *a: tuple(kv_blk(*a)) + (0, 0)))
            return args, [pl.BlockSpec((SQ, q_rows, 1), lambda *a: tuple(q_blk(*a)) + (0,)), kv_spec,
                          smem, smem]
        args = (_pad_ids(q_ids, p.tq_pad), _pad_ids(kv_ids, p.tk_pad),
                block_id_bounds(q_ids, bq, p.tq_pad), block_id_bounds(kv_ids, bk, p.tk_pad))
        kv_rows = bk if kv_blk is not whole else p.tk_pad
        return args, [pl.BlockSpec((SQ, q_rows), q_blk), pl.BlockSpec((SQ, kv_rows), kv_blk),
                      pl.BlockSpec((SQ, 2, nq), lambda *a: (a[1], 0, 0)),
                      pl.BlockSpec((SQ, 2, nk), lambda *a: (a[1], 0, 0))]

    def params(self, warps: int, stages: int) -> dict:
        if self.tpu:  # every grid program owns its output block; the kv/q loops are in-kernel
            return compiler_params(0, 0, platform="tpu", dimension_semantics=("parallel",) * 3)
        return compiler_params(warps, stages)


def _pick(t, *order):
    return tuple(t[i] for i in order)


def _forward(q, k, v, q_ids, kv_ids, plan: _Plan, count_blocks: bool = False):
    """Padded ``o`` and ``lse`` (log2 units) in this plan's layout (:class:`_Layout`) [, block
    counts ``[B, Hq, nq]``: GPU only, for the block-skipping tests]."""
    lay = _Layout(plan)
    bq, bk = plan.blocks[0], plan.blocks[1]
    nq = plan.tq_pad // bq
    g = plan.group
    qp = lay.seq(q, plan.tq_pad)
    kp, vp = lay.seq(k, plan.tk_pad), lay.seq(v, plan.tk_pad)

    def qrow(i, b, h):  # reversed: the longest causal rows start first
        return b, nq - 1 - i, h

    qspec = lay.block(bq, SQ, qrow)
    kvspec = lay.block(plan.tk_pad, SQ, lambda i, b, h: (b, 0, idiv(h, g)))
    in_specs, args = [qspec, kvspec, kvspec], [qp, kp, vp]
    if plan.segments:
        seg_args, seg_specs = lay.segments(q_ids, kv_ids, bq, bk, q_blk=lambda i, b, h: qrow(i, b, h)[:2])
        args += seg_args
        in_specs += seg_specs
    out_shape = [jax.ShapeDtypeStruct(qp.shape, q.dtype), jax.ShapeDtypeStruct(lay.stats_shape(), jnp.float32)]
    out_specs = [qspec, lay.stats(bq, SQ, qrow)]
    if count_blocks:
        out_shape.append(jax.ShapeDtypeStruct((plan.b, plan.hq, nq), jnp.int32))
        out_specs.append(pl.BlockSpec((SQ, SQ, 1), lambda i, b, h: (b, h, nq - 1 - i)))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan, count_blocks=count_blocks),
        out_shape=out_shape,
        grid=(nq, plan.b, plan.hq),
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=plan.interpret,
        name="flash_attention_fwd",
        **lay.params(plan.num_warps, plan.num_stages),
    )(*args)


def _tile_bytes(shape, itemsize: int) -> int:
    """VMEM bytes of one block: last two dims padded to the (8, 128) tile (16 rows for 16-bit)."""
    *lead, r, c = shape
    sub = 8 * max(1, 4 // itemsize)
    return int(np.prod(lead, dtype=np.int64)) * round_up(r, sub) * round_up(c, 128) * itemsize


def tpu_vmem_bytes(q_shape, k_shape, dtype, *, segments=False, block_sizes=None) -> dict:
    """VMEM the TPU block specs imply per grid step, per kernel (inputs and outputs,
    double-buffered by the Pallas pipeline; in-kernel temporaries such as the ``S`` tile
    and the accumulators not counted).  ``{"flash_attention_fwd": bytes, ...}``.

    ``q_shape`` ``(B, Tq, Hq, D)`` / ``k_shape`` ``(B, Tk, Hkv, D)``: positive ints (numpy ints too) with
    ``Hq % Hkv == 0``; ``dtype``: q/k/v's floating dtype; ``segments``: a bool, segment ids given;
    ``block_sizes``: a :class:`BlockSizes` or None (the default for the head dim).  A bad argument
    is a ``ValueError`` naming it."""
    q, k = check_qkv_shapes(q_shape, k_shape, dtype, self_attention=False)
    bs = BlockSizes.get_default(q.shape[-1]) if block_sizes is None else block_sizes
    _check_block_sizes(bs)
    segments = check_flag("segments", segments)
    plan = _make_plan(q, k, None, True, None, None, bs, False, platform="tpu")
    isz = jnp.dtype(dtype).itemsize
    dp, g, tq, tk = plan.dp, plan.group, plan.tq_pad, plan.tk_pad
    bq, bk, bq1, bk1, bq2, bk2 = plan.blocks
    row = lambda n: _tile_bytes((n, 1), 4)  # noqa: E731 - [n, 1] float32 column
    seg = lambda nq_rows, kv: (_tile_bytes((nq_rows, 1), 4) + kv) if segments else 0  # noqa: E731
    fwd = (2 * _tile_bytes((bq, dp), isz) + 2 * _tile_bytes((tk, dp), isz) + row(bq)
           + seg(bq, (tk // bk) * _tile_bytes((1, bk), 4)))
    dq = (3 * _tile_bytes((bq1, dp), isz) + 2 * _tile_bytes((tk, dp), isz) + 2 * row(bq1)
          + seg(bq1, (tk // bk1) * _tile_bytes((1, bk1), 4)))
    dkdv = (2 * g * _tile_bytes((tq, dp), isz) + 4 * _tile_bytes((bk2, dp), isz)
            + 2 * g * row(tq) + seg(tq, _tile_bytes((1, bk2), 4)))
    return {"flash_attention_fwd": 2 * fwd, "flash_attention_bwd_dq": 2 * dq,
            "flash_attention_bwd_dkdv": 2 * dkdv}


def _forward_sliced(q, k, v, q_ids, kv_ids, plan: _Plan):
    """``o [B, Tq, Hq, D]`` and ``lse [B, Hq, Tq]`` (log2 units) from this plan's variant."""
    lay = _Layout(plan)
    o, lse = _forward(q, k, v, q_ids, kv_ids, plan)
    return lay.unseq(o, plan.tq), lay.from_stats(lse)[:, :, :plan.tq]


# ---------------------------------------------------------------------------- backward
def _dq_kernel(*refs, plan: _Plan):
    bq, bk = plan.blocks[2], plan.blocks[3]
    nq, nk = plan.tq_pad // bq, plan.tk_pad // bk
    spec, seg, tpu = plan.spec, plan.segments, plan.tpu
    if seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qid_ref, kvid_ref, qb_ref, kb_ref, dq_ref = refs
        qb_ref, kb_ref = _bounds(plan, qb_ref, kb_ref, nq, nk, 1)
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref = refs
    i = nq - 1 - pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    if tpu:  # already [bq, 1] columns
        lse, delta = lse_ref[...], dl_ref[...]
    else:
        lse, delta = lse_ref[...][:, None], dl_ref[...][:, None]
    rows = i * bq + _iota(bq, 0)
    qid = (qid_ref[...] if tpu else qid_ref[...][:, None]) if seg else None
    scale2 = plan.sm_scale * LOG2E

    def body(masked):
        def step_j(j, dq):
            def step(dq):
                sl = _rows_slice(plan, j * bk, bk)
                k = k_ref[sl, :]
                v = v_ref[sl, :]
                s = _dot_nt(q, k) * scale2
                mask = spec.position_mask(rows, j * bk + _iota(bk, 1), plan.kv_padded) if masked else None
                if seg:
                    kvid = kvid_ref[j] if tpu else kvid_ref[sl][None, :]
                    mask = _and(mask, qid == kvid)
                if mask is not None:
                    s = jnp.where(mask, s, -jnp.inf)
                p = jnp.exp2(s - lse)                        # P = exp(S - L)
                ds = p * (_dot_nt(do, v) - delta)            # dS = P * (dO V^T - D)
                return dq + _dot_nn(ds.astype(k.dtype), k)   # dQ += dS K
            return _maybe_skip(seg, lambda: blocks_may_interact(qb_ref, kb_ref, i, j), step, dq)
        return step_j

    r = spec.kv_block_range(i, bq, bk)
    dq = _three_phase_loop(r, spec.needs_position_mask(plan.kv_padded), body,
                           jnp.zeros((bq, plan.dp), jnp.float32))
    dq_ref[...] = (dq * plan.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, plan: _Plan):
    bq, bk = plan.blocks[4], plan.blocks[5]
    nq, nk = plan.tq_pad // bq, plan.tk_pad // bk
    spec, seg, group = plan.spec, plan.segments, plan.group
    if seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qid_ref, kvid_ref, qb_ref, kb_ref,
         dk_ref, dv_ref) = refs
        qb_ref, kb_ref = _bounds(plan, qb_ref, kb_ref, nq, nk, 1)
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref = refs
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]            # [bk, Dp]
    if plan.tpu:
        body_for_head = _dkdv_tpu_body(plan, j, k, v, q_ref, do_ref, lse_ref, dl_ref,
                                       qid_ref if seg else None, kvid_ref if seg else None,
                                       qb_ref if seg else None, kb_ref if seg else None)
    else:
        body_for_head = _dkdv_gpu_body(plan, j, k, v, q_ref, do_ref, lse_ref, dl_ref,
                                       qid_ref if seg else None, kvid_ref if seg else None,
                                       qb_ref if seg else None, kb_ref if seg else None)

    r = spec.q_block_range(j, bq, bk)
    masked_needed = spec.needs_position_mask(plan.kv_padded)
    carry = (jnp.zeros((bk, plan.dp), jnp.float32), jnp.zeros((bk, plan.dp), jnp.float32))
    if group == 1:
        carry = _three_phase_loop(r, masked_needed, body_for_head(0), carry)
    else:  # GQA: sum over the query heads that share this kv head, in-kernel
        carry = lax.fori_loop(
            0, group, lambda h, c: _three_phase_loop(r, masked_needed, body_for_head(h), c), carry)
    dk, dv = carry
    dk_ref[...] = (dk * plan.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkdv_tpu_body(plan, j, k, v, q_ref, do_ref, lse_ref, dl_ref, qid_ref, kvid_ref, qb_ref, kb_ref):
    """dK/dV block step on TPU: ``S`` in its natural ``[bq, bk]`` orientation (row statistics
    stay ``[bq, 1]`` columns, sliced along sublanes) and ``P^T dO`` / ``dS^T Q`` as
    transposed-lhs matmuls, instead of the GPU's ``S^T`` with ``[1, bq]`` lane rows."""
    bq, bk = plan.blocks[4], plan.blocks[5]
    spec, seg = plan.spec, plan.segments
    cols = j * bk + _iota(bk, 1)             # [1, bk]
    kvid = kvid_ref[...] if seg else None    # [1, bk]
    scale2 = plan.sm_scale * LOG2E

    def body_for_head(h):
        def body(masked):
            def step_i(i, carry):
                def step(carry):
                    dk, dv = carry
                    sl = _rows_slice(plan, i * bq, bq)
                    q = q_ref[h, sl, :]
                    do = do_ref[h, sl, :]
                    lse = lse_ref[h, sl, :]                     # [bq, 1]
                    delta = dl_ref[h, sl, :]
                    s = _dot_nt(q, k) * scale2                  # S [bq, bk]
                    mask = spec.position_mask(i * bq + _iota(bq, 0), cols, plan.kv_padded) if masked else None
                    if seg:
                        mask = _and(mask, qid_ref[sl, :] == kvid)
                    if mask is not None:
                        s = jnp.where(mask, s, -jnp.inf)
                    p = jnp.exp2(s - lse)                       # P
                    dv = dv + _dot_tn(p.astype(do.dtype), do)   # dV += P^T dO
                    ds = p * (_dot_nt(do, v) - delta)           # dS = P * (dO V^T - D)
                    dk = dk + _dot_tn(ds.astype(q.dtype), q)    # dK += dS^T Q
                    return dk, dv
                return _maybe_skip(seg, lambda: blocks_may_interact(qb_ref, kb_ref, i, j), step, carry)
            return step_i
        return body
    return body_for_head


def _dkdv_gpu_body(plan, j, k, v, q_ref, do_ref, lse_ref, dl_ref, qid_ref, kvid_ref, qb_ref, kb_ref):
    bq, bk = plan.blocks[4], plan.blocks[5]
    spec, seg = plan.spec, plan.segments
    cols = j * bk + _iota(bk, 0)             # keys index the rows of S^T [bk, bq]
    kvid = kvid_ref[...][:, None] if seg else None
    scale2 = plan.sm_scale * LOG2E

    def body_for_head(h):
        def body(masked):
            def step_i(i, carry):
                def step(carry):
                    dk, dv = carry
                    sl = pl.ds(i * bq, bq)
                    q = q_ref[sl, h, :]
                    do = do_ref[sl, h, :]
                    lse = lse_ref[h, sl][None, :]
                    delta = dl_ref[h, sl][None, :]
                    st = _dot_nt(k, q) * scale2                 # S^T [bk, bq]
                    mask = spec.position_mask(i * bq + _iota(bq, 1), cols, plan.kv_padded) if masked else None
                    if seg:
                        mask = _and(mask, kvid == qid_ref[sl][None, :])
                    if mask is not None:
                        st = jnp.where(mask, st, -jnp.inf)
                    pt = jnp.exp2(st - lse)                     # P^T
                    dv = dv + _dot_nn(pt.astype(do.dtype), do)  # dV += P^T dO
                    dst = pt * (_dot_nt(v, do) - delta)         # dS^T = P^T * (V dO^T - D)
                    dk = dk + _dot_nn(dst.astype(q.dtype), q)   # dK += dS^T Q
                    return dk, dv
                return _maybe_skip(seg, lambda: blocks_may_interact(qb_ref, kb_ref, i, j), step, carry)
            return step_i
        return body
    return body_for_head


def _row_stats(plan: _Plan, o, lse, do):
    """Padded ``lse`` and ``D = rowsum(dO * O)``, both ``[B, Hq, Tq_pad]`` float32.

    Padded rows get ``lse = +inf`` (so ``P = 0`` there) and ``D = 0``.
    """
    # D_i = rowsum(dO_i * O_i): an elementwise reduction XLA fuses; no kernel needed.
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    pad = ((0, 0), (0, 0), (0, plan.tq_pad - plan.tq))
    return jnp.pad(lse, pad, constant_values=jnp.inf), jnp.pad(delta, pad)


def _backward(plan: _Plan, res, do):
    q, k, v, q_ids, kv_ids, o, lse = res
    lay = _Layout(plan)
    g, tq_pad, tk_pad = plan.group, plan.tq_pad, plan.tk_pad
    lse, delta = (lay.to_stats(x) for x in _row_stats(plan, o, lse, do))
    qp, dop = lay.seq(q, tq_pad), lay.seq(do.astype(q.dtype), tq_pad)
    kp, vp = lay.seq(k, tk_pad), lay.seq(v, tk_pad)
    params = lay.params(plan.num_warps_bwd, plan.num_stages_bwd)

    # dQ: grid (q-block, batch, q-head), loop over kv blocks.
    bq, bk = plan.blocks[2], plan.blocks[3]
    nq = tq_pad // bq

    def qrow(i, b, h):
        return b, nq - 1 - i, h

    qspec = lay.block(bq, SQ, qrow)
    kvspec = lay.block(tk_pad, SQ, lambda i, b, h: (b, 0, idiv(h, g)))
    rowspec = lay.stats(bq, SQ, qrow)
    in_specs, args = [qspec, kvspec, kvspec, qspec, rowspec, rowspec], [qp, kp, vp, dop, lse, delta]
    if plan.segments:
        seg_args, seg_specs = lay.segments(q_ids, kv_ids, bq, bk, q_blk=lambda i, b, h: qrow(i, b, h)[:2])
        args += seg_args
        in_specs += seg_specs
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        grid=(nq, plan.b, plan.hq),
        in_specs=in_specs,
        out_specs=qspec,
        interpret=plan.interpret,
        name="flash_attention_bwd_dq",
        **params,
    )(*args)

    # dK, dV: grid (kv-block, batch, kv-head), loop over (q-head in group, q-block).
    bq, bk = plan.blocks[4], plan.blocks[5]
    nk = tk_pad // bk
    qgspec = lay.block(tq_pad, g, lambda j, b, h: (b, 0, h))
    kspec = lay.block(bk, SQ, lambda j, b, h: (b, j, h))
    rowgspec = lay.stats(tq_pad, g, lambda j, b, h: (b, 0, h))
    in_specs, args = [qgspec, kspec, kspec, qgspec, rowgspec, rowgspec], [qp, kp, vp, dop, lse, delta]
    if plan.segments:
        seg_args, seg_specs = lay.segments(q_ids, kv_ids, bq, bk, kv_blk=lambda j, b, h: (b, j))
        args += seg_args
        in_specs += seg_specs
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, plan=plan),
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        grid=(nk, plan.b, plan.hkv),
        in_specs=in_specs,
        out_specs=[kspec, kspec],
        interpret=plan.interpret,
        name="flash_attention_bwd_dkdv",
        **params,
    )(*args)
    return lay.unseq(dq, plan.tq), lay.unseq(dk, plan.tk), lay.unseq(dv, plan.tk)


# ------------------------------------------------------------------------- custom vjp
def _fwd_variant(plan, q, k, v, q_ids, kv_ids):
    return _forward_sliced(q, k, v, q_ids, kv_ids, plan)


def _bwd_variant(plan, res, do):
    return _backward(plan, res, do)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_ids, kv_ids, plan):
    return by_platform(plan, _fwd_variant, q, k, v, q_ids, kv_ids)[0]


def _flash_fwd(q, k, v, q_ids, kv_ids, plan):
    o, lse = by_platform(plan, _fwd_variant, q, k, v, q_ids, kv_ids)
    return o, (q, k, v, q_ids, kv_ids, o, lse)  # residuals: inputs, output, logsumexp [B, Hq, Tq]


def _flash_bwd(plan, res, do):
    dq, dk, dv = by_platform(plan, _bwd_variant, res, do)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _prepare(q, k, v, causal, segment_ids, window, sm_scale, block_sizes, interpret):
    check_qkv(q, k, v, self_attention=False)
    causal = check_flag("causal", causal)
    q_ids, kv_ids = split_segment_ids(segment_ids, q.shape[1], k.shape[1])
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(q.shape[-1])
    _validate(q, k, v, q_ids, kv_ids, window, sm_scale, block_sizes)
    window = effective_window(window, q.shape[1], k.shape[1])
    if q_ids is not None:
        q_ids, kv_ids = int32_ids(q_ids, kv_ids)
    interpret = resolve_interpret(interpret)
    plan = select_plan(functools.partial(_make_plan, q, k, q_ids, causal, window, sm_scale,
                                         block_sizes, interpret), interpret)
    return q_ids, kv_ids, plan


def _host_segment_ids(segment_ids):
    """:func:`host_int32_ids` for ``segment_ids`` (``[B, T]`` or a ``(q_ids, kv_ids)`` pair)."""
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2 or segment_ids[0] is None or segment_ids[1] is None:
            return segment_ids  # split_segment_ids raises the ValueError
        return tuple(host_int32_ids(segment_ids[0], segment_ids[1]))
    return host_int32_ids(segment_ids, segment_ids)[0]


def flash_attention(q, k, v, *, causal=True, segment_ids=None, window=None, sm_scale=None,
                    block_sizes=None, interpret=None):
    """Fused attention ``softmax(q k^T * sm_scale + mask) v`` (FlashAttention-2).

    Args:
      q: ``[B, Tq, Hq, D]``.
      k, v: ``[B, Tk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA: query head ``h``
        reads kv head ``h // (Hq // Hkv)``; k/v are never repeated in memory).
      causal: query ``i`` (absolute position ``Tk - Tq + i``) sees keys ``j <= pos``.
      segment_ids: ``[B, T]`` int (needs ``Tq == Tk``) or a ``(q_ids [B, Tq],
        kv_ids [B, Tk])`` pair; attention stays within equal ids.
      window: sliding window ``w``: ``pos - w < j <= pos`` (non-causal: ``|pos - j| < w``); a
        concrete positive int (Python, numpy or 0-d jax integer; a traced one raises ``ValueError``).
      sm_scale: logit scale, default ``D ** -0.5``; a concrete scalar (Python or
        numpy / jax 0-d value; a traced one raises ``ValueError``).
      block_sizes: :class:`BlockSizes` (default :meth:`BlockSizes.get_default`).
      interpret: Pallas interpret mode; ``None`` = on when the default backend is CPU.
        ``False``: compiled, Triton kernels when lowered for GPU and Mosaic
        kernels when lowered for TPU (chosen at lowering time).  A
        ``pltpu.InterpretParams()`` runs the TPU variant in TPU interpret mode.

    Returns:
      ``[B, Tq, Hq, D]`` in q's dtype (float32 accumulation).  The kernels compute in
      float32 whatever the input dtype: float64 inputs (``jax_enable_x64``) give a float64
      result at float32 precision (about 1e-7 relative error).  Rows that see no
      key are 0.  Differentiable in q, k, v (Pallas backward kernels).
    """
    return _flash_attention(q, k, v, causal=causal, segment_ids=_host_segment_ids(segment_ids),
                            window=static_window(window),
                            sm_scale=static_sm_scale(sm_scale), block_sizes=block_sizes,
                            interpret=interpret)


@functools.partial(jax.jit, static_argnames=("causal", "window", "sm_scale", "block_sizes",
                                             "interpret"))
def _flash_attention(q, k, v, *, causal, segment_ids, window, sm_scale, block_sizes, interpret):
    q_ids, kv_ids, plan = _prepare(q, k, v, causal, segment_ids, window, sm_scale,
                                   block_sizes, interpret)
    return _flash(q, k, v, q_ids, kv_ids, plan)


def forward_with_stats(q, k, v, *, causal=True, segment_ids=None, window=None, sm_scale=None,
                       block_sizes=None, interpret=None):
    """Debug forward: ``(o_padded [B, Tq_pad, Hq, Dp], lse [B, Hq, Tq_pad], visited [B, Hq, nq])``;
    arguments as :func:`flash_attention` (GPU layout only: ``pltpu.InterpretParams`` is refused).

    ``visited`` counts the kv blocks whose body actually ran for each q-block
    (after the analytic range and the segment-bounds test), so tests can check
    that masked blocks are skipped.  ``lse`` is in log2 units (+inf for rows
    that see no key).  Outputs are the raw, unsliced kernel buffers.
    """
    sm_scale = static_sm_scale(sm_scale)
    window = static_window(window)
    segment_ids = _host_segment_ids(segment_ids)
    q_ids, kv_ids, plan = _prepare(q, k, v, causal, segment_ids, window, sm_scale,
                                   block_sizes, interpret)
    if plan.tpu:
        raise ValueError("forward_with_stats runs the GPU-layout kernel only; use interpret=True "
                         "(not pltpu.InterpretParams)")
    return jax.jit(functools.partial(_forward, plan=plan, count_blocks=True))(q, k, v, q_ids, kv_ids)
