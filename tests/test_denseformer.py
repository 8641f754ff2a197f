"""DenseFormer: init == baseline, DWA semantics vs a direct reference, scan/remat, decoding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.layers import Block
from jaxformers.models.denseformer import DenseFormerConfig, DWAPlan, dwa_weights

SMALL = dict(vocab_size=64, d_model=32, n_head=2, max_seq_len=32)


def _tokens(b=2, t=12, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, SMALL["vocab_size"])


def _configs(base, n_layer=4, **dwa):
    extra = {"n_kv_head": 1, "d_ff": 64} if base == "llama" else {}
    scan = dwa.pop("scan_layers", False)
    remat = dwa.pop("remat", "none")
    bc = jf.get_config(base, "tiny", n_layer=n_layer, scan_layers=scan, remat=remat, **SMALL, **extra)
    dc = DenseFormerConfig.from_base(base, "tiny", n_layer=n_layer, scan_layers=scan, remat=remat,
                                     **SMALL, **extra, **dwa)
    return bc, dc


def _base_params(bc):
    return _unrolled_base_params(bc.replace(scan_layers=False, remat="none"))


@functools.lru_cache(maxsize=None)
def _unrolled_base_params(bc):
    """Random unrolled baseline params with the shapes of its init (eval_shape: nothing compiled)."""
    shapes = jax.eval_shape(lambda r: jf.init_params(jf.build(bc), r, _tokens()), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    fill = lambda path, x: jnp.asarray(  # noqa: E731  norm scales ~1, weights ~N(0, 0.1)
        (1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
        + 0.1 * rng.standard_normal(x.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def _init_pair(bc, dc, tok=None):
    """Baseline params, and DenseFormer params holding the very same block/embedding weights
    (+ DenseFormer's own init of alpha / skip gains)."""
    bp = dict(_base_params(bc))
    dp = dict(bp)
    if DWAPlan.from_config(dc).n_rows:
        dp["dwa_alpha"] = jnp.asarray(DWAPlan.from_config(dc).init())
    if dc.skip_gains:
        for i in range(dc.n_layer):
            dp[f"blocks_{i}"] = {**bp[f"blocks_{i}"], "attn_skip_gain": jnp.float32(1),
                                 "mlp_skip_gain": jnp.float32(1)}
    if dc.scan_layers:
        bp, dp = _stack(bp, bc.n_layer), _stack(dp, dc.n_layer)
    # the tree is exactly DenseFormer's own init tree (checked abstractly: no compile)
    shapes = jax.eval_shape(lambda r: jf.init_params(jf.build(dc), r, _tokens()), jax.random.PRNGKey(0))
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, dp)
    return bp, dp


def _apply(config, params, tok, **kw):  # eager: tiny op-by-op kernels compile once and are shared
    return jf.build(config).apply({"params": params}, tok, **kw)


def _perturb(params, seed=0, scale=0.3):
    alpha = params["dwa_alpha"]
    noise = scale * jax.random.normal(jax.random.PRNGKey(seed), alpha.shape)
    return {**params, "dwa_alpha": alpha + noise}


def _stack(params, n_layer):
    params = dict(params)
    blocks = [params.pop(f"blocks_{i}") for i in range(n_layer)]
    params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return params


# ------------------------------------------------------------- init == base
@pytest.mark.parametrize("base, dwa", [
    ("gpt", dict()),                                         # 1x1
    ("llama", dict()),
    ("gpt", dict(dwa_dilation=2, dwa_period=2)),             # 2x2
    ("llama", dict(dwa_dilation=3, dwa_period=3, n_layer=5)),  # p does not divide L
    ("gpt", dict(scan_layers=True)),
    ("llama", dict(scan_layers=True, dwa_dilation=2, remat="full")),
    ("gpt", dict(dwa_mode="last_only", dwa_dilation=2)),
    ("llama", dict(skip_gains=True)),
    ("gpt", dict(skip_gains=True, dwa_mode="none")),
])
def test_init_equals_baseline_exactly(base, dwa):
    bc, dc = _configs(base, **dwa)
    tok = _tokens()
    bp, dp = _init_pair(bc, dc, tok)
    # op by op (no jit) the two models run the same kernels: bit-exact in fp32
    ref = jf.build(bc).apply({"params": bp}, tok)
    out = jf.build(dc).apply({"params": dp}, tok)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    # (under jit XLA fuses the two programs differently: equal up to float rounding, ~1e-7)
    # ... and any change of alpha changes the output
    if "dwa_alpha" in dp:
        moved = jf.build(dc).apply({"params": _perturb(dp)}, tok)
        assert float(jnp.max(jnp.abs(moved - ref))) > 1e-3


# ----------------------------------------------- DWA semantics vs reference
def _reference_forward(dc, params, tok):
    """Direct transcription of the paper's formula with the blocks applied one by one."""
    model = jf.build(dc)
    block_cls = Block  # skip gains, if any, are an option of the shared block
    alpha, points = dwa_weights(dc, params)
    positions = jnp.broadcast_to(jnp.arange(tok.shape[1]), tok.shape)
    x = model.apply({"params": params}, tok, method=lambda m, t: m.embed(t))
    outs = [x]
    for m in range(1, dc.n_layer + 1):
        x, _ = block_cls(dc).apply({"params": params[f"blocks_{m - 1}"]}, x, positions)
        outs.append(x)
        if m in points:
            r = points.index(m)
            x = sum(alpha[r, j] * outs[j] for j in range(m + 1) if j % dc.dwa_dilation == m % dc.dwa_dilation)
    return model.apply({"params": params}, x, method=lambda m, h: m.logits(m.final_norm(h)))


@pytest.mark.parametrize("dwa", [
    dict(dwa_dilation=2, dwa_period=1),
    dict(dwa_dilation=4, dwa_period=5, n_layer=6),  # the paper's 4x5: single DWA after block 5
    dict(dwa_mode="last_only", dwa_dilation=2, n_layer=5, skip_gains=True),
])
def test_matches_reference_formula_and_scan(dwa):
    bc, dc = _configs("gpt", **dwa)
    tok = _tokens()
    _, dp = _init_pair(bc, dc, tok)
    dp = _perturb(dp, seed=1)
    if dc.skip_gains:
        dp = {k: ({**v, "attn_skip_gain": jnp.float32(0.7), "mlp_skip_gain": jnp.float32(1.3)}
                  if k.startswith("blocks_") else v) for k, v in dp.items()}
    ref = _reference_forward(dc, dp, tok)
    out = _apply(dc, dp, tok)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    # scan_layers (+ remat) gives the same function of the same (stacked) parameters
    sc = dc.replace(scan_layers=True, remat="dots")
    scanned = _apply(sc, _stack(dp, dc.n_layer), tok)
    np.testing.assert_allclose(scanned, ref, atol=1e-5, rtol=1e-5)


def test_plan_and_alpha_mask():
    plan = DWAPlan.from_config(DenseFormerConfig.from_base("gpt", "tiny", n_layer=12, dwa_dilation=4,
                                                           dwa_period=5))
    assert plan.points == (5, 10)
    mask = plan.mask()
    np.testing.assert_array_equal(np.nonzero(mask[0])[0], [1, 5])
    np.testing.assert_array_equal(np.nonzero(mask[1])[0], [2, 6, 10])
    assert plan.init()[1, 10] == 1 and plan.init().sum() == 2


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("scan", [False, True])
def test_gradients_reach_alpha(scan):
    bc, dc = _configs("llama", n_layer=2, dwa_dilation=2, scan_layers=scan, skip_gains=True)
    tok = _tokens(2, 8)
    _, dp = _init_pair(bc, dc, tok)
    model = jf.build(dc)

    def loss(p):
        logits = model.apply({"params": p}, tok[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, 1:, None], -1))

    g = jax.jit(jax.grad(loss))(dp)
    ga = np.asarray(g["dwa_alpha"])
    mask = DWAPlan.from_config(dc).mask().astype(bool)
    assert np.all(np.abs(ga[mask]) > 0), ga  # every used weight gets a gradient (also X_0's)
    assert np.all(ga[~mask] == 0)  # entries outside the dilation class / future are inert
    blocks = g["blocks"] if scan else {"attn_skip_gain": g["blocks_0"]["attn_skip_gain"]}
    assert np.all(np.abs(np.asarray(blocks["attn_skip_gain"])) > 0)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))


# ------------------------------------------------------------------- decoding
def test_kv_decoding_equals_full_forward():
    """Per-layer KV caches suffice: DWA mixes over depth at each position (scan path, 3x2)."""
    bc, dc = _configs("llama", scan_layers=True, dwa_period=2, dwa_dilation=3)
    tok = _tokens(2, 9)
    _, dp = _init_pair(bc, dc, tok)
    dp = _perturb(dp, seed=2)
    m = jf.build(dc)
    full = jax.jit(lambda p, t: m.apply({"params": p}, t))(dp, tok)
    cache = jf.init_cache(m, 2, 12)
    step = jax.jit(lambda p, t, cache: m.apply({"params": p}, t, cache=cache))
    outs = []
    for i in range(tok.shape[1]):  # token by token: one compiled step
        logits, cache = step(dp, tok[:, i:i + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=1e-5)
    assert int(cache["index"]) == tok.shape[1]


# ----------------------------------------------------------- config / registry
@pytest.mark.parametrize("field, value", [
    ("dwa_dilation", 0), ("dwa_dilation", 5), ("dwa_period", 0), ("dwa_period", 7),
    ("dwa_period", 1.5), ("dwa_period", True), ("dwa_mode", "every"), ("base", "mamba"),
])
def test_bad_dwa_fields_rejected(field, value):
    if field != "base":
        with pytest.raises(ValueError, match=field):
            DenseFormerConfig.from_base("gpt", "tiny", n_layer=4, **{field: value})
    else:
        with pytest.raises(ValueError, match=field):
            DenseFormerConfig.from_base(value, "tiny")
    with pytest.raises(ValueError, match=field):
        jf.get_config("denseformer", "tiny", n_layer=4, **{field: value})


def test_registry_presets_and_axes():
    assert "denseformer" in jf.list_models()
    c = jf.get_config("denseformer", "llama-tiny", dwa_dilation=2)
    assert c.base == "llama" and c.norm == "rmsnorm" and not c.tie_embeddings and c.dwa_dilation == 2
    assert jf.get_config("denseformer", "tiny").norm == "layernorm"
    assert jf.config_from_dict(c.to_dict()) == c
    axes = jf.logical_axes(jf.build(c.replace(scan_layers=True, **SMALL)))
    assert tuple(axes["dwa_alpha"]) == ("layers", None)
    assert axes["blocks"]["attn"]["q"]["kernel"][0] == "layers"
    # alpha is tiny: L(L+3)/2 used weights for the 1x1 DenseFormer
    c = jf.get_config("denseformer", "tiny", n_layer=6)
    count = lambda cfg: jf.count_params(jax.eval_shape(  # noqa: E731
        lambda r: jf.init_params(jf.build(cfg), r), jax.random.PRNGKey(0)))
    assert count(c) - count(jf.get_config("gpt", "tiny", n_layer=6)) == 6 * 7
    assert int(DWAPlan.from_config(c).mask().sum()) == 6 * 9 // 2
