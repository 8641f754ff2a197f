"""Mamba-1 selective scan as Pallas kernels (Triton lowering on GPU).

Semantics: :func:`.reference.reference` (mamba_ssm ``selective_scan_ref``,
length-major ``[B, L, D]``), including ``initial_state`` and packed sequences
(``segment_ids``: the state restarts from zero where a segment starts).  Per batch
and channel block the state ``h [block_d, N]`` lives in registers (float32) and
time is a sequential loop inside the kernel.

Channels are padded per B/C group to a multiple of ``block_d`` (so a block
never straddles two groups and reads one group's B/C rows), ``N`` is padded to a
power of two (zero A/B/C: padded states stay 0) and ``L`` to a multiple of
``chunk`` (padded steps get ``dt = 0``: the identity).

Forward, time-parallel (grid ``(batch, dim // block_d, L / chunk)``): the
recurrence is linear in ``h``, so each chunk first runs from ``h = 0`` (its own
state and summed ``dt``, whose decay is ``exp(A sum dt)``), an associative scan
over chunks in JAX turns those into every chunk's true start state
``states [batch, n_chunks, dim, N]`` float32 (never the ``[L, dim, N]`` states),
and each chunk reruns from its start state to write ``y``.  ``initial_state``
is the start state of the first chunk: chunk ``c`` starts from the scanned
state plus ``prod_{c' < c} decay_c' * initial_state``.  A sequential loop
over all of ``L`` in one program per (batch, channel block) would leave an H100
with a few warps per SM and every step's load latency exposed (no ``cp.async``
pipelining of these loads: ``experiments.kernel_report``).

Backward: one program per (batch, channel block), chunks in reverse, consuming
the forward's chunk-start states.

Backward kernel (``a_t = exp(dt_t A)``, ``x_t = dt_t u_t B_t``,
``c_t = C_t * dout_t`` with ``dout = dy * silu(z)``, adjoint
``g_t = dL/dh_t = c_t + a_{t+1} g_{t+1}``): chunks are visited in reverse; for
each chunk

1. a forward loop recomputes ``h_t`` from the stored chunk-start state and
   emits what needs only ``h``: ``dC_t = sum_d dout_t h_t``, ``dz_t`` (from the
   recomputed pre-gate output) and the running ``ChP_t = sum_{s<t} c_s*h_s``;
2. a reverse loop runs the adjoint ``g`` and emits ``du``, ``dB`` and the rest.

``dA`` and the decay part of ``d dt`` need ``S_t = g_t * a_t * h_{t-1}`` —
``h`` in forward order, ``g`` in reverse.  From ``S_{t+1} = S_t + g_t x_t -
c_t h_t`` (both sides equal ``g_t h_t - c_t h_t``) we get, inside a chunk ending
at ``t1``: ``S_t = S_{t1} + ChTot - ChP_t - GxS_t`` with ``S_{t1} =
(a_{t1} g_{t1}) * h_{t1-1}`` (both known at the chunk end), ``ChTot`` the chunk
total of ``c*h`` (loop 1) and ``GxS_t = sum_{t<=s<t1} g_s x_s`` (loop 2).  So
``dA = sum_t dt_t S_t`` is assembled from per-chunk register sums, and
``d dt_t = sum_n A S_t + u_t sum_n g_t B_t`` is written as two partial arrays
(``-sum_n A ChP_t`` by loop 1, the rest by loop 2) that JAX adds.  Sums only
span one chunk, so the cancellation is bounded by the chunk length.  The adjoint
left after the first step, ``a_0 g_0``, is the gradient of ``initial_state``.

Packed sequences (``segment_ids``; a static branch, nothing changes without
them): a float32 flag ``keep_t`` (0 where a segment starts, else 1) multiplies
the step decay, ``a'_t = keep_t exp(dt_t A)``, in every sequential loop (chunk
states, outputs, the backward's recompute of ``h`` and its adjoint ``g``).  A
chunk containing a start has total decay 0 in the scan over chunks.  The
backward identities above hold verbatim for ``a'`` (they only use ``h_t = a'_t
h_{t-1} + x_t`` and ``g_t = c_t + a'_{t+1} g_{t+1}``); the ``dA`` / ``d dt``
decay terms are additionally weighted by ``keep_t`` so that they are exactly 0
at segment starts, where ``a'_t`` does not depend on ``dt_t`` or ``A``.

Plain-JAX epilogue: summing the per-block partial ``dB``/``dC`` over channel
blocks of a group, ``dA``/``dD`` over batch, the softplus chain rule for
``dt`` and ``dt_bias``, unpadding and dtype casts.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .._common import SQ, compiler_params, next_pow2, resolve_interpret, round_up, segment_resets
from .reference import validate

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one call (hashable)."""

    b: int
    l: int          # true length
    lp: int         # padded length (n_chunks * chunk)
    chunk: int
    dim: int
    g: int          # groups (1 when B/C have no group axis)
    dg: int         # channels per group
    dgp: int        # channels per group, padded to a multiple of bd
    bd: int         # block_d
    n: int
    np_: int        # N padded to a power of two
    softplus: bool
    has_z: bool
    interpret: bool
    num_warps: int
    num_warps_bwd: int
    num_stages: int = 1
    has_h0: bool = False    # initial_state given
    has_seg: bool = False   # segment_ids given (keep flags are an input)

    @property
    def nc(self):
        return self.lp // self.chunk

    @property
    def dimp(self):
        return self.g * self.dgp

    @property
    def nblk(self):
        return self.dimp // self.bd

    @property
    def bpg(self):  # blocks per group
        return self.dgp // self.bd


# ----------------------------------------------------------------------------- padding
def _pad_chan(x, plan: _Plan, axis: int):
    """Pad a channel axis ``dim -> G * dgp`` (per group)."""
    if plan.dgp == plan.dg:
        return x
    axis = axis % x.ndim
    shp = x.shape
    x = x.reshape(shp[:axis] + (plan.g, plan.dg) + shp[axis + 1:])
    pad = [(0, 0)] * x.ndim
    pad[axis + 1] = (0, plan.dgp - plan.dg)
    x = jnp.pad(x, pad)
    return x.reshape(shp[:axis] + (plan.dimp,) + shp[axis + 1:])


def _unpad_chan(x, plan: _Plan, axis: int):
    if plan.dgp == plan.dg:
        return x
    axis = axis % x.ndim
    shp = x.shape
    x = x.reshape(shp[:axis] + (plan.g, plan.dgp) + shp[axis + 1:])
    x = lax.slice_in_dim(x, 0, plan.dg, axis=axis + 1)
    return x.reshape(shp[:axis] + (plan.dim,) + shp[axis + 1:])


def _pad_axis(x, axis, size):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _prep_seq(x, plan):            # [b, L, dim] -> [b, lp, dimp]
    return _pad_axis(_pad_chan(x, plan, -1), 1, plan.lp)


def _prep_bc(x, plan):             # [b, L, G, N] -> [b, lp, G, np]
    return _pad_axis(_pad_axis(x, 1, plan.lp), 3, plan.np_)


# ----------------------------------------------------------------------------- kernels
def _silu_parts(z):
    s = jax.nn.sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s))       # silu, silu'


def _load_dt(dt_ref, bias, t, plan: _Plan, t0=0):
    """dt of row ``t`` of the block (absolute step ``t0 + t``)."""
    dt = dt_ref[t, :].astype(f32) + bias
    if plan.softplus:
        dt = jnp.where(dt > 20.0, dt, jnp.log1p(jnp.exp(jnp.minimum(dt, 20.0))))
    if plan.lp != plan.l:
        dt = jnp.where(t0 + t < plan.l, dt, 0.0)  # padded steps are the identity
    return dt


def _decay(dt, A, keep_ref, t):
    """``a'_t = keep_t * exp(dt_t A)`` ``[bd, np]`` (``keep_ref=None``: no segments)."""
    a = jnp.exp(dt[:, None] * A)
    if keep_ref is None:
        return a
    return a * keep_ref[pl.ds(t, 1)][:, None]


def _fwd_chunk_kernel(*refs, plan: _Plan, emit_y: bool):
    """One (batch, channel block, time chunk) program.

    ``emit_y=False`` (pass 1): run the chunk from ``h = 0``; write the chunk's own
    state ``h_local [bd, np]`` and ``sum(dt) [bd]`` (its decay is ``exp(A sum(dt))``).
    ``emit_y=True`` (pass 3): run it from the true chunk-start state; write ``y``.
    """
    it = iter(refs)
    u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, bias_ref = (next(it) for _ in range(7))
    z_ref = next(it) if plan.has_z else None
    keep_ref = next(it) if plan.has_seg else None
    if emit_y:
        h0_ref, y_ref = next(it), next(it)
    else:
        hloc_ref, sdt_ref = next(it), next(it)
    t0 = pl.program_id(2) * plan.chunk

    A = a_ref[...].astype(f32)                    # [bd, np]
    Dv = d_ref[...].astype(f32)                   # [bd]
    bias = bias_ref[...].astype(f32)

    def step(t, carry):
        h, sdt = carry
        dt = _load_dt(dt_ref, bias, t, plan, t0)
        u = u_ref[t, :].astype(f32)
        Bt = b_ref[t, :].astype(f32)
        h = _decay(dt, A, keep_ref, t) * h + (dt * u)[:, None] * Bt[None, :]
        if emit_y:
            Ct = c_ref[t, :].astype(f32)
            y = jnp.sum(h * Ct[None, :], axis=1) + Dv * u
            if plan.has_z:
                y = y * _silu_parts(z_ref[t, :].astype(f32))[0]
            y_ref[t, :] = y.astype(y_ref.dtype)
            return h, sdt
        return h, sdt + dt

    h0 = h0_ref[...] if emit_y else jnp.zeros(A.shape, f32)
    h, sdt = lax.fori_loop(0, plan.chunk, step, (h0, jnp.zeros(Dv.shape, f32)))
    if not emit_y:
        hloc_ref[...] = h
        sdt_ref[...] = sdt


def _bwd_kernel(*refs, plan: _Plan):
    it = iter(refs)
    u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, bias_ref = (next(it) for _ in range(7))
    z_ref = next(it) if plan.has_z else None
    keep_ref = next(it) if plan.has_seg else None
    dy_ref, st_ref, dlast_ref = next(it), next(it), next(it)
    du_ref, ddth_ref, ddtg_ref, db_ref, dc_ref, da_ref, dd_ref = (next(it) for _ in range(7))
    dz_ref = next(it) if plan.has_z else None
    dh0_ref = next(it) if plan.has_h0 else None

    A = a_ref[...].astype(f32)
    Dv = d_ref[...].astype(f32)
    bias = bias_ref[...].astype(f32)
    zeros = jnp.zeros(A.shape, f32)
    zrow = jnp.zeros(Dv.shape, f32)
    T = plan.chunk

    def keep_of(t, dt):
        """``(keep_t [1] or None, keep_t * dt_t)``: decay terms vanish at segment starts."""
        if keep_ref is None:
            return None, dt
        k = keep_ref[pl.ds(t, 1)]
        return k, dt * k

    def dout_of(t):
        dy = dy_ref[t, :].astype(f32)
        if not plan.has_z:
            return dy, dy, None, None
        silu, dsilu = _silu_parts(z_ref[t, :].astype(f32))
        return dy * silu, dy, silu, dsilu

    def chunk_body(cr, carry):
        gnext, dA, dD = carry
        c = plan.nc - 1 - cr
        t0 = c * T

        # -- loop 1: recompute h forward; everything that needs h (not g).
        def fstep(t, car):
            h, chp, sdt, sdt_chp = car
            dt = _load_dt(dt_ref, bias, t, plan)
            u = u_ref[t, :].astype(f32)
            Bt = b_ref[t, :].astype(f32)
            Ct = c_ref[t, :].astype(f32)
            h = _decay(dt, A, keep_ref, t) * h + (dt * u)[:, None] * Bt[None, :]
            dout, dy, silu, dsilu = dout_of(t)
            if plan.has_z:
                ypre = jnp.sum(h * Ct[None, :], axis=1) + Dv * u
                dz_ref[t, :] = (dy * ypre * dsilu).astype(dz_ref.dtype)
            k, dtk = keep_of(t, dt)
            ddth = -jnp.sum(A * chp, axis=1)
            ddth_ref[t, :] = ddth if k is None else ddth * k
            sdt_chp = sdt_chp + dtk[:, None] * chp
            sdt = sdt + dtk
            dc_ref[t, :] = jnp.sum(dout[:, None] * h, axis=0)
            chp = chp + (dout[:, None] * Ct[None, :]) * h
            return h, chp, sdt, sdt_chp

        h_end, ch_tot, sdt, sdt_chp = lax.fori_loop(
            t0, t0 + T, fstep, (st_ref[c], zeros, zrow, zeros))
        base = gnext * h_end + ch_tot              # S_{t1} + ChTot

        # -- loop 2: adjoint g backwards through the chunk.
        def bstep(k, car):
            gnext, gxs, sdt_gxs, dD = car
            t = t0 + T - 1 - k
            dt = _load_dt(dt_ref, bias, t, plan)
            u = u_ref[t, :].astype(f32)
            Bt = b_ref[t, :].astype(f32)
            Ct = c_ref[t, :].astype(f32)
            dout = dout_of(t)[0]
            g = dout[:, None] * Ct[None, :] + gnext
            dtu = dt * u
            gxs = gxs + g * (dtu[:, None] * Bt[None, :])
            gB = jnp.sum(g * Bt[None, :], axis=1)
            k, dtk = keep_of(t, dt)
            ddt_decay = jnp.sum(A * (base - gxs), axis=1)
            ddtg_ref[t, :] = (ddt_decay if k is None else ddt_decay * k) + u * gB
            sdt_gxs = sdt_gxs + dtk[:, None] * gxs
            du_ref[t, :] = (dt * gB + Dv * dout).astype(du_ref.dtype)
            db_ref[t, :] = jnp.sum(g * dtu[:, None], axis=0)
            dD = dD + dout * u
            return _decay(dt, A, keep_ref, t) * g, gxs, sdt_gxs, dD

        gnext, _, sdt_gxs, dD = lax.fori_loop(0, T, bstep, (gnext, zeros, zeros, dD))
        dA = dA + base * sdt[:, None] - sdt_gxs - sdt_chp
        return gnext, dA, dD

    dh0, dA, dD = lax.fori_loop(0, plan.nc, chunk_body,
                                (dlast_ref[...].astype(f32), zeros, zrow))
    da_ref[...] = dA
    dd_ref[...] = dD
    if dh0_ref is not None:
        dh0_ref[...] = dh0           # a'_0 g_0 = dL / d initial_state


# ----------------------------------------------------------------------------- specs
def _in_specs(plan: _Plan):
    bpg = plan.bpg
    seq = pl.BlockSpec((SQ, plan.lp, plan.bd), lambda i, j: (i, 0, j))
    bc = pl.BlockSpec((SQ, plan.lp, SQ, plan.np_), lambda i, j: (i, 0, lax.div(j, bpg), 0))
    mat = pl.BlockSpec((plan.bd, plan.np_), lambda i, j: (j, 0))
    vec = pl.BlockSpec((plan.bd,), lambda i, j: (j,))
    specs = [seq, seq, mat, bc, bc, vec, vec]
    if plan.has_z:
        specs.append(seq)
    if plan.has_seg:
        specs.append(pl.BlockSpec((SQ, plan.lp), lambda i, j: (i, 0)))
    return specs, seq


def _chunk_specs(plan: _Plan):
    """Input specs over the forward grid ``(batch, channel block, time chunk)``."""
    bpg, q = plan.bpg, plan.chunk
    seq = pl.BlockSpec((SQ, q, plan.bd), lambda i, j, c: (i, c, j))
    bc = pl.BlockSpec((SQ, q, SQ, plan.np_), lambda i, j, c: (i, c, lax.div(j, bpg), 0))
    mat = pl.BlockSpec((plan.bd, plan.np_), lambda i, j, c: (j, 0))
    vec = pl.BlockSpec((plan.bd,), lambda i, j, c: (j,))
    specs = [seq, seq, mat, bc, bc, vec, vec]
    if plan.has_z:
        specs.append(seq)
    if plan.has_seg:
        specs.append(pl.BlockSpec((SQ, q), lambda i, j, c: (i, c)))
    state = pl.BlockSpec((SQ, SQ, plan.bd, plan.np_), lambda i, j, c: (i, c, j, 0))
    return specs, seq, state


def _forward(plan: _Plan, x, dt, A, B, C, D, z, bias, h0, keep):
    """Padded inputs -> ``(y [b, lp, dimp], last [b, dimp, np], starts [b, nc, dimp, np])``.

    Time-parallel in three passes (the recurrence is linear in ``h``):
    1. Pallas, one program per (batch, channel block, chunk): each chunk's own
       final state from ``h = 0`` and its summed ``dt``;
    2. JAX: ``starts[c+1] = decay_c * starts[c] + h_local[c]`` with ``starts[0] =
       h0`` (``decay_c = exp(A * sum dt_c)``, 0 if a segment starts in chunk
       ``c``) as an associative scan over chunks (``nc`` elements, log depth);
    3. Pallas, same grid: rerun each chunk from its true start state and write y.
    ``starts`` are also the backward's chunk-start states.
    """
    specs, seq, state = _chunk_specs(plan)
    b, nc, dimp, np_ = plan.b, plan.nc, plan.dimp, plan.np_
    grid = (b, plan.nblk, nc)
    args = [x, dt, A, B, C, D, bias] + ([z] if plan.has_z else []) + ([keep] if plan.has_seg else [])
    hloc, sdt = pl.pallas_call(
        functools.partial(_fwd_chunk_kernel, plan=plan, emit_y=False),
        out_shape=[jax.ShapeDtypeStruct((b, nc, dimp, np_), f32),
                   jax.ShapeDtypeStruct((b, nc, dimp), f32)],
        grid=grid, in_specs=specs,
        out_specs=[state, pl.BlockSpec((SQ, SQ, plan.bd), lambda i, j, c: (i, c, j))],
        interpret=plan.interpret, name="selective_scan_chunk_states",
        **compiler_params(plan.num_warps, plan.num_stages),
    )(*args)
    decay = jnp.exp(sdt[..., None] * A.astype(f32))                     # [b, nc, dimp, np]
    if plan.has_seg:  # a segment start inside chunk c cuts the state flowing through it
        chunk_keep = jnp.prod(keep.reshape(b, nc, plan.chunk), axis=-1)  # [b, nc] of 0/1
        decay = decay * chunk_keep[:, :, None, None]

    def combine(x, y):  # (decay, state) pairs: apply x then y
        return x[0] * y[0], y[0] * x[1] + y[1]

    cum, after = lax.associative_scan(combine, (decay, hloc), axis=1)   # state after chunk c
    if plan.has_h0:  # + what is left of the initial state after chunks 0..c
        after = after + cum * h0[:, None]
        first = h0[:, None]
    else:
        first = jnp.zeros_like(after[:, :1])
    starts = jnp.concatenate([first, after[:, :-1]], axis=1)
    y = pl.pallas_call(
        functools.partial(_fwd_chunk_kernel, plan=plan, emit_y=True),
        out_shape=jax.ShapeDtypeStruct((b, plan.lp, dimp), x.dtype),
        grid=grid, in_specs=specs + [state], out_specs=seq,
        interpret=plan.interpret, name="selective_scan_fwd",
        **compiler_params(plan.num_warps, plan.num_stages),
    )(*args, starts)
    return y, after[:, -1], starts


def _backward_call(plan: _Plan, x, dt, A, B, C, D, z, bias, keep, dy, states, dlast):
    specs, seq = _in_specs(plan)
    specs = specs + [seq,
                     pl.BlockSpec((SQ, plan.nc, plan.bd, plan.np_), lambda i, j: (i, 0, j, 0)),
                     pl.BlockSpec((SQ, plan.bd, plan.np_), lambda i, j: (i, j, 0))]
    part = pl.BlockSpec((SQ, SQ, plan.lp, plan.np_), lambda i, j: (i, j, 0, 0))
    state = pl.BlockSpec((SQ, plan.bd, plan.np_), lambda i, j: (i, j, 0))
    b, lp, dimp, np_ = plan.b, plan.lp, plan.dimp, plan.np_
    out_shape = [jax.ShapeDtypeStruct((b, lp, dimp), x.dtype),            # dx
                 jax.ShapeDtypeStruct((b, lp, dimp), f32),                # ddt (h part)
                 jax.ShapeDtypeStruct((b, lp, dimp), f32),                # ddt (g part)
                 jax.ShapeDtypeStruct((b, plan.nblk, lp, np_), f32),      # dB per block
                 jax.ShapeDtypeStruct((b, plan.nblk, lp, np_), f32),      # dC per block
                 jax.ShapeDtypeStruct((b, dimp, np_), f32),               # dA per batch
                 jax.ShapeDtypeStruct((b, dimp), f32)]                    # dD per batch
    out_specs = [seq, seq, seq, part, part, state,
                 pl.BlockSpec((SQ, plan.bd), lambda i, j: (i, j))]
    if plan.has_z:
        out_shape.append(jax.ShapeDtypeStruct((b, lp, dimp), z.dtype))
        out_specs.append(seq)
    if plan.has_h0:
        out_shape.append(jax.ShapeDtypeStruct((b, dimp, np_), f32))      # d initial_state
        out_specs.append(state)
    args = ([x, dt, A, B, C, D, bias] + ([z] if plan.has_z else [])
            + ([keep] if plan.has_seg else []) + [dy, states, dlast])
    return pl.pallas_call(
        functools.partial(_bwd_kernel, plan=plan),
        out_shape=out_shape,
        grid=(plan.b, plan.nblk),
        in_specs=specs,
        out_specs=out_specs,
        interpret=plan.interpret,
        name="selective_scan_bwd",
        **compiler_params(plan.num_warps_bwd, plan.num_stages),
    )(*args)


# ----------------------------------------------------------------------------- custom vjp
def _pad_state(h, plan):          # [b, dim, N] -> [b, dimp, np]
    return _pad_axis(_pad_chan(h, plan, 1), 2, plan.np_)


def _pad_all(plan, x, dt, A, B, C, D, z, bias, h0, keep):
    return (_prep_seq(x, plan), _prep_seq(dt, plan),
            _pad_axis(_pad_chan(A, plan, 0), 1, plan.np_),
            _prep_bc(B, plan), _prep_bc(C, plan),
            _pad_chan(D, plan, 0), None if z is None else _prep_seq(z, plan),
            _pad_chan(bias, plan, 0),
            None if h0 is None else _pad_state(h0, plan),
            # padded steps (dt = 0) keep the state: the identity
            None if keep is None else jnp.pad(keep, ((0, 0), (0, plan.lp - plan.l)),
                                              constant_values=1.0))


def _unpad_out(plan, y, last):
    y = _unpad_chan(y[:, :plan.l], plan, -1)
    last = _unpad_chan(last[:, :, :plan.n], plan, 1)
    return y, last


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(plan, x, dt, A, B, C, D, z, bias, h0, keep):
    y, last, _ = _forward(plan, *_pad_all(plan, x, dt, A, B, C, D, z, bias, h0, keep))
    return _unpad_out(plan, y, last)


def _scan_fwd(plan, x, dt, A, B, C, D, z, bias, h0, keep):
    padded = _pad_all(plan, x, dt, A, B, C, D, z, bias, h0, keep)
    y, last, states = _forward(plan, *padded)
    return _unpad_out(plan, y, last), (padded, states)


def _scan_bwd(plan, res, cts):
    padded, states = res
    x, dt, A, B, C, D, z, bias, _, keep = padded
    dy, dlast = cts
    dy = _prep_seq(dy, plan)
    dlast = _pad_state(dlast.astype(f32), plan)
    outs = _backward_call(plan, x, dt, A, B, C, D, z, bias, keep, dy, states, dlast)
    dx, ddth, ddtg, dBp, dCp, dAp, dDp = outs[:7]
    rest = iter(outs[7:])
    dz = next(rest) if plan.has_z else None
    dh0 = next(rest) if plan.has_h0 else None
    sl = lambda v: _unpad_chan(v[:, :plan.l], plan, -1)  # noqa: E731
    ddt = sl(ddth + ddtg)
    if plan.softplus:
        pre = sl(dt).astype(f32) + _unpad_chan(bias, plan, 0).astype(f32)
        ddt = ddt * jax.nn.sigmoid(pre)
    dbias = jnp.sum(ddt, axis=(0, 1))

    def group_sum(v):             # [b, nblk, lp, np] -> [b, L, G, N]
        v = v.reshape(plan.b, plan.g, plan.bpg, plan.lp, plan.np_).sum(2)
        return jnp.transpose(v, (0, 2, 1, 3))[:, :plan.l, :, :plan.n]

    dA = _unpad_chan(jnp.sum(dAp, 0)[:, :plan.n], plan, 0)
    dD = _unpad_chan(jnp.sum(dDp, 0), plan, 0)
    if dh0 is not None:
        dh0 = _unpad_chan(dh0[:, :, :plan.n], plan, 1)
    tx, tdt, tA, tB, tC, tD, tbias = (v.dtype for v in (x, dt, A, B, C, D, bias))
    return (sl(dx).astype(tx), ddt.astype(tdt), dA.astype(tA),
            group_sum(dBp).astype(tB), group_sum(dCp).astype(tC), dD.astype(tD),
            None if dz is None else sl(dz), dbias.astype(tbias), dh0, None)


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------- public API
def _make_plan(x, A, g, softplus, has_z, has_h0, has_seg, interpret, block_d, chunk):
    b, l, dim = x.shape
    n = A.shape[1]
    gg = 1 if g is None else g
    dg = dim // gg
    if block_d is None:
        block_d = 32
    if isinstance(block_d, bool) or not isinstance(block_d, int) or block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a positive power of two, got {block_d!r}")
    if chunk is None:
        chunk = 64
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk!r}")
    bd = min(block_d, next_pow2(dg))
    chunk = min(chunk, l)
    np_ = next_pow2(n)
    return _Plan(b=b, l=l, lp=round_up(l, chunk), chunk=chunk, dim=dim, g=gg, dg=dg,
                 dgp=round_up(dg, bd), bd=bd, n=n, np_=np_, softplus=bool(softplus),
                 has_z=has_z, interpret=resolve_interpret(interpret),
                 num_warps=4 if bd * np_ >= 2048 else 2,
                 num_warps_bwd=4 if bd * np_ >= 1024 else 2,
                 has_h0=has_h0, has_seg=has_seg)


@functools.partial(jax.jit, static_argnames=("dt_softplus", "return_final_state", "interpret",
                                             "block_d", "chunk_size"))
def selective_scan(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                   initial_state=None, segment_ids=None, return_final_state=False,
                   chunk_size=64, interpret=None, block_d=None):
    """Mamba-1 selective scan (Pallas forward + backward).

    Per batch, with ``dt <- softplus?(dt + dt_bias)`` and ``r_t = 1`` where a packed
    segment starts (``t > 0`` and ``segment_ids[t] != segment_ids[t-1]``)::

        h_{-1} = initial_state (or 0)
        h_t = (1 - r_t) * exp(dt_t[:, None] * A) * h_{t-1} + (dt_t * x_t)[:, None] * B_t
        y_t = h_t @ C_t + D * x_t ;  y *= silu(z) if z is given

    Args:
      x, dt: ``[B, L, D]`` (length-major: mamba_ssm's ``[B, D, L]`` must be
        transposed); z (optional gate) likewise.
      A: ``[D, N]`` real.  B, C: ``[B, L, N]`` or ``[B, L, G, N]`` (channel ``d``
        uses group ``d // (D // G)``).  D, dt_bias: ``[D]``.
      dt_softplus: ``dt = softplus(dt + dt_bias)``.
      initial_state: ``[B, D, N]`` state before step 0 (the layout of
        :func:`selective_state_update`'s ``state`` and the Mamba decode cache);
        it only reaches the first segment when ``segment_ids`` are given.
      segment_ids: ``[B, L]`` int, packed sequences: the state restarts from zero
        at every ``t`` with ``segment_ids[t] != segment_ids[t-1]``.
      return_final_state: also return the final state ``[B, D, N]`` float32.
      chunk_size: time steps per chunk (default 64; shrunk to L for short inputs): the
        forward's time-parallel unit and the spacing of the backward's stored states.
      interpret: Pallas interpret mode; ``None`` = on when the default backend is CPU.
      block_d: channels per program (power of two, default 32).

    Returns ``y [B, L, D]`` (``x.dtype``) or ``(y, final_state)``.  Differentiable in
    all float array arguments, ``initial_state`` included (float32 math, Pallas
    backward kernel).
    """
    _, _, dim, _, g = validate(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids)
    plan = _make_plan(x, A, g, dt_softplus, z is not None, initial_state is not None,
                      segment_ids is not None, interpret, block_d, chunk_size)
    if g is None:
        B, C = B[:, :, None, :], C[:, :, None, :]
    D_ = jnp.zeros((dim,), f32) if D is None else D
    bias_ = jnp.zeros((dim,), f32) if dt_bias is None else dt_bias
    keep = None if segment_ids is None else 1.0 - segment_resets(segment_ids).astype(f32)
    h0 = None if initial_state is None else initial_state.astype(f32)
    y, last = _scan(plan, x, dt, A, B, C, D_, z, bias_, h0, keep)
    return (y, last) if return_final_state else y
