"""Audit 45, the plain-JAX oracles' argument checks: the sparse-attention references refuse what
the kernels refuse (float buckets, non-bool keep masks, bad shapes, a bad mask), the flash /
landmark / sparse references share the kernels' ``sm_scale`` rule, a negative step ``dt`` without
softplus is documented (not refused: committed tests rely on it), ``write_kv_cache`` refuses ``capacity=True``,
and the flash kernel's window check lives in ``static_window`` only."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_attention import reference as flash_reference
from pallas_kernels.landmark_attention import landmark_attention_reference
from pallas_kernels.selective_scan import reference as ss_reference
from pallas_kernels.sparse_attention import (hash_attention, hash_reference, masked_attention,
                                             qk_sparse_attention, qk_sparse_reference, sparse_mask)
from pallas_kernels.ssd import reference as ssd_reference
from pallas_kernels.ssd import ssd


def _r(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))


def _qkv(t=8, hq=2, hkv=1, d=8):
    rng = np.random.default_rng(0)
    return _r(rng, 1, t, hq, d), _r(rng, 1, t, hkv, d), _r(rng, 1, t, hkv, d)


# ------------------------------------------------------------- sparse oracles (known issue 1)
_BAD_HASH = [
    (lambda qb, kb: (qb.astype(jnp.float32), kb), "q_buckets must be an integer"),
    (lambda qb, kb: (qb, kb.astype(bool)), "k_buckets must be an integer"),
    (lambda qb, kb: (qb[:, :4], kb), r"q_buckets must have shape \[B, T, H\]"),
    (lambda qb, kb: (qb, kb[..., None]), r"k_buckets must have shape \[B, T, H\]"),
]


@pytest.mark.parametrize("op", ["kernel", "reference"])
@pytest.mark.parametrize("bad,match", _BAD_HASH)
def test_hash_reference_refuses_what_the_kernel_refuses(op, bad, match):
    q, k, v = _qkv()
    qb, kb = bad(jnp.zeros((1, 8, 2), jnp.int32), jnp.zeros((1, 8, 1), jnp.int32))
    fn = hash_attention if op == "kernel" else hash_reference
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, qb, kb)


_BAD_QK = [
    (lambda qk, kk: (qk.astype(jnp.int32), kk), "q_keep must be a bool"),     # was read as != 0
    (lambda qk, kk: (qk, kk.astype(jnp.float32)), "k_keep must be a bool"),
    (lambda qk, kk: (qk[..., :1], kk), r"q_keep must have shape \[B, T, H\]"),
]


@pytest.mark.parametrize("op", ["kernel", "reference"])
@pytest.mark.parametrize("bad,match", _BAD_QK)
def test_qk_sparse_reference_refuses_what_the_kernel_refuses(op, bad, match):
    q, k, v = _qkv()
    qk, kk = bad(jnp.ones((1, 8, 2), bool), jnp.ones((1, 8, 1), bool))
    fn = qk_sparse_attention if op == "kernel" else qk_sparse_reference
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, qk, kk)


@pytest.mark.parametrize("which,match", [("q_rank", "q must have rank 4"), ("hkv", "multiple of"),
                                         ("int_q", "floating point"), ("t", "self-attention")])
def test_sparse_references_check_qkv(which, match):
    q, k, v = _qkv()
    lab_q, lab_k = jnp.zeros((1, 8, 2), jnp.int32), jnp.zeros((1, 8, 1), jnp.int32)
    if which == "q_rank":
        q = q[0]
    elif which == "hkv":  # Hq=2, Hkv=3
        k = v = jnp.zeros((1, 8, 3, 8))
        lab_k = jnp.zeros((1, 8, 3), jnp.int32)
    elif which == "int_q":
        q, k, v = (x.astype(jnp.int32) for x in (q, k, v))
    else:
        k = v = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match=match):
        hash_reference(q, k, v, lab_q, lab_k)
    with pytest.raises(ValueError, match=match):
        qk_sparse_reference(q, k, v, lab_q.astype(bool), lab_k.astype(bool))


def test_hash_reference_int64_buckets_do_not_wrap():
    """numpy int64 ids 0 and 2**32 are different buckets (the kernel ranks them in int32)."""
    q, k, v = _qkv()
    qb = np.zeros((1, 8, 2), np.int64)
    kb = np.full((1, 8, 1), 2 ** 32, np.int64)  # no key shares a query's bucket: all rows 0
    np.testing.assert_array_equal(np.asarray(hash_reference(q, k, v, qb, kb)), 0.0)
    np.testing.assert_array_equal(np.asarray(hash_attention(q, k, v, qb, kb)), 0.0)


@pytest.mark.parametrize("mask,match", [
    (lambda m: m.astype(jnp.float32), "mask must be a bool"),
    (lambda m: m[0], r"mask must have shape \[B, Hq, Tq, Tk\]"),
    (lambda m: m[:, :, :, :5], r"mask must have shape \[B, Hq, Tq, Tk\]"),
])
def test_masked_attention_checks_mask(mask, match):
    q, k, v = _qkv()
    m = sparse_mask(jnp.zeros((1, 8, 2), jnp.int32), jnp.zeros((1, 8, 1), jnp.int32), 2, 1)
    with pytest.raises(ValueError, match=match):
        masked_attention(q, k, v, mask(m))


def test_sparse_references_still_match_and_broadcast():
    """Valid calls are unchanged: decoding shapes (Tq < Tk) and a broadcast [1, 1, Tq, Tk] mask."""
    q, k, v = _qkv()
    qb = jnp.asarray(np.random.default_rng(1).integers(0, 2, (1, 8, 2)), jnp.int32)
    kb = qb[..., :1]
    np.testing.assert_allclose(hash_reference(q, k, v, qb, kb), hash_attention(q, k, v, qb, kb), atol=1e-5)
    causal = jnp.tril(jnp.ones((8, 8), bool))[None, None]
    np.testing.assert_allclose(masked_attention(q, k, v, causal), flash_reference(q, k, v), atol=1e-5)
    o = masked_attention(q[:, -2:], k, v, causal[:, :, -2:])
    np.testing.assert_allclose(o, flash_reference(q[:, -2:], k, v), atol=1e-5)


# ------------------------------------------------------------- sm_scale (known issue 2)
@pytest.mark.parametrize("scale", [float("nan"), -0.5, 0.0, float("inf"), np.array([0.1, 0.2]), True])
def test_references_share_the_kernels_sm_scale_rule(scale):
    q, k, v = _qkv()
    lab_q, lab_k = jnp.zeros((1, 8, 2), jnp.int32), jnp.zeros((1, 8, 1), jnp.int32)
    m = sparse_mask(lab_q, lab_k, 2, 1)
    calls = [lambda: flash_attention(q, k, v, sm_scale=scale),
             lambda: flash_reference(q, k, v, sm_scale=scale),
             lambda: landmark_attention_reference(q, k, v, block_size=4, sm_scale=scale),
             lambda: hash_reference(q, k, v, lab_q, lab_k, sm_scale=scale),
             lambda: qk_sparse_reference(q, k, v, lab_q > 0, lab_k > 0, sm_scale=scale),
             lambda: masked_attention(q, k, v, m, scale)]
    for call in calls:
        with pytest.raises(ValueError, match="sm_scale must be"):
            call()


def test_references_accept_concrete_and_traced_sm_scale():
    q, k, v = _qkv()
    want = flash_attention(q, k, v, sm_scale=0.3)
    for s in (0.3, np.float32(0.3), jnp.float32(0.3)):
        np.testing.assert_allclose(flash_reference(q, k, v, sm_scale=s), want, atol=1e-5)
    got = jax.jit(lambda s: flash_reference(q, k, v, sm_scale=s))(0.3)  # traced: used unchecked
    np.testing.assert_allclose(got, want, atol=1e-5)
    g = jax.grad(lambda s: landmark_attention_reference(q, k, v, block_size=4, sm_scale=s).sum())(0.3)
    assert np.isfinite(g)


# ------------------------------------------------------------- negative dt (known issue 3)
def test_negative_dt_without_softplus_is_documented_and_consistent():
    """A negative step without softplus grows the state (dt = -2, A = -1, 16 steps: max |y| ~ 1e14).
    Refusing it broke committed tests that feed raw normal dt without softplus to the kernels and
    oracles, so it stays accepted: the docstrings say so, and kernel and oracle agree on it."""
    from pallas_kernels.selective_scan import kernel as ss_kernel
    from pallas_kernels.ssd import kernel as ssd_kernel
    for doc in (ss_reference.__module__, ssd_reference.__module__):
        assert "should be ``>= 0``" in sys.modules[doc].__doc__
    for fn in (ss_kernel._selective_scan_jit, ssd_kernel._ssd_jit):
        assert "should be ``>= 0``" in fn.__doc__
    rng = np.random.default_rng(0)
    x, B, C = _r(rng, 1, 16, 2, 16), _r(rng, 1, 16, 1, 16), _r(rng, 1, 16, 1, 16)
    dt, A = jnp.full((1, 16, 2), -0.5), jnp.array([-1.0, -1.0])
    np.testing.assert_allclose(ssd(x, dt, A, B, C, chunk_size=16), ssd_reference(x, dt, A, B, C),
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- write_kv_cache (known issue 4)
@pytest.mark.parametrize("capacity", [True, False, np.bool_(True)])
def test_write_kv_cache_refuses_bool_capacity(capacity):
    from jaxformers.layers.attention import write_kv_cache
    cache = {"k": jnp.zeros((1, 6, 2, 4)), "v": jnp.zeros((1, 6, 2, 4))}
    k = jnp.ones((1, 1, 2, 4))
    with pytest.raises(ValueError, match="capacity must be an int"):
        write_kv_cache(cache, k, k, 0, capacity=capacity)


# ------------------------------------------------------------- window check (known issue 5)
@pytest.mark.parametrize("window", [0, -3, 2.0, True, np.array([2, 3])])
def test_flash_window_check_is_static_windows(window):
    """One check (static_window) for the kernel, forward_with_stats and the oracle, same message."""
    from pallas_kernels.flash_attention.kernel import forward_with_stats
    q, k, v = _qkv()
    for fn in (flash_attention, forward_with_stats, flash_reference):
        with pytest.raises(ValueError, match="window must be a positive int or None"):
            fn(q, k, v, window=window)


def test_flash_validate_has_no_window_copy():
    import inspect

    from pallas_kernels.flash_attention import kernel
    assert "window must be" not in inspect.getsource(kernel._validate)


# ------------------------------------------------------------- landmark q_offset (new)
@pytest.mark.parametrize("off", [1.5, True, np.array([1, 2]), jnp.float32(2.0)])
def test_landmark_reference_q_offset_must_be_an_integer_scalar(off):
    """q_offset=1.5 made fractional query positions (a third answer, neither offset 1's nor 2's);
    True was read as 1; a [B] array failed in int() with a TypeError."""
    k = _r(np.random.default_rng(0), 1, 8, 2, 8)
    with pytest.raises(ValueError, match="q_offset must be an integer scalar"):
        landmark_attention_reference(k[:, :2], k, k, block_size=4, q_offset=off)


def test_landmark_reference_integer_q_offsets_still_work():
    k = _r(np.random.default_rng(0), 1, 8, 2, 8)
    want = landmark_attention_reference(k[:, :2], k, k, block_size=4, q_offset=2)
    for off in (np.int64(2), jnp.int32(2)):
        np.testing.assert_array_equal(landmark_attention_reference(k[:, :2], k, k, block_size=4, q_offset=off), want)
    got = jax.jit(lambda o: landmark_attention_reference(k[:, :2], k, k, block_size=4, q_offset=o))(jnp.int32(2))
    np.testing.assert_allclose(got, want, atol=1e-6)


# ------------------------------------------------------------- public mask helpers (new)
def test_attention_mask_window_checked():
    """attention_mask(4, 4, True, 0) hid every key (an all-False mask), silently."""
    from pallas_kernels.flash_attention import attention_mask
    for w in (0, -1, 1.5):
        with pytest.raises(ValueError, match="window must be a positive int or None"):
            attention_mask(4, 4, True, w)
    np.testing.assert_array_equal(attention_mask(3, 3, True, 1)[0], np.eye(3, dtype=bool))


@pytest.mark.parametrize("args,match", [
    (((1, 8, 2), (1, 8, 1), 4, 1), "q_labels must have shape"),   # was a TypeError deep in jnp
    (((1, 8, 2), (1, 4, 1), 2, 1), "k_labels must have shape"),
    (((1, 8, 2), (1, 8, 2), 2, 1), "k_labels must have shape"),
    (((1, 8, 2), (1, 8, 3), 2, 3), "hq % hkv == 0"),
])
def test_sparse_mask_checks_shapes(args, match):
    qs, ks, hq, hkv = args
    with pytest.raises(ValueError, match=match):
        sparse_mask(jnp.zeros(qs, jnp.int32), jnp.zeros(ks, jnp.int32), hq, hkv)
