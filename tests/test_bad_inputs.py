"""Bad input gives a ValueError naming the argument, never a silent wrong answer or a crash deep
inside XLA (the cases an audit of the public API found)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.training import TrainConfig

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def gpt():
    c = jf.get_config("gpt", "tiny", n_layer=1, d_model=32, n_head=2, vocab_size=16, max_seq_len=16)
    m = jf.build(c)
    return m, {"params": jf.init_params(m, jax.random.PRNGKey(0))}


def test_kv_cache_overflow_raises_eagerly_and_poisons_under_jit(gpt):
    m, p = gpt
    tok = jnp.array([[1, 2, 3, 4, 5, 6]])
    _, cache = m.apply(p, tok[:, :3], cache=jf.init_cache(m, 1, 4))
    with pytest.raises(ValueError, match="KV cache is full"):  # 3 + 3 > 4 (XLA would clamp the write)
        m.apply(p, tok[:, 3:], cache=cache)
    with pytest.raises(ValueError, match="do not fit a KV cache of max_len=4"):
        m.apply(p, tok, cache=jf.init_cache(m, 1, 4))
    with pytest.raises(ValueError, match="batch_size=3"):
        m.apply(p, jnp.ones((3, 1), jnp.int32), cache=jf.init_cache(m, 2, 4))
    # under jit the index is traced: an overflowing chunk gives NaN, never wrong numbers
    step = jax.jit(lambda params, t, c: m.apply(params, t, cache=c))
    logits, _ = step(p, tok[:, 3:], cache)
    assert bool(jnp.isnan(logits).all())
    fits, _ = step(p, tok[:, 3:4], cache)  # 3 + 1 <= 4: fine
    full = m.apply(p, tok[:, :4])
    np.testing.assert_allclose(fits[:, 0], full[:, 3], atol=1e-5)


def test_token_ids_outside_the_vocabulary(gpt):
    m, p = gpt
    for bad in (16, -1):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=16\)"):
            m.apply(p, jnp.array([[1, 2, bad]]))
        with pytest.raises(ValueError, match="prompt_tokens must be ids"):
            jf.generate(m, p, jnp.array([[1, bad]]), 2)
    with pytest.raises(ValueError, match="prompt_tokens must be integer"):  # not truncated to ints
        jf.generate(m, p, jnp.array([[1.7, 2.2]]), 2, temperature=0.0)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=NAN), "temperature"),
    (dict(temperature="0.5"), "temperature"), (dict(top_k=0), "top_k"), (dict(top_k=17), "top_k"),
    (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_sampling_arguments(gpt, kw, match):
    m, p = gpt
    with pytest.raises(ValueError, match=match):
        jf.sample_logits(jnp.zeros((2, 16)), jax.random.PRNGKey(0), **kw)
    with pytest.raises(ValueError, match=match):
        jf.generate(m, p, jnp.array([[1, 2]]), 2, **kw)


def test_sample_logits_shapes_and_top_p_edge():
    with pytest.raises(ValueError, match=r"logits must be \[B, V\]"):
        jf.sample_logits(jnp.zeros((16,)), jax.random.PRNGKey(0))
    logits = jnp.tile(jnp.array([[0.0, 1.0, 5.0]]), (500, 1))
    got = jf.sample_logits(logits, jax.random.PRNGKey(1), top_p=1e-6)  # near-greedy
    assert bool((got == 2).all())


@pytest.mark.parametrize("kw, match", [
    (dict(lr=NAN), "lr must be a finite number"), (dict(lr=INF), "lr"),
    (dict(grad_clip=NAN), "grad_clip"), (dict(min_lr_ratio=NAN), "min_lr_ratio"),
    (dict(warmup_fraction=NAN), "warmup_fraction"), (dict(weight_decay=INF), "weight_decay"),
    (dict(steps=100, warmup_steps=1000), r"warmup_steps=1000 must be in \[0, 100\]"),
])
def test_train_config_rejects_non_finite_and_overlong_warmup(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)
    TrainConfig(steps=100, warmup_steps=100)  # the whole run warming up is allowed


@pytest.mark.parametrize("kw", [dict(norm_eps=NAN), dict(norm_eps=INF), dict(rope_theta=NAN),
                                dict(init_std=NAN), dict(init_std=-0.02)])
def test_model_config_rejects_non_finite(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        jf.get_config("llama", "tiny", **kw)


def test_quantize_checks_spec_params_and_calibration():
    from jaxformers.quant import QuantSpec, quant_config, quantize
    c = jf.get_config("llama", "tiny", n_layer=1, d_model=32, n_head=2, n_kv_head=1, d_ff=64,
                      vocab_size=16, max_seq_len=16)
    params = jf.init_params(jf.build(c), jax.random.PRNGKey(0))
    for kw, match in ((dict(rotate="no"), "rotate must be a bool"), (dict(w_sym=1), "w_sym"),
                      (dict(calib_batch=0), "calib_batch"), (dict(w_groupsize=0), "w_groupsize"),
                      (dict(seed=-1), "seed"), (dict(a_bits=4, a_sym="yes"), "a_sym")):
        with pytest.raises(ValueError, match=match):
            QuantSpec(**kw)
    with pytest.raises(ValueError, match="w_groupsize=24 must divide"):
        quantize(c, params, QuantSpec(w_bits=4, w_groupsize=24))
    gptq = QuantSpec(w_bits=4, w_method="gptq", rotate=False)
    with pytest.raises(ValueError, match=r"calibration tokens must be ids in \[0, vocab_size=16\)"):
        quantize(c, params, gptq, calibration=np.full((2, 8), 99))
    with pytest.raises(ValueError, match="calibration must be int tokens"):
        quantize(c, params, gptq, calibration=np.ones((2, 8), np.float32))
    # module.init's {"params": ...} is accepted as well as the bare tree
    qc, qp = quantize(c, {"params": params}, QuantSpec(w_bits=8, rotate=False))
    assert qc == quant_config(c, QuantSpec(w_bits=8, rotate=False))
    assert set(qp) == set(params)
