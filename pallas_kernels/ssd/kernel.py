"""Mamba-2 state-space duality (SSD), chunked, with Pallas kernels (Triton on GPU, Mosaic on TPU).

Semantics: :func:`.reference.reference`.  Per (batch, head) the sequence is cut
into chunks of ``Q = chunk_size`` steps.  Inside chunk ``c`` (``a_t = dt_t A``,
``Acs`` the cumulative sum of ``a`` from the chunk start, ``xdt = dt * x``)::

    Lmat[t, s] = exp(Acs_t - Acs_s)  (s <= t, else 0)      # segment-sum decay mask
    y_c   = (Lmat * (C B^T)) @ xdt  +  exp(Acs)[:, None] * (C @ S_c^T)
    st_c  = (xdt * exp(Acs_{Q-1} - Acs)[:, None])^T @ B          # chunk's own state
    S_{c+1} = exp(Acs_{Q-1}) S_c + st_c                          # state passing

Precision: ``Acs_t - Acs_s`` is a difference of float32 running sums (as in mamba_ssm's
kernels), so it carries an absolute error of about ``|Acs| * 6e-8``.  That is nothing for
usual settings (|A| <= 16, dt ~ 0.001-0.1: measured errors ~1e-5 against the sequential
reference), but a chunk whose ``sum(dt * A)`` reaches ~1e4 (e.g. ``A = -1e4``, dt ~ 30)
loses about 1e-3 relative in its near-diagonal decays (up to ~2 % in one output entry
measured, audit 50); use a smaller ``chunk_size`` there, or the sequential reference.

What runs where:

* Pallas (grid ``(batch, n_chunks, H, P / block_p)``, one ``[Q, block_p]`` slice of
  ``x`` against the chunk's full ``[Q, N]`` B/C each; the backward's dt / dAcs /
  dB / dC are linear in the P-slices and come out as per-P-block partial sums):
  ``_chunk_state`` (``st_c``), ``_chunk_scan`` (``y_c``: intra-chunk quadratic
  form + inter-chunk term), backward ``_chunk_state_grad``
  (``(dy * exp(Acs))^T C``, the part of ``dS_c`` coming from chunk ``c``'s own
  output) and ``_chunk_bwd`` (dx, d dt, dB, dC and d Acs of one chunk from
  ``S_c`` and ``dS_{c+1}``; recomputes ``C B^T`` and the decay mask).
* Plain JAX: the inter-chunk recurrence (a ``lax.scan`` over chunks forward,
  and the reverse one for ``dS``) over ``[batch, H, P, N]`` states; the
  within-chunk cumsum of ``dt * A`` and its reverse cumsum in the backward;
  ``dt`` preprocessing (``dt_bias``, softplus), ``D * x`` and the ``silu(z)``
  gate (differentiated by JAX autodiff: elementwise, fused by XLA); summing
  the per-head dB/dC over the heads of a group; padding.

Packed sequences (``segment_ids``; a static branch, nothing changes without
them): JAX turns the ids into ``seg [batch, Lp]`` float32, the index of each
step's segment *counted from its chunk's start* (0 = the segment that was
running when the chunk began; +1 at every segment start inside the chunk).
With it every decay of the chunk form is masked exactly (no large negative
numbers in the cumsum)::

    Lmat[t, s] *= (seg_t == seg_s)             # intra-chunk: same segment only
    exp(Acs_t)        *= (seg_t == 0)          # inter-chunk term: state reaches t
    exp(Acs_{Q-1} - Acs_s) *= (seg_s == seg_{Q-1})   # chunk state: last segment only
    exp(Acs_{Q-1})    *= (seg_{Q-1} == 0)      # state passing through the chunk

The backward uses the same masked factors (they are constants w.r.t. every
input, so the chain rule is unchanged: ``dAcs`` gets nothing from masked entries).

Residuals kept for the backward: the (padded) inputs, the within-chunk cumsum
and the chunk-start states ``[batch, n_chunks, H, P, N]`` float32 (not per step).
Padding: ``L`` to a multiple of ``Q`` with ``dt = 0`` (identity steps), ``P``/``N``
to powers of two >= 16 (Triton's ``dot`` minimum) with zeros.

TPU variant (Mosaic).  Compiled calls (``interpret=False``) carry both variants and
``lax.platform_dependent`` picks one when lowering (``jax.export(...,
platforms=("tpu",))`` or a TPU backend -> Mosaic, otherwise Triton); it wraps the whole
``custom_vjp`` because the variants' residuals differ in shape.  ``interpret=
pltpu.InterpretParams()`` runs the TPU variant in Pallas' TPU interpreter.  Same four
kernels, same grid ``(batch, chunk, head, P block)``, same math (the kernel bodies are
shared; :class:`_Chunk` holds the per-step vectors as each backend wants them and
:class:`_Layout` the array layouts and block specs).  What differs is only what Mosaic
needs, namely that the last two dims of every block are whole ``(8, 128)`` tiles or full
dims and that no kernel transposes or slices lanes:

* tiles: chunk ``Q = max(128, chunk)`` (the ``[Q, Q]`` decay / ``C B^T`` tiles and the
  ``[1, Q]`` rows are whole lane vregs; 128 by default), ``P`` and ``N`` zero-padded to
  multiples of 128 lanes, P blocks of 128 columns (forward and backward; ``block_p`` is
  GPU-only).  With ``P = 64`` (Mamba-2's head dim) half of each P tile is padding.
* layout (transposed / reshaped in JAX, outside the kernels): ``x``, ``y``, ``dy``, ``dx``
  ``[b, H, Lp, P]`` (blocks ``[Q, 128]``), ``B``/``C`` ``[b, G, Lp, N]`` (``[Q, N]``),
  states ``[b, nc, H, P, N]`` (``[128, N]``, as on GPU); per-step vectors (``dt``, ``Acs``,
  ``seg``) as ``[Q, 1]`` columns (steps on sublanes: they scale tile rows), plus ``[1, Q]``
  rows of ``Acs`` and ``seg`` from their own ``[.., nc, 1, Q]`` inputs for the ``[Q, Q]``
  masks; the last step's values by a masked sublane reduction (``[1, 1]``).
* backward outputs: ``d dt`` and the row-sum part of ``dAcs`` as ``[Q, 1]`` columns, the
  column-sum part of ``dAcs`` (``-sum_s E[s, t]``) as a separate ``[1, Q]`` row output
  (added in JAX), per-head ``dB``/``dC`` ``[Q, N]``; all per-P-block partial sums as on GPU.
* matmuls are 2-D ``dot_general`` s with float32 accumulation (``a^T b`` / ``a b^T`` by
  dimension numbers), operands in the inputs' dtype; reductions keep dims (no 0-d values).
* ``pltpu.CompilerParams`` with every grid axis ``"parallel"`` (each program owns its
  output blocks; no scalars need SMEM: the decays are computed in-kernel from ``Acs``).
* VMEM per grid step: :func:`tpu_vmem_bytes` (blocks double-buffered; ~1.7 MiB for the
  backward at ``Q = 128``, f32), plus the ``[Q, Q]`` temporaries.

What is checked without a TPU (``tests/test_tpu_lowering_ssd.py``): the Mosaic lowering
under ``jax.export`` (block-shape rules, dtypes, op coverage; Mosaic's own layout
passes and the VMEM limit are only checked by the TPU compiler), and the numerics of the
TPU variant in TPU interpret mode (forward and every gradient, race detector).  Not
checked: a real TPU compile or run, and speed.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from .._common import (SQ, check_flag, check_int, is_int, KernelPlan, by_platform, compiler_params, idiv,
                       next_pow2, resolve_interpret, check_decay, host_int32_ids, round_up, segment_resets,
                       select_plan)
from .reference import _d_term, process_dt, validate

f32 = jnp.float32
BWD_BLOCK_P = 32  # P columns per backward program (the forward uses ``block_p``)
TPU_LANES = 128   # Mosaic TPU: P, N and the chunk length are whole 128-lane vregs


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Plan(KernelPlan):
    b: int
    l: int
    lp: int
    q: int        # chunk size
    h: int
    g: int
    p: int
    pp: int       # padded P
    n: int
    np_: int      # padded N
    bp: int       # P block (grid axis)
    num_warps: int = 4
    num_stages: int = 2
    mm: str = "float32"  # dot operand dtype (the inputs' dtype)
    seg: bool = False     # segment_ids given (``seg`` is an extra input)

    @property
    def nc(self):
        return self.lp // self.q

    @property
    def hpg(self):
        return self.h // self.g

    @property
    def npb(self):
        return self.pp // self.bp


def _make_plan(b, l, h, p, g, n, *, chunk_size, block_p, mm, seg, interpret, platform="gpu"):
    if platform == "tpu":
        # Chunk: a multiple of 128 (the [Q, Q] decay / C B^T tiles and the [1, Q] rows are
        # whole lane vregs), P / N padded to multiples of 128 lanes, 128-column P blocks.
        q = max(TPU_LANES, min(chunk_size, next_pow2(l)))
        pp = round_up(p, TPU_LANES)
        return _Plan(b=b, l=l, lp=round_up(l, q), q=q, h=h, g=g, p=p, pp=pp, n=n,
                     np_=round_up(n, TPU_LANES), bp=TPU_LANES, interpret=interpret, mm=mm,
                     seg=seg, platform="tpu")
    q = min(chunk_size, max(16, next_pow2(l)))
    pp = max(16, next_pow2(p))
    bp = min(block_p, pp)
    np_ = max(16, next_pow2(n))
    return _Plan(b=b, l=l, lp=round_up(l, q), q=q, h=h, g=g, p=p, pp=pp, n=n, np_=np_, bp=bp,
                 interpret=interpret, num_warps=4 if q * max(bp, np_) <= 64 * 64 else 8, mm=mm,
                 seg=seg)


def _pad_to(x, sizes):
    pad = [(0, s - d) for d, s in zip(x.shape, sizes)]
    return jnp.pad(x, pad) if any(p[1] for p in pad) else x


# ----------------------------------------------------------------------------- kernel pieces
# Dot operands are cast to ``plan.mm`` (the inputs' dtype: bf16/f16 operands run the
# tensor cores at full rate and take half the shared memory of f32 ones, as in
# mamba_ssm's Triton kernels); accumulation is always float32.
def _dot(a, b, mm):
    return jnp.dot(a.astype(mm), b.astype(mm), preferred_element_type=f32)


def _dot_tn(a, b, mm):  # a^T b
    return lax.dot_general(a.astype(mm), b.astype(mm), (((0,), (0,)), ((), ())),
                           preferred_element_type=f32)


def _dot_nt(a, b, mm):  # a b^T
    return lax.dot_general(a.astype(mm), b.astype(mm), (((1,), (1,)), ((), ())),
                           preferred_element_type=f32)


class _Chunk:
    """The per-step vectors of one chunk as each backend holds them.

    GPU: ``[Q]`` vectors (``acs``, ``seg``), the last step as ``[1]`` (a ``pl.ds`` load).
    TPU: ``[Q, 1]`` columns (steps on sublanes), ``[1, Q]`` rows read from their own
    inputs where a ``[Q, Q]`` mask needs them (no in-kernel transposes), the last step as
    ``[1, 1]`` (a masked sublane reduction: no unaligned single-row loads).
    Everything else in the kernels is the same code for both.
    """

    def __init__(self, plan, acs_ref, seg_refs=(), acs_row_ref=None):
        self.tpu, self.q = plan.tpu, plan.q
        self.acs = acs_ref[...].astype(f32)
        self.last = self._last(acs_ref, self.acs).astype(f32)
        self.acs_row_ref = acs_row_ref
        self.seg = seg_refs[0][...] if seg_refs else None
        self.seg_last = self._last(seg_refs[0], self.seg) if seg_refs else None
        self.seg_row_ref = seg_refs[1] if seg_refs and self.tpu else None

    def _last(self, ref, v):
        """The last step's value of ``ref`` (loaded as ``v``)."""
        if not self.tpu:
            return ref[pl.ds(self.q - 1, 1)]
        return jnp.sum(jnp.where(self.steps() == self.q - 1, v, 0.0), axis=0, keepdims=True)

    def steps(self):
        """Step index in the vector form (``[Q]`` / ``[Q, 1]``)."""
        shape = (self.q, 1) if self.tpu else (self.q,)
        return lax.broadcasted_iota(jnp.int32, shape, 0)

    def col(self, v):
        """A per-step vector as a ``[Q, 1]`` column (broadcasts over a tile's columns)."""
        return v if self.tpu else v[:, None]

    def rowsum(self, x):
        return jnp.sum(x, axis=1, keepdims=self.tpu)

    def total(self, v):
        """Sum of a per-step vector (GPU: a scalar; TPU: ``[1, 1]``)."""
        return jnp.sum(v, axis=0, keepdims=True) if self.tpu else jnp.sum(v)

    def total2(self, x):
        """Sum of a 2-D tile (GPU: a scalar; TPU: ``[1, 1]`` via two keepdims reductions)."""
        if self.tpu:
            return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)
        return jnp.sum(x)

    def lmat(self):
        """``Lmat [Q, Q]``: ``exp(Acs_t - Acs_s)`` for ``s <= t`` (same segment with ids), else 0."""
        q = self.q
        row = lax.broadcasted_iota(jnp.int32, (q, q), 0)
        col = lax.broadcasted_iota(jnp.int32, (q, q), 1)
        causal = col <= row
        if self.seg is not None:
            seg_row = self.seg_row_ref[...] if self.tpu else self.seg[None, :]
            causal = causal & (self.col(self.seg) == seg_row)
        acs_row = self.acs_row_ref[...].astype(f32) if self.tpu else self.acs[None, :]
        diff = jnp.where(causal, self.col(self.acs) - acs_row, 0.0)
        return jnp.where(causal, jnp.exp(diff), 0.0)

    def inflow(self, e):
        """``exp(Acs_t)``, zeroed where a segment started since the chunk start."""
        return e if self.seg is None else jnp.where(self.seg == 0.0, e, 0.0)

    def outflow(self, w):
        """``exp(Acs_{Q-1} - Acs_s)``, zeroed unless ``s`` is in the chunk's last segment."""
        return w if self.seg is None else jnp.where(self.seg == self.seg_last, w, 0.0)

    def passing(self):
        """``exp(Acs_{Q-1})`` (0 when a segment starts in the chunk): ``S_{c+1} = . S_c + st_c``."""
        decay = jnp.exp(self.last)
        return decay if self.seg is None else jnp.where(self.seg_last == 0.0, decay, 0.0)


def _split_refs(plan, refs, n_lead):
    """``(lead refs, seg refs, acs row ref, rest)``: each kernel's inputs are its lead inputs,
    the segment inputs (GPU ``[seg]``, TPU ``[seg col, seg row]``; none without ids), on TPU
    the ``[1, Q]`` row of ``Acs`` (the kernels that build ``Lmat``), then the rest."""
    k = n_lead
    ns = (2 if plan.tpu else 1) if plan.seg else 0
    seg = refs[k:k + ns]
    k += ns
    row = None
    if plan.tpu:
        row, k = refs[k], k + 1
    return refs[:n_lead], seg, row, refs[k:]


def _chunk_state_kernel(*refs, plan):
    (x_ref, dt_ref, acs_ref, b_ref), seg, _, (st_ref,) = _split_refs(plan, refs, 4)
    ch = _Chunk(plan, acs_ref, seg)
    w = ch.outflow(jnp.exp(ch.last - ch.acs)) * dt_ref[...].astype(f32)    # [Q]
    xw = x_ref[...].astype(f32) * ch.col(w)
    st_ref[...] = _dot_tn(xw, b_ref[...], plan.mm)                        # [P, N]


def _chunk_scan_kernel(*refs, plan):
    (x_ref, dt_ref, acs_ref, b_ref, c_ref), seg, row, (s_ref, y_ref) = _split_refs(plan, refs, 5)
    ch = _Chunk(plan, acs_ref, seg, row)
    lmat = ch.lmat()
    Cm = c_ref[...]
    xdt = x_ref[...].astype(f32) * ch.col(dt_ref[...].astype(f32))
    m = lmat * _dot_nt(Cm, b_ref[...], plan.mm)                           # [Q, Q]
    e = ch.inflow(jnp.exp(ch.acs))
    y = _dot(m, xdt, plan.mm) + ch.col(e) * _dot_nt(Cm, s_ref[...], plan.mm)  # [Q, P]
    y_ref[...] = y.astype(y_ref.dtype)


def _chunk_state_grad_kernel(*refs, plan):
    (dy_ref, acs_ref, c_ref), seg, _, (ds_ref,) = _split_refs(plan, refs, 3)
    ch = _Chunk(plan, acs_ref, seg)
    e = ch.inflow(jnp.exp(ch.acs))
    ds_ref[...] = _dot_tn(dy_ref[...].astype(f32) * ch.col(e), c_ref[...], plan.mm)


def _chunk_bwd_kernel(*refs, plan):
    (x_ref, dt_ref, acs_ref, b_ref, c_ref), seg, row, rest = _split_refs(plan, refs, 5)
    s_ref, dsn_ref, dy_ref, dx_ref, ddt_ref, dacs_ref, db_ref, dc_ref = rest[:8]
    ch = _Chunk(plan, acs_ref, seg, row)
    lmat = ch.lmat()
    col = ch.col
    X = x_ref[...].astype(f32)
    dt = dt_ref[...].astype(f32)
    Bm = b_ref[...]                               # B, C only feed dots
    Cm = c_ref[...]
    S = s_ref[...]
    dSn = dsn_ref[...]
    dY = dy_ref[...].astype(f32)
    e = ch.inflow(jnp.exp(ch.acs))
    w = ch.outflow(jnp.exp(ch.last - ch.acs))
    xdt = X * col(dt)

    mm = plan.mm
    gmat = _dot_nt(Cm, Bm, mm)                    # C B^T      [Q, Q]
    m = lmat * gmat
    dm = _dot_nt(dY, xdt, mm)                     # dY xdt^T   [Q, Q]
    bds = _dot_nt(Bm, dSn, mm)                    # B dSn^T    [Q, P]
    dxdt = _dot_tn(m, dY, mm) + col(w) * bds
    dg = dm * lmat
    cs = _dot_nt(Cm, S, mm)                       # C S^T      [Q, P]
    dc_ref[...] = _dot(dg, Bm, mm) + col(e) * _dot(dY, S, mm)
    db_ref[...] = _dot_tn(dg, Cm, mm) + col(w) * _dot(xdt, dSn, mm)

    E = dm * m
    dw = ch.rowsum(xdt * bds) * w
    # dAcs_t = sum_s E[t, s] - sum_s E[s, t] + ...: the column sums of E are a [1, Q] row on
    # TPU, written to their own output (``rest[8]``) and added in JAX (no in-kernel transpose).
    if plan.tpu:
        rest[8][...] = -jnp.sum(E, axis=0, keepdims=True)
        dacs = ch.rowsum(E) + e * ch.rowsum(dY * cs) - dw
    else:
        dacs = jnp.sum(E, axis=1) - jnp.sum(E, axis=0) + e * jnp.sum(dY * cs, axis=1) - dw
    last_extra = ch.total(dw) + ch.passing() * ch.total2(dSn * S)   # S_{c+1} = decay S_c + st_c
    dacs_ref[...] = dacs + jnp.where(ch.steps() == plan.q - 1, last_extra, 0.0)
    dx_ref[...] = (dxdt * col(dt)).astype(dx_ref.dtype)
    ddt_ref[...] = ch.rowsum(dxdt * X)


# ----------------------------------------------------------------------------- pallas_calls
class _Layout:
    """Where each backend wants the axes: the one place the GPU and TPU variants differ
    outside the kernel bodies (which differ only through :class:`_Chunk`).

    GPU (Triton), the public layout used in place: ``x``/``y``/``dx``/``dy`` ``[b, Lp, H, P]``,
    ``B``/``C`` ``[b, Lp, G, N]``, per-step vectors (``dt``, ``Acs``) ``[b, H, Lp]``, ``seg``
    ``[b, Lp]``; per-P-block partial sums ``[b, nPb, H, Lp]`` and ``[b, nPb, Lp, H, N]``.
    TPU (Mosaic), transposed outside the kernels so that the last two dims of every block
    are ``(Q, P)`` / ``(Q, N)`` / ``(P, N)`` tiles or full dims: ``x``... ``[b, H, Lp, P]``,
    ``B``/``C`` ``[b, G, Lp, N]``, per-step vectors as ``[b, H, Lp, 1]`` columns, ``Acs`` also
    as ``[b, H, nc, 1, Q]`` rows, ``seg`` as a ``[b, Lp, 1]`` column and ``[b, nc, 1, Q]`` rows,
    partial sums ``[b, nPb, H, Lp, 1]`` / ``[b, nPb, H, Lp, N]`` and the ``dAcs`` column-sum
    part as rows ``[b, nPb, H, nc, 1, Q]``.  States ``[b, nc, H, P, N]`` in both.
    """

    def __init__(self, plan: _Plan):
        self.plan, self.tpu = plan, plan.tpu

    # -- arrays (JAX side)
    def seq(self, x):                  # [b, Lp, H|G, K] <-> this layout (its own inverse)
        return jnp.swapaxes(x, 1, 2) if self.tpu else x

    def vec(self, v):                  # [b, H, Lp] -> per-step vectors
        return v[..., None] if self.tpu else v

    def rows(self, v):                 # [b, H, Lp] -> [b, H, nc, 1, Q] (TPU; GPU: none)
        p = self.plan
        return [v.reshape(p.b, p.h, p.nc, 1, p.q)] if self.tpu else []

    def seg_args(self, seg):
        if seg is None:
            return []
        p = self.plan
        return [seg[..., None], seg.reshape(p.b, p.nc, 1, p.q)] if self.tpu else [seg]

    def from_partial_vec(self, v):     # per-P-block partial sums -> [b, H, Lp]
        v = v.sum(1)
        return v[..., 0] if self.tpu else v

    def group_sum(self, v):            # per-head partial dB/dC -> [b, Lp, G, N]
        p = self.plan
        if self.tpu:                   # [b, nPb, H, Lp, N]
            v = v.reshape(p.b, p.npb, p.g, p.hpg, p.lp, p.np_).sum((1, 3))
            return jnp.swapaxes(v, 1, 2)
        return v.reshape(p.b, p.npb, p.lp, p.g, p.hpg, p.np_).sum((1, 4))

    # -- block specs over the grid (batch, chunk, head, P block)
    def specs(self):
        """``(x-like, per-step vector, B/C, state)`` block specs."""
        p = self.plan
        q, hpg, bp, np_ = p.q, p.hpg, p.bp, p.np_
        st = pl.BlockSpec((SQ, SQ, SQ, bp, np_), lambda i, c, h, j: (i, c, h, j, 0))  # [b, nc, H, P, N]
        if self.tpu:
            return (pl.BlockSpec((SQ, SQ, q, bp), lambda i, c, h, j: (i, h, c, j)),
                    pl.BlockSpec((SQ, SQ, q, 1), lambda i, c, h, j: (i, h, c, 0)),
                    pl.BlockSpec((SQ, SQ, q, np_), lambda i, c, h, j: (i, idiv(h, hpg), c, 0)),
                    st)
        return (pl.BlockSpec((SQ, q, SQ, bp), lambda i, c, h, j: (i, c, h, j)),
                pl.BlockSpec((SQ, SQ, q), lambda i, c, h, j: (i, h, c)),
                pl.BlockSpec((SQ, q, SQ, np_), lambda i, c, h, j: (i, c, idiv(h, hpg), 0)),
                st)

    def row_specs(self):
        q = self.plan.q
        return [pl.BlockSpec((SQ, SQ, SQ, 1, q), lambda i, c, h, j: (i, h, c, 0, 0))] if self.tpu else []

    def seg_specs(self):
        p = self.plan
        if not p.seg:
            return []
        if self.tpu:
            return [pl.BlockSpec((SQ, p.q, 1), lambda i, c, h, j: (i, c, 0)),
                    pl.BlockSpec((SQ, SQ, 1, p.q), lambda i, c, h, j: (i, c, 0, 0))]
        return [pl.BlockSpec((SQ, p.q), lambda i, c, h, j: (i, c))]

    def partial_outputs(self):
        """Backward outputs with one partial sum per P block (summed in JAX): ``(specs,
        shapes)`` for ``d dt`` and ``dAcs`` (vectors), ``dB`` and ``dC`` (per head), and on TPU
        the ``dAcs`` row part."""
        p = self.plan
        b, npb, h, lp, q, np_ = p.b, p.npb, p.h, p.lp, p.q, p.np_
        if self.tpu:
            vec = (pl.BlockSpec((SQ, SQ, SQ, q, 1), lambda i, c, hh, j: (i, j, hh, c, 0)),
                   (b, npb, h, lp, 1))
            bch = (pl.BlockSpec((SQ, SQ, SQ, q, np_), lambda i, c, hh, j: (i, j, hh, c, 0)),
                   (b, npb, h, lp, np_))
            row = (pl.BlockSpec((SQ, SQ, SQ, SQ, 1, q), lambda i, c, hh, j: (i, j, hh, c, 0, 0)),
                   (b, npb, h, p.nc, 1, q))
            parts = [vec, vec, bch, bch, row]
        else:
            vec = (pl.BlockSpec((SQ, SQ, SQ, q), lambda i, c, hh, j: (i, j, hh, c)), (b, npb, h, lp))
            bch = (pl.BlockSpec((SQ, SQ, q, SQ, np_), lambda i, c, hh, j: (i, j, c, hh, 0)),
                   (b, npb, lp, h, np_))
            parts = [vec, vec, bch, bch]
        return [s for s, _ in parts], [jax.ShapeDtypeStruct(shape, f32) for _, shape in parts]

    def seq_shape(self):
        p = self.plan
        return (p.b, p.h, p.lp, p.pp) if self.tpu else (p.b, p.lp, p.h, p.pp)

    def params(self) -> dict:
        p = self.plan
        if self.tpu:  # every program owns its output blocks: all grid axes parallel
            return compiler_params(0, 0, platform="tpu", dimension_semantics=("parallel",) * 4)
        return compiler_params(p.num_warps, p.num_stages)


_VMEM_LOG = None  # a list while tpu_vmem_bytes traces the TPU variant: (name, bytes) per pallas_call


def _tile_bytes(shape, dtype) -> int:
    """VMEM bytes of one block: squeezed dims 1, last two dims padded to the (8, 128) tile
    (16 sublanes for 16-bit dtypes)."""
    shape = [1 if (d is None or not isinstance(d, (int, np.integer))) else int(d) for d in shape]
    shape = [1, 1] + shape
    *lead, r, c = shape
    isz = jnp.dtype(dtype).itemsize
    sub = 8 * max(1, 4 // isz)
    return int(np.prod(lead, dtype=np.int64)) * round_up(r, sub) * round_up(c, 128) * isz


def _pallas(plan, kernel, in_specs, out_specs, out_shape, name, *args):
    lay = _Layout(plan)
    if _VMEM_LOG is not None:
        outs = out_shape if isinstance(out_shape, (list, tuple)) else [out_shape]
        ospecs = out_specs if isinstance(out_specs, (list, tuple)) else [out_specs]
        blocks = [(s.block_shape, a.dtype) for s, a in zip(in_specs, args)]
        blocks += [(s.block_shape, o.dtype) for s, o in zip(ospecs, outs)]
        _VMEM_LOG.append((name, 2 * sum(_tile_bytes(bs, dt) for bs, dt in blocks)))
    return pl.pallas_call(
        functools.partial(kernel, plan=plan), out_shape=out_shape,
        grid=(plan.b, plan.nc, plan.h, plan.npb), in_specs=in_specs, out_specs=out_specs,
        interpret=plan.interpret, name=name, **lay.params())(*args)


def _state_shape(plan):
    return jax.ShapeDtypeStruct((plan.b, plan.nc, plan.h, plan.pp, plan.np_), f32)


def _chunk_cumsum(plan, dt, A):
    """``dt [b, Lp, H]`` f32 -> ``(dt_t [b, H, Lp], acs [b, H, Lp])``."""
    dtt = jnp.transpose(dt, (0, 2, 1))
    a = (dtt * A.astype(f32)[None, :, None]).reshape(plan.b, plan.h, plan.nc, plan.q)
    return dtt, jnp.cumsum(a, axis=-1).reshape(plan.b, plan.h, plan.lp)


def _chunk_decay(plan, acs, seg):
    """``exp(Acs_{Q-1})`` per chunk ``[b, H, nc]``; 0 for chunks where a segment starts."""
    decay = jnp.exp(acs.reshape(plan.b, plan.h, plan.nc, plan.q)[..., -1])
    if seg is not None:
        decay = jnp.where(seg.reshape(plan.b, 1, plan.nc, plan.q)[..., -1] == 0.0, decay, 0.0)
    return decay


def _segments(plan, segment_ids):
    """``[B, L]`` ids -> ``seg [b, Lp]`` float32: segment index counted from each chunk's start."""
    r = jnp.pad(segment_resets(segment_ids).astype(jnp.int32), ((0, 0), (0, plan.lp - plan.l)))
    sidx = jnp.cumsum(r, axis=1).reshape(plan.b, plan.nc, plan.q)
    before = sidx[..., :1] - r.reshape(plan.b, plan.nc, plan.q)[..., :1]  # index before the chunk
    return (sidx - before).reshape(plan.b, plan.lp).astype(f32)


def _pass_states(plan, st, acs, s0, seg):
    """Inter-chunk recurrence (``lax.scan`` over chunks): chunk-start states and final."""
    decay = _chunk_decay(plan, acs, seg)                                         # [b, H, nc]

    def step(s, inp):
        st_c, d_c = inp
        return d_c[:, :, None, None] * s + st_c, s

    final, starts = lax.scan(step, s0, (jnp.moveaxis(st, 1, 0), jnp.moveaxis(decay, 2, 0)))
    return jnp.moveaxis(starts, 0, 1), final, decay


def _core_forward(plan, x, dt, A, B, C, s0, seg):
    """Padded inputs in the public layout -> ``(y [this layout], final, residuals)``."""
    lay = _Layout(plan)
    xs, ts, bc, st = lay.specs()
    ss, sa = lay.seg_specs(), lay.seg_args(seg)
    dtt, acs = _chunk_cumsum(plan, dt, A)
    rs, ra = lay.row_specs(), lay.rows(acs)
    xk, Bk, Ck = lay.seq(x), lay.seq(B), lay.seq(C)
    dtk, acsk = lay.vec(dtt), lay.vec(acs)
    chunk_st = _pallas(plan, _chunk_state_kernel, [xs, ts, ts, bc] + ss + rs, st, _state_shape(plan),
                       "ssd_chunk_state", xk, dtk, acsk, Bk, *sa, *ra)
    starts, final, _ = _pass_states(plan, chunk_st, acs, s0, seg)
    y = _pallas(plan, _chunk_scan_kernel, [xs, ts, ts, bc, bc] + ss + rs + [st], xs,
                jax.ShapeDtypeStruct(lay.seq_shape(), f32),
                "ssd_chunk_scan", xk, dtk, acsk, Bk, Ck, *sa, *ra, starts)
    return y, final, (xk, Bk, Ck, dtt, acs, starts)


def _core_backward(plan, A, seg, xk, Bk, Ck, dtt, acs, starts, dy, dfinal):
    lay = _Layout(plan)
    xs, ts, bc, st = lay.specs()
    ss, sa = lay.seg_specs(), lay.seg_args(seg)
    rs, ra = lay.row_specs(), lay.rows(acs)
    dtk, acsk, dyk = lay.vec(dtt), lay.vec(acs), lay.seq(dy)
    dsy = _pallas(plan, _chunk_state_grad_kernel, [xs, ts, bc] + ss + rs, st, _state_shape(plan),
                  "ssd_chunk_state_grad", dyk, acsk, Ck, *sa, *ra)
    decay = _chunk_decay(plan, acs, seg)

    def rstep(dsn, inp):                     # dsn: grad wrt the state after chunk c
        dsy_c, d_c = inp
        return dsy_c + d_c[:, :, None, None] * dsn, dsn

    ds0, dsn = lax.scan(rstep, dfinal, (jnp.moveaxis(dsy, 1, 0), jnp.moveaxis(decay, 2, 0)),
                        reverse=True)
    dsn = jnp.moveaxis(dsn, 0, 1)            # [b, nc, H, P, N]
    b, lp, h = plan.b, plan.lp, plan.h
    part_specs, part_shapes = lay.partial_outputs()
    outs = _pallas(
        plan, _chunk_bwd_kernel, [xs, ts, ts, bc, bc] + ss + rs + [st, st, xs], [xs] + part_specs,
        [jax.ShapeDtypeStruct(lay.seq_shape(), f32)] + part_shapes, "ssd_chunk_bwd",
        xk, dtk, acsk, Bk, Ck, *sa, *ra, starts, dsn, dyk)
    dx, ddt, dacs, dbh, dch = outs[:5]
    # every P block holds a partial sum over its P slice
    ddt, dacs = lay.from_partial_vec(ddt), lay.from_partial_vec(dacs)
    if plan.tpu:                             # the column sums of E, written as rows
        dacs = dacs + outs[5].sum(1).reshape(b, h, lp)
    # Acs = cumsum(dt * A) within a chunk -> da = reverse cumsum of dAcs.
    dacs = dacs.reshape(b, h, plan.nc, plan.q)
    da = jnp.flip(jnp.cumsum(jnp.flip(dacs, -1), axis=-1), -1).reshape(b, h, lp)
    ddt = ddt + da * A.astype(f32)[None, :, None]
    dA = jnp.sum(da * dtt, axis=(0, 2))
    return (lay.seq(dx), jnp.transpose(ddt, (0, 2, 1)), dA, lay.group_sum(dbh), lay.group_sum(dch),
            ds0)


def _pad_inputs(plan, x, dt, B, C, s0):
    b, lp, h, g = plan.b, plan.lp, plan.h, plan.g
    return (_pad_to(x, (b, lp, h, plan.pp)), _pad_to(dt, (b, lp, h)),
            _pad_to(B, (b, lp, g, plan.np_)), _pad_to(C, (b, lp, g, plan.np_)),
            _pad_to(s0, (b, h, plan.pp, plan.np_)))


def _unpad(plan, y, final):
    y = _Layout(plan).seq(y)
    return y[:, :plan.l, :, :plan.p], final[:, :, :plan.p, :plan.n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd_core(plan, x, dt, A, B, C, s0, seg):
    """``dt`` already processed (float32), ``seg`` from :func:`_segments` or None.
    Returns ``(y_f32, final_state)``."""
    xp, dtp, Bp, Cp, s0p = _pad_inputs(plan, x, dt, B, C, s0)
    y, final, _ = _core_forward(plan, xp, dtp, A, Bp, Cp, s0p, seg)
    return _unpad(plan, y, final)


def _ssd_core_fwd(plan, x, dt, A, B, C, s0, seg):
    xp, dtp, Bp, Cp, s0p = _pad_inputs(plan, x, dt, B, C, s0)
    y, final, (xk, Bk, Ck, dtt, acs, starts) = _core_forward(plan, xp, dtp, A, Bp, Cp, s0p, seg)
    return _unpad(plan, y, final), (xk, dtp, A, Bk, Ck, seg, dtt, acs, starts)


def _ssd_core_bwd(plan, res, cts):
    xk, dtp, A, Bk, Ck, seg, dtt, acs, starts = res
    dy, dfinal = cts
    if not plan.tpu:
        # The backward holds ~4x the forward's tiles: half the P block keeps it in
        # registers (sm_90 compile report: 255 regs + spills at 64, none at 32).
        plan = dataclasses.replace(plan, bp=min(plan.bp, BWD_BLOCK_P))
    b, lp, h = plan.b, plan.lp, plan.h
    dy = _pad_to(dy.astype(f32), (b, lp, h, plan.pp))
    dfinal = _pad_to(dfinal.astype(f32), (b, h, plan.pp, plan.np_))
    dx, ddt, dA, dB, dC, ds0 = _core_backward(plan, A, seg, xk, Bk, Ck, dtt, acs, starts, dy,
                                              dfinal)
    l, p, n = plan.l, plan.p, plan.n
    return (dx[:, :l, :, :p].astype(xk.dtype), ddt[:, :l].astype(dtp.dtype), dA.astype(A.dtype),
            dB[:, :l, :, :n].astype(Bk.dtype), dC[:, :l, :, :n].astype(Ck.dtype),
            ds0[:, :, :p, :n], None)


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


def _ssd_variant(plan, x, dt, A, B, C, s0, segment_ids):
    """One variant (``plan.platform``) of the whole differentiable core: ``(y_f32, final)``."""
    seg = None if segment_ids is None else _segments(plan, segment_ids)
    return _ssd_core(plan, x, dt, A, B, C, s0, seg)


# ----------------------------------------------------------------------------- public API
def _check_sizes(chunk_size, block_p):
    """``(chunk_size, block_p)`` as Python ints (``block_p`` None: 64), powers of two >= 16."""
    return (check_int("chunk_size", chunk_size, minimum=16, pow2=True),
            check_int("block_p", 64 if block_p is None else block_p, minimum=16, pow2=True))


def _mm_dtype(x, B, C):
    half = (jnp.bfloat16, jnp.float16)
    return jnp.dtype(x.dtype).name if x.dtype in half and B.dtype == C.dtype == x.dtype else "float32"


@functools.partial(jax.jit, static_argnames=("dt_softplus", "return_final_state", "chunk_size",
                                             "interpret", "block_p"))
def _ssd_jit(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None,
             segment_ids=None, return_final_state=False, chunk_size=64, interpret=None, block_p=None):
    """Chunked Mamba-2 SSD (Pallas kernels; see the module docstring).

    Per head, with ``dt <- softplus?(dt + dt_bias)`` and ``r_t = 1`` where a packed
    segment starts (``t > 0`` and ``segment_ids[t] != segment_ids[t-1]``)::

        h_{-1} = initial_state (or 0)
        h_t = (1 - r_t) * exp(dt_t * A) * h_{t-1} + dt_t * x_t[:, None] * B_t[None, :]   # [P, N]
        y_t = h_t @ C_t + D * x_t ;  y *= silu(z) if z is given

    Args:
      x: ``[B, L, H, P]``; dt: ``[B, L, H]``; A: ``[H]``, must be negative (``<= 0``; Mamba-2's
        ``A = -exp(A_log)``): a positive entry makes ``exp(dt * A) > 1`` and the state grow
        without bound.  A concrete positive ``A`` raises a ``ValueError``; a traced one (under
        ``jit``) is not checked.
      B, C: ``[B, L, G, N]`` (head ``h`` uses group ``h // (H // G)``).
      D: ``[H]`` or ``[H, P]`` skip; z: like x, ``y *= silu(z)``.
      dt_bias: ``[H]``; dt_softplus: ``dt = softplus(dt + dt_bias)``. Without it ``dt + dt_bias``
        should be ``>= 0``: a negative step makes ``exp(dt * A) > 1`` and the state grow like a
        positive ``A``; it is not checked (the oracle computes the same growth).
      initial_state: ``[B, H, P, N]`` state before step 0 (the layout of
        :func:`ssd_state_update`'s ``state`` and the Mamba-2 decode cache); it only
        reaches the first segment when ``segment_ids`` are given.
      segment_ids: ``[B, L]`` int, packed sequences: the state restarts from zero
        at every ``t`` with ``segment_ids[t] != segment_ids[t-1]``.
      return_final_state: also return the final state ``[B, H, P, N]`` float32.
      chunk_size: power of two >= 16 (shrunk to the padded length for short inputs).
        The TPU variant uses ``max(128, chunk)`` (its chunk tiles are whole lane vregs).
      interpret: Pallas interpret mode; ``None`` = on when the default backend is CPU.
        ``False``: compiled, Triton kernels when lowered for GPU and Mosaic kernels
        when lowered for TPU (chosen at lowering time).  A ``pltpu.InterpretParams()``
        runs the TPU variant in Pallas' TPU interpret mode.
      block_p: P columns per forward program (power of two >= 16, default 64; the
        grid is ``(batch, chunks, H, P / block_p)``); the backward uses
        ``min(block_p, 32)``.  ``chunk_size`` 64 with bf16 inputs is what compiles
        for sm_90 without register spills (``experiments.kernel_report``).  GPU only:
        the TPU variant always uses 128-column P blocks.

    Returns ``y [B, L, H, P]`` (``x.dtype``) or ``(y, final_state)``.  Differentiable
    in x, dt, A, B, C, D, z, dt_bias and initial_state.
    """
    b, l, h, p, g, n = validate(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids)
    dt_softplus = check_flag("dt_softplus", dt_softplus)
    return_final_state = check_flag("return_final_state", return_final_state)
    chunk_size, block_p = _check_sizes(chunk_size, block_p)
    interpret = resolve_interpret(interpret)
    make = functools.partial(_make_plan, b, l, h, p, g, n, chunk_size=chunk_size, block_p=block_p,
                             mm=_mm_dtype(x, B, C), seg=segment_ids is not None,
                             interpret=interpret)
    plan = select_plan(make, interpret)
    dtp = process_dt(dt, dt_bias, dt_softplus)
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    # the platform is picked around the whole custom_vjp: the variants' residuals differ in shape
    # (chunk length, padding)
    y, final = by_platform(plan, _ssd_variant, x, dtp, A, B, C, s0, segment_ids)
    if D is not None:
        y = y + _d_term(D, x.astype(f32))
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    y = y.astype(x.dtype)
    return (y, final) if return_final_state else y


@functools.wraps(_ssd_jit)
def ssd(*args, segment_ids=None, **kwargs):
    # concrete int64 ids would wrap to int32 at the jit boundary (0 and 2**32 merge: a lost
    # segment start); host_int32_ids ranks them in int32, keeping where they change
    ids = None if segment_ids is None else host_int32_ids(segment_ids, segment_ids)[0]
    # a concrete positive A (the jitted body only sees a tracer) is refused here
    check_decay(args[2] if len(args) > 2 else kwargs.get("A"), "[H]")
    # static (hashed) by the jit: checked here, so an array is named, not "non-hashable"
    if "chunk_size" in kwargs or "block_p" in kwargs:
        kwargs["chunk_size"], kwargs["block_p"] = _check_sizes(kwargs.get("chunk_size", 64),
                                                               kwargs.get("block_p"))
    return _ssd_jit(*args, segment_ids=ids, **kwargs)


ssd.__name__ = ssd.__qualname__ = "ssd"


def tpu_vmem_bytes(x_shape, bc_shape, dtype=jnp.float32, *, chunk_size=64,
                   segments=False) -> dict:
    """VMEM the TPU block specs imply per grid step, per kernel: every input and output
    block (last two dims padded to the (8, 128) tile, 16 sublanes for 16-bit dtypes),
    double-buffered by the Pallas pipeline; in-kernel temporaries (the ``[Q, Q]`` decay and
    ``C B^T`` tiles, ~5 of them in the backward) are not counted.

    ``x_shape = (B, L, H, P)``, ``bc_shape = (B, L, G, N)``; ``dtype`` of x/B/C; ``chunk_size`` as
    for :func:`ssd`; ``segments``: a bool, segment_ids given.  Returns
    ``{"ssd_chunk_state": bytes, "ssd_chunk_scan": ..., "ssd_chunk_state_grad": ...,
    "ssd_chunk_bwd": ...}`` (read off the block specs while tracing the TPU variant).
    """
    global _VMEM_LOG
    for name, shp, layout in (("x_shape", x_shape, "(B, L, H, P)"), ("bc_shape", bc_shape, "(B, L, G, N)")):
        if not (isinstance(shp, (tuple, list)) and len(shp) == 4
                and all(is_int(v) and v >= 1 for v in shp)):
            raise ValueError(f"{name} must be 4 positive ints {layout} (Python or numpy integers), "
                             f"got {shp!r}")
    x_shape, bc_shape = tuple(map(int, x_shape)), tuple(map(int, bc_shape))
    b, l, h, p = x_shape
    g, n = bc_shape[2], bc_shape[3]
    if tuple(bc_shape[:2]) != (b, l) or h % g:
        raise ValueError(f"bc_shape must be (B={b}, L={l}, G, N) with G dividing H={h} (x_shape "
                         f"{tuple(x_shape)}), got {tuple(bc_shape)}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype (that of x / B / C), got {dtype!r}")
    chunk_size, _ = _check_sizes(chunk_size, None)
    segments = check_flag("segments", segments)
    S = jax.ShapeDtypeStruct
    x, B = S(tuple(x_shape), dtype), S(tuple(bc_shape), dtype)
    plan = _make_plan(b, l, h, p, g, n, chunk_size=chunk_size, block_p=64,
                      mm=_mm_dtype(x, B, B), seg=segments, interpret=False, platform="tpu")
    args = (x, S((b, l, h), f32), S((h,), f32), B, B, S((b, h, p, n), f32),
            S((b, l), jnp.int32) if segments else None)

    def fwd_bwd(*a):
        out, vjp = jax.vjp(lambda *d: _ssd_variant(plan, *d, a[-1]), *a[:-1])
        return vjp(out)

    log, _VMEM_LOG = _VMEM_LOG, []
    try:
        jax.eval_shape(fwd_bwd, *args)
        found = dict(_VMEM_LOG)
    finally:
        _VMEM_LOG = log
    return found
