"""Sparse causal flash attention (hash-sparse / QK-sparse) vs the float32 references.

Interpret mode on the CPU (the GPU-layout kernels; the TPU variant is checked in
``tests/test_sparse_attention_lowering.py``).  Each numerics case jits forward + VJP
together with a cheap XLA optimisation level; shapes are small but awkward (T not a
multiple of the tile, several tiles, GQA, rows that see no key).  The tile-count tests
check the skipping against brute force and the dense causal count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import reference as flash_reference
from pallas_kernels.sparse_attention import (causal_tile_count, hash_attention, hash_reference,
                                             hash_tile_count, qk_sparse_attention,
                                             qk_sparse_reference, qk_sparse_tile_count)
from pallas_kernels.sparse_attention.kernel import POS_BLIND, POS_NEVER

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(seed, b, t, hq, hkv, d, dtype=jnp.float32):
    """q, k, v and an output cotangent (numpy RNG: no per-shape compile)."""
    rng = np.random.default_rng(seed)
    mk = lambda s: jnp.asarray(rng.standard_normal(s, np.float32)).astype(dtype)  # noqa: E731
    return mk((b, t, hq, d)), mk((b, t, hkv, d)), mk((b, t, hkv, d)), mk((b, t, hq, d))


def _fwd_bwd(fn, q, k, v, ct, ql, kl, **kw):
    def f(q, k, v, ct, ql, kl):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, ql, kl, **kw), q, k, v)
        return (o,) + vjp(ct)
    return jax.jit(f, compiler_options=FAST_COMPILE)(q, k, v, ct, ql, kl)


def _assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want))))
    assert err <= tol, f"{what}: scaled max error {err:.3g} > {tol}"


def _buckets(seed, shape, values):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.choice(np.asarray(values, np.int64), size=shape), jnp.int32)


# (B, T, Hq, Hkv, D, bucket values, block_q, block_k, dtype)
HASH_CASES = {
    # GQA 2:1, T not a multiple of either tile, 3 buckets
    "gqa_odd_t": (1, 100, 4, 2, 64, [0, 1, 2], 16, 32, jnp.float32),
    # D=128, B=2, many buckets (plenty of rows without a visible key), arbitrary int32 ids
    "d128_wide_ids": (2, 77, 2, 2, 128, [-7, 0, 3, 2 ** 31 - 1, 11, 12, 13, 14], 32, 16,
                      jnp.float32),
    # bf16 inputs, MQA
    "bf16_mqa": (1, 130, 2, 1, 64, [5, 6, 7, 8], 32, 32, jnp.bfloat16),
}


@pytest.mark.parametrize("name", sorted(HASH_CASES))
def test_hash_attention_matches_reference(name):
    b, t, hq, hkv, d, values, bq, bk, dtype = HASH_CASES[name]
    q, k, v, ct = _inputs(0, b, t, hq, hkv, d, dtype)
    qb, kb = _buckets(1, (b, t, hq), values), _buckets(2, (b, t, hkv), values)
    got = _fwd_bwd(hash_attention, q, k, v, ct, qb, kb, interpret=True, block_q=bq, block_k=bk)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = _fwd_bwd(hash_reference, f32(q), f32(k), f32(v), f32(ct), qb, kb)
    for what, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, TOL[dtype], f"{name} {what}")
    # rows whose bucket has no earlier-or-equal key of the same bucket are exactly 0
    vis = np.asarray(jnp.repeat(kb, hq // hkv, axis=2))
    qbn = np.asarray(qb)
    seen = np.array([[[np.any(vis[bi, :i + 1, h] == qbn[bi, i, h]) for h in range(hq)]
                      for i in range(t)] for bi in range(b)])
    if not seen.all():
        assert np.all(np.asarray(got[0], np.float32)[~seen] == 0.0)


def test_one_bucket_is_causal_flash_attention():
    """A single bucket: hash attention == plain causal attention (flash reference)."""
    q, k, v, ct = _inputs(3, 1, 50, 2, 2, 64)
    ones = jnp.zeros((1, 50, 2), jnp.int32) + 4
    got = _fwd_bwd(hash_attention, q, k, v, ct, ones, ones, interpret=True, block_q=16,
                   block_k=16)
    want = jax.jit(lambda q, k, v, ct: (lambda o, vjp: (o,) + vjp(ct))(
        *jax.vjp(lambda q, k, v: flash_reference(q, k, v, causal=True), q, k, v)))(q, k, v, ct)
    for what, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, 1e-5, f"one bucket {what}")
    assert int(hash_tile_count(ones, ones, block_q=16, block_k=16).sum()) == 2 * causal_tile_count(
        50, block_q=16, block_k=16)


def _keep(seed, shape, p):
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def test_qk_sparse_matches_reference_gqa():
    b, t, hq, hkv, d = 1, 90, 4, 2, 64
    q, k, v, ct = _inputs(4, b, t, hq, hkv, d)
    qk, kk = _keep(5, (b, t, hq), 0.5), _keep(6, (b, t, hkv), 0.5)
    got = _fwd_bwd(qk_sparse_attention, q, k, v, ct, qk, kk, interpret=True, block_q=16,
                   block_k=16)
    want = _fwd_bwd(qk_sparse_reference, q, k, v, ct, qk, kk)
    for what, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, 1e-5, f"qk {what}")
    o = np.asarray(got[0])
    assert np.all(o[~np.asarray(qk)] == 0.0)  # dropped queries output zeros


def test_qk_sparse_all_dropped_rows_and_heads():
    """Head 0 drops every query, head 1 every key; elsewhere the first 40 keys are dropped,
    so early kept queries see nothing.  Zeros and zero gradients there, no NaN anywhere."""
    b, t, hq, d = 2, 70, 3, 128
    q, k, v, ct = _inputs(7, b, t, hq, hq, d)
    qk = np.array(_keep(8, (b, t, hq), 0.7))
    kk = np.array(_keep(9, (b, t, hq), 0.7))
    qk[:, :, 0] = False
    kk[:, :, 1] = False
    kk[:, :40, 2] = False
    qk, kk = jnp.asarray(qk), jnp.asarray(kk)
    got = _fwd_bwd(qk_sparse_attention, q, k, v, ct, qk, kk, interpret=True, block_q=32,
                   block_k=16)
    want = _fwd_bwd(qk_sparse_reference, q, k, v, ct, qk, kk)
    for what, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, 1e-5, f"qk dropped {what}")
    o, dq, dk, dv = (np.asarray(x) for x in got)
    assert np.all(o[:, :, :2] == 0) and np.all(o[:, :40, 2] == 0)
    assert np.all(dq[:, :, :2] == 0) and np.all(dk[:, :, :2] == 0) and np.all(dv[:, :, :2] == 0)


# ----------------------------------------------------------------------------- validation
def _valid(b=1, t=20, hq=2, hkv=1, d=64):
    q, k, v, _ = _inputs(0, b, t, hq, hkv, d)
    return q, k, v, jnp.zeros((b, t, hq), jnp.int32), jnp.zeros((b, t, hkv), jnp.int32)


@pytest.mark.parametrize("fn, mutate, match", [
    (hash_attention, lambda a: (a[0][0],) + a[1:], "q must have rank 4"),
    (hash_attention, lambda a: a[:2] + (a[2][:, :10],) + a[3:], "k and v"),
    (hash_attention, lambda a: (a[0][:, :10],) + a[1:], r"\[B, T\]"),
    (hash_attention, lambda a: (a[0], jnp.zeros((1, 20, 3, 64)), jnp.zeros((1, 20, 3, 64)))
     + a[3:], "multiple"),
    (hash_attention, lambda a: (a[0].astype(jnp.bfloat16),) + a[1:], "share a dtype"),
    (hash_attention, lambda a: a[:3] + (a[3][:, :, :1],) + a[4:], "q_buckets"),
    (hash_attention, lambda a: a[:4] + (a[4].astype(jnp.float32),), "k_buckets"),
    (hash_attention, lambda a: a[:4] + (a[4] > 0,), "k_buckets"),
    (qk_sparse_attention, lambda a: a[:3] + (a[3] > 0, a[4] > 0), None),
    (qk_sparse_attention, lambda a: a[:3] + (a[3], a[4] > 0), "q_keep"),
    (qk_sparse_attention, lambda a: a[:3] + (a[3] > 0, jnp.zeros((1, 20, 2), bool)), "k_keep"),
])
def test_validation_errors(fn, mutate, match):
    args = mutate(_valid())
    if match is None:  # the valid qk call: no error (checked abstractly, nothing runs)
        jax.eval_shape(lambda *a: fn(*a, interpret=True), *args)
        return
    with pytest.raises(ValueError, match=match):
        fn(*args, interpret=True)


def test_validation_block_sizes():
    with pytest.raises(ValueError, match="block_q"):
        hash_attention(*_valid(), block_q=48, interpret=True)


# ----------------------------------------------------------------------------- tile counts
def _brute_force(q_keys, k_keys, kind, bq, bk):
    """Independent numpy replay for one (batch row, head): the skip predicate's pairs and the
    pairs that contain at least one visible entry, on the stably sorted, padded tokens."""
    t = len(q_keys)
    t_pad = -(-t // max(bq, bk)) * max(bq, bk)

    def side(keys, is_q):
        if kind == "hash":
            order = np.argsort(keys, kind="stable")
            grp, pos = keys[order].astype(np.int64), order.astype(np.int64)
        else:
            order = np.argsort(~keys, kind="stable")
            grp = np.zeros(t, np.int64)
            pos = np.where(keys[order], order, POS_BLIND if is_q else POS_NEVER)
        grp = np.concatenate([grp, np.full(t_pad - t, grp[-1])])
        pos = np.concatenate([pos, np.full(t_pad - t, POS_BLIND if is_q else POS_NEVER)])
        return grp, pos

    qg, qp = side(q_keys, True)
    kg, kp = side(k_keys, False)
    nq, nk = t_pad // bq, t_pad // bk
    pred = np.zeros((nq, nk), bool)
    need = np.zeros((nq, nk), bool)
    for i in range(nq):
        a = slice(i * bq, (i + 1) * bq)
        for j in range(nk):
            c = slice(j * bk, (j + 1) * bk)
            shared = sorted(set(qg[a].tolist()) & set(kg[c].tolist()))
            if len(shared) == 1:  # positions of the shared group's tokens when it is at an end
                (g,) = shared
                qsel = qg[a] == g if g in (qg[a].min(), qg[a].max()) else np.ones(bq, bool)
                ksel = kg[c] == g if g in (kg[c].min(), kg[c].max()) else np.ones(bk, bool)
                pred[i, j] = kp[c][ksel].min() <= qp[a][qsel].max()
            elif shared:
                pred[i, j] = kp[c].min() <= qp[a].max()
            vis = (qg[a][:, None] == kg[c][None, :]) & (kp[c][None, :] <= qp[a][:, None])
            need[i, j] = vis.any()
    return pred, need


@pytest.mark.parametrize("kind", ["hash", "qk"])
def test_tile_count_kernel_host_and_brute_force(kind):
    """The forward kernel's own count == the host count == a brute-force replay of the skip
    predicate, and every tile pair holding a visible entry is computed."""
    b, t, hq, hkv, d, bq, bk = 2, 200, 2, 1, 64, 16, 32
    q, k, v, _ = _inputs(10, b, t, hq, hkv, d)
    if kind == "hash":
        ql, kl = _buckets(11, (b, t, hq), range(5)), _buckets(12, (b, t, hkv), range(5))
        fn, count = hash_attention, hash_tile_count
    else:
        ql, kl = _keep(11, (b, t, hq), 0.4), _keep(12, (b, t, hkv), 0.4)
        fn, count = qk_sparse_attention, qk_sparse_tile_count
    o, kernel_count = jax.jit(lambda *a: fn(*a, interpret=True, block_q=bq, block_k=bk,
                                            return_tile_count=True),
                              compiler_options=FAST_COMPILE)(q, k, v, ql, kl)
    host = count(ql, kl, block_q=bq, block_k=bk)
    np.testing.assert_array_equal(np.asarray(kernel_count), host)
    qln, kln = np.asarray(ql), np.asarray(kl)
    for bi in range(b):
        for h in range(hq):
            pred, need = _brute_force(qln[bi, :, h], kln[bi, :, h // (hq // hkv)], kind, bq, bk)
            assert pred.sum() == host[bi, h]
            assert not np.any(need & ~pred), "a tile pair with visible entries was skipped"
    assert host.max() < causal_tile_count(t, block_q=bq, block_k=bk)
    ref = jax.jit(hash_reference if kind == "hash" else qk_sparse_reference)(q, k, v, ql, kl)
    _assert_close(o, ref, 1e-5, f"{kind} counted forward")


def test_tile_count_is_a_small_fraction_at_4096():
    """16 uniform buckets at T=4096: the kernels compute a small fraction of the dense causal
    tiles (GPU 64-tiles and TPU 128-tiles); QK-sparse keeping 50%: about a quarter."""
    t = 4096
    qb = _buckets(20, (1, t, 2), range(16))
    kb = _buckets(21, (1, t, 2), range(16))
    for platform, bl in (("gpu", 64), ("tpu", 128)):
        dense = causal_tile_count(t, block_q=bl, block_k=bl)
        frac = hash_tile_count(qb, kb, block_q=bl, block_k=bl, platform=platform) / dense
        assert frac.max() < (0.15 if bl == 64 else 0.25), frac
        qk, kk = _keep(22, (1, t, 2), 0.5), _keep(23, (1, t, 2), 0.5)
        frac_qk = qk_sparse_tile_count(qk, kk, block_q=bl, block_k=bl, platform=platform) / dense
        assert frac_qk.max() < 0.35, frac_qk
    # one bucket / nothing dropped: exactly the dense causal count
    one = jnp.zeros((1, t, 1), jnp.int32)
    assert int(hash_tile_count(one, one)[0, 0]) == causal_tile_count(t)
    keep = jnp.ones((1, t, 1), bool)
    assert int(qk_sparse_tile_count(keep, keep)[0, 0]) == causal_tile_count(t)


_I = jnp.zeros((1, 64, 2), jnp.int32)
_B = jnp.ones((1, 64, 2), bool)


@pytest.mark.parametrize("count, args, kw, match", [
    # an int 0/1 keep mask counted 0 tiles (bitwise ~), as the kernel it must be refused
    (qk_sparse_tile_count, (_B.astype(jnp.int32), _B), {}, "q_keep must be a bool"),
    (qk_sparse_tile_count, (_B, _B.astype(jnp.int32)), {}, "k_keep must be a bool"),
    # float buckets were truncated (0.3 and 0.7 -> one bucket); bool buckets are refused
    (hash_tile_count, (_I + 0.3, _I + 0.7), {}, "q_buckets must be an integer"),
    (hash_tile_count, (_I, _I > 0), {}, "k_buckets must be an integer"),
    (hash_tile_count, (_I, jnp.zeros((1, 64, 3), jnp.int32)), {}, "k_buckets"),  # Hq % Hkv
    (hash_tile_count, (_I, jnp.zeros((1, 32, 2), jnp.int32)), {}, "k_buckets"),
    (hash_tile_count, (_I[0], _I[0]), {}, "q_buckets"),
    (qk_sparse_tile_count, (_B, _B[:, :, :1]), {"block_q": 48}, "block_q"),
    (hash_tile_count, (_I, _I), {"block_k": 48}, "block_k"),
    (hash_tile_count, (_I, _I), {"block_q": True}, "block_q"),
    (hash_tile_count, (_I, _I), {"platform": "cuda"}, "platform"),
    (causal_tile_count, (64,), {"block_q": 48}, "block_q"),
    (causal_tile_count, (64,), {"platform": "cuda"}, "platform"),
    (causal_tile_count, (0,), {}, "t must be"),
])
def test_tile_count_validation(count, args, kw, match):
    """The tile counters check their inputs as the kernels do (they silently miscounted)."""
    with pytest.raises(ValueError, match=match):
        count(*args, **kw)


def test_tile_count_accepts_what_the_kernels_accept():
    """numpy inputs, any integer bucket dtype, GQA labels, TPU tiles."""
    qb = np.arange(64 * 2, dtype=np.int64).reshape(1, 64, 2) % 3
    kb = np.arange(64, dtype=np.uint8).reshape(1, 64, 1) % 3
    n = hash_tile_count(qb, kb, block_q=16, block_k=16)
    assert n.shape == (1, 2) and 0 < n.max() < causal_tile_count(64, block_q=16, block_k=16)
    assert qk_sparse_tile_count(np.ones((1, 64, 2), bool), np.ones((1, 64, 1), bool),
                                platform="tpu").tolist() == [[1, 1]]


def test_return_tile_count_flag_and_refusals():
    """``return_tile_count``: a bool (a string like "no" was read as true); differentiating the
    counted forward gives a ValueError naming it (not a bare AssertionError from Pallas)."""
    q, k, v, _ = _inputs(0, 1, 40, 1, 1, 16)
    ql = _buckets(1, (1, 40, 1), range(2))
    kw = dict(interpret=True, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="return_tile_count must be a bool"):
        hash_attention(q, k, v, ql, ql, return_tile_count="no", **kw)
    with pytest.raises(ValueError, match="return_tile_count"):
        qk_sparse_attention(q, k, v, ql > 0, ql > 0, return_tile_count=1, **kw)

    def loss(q):
        return hash_attention(q, k, v, ql, ql, return_tile_count=True, **kw)[0].sum()
    with pytest.raises(ValueError, match="return_tile_count=True: the counted forward is not "
                                         "differentiable"):
        jax.eval_shape(jax.grad(loss), q)  # traced only: the VJP raises while tracing
    o, cnt = jax.eval_shape(lambda q: hash_attention(q, k, v, ql, ql, return_tile_count=True, **kw), q)
    assert o.shape == q.shape and cnt.shape == (1, 1) and cnt.dtype == jnp.int32

    S = jax.ShapeDtypeStruct
    args = [S((1, 256, 2, 64), jnp.bfloat16)] * 3 + [S((1, 256, 2), jnp.int32)] * 2

    def counted(*a):
        return hash_attention(*a, interpret=False, return_tile_count=True)
    # lowered for CUDA (Pallas' Triton lowering, CPU-only jaxlib): the counting forward kernel
    from pallas_kernels.triton_inspect import triton_calls
    assert [c.name for c in triton_calls(counted, *args)] == ["sparse_attention_fwd"]
