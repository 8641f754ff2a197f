"""CoTFormer family: cotformer / but / adaptive_cotformer invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

import jaxformers as jf
from jaxformers.models import cotformer as cot
from jaxformers.ops.attention import attention, position_causal_attention

SMALL = dict(d_model=32, n_head=2, max_seq_len=32)


def _tokens(b, t, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 256)


def _params(cfg, seed=0):
    m = jf.build(cfg)
    return nn.unbox(jax.jit(m.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def _apply(cfg, params, tok, rng=None):
    m = jf.build(cfg)
    if rng is None:
        return jax.jit(lambda p, t: m.apply({"params": p}, t))(params, tok)
    return jax.jit(lambda p, t, r: m.apply({"params": p}, t, rngs={"dropout": r}))(params, tok, rng)


# ----------------------------------------------------------------- baselines
def test_one_repeat_equals_baseline():
    cfg = jf.get_config("cotformer", "tiny", n_layer=3, n_repeat=1, n_layer_begin=1, **SMALL)
    gpt = jf.get_config("gpt", "tiny", n_layer=3, **SMALL)
    params = _params(gpt)
    tok = _tokens(2, 12)
    np.testing.assert_allclose(_apply(cfg, params, tok), _apply(gpt, params, tok), atol=1e-6, rtol=1e-6)


def test_but_equals_stacked_copies_of_the_mid_blocks():
    cfg = jf.get_config("but", "tiny", n_layer=3, n_repeat=2, n_layer_begin=1, n_layer_end=1, **SMALL)
    p = _params(cfg)
    gpt = jf.get_config("gpt", "tiny", n_layer=4, **SMALL)
    q = dict(p, blocks_0=p["blocks_0"], blocks_1=p["blocks_1"], blocks_2=p["blocks_1"], blocks_3=p["blocks_2"])
    tok = _tokens(2, 12)
    np.testing.assert_allclose(_apply(cfg, p, tok), _apply(gpt, q, tok), atol=1e-5, rtol=1e-5)


def test_cross_repeat_attention_changes_the_model_and_stays_causal():
    cfg = jf.get_config("cotformer", "tiny", n_repeat=3, **SMALL)
    p = _params(cfg)
    tok = _tokens(2, 12)
    out = _apply(cfg, p, tok)
    but = _apply(cfg.replace(model="but"), p, tok)
    assert float(jnp.max(jnp.abs(out - but))) > 1e-3
    tok2 = tok.at[:, 8:].set((tok[:, 8:] + 1) % 256)
    out2 = _apply(cfg, p, tok2)
    np.testing.assert_allclose(out[:, :8], out2[:, :8], atol=1e-6)
    assert float(jnp.max(jnp.abs(out[:, 8:] - out2[:, 8:]))) > 1e-4


# ----------------------------------------------------------------- interleaved view
def _repeat_keys(b, t, r, h, d, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k = jax.random.normal(ks[1], (b, r * t, h, d))      # repeat-major: [repeat 1 | ... | repeat r]
    v = jax.random.normal(ks[2], (b, r * t, h, d))
    pos = jnp.broadcast_to(jnp.tile(jnp.arange(t), r), (b, r * t))
    return q, k, v, pos


@pytest.mark.parametrize("r", [1, 2, 3])
def test_repeat_by_repeat_equals_interleaved_causal(r):
    """Queries of repeat r vs keys of repeats 1..r masked by position == every token repeated r
    times (token-major) with plain causal attention, the query at its own (last) copy."""
    b, t, h, d = 2, 7, 2, 8
    q, k, v, pos = _repeat_keys(b, t, r, h, d)
    qpos = jnp.broadcast_to(jnp.arange(t), (b, t))
    by_position = position_causal_attention(q, k, v, q_pos=qpos, kv_pos=pos, implementation="xla")
    inter = lambda x: x.reshape(b, r, t, h, d).transpose(0, 2, 1, 3, 4).reshape(b, t * r, h, d)  # noqa: E731
    qbuf = jnp.zeros((b, t, r, h, d)).at[:, :, r - 1].set(q).reshape(b, t * r, h, d)
    o = attention(qbuf, inter(k), inter(v), causal=True, implementation="xla")
    np.testing.assert_allclose(by_position, o.reshape(b, t, r, h, d)[:, :, r - 1], atol=1e-5)
    # the kernel path of the hook (sorted keys, plain causal kernel; Pallas interpret mode)
    key_index = jnp.broadcast_to((r - 1) * t + jnp.arange(t), (b, t))
    kern = position_causal_attention(q, k, v, q_pos=qpos, kv_pos=pos, q_key_index=key_index,
                                     implementation="pallas")
    np.testing.assert_allclose(kern, by_position, atol=2e-5)


def test_kernel_path_with_inactive_keys_and_segments():
    b, t, r, h, d = 2, 8, 2, 2, 8
    q, k, v, pos = _repeat_keys(b, t, r, h, d, seed=1)
    drop = jax.random.bernoulli(jax.random.PRNGKey(5), 0.4, (b, r * t)).at[:, t:].set(False)
    pos = jnp.where(drop, cot.NEVER, pos)
    seg = jnp.broadcast_to((jnp.arange(t) >= 3).astype(jnp.int32), (b, t))
    seg_all = jnp.tile(seg, (1, r))
    qpos = jnp.broadcast_to(jnp.arange(t), (b, t))
    key_index = jnp.broadcast_to(t + jnp.arange(t), (b, t))
    ref = position_causal_attention(q, k, v, q_pos=qpos, kv_pos=pos, segment_ids=(seg, seg_all),
                                    implementation="xla")
    kern = position_causal_attention(q, k, v, q_pos=qpos, kv_pos=pos, q_key_index=key_index,
                                     segment_ids=(seg, seg_all), implementation="pallas")
    np.testing.assert_allclose(kern, ref, atol=2e-5)


def test_model_kernel_path_equals_xla_path():
    cfg = jf.get_config("cotformer", "tiny", n_repeat=3, attention_impl="xla", **SMALL)
    p = _params(cfg)
    tok = _tokens(1, 16)
    np.testing.assert_allclose(_apply(cfg.replace(attention_impl="pallas"), p, tok), _apply(cfg, p, tok),
                               atol=5e-5, rtol=1e-5)


# ----------------------------------------------------------------- decoding
@pytest.mark.parametrize("name, overrides", [
    ("cotformer", dict(n_repeat=3)),
    ("cotformer", dict(n_layer=4, n_repeat=2, n_layer_begin=1, n_layer_end=1, ln_mid=True,
                       depth_embedding="linear_learned")),
    ("but", dict(n_repeat=3, ln_mid=True, depth_embedding="learned")),
])
def test_decoding_equals_full_forward(name, overrides):
    cfg = jf.get_config(name, "tiny", **{**SMALL, **overrides})
    m = jf.build(cfg)
    tok = _tokens(2, 9)
    params = _params(cfg, 3)
    full = jax.jit(lambda p, t: m.apply({"params": p}, t))(params, tok)
    cache = jf.init_cache(m, 2, 12)
    step = jax.jit(lambda p, t, cache: m.apply({"params": p}, t, cache=cache))
    logits, cache = step(params, tok[:, :4], cache)
    outs = [logits]
    for i in range(4, 9):
        logits, cache = step(params, tok[:, i:i + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=1e-5)


def test_adaptive_has_no_decoding():
    cfg = jf.get_config("adaptive_cotformer", "tiny", **SMALL)
    m = jf.build(cfg)
    params = _params(cfg)
    with pytest.raises(NotImplementedError, match="not causal"):
        m.apply({"params": params}, _tokens(1, 2), cache=jf.init_cache(m, 1, 4))


def test_adaptive_generate_is_a_clear_error_in_the_api_and_the_cli(tmp_path, monkeypatch, capsys):
    """jf.generate refuses it up front (ValueError, the check_generate hook), so
    experiments.generate exits 2 with a message instead of a NotImplementedError traceback."""
    import jaxformers.training as training
    from experiments import generate as gen_cli
    from jaxformers.data.tokenizer import get_tokenizer
    from jaxformers.training.rundir import TOKENIZER_DIR

    cfg = jf.get_config("adaptive_cotformer", "tiny", **{**SMALL, "n_layer": 3, "vocab_size": 257})
    m = jf.build(cfg)
    params = _params(cfg)
    with pytest.raises(ValueError, match="adaptive_cotformer.*no KV-cache decoding"):
        jf.generate(m, {"params": params}, _tokens(1, 3), 2)
    for name in ("cotformer", "but"):  # the others decode
        c = jf.get_config(name, "tiny", **SMALL)
        assert jf.generate(jf.build(c), {"params": _params(c)}, _tokens(1, 3), 2).shape == (1, 5)
    run = tmp_path / "run"
    get_tokenizer("byte").save(run / TOKENIZER_DIR)
    monkeypatch.setattr(training, "load_run", lambda r, **kw: (cfg, None, params))
    capsys.readouterr()
    assert gen_cli.main(["--run", str(run), "--prompt", "ab", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'adaptive_cotformer' cannot generate") and "Traceback" not in err


# ----------------------------------------------------------------- adaptive
def _adaptive(**kw):
    return jf.get_config("adaptive_cotformer", "tiny", **{**SMALL, "n_layer": 3, **kw})


def test_router_at_full_capacity_equals_cotformer():
    ad = _adaptive(length_factors=(1.0, 1.0), router_mix=False)
    p = _params(ad)
    ref_cfg = jf.get_config("cotformer", "tiny", **{**SMALL, **{k: getattr(ad, k) for k in (
        "n_layer", "n_repeat", "n_layer_begin", "n_layer_end", "ln_mid", "depth_embedding")}})
    ref_p = {k: v for k, v in p.items() if not k.startswith("routers_")}
    tok = _tokens(2, 12)
    np.testing.assert_allclose(_apply(ad, p, tok), _apply(ref_cfg, ref_p, tok), atol=2e-5, rtol=1e-5)


def test_zero_capacity_costs_nothing_and_changes_nothing():
    ad = _adaptive(length_factors=(0.0, 0.0), depth_embedding=None)
    p = _params(ad)
    assert {"routers_0", "routers_1"} <= set(p)  # the params do not depend on the budget
    one = jf.get_config("cotformer", "tiny", **{**SMALL, "n_layer": 3, "n_repeat": 1, "n_layer_begin": 1,
                                                 "n_layer_end": 1, "ln_mid": True})
    ref_p = {k: v for k, v in p.items() if not k.startswith("routers_")}
    tok = _tokens(2, 12)
    np.testing.assert_allclose(_apply(ad, p, tok), _apply(one, ref_p, tok), atol=1e-6)
    # FLOPs: only the first router (d MACs per token) on top of the one-repeat model
    assert ad.flops_per_token(12) - one.flops_per_token(12) == pytest.approx(6 * ad.d_model)
    assert ad.average_depth(12) == 3  # 1 begin + 1 mid (one repeat) + 1 end

    def n_dots(cfg, params):
        jaxpr = jax.make_jaxpr(lambda q: jf.build(cfg).apply({"params": q}, tok))(params)
        return str(jaxpr).count("dot_general")
    assert n_dots(ad, p) == n_dots(one, ref_p) + 1


def test_sampled_budget_path_equals_gathered_path(monkeypatch):
    """Training (masked, traced length factors) == inference (gathered tokens) at one budget."""
    budget = (0.5, 0.25)
    ad = _adaptive(length_factors=budget)
    p = _params(ad)
    tok = _tokens(2, 16)
    gathered = _apply(ad, p, tok)
    monkeypatch.setattr(cot, "sample_length_factors", lambda rng, n: jnp.asarray(budget, jnp.float32))
    masked = _apply(ad, p, tok, rng=jax.random.PRNGKey(1))
    np.testing.assert_allclose(masked, gathered, atol=2e-5, rtol=1e-5)
    full = _apply(ad.replace(length_factors=(1.0, 1.0)), p, tok)
    assert float(jnp.max(jnp.abs(full - gathered))) > 1e-4


def test_training_samples_capacities_and_trains():
    """With a dropout rng (training) the capacities are sampled; the routers get gradients."""
    ad = _adaptive()
    m = jf.build(ad)
    p = _params(ad)
    tok = _tokens(2, 16)

    def loss(q, rng):
        return jnp.mean(jax.nn.log_softmax(m.apply({"params": q}, tok, rngs={"dropout": rng}))[..., 0])
    fn = jax.jit(jax.value_and_grad(loss))
    (v0, g0), (v1, _) = fn(p, jax.random.PRNGKey(0)), fn(p, jax.random.PRNGKey(1))
    assert np.isfinite(float(v0)) and abs(float(v0) - float(v1)) > 1e-6
    assert float(jnp.abs(g0["routers_0"]["kernel"]).sum()) > 0


def test_routed_counts_follow_the_authors_rounding():
    assert cot.routed_counts((0.5, 0.25), 3, 256) == [256, 128, 64]
    assert cot.routed_counts((0.3, 0.0, 0.0), 4, 10) == [10, 3, 0, 0]
    assert cot.routed_counts(None, 3, 8) == [8, 8, 8]


# ----------------------------------------------------------------- FLOPs and config
def test_flops_count_every_repeat():
    kw = dict(SMALL, n_layer=2, n_repeat=2)
    gpt4 = jf.get_config("gpt", "tiny", **{**SMALL, "n_layer": 4})
    t = 32
    attn = 12 * gpt4.n_head * gpt4.dim_head * t
    assert jf.get_config("but", "tiny", **kw).flops_per_token(t) == pytest.approx(gpt4.flops_per_token(t))
    # cotformer: repeat r attends to r * T keys -> (1 + 2) per mid layer instead of 2
    assert jf.get_config("cotformer", "tiny", **kw).flops_per_token(t) == pytest.approx(
        gpt4.flops_per_token(t) + 2 * attn)
    ad = _adaptive(length_factors=(0.5, 0.25))
    assert ad.average_depth(32) == pytest.approx(2 + 1 * 1.75)


@pytest.mark.parametrize("bad, match", [
    (dict(n_layer_begin=1, n_layer_end=1, n_layer=2), "mid layer"),
    (dict(depth_embedding="sinus"), "depth_embedding"),
    (dict(scan_layers=True), "scan_layers"),
    (dict(n_repeat=3, length_factors=(0.5, 0.6)), "length_factors"),
    (dict(n_repeat=0), "n_repeat"),
    (dict(ln_mid="no"), "ln_mid"),  # a string flag is not read by truthiness
    (dict(router_mix=0), "router_mix"),
    (dict(n_repeat=3, length_factors=(0.0, 0.0)), "adaptive_cotformer"),  # not silently ignored
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        jf.get_config("cotformer", "tiny", **bad)
