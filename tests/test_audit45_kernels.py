"""Audit 45, kernel input contracts: a positive SSM decay ``A`` is refused (SSD and the selective
scan, eager calls), the KV-cache write works under ``jax_enable_x64`` (int32 cache index with
int64 zeros crashed ``dynamic_update_slice``), and the attention kernels' float64 contract
(float64 result at float32 precision) is what their docstrings say."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan import reference as ss_reference
from pallas_kernels.selective_scan import selective_scan, selective_state_update
from pallas_kernels.ssd import reference as ssd_reference
from pallas_kernels.ssd import ssd, ssd_state_update


def _r(rng, *shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape, dtype=np.float32))


def _ssd_args(a):
    rng = np.random.default_rng(0)
    return (_r(rng, 1, 16, 2, 16), _r(rng, 1, 16, 2), jnp.asarray(a, jnp.float32),
            _r(rng, 1, 16, 1, 16), _r(rng, 1, 16, 1, 16))


def _ss_args(a):
    rng = np.random.default_rng(0)
    return (_r(rng, 1, 16, 4), _r(rng, 1, 16, 4), jnp.full((4, 8), a, jnp.float32),
            _r(rng, 1, 16, 8), _r(rng, 1, 16, 8))


# ----------------------------------------------------------------- positive A (known issue 1)
@pytest.mark.parametrize("op", ["ssd", "ssd_reference", "ssd_keyword_A"])
def test_ssd_positive_A_raises(op):
    x, dt, A, B, C = _ssd_args([-0.5, 0.5])
    with pytest.raises(ValueError, match=r"A \[H\] must be negative"):
        if op == "ssd":
            ssd(x, dt, A, B, C, chunk_size=16)
        elif op == "ssd_reference":
            ssd_reference(x, dt, A, B, C)
        else:
            ssd(x, dt, A=A, B=B, C=C, chunk_size=16)


@pytest.mark.parametrize("op", ["selective_scan", "reference"])
def test_selective_scan_positive_A_raises(op):
    x, dt, A, B, C = _ss_args(0.3)
    fn = selective_scan if op == "selective_scan" else ss_reference
    with pytest.raises(ValueError, match=r"A \[D, N\] must be negative"):
        fn(x, dt, A, B, C, dt_softplus=True)


def test_state_updates_positive_A_raise():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="A .* must be negative"):
        ssd_state_update(_r(rng, 1, 2, 4, 8), _r(rng, 1, 2, 4), _r(rng, 1, 2), jnp.array([-1.0, 2.0]),
                         _r(rng, 1, 1, 8), _r(rng, 1, 1, 8))
    with pytest.raises(ValueError, match="A .* must be negative"):
        selective_state_update(_r(rng, 1, 4, 8), _r(rng, 1, 4), _r(rng, 1, 4), jnp.ones((4, 8)),
                               _r(rng, 1, 8), _r(rng, 1, 8))


def test_nonpositive_A_accepted_and_traced_A_unchecked():
    """A <= 0 (zero included: no decay) runs and matches the oracle; under jit A is a tracer and
    the precondition is the caller's (documented), so nothing raises there."""
    x, dt, A, B, C = _ssd_args([0.0, -1.0])
    np.testing.assert_allclose(ssd(x, dt, A, B, C, chunk_size=16), ssd_reference(x, dt, A, B, C),
                               rtol=1e-4, atol=1e-4)
    x, dt, A, B, C = _ss_args(0.0)
    np.testing.assert_allclose(selective_scan(x, dt, A, B, C, chunk_size=8), ss_reference(x, dt, A, B, C),
                               rtol=1e-4, atol=1e-4)
    x, dt, A, B, C = _ssd_args([0.1, 0.1])
    y = jax.jit(lambda A: ssd_reference(x, dt, A, B, C))(A)
    assert y.shape == x.shape


# ----------------------------------------------------------------- KV cache under x64 (issue 2)
@pytest.mark.parametrize("index_dtype", [jnp.int32, jnp.int64, None])
def test_write_kv_cache_under_x64(index_dtype):
    from jaxformers.layers.attention import write_kv_cache
    cache = {"k": jnp.zeros((1, 6, 2, 4)), "v": jnp.zeros((1, 6, 2, 4))}
    new = jnp.ones((1, 2, 2, 4))
    with jax.enable_x64(True):
        idx = 3 if index_dtype is None else jnp.asarray(3, index_dtype)
        for fn in (write_kv_cache, jax.jit(write_kv_cache)):
            out = fn(cache, new, 2 * new, idx)
            np.testing.assert_array_equal(np.asarray(out["k"])[0, :, 0, 0], [0, 0, 0, 1, 1, 0])
            np.testing.assert_array_equal(np.asarray(out["v"])[0, :, 0, 0], [0, 0, 0, 2, 2, 0])


@pytest.mark.parametrize("name,kw", [("gpt", {}),
                                     ("landmark", dict(landmark_block=4, landmark_impl="reference"))])
def test_generate_under_x64_equals_default(name, kw):
    import jaxformers as jf
    cfg = jf.get_config(name, "tiny", d_model=32, n_head=2, n_layer=1, vocab_size=64, max_seq_len=64, **kw)
    model = jf.build(cfg)
    params = {"params": jf.init_params(model, jax.random.PRNGKey(0))}
    prompts = np.random.default_rng(0).integers(0, 60, (2, 5)).astype(np.int32)
    want = np.asarray(jf.generate(model, params, prompts, 4, temperature=0.0))
    with jax.enable_x64(True):
        got = np.asarray(jf.generate(model, params, prompts, 4, temperature=0.0))
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------- float64 attention (issue 3)
def test_attention_kernels_float64_contract_is_documented():
    """float64 in -> float64 out, at float32 precision; each public docstring says so."""
    from pallas_kernels.flash_attention import flash_attention, reference
    from pallas_kernels.landmark_attention import landmark_attention, landmark_attention_reference
    from pallas_kernels.sparse_attention import hash_attention, masked_attention, qk_sparse_attention
    for fn in (flash_attention, reference, hash_attention, qk_sparse_attention, masked_attention,
               landmark_attention, landmark_attention_reference):
        assert "float64" in fn.__doc__, fn.__name__
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(rng.standard_normal((1, 32, 2, 16))) for _ in range(3))
        o = flash_attention(q, k, v, causal=True)
        want = reference(q, k, v, causal=True)
        assert o.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(o), np.asarray(want), atol=2e-6)


# ----------------------------------------------------------------- write_kv_cache contracts (new)
@pytest.mark.parametrize("kw,match", [
    (dict(v=jnp.ones((1, 1, 2, 3))), "k and v must have the same shape"),     # was written partially
    (dict(v=jnp.ones((1, 2, 2, 4))), "k and v must have the same shape"),     # v got 2 slots, k 1
    (dict(cache_v=jnp.zeros((1, 6, 2, 3))), "'k' and 'v' must have one shape"),
    (dict(capacity=20, cache_index=7), "capacity must be an int in"),        # was clamped onto slot 5
    (dict(cache_index=1.5), "cache_index must be an integer scalar"),
    (dict(cache_index=True), "cache_index must be an integer scalar"),
    (dict(cache_index=jnp.array([1, 2])), "cache_index must be an integer scalar"),
])
def test_write_kv_cache_bad_arguments(kw, match):
    from jaxformers.layers.attention import write_kv_cache
    cache = {"k": jnp.zeros((1, 6, 2, 4)), "v": kw.pop("cache_v", jnp.zeros((1, 6, 2, 4)))}
    k = jnp.ones((1, 1, 2, 4))
    args = dict(v=k, cache_index=0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        write_kv_cache(cache, k, args.pop("v"), args.pop("cache_index"), **args)


def test_write_kv_cache_traced_index_still_works():
    from jaxformers.layers.attention import write_kv_cache
    cache = {"k": jnp.zeros((1, 6, 2, 4)), "v": jnp.zeros((1, 6, 2, 4))}
    k = jnp.ones((1, 1, 2, 4))
    out = jax.jit(lambda i: write_kv_cache(cache, k, k, i, capacity=5))(jnp.int32(4))
    np.testing.assert_array_equal(np.asarray(out["k"])[0, :, 0, 0], [0, 0, 0, 0, 1, 0])


# ----------------------------------------------------------------- flash reference contracts (new)
@pytest.mark.parametrize("kw,match", [
    (dict(window=0), "window must be a positive int"),        # was: every key masked, zeros out
    (dict(window=-3), "window must be a positive int"),
    (dict(causal="no"), "causal must be a bool"),              # was: read as True
    (dict(hq=3), r"Hq % Hkv == 0"),                            # was: TypeError in a reshape
])
def test_flash_reference_checks_arguments_like_the_kernel(kw, match):
    from pallas_kernels.flash_attention import flash_attention, reference
    rng = np.random.default_rng(0)
    q = _r(rng, 1, 8, kw.pop("hq", 4), 8)
    k = v = _r(rng, 1, 8, 2, 8)
    for fn in (reference, flash_attention):
        with pytest.raises(ValueError, match=match):
            fn(q, k, v, **kw)


def test_references_check_their_return_flags():
    """The oracles read ``return_final_state`` / ``return_lse`` by truthiness ("no" returned a
    tuple); the kernels already refused a non-bool."""
    from pallas_kernels.landmark_attention import landmark_attention_reference
    x, dt, A, B, C = _ss_args(-1.0)
    with pytest.raises(ValueError, match="return_final_state must be a bool"):
        ss_reference(x, dt, A, B, C, return_final_state="no")
    x, dt, A, B, C = _ssd_args([-1.0, -1.0])
    with pytest.raises(ValueError, match="return_final_state must be a bool"):
        ssd_reference(x, dt, A, B, C, return_final_state="no")
    q = _r(np.random.default_rng(0), 1, 8, 2, 8)
    with pytest.raises(ValueError, match="return_lse must be a bool"):
        landmark_attention_reference(q, q, q, block_size=4, return_lse="no")


def test_flash_window_as_a_concrete_jax_int():
    """A 0-d jax integer window reached ``jit`` as a static argument: "Non-hashable static
    arguments are not supported" (sm_scale was already converted); a traced one now names window."""
    from pallas_kernels.flash_attention import flash_attention, reference
    q = _r(np.random.default_rng(0), 1, 16, 2, 8)
    want = flash_attention(q, q, q, window=4)
    for fn in (flash_attention, reference):
        np.testing.assert_allclose(fn(q, q, q, window=jnp.int32(4)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="window must be a concrete positive int"):
        jax.jit(lambda w: flash_attention(q, q, q, window=w))(jnp.int32(4))
