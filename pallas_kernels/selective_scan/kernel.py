"""Mamba-1 selective scan as Pallas kernels (Triton lowering on GPU).

Semantics: :func:`.reference.reference` (mamba_ssm ``selective_scan_ref``,
channels-last).  Per batch and channel block the state ``h [block_d, N]`` lives
in registers (float32) and time is a sequential loop inside the kernel.

Channels are padded per B/C group to a multiple of ``block_d`` (so a block
never straddles two groups and reads one group's B/C rows), ``N`` is padded to a
power of two (zero A/B/C: padded states stay 0) and ``L`` to a multiple of
``chunk`` (padded steps get ``dt = 0``: the identity).

Forward, time-parallel (grid ``(batch, dim // block_d, L / chunk)``): the
recurrence is linear in ``h``, so each chunk first runs from ``h = 0`` (its own
state and summed ``dt``, whose decay is ``exp(A sum dt)``), an associative scan
over chunks in JAX turns those into every chunk's true start state
``states [batch, n_chunks, dim, N]`` float32 (never the ``[L, dim, N]`` states),
and each chunk reruns from its start state to write ``y``.  A sequential loop
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
span one chunk, so the cancellation is bounded by the chunk length.

Plain-JAX epilogue: summing the per-block partial ``dB``/``dC`` over channel
blocks of a group, ``dA``/``dD`` over batch, the softplus chain rule for
``delta`` and ``delta_bias``, unpadding and dtype casts.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .._common import SQ, compiler_params, next_pow2, resolve_interpret, round_up
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


def _fwd_chunk_kernel(*refs, plan: _Plan, emit_y: bool):
    """One (batch, channel block, time chunk) program.

    ``emit_y=False`` (pass 1): run the chunk from ``h = 0``; write the chunk's own
    state ``h_local [bd, np]`` and ``sum(dt) [bd]`` (its decay is ``exp(A sum(dt))``).
    ``emit_y=True`` (pass 3): run it from the true chunk-start state; write ``y``.
    """
    it = iter(refs)
    u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, bias_ref = (next(it) for _ in range(7))
    z_ref = next(it) if plan.has_z else None
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
        h = jnp.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
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
    dy_ref, st_ref, dlast_ref = next(it), next(it), next(it)
    du_ref, ddth_ref, ddtg_ref, db_ref, dc_ref, da_ref, dd_ref = (next(it) for _ in range(7))
    dz_ref = next(it) if plan.has_z else None

    A = a_ref[...].astype(f32)
    Dv = d_ref[...].astype(f32)
    bias = bias_ref[...].astype(f32)
    zeros = jnp.zeros(A.shape, f32)
    zrow = jnp.zeros(Dv.shape, f32)
    T = plan.chunk

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
            h = jnp.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            dout, dy, silu, dsilu = dout_of(t)
            if plan.has_z:
                ypre = jnp.sum(h * Ct[None, :], axis=1) + Dv * u
                dz_ref[t, :] = (dy * ypre * dsilu).astype(dz_ref.dtype)
            ddth_ref[t, :] = -jnp.sum(A * chp, axis=1)
            sdt_chp = sdt_chp + dt[:, None] * chp
            sdt = sdt + dt
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
            ddtg_ref[t, :] = jnp.sum(A * (base - gxs), axis=1) + u * gB
            sdt_gxs = sdt_gxs + dt[:, None] * gxs
            du_ref[t, :] = (dt * gB + Dv * dout).astype(du_ref.dtype)
            db_ref[t, :] = jnp.sum(g * dtu[:, None], axis=0)
            dD = dD + dout * u
            return jnp.exp(dt[:, None] * A) * g, gxs, sdt_gxs, dD

        gnext, _, sdt_gxs, dD = lax.fori_loop(0, T, bstep, (gnext, zeros, zeros, dD))
        dA = dA + base * sdt[:, None] - sdt_gxs - sdt_chp
        return gnext, dA, dD

    _, dA, dD = lax.fori_loop(0, plan.nc, chunk_body,
                              (dlast_ref[...].astype(f32), zeros, zrow))
    da_ref[...] = dA
    dd_ref[...] = dD


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
    state = pl.BlockSpec((SQ, SQ, plan.bd, plan.np_), lambda i, j, c: (i, c, j, 0))
    return specs, seq, state


def _forward(plan: _Plan, u, delta, A, B, C, D, z, bias):
    """Padded inputs -> ``(y [b, lp, dimp], last [b, dimp, np], starts [b, nc, dimp, np])``.

    Time-parallel in three passes (the recurrence is linear in ``h``):
    1. Pallas, one program per (batch, channel block, chunk): each chunk's own
       final state from ``h = 0`` and its summed ``dt``;
    2. JAX: ``starts[c+1] = exp(A * sum dt_c) * starts[c] + h_local[c]`` as an
       associative scan over chunks (``nc`` elements, log depth);
    3. Pallas, same grid: rerun each chunk from its true start state and write y.
    ``starts`` are also the backward's chunk-start states.
    """
    specs, seq, state = _chunk_specs(plan)
    b, nc, dimp, np_ = plan.b, plan.nc, plan.dimp, plan.np_
    grid = (b, plan.nblk, nc)
    args = [u, delta, A, B, C, D, bias] + ([z] if plan.has_z else [])
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

    def combine(x, y):  # (decay, state) pairs: apply x then y
        return x[0] * y[0], y[0] * x[1] + y[1]

    _, after = lax.associative_scan(combine, (decay, hloc), axis=1)      # state after chunk c
    starts = jnp.concatenate([jnp.zeros_like(after[:, :1]), after[:, :-1]], axis=1)
    y = pl.pallas_call(
        functools.partial(_fwd_chunk_kernel, plan=plan, emit_y=True),
        out_shape=jax.ShapeDtypeStruct((b, plan.lp, dimp), u.dtype),
        grid=grid, in_specs=specs + [state], out_specs=seq,
        interpret=plan.interpret, name="selective_scan_fwd",
        **compiler_params(plan.num_warps, plan.num_stages),
    )(*args, starts)
    return y, after[:, -1], starts


def _backward_call(plan: _Plan, u, delta, A, B, C, D, z, bias, dy, states, dlast):
    specs, seq = _in_specs(plan)
    specs = specs + [seq,
                     pl.BlockSpec((SQ, plan.nc, plan.bd, plan.np_), lambda i, j: (i, 0, j, 0)),
                     pl.BlockSpec((SQ, plan.bd, plan.np_), lambda i, j: (i, j, 0))]
    part = pl.BlockSpec((SQ, SQ, plan.lp, plan.np_), lambda i, j: (i, j, 0, 0))
    b, lp, dimp, np_ = plan.b, plan.lp, plan.dimp, plan.np_
    out_shape = [jax.ShapeDtypeStruct((b, lp, dimp), u.dtype),            # du
                 jax.ShapeDtypeStruct((b, lp, dimp), f32),                # ddt (h part)
                 jax.ShapeDtypeStruct((b, lp, dimp), f32),                # ddt (g part)
                 jax.ShapeDtypeStruct((b, plan.nblk, lp, np_), f32),      # dB per block
                 jax.ShapeDtypeStruct((b, plan.nblk, lp, np_), f32),      # dC per block
                 jax.ShapeDtypeStruct((b, dimp, np_), f32),               # dA per batch
                 jax.ShapeDtypeStruct((b, dimp), f32)]                    # dD per batch
    out_specs = [seq, seq, seq, part, part,
                 pl.BlockSpec((SQ, plan.bd, np_), lambda i, j: (i, j, 0)),
                 pl.BlockSpec((SQ, plan.bd), lambda i, j: (i, j))]
    if plan.has_z:
        out_shape.append(jax.ShapeDtypeStruct((b, lp, dimp), z.dtype))
        out_specs.append(seq)
    args = [u, delta, A, B, C, D, bias] + ([z] if plan.has_z else []) + [dy, states, dlast]
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
def _pad_all(plan, u, delta, A, B, C, D, z, bias):
    return (_prep_seq(u, plan), _prep_seq(delta, plan),
            _pad_axis(_pad_chan(A, plan, 0), 1, plan.np_),
            _prep_bc(B, plan), _prep_bc(C, plan),
            _pad_chan(D, plan, 0), None if z is None else _prep_seq(z, plan),
            _pad_chan(bias, plan, 0))


def _unpad_out(plan, y, last):
    y = _unpad_chan(y[:, :plan.l], plan, -1)
    last = _unpad_chan(last[:, :, :plan.n], plan, 1)
    return y, last


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(plan, u, delta, A, B, C, D, z, bias):
    y, last, _ = _forward(plan, *_pad_all(plan, u, delta, A, B, C, D, z, bias))
    return _unpad_out(plan, y, last)


def _scan_fwd(plan, u, delta, A, B, C, D, z, bias):
    padded = _pad_all(plan, u, delta, A, B, C, D, z, bias)
    y, last, states = _forward(plan, *padded)
    return _unpad_out(plan, y, last), (padded, states)


def _scan_bwd(plan, res, cts):
    padded, states = res
    u, delta, A, B, C, D, z, bias = padded
    dy, dlast = cts
    dy = _prep_seq(dy, plan)
    dlast = _pad_axis(_pad_chan(dlast.astype(f32), plan, 1), 2, plan.np_)
    outs = _backward_call(plan, u, delta, A, B, C, D, z, bias, dy, states, dlast)
    du, ddth, ddtg, dBp, dCp, dAp, dDp = outs[:7]
    dz = outs[7] if plan.has_z else None
    sl = lambda x: _unpad_chan(x[:, :plan.l], plan, -1)  # noqa: E731
    ddt = sl(ddth + ddtg)
    if plan.softplus:
        pre = sl(delta).astype(f32) + _unpad_chan(bias, plan, 0).astype(f32)
        ddt = ddt * jax.nn.sigmoid(pre)
    dbias = jnp.sum(ddt, axis=(0, 1))

    def group_sum(x):             # [b, nblk, lp, np] -> [b, L, G, N]
        x = x.reshape(plan.b, plan.g, plan.bpg, plan.lp, plan.np_).sum(2)
        return jnp.transpose(x, (0, 2, 1, 3))[:, :plan.l, :, :plan.n]

    dA = _unpad_chan(jnp.sum(dAp, 0)[:, :plan.n], plan, 0)
    dD = _unpad_chan(jnp.sum(dDp, 0), plan, 0)
    tu, tdelta, tA, tB, tC, tD, tbias = (x.dtype for x in (u, delta, A, B, C, D, bias))
    return (sl(du).astype(tu), ddt.astype(tdelta), dA.astype(tA),
            group_sum(dBp).astype(tB), group_sum(dCp).astype(tC), dD.astype(tD),
            None if dz is None else sl(dz), dbias.astype(tbias))


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------- public API
def _make_plan(u, A, B, g, softplus, has_z, interpret, block_d, chunk):
    b, l, dim = u.shape
    n = A.shape[1]
    gg = 1 if g is None else g
    dg = dim // gg
    if block_d is None:
        block_d = 32
    if block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a positive power of two, got {block_d}")
    if chunk is None:
        chunk = 64
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    bd = min(block_d, next_pow2(dg))
    chunk = min(chunk, l)
    np_ = next_pow2(n)
    return _Plan(b=b, l=l, lp=round_up(l, chunk), chunk=chunk, dim=dim, g=gg, dg=dg,
                 dgp=round_up(dg, bd), bd=bd, n=n, np_=np_, softplus=bool(softplus),
                 has_z=has_z, interpret=resolve_interpret(interpret),
                 num_warps=4 if bd * np_ >= 2048 else 2,
                 num_warps_bwd=4 if bd * np_ >= 1024 else 2)


@functools.partial(jax.jit, static_argnames=("delta_softplus", "return_last_state", "interpret",
                                             "block_d", "chunk"))
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, interpret=None, block_d=None, chunk=None):
    """Mamba-1 selective scan (Pallas forward + backward).

    Args:
      u, delta: ``[batch, L, dim]``; z (optional gate, ``y *= silu(z)``) likewise.
      A: ``[dim, N]`` real.  B, C: ``[batch, L, N]`` or ``[batch, L, G, N]``
        (channel ``d`` uses group ``d // (dim // G)``).  D, delta_bias: ``[dim]``.
      delta_softplus: ``dt = softplus(delta + delta_bias)``.
      return_last_state: also return the final state ``[batch, dim, N]`` float32.
      interpret: Pallas interpret mode; ``None`` = on when the default backend is CPU.
      block_d: channels per program (power of two, default 32).
      chunk: time steps per chunk of stored backward states (default 64).

    Returns ``y`` (``u.dtype``) or ``(y, last_state)``.  Differentiable in all
    array arguments (float32 math, Pallas backward kernel).
    """
    _, _, dim, _, g = validate(u, delta, A, B, C, D, z, delta_bias)
    plan = _make_plan(u, A, B, g, delta_softplus, z is not None, interpret, block_d, chunk)
    if g is None:
        B, C = B[:, :, None, :], C[:, :, None, :]
    D_ = jnp.zeros((dim,), f32) if D is None else D
    bias_ = jnp.zeros((dim,), f32) if delta_bias is None else delta_bias
    y, last = _scan(plan, u, delta, A, B, C, D_, z, bias_)
    return (y, last) if return_last_state else y
