"""Audit 43 (fuzz): a seeded sample of the most awkward legal configurations that the
randomized differential fuzzing of the Pallas kernels (interpret mode) ran, kept as a
permanent forward + VJP check against the plain-JAX float32 references.

Each case: the kernel's output(s) and the gradients of ``<out, ct>`` (random cotangent) with
respect to every float input match the reference within a scaled max error
``max|got - want| / max(1, max|want|)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import BlockSizes, flash_attention
from pallas_kernels.flash_attention import reference as flash_reference
from pallas_kernels.landmark_attention import landmark_attention, landmark_attention_reference
from pallas_kernels.selective_scan import reference as scan_reference
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.sparse_attention import hash_attention, hash_reference
from pallas_kernels.ssd import reference as ssd_reference
from pallas_kernels.ssd import ssd


def _f32(x):
    return x.astype(jnp.float32)


def _check(kernel, ref, args, tol, seed=0):
    """Forward and the VJP w.r.t. every arg of ``kernel`` against ``ref``."""
    out_k, vjp_k = jax.vjp(kernel, *args)
    out_r, vjp_r = jax.vjp(ref, *args)
    rng = np.random.default_rng(seed)
    ct = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), out_k)
    ct_r = jax.tree.map(lambda o, c: c.astype(o.dtype), out_r, ct)
    pairs = list(zip(jax.tree.leaves(out_k), jax.tree.leaves(out_r)))
    pairs += list(zip(vjp_k(ct), vjp_r(ct_r)))
    for i, (got, want) in enumerate(pairs):
        got = np.asarray(_f32(got))
        want = np.asarray(_f32(want))
        assert got.shape == want.shape, (i, got.shape, want.shape)
        assert np.isfinite(got).all(), f"item {i}: non-finite values"
        err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
        assert err <= tol, f"item {i} (0 = output, then outputs' extras, then grads): {err:.3g} > {tol}"


def _normal(rng, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)


# (B, Tq, Tk, Hq, Hkv, D, causal, window, segments, dtype, block_sizes)
_FLASH_CASES = [
    # decode-style queries (Tq < Tk), GQA 3:1, odd head dim, window 3, a (q_ids, kv_ids) pair
    # whose id 0 returns after other documents; separate backward tiles.
    (2, 5, 33, 6, 2, 24, True, 3, "pair", jnp.float32,
     BlockSizes(block_q=16, block_k=16, block_q_dkv=32, block_k_dq=32)),
    # T = block + 1, non-causal window 1 (each row sees only its own key), single-token and
    # returning documents, head dim 80 (padded to 128).
    (3, 17, 17, 2, 1, 80, False, 1, "one", jnp.float32, BlockSizes(block_q=16, block_k=16)),
    # more queries than keys: the first rows sit at negative positions and see no key.
    (1, 20, 7, 2, 2, 8, True, None, None, jnp.bfloat16, None),
]


@pytest.mark.parametrize("case", range(len(_FLASH_CASES)))
def test_flash_attention_awkward_configs(case):
    b, tq, tk, hq, hkv, d, causal, window, seg, dtype, bs = _FLASH_CASES[case]
    rng = np.random.default_rng(case)
    q = _normal(rng, (b, tq, hq, d), dtype)
    k = _normal(rng, (b, tk, hkv, d), dtype)
    v = _normal(rng, (b, tk, hkv, d), dtype)
    ids = None
    if seg == "one":
        pattern = np.array([0, 0, 1, 2, 2, 0, 3, 3, 3, 4, 0, 0, 5, 5, 6, 6, 6] * 4)[:tq]
        ids = jnp.asarray(np.stack([np.roll(pattern, i) for i in range(b)]), jnp.int32)
    elif seg == "pair":
        ids = (jnp.asarray(rng.integers(0, 3, (b, tq)), jnp.int32),
               jnp.asarray(np.tile([0, 0, 1, 1, 2, 0, 0], 5)[:tk][None].repeat(b, 0), jnp.int32))
    kw = dict(causal=causal, window=window)
    _check(lambda q, k, v: flash_attention(q, k, v, segment_ids=ids, block_sizes=bs, **kw),
           lambda q, k, v: flash_reference(_f32(q), _f32(k), _f32(v), segment_ids=ids, **kw),
           (q, k, v), 1e-4 if dtype == jnp.float32 else 3e-2, seed=case)


def _scan_ids(b, length):
    ids = np.array([0, 0, 0, 1, 2, 2, 0, 0, 3] * 8)[:length]    # a single-step segment, id 0 returns
    return jnp.asarray(np.stack([np.roll(ids, i) for i in range(b)]), jnp.int32)


def test_selective_scan_awkward_config():
    """L=37 with chunk 5 (ragged last chunk), 3 groups, block_d 2, every option on."""
    rng = np.random.default_rng(1)
    b, length, g, dim, n = 2, 37, 3, 6, 4
    args = dict(x=_normal(rng, (b, length, dim)), dt=_normal(rng, (b, length, dim), scale=0.5),
                A=-jnp.exp(_normal(rng, (dim, n), scale=0.5)), B=_normal(rng, (b, length, g, n)),
                C=_normal(rng, (b, length, g, n)), D=_normal(rng, (dim,)),
                z=_normal(rng, (b, length, dim)), dt_bias=_normal(rng, (dim,), scale=0.3),
                initial_state=_normal(rng, (b, dim, n)))
    names = list(args)
    static = dict(dt_softplus=True, segment_ids=_scan_ids(b, length), return_final_state=True,
                  chunk_size=5)
    _check(lambda *a: selective_scan(**dict(zip(names, a)), block_d=2, **static),
           lambda *a: scan_reference(**dict(zip(names, a)), **static),
           tuple(args.values()), 1e-4)


def test_ssd_awkward_config():
    """L=17 = chunk + 1, 2 groups of 2 heads, P=3, D [H, P], every option on."""
    rng = np.random.default_rng(3)
    b, length, h, g, p, n = 2, 17, 4, 2, 3, 4
    args = dict(x=_normal(rng, (b, length, h, p)), dt=_normal(rng, (b, length, h)),
                A=-jnp.exp(_normal(rng, (h,), scale=0.5)), B=_normal(rng, (b, length, g, n)),
                C=_normal(rng, (b, length, g, n)), D=_normal(rng, (h, p)),
                z=_normal(rng, (b, length, h, p)), dt_bias=_normal(rng, (h,), scale=0.3),
                initial_state=_normal(rng, (b, h, p, n)))
    names = list(args)
    static = dict(dt_softplus=True, segment_ids=_scan_ids(b, length), return_final_state=True,
                  chunk_size=16)
    _check(lambda *a: ssd(**dict(zip(names, a)), **static),
           lambda *a: ssd_reference(**dict(zip(names, a)), **static),
           tuple(args.values()), 1e-4)


def test_hash_and_landmark_awkward_configs():
    rng = np.random.default_rng(4)
    b, t, hq, hkv, d = 2, 17, 3, 1, 24
    q = _normal(rng, (b, t, hq, d))
    k, v = _normal(rng, (b, t, hkv, d)), _normal(rng, (b, t, hkv, d))
    # negative bucket ids, T = block + 1
    qb = jnp.asarray(rng.integers(0, 2, (b, t, hq)) * -7, jnp.int32)
    kb = jnp.asarray(rng.integers(0, 2, (b, t, hkv)) * -7, jnp.int32)
    _check(lambda q, k, v: hash_attention(q, k, v, qb, kb, block_q=16, block_k=16),
           lambda q, k, v: hash_reference(q, k, v, qb, kb), (q, k, v), 1e-4)
    # ragged last block (17 = 3 * 5 + 2), GQA, the lse output too
    _check(lambda q, k, v: landmark_attention(q, k, v, block_size=5, block_q=16, return_lse=True),
           lambda q, k, v: landmark_attention_reference(q, k, v, block_size=5, return_lse=True),
           (q, k, v), 1e-4)


# ------------------------------------------------------------------ regression (bug found)
def test_numpy_int64_ids_are_not_wrapped_to_32_bits():
    """numpy int64 ids (numpy's default integer) with jax_enable_x64 off were wrapped to int32
    at the jit boundary: 2**33 and 0 became one segment / 2**40 and 2**40 + 2**33 one bucket,
    so the kernels silently attended across documents / buckets (output error 0.43 and 2.3)."""
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(5)
    q = _normal(rng, (1, 8, 1, 16))
    ids = np.array([[2**33] * 4 + [0] * 4], np.int64)
    got = flash_attention(q, q, q, segment_ids=ids, causal=False)
    want = flash_reference(q, q, q, segment_ids=jnp.asarray([[1] * 4 + [0] * 4], jnp.int32),
                           causal=False)
    np.testing.assert_allclose(got, want, atol=1e-5)
    got = flash_attention(q, q, q, segment_ids=(ids, ids), causal=True)
    np.testing.assert_allclose(got, flash_reference(q, q, q, segment_ids=jnp.asarray(
        [[1] * 4 + [0] * 4], jnp.int32)), atol=1e-5)
    qb = np.full((1, 8, 1), 2**40, np.int64)
    kb = np.full((1, 8, 1), 2**40 + 2**33, np.int64)
    assert float(jnp.abs(hash_attention(q, q, q, qb, kb)).max()) == 0.0   # no equal buckets
    from pallas_kernels.sparse_attention import hash_tile_count
    assert int(hash_tile_count(qb, kb, block_q=16, block_k=16).sum()) == 0


# --------------------------------------------------------------------------- sm_scale: a finite number > 0
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.125, np.float32("nan"), 0])
def test_sm_scale_must_be_a_finite_positive_number(bad):
    """NaN / inf / 0 / negative ``sm_scale`` was accepted (NaN output, uniform or inverted
    attention); every implementation now refuses it with the same rule."""
    from jaxformers.ops.attention import attention

    q = jnp.ones((1, 8, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="sm_scale must be a finite number > 0"):
        flash_attention(q, q, q, sm_scale=bad, interpret=True)
    for impl in ("xla", "pallas"):
        with pytest.raises(ValueError, match="sm_scale must be a finite number > 0"):
            attention(q, q, q, sm_scale=bad, implementation=impl)
    # a traced scale still runs on the XLA path; a good concrete one everywhere
    traced = jax.jit(lambda s: attention(q, q, q, sm_scale=s, implementation="xla"))(0.25)
    np.testing.assert_allclose(traced, attention(q, q, q, sm_scale=0.25, implementation="xla"), atol=1e-6)
