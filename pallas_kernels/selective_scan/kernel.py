"""Mamba-1 selective scan as Pallas kernels (Triton on GPU, Mosaic on TPU).

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
span one chunk, so the cancellation is bounded by the chunk length: the absolute
error of ``S_t`` is ~``eps * sum_chunk |c h| + |g x|``, while ``|S_t|`` shrinks like
``exp(-dt |A|)``.  At trained dt (p99 ~0.1-0.4, tiny ``mamba``) ``dA`` is within
~7e-4 of each entry's own gradient scale (50-100x the float32 reference's rounding);
where ``dt |A| >~ 10`` the fast-decay entries (true gradient ~0) are rounding noise
of ~1e-4 of the largest entry.  Exact per-entry ``S_t`` needs the states of every
step (recomputed per sub-chunk into a buffer: ~25-35% more backward time).  The adjoint
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

TPU variant (Mosaic).  Compiled calls carry both variants and
``lax.platform_dependent`` picks one when lowering (``jax.export(...,
platforms=("tpu",))`` or a TPU backend -> Mosaic, otherwise Triton), separately
in the forward and the backward of the ``custom_vjp``; the residuals between
them are the original arguments and the chunk-start states in the GPU plan's
layout (both variants use the same number of chunks; the TPU branch converts),
so neither program carries the other variant's residuals.
``interpret=pltpu.InterpretParams()`` runs the TPU variant alone in Pallas' TPU
interpreter.  Same kernels, same math and the same
three passes; :class:`_Layout` holds the differences, which are only what Mosaic
needs:

* State ``h [N, block_d]``: ``N`` on sublanes (padded to a multiple of 8, not a
  power of two), ``block_d = 128`` channels on lanes (a smaller ``block_d`` is
  raised to 128; channels are padded per group to a multiple of it).  ``A`` is
  passed transposed ``[N, D]``; ``D`` / ``dt_bias`` as ``[1, D]`` rows; the
  states between chunks as ``[b, nc, N, D]``, the chunk sums of ``dt`` as
  ``[b, nc, 1, D]``.  Every block's last two dims are ``(multiple of 8, 128)``
  or the full array dims.
* Time: ``u, dt, z, dy`` (and ``y, du, dz`` and the two ``d dt`` parts) as
  ``[chunk, 128]`` tiles.  Inside a kernel the steps run in groups of ``R``
  (8; 16 when x / dt / z are 16-bit, so dynamic row offsets stay tile-aligned):
  a ``fori_loop`` over groups loads ``[R, 128]`` tiles with
  ``pl.ds(pl.multiple_of(start, R), R)`` on the sublane axis and unrolls the R
  steps statically, taking static row slices ``[1, 128]``; outputs are
  assembled into ``[R, 128]`` tiles by iota selects and stored once per group.
  ``chunk`` is rounded up to a multiple of R (the number of chunks stays the
  GPU one, so a few whole chunks of padding may follow).
* ``B_t`` / ``C_t`` must be columns ``[N, 1]`` (dynamic lane slicing does not
  lower): JAX passes them (as float32) re-tiled ``[b, G, L / R, N, R]``, one
  ``[N, R]`` tile of columns per group of steps, read with a dynamic index on
  a leading axis and sliced statically along lanes; ``dB`` / ``dC`` come back
  the same way.  ``A``, ``D``, ``dt_bias`` are float32 too.
* Reductions: over ``N`` along sublanes (``[1, 128]`` rows), over channels
  along lanes (``[N, 1]`` columns); no matmuls, no transposes in-kernel.
* Segment keep flags as a ``[L, 1]`` float32 column (``[R, 1]`` tiles).
* Backward grid ``(batch, channel block, chunk)`` with chunks in reverse along
  the last, ``"arbitrary"`` axis (the other axes and every forward axis are
  ``"parallel"``): one chunk's tiles in VMEM per step instead of the whole
  sequence; the adjoint ``g`` is carried in a VMEM scratch and ``dA`` / ``dD``
  / ``d initial_state`` accumulate in output blocks that stay resident along
  that axis.

VMEM per grid step: :func:`tpu_vmem_bytes`.  Checked on CPU only: the export
for TPU runs Pallas' Mosaic lowering (block shapes, dtypes, op coverage) but not
Mosaic's own layout passes, which run in the TPU compiler (e.g. the ``[N, R]``
column tiles, lane broadcasts of ``[N, 1]`` columns and lane reductions are
believed supported, not verified on hardware); numerics are checked in the TPU
interpreter.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .._common import (SQ, check_flag, check_int, KernelPlan, by_platform, compiler_params, idiv, next_pow2,
                       resolve_interpret, check_decay, host_int32_ids, round_up, segment_resets, select_plan,
                       tpu_tile_bytes)
from .reference import validate

f32 = jnp.float32
_LANES = 128   # TPU: channels per block (one vreg of lanes)
_ROWS = 8      # TPU: time steps per statically unrolled group, for 32-bit inputs (one sublane tile)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Plan(KernelPlan):
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
    np_: int        # N padded (GPU: a power of two; TPU: a multiple of 8)
    softplus: bool
    has_z: bool
    num_warps: int
    num_warps_bwd: int
    num_stages: int = 1
    has_h0: bool = False    # initial_state given
    has_seg: bool = False   # segment_ids given (keep flags are an input)
    rows: int = _ROWS                # TPU: steps per unrolled group (8, or 16 for 16-bit inputs)

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


# ----------------------------------------------------------------------------- layouts
class _Layout:
    """Where each backend wants the axes: the one place the GPU and TPU variants differ.

    In the kernels (``bd`` channels of one block, ``np`` states):

    * GPU (Triton): state ``h [bd, np]``; per-step channel rows ``u_t, dt_t [bd]``;
      ``B_t, C_t [np]``; the keep flag ``[1]``.
    * TPU (Mosaic): state ``h [np, bd]`` (states on sublanes, channels on lanes);
      channel rows ``[1, bd]``; ``B_t, C_t`` columns ``[np, 1]``; the keep flag ``[1, 1]``.

    :meth:`chan` / :meth:`nvec` broadcast a channel row / state vector against ``h``,
    :meth:`sum_n` / :meth:`sum_c` reduce ``h``-shaped values over states / channels; the
    shared kernel math (:func:`_fwd_chunk_kernel`, :func:`_bwd_chunk`) is written with them.

    Outside the kernels the padded arrays are in the GPU orientation (``A [dimp, np]``,
    ``B/C [b, lp, G, np]``, states ``[..., dimp, np]``); ``to_*`` / ``from_*`` convert
    (identities on GPU).  TPU: ``A^T [np, dimp]``; ``D``, ``dt_bias`` rows ``[1, dimp]``;
    ``B``/``C`` as float32 ``[b, G, lp / R, np, R]`` (one ``[np, R]`` tile of columns per
    group of ``R = plan.rows`` steps); keep flags as a column ``[b, lp, 1]``; states
    ``[..., np, dimp]``; the chunk sums of ``dt`` ``[b, nc, 1, dimp]``.
    """

    def __init__(self, plan: _Plan):
        self.plan, self.tpu = plan, plan.tpu

    # -- in-kernel broadcasting and reductions
    def chan(self, v):
        return v if self.tpu else v[:, None]

    def nvec(self, v):
        return v if self.tpu else v[None, :]

    def sum_n(self, x):
        return jnp.sum(x, axis=0, keepdims=True) if self.tpu else jnp.sum(x, axis=1)

    def sum_c(self, x):
        return jnp.sum(x, axis=1, keepdims=True) if self.tpu else jnp.sum(x, axis=0)

    @property
    def state_shape(self):
        p = self.plan
        return (p.np_, p.bd) if self.tpu else (p.bd, p.np_)

    @property
    def row_shape(self):
        return (1, self.plan.bd) if self.tpu else (self.plan.bd,)

    # -- array layouts (padded GPU orientation <-> kernel layout)
    def to_mat(self, A):             # [dimp, np]
        return A.T if self.tpu else A

    def to_vec(self, v):             # [dimp]
        return v[None, :] if self.tpu else v

    def from_vec(self, v):           # [b, 1, dimp] (TPU) -> [b, dimp]
        return v[:, 0] if self.tpu else v

    def to_bc(self, x):              # [b, lp, G, np]
        if not self.tpu:
            return x
        b, lp, g, np_ = x.shape
        r = self.plan.rows
        return jnp.transpose(x.astype(f32).reshape(b, lp // r, r, g, np_), (0, 3, 1, 4, 2))

    def from_parts(self, x):         # per-block dB / dC -> [b, nblk, lp, np]
        if not self.tpu:
            return x
        b, nblk, ng, np_, _ = x.shape
        return jnp.swapaxes(x, -1, -2).reshape(b, nblk, ng * self.plan.rows, np_)

    def to_keep(self, keep):         # [b, lp]
        return keep[:, :, None] if self.tpu else keep

    def to_state(self, h):           # [..., dimp, np]
        return jnp.swapaxes(h, -1, -2) if self.tpu else h

    from_state = to_state

    def decay(self, sdt, A):         # chunk decay exp(A * sum dt): [b, nc, dimp, np] in kernel layout
        return jnp.exp(sdt[..., None] * A) if not self.tpu else jnp.exp(sdt * A)

    # -- block specs; ``tb(*rest)`` maps the grid axes after (batch, block) to the time block
    def seq(self, rows, tb):
        return pl.BlockSpec((SQ, rows, self.plan.bd), lambda i, j, *c: (i, tb(*c), j))

    def mat(self):
        p = self.plan
        if self.tpu:
            return pl.BlockSpec((p.np_, p.bd), lambda i, j, *c: (0, j))
        return pl.BlockSpec((p.bd, p.np_), lambda i, j, *c: (j, 0))

    def vec(self):
        if self.tpu:
            return pl.BlockSpec((1, self.plan.bd), lambda i, j, *c: (0, j))
        return pl.BlockSpec((self.plan.bd,), lambda i, j, *c: (j,))

    def bc(self, rows, tb):
        p, bpg = self.plan, self.plan.bpg
        if self.tpu:
            return pl.BlockSpec((SQ, SQ, rows // p.rows, p.np_, p.rows),
                                lambda i, j, *c: (i, idiv(j, bpg), tb(*c), 0, 0))
        return pl.BlockSpec((SQ, rows, SQ, p.np_), lambda i, j, *c: (i, tb(*c), idiv(j, bpg), 0))

    def keep(self, rows, tb):
        if self.tpu:
            return pl.BlockSpec((SQ, rows, 1), lambda i, j, *c: (i, tb(*c), 0))
        return pl.BlockSpec((SQ, rows), lambda i, j, *c: (i, tb(*c)))

    def state(self, cb=None):
        """One state ``[bd, np]`` / ``[np, bd]`` per (batch, block) (``cb``: the chunk block of a
        ``[b, nc, ...]`` array, or ``None`` for ``[b, ...]``)."""
        p = self.plan
        if self.tpu:
            shape, last = (p.np_, p.bd), lambda j: (0, j)
        else:
            shape, last = (p.bd, p.np_), lambda j: (j, 0)
        if cb is None:
            return pl.BlockSpec((SQ,) + shape, lambda i, j, *c: (i,) + last(j))
        return pl.BlockSpec((SQ, SQ) + shape, lambda i, j, *c: (i, cb(*c)) + last(j))

    def row_out(self, cb=None):
        """A channel row per (batch, [chunk,] block): ``[b, (nc,) dimp]`` / TPU ``[b, (nc,) 1, dimp]``."""
        bd = self.plan.bd
        lead = (SQ,) if cb is None else (SQ, SQ)
        idx = (lambda i, c: (i,)) if cb is None else (lambda i, c: (i, cb(*c)))
        if self.tpu:
            return pl.BlockSpec(lead + (1, bd), lambda i, j, *c: idx(i, c) + (0, j))
        return pl.BlockSpec(lead + (bd,), lambda i, j, *c: idx(i, c) + (j,))

    def row_out_shape(self, *lead):
        return lead + ((1, self.plan.dimp) if self.tpu else (self.plan.dimp,))

    def parts(self, rows, tb):
        """Per-block partial dB / dC: GPU ``[b, nblk, lp, np]``, TPU ``[b, nblk, lp/8, np, 8]``."""
        p = self.plan
        if self.tpu:
            return (pl.BlockSpec((SQ, SQ, rows // p.rows, p.np_, p.rows),
                                 lambda i, j, *c: (i, j, tb(*c), 0, 0)),
                    (p.b, p.nblk, p.lp // p.rows, p.np_, p.rows))
        return (pl.BlockSpec((SQ, SQ, rows, p.np_), lambda i, j, *c: (i, j, tb(*c), 0)),
                (p.b, p.nblk, p.lp, p.np_))

    def params(self, n_grid: int, warps: int, arbitrary_last: bool = False) -> dict:
        p = self.plan
        if self.tpu:  # every program owns its outputs, except along the backward's chunk axis
            sem = ("parallel",) * (n_grid - 1) + ("arbitrary" if arbitrary_last else "parallel",)
            return compiler_params(0, 0, platform="tpu", dimension_semantics=sem)
        return compiler_params(warps, p.num_stages)


# ----------------------------------------------------------------------------- kernel math
def _silu_parts(z):
    s = jax.nn.sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s))       # silu, silu'


def _softplus_dt(dt, plan: _Plan):
    if plan.softplus:
        dt = jnp.where(dt > 20.0, dt, jnp.log1p(jnp.exp(jnp.minimum(dt, 20.0))))
    return dt


def _load_dt(dt_ref, bias, t, plan: _Plan, t0=0):
    """GPU: dt of row ``t`` of the block (absolute step ``t0 + t``)."""
    dt = _softplus_dt(dt_ref[t, :].astype(f32) + bias, plan)
    if plan.lp != plan.l:
        dt = jnp.where(t0 + t < plan.l, dt, 0.0)  # padded steps are the identity
    return dt


def _decay(lay: _Layout, dt, A, keep):
    """``a'_t = keep_t * exp(dt_t A)`` in the state's shape (``keep=None``: no segments)."""
    a = jnp.exp(lay.chan(dt) * A)
    if keep is None:
        return a
    return a * lay.chan(keep)


class _Rows:
    """The inputs of one time step, read lazily by name (``u dt B C z dy keep``)."""

    def __init__(self, read):
        self._read, self._cache = read, {}

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._cache:
            self._cache[name] = self._read(name)
        return self._cache[name]


_COLS = ("B", "C", "db", "dc")   # per-step state vectors (columns on TPU), others channel rows


def _time_loop(plan: _Plan, lay: _Layout, ins: dict, outs: dict, bias, body, carry, *,
               lo, n, t0, reverse=False):
    """Run ``carry, row_outs = body(rows, carry)`` over block rows ``lo .. lo+n-1`` (absolute
    step ``t0 + row``), in reverse if asked; ``row_outs[name]`` is written to ``outs[name]``.

    GPU: a ``fori_loop`` over steps reading and writing single rows.  TPU: a ``fori_loop``
    over groups of ``R = plan.rows`` steps; each group loads aligned ``[R, bd]`` tiles
    (``pl.ds`` on the sublane axis, at a multiple of R) and ``[np, R]`` B/C column tiles
    (dynamic index on a leading axis), runs its R steps statically unrolled on static row /
    column slices, and stores its ``[R, bd]`` / ``[np, R]`` output tiles assembled with iota
    selects.
    """
    if not lay.tpu:
        def step(k, carry):
            t = lo + n - 1 - k if reverse else lo + k

            def read(name):
                if name == "dt":
                    return _load_dt(ins["dt"], bias, t, plan, t0)
                if name == "keep":
                    return ins["keep"][pl.ds(t, 1)]
                return ins[name][t, :].astype(f32)

            carry, row_outs = body(_Rows(read), carry)
            for name, v in row_outs.items():
                outs[name][t, :] = v.astype(outs[name].dtype)
            return carry
        return lax.fori_loop(0, n, step, carry)

    R = plan.rows
    assert n % R == 0 and lo % R == 0, (lo, n)
    ng = n // R
    bd = plan.bd

    def group(k, carry):
        gi = lo // R + (ng - 1 - k if reverse else k)
        start = pl.multiple_of(gi * R, R)
        sl = pl.ds(start, R)
        tiles = {}

        def tile(name):
            if name not in tiles:
                ref = ins[name]
                if name in _COLS:
                    tiles[name] = ref[gi].astype(f32)                     # [np, 8]
                elif name == "keep":
                    tiles[name] = ref[sl, :]                              # [8, 1]
                elif name == "dt":
                    dt = _softplus_dt(ref[sl, :].astype(f32) + bias, plan)
                    if plan.lp != plan.l:
                        rows = t0 + start + lax.broadcasted_iota(jnp.int32, (R, bd), 0)
                        dt = jnp.where(rows < plan.l, dt, 0.0)
                    tiles[name] = dt
                else:
                    tiles[name] = ref[sl, :].astype(f32)                  # [8, bd]
            return tiles[name]

        acc = {}
        for j in (range(R - 1, -1, -1) if reverse else range(R)):
            def read(name, j=j):
                x = tile(name)
                return x[:, j:j + 1] if name in _COLS else x[j:j + 1, :]
            carry, row_outs = body(_Rows(read), carry)
            for name, v in row_outs.items():
                if name in _COLS:
                    shape, axis = (plan.np_, R), 1
                else:
                    shape, axis = (R, bd), 0
                prev = acc.get(name, jnp.zeros(shape, f32))
                sel = lax.broadcasted_iota(jnp.int32, shape, axis) == j
                acc[name] = jnp.where(sel, jnp.broadcast_to(v.astype(f32), shape), prev)
        for name, v in acc.items():
            ref = outs[name]
            if name in _COLS:
                ref[gi] = v.astype(ref.dtype)
            else:
                ref[sl, :] = v.astype(ref.dtype)
        return carry

    return lax.fori_loop(0, ng, group, carry)


def _fwd_chunk_kernel(*refs, plan: _Plan, emit_y: bool):
    """One (batch, channel block, time chunk) program.

    ``emit_y=False`` (pass 1): run the chunk from ``h = 0``; write the chunk's own
    state ``h_local`` and ``sum(dt)`` per channel (its decay is ``exp(A sum(dt))``).
    ``emit_y=True`` (pass 3): run it from the true chunk-start state; write ``y``.
    """
    lay = _Layout(plan)
    it = iter(refs)
    u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, bias_ref = (next(it) for _ in range(7))
    z_ref = next(it) if plan.has_z else None
    keep_ref = next(it) if plan.has_seg else None
    if emit_y:
        h0_ref, y_ref = next(it), next(it)
    else:
        hloc_ref, sdt_ref = next(it), next(it)
    t0 = pl.program_id(2) * plan.chunk

    A = a_ref[...].astype(f32)                    # [bd, np] / TPU [np, bd]
    Dv = d_ref[...].astype(f32)                   # [bd] / TPU [1, bd]
    bias = bias_ref[...].astype(f32)
    ins = dict(u=u_ref, dt=dt_ref, B=b_ref, C=c_ref, z=z_ref, keep=keep_ref)

    def step(r, carry):
        h, sdt = carry
        dt, u = r.dt, r.u
        h = _decay(lay, dt, A, r.keep if plan.has_seg else None) * h + lay.chan(dt * u) * lay.nvec(r.B)
        if emit_y:
            y = lay.sum_n(h * lay.nvec(r.C)) + Dv * u
            if plan.has_z:
                y = y * _silu_parts(r.z)[0]
            return (h, sdt), {"y": y}
        return (h, sdt + dt), {}

    h0 = h0_ref[...] if emit_y else jnp.zeros(A.shape, f32)
    h, sdt = _time_loop(plan, lay, ins, {"y": y_ref} if emit_y else {}, bias, step,
                        (h0, jnp.zeros(Dv.shape, f32)), lo=0, n=plan.chunk, t0=t0)
    if not emit_y:
        hloc_ref[...] = h
        sdt_ref[...] = sdt


def _bwd_chunk(plan: _Plan, lay: _Layout, ins: dict, outs: dict, A, Dv, bias, h_start, carry,
               *, lo, t0):
    """Backward through one chunk (block rows ``lo .. lo+chunk-1``, absolute ``t0 + row``) from
    its start state; ``carry = (g after the chunk (a'_{t1} g_{t1}), dA, dD)``."""
    gnext, dA, dD = carry
    T = plan.chunk
    zeros = jnp.zeros(A.shape, f32)
    zrow = jnp.zeros(Dv.shape, f32)

    def keep_of(r, dt):
        """``(keep_t or None, keep_t * dt_t)``: decay terms vanish at segment starts."""
        if not plan.has_seg:
            return None, dt
        k = r.keep
        return k, dt * k

    def dout_of(r):
        dy = r.dy
        if not plan.has_z:
            return dy, dy, None, None
        silu, dsilu = _silu_parts(r.z)
        return dy * silu, dy, silu, dsilu

    def keep_row(r):
        return r.keep if plan.has_seg else None

    # -- loop 1: recompute h forward; everything that needs h (not g).
    def fstep(r, car):
        h, chp, sdt, sdt_chp = car
        dt, u, Bt, Ct = r.dt, r.u, r.B, r.C
        h = _decay(lay, dt, A, keep_row(r)) * h + lay.chan(dt * u) * lay.nvec(Bt)
        dout, dy, silu, dsilu = dout_of(r)
        row_outs = {}
        if plan.has_z:
            ypre = lay.sum_n(h * lay.nvec(Ct)) + Dv * u
            row_outs["dz"] = dy * ypre * dsilu
        k, dtk = keep_of(r, dt)
        ddth = -lay.sum_n(A * chp)
        row_outs["ddth"] = ddth if k is None else ddth * k
        sdt_chp = sdt_chp + lay.chan(dtk) * chp
        sdt = sdt + dtk
        row_outs["dc"] = lay.sum_c(lay.chan(dout) * h)
        chp = chp + (lay.chan(dout) * lay.nvec(Ct)) * h
        return (h, chp, sdt, sdt_chp), row_outs

    h_end, ch_tot, sdt, sdt_chp = _time_loop(
        plan, lay, ins, outs, bias, fstep, (h_start, zeros, zrow, zeros), lo=lo, n=T, t0=t0)
    base = gnext * h_end + ch_tot              # S_{t1} + ChTot

    # -- loop 2: adjoint g backwards through the chunk.
    def bstep(r, car):
        gnext, gxs, sdt_gxs, dD = car
        dt, u, Bt, Ct = r.dt, r.u, r.B, r.C
        dout = dout_of(r)[0]
        g = lay.chan(dout) * lay.nvec(Ct) + gnext
        dtu = dt * u
        gxs = gxs + g * (lay.chan(dtu) * lay.nvec(Bt))
        gB = lay.sum_n(g * lay.nvec(Bt))
        k, dtk = keep_of(r, dt)
        ddt_decay = lay.sum_n(A * (base - gxs))
        row_outs = {"ddtg": (ddt_decay if k is None else ddt_decay * k) + u * gB}
        sdt_gxs = sdt_gxs + lay.chan(dtk) * gxs
        row_outs["du"] = dt * gB + Dv * dout
        row_outs["db"] = lay.sum_c(g * lay.chan(dtu))
        dD = dD + dout * u
        return (_decay(lay, dt, A, keep_row(r)) * g, gxs, sdt_gxs, dD), row_outs

    gnext, _, sdt_gxs, dD = _time_loop(plan, lay, ins, outs, bias, bstep,
                                       (gnext, zeros, zeros, dD), lo=lo, n=T, t0=t0, reverse=True)
    dA = dA + base * lay.chan(sdt) - sdt_gxs - sdt_chp
    return gnext, dA, dD


def _bwd_kernel(*refs, plan: _Plan):
    """GPU: one program per (batch, channel block), chunks in reverse in a loop.
    TPU: one program per (batch, channel block, chunk), chunks in reverse along the
    ``"arbitrary"`` last grid axis; ``g`` carried in a VMEM scratch, ``dA`` / ``dD`` in their
    resident output blocks."""
    lay = _Layout(plan)
    it = iter(refs)
    u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, bias_ref = (next(it) for _ in range(7))
    z_ref = next(it) if plan.has_z else None
    keep_ref = next(it) if plan.has_seg else None
    dy_ref, st_ref, dlast_ref = next(it), next(it), next(it)
    du_ref, ddth_ref, ddtg_ref, db_ref, dc_ref, da_ref, dd_ref = (next(it) for _ in range(7))
    dz_ref = next(it) if plan.has_z else None
    dh0_ref = next(it) if plan.has_h0 else None
    g_scr = next(it) if plan.tpu else None

    A = a_ref[...].astype(f32)
    Dv = d_ref[...].astype(f32)
    bias = bias_ref[...].astype(f32)
    ins = dict(u=u_ref, dt=dt_ref, B=b_ref, C=c_ref, z=z_ref, keep=keep_ref, dy=dy_ref)
    outs = dict(du=du_ref, ddth=ddth_ref, ddtg=ddtg_ref, db=db_ref, dc=dc_ref, dz=dz_ref)
    T = plan.chunk

    if plan.tpu:
        c = pl.program_id(2)

        @pl.when(c == 0)
        def _init():
            g_scr[...] = dlast_ref[...].astype(f32)
            da_ref[...] = jnp.zeros(da_ref.shape, f32)
            dd_ref[...] = jnp.zeros(dd_ref.shape, f32)

        carry = (g_scr[...], da_ref[...], dd_ref[...])
        gnext, dA, dD = _bwd_chunk(plan, lay, ins, outs, A, Dv, bias, st_ref[...], carry,
                                   lo=0, t0=(plan.nc - 1 - c) * T)
        g_scr[...] = gnext
        da_ref[...] = dA
        dd_ref[...] = dD
        if dh0_ref is not None:
            dh0_ref[...] = gnext     # after the last grid step: a'_0 g_0 = dL / d initial_state
        return

    def chunk_body(cr, carry):
        c = plan.nc - 1 - cr
        return _bwd_chunk(plan, lay, ins, outs, A, Dv, bias, st_ref[c], carry, lo=c * T, t0=0)

    dh0, dA, dD = lax.fori_loop(0, plan.nc, chunk_body,
                                (dlast_ref[...].astype(f32), jnp.zeros(A.shape, f32),
                                 jnp.zeros(Dv.shape, f32)))
    da_ref[...] = dA
    dd_ref[...] = dD
    if dh0_ref is not None:
        dh0_ref[...] = dh0           # a'_0 g_0 = dL / d initial_state


# ----------------------------------------------------------------------------- specs
def _input_specs(lay: _Layout, rows, tb):
    """Specs of ``(u, dt, A, B, C, D, dt_bias[, z][, keep])`` and the ``seq`` spec."""
    plan = lay.plan
    seq, bc, vec = lay.seq(rows, tb), lay.bc(rows, tb), lay.vec()
    specs = [seq, seq, lay.mat(), bc, bc, vec, vec]
    if plan.has_z:
        specs.append(seq)
    if plan.has_seg:
        specs.append(lay.keep(rows, tb))
    return specs, seq


def _forward(plan: _Plan, x, dt, A, B, C, D, z, bias, h0, keep):
    """Padded inputs in kernel layout -> ``(y [b, lp, dimp], last, starts)`` (the states in
    kernel layout: ``[b, (nc,) dimp, np]``, TPU ``[b, (nc,) np, dimp]``).

    Time-parallel in three passes (the recurrence is linear in ``h``):
    1. Pallas, one program per (batch, channel block, chunk): each chunk's own
       final state from ``h = 0`` and its summed ``dt``;
    2. JAX: ``starts[c+1] = decay_c * starts[c] + h_local[c]`` with ``starts[0] =
       h0`` (``decay_c = exp(A * sum dt_c)``, 0 if a segment starts in chunk
       ``c``) as an associative scan over chunks (``nc`` elements, log depth);
    3. Pallas, same grid: rerun each chunk from its true start state and write y.
    ``starts`` are also the backward's chunk-start states.
    """
    lay = _Layout(plan)
    specs, seq = _input_specs(lay, plan.chunk, lambda c: c)
    state = lay.state(lambda c: c)
    b, nc = plan.b, plan.nc
    grid = (b, plan.nblk, nc)
    st_shape = (b, nc) + tuple(A.shape)   # A: [dimp, np] / TPU [np, dimp]
    args = [x, dt, A, B, C, D, bias] + ([z] if plan.has_z else []) + ([keep] if plan.has_seg else [])
    hloc, sdt = pl.pallas_call(
        functools.partial(_fwd_chunk_kernel, plan=plan, emit_y=False),
        out_shape=[jax.ShapeDtypeStruct(st_shape, f32),
                   jax.ShapeDtypeStruct(lay.row_out_shape(b, nc), f32)],
        grid=grid, in_specs=specs,
        out_specs=[state, lay.row_out(lambda c: c)],
        interpret=plan.interpret, name="selective_scan_chunk_states",
        **lay.params(3, plan.num_warps),
    )(*args)
    decay = lay.decay(sdt, A.astype(f32))                                # [b, nc, (state)]
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
        out_shape=jax.ShapeDtypeStruct((b, plan.lp, plan.dimp), x.dtype),
        grid=grid, in_specs=specs + [state], out_specs=seq,
        interpret=plan.interpret, name="selective_scan_fwd",
        **lay.params(3, plan.num_warps),
    )(*args, starts)
    return y, after[:, -1], starts


def _backward_call(plan: _Plan, x, dt, A, B, C, D, z, bias, keep, dy, states, dlast):
    """Kernel-layout inputs -> ``(dx, ddt_h, ddt_g, dB parts, dC parts, dA, dD[, dz][, dh0])``
    in kernel layout (see :class:`_Layout`)."""
    lay = _Layout(plan)
    b, lp, dimp = plan.b, plan.lp, plan.dimp
    if plan.tpu:   # grid (batch, block, chunk), chunks in reverse
        rows, tb, grid = plan.chunk, (lambda c: plan.nc - 1 - c), (b, plan.nblk, plan.nc)
        st_spec = lay.state(tb)
    else:          # grid (batch, block), the whole sequence per program
        rows, tb, grid = lp, (lambda: 0), (b, plan.nblk)
        st_spec = pl.BlockSpec((SQ, plan.nc, plan.bd, plan.np_), lambda i, j: (i, 0, j, 0))
    specs, seq = _input_specs(lay, rows, tb)
    specs = specs + [seq, st_spec, lay.state()]
    part, part_shape = lay.parts(rows, tb)
    st_shape = (b,) + tuple(A.shape)
    out_shape = [jax.ShapeDtypeStruct((b, lp, dimp), x.dtype),            # dx
                 jax.ShapeDtypeStruct((b, lp, dimp), f32),                # ddt (h part)
                 jax.ShapeDtypeStruct((b, lp, dimp), f32),                # ddt (g part)
                 jax.ShapeDtypeStruct(part_shape, f32),                   # dB per block
                 jax.ShapeDtypeStruct(part_shape, f32),                   # dC per block
                 jax.ShapeDtypeStruct(st_shape, f32),                     # dA per batch
                 jax.ShapeDtypeStruct(lay.row_out_shape(b), f32)]         # dD per batch
    out_specs = [seq, seq, seq, part, part, lay.state(), lay.row_out()]
    if plan.has_z:
        out_shape.append(jax.ShapeDtypeStruct((b, lp, dimp), z.dtype))
        out_specs.append(seq)
    if plan.has_h0:
        out_shape.append(jax.ShapeDtypeStruct(st_shape, f32))            # d initial_state
        out_specs.append(lay.state())
    args = ([x, dt, A, B, C, D, bias] + ([z] if plan.has_z else [])
            + ([keep] if plan.has_seg else []) + [dy, states, dlast])
    extra = {}
    if plan.tpu:
        from jax.experimental.pallas import tpu as pltpu
        extra["scratch_shapes"] = [pltpu.VMEM(lay.state_shape, f32)]   # adjoint g between chunks
    return pl.pallas_call(
        functools.partial(_bwd_kernel, plan=plan),
        out_shape=out_shape,
        grid=grid,
        in_specs=specs,
        out_specs=out_specs,
        interpret=plan.interpret,
        name="selective_scan_bwd",
        **extra,
        **lay.params(len(grid), plan.num_warps_bwd, arbitrary_last=plan.tpu),
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


def _to_kernel(plan, x, dt, A, B, C, D, z, bias, h0, keep):
    """Padded arrays (GPU orientation) -> this variant's kernel layout (:class:`_Layout`)."""
    lay = _Layout(plan)
    if plan.tpu:  # the small parameters in float32 (B / C: in to_bc)
        A, D, bias = A.astype(f32), D.astype(f32), bias.astype(f32)
    return (x, dt, lay.to_mat(A), lay.to_bc(B), lay.to_bc(C), lay.to_vec(D), z, lay.to_vec(bias),
            None if h0 is None else lay.to_state(h0), None if keep is None else lay.to_keep(keep))


def _unpad_out(plan, y, last):
    y = _unpad_chan(y[:, :plan.l], plan, -1)
    last = _unpad_chan(last[:, :, :plan.n], plan, 1)
    return y, last


def _convert_states(src: _Plan, dst: _Plan, st):
    """Chunk-start states ``[b, nc, ...]`` from ``src``'s kernel layout to ``dst``'s (both
    plans have the same ``nc``); the identity when they are the same plan."""
    if src is dst:
        return st
    assert src.nc == dst.nc, (src.nc, dst.nc)
    st = _Layout(src).from_state(st)                               # [b, nc, dimp, np]
    st = _unpad_chan(st[..., :src.n], src, 2)                      # [b, nc, dim, N]
    st = _pad_axis(_pad_chan(st, dst, 2), 3, dst.np_)
    return _Layout(dst).to_state(st)


def _fwd_variant(plan, canon, x, dt, A, B, C, D, z, bias, h0, keep):
    """``(y, final state, chunk-start states)`` from one variant; the states in the canonical
    plan's layout (``canon``: the plan whose residual layout both variants share)."""
    padded = _pad_all(plan, x, dt, A, B, C, D, z, bias, h0, keep)
    y, last, states = _forward(plan, *_to_kernel(plan, *padded))
    y, last = _unpad_out(plan, y, _Layout(plan).from_state(last))
    return y, last, _convert_states(plan, canon, states)


def _by_platform(plan: _Plan, fn, *args):
    """``fn(variant_plan, canonical_plan, *args)`` for the platform being lowered for.

    Compiled calls (``plan.tpu_plan`` set) go through ``lax.platform_dependent``:
    lowering for TPU (``jax.export(..., platforms=("tpu",))`` or a TPU backend) emits
    the Mosaic variant, anything else the Triton one; only the branch of the target
    platform is lowered.  Both branches must return the same types, so the residuals
    between forward and backward are the original arguments and the chunk-start
    states in the GPU plan's layout (the TPU branch converts; both plans have the same
    number of chunks).  Interpret-mode plans are single-variant.
    """
    return by_platform(plan, lambda variant, *a: fn(variant, plan, *a), *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(plan, *args):
    y, last, _ = _by_platform(plan, _fwd_variant, *args)
    return y, last


def _scan_fwd(plan, *args):
    y, last, states = _by_platform(plan, _fwd_variant, *args)
    return (y, last), (args, states)


def _bwd_variant(plan, canon, args, states, dy, dlast):
    """Gradients of the original arguments from one variant (``states``: canonical)."""
    padded = _pad_all(plan, *args)
    states = _convert_states(canon, plan, states)
    x, dt, A, B, C, D, z, bias, _, keep = padded
    dy = _prep_seq(dy, plan)
    lay = _Layout(plan)
    dlast = lay.to_state(_pad_state(dlast.astype(f32), plan))
    kx, kdt, kA, kB, kC, kD, kz, kbias, _, kkeep = _to_kernel(plan, *padded)
    outs = _backward_call(plan, kx, kdt, kA, kB, kC, kD, kz, kbias, kkeep, dy, states, dlast)
    dx, ddth, ddtg, dBp, dCp, dAp, dDp = outs[:7]
    dBp, dCp, dAp, dDp = lay.from_parts(dBp), lay.from_parts(dCp), lay.from_state(dAp), lay.from_vec(dDp)
    rest = iter(outs[7:])
    dz = next(rest) if plan.has_z else None
    dh0 = next(rest) if plan.has_h0 else None
    if dh0 is not None:
        dh0 = lay.from_state(dh0)
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


def _scan_bwd(plan, res, cts):
    args, states = res
    return _by_platform(plan, _bwd_variant, args, states, *cts)


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------- public API
def _make_plan(x, A, g, softplus, has_z, has_h0, has_seg, interpret, block_d, chunk,
               platform="gpu", seq_itemsize=4):
    b, l, dim = x.shape
    n = A.shape[1]
    gg = 1 if g is None else g
    dg = dim // gg
    block_d = check_int("block_d", block_d, pow2=True, none_ok=True)
    chunk = check_int("chunk_size", 64 if chunk is None else chunk)
    chunk = min(chunk, l)
    nc = -(-l // chunk)
    rows = _ROWS
    if platform == "tpu":
        # Channels fill the 128 lanes (a smaller block_d is raised to 128), N the sublanes
        # (padded to a multiple of 8), chunks are whole groups of rows (8 or 16) steps; the
        # number of chunks stays the GPU one (the residual states are shared), so with a
        # chunk_size that is not a multiple of the group, whole chunks of padding may follow.
        bd = max(_LANES, min(block_d or _LANES, next_pow2(dg)))
        np_ = round_up(n, 8)
        rows = _ROWS * max(1, 4 // seq_itemsize)
        chunk = round_up(chunk, rows)
    else:
        bd = min(block_d or 32, next_pow2(dg))
        np_ = next_pow2(n)
    return _Plan(b=b, l=l, lp=nc * chunk, chunk=chunk, dim=dim, g=gg, dg=dg,
                 dgp=round_up(dg, bd), bd=bd, n=n, np_=np_, softplus=bool(softplus),
                 has_z=has_z, interpret=interpret,
                 num_warps=4 if bd * np_ >= 2048 else 2,
                 num_warps_bwd=4 if bd * np_ >= 1024 else 2,
                 has_h0=has_h0, has_seg=has_seg, rows=rows, platform=platform)


def _plan_for_call(x, dt, z, A, g, softplus, has_h0, has_seg, interpret, block_d, chunk):
    """Interpret mode: one variant (``pltpu.InterpretParams`` -> TPU, else GPU); compiled:
    the GPU plan carrying the TPU one, picked when lowering (:func:`_by_platform`)."""
    interpret = resolve_interpret(interpret)
    make = functools.partial(_make_plan, x, A, g, softplus, z is not None, has_h0, has_seg,
                             interpret, block_d, chunk)
    isz = min(jnp.dtype(v.dtype).itemsize for v in (x, dt, z) if v is not None)
    return select_plan(make, interpret, seq_itemsize=isz)


def tpu_vmem_bytes(batch, length, dim, n, *, groups=None, dtype=jnp.bfloat16, z=True,
                   initial_state=False, segments=False, chunk_size=64, block_d=None) -> dict:
    """VMEM the TPU block specs imply per grid step, per kernel: inputs and outputs
    double-buffered by the Pallas pipeline (and the backward's ``g`` scratch); in-kernel
    temporaries (the state, loop carries, 8-row tiles) not counted.

    ``dtype`` is that of x / dt / z (and y, dx, dz, the cotangent dy); B, C, A, D and
    dt_bias reach the TPU kernels as float32.  ``groups``: the B/C group count (``None``:
    no group axis).  ``batch``, ``length``, ``dim``, ``n``: x's ``[B, L, D]`` and A's ``N``
    (positive ints, numpy ints too); ``z`` / ``initial_state`` / ``segments``: bools, whether the
    call passes that argument (``segments``: segment_ids); ``chunk_size`` / ``block_d``: as for
    :func:`selective_scan`.  A bad argument is a ``ValueError`` naming it.
    ``{"selective_scan_chunk_states": bytes, "selective_scan_fwd": bytes,
    "selective_scan_bwd": bytes}``.
    """
    batch, length, dim, n = (check_int(name, v) for name, v in (
        ("batch", batch), ("length", length), ("dim", dim), ("n", n)))
    groups = check_int("groups", groups, none_ok=True)
    if groups is not None and dim % groups:
        raise ValueError(f"groups must be None or a positive int dividing dim={dim}, got {groups!r}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype (that of x / dt / z), got {dtype!r}")
    z, initial_state, segments = (check_flag(name, v) for name, v in (
        ("z", z), ("initial_state", initial_state), ("segments", segments)))
    x = jax.ShapeDtypeStruct((batch, length, dim), dtype)
    A = jax.ShapeDtypeStruct((dim, n), f32)
    plan = _make_plan(x, A, groups, True, z, initial_state, segments, False, block_d,
                      chunk_size, platform="tpu", seq_itemsize=jnp.dtype(dtype).itemsize)
    isz = jnp.dtype(dtype).itemsize
    q, bd, np_ = plan.chunk, plan.bd, plan.np_
    seq = tpu_tile_bytes((q, bd), isz)
    seq32 = tpu_tile_bytes((q, bd), 4)
    state = tpu_tile_bytes((np_, bd), 4)
    row = tpu_tile_bytes((1, bd), 4)
    bc = lambda size: tpu_tile_bytes((q // plan.rows, np_, plan.rows), size)  # noqa: E731
    ins = (2 + z) * seq + state + 2 * bc(4) + 2 * row + (tpu_tile_bytes((q, 1), 4) if segments else 0)
    chunk_states = ins + state + row
    fwd = ins + state + seq
    bwd = (ins + seq + 2 * state                         # + dy, chunk-start state, d final state
           + seq + 2 * seq32 + 2 * bc(4) + state + row   # du, ddt parts, dB / dC parts, dA, dD
           + z * seq + initial_state * state)            # dz, d initial_state
    return {"selective_scan_chunk_states": 2 * chunk_states, "selective_scan_fwd": 2 * fwd,
            "selective_scan_bwd": 2 * bwd + state}


@functools.partial(jax.jit, static_argnames=("dt_softplus", "return_final_state", "interpret",
                                             "block_d", "chunk_size"))
def _selective_scan_jit(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
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
      A: ``[D, N]`` real, must be negative (``<= 0``; Mamba's ``A = -exp(A_log)``): a
        positive entry makes ``exp(dt * A) > 1`` and the state grow without bound.  A
        concrete positive ``A`` raises a ``ValueError``; a traced one (under ``jit``) is not
        checked.  B, C: ``[B, L, N]`` or ``[B, L, G, N]`` (channel ``d``
        uses group ``d // (D // G)``).  D, dt_bias: ``[D]``.
      dt_softplus: ``dt = softplus(dt + dt_bias)``. Without it ``dt + dt_bias``
        should be ``>= 0``: a negative step makes ``exp(dt * A) > 1`` and the state grow like a
        positive ``A``; it is not checked (the oracle computes the same growth).
      initial_state: ``[B, D, N]`` state before step 0 (the layout of
        :func:`selective_state_update`'s ``state`` and the Mamba decode cache);
        it only reaches the first segment when ``segment_ids`` are given.
      segment_ids: ``[B, L]`` int, packed sequences: the state restarts from zero
        at every ``t`` with ``segment_ids[t] != segment_ids[t-1]``.
      return_final_state: also return the final state ``[B, D, N]`` float32.
      chunk_size: time steps per chunk (default 64; shrunk to L for short inputs; on TPU
        rounded up to a multiple of 8, of 16 when x / dt / z are 16-bit): the forward's
        time-parallel unit and the spacing of the backward's stored states.
      interpret: Pallas interpret mode; ``None`` = on when the default backend is CPU.
        ``False``: compiled, Triton kernels when lowered for GPU and Mosaic kernels
        when lowered for TPU (chosen at lowering time).  A ``pltpu.InterpretParams()``
        runs the TPU variant in Pallas' TPU interpret mode.
      block_d: channels per program (power of two, default 32 on GPU; on TPU 128,
        a smaller value is raised to 128).

    Returns ``y [B, L, D]`` (``x.dtype``) or ``(y, final_state)``.  Differentiable in
    all float array arguments, ``initial_state`` included (float32 math, Pallas
    backward kernel).
    """
    _, _, dim, _, g = validate(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids)
    dt_softplus = check_flag("dt_softplus", dt_softplus)
    return_final_state = check_flag("return_final_state", return_final_state)
    plan = _plan_for_call(x, dt, z, A, g, dt_softplus, initial_state is not None,
                          segment_ids is not None, interpret, block_d, chunk_size)
    if g is None:
        B, C = B[:, :, None, :], C[:, :, None, :]
    D_ = jnp.zeros((dim,), f32) if D is None else D
    bias_ = jnp.zeros((dim,), f32) if dt_bias is None else dt_bias
    keep = None if segment_ids is None else 1.0 - segment_resets(segment_ids).astype(f32)
    h0 = None if initial_state is None else initial_state.astype(f32)
    y, last = _scan(plan, x, dt, A, B, C, D_, z, bias_, h0, keep)
    return (y, last) if return_final_state else y


@functools.wraps(_selective_scan_jit)
def selective_scan(*args, segment_ids=None, **kwargs):
    # concrete int64 ids would wrap to int32 at the jit boundary (0 and 2**32 merge: a lost
    # segment start); host_int32_ids ranks them in int32, keeping where they change
    ids = None if segment_ids is None else host_int32_ids(segment_ids, segment_ids)[0]
    # a concrete positive A (the jitted body only sees a tracer) is refused here
    check_decay(args[2] if len(args) > 2 else kwargs.get("A"), "[D, N]")
    # static (hashed) by the jit: checked here, so an array is named, not "non-hashable"
    for name in ("chunk_size", "block_d"):
        if name in kwargs:
            kwargs[name] = check_int(name, kwargs[name], pow2=name == "block_d", none_ok=True)
    return _selective_scan_jit(*args, segment_ids=ids, **kwargs)


selective_scan.__name__ = selective_scan.__qualname__ = "selective_scan"
