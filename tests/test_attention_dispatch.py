"""The attention dispatcher: XLA reference semantics and implementation choice."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.ops import attention, select_implementation, xla_attention


def _naive(q, k, v, mask):
    """Per-head loop with explicit kv-head repetition: an independent oracle."""
    b, tq, hq, d = q.shape
    g = hq // k.shape[2]
    k = jnp.repeat(k, g, axis=2)
    v = jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    s = jnp.where(mask[:, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1) * mask[:, None].any(-1, keepdims=True)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _qkv(b, tq, tk, hq, hkv, d, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, tq, hq, d)), jax.random.normal(ks[1], (b, tk, hkv, d)),
            jax.random.normal(ks[2], (b, tk, hkv, d)))


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 3])
def test_xla_causal_window_gqa(hq, hkv, window):
    q, k, v = _qkv(2, 9, 9, hq, hkv, 8)
    i, j = np.arange(9)[:, None], np.arange(9)[None]
    mask = (j <= i) & ((j > i - window) if window else True)
    out = attention(q, k, v, causal=True, window=window, implementation="xla")
    np.testing.assert_allclose(out, _naive(q, k, v, jnp.asarray(mask)[None]), atol=1e-5)


def test_decode_queries_at_end_and_offset():
    q, k, v = _qkv(1, 3, 10, 2, 2, 8)
    i, j = np.arange(3)[:, None] + 7, np.arange(10)[None]
    out = attention(q, k, v, causal=True, implementation="xla")
    np.testing.assert_allclose(out, _naive(q, k, v, jnp.asarray(j <= i)[None]), atol=1e-5)
    out2 = attention(q, k, v, causal=True, q_offset=2, implementation="xla")
    np.testing.assert_allclose(out2, _naive(q, k, v, jnp.asarray(j <= i - 5)[None]), atol=1e-5)


def test_segments_and_fully_masked_rows():
    q, k, v = _qkv(1, 6, 6, 2, 1, 4)
    seg = jnp.array([[1, 1, 2, 2, 2, 3]])
    out = attention(q, k, v, causal=True, segment_ids=seg, implementation="xla")
    mask = (seg[:, :, None] == seg[:, None, :]) & jnp.tril(jnp.ones((6, 6), bool))
    np.testing.assert_allclose(out, _naive(q, k, v, mask), atol=1e-5)
    # a query with no visible key outputs zeros and has finite gradients
    qids, kvids = jnp.array([[5, 1, 1, 1, 1, 1]]), jnp.ones((1, 6), jnp.int32)
    out = xla_attention(q, k, v, causal=False, segment_ids=(qids, kvids))
    np.testing.assert_array_equal(out[:, 0], 0.0)
    g = jax.grad(lambda q: xla_attention(q, k, v, causal=False, segment_ids=(qids, kvids)).sum())(q)
    assert np.isfinite(g).all()


@pytest.mark.parametrize("bad, match", [
    (dict(window=0), "window"),
    (dict(implementation="flash"), "implementation"),
])
def test_bad_arguments(bad, match):
    q, k, v = _qkv(1, 4, 4, 2, 2, 4)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **bad)


def test_bad_shapes():
    q, k, v = _qkv(1, 4, 4, 3, 2, 4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, k, v)
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        attention(q[0], k[0], v[0])


def test_auto_picks_xla_on_cpu_and_cudnn_refuses():
    q, k, v = _qkv(1, 4, 4, 2, 2, 4)
    assert select_implementation(q, k) == "xla"
    with pytest.raises(ValueError, match="cudnn"):
        attention(q, k, v, implementation="cudnn")


def test_auto_picks_pallas_on_tpu_when_it_fits_vmem(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    S = jax.ShapeDtypeStruct
    q, k = S((1, 1024, 8, 128), jnp.bfloat16), S((1, 1024, 2, 128), jnp.bfloat16)
    assert select_implementation(q, k) == "pallas"
    assert select_implementation(q, k, window=256, segment_ids=S((1, 1024), jnp.int32)) == "pallas"
    assert select_implementation(S((1, 8, 8, 128), jnp.bfloat16), k) == "xla"  # decode query
    assert select_implementation(q, k, q_offset=3) == "xla"
    long_q, long_k = S((1, 65536, 8, 128), jnp.bfloat16), S((1, 65536, 8, 128), jnp.bfloat16)
    assert select_implementation(long_q, long_k) == "xla"  # whole K/V of a head > VMEM budget


def test_pallas_implementation_matches_xla_through_dispatch():
    """The model-facing entry reaches the Pallas kernel (interpret mode on CPU)."""
    q, k, v = _qkv(1, 40, 40, 4, 2, 16)
    seg = jnp.array([[1] * 15 + [2] * 25])
    for kw in (dict(), dict(window=7), dict(segment_ids=seg)):
        ref = attention(q, k, v, implementation="xla", **kw)
        out = attention(q, k, v, implementation="pallas", **kw)
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


def test_model_with_pallas_attention_matches_xla():
    import jaxformers as jf
    c = jf.get_config("llama", "tiny", n_layer=1, d_model=64, n_head=4, n_kv_head=2, d_ff=128)
    tok = jax.random.randint(jax.random.PRNGKey(0), (1, 24), 0, 256)
    params = jf.init_params(jf.build(c), jax.random.PRNGKey(0))
    ref = jf.build(c.replace(attention_impl="xla")).apply({"params": params}, tok)
    out = jf.build(c.replace(attention_impl="pallas")).apply({"params": params}, tok)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
