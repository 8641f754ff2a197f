"""Mamba-2 state-space duality (SSD), chunked, with Pallas kernels (Triton on GPU).

Semantics: :func:`.reference.reference`.  Per (batch, head) the sequence is cut
into chunks of ``Q = chunk_size`` steps.  Inside chunk ``c`` (``a_t = dt_t A``,
``Acs`` the cumulative sum of ``a`` from the chunk start, ``xdt = dt * x``)::

    Lmat[t, s] = exp(Acs_t - Acs_s)  (s <= t, else 0)      # segment-sum decay mask
    y_c   = (Lmat * (C B^T)) @ xdt  +  exp(Acs)[:, None] * (C @ S_c^T)
    st_c  = (xdt * exp(Acs_{Q-1} - Acs)[:, None])^T @ B          # chunk's own state
    S_{c+1} = exp(Acs_{Q-1}) S_c + st_c                          # state passing

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
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .._common import SQ, compiler_params, next_pow2, resolve_interpret, round_up, segment_resets
from .reference import _d_term, process_dt, validate

f32 = jnp.float32
BWD_BLOCK_P = 32  # P columns per backward program (the forward uses ``block_p``)


@dataclasses.dataclass(frozen=True)
class _Plan:
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
    interpret: bool
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


def _decay(acs_ref, q, seg_ref=None):
    """``(acs [Q], acs_last [1], Lmat [Q, Q])`` (``Lmat`` same-segment masked with ``seg_ref``)."""
    acs = acs_ref[...].astype(f32)
    last = acs_ref[pl.ds(q - 1, 1)].astype(f32)
    row = lax.broadcasted_iota(jnp.int32, (q, q), 0)
    col = lax.broadcasted_iota(jnp.int32, (q, q), 1)
    causal = col <= row
    if seg_ref is not None:
        seg = seg_ref[...]
        causal = causal & (seg[:, None] == seg[None, :])
    diff = jnp.where(causal, acs[:, None] - acs[None, :], 0.0)
    lmat = jnp.where(causal, jnp.exp(diff), 0.0)
    return acs, last, lmat


def _inflow(e, seg_ref):
    """``exp(Acs_t)``, zeroed where a segment started since the chunk start."""
    return e if seg_ref is None else jnp.where(seg_ref[...] == 0.0, e, 0.0)


def _outflow(w, seg_ref, q):
    """``exp(Acs_{Q-1} - Acs_s)``, zeroed unless ``s`` is in the chunk's last segment."""
    if seg_ref is None:
        return w
    return jnp.where(seg_ref[...] == seg_ref[pl.ds(q - 1, 1)], w, 0.0)


def _chunk_state_kernel(*refs, plan):
    x_ref, dt_ref, acs_ref, b_ref = refs[:4]
    seg_ref = refs[4] if plan.seg else None
    st_ref = refs[-1]
    acs = acs_ref[...].astype(f32)
    last = acs_ref[pl.ds(plan.q - 1, 1)].astype(f32)
    w = _outflow(jnp.exp(last - acs), seg_ref, plan.q) * dt_ref[...].astype(f32)   # [Q]
    xw = x_ref[...].astype(f32) * w[:, None]
    st_ref[...] = _dot_tn(xw, b_ref[...], plan.mm)                        # [P, N]


def _chunk_scan_kernel(*refs, plan):
    x_ref, dt_ref, acs_ref, b_ref, c_ref = refs[:5]
    seg_ref = refs[5] if plan.seg else None
    s_ref, y_ref = refs[-2:]
    acs, _, lmat = _decay(acs_ref, plan.q, seg_ref)
    Cm = c_ref[...]
    xdt = x_ref[...].astype(f32) * dt_ref[...].astype(f32)[:, None]
    m = lmat * _dot_nt(Cm, b_ref[...], plan.mm)                           # [Q, Q]
    e = _inflow(jnp.exp(acs), seg_ref)
    y = _dot(m, xdt, plan.mm) + e[:, None] * _dot_nt(Cm, s_ref[...], plan.mm)  # [Q, P]
    y_ref[...] = y.astype(y_ref.dtype)


def _chunk_state_grad_kernel(*refs, plan):
    dy_ref, acs_ref, c_ref = refs[:3]
    seg_ref = refs[3] if plan.seg else None
    ds_ref = refs[-1]
    e = _inflow(jnp.exp(acs_ref[...].astype(f32)), seg_ref)
    ds_ref[...] = _dot_tn(dy_ref[...].astype(f32) * e[:, None], c_ref[...], plan.mm)


def _chunk_bwd_kernel(*refs, plan):
    x_ref, dt_ref, acs_ref, b_ref, c_ref = refs[:5]
    seg_ref = refs[5] if plan.seg else None
    s_ref, dsn_ref, dy_ref, dx_ref, ddt_ref, dacs_ref, db_ref, dc_ref = refs[-8:]
    q = plan.q
    acs, last, lmat = _decay(acs_ref, q, seg_ref)
    X = x_ref[...].astype(f32)
    dt = dt_ref[...].astype(f32)
    Bm = b_ref[...]                               # B, C only feed dots
    Cm = c_ref[...]
    S = s_ref[...]
    dSn = dsn_ref[...]
    dY = dy_ref[...].astype(f32)
    e = _inflow(jnp.exp(acs), seg_ref)
    w = _outflow(jnp.exp(last - acs), seg_ref, q)
    xdt = X * dt[:, None]

    mm = plan.mm
    gmat = _dot_nt(Cm, Bm, mm)                    # C B^T      [Q, Q]
    m = lmat * gmat
    dm = _dot_nt(dY, xdt, mm)                     # dY xdt^T   [Q, Q]
    bds = _dot_nt(Bm, dSn, mm)                    # B dSn^T    [Q, P]
    dxdt = _dot_tn(m, dY, mm) + w[:, None] * bds
    dg = dm * lmat
    cs = _dot_nt(Cm, S, mm)                       # C S^T      [Q, P]
    dc_ref[...] = _dot(dg, Bm, mm) + e[:, None] * _dot(dY, S, mm)
    db_ref[...] = _dot_tn(dg, Cm, mm) + w[:, None] * _dot(xdt, dSn, mm)

    E = dm * m
    dw = jnp.sum(xdt * bds, axis=1) * w
    dacs = jnp.sum(E, axis=1) - jnp.sum(E, axis=0) + e * jnp.sum(dY * cs, axis=1) - dw
    decay = jnp.exp(last)                          # [1]: S_{c+1} = decay * S_c + st_c
    if seg_ref is not None:
        decay = jnp.where(seg_ref[pl.ds(q - 1, 1)] == 0.0, decay, 0.0)
    last_extra = jnp.sum(dw) + decay * jnp.sum(dSn * S)                  # [1]
    is_last = lax.broadcasted_iota(jnp.int32, (q,), 0) == q - 1
    dacs_ref[...] = dacs + jnp.where(is_last, last_extra, 0.0)
    dx_ref[...] = (dxdt * dt[:, None]).astype(dx_ref.dtype)
    ddt_ref[...] = jnp.sum(dxdt * X, axis=1)


# ----------------------------------------------------------------------------- pallas_calls
def _specs(plan: _Plan):
    """Block specs over the grid ``(batch, chunk, head, P block)``."""
    q, hpg, bp, np_ = plan.q, plan.hpg, plan.bp, plan.np_
    xs = pl.BlockSpec((SQ, q, SQ, bp), lambda i, c, h, j: (i, c, h, j))              # [b, Lp, H, P]
    ts = pl.BlockSpec((SQ, SQ, q), lambda i, c, h, j: (i, h, c))                    # [b, H, Lp]
    bc = pl.BlockSpec((SQ, q, SQ, np_), lambda i, c, h, j: (i, c, lax.div(h, hpg), 0))
    st = pl.BlockSpec((SQ, SQ, SQ, bp, np_), lambda i, c, h, j: (i, c, h, j, 0))  # [b, nc, H, P, N]
    return xs, ts, bc, st


def _seg_specs(plan: _Plan):
    """``[seg spec]`` (``seg [b, Lp]``) when segment_ids are given, else ``[]``."""
    return [pl.BlockSpec((SQ, plan.q), lambda i, c, h, j: (i, c))] if plan.seg else []


def _partial_specs(plan: _Plan):
    """Outputs with one partial sum per P block (summed in JAX)."""
    q, np_ = plan.q, plan.np_
    tsp = pl.BlockSpec((SQ, SQ, SQ, q), lambda i, c, h, j: (i, j, h, c))            # [b, nPb, H, Lp]
    bchp = pl.BlockSpec((SQ, SQ, q, SQ, np_), lambda i, c, h, j: (i, j, c, h, 0))   # [b, nPb, Lp, H, N]
    return tsp, bchp


def _pallas(plan, kernel, in_specs, out_specs, out_shape, name, *args):
    return pl.pallas_call(
        functools.partial(kernel, plan=plan), out_shape=out_shape,
        grid=(plan.b, plan.nc, plan.h, plan.npb), in_specs=in_specs, out_specs=out_specs,
        interpret=plan.interpret, name=name,
        **compiler_params(plan.num_warps, plan.num_stages))(*args)


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
    xs, ts, bc, st = _specs(plan)
    ss, sa = _seg_specs(plan), [seg] if plan.seg else []
    dtt, acs = _chunk_cumsum(plan, dt, A)
    chunk_st = _pallas(plan, _chunk_state_kernel, [xs, ts, ts, bc] + ss, st, _state_shape(plan),
                       "ssd_chunk_state", x, dtt, acs, B, *sa)
    starts, final, _ = _pass_states(plan, chunk_st, acs, s0, seg)
    y = _pallas(plan, _chunk_scan_kernel, [xs, ts, ts, bc, bc] + ss + [st], xs,
                jax.ShapeDtypeStruct((plan.b, plan.lp, plan.h, plan.pp), f32),
                "ssd_chunk_scan", x, dtt, acs, B, C, *sa, starts)
    return y, final, (dtt, acs, starts)


def _core_backward(plan, x, dt, A, B, C, seg, dtt, acs, starts, dy, dfinal):
    xs, ts, bc, st = _specs(plan)
    ss, sa = _seg_specs(plan), [seg] if plan.seg else []
    tsp, bchp = _partial_specs(plan)
    dsy = _pallas(plan, _chunk_state_grad_kernel, [xs, ts, bc] + ss, st, _state_shape(plan),
                  "ssd_chunk_state_grad", dy, acs, C, *sa)
    decay = _chunk_decay(plan, acs, seg)

    def rstep(dsn, inp):                     # dsn: grad wrt the state after chunk c
        dsy_c, d_c = inp
        return dsy_c + d_c[:, :, None, None] * dsn, dsn

    ds0, dsn = lax.scan(rstep, dfinal, (jnp.moveaxis(dsy, 1, 0), jnp.moveaxis(decay, 2, 0)),
                        reverse=True)
    dsn = jnp.moveaxis(dsn, 0, 1)            # [b, nc, H, P, N]
    b, lp, h = plan.b, plan.lp, plan.h
    npb = plan.npb
    out_shape = [jax.ShapeDtypeStruct((b, lp, h, plan.pp), f32),
                 jax.ShapeDtypeStruct((b, npb, h, lp), f32),
                 jax.ShapeDtypeStruct((b, npb, h, lp), f32),
                 jax.ShapeDtypeStruct((b, npb, lp, h, plan.np_), f32),
                 jax.ShapeDtypeStruct((b, npb, lp, h, plan.np_), f32)]
    dx, ddt, dacs, dbh, dch = _pallas(
        plan, _chunk_bwd_kernel, [xs, ts, ts, bc, bc] + ss + [st, st, xs], [xs, tsp, tsp, bchp, bchp],
        out_shape, "ssd_chunk_bwd", x, dtt, acs, B, C, *sa, starts, dsn, dy)
    ddt, dacs = ddt.sum(1), dacs.sum(1)     # every P block holds a partial sum over its P slice
    # Acs = cumsum(dt * A) within a chunk -> da = reverse cumsum of dAcs.
    dacs = dacs.reshape(b, h, plan.nc, plan.q)
    da = jnp.flip(jnp.cumsum(jnp.flip(dacs, -1), axis=-1), -1).reshape(b, h, lp)
    ddt = ddt + da * A.astype(f32)[None, :, None]
    dA = jnp.sum(da * dtt, axis=(0, 2))

    def group_sum(v):                        # [b, nPb, Lp, H, N] -> [b, Lp, G, N]
        return v.reshape(b, npb, lp, plan.g, plan.hpg, plan.np_).sum((1, 4))

    return dx, jnp.transpose(ddt, (0, 2, 1)), dA, group_sum(dbh), group_sum(dch), ds0


def _pad_inputs(plan, x, dt, B, C, s0):
    b, lp, h, g = plan.b, plan.lp, plan.h, plan.g
    return (_pad_to(x, (b, lp, h, plan.pp)), _pad_to(dt, (b, lp, h)),
            _pad_to(B, (b, lp, g, plan.np_)), _pad_to(C, (b, lp, g, plan.np_)),
            _pad_to(s0, (b, h, plan.pp, plan.np_)))


def _unpad(plan, y, final):
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
    y, final, (dtt, acs, starts) = _core_forward(plan, xp, dtp, A, Bp, Cp, s0p, seg)
    return _unpad(plan, y, final), (xp, dtp, A, Bp, Cp, seg, dtt, acs, starts)


def _ssd_core_bwd(plan, res, cts):
    xp, dtp, A, Bp, Cp, seg, dtt, acs, starts = res
    dy, dfinal = cts
    # The backward holds ~4x the forward's tiles: half the P block keeps it in
    # registers (sm_90 compile report: 255 regs + spills at 64, none at 32).
    plan = dataclasses.replace(plan, bp=min(plan.bp, BWD_BLOCK_P))
    b, lp, h = plan.b, plan.lp, plan.h
    dy = _pad_to(dy.astype(f32), (b, lp, h, plan.pp))
    dfinal = _pad_to(dfinal.astype(f32), (b, h, plan.pp, plan.np_))
    dx, ddt, dA, dB, dC, ds0 = _core_backward(plan, xp, dtp, A, Bp, Cp, seg, dtt, acs, starts, dy,
                                              dfinal)
    l, p, n = plan.l, plan.p, plan.n
    return (dx[:, :l, :, :p].astype(xp.dtype), ddt[:, :l].astype(dtp.dtype), dA.astype(A.dtype),
            dB[:, :l, :, :n].astype(Bp.dtype), dC[:, :l, :, :n].astype(Cp.dtype),
            ds0[:, :, :p, :n], None)


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


# ----------------------------------------------------------------------------- public API
@functools.partial(jax.jit, static_argnames=("dt_softplus", "return_final_state", "chunk_size",
                                             "interpret", "block_p"))
def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None,
        segment_ids=None, return_final_state=False, chunk_size=64, interpret=None, block_p=None):
    """Chunked Mamba-2 SSD (Pallas kernels; see the module docstring).

    Per head, with ``dt <- softplus?(dt + dt_bias)`` and ``r_t = 1`` where a packed
    segment starts (``t > 0`` and ``segment_ids[t] != segment_ids[t-1]``)::

        h_{-1} = initial_state (or 0)
        h_t = (1 - r_t) * exp(dt_t * A) * h_{t-1} + dt_t * x_t[:, None] * B_t[None, :]   # [P, N]
        y_t = h_t @ C_t + D * x_t ;  y *= silu(z) if z is given

    Args:
      x: ``[B, L, H, P]``; dt: ``[B, L, H]``; A: ``[H]`` (negative).
      B, C: ``[B, L, G, N]`` (head ``h`` uses group ``h // (H // G)``).
      D: ``[H]`` or ``[H, P]`` skip; z: like x, ``y *= silu(z)``.
      dt_bias: ``[H]``; dt_softplus: ``dt = softplus(dt + dt_bias)``.
      initial_state: ``[B, H, P, N]`` state before step 0 (the layout of
        :func:`ssd_state_update`'s ``state`` and the Mamba-2 decode cache); it only
        reaches the first segment when ``segment_ids`` are given.
      segment_ids: ``[B, L]`` int, packed sequences: the state restarts from zero
        at every ``t`` with ``segment_ids[t] != segment_ids[t-1]``.
      return_final_state: also return the final state ``[B, H, P, N]`` float32.
      chunk_size: power of two >= 16 (shrunk to the padded length for short inputs).
      interpret: Pallas interpret mode; ``None`` = on when the default backend is CPU.
      block_p: P columns per forward program (power of two >= 16, default 64; the
        grid is ``(batch, chunks, H, P / block_p)``); the backward uses
        ``min(block_p, 32)``.  ``chunk_size`` 64 with bf16 inputs is what compiles
        for sm_90 without register spills (``experiments.kernel_report``).

    Returns ``y [B, L, H, P]`` (``x.dtype``) or ``(y, final_state)``.  Differentiable
    in x, dt, A, B, C, D, z, dt_bias and initial_state.
    """
    b, l, h, p, g, n = validate(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids)
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16
            or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size!r}")
    if block_p is None:
        block_p = 64
    if isinstance(block_p, bool) or not isinstance(block_p, int) or block_p < 16 or block_p & (block_p - 1):
        raise ValueError(f"block_p must be a power of two >= 16, got {block_p!r}")
    q = min(chunk_size, max(16, next_pow2(l)))
    pp = max(16, next_pow2(p))
    bp = min(block_p, pp)
    np_ = max(16, next_pow2(n))
    half = (jnp.bfloat16, jnp.float16)
    mm = jnp.dtype(x.dtype).name if x.dtype in half and B.dtype == C.dtype == x.dtype else "float32"
    plan = _Plan(b=b, l=l, lp=round_up(l, q), q=q, h=h, g=g, p=p, pp=pp, n=n, np_=np_, bp=bp,
                 interpret=resolve_interpret(interpret),
                 num_warps=4 if q * max(bp, np_) <= 64 * 64 else 8, mm=mm,
                 seg=segment_ids is not None)
    dtp = process_dt(dt, dt_bias, dt_softplus)
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    seg = None if segment_ids is None else _segments(plan, segment_ids)
    y, final = _ssd_core(plan, x, dtp, A, B, C, s0, seg)
    if D is not None:
        y = y + _d_term(D, x.astype(f32))
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    y = y.astype(x.dtype)
    return (y, final) if return_final_state else y
