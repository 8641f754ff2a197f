"""Regression tests from the attention / dispatch / baseline-layer audit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.ops import attention, select_implementation, xla_attention
from pallas_kernels.flash_attention import BlockSizes, flash_attention, reference


def _qkv(b=2, tq=6, tk=6, hq=2, hkv=2, d=8, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, tq, hq, d)).astype(dtype),
            jax.random.normal(ks[1], (b, tk, hkv, d)).astype(dtype),
            jax.random.normal(ks[2], (b, tk, hkv, d)).astype(dtype))


def test_auto_never_sends_a_noncausal_window_to_cudnn(monkeypatch):
    # cuDNN (jax.nn.dot_product_attention) has no right-hand window: "auto" on a GPU used to pick
    # it for causal=False + window and jax raised "cuDNN doesn't support right window".
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v = _qkv(1, 16, 16, 2, 2, 16, jnp.bfloat16)
    assert select_implementation(q, k, window=4, causal=True) == "cudnn"
    assert select_implementation(q, k, window=4, causal=False) == "xla"  # Tq < 128: not Pallas
    assert select_implementation(q, k, causal=False) == "cudnn"  # dense non-causal is fine
    with pytest.raises(ValueError, match="right-hand window"):
        attention(q, k, v, causal=False, window=4, implementation="cudnn")
    out = attention(q, k, v, causal=False, window=4)  # auto: runs (on XLA), same as the reference
    want = xla_attention(q, k, v, causal=False, window=4)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_causal_must_be_a_bool_on_every_implementation():
    # the XLA path read causal="no" by truthiness (causal), the kernel path raised
    q, k, v = _qkv()
    for impl in ("xla", "auto"):
        with pytest.raises(ValueError, match="causal must be a bool"):
            attention(q, k, v, causal="no", implementation=impl)
    np.testing.assert_array_equal(attention(q, k, v, causal=np.bool_(False)),
                                  attention(q, k, v, causal=False))


@pytest.mark.parametrize("rate", [-0.5, 1.0, 1.5, True, "0.1"])
def test_dropout_rate_outside_unit_interval_raises(rate):
    # -0.5 silently scaled probabilities by 1/1.5; >= 1 silently zeroed the output
    q, k, v = _qkv()
    rng = jax.random.PRNGKey(1)
    with pytest.raises(ValueError, match="dropout_rate"):
        attention(q, k, v, dropout_rate=rate, dropout_rng=rng)
    with pytest.raises(ValueError, match="dropout_rate"):
        xla_attention(q, k, v, dropout_rate=rate, dropout_rng=rng)


def test_window_accepts_numpy_ints_and_rejects_bools():
    q, k, v = _qkv()
    np.testing.assert_array_equal(attention(q, k, v, window=np.int64(3)), attention(q, k, v, window=3))
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=True)  # used to mean window=1


def test_segment_ids_and_q_offset_shapes_are_validated():
    q, k, v = _qkv(b=2)
    with pytest.raises(ValueError, match="segment_ids must have shapes"):
        attention(q, k, v, segment_ids=jnp.zeros((3, 6), jnp.int32))  # was an XLA broadcast error
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        attention(q, k, v, segment_ids=jnp.zeros((2, 6), jnp.float32))  # the kernel rejects these
    with pytest.raises(ValueError, match="q_offset"):
        attention(q, k, v, q_offset=jnp.zeros((3,), jnp.int32))
    # per-row offsets [B] and scalars still work
    per_row = attention(q, k, v, q_offset=jnp.array([0, 5]))
    np.testing.assert_allclose(per_row[1], attention(q, k, v, q_offset=5)[1], atol=1e-6)


def test_noncausal_window_cross_lengths_agree_across_implementations():
    # window w: |pos - j| < w (w - 1 keys each side), queries at Tk - Tq + i; kernel, reference
    # and XLA path (forward and every gradient) agree for Tq < Tk and Tq > Tk.
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    for tq, tk in ((9, 20), (20, 9)):
        q, k, v = _qkv(1, tq, tk, 2, 1, 16, seed=tq)

        def fb(fn, **kw):
            def f(q, k, v):
                o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, causal=False, window=3, **kw), q, k, v)
                return (o,) + vjp(jnp.ones_like(o))
            return jax.jit(f, compiler_options=fast)(q, k, v)

        want = fb(reference)
        for got in (fb(flash_attention, block_sizes=BlockSizes(16, 16)), fb(xla_attention)):
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, atol=2e-5)
        # off-by-one: exactly 2 * 3 - 1 = 5 keys per interior query
        pos = tk - tq + np.arange(tq)[:, None]
        n_keys = (np.abs(pos - np.arange(tk)[None]) < 3).sum(1)
        assert n_keys.max() == 5
