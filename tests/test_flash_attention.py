"""Pallas flash attention vs the float32 reference (interpret mode on CPU).

Each case jits forward + VJP together with a cheap XLA optimisation level (the
interpreted kernels are big programs whose CPU compile time dominates).
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import (BlockSizes, attention_mask, flash_attention,
                                            forward_with_stats, reference)
from pallas_kernels.flash_attention.masks import MaskSpec, visited_blocks

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(seed, b, tq, tk, hq, hkv, d, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, tq, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, tk, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, tk, hkv, d), jnp.float32).astype(dtype)
    ct = jax.random.normal(ks[3], (b, tq, hq, d), jnp.float32).astype(dtype)
    return q, k, v, ct


def _packed_ids(seed, b, t, n_docs):
    """Sorted segment ids (packed documents) ``[B, T]``."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, t), size=(b, n_docs - 1)), axis=1)
    ids = (np.arange(t)[None, None, :] >= cuts[:, :, None]).sum(1)
    return jnp.asarray(ids, jnp.int32)


def _fwd_bwd(fn, q, k, v, ct, **kw):
    def f(q, k, v, ct):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
        return (o,) + vjp(ct)
    return jax.jit(f, compiler_options=FAST_COMPILE)(q, k, v, ct)


def _jit(fn, **kw):
    """``fn`` with keyword args bound, jitted with the cheap compile options."""
    return jax.jit(lambda *a: fn(*a, **kw), compiler_options=FAST_COMPILE)


def _assert_close(got, want, tol, what):
    got = np.asarray(got.astype(jnp.float32))
    want = np.asarray(want.astype(jnp.float32))
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want))))
    assert err <= tol, f"{what}: scaled max error {err:.3g} > {tol}"


# (B, Tq, Tk, Hq, Hkv, D, causal, window, segments, dtype, BlockSizes)
#   segments: None | "array" (one [B, T] array) | "pair" ((q_ids, kv_ids)) | "unsorted"
CASES = {
    "odd_causal_f32": (2, 37, 37, 2, 2, 16, True, None, None, jnp.float32, BlockSizes(16, 16)),
    "gqa2_bf16_b1": (1, 100, 100, 4, 2, 32, True, None, None, jnp.bfloat16, BlockSizes(32, 32)),
    "gqa4_noncausal": (2, 100, 100, 4, 1, 16, False, None, None, jnp.float32, BlockSizes(32, 16)),
    "decode_tq5": (1, 5, 77, 4, 2, 32, True, None, None, jnp.float32, BlockSizes(16, 32)),
    "decode_window_bf16": (2, 5, 77, 2, 1, 16, True, 20, None, jnp.bfloat16, BlockSizes(16, 16)),
    "window_causal": (2, 64, 64, 2, 2, 16, True, 10, None, jnp.float32, BlockSizes(16, 16)),
    "window_noncausal_d24": (1, 45, 45, 4, 4, 24, False, 12, None, jnp.float32, BlockSizes(16, 16)),
    "offset14_window40": (1, 37, 51, 2, 1, 16, True, 40, None, jnp.float32, BlockSizes(16, 16)),
    "segments_array": (2, 70, 70, 4, 2, 16, True, None, "array", jnp.float32, BlockSizes(16, 16)),
    "segments_pair_bf16": (2, 33, 50, 2, 1, 32, False, None, "pair", jnp.bfloat16, BlockSizes(16, 16)),
    "segments_unsorted_window_gqa4": (1, 48, 48, 4, 1, 16, True, 16, "unsorted", jnp.float32,
                                      BlockSizes(16, 16)),
    "d64_bf16": (1, 96, 96, 2, 2, 64, True, None, None, jnp.bfloat16, BlockSizes(32, 32)),
    "mixed_bwd_blocks": (1, 50, 50, 2, 1, 16, True, None, None, jnp.float32,
                         BlockSizes(16, 32, block_q_dq=32, block_k_dq=16, block_q_dkv=16,
                                    block_k_dkv=32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    b, tq, tk, hq, hkv, d, causal, window, seg, dtype, bs = CASES[name]
    q, k, v, ct = _inputs(zlib.crc32(name.encode()) % 1000, b, tq, tk, hq, hkv, d, dtype)
    segment_ids = None
    if seg == "array":
        segment_ids = _packed_ids(1, b, tq, 3)
    elif seg == "pair":
        # q ids are the last Tq of a packed kv layout (decode-style alignment)
        kv_ids = _packed_ids(2, b, tk, 3)
        segment_ids = (kv_ids[:, tk - tq:], kv_ids)
    elif seg == "unsorted":
        segment_ids = jnp.asarray(np.random.default_rng(3).integers(0, 3, (b, tq)), jnp.int32)
    kw = dict(causal=causal, window=window, segment_ids=segment_ids)
    got = _fwd_bwd(flash_attention, q, k, v, ct, block_sizes=bs, **kw)
    want = _fwd_bwd(reference, q, k, v, ct, **kw)
    assert got[0].dtype == q.dtype and got[0].shape == q.shape
    for g, w, what in zip(got, want, ("o", "dq", "dk", "dv")):
        assert g.shape == w.shape, what
        _assert_close(g, w, TOL[dtype], f"{name}/{what}")


def test_fully_masked_rows_are_zero_with_finite_grads():
    # Tq > Tk (first queries sit before every key) plus a query segment with no keys.
    b, tq, tk, h, d = 1, 40, 24, 2, 16
    q, k, v, ct = _inputs(7, b, tq, tk, h, h, d, jnp.float32)
    q_ids = jnp.where(jnp.arange(tq) >= 30, 5, 0)[None].astype(jnp.int32)  # id 5: no keys
    kv_ids = jnp.zeros((b, tk), jnp.int32)
    kw = dict(causal=True, segment_ids=(q_ids, kv_ids))
    o, dq, dk, dv = _fwd_bwd(flash_attention, q, k, v, ct, block_sizes=BlockSizes(16, 16), **kw)
    want = _fwd_bwd(reference, q, k, v, ct, **kw)
    visible = np.asarray(attention_mask(tq, tk, True, None, q_ids, kv_ids)).any(-1)[0]  # [Tq]
    assert (~visible).sum() == 16 + 10
    np.testing.assert_array_equal(np.asarray(o)[0, ~visible], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[0, ~visible], 0.0)
    for g, w, what in zip((o, dq, dk, dv), want, ("o", "dq", "dk", "dv")):
        _assert_close(g, w, 1e-5, what)


def test_output_buffers_fully_written():
    # Interpret mode fills output buffers with NaN before the kernel runs, so a
    # block the kernel forgets to write shows up as NaN.  Covers padded query rows
    # (Tq=5 in a 16-row block), padded keys and kv blocks that no query visits.
    q, k, v, ct = _inputs(11, 1, 5, 77, 2, 2, 16, jnp.float32)
    bs = BlockSizes(16, 16)
    o_pad, lse, _ = _jit(forward_with_stats, window=8, block_sizes=bs)(q, k, v)
    assert o_pad.shape[1] == 16 and not np.any(np.isnan(np.asarray(o_pad)))
    assert not np.any(np.isnan(np.asarray(lse)))
    o, dq, dk, dv = _fwd_bwd(flash_attention, q, k, v, ct, window=8, block_sizes=bs)
    for x in (o, dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(x)))
    # keys before position 77 - 5 - 8 + 1 are never visited: exactly zero gradients
    np.testing.assert_array_equal(np.asarray(dk)[:, :60], 0.0)
    np.testing.assert_array_equal(np.asarray(dv)[:, :60], 0.0)


def _brute_blocks(spec, bq, bk):
    """Visited / fully-visible block sets from the dense mask (the definition)."""
    tq, tk, w = spec.q_len, spec.kv_len, spec.window
    pos = np.arange(tq)[:, None] + tk - tq  # absolute query positions
    j = np.arange(tk)[None, :]
    m = np.ones((tq, tk), bool)
    if spec.causal:
        m &= j <= pos
    if w is not None:
        m &= (j > pos - w) if spec.causal else (np.abs(pos - j) < w)
    nq, nk = -(-tq // bq), -(-tk // bk)
    vis = np.zeros((nq, nk), bool)
    full = np.zeros((nq, nk), bool)
    for i in range(nq):
        for j in range(nk):
            tile = m[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            vis[i, j] = tile.any()
            full[i, j] = tile.all() and (j + 1) * bk <= tk  # padded key blocks need the mask
    return vis, full


@pytest.mark.parametrize("causal", [True, False])
def test_block_ranges_match_brute_force(causal):
    # [lo, hi) must be exactly the hull of the visible blocks (all visible blocks are
    # contiguous) and [full_lo, full_hi) exactly the fully-visible ones; both directions.
    for window in (None, 1, 3, 16, 21):
        for tq, tk in ((1, 7), (5, 77), (16, 16), (37, 37), (37, 51), (64, 40), (50, 100)):
            spec = MaskSpec(causal, window, tq, tk)
            for bq, bk in ((16, 16), (8, 32), (32, 8)):
                vis, full = _brute_blocks(spec, bq, bk)
                for i in range(vis.shape[0]):
                    r = spec.kv_block_range(i, bq, bk)
                    got = np.zeros(vis.shape[1], bool)
                    got[r.lo:r.hi] = True
                    np.testing.assert_array_equal(got, vis[i], err_msg=f"{spec} {bq} {bk} q-block {i}")
                    got[:] = False
                    got[r.full_lo:r.full_hi] = True
                    np.testing.assert_array_equal(got, full[i], err_msg=f"{spec} full q-block {i}")
                for j in range(vis.shape[1]):
                    r = spec.q_block_range(j, bq, bk)
                    got = np.zeros(vis.shape[0], bool)
                    got[r.lo:r.hi] = True
                    np.testing.assert_array_equal(got, vis[:, j], err_msg=f"{spec} {bq} {bk} kv-block {j}")
                    got[:] = False
                    got[r.full_lo:r.full_hi] = True
                    # the dK/dV kernel also treats q blocks with padded rows as partial
                    want = full[:, j] & (np.arange(vis.shape[0]) < tq // bq)
                    np.testing.assert_array_equal(got, want, err_msg=f"{spec} full kv-block {j}")


def test_block_range_helper_counts():
    t, blk = 4 * 32, 32
    assert visited_blocks(MaskSpec(True, None, t, t), blk, blk)[0] == 10  # of 16
    assert visited_blocks(MaskSpec(False, None, t, t), blk, blk)[0] == 16
    assert visited_blocks(MaskSpec(True, 32, t, t), blk, blk)[0] == 7
    r = MaskSpec(True, None, t, t).kv_block_range(2, blk, blk)
    assert (r.lo, r.hi, r.full_lo, r.full_hi) == (0, 3, 0, 2)  # diagonal block is masked
    r = MaskSpec(True, None, t, t).q_block_range(1, blk, blk)
    assert (r.lo, r.hi, r.full_lo, r.full_hi) == (1, 4, 2, 4)


@pytest.mark.parametrize("causal,window,docs,expected", [
    (True, None, False, 10),   # lower triangle of a 4x4 block grid
    (True, 32, False, 7),      # band
    (False, None, True, 4),    # 4 block-aligned documents: block diagonal only
])
def test_kernel_skips_masked_blocks(causal, window, docs, expected):
    t, blk = 128, 32
    q, k, v, _ = _inputs(5, 2, t, t, 2, 1, 16, jnp.float32)
    seg = jnp.broadcast_to(jnp.arange(t) // 32, (2, t)).astype(jnp.int32) if docs else None
    _, _, visited = _jit(forward_with_stats, causal=causal, window=window, segment_ids=seg,
                         block_sizes=BlockSizes(blk, blk))(q, k, v)
    visited = np.asarray(visited)
    assert visited.shape == (2, 2, 4)
    np.testing.assert_array_equal(visited.sum(-1), expected)
    spec = MaskSpec(causal, window, t, t)
    host = visited_blocks(spec, blk, blk, seg, seg) if docs else visited_blocks(spec, blk, blk)
    assert np.all(host == expected)


def test_bad_inputs_raise_value_error():
    # numpy inputs: validation happens before any kernel is built or compiled
    q = np.zeros((1, 8, 4, 16), np.float32)
    k = v = np.zeros((1, 8, 2, 16), np.float32)
    with pytest.raises(ValueError, match="query heads"):
        flash_attention(q, np.zeros((1, 8, 3, 16), np.float32), np.zeros((1, 8, 3, 16), np.float32))
    with pytest.raises(ValueError, match="q must have rank 4"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(q[..., :8], k, v)
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q, k, v, segment_ids=np.zeros((1, 7), np.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q, k, v, segment_ids=(np.zeros((1, 8), np.int32), np.zeros((2, 8), np.int32)))
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q[:, :4], k, v, segment_ids=np.zeros((1, 8), np.int32))
    for w in (0, -3):
        with pytest.raises(ValueError, match="window"):
            flash_attention(q, k, v, window=w)
    with pytest.raises(ValueError, match="block_q"):
        flash_attention(q, k, v, block_sizes=BlockSizes(24, 16))
    # flags are bools, not read by truthiness ("no" would mean causal)
    with pytest.raises(ValueError, match="causal must be a bool"):
        flash_attention(q, k, v, causal="no")
    with pytest.raises(ValueError, match="interpret must be None"):
        flash_attention(q, k, v, interpret="yes")
    # empty axes: a clear error, not a division by zero or a slice error inside the kernel
    for shape in ((0, 8, 4, 16), (1, 8, 4, 0)):
        e = np.zeros(shape[:2] + (2, shape[3]), np.float32)
        with pytest.raises(ValueError, match="non-empty"):
            flash_attention(np.zeros(shape, np.float32), e, e)


def test_sm_scale_and_interpret_default():
    # interpret=None must pick interpret mode on CPU (compiling for CPU would fail)
    q, k, v, _ = _inputs(3, 1, 20, 20, 2, 2, 32, jnp.float32)
    got = _jit(flash_attention, sm_scale=0.3, block_sizes=BlockSizes(16, 16))(q, k, v)
    _assert_close(got, reference(q, k, v, sm_scale=0.3), 1e-5, "sm_scale=0.3")
    # a concrete numpy / jax scalar is converted to the static Python float
    same = flash_attention(q, k, v, sm_scale=jnp.float32(0.3), block_sizes=BlockSizes(16, 16))
    np.testing.assert_array_equal(same, got)
    # a traced scale cannot be baked into the kernel: a clear error, not a hashing failure
    with pytest.raises(ValueError, match="sm_scale"):
        jax.jit(lambda s: flash_attention(q, k, v, sm_scale=s))(0.3)
    with pytest.raises(ValueError, match="sm_scale"):
        flash_attention(q, k, v, sm_scale=jnp.ones((2,)))


def test_bench_script_quick(tmp_path):
    import json

    from experiments import bench_attention
    bench_attention.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["jax_version"] == jax.__version__ and res["rows"]
    assert any(r["impl"] == "pallas" and r.get("ms") for r in res["rows"])


def test_tpu_interpret_params_reach_the_pallas_call():
    """``interpret=pltpu.InterpretParams()`` must run Pallas' TPU interpreter (TPU memory
    spaces, race detector), not the generic interpreter: the plan keeps the params object."""
    from jax.experimental.pallas import tpu as pltpu
    from pallas_kernels.flash_attention.kernel import _prepare
    q = jnp.zeros((1, 8, 2, 64), jnp.float32)
    params = pltpu.InterpretParams()
    _, _, plan = _prepare(q, q, q, True, None, None, None, None, params)
    assert plan.tpu and plan.interpret is params
    _, _, plan = _prepare(q, q, q, True, None, None, None, None, True)
    assert not plan.tpu and plan.interpret is True
