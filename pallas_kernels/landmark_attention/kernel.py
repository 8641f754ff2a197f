"""Landmark attention (Mohtashami & Jaggi 2023) as Pallas kernels: a grouped-softmax flash kernel.

Semantics: :mod:`.reference` (blocks of ``L = block_size`` tokens, the last of each complete
block its landmark; outer softmax over earlier blocks' landmarks + the current block's keys,
an earlier block's keys weighted by ``P_outer(landmark) * inner softmax within the block``).

Key observation (what makes it one flash kernel).  Tile the keys by *landmark block*: every
key tile is exactly one block.  For query ``i`` and an earlier block ``c`` define the logits

    X_ij = s_ij + s_i,lm(c) - lse_in(i, c)        (j a non-landmark key of c)
    X_ij = s_ij                                   (j <= i a non-landmark key of i's block)

with ``lse_in(i, c) = logsumexp_{j in c} s_ij``.  Then ``sum_{j in c} exp(X_ij) =
exp(s_i,lm(c))``, so ``softmax_j(X_ij)`` over all keys *is* the landmark weight and
``o = softmax(X) V``: FlashAttention-2's online softmax over key tiles, where each tile first
computes its own row statistics (``lse_in`` and the landmark column) in-tile.  The stored
``lse = logsumexp(X)`` is the outer softmax's normaliser.

Backward (FlashAttention-2 style, recomputing ``X`` per tile): ``P = exp(X - lse)``,
``dX = P * (dO V^T - D)`` with ``D = rowsum(dO * O)``; through ``X`` (in-tile only):
``dS_ij = dX_ij - sigma_ij * r_i`` for an earlier block's keys (``sigma`` the inner softmax,
``r_i = sum_{j in c} dX_ij``), ``dS_i,lm(c) = r_i`` for its landmark, ``dS = dX`` in the
current block.  ``dQ = scale dS K``, ``dK = scale dS^T Q``, ``dV = P^T dO`` as in flash.

Layout: tokens are re-laid out in *padded blocks* (outside the kernel, plain JAX): block
``c``'s ``L`` tokens go to rows ``[c * Lp, c * Lp + L)`` with ``Lp = next_pow2(L)`` (>= 16 on
GPU, >= 128 on TPU), the rest zero padding; ``[B, H, T_pad, Dp]`` on both backends, the head
dim zero-padded (power of two >= 16 on GPU, multiple of 128 on TPU).  Key tiles are one block
(``Lp`` rows), query tiles ``bq`` rows (a multiple of ``Lp``).  Forward / dQ grid
``(n_q_tiles, B, Hq)`` with the kv head's whole K/V in the block; dK/dV grid
``(n_blocks, B, Hkv)`` with the GQA group's whole Q/dO, summing over its query heads.  Query
tile ``i`` loops over blocks ``[0, min(last block of the tile, n_blocks))``; dK/dV of block ``c``
over the query tiles from the one holding block ``c``.  Row statistics ``[B, H, T_pad]`` on GPU,
``[B, H, T_pad, 1]`` columns on TPU.  Compiled calls carry both variants
(``lax.platform_dependent``); ``interpret=pltpu.InterpretParams()`` runs the TPU variant.

Deviations from the authors' code (``epfml/landmark-attention``, ``models/landmark.py``
``landmark_grouped_softmax`` / ``llama/ltriton/flash_landmark_attention.py``): same math;
their reference materialises the ``[T, T]`` grouped softmax (scatter/gather by group id), their
Triton kernel requires ``T`` to be a multiple of the block size and the tile to equal the
block; here any ``T`` (a trailing partial block has no landmark), GQA, and padded blocks for
block sizes that are not powers of two (``L = 50`` costs ``64 / 50`` of the work).  No
group dropout (their ``p_group_dropout`` option, off by default).  Known costs: the padding
above; on TPU the ``Lp >= 128`` key tile (``L = 64`` -> half of every tile is padding).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..flash_attention.kernel import (LOG2E, _dot_nn, _dot_nt, _dot_tn, _iota,
                                      _rows_slice, _tile_bytes, static_sm_scale)
from .._common import (SQ, AttentionPlan, by_platform, check_flag, check_int, check_qkv, compiler_params,
                       check_qkv_shapes, idiv, next_pow2, resolve_interpret, round_up, select_plan)
from .reference import check_block_size

_MIN_LP_GPU = 16   # tl.dot's smallest tile
_LN2 = math.log(2.0)
_TPU_TILE = 128


# --------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True, kw_only=True)
class _Plan(AttentionPlan):
    t: int
    L: int          # block size (tokens per block incl. the landmark)
    lp: int         # padded block rows (power of two)
    nb: int         # blocks, ceil(T / L)
    bq: int         # query tile rows (multiple of lp)
    t_pad: int      # padded rows (multiple of bq)

    @property
    def nq(self) -> int:
        return self.t_pad // self.bq

    @property
    def nk(self) -> int:
        return self.t_pad // self.lp


def _make_plan(q, k, block_size, sm_scale, block_q, num_warps, num_stages, interpret,
               platform="gpu") -> _Plan:
    b, t, hq, d = q.shape
    tpu = platform == "tpu"
    # a block longer than the sequence has no landmark (no complete block): every L > T is the
    # same attention as L = T + 1 (plain causal), whose padded block is next_pow2(T + 1) rows,
    # not next_pow2(L) (L = 4096 at T = 4 padded to 4096 rows; L = 2**40 overflowed int32)
    L = min(int(block_size), t + 1)
    lp = max(_TPU_TILE if tpu else _MIN_LP_GPU, next_pow2(L))
    nb = -(-t // L)
    bq = max(lp, min(max(block_q, _TPU_TILE) if tpu else block_q, next_pow2(nb * lp)))
    dp = round_up(d, _TPU_TILE) if tpu else max(16, next_pow2(d))
    return _Plan(b=b, t=t, hq=hq, hkv=k.shape[2], d=d, dp=dp, L=L, lp=lp, nb=nb, bq=bq,
                 t_pad=round_up(nb * lp, bq), sm_scale=float(d ** -0.5 if sm_scale is None
                                                             else sm_scale),
                 interpret=interpret, num_warps=num_warps or (4 if dp <= 64 else 8),
                 num_stages=num_stages, platform=platform)


# --------------------------------------------------------------------------- layout
def _to_blocks(plan: _Plan, x, dp=None, fill=0.0):
    """``[B, T, H, D]`` -> padded-block layout ``[B, H, T_pad, Dp]`` (padding ``fill``)."""
    b, t, h, d = x.shape
    dp = plan.dp if dp is None else dp
    L, lp, nb = plan.L, plan.lp, plan.nb
    x = jnp.pad(x, ((0, 0), (0, nb * L - t), (0, 0), (0, dp - d)), constant_values=fill)
    x = x.reshape(b, nb, L, h, dp)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, lp - L), (0, 0), (0, 0)), constant_values=fill)
    x = jnp.pad(x.reshape(b, nb * lp, h, dp), ((0, 0), (0, plan.t_pad - nb * lp), (0, 0), (0, 0)),
                constant_values=fill)
    return jnp.swapaxes(x, 1, 2)


def _from_blocks(plan: _Plan, x, d=None):
    """Inverse of :func:`_to_blocks`: ``[B, H, T_pad, Dp]`` -> ``[B, T, H, D]``."""
    b, h, _, dp = x.shape
    x = jnp.swapaxes(x, 1, 2)[:, :plan.nb * plan.lp]
    x = x.reshape(b, plan.nb, plan.lp, h, dp)[:, :, :plan.L]
    return x.reshape(b, plan.nb * plan.L, h, dp)[:, :plan.t, :, :(plan.d if d is None else d)]


def _lse_from_blocks(plan, lse):
    """Row statistics (``[B, H, T_pad]`` / ``[..., 1]``) -> ``[B, H, T]`` in token order."""
    lse = lse if plan.tpu else lse[..., None]
    return jnp.swapaxes(_from_blocks(plan, lse, d=1)[..., 0], 1, 2)


def _lse_to_blocks(plan, lse):
    x = _to_blocks(plan, jnp.swapaxes(lse, 1, 2)[..., None], dp=1, fill=jnp.inf)
    return x if plan.tpu else x[..., 0]


def _stats_spec(plan, rows, heads, idx):
    if plan.tpu:
        return pl.BlockSpec((SQ, heads, rows, 1), lambda *a: tuple(idx(*a)) + (0,))
    return pl.BlockSpec((SQ, heads, rows), lambda *a: tuple(idx(*a)))


def _params(plan):
    if plan.tpu:
        return compiler_params(0, 0, platform="tpu", dimension_semantics=("parallel",) * 3)
    return compiler_params(plan.num_warps, plan.num_stages)


# --------------------------------------------------------------------------- tile math
class _Tile:
    """In-tile quantities of one (query tile, key block ``c``) pair; rows ``[bq, 1]`` columns."""

    def __init__(self, plan: _Plan, q, k, rows, c):
        L, lp = plan.L, plan.lp
        shift = lp.bit_length() - 1
        qblk = lax.shift_right_logical(rows, jnp.asarray(shift, rows.dtype))
        qloc = lax.bitwise_and(rows, jnp.asarray(lp - 1, rows.dtype))
        qvalid = (qloc < L) & (qblk * L + qloc < plan.t)
        cols = _iota(lp, 1)
        kvalid = (cols < L) & (c * L + cols < plan.t)
        self.klm = kvalid & (cols == L - 1)
        self.knon = kvalid & (cols != L - 1)
        self.early = qvalid & (c < qblk)                       # [bq, 1]
        cur = qvalid & (c == qblk)
        s = _dot_nt(q, k) * (plan.sm_scale * LOG2E)           # log2 domain [bq, lp]
        red = functools.partial(jnp.sum, axis=1, keepdims=True)
        s_in = jnp.where(self.knon, s, -jnp.inf)
        m_in = jnp.max(s_in, axis=1, keepdims=True)
        m_in = jnp.where(m_in == -jnp.inf, 0.0, m_in)
        z_in = red(jnp.exp2(s_in - m_in))
        self.lse_in = m_in + jnp.log2(jnp.where(z_in > 0, z_in, 1.0))
        a = red(jnp.where(self.klm, s, 0.0))                   # landmark logit
        self.s_in = s_in
        self.x = jnp.where(self.early & self.knon, s + (a - self.lse_in),
                           jnp.where(cur & self.knon & (cols <= qloc), s, -jnp.inf))

    def ds(self, p, dp, delta):
        """``dS`` (natural-log logits) from ``P``, ``dP = dO V^T`` and ``D`` (``[bq, 1]``)."""
        dx = p * (dp - delta)
        r = jnp.sum(jnp.where(self.knon, dx, 0.0), axis=1, keepdims=True)
        sigma = jnp.exp2(self.s_in - self.lse_in)
        early = jnp.where(self.knon, dx - sigma * r, jnp.where(self.klm, r, 0.0))
        return jnp.where(self.early, early, dx)


def _col(plan, x):
    """A stats block (``[n]`` GPU, ``[n, 1]`` TPU) as an ``[n, 1]`` column."""
    return x if plan.tpu else x[:, None]


def _uncol(plan, x):
    return x if plan.tpu else x[:, 0]


def _q_rows(plan, i):
    return i * plan.bq + _iota(plan.bq, 0)


def _n_blocks_for(plan, i):
    """Key blocks query tile ``i`` may see: ``[0, min((i + 1) * bq / lp, nb))``."""
    return jnp.minimum((i + 1) * (plan.bq // plan.lp), plan.nb)


# --------------------------------------------------------------------------- kernels
def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, plan: _Plan):
    i = pl.program_id(0)
    q = q_ref[...]
    rows = _q_rows(plan, i)

    def body(c, carry):
        acc, m, l = carry
        sl = _rows_slice(plan, c * plan.lp, plan.lp)
        k, v = k_ref[sl, :], v_ref[sl, :]
        x = _Tile(plan, q, k, rows, c).x
        m_new = jnp.maximum(m, jnp.max(x, axis=1, keepdims=True))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(x - m_use)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        acc = acc * alpha + _dot_nn(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros((plan.bq, plan.dp), jnp.float32),
             jnp.full((plan.bq, 1), -jnp.inf, jnp.float32), jnp.zeros((plan.bq, 1), jnp.float32))
    acc, m, l = lax.fori_loop(0, _n_blocks_for(plan, i), body, carry)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = _uncol(plan, jnp.where(seen, m + jnp.log2(l_safe), jnp.inf))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, *, plan: _Plan):
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = _col(plan, lse_ref[...]), _col(plan, dl_ref[...])
    rows = _q_rows(plan, i)

    def body(c, dq):
        sl = _rows_slice(plan, c * plan.lp, plan.lp)
        k, v = k_ref[sl, :], v_ref[sl, :]
        tile = _Tile(plan, q, k, rows, c)
        p = jnp.exp2(tile.x - lse)
        ds = tile.ds(p, _dot_nt(do, v), delta)
        return dq + _dot_nn(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, _n_blocks_for(plan, i), body,
                       jnp.zeros((plan.bq, plan.dp), jnp.float32))
    dq_ref[...] = (dq * plan.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, *, plan: _Plan):
    c = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]                       # [lp, Dp]
    bq = plan.bq
    i_lo = idiv(c * plan.lp, bq)

    def head(h, carry):
        def body(i, carry):
            dk, dv = carry
            sl = _rows_slice(plan, i * bq, bq)
            q, do = q_ref[h, sl, :], do_ref[h, sl, :]
            if plan.tpu:
                lse, delta = lse_ref[h, sl, :], dl_ref[h, sl, :]
            else:
                lse, delta = lse_ref[h, sl][:, None], dl_ref[h, sl][:, None]
            tile = _Tile(plan, q, k, _q_rows(plan, i), c)
            p = jnp.exp2(tile.x - lse)
            ds = tile.ds(p, _dot_nt(do, v), delta)
            dv = dv + _dot_tn(p.astype(do.dtype), do)   # dV += P^T dO
            dk = dk + _dot_tn(ds.astype(q.dtype), q)    # dK += dS^T Q
            return dk, dv
        return lax.fori_loop(i_lo, plan.nq, body, carry)

    zeros = jnp.zeros((plan.lp, plan.dp), jnp.float32)
    dk, dv = lax.fori_loop(0, plan.group, head, (zeros, zeros))
    dk_ref[...] = (dk * plan.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------ pallas calls
def _q_spec(plan, rows, heads, idx):
    return pl.BlockSpec((SQ, heads, rows, plan.dp), lambda *a: tuple(idx(*a)) + (0,))


def _stats_shape(plan):
    return (plan.b, plan.hq, plan.t_pad) + ((1,) if plan.tpu else ())


def _forward(plan, qb, kb, vb):
    g = plan.group
    qspec = _q_spec(plan, plan.bq, SQ, lambda i, b, h: (b, h, i))
    kvspec = _q_spec(plan, plan.t_pad, SQ, lambda i, b, h: (b, idiv(h, g), 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        out_shape=[jax.ShapeDtypeStruct(qb.shape, qb.dtype),
                   jax.ShapeDtypeStruct(_stats_shape(plan), jnp.float32)],
        grid=(plan.nq, plan.b, plan.hq),
        in_specs=[qspec, kvspec, kvspec],
        out_specs=[qspec, _stats_spec(plan, plan.bq, SQ, lambda i, b, h: (b, h, i))],
        interpret=plan.interpret,
        name="landmark_attention_fwd",
        **_params(plan),
    )(qb, kb, vb)


def _backward(plan, res, do_b, dlse_b=None):
    """``dlse_b``: the cotangent of the natural-log ``lse`` (padded-block layout ``[B, H, T_pad]``)
    or None.  ``lse = logsumexp(X)`` adds ``P * dlse`` to ``dX = P * (dO V^T - D)``, so it enters
    as ``D - dlse``."""
    qb, kb, vb, ob, lse = res
    g = plan.group
    delta = jnp.sum(ob.astype(jnp.float32) * do_b.astype(jnp.float32), axis=-1)  # [B, H, T_pad]
    if dlse_b is not None:
        delta = delta - dlse_b
    if plan.tpu:
        delta = delta[..., None]
    do_b = do_b.astype(qb.dtype)
    qspec = _q_spec(plan, plan.bq, SQ, lambda i, b, h: (b, h, i))
    kvspec = _q_spec(plan, plan.t_pad, SQ, lambda i, b, h: (b, idiv(h, g), 0))
    rowspec = _stats_spec(plan, plan.bq, SQ, lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct(qb.shape, qb.dtype),
        grid=(plan.nq, plan.b, plan.hq),
        in_specs=[qspec, kvspec, kvspec, qspec, rowspec, rowspec],
        out_specs=qspec,
        interpret=plan.interpret,
        name="landmark_attention_bwd_dq",
        **_params(plan),
    )(qb, kb, vb, do_b, lse, delta)

    qgspec = _q_spec(plan, plan.t_pad, g, lambda c, b, h: (b, h, 0))
    kspec = _q_spec(plan, plan.lp, SQ, lambda c, b, h: (b, h, c))
    rowgspec = _stats_spec(plan, plan.t_pad, g, lambda c, b, h: (b, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, plan=plan),
        out_shape=[jax.ShapeDtypeStruct(kb.shape, kb.dtype),
                   jax.ShapeDtypeStruct(vb.shape, vb.dtype)],
        grid=(plan.nk, plan.b, plan.hkv),
        in_specs=[qgspec, kspec, kspec, qgspec, rowgspec, rowgspec],
        out_specs=[kspec, kspec],
        interpret=plan.interpret,
        name="landmark_attention_bwd_dkdv",
        **_params(plan),
    )(qb, kb, vb, do_b, lse, delta)
    return dq, dk, dv


def _fwd_variant(plan, q, k, v):
    qb, kb, vb = (_to_blocks(plan, x) for x in (q, k, v))
    ob, lse = _forward(plan, qb, kb, vb)
    return _from_blocks(plan, ob), _lse_from_blocks(plan, lse)


def _bwd_variant(plan, res, do, dlse):
    q, k, v, o, lse = res
    qb, kb, vb, ob = (_to_blocks(plan, x) for x in (q, k, v, o))
    dlse_b = _to_blocks(plan, jnp.swapaxes(dlse.astype(jnp.float32), 1, 2)[..., None], dp=1)[..., 0]
    dq, dk, dv = _backward(plan, (qb, kb, vb, ob, _lse_to_blocks(plan, lse)),
                           _to_blocks(plan, do), dlse_b)
    return tuple(_from_blocks(plan, x) for x in (dq, dk, dv))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _landmark(q, k, v, plan):
    """``(o [B, T, Hq, D], lse [B, Hq, T])``: lse the outer softmax's natural-log normaliser."""
    o, lse = by_platform(plan, _fwd_variant, q, k, v)
    return o, lse * _LN2


def _landmark_fwd(q, k, v, plan):
    o, lse = by_platform(plan, _fwd_variant, q, k, v)
    return (o, lse * _LN2), (q, k, v, o, lse)  # residual lse: [B, Hq, T] log2 outer normaliser


def _landmark_bwd(plan, res, cts):
    do, dlse = cts
    return by_platform(plan, _bwd_variant, res, do, dlse)


_landmark.defvjp(_landmark_fwd, _landmark_bwd)


# ------------------------------------------------------------------------- public API
def _validate(q, k, v, block_size, block_q, num_warps, num_stages):
    """The input checks (a ``ValueError`` naming the argument); returns the static knobs
    ``(block_size, block_q, num_warps, num_stages)`` as Python ints (``num_warps`` may be None)."""
    check_qkv(q, k, v, self_attention=True)
    check_block_size(block_size)
    return (int(block_size), check_int("block_q", block_q, pow2=True),
            check_int("num_warps", num_warps, pow2=True, none_ok=True),
            check_int("num_stages", num_stages))


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "block_q", "num_warps",
                                             "num_stages", "interpret", "return_lse"))
def _landmark_attention(q, k, v, *, block_size, sm_scale, block_q, num_warps, num_stages,
                        interpret, return_lse):
    interpret = resolve_interpret(interpret)
    plan = select_plan(functools.partial(_make_plan, q, k, block_size, sm_scale, block_q, num_warps,
                                         num_stages, interpret), interpret)
    o, lse = _landmark(q, k, v, plan)
    return (o, lse) if return_lse else o


def landmark_attention(q, k, v, *, block_size, sm_scale=None, interpret=None, block_q=64,
                       num_warps=None, num_stages=2, return_lse=False):
    """Landmark (grouped-softmax) causal attention; semantics in :mod:`.reference`.

    Args:
      q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA).  The token
        at ``t`` with ``t % block_size == block_size - 1`` is the landmark of its block.
      block_size: ``L >= 2`` tokens per block including its landmark (paper: 50 + 1); an
        ``L > T`` has no complete block, so no landmark: causal attention (run as ``L = T + 1``).
      sm_scale: logit scale, default ``D ** -0.5`` (a concrete number).
      interpret: ``None`` -> interpret mode on a CPU backend; ``False`` compiled (Triton for
        GPU, Mosaic for TPU, chosen at lowering); ``pltpu.InterpretParams()`` the TPU variant.
      block_q: GPU query tile rows (a power of two; raised to the padded block ``Lp``).
      num_warps, num_stages: Triton knobs of the compiled GPU kernels (``num_warps``: None -> 4
        for head dims up to 64, else 8, or a power of two; ``num_stages`` a positive int);
        checked everywhere, used only by the Triton variant.
      return_lse: also return the outer softmax's natural-log normaliser ``[B, Hq, T]``
        float32 (as :func:`.reference.landmark_attention_reference`; what merging with other
        keys, e.g. retrieved memory blocks, needs).

    Returns:
      ``[B, T, Hq, D]`` in q's dtype (and ``lse`` with ``return_lse``).  The kernels compute
      in float32 whatever the input dtype: float64 inputs (``jax_enable_x64``) give a float64
      result at float32 precision (about 1e-7 relative error).  Landmark queries
      output the same rule as the other queries of their block (their own key excluded).
      Differentiable in q, k, v through ``o`` and ``lse`` (Pallas backward; the ``lse``
      cotangent enters as ``D - dlse``).
    """
    block_size, block_q, num_warps, num_stages = _validate(q, k, v, block_size, block_q, num_warps,
                                                           num_stages)
    return _landmark_attention(q, k, v, block_size=block_size,
                               sm_scale=static_sm_scale(sm_scale), block_q=block_q,
                               num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                               return_lse=check_flag("return_lse", return_lse))


def tpu_vmem_bytes(q_shape, k_shape, dtype, *, block_size: int) -> dict:
    """VMEM the TPU block specs imply per grid step, per kernel (double-buffered inputs and
    outputs; in-kernel temporaries not counted).

    ``q_shape`` ``(B, Tq, Hq, D)`` / ``k_shape`` ``(B, Tk, Hkv, D)``: positive ints (numpy ints too) with
    ``Tq == Tk`` and ``Hq % Hkv == 0``, as the kernel takes them; ``dtype``: q/k/v's floating dtype;
    ``block_size``: an int >= 2.  A bad argument is a ``ValueError`` naming it."""
    check_block_size(block_size)
    q, k = check_qkv_shapes(q_shape, k_shape, dtype, self_attention=True)
    plan = _make_plan(q, k, block_size, None, 128, None, 2, False, platform="tpu")
    isz = jnp.dtype(dtype).itemsize
    dp, g, tp, bq, lp = plan.dp, plan.group, plan.t_pad, plan.bq, plan.lp
    col = lambda n: _tile_bytes((n, 1), 4)  # noqa: E731
    fwd = 2 * _tile_bytes((bq, dp), isz) + 2 * _tile_bytes((tp, dp), isz) + col(bq)
    dq = 3 * _tile_bytes((bq, dp), isz) + 2 * _tile_bytes((tp, dp), isz) + 2 * col(bq)
    dkdv = 2 * g * _tile_bytes((tp, dp), isz) + 4 * _tile_bytes((lp, dp), isz) + 2 * g * col(tp)
    return {"landmark_attention_fwd": 2 * fwd, "landmark_attention_bwd_dq": 2 * dq,
            "landmark_attention_bwd_dkdv": 2 * dkdv}
