"""Mamba / Mamba-2 / hybrid: causality, decode == forward, packed == separate, hybrid == pure,
scan impls, validation."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.convert import stack_layers

# Small shapes keep the CPU compiles short; presets are checked separately.
SMALL = dict(vocab_size=64, d_model=32, n_layer=2, d_state=8)
SMALL2 = dict(SMALL, headdim=16, n_groups=2, chunk_size=16)  # I = 64 -> 4 heads of 16, 2 groups
ATTN = dict(n_head=4, n_kv_head=2, d_ff=64)
CONFIGS = {
    "mamba": ("mamba", SMALL),
    "mamba2": ("mamba2", SMALL2),
    "hybrid": ("hybrid", dict(SMALL, **ATTN, attn_layers=(1,), attn_every=None)),
}


def _config(key, **overrides):
    name, values = CONFIGS[key]
    return jf.get_config(name, "tiny", **{**values, **overrides})


def _tokens(b=2, t=12, vocab=64, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, vocab)


@functools.lru_cache(maxsize=None)
def _setup(key, **overrides):
    c = _config(key, **overrides)
    m = jf.build(c)
    params = jax.jit(lambda r: jf.init_params(m, r))(jax.random.PRNGKey(1))
    return c, m, params, jax.jit(m.apply)


# ----------------------------------------------------------------- registry / presets
def test_registered_with_presets():
    assert {"mamba", "mamba2", "hybrid"} <= set(jf.list_models())
    c = jf.get_config("mamba", "small")
    assert (c.d_model, c.n_layer, c.d_inner, c.resolved_dt_rank, c.d_state) == (768, 24, 1536, 48, 16)
    c2 = jf.get_config("mamba2", "small")
    assert (c2.ssm_heads, c2.headdim, c2.d_state) == (24, 64, 128)
    h = jf.get_config("hybrid", "small")
    assert h.attention_layers == (7, 15, 23)


@pytest.mark.parametrize("name, lo, hi", [("mamba", 110e6, 150e6), ("mamba2", 110e6, 150e6)])
def test_small_preset_is_about_130m(name, lo, hi):
    from jaxformers.utils import abstract_param_count
    n = abstract_param_count(jf.build(jf.get_config(name, "small")))
    assert lo < n < hi, n


def test_tiny_preset_trains_with_scan_layers_and_remat():
    import optax
    c = jf.get_config("mamba", "tiny", scan_layers=True, remat="full")
    m = jf.build(c)
    params = jax.jit(lambda r: jf.init_params(m, r))(jax.random.PRNGKey(0))
    axes = jf.logical_axes(m)["blocks"]["mixer"]["in_proj"]["kernel"]
    assert tuple(axes) == ("layers", "embed", None, "mlp")
    tok = jnp.tile(jnp.arange(16, dtype=jnp.int32), (4, 2))  # a repeating pattern
    opt = optax.adam(3e-3)

    def loss_fn(p):
        logits = m.apply({"params": p}, tok[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

    @jax.jit
    def train_step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state = opt.init(params)
    losses = []
    for _ in range(12):
        params, state, loss = train_step(params, state)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


# ----------------------------------------------------------------- forward invariants
@pytest.mark.parametrize("key", ["mamba", "mamba2", "hybrid"])
def test_forward_shape_and_causality(key):
    c, m, params, apply = _setup(key)
    tok = _tokens(2, 11)  # the shape of the decode test: one compile per config
    out = apply({"params": params}, tok)
    assert out.shape == (2, 11, c.vocab_size) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    t = 6
    changed = tok.at[:, t].set((tok[:, t] + 1) % c.vocab_size)
    out2 = apply({"params": params}, changed)
    np.testing.assert_allclose(out2[:, :t], out[:, :t], atol=1e-6)
    assert float(jnp.max(jnp.abs(out2[:, t:] - out[:, t:]))) > 1e-4


@pytest.mark.parametrize("key", ["mamba", "mamba2", "hybrid"])
def test_decode_step_by_step_equals_forward(key):
    c, m, params, apply = _setup(key)
    tok = _tokens(2, 11, seed=3)
    full = apply({"params": params}, tok)
    cache = jf.init_cache(m, 2, 16)
    step = jax.jit(lambda p, t, cache: m.apply({"params": p}, t, cache=cache))
    logits, cache = step(params, tok[:, :4], cache)  # prefill fills conv + SSM states
    outs = [logits]
    logits, cache = step(params, tok[:, 4:7], cache)  # a multi-token chunk after earlier tokens
    outs.append(logits)
    for i in range(7, 11):
        logits, cache = step(params, tok[:, i:i + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=1e-5)
    assert int(cache["index"]) == 11


def test_recurrent_cache_has_constant_size():
    c, m, _, _ = _setup("hybrid")
    small, large = jf.init_cache(m, 2, 8), jf.init_cache(m, 2, 64)
    ssm = [i for i in range(c.n_layer) if i not in c.attention_layers]
    for i in ssm:
        assert jax.tree.map(jnp.shape, small["layers"][i]) == jax.tree.map(jnp.shape, large["layers"][i])
        assert small["layers"][i]["conv"].shape == (2, c.d_conv - 1, c.d_inner)
        assert small["layers"][i]["ssm"].shape == (2, c.d_inner, c.d_state)
    for i in c.attention_layers:  # attention keeps its KV buffers
        assert large["layers"][i]["k"].shape == (2, 64, c.kv_heads, c.dim_head)
    c2, m2, _, _ = _setup("mamba2")
    layer = jf.init_cache(m2, 3, 32)["layers"][0]
    assert layer["ssm"].shape == (3, c2.ssm_heads, c2.headdim, c2.d_state)
    assert layer["conv_x"].shape == (3, c2.d_conv - 1, c2.d_inner)
    assert layer["conv_bc"].shape == (3, c2.d_conv - 1, 2 * c2.n_groups * c2.d_state)


def test_generate_runs_with_recurrent_cache():
    c, m, params, apply = _setup("mamba")
    prompt = _tokens(2, 5, seed=4)
    out = jf.generate(m, {"params": params}, prompt, 4, temperature=0.0)
    assert out.shape == (2, 9)
    # greedy: the first new token is the argmax after the prompt
    np.testing.assert_array_equal(out[:, 5], jnp.argmax(apply({"params": params}, prompt)[:, -1], -1))


def test_hybrid_without_attention_equals_pure():
    c_hyb = jf.get_config("hybrid", "tiny", **SMALL, attn_layers=(), attn_every=None)
    assert c_hyb.attention_layers == ()
    _, _, params, apply = _setup("mamba")
    tok = _tokens(2, 11)
    np.testing.assert_allclose(jax.jit(jf.build(c_hyb).apply)({"params": params}, tok),
                               apply({"params": params}, tok), atol=1e-6, rtol=1e-6)
    # same parameter layout for the Mamba-2 mixer too
    c2 = jf.get_config("hybrid", "tiny", **SMALL2, mixer="mamba2", attn_layers=(), attn_every=None)
    shapes = jax.tree.map(jnp.shape, nn.unbox(jax.eval_shape(jf.build(c2).init, jax.random.PRNGKey(0), tok)))
    assert shapes == jax.tree.map(jnp.shape, {"params": _setup("mamba2")[2]})


def test_hybrid_layer_pattern():
    c = jf.get_config("hybrid", "tiny", n_layer=6, attn_every=3)
    assert c.attention_layers == (2, 5)
    c = c.replace(attn_layers=(0, 4))
    assert c.attention_layers == (0, 4)  # explicit indices win
    c, m, params, _ = _setup("hybrid")
    assert "attn" in params["blocks_1"] and "mlp" in params["blocks_1"]
    assert set(params["blocks_0"]) == {"norm", "mixer"}


@pytest.mark.parametrize("key", ["mamba", "mamba2"])
def test_scan_layers_matches_loop(key):
    c, m, params, apply = _setup(key)
    tok = _tokens(2, 11)
    sc = c.replace(scan_layers=True)
    stacked = stack_layers(dict(params), "blocks", n_layer=c.n_layer)
    np.testing.assert_allclose(jax.jit(jf.build(sc).apply)({"params": stacked}, tok),
                               apply({"params": params}, tok), atol=1e-5, rtol=1e-5)


def test_logical_axes_and_init():
    c, m, params, _ = _setup("mamba")
    axes = jf.logical_axes(m)["blocks_0"]["mixer"]
    assert tuple(axes["in_proj"]["kernel"]) == ("embed", None, "mlp")
    assert tuple(axes["out_proj"]["kernel"]) == ("mlp", "embed")
    assert tuple(axes["A_log"]) == ("mlp", None)
    mix = params["blocks_0"]["mixer"]
    # S4D-real A = -(1..N), D = 1, softplus(dt_bias) log-uniform in [dt_min, dt_max]
    np.testing.assert_allclose(np.exp(mix["A_log"][0]), np.arange(1, c.d_state + 1), rtol=1e-6)
    np.testing.assert_array_equal(mix["D"], 1.0)
    dt = np.asarray(jax.nn.softplus(mix["dt_bias"]))
    assert dt.min() >= c.dt_min * 0.999 and dt.max() <= c.dt_max * 1.001
    assert mix["dt_proj"]["kernel"].shape == (math.ceil(c.d_model / 16), c.d_inner)
    assert np.abs(mix["dt_proj"]["kernel"]).max() <= c.resolved_dt_rank ** -0.5
    _, _, p2, _ = _setup("mamba2")
    a = np.exp(np.asarray(p2["blocks_0"]["mixer"]["A_log"]))
    assert ((a >= 1.0) & (a <= 16.0)).all()


# ----------------------------------------------------------------- packed sequences
# Two rows of 20 tokens: row 0 packs sequences of 7, 1, 8 and 4 tokens (a 1-token sequence;
# a boundary at 16 = the mamba2 test config's SSD chunk edge), row 1 packs 12 + 8 with
# reused ids (1, 0): a new sequence starts wherever the id changes.
PACKED = [(7, 1, 8, 4), (12, 8)]
PACKED_T = 20
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _packed_data(vocab, seed=5):
    """Packed ``(tokens, targets, segment_ids)`` ``[2, T]`` and the same sequences one per row,
    right-padded to T (exact for causal models), with a mask of their real positions."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (len(PACKED), PACKED_T)).astype(np.int32)
    targets = rng.integers(0, vocab, (len(PACKED), PACKED_T)).astype(np.int32)
    ids = np.zeros((len(PACKED), PACKED_T), np.int32)
    spans = []
    for row, lengths in enumerate(PACKED):
        start = 0
        for k, n in enumerate(lengths):
            ids[row, start:start + n] = k % 2 if row % 2 else k
            spans.append((row, start, n))
            start += n
        assert start == PACKED_T
    sep = np.zeros((3, len(spans), PACKED_T), np.int32)  # tokens, targets, mask
    for i, (row, start, n) in enumerate(spans):
        sep[0, i, :n] = tokens[row, start:start + n]
        sep[1, i, :n] = targets[row, start:start + n]
        sep[2, i, :n] = 1
    return (tokens, targets, ids), tuple(sep), spans


def _loss_and_grads(model, params, tokens, targets, mask, segment_ids=None):
    import optax

    def loss(p):
        logits = model.apply({"params": p}, tokens, segment_ids=segment_ids)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * mask), logits

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)
    (value, logits), grads = fn(params)
    return value, logits, grads


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("key", ["mamba", "mamba2", "hybrid"])
def test_packed_sequences_equal_separate(key, impl):
    """``apply(tokens, segment_ids=...)`` on packed rows == each sequence run alone: the
    logits and the gradient of the summed token losses w.r.t. every parameter (no state,
    conv tap or attention crosses a boundary).  ``pallas`` runs in interpret mode on CPU."""
    # one SSM layer (+ the attention layer for the hybrid) keeps the two gradient compiles short
    c, _, params, _ = _setup(key, **({} if key == "hybrid" else {"n_layer": 1}))
    model = jf.build(c.replace(scan_impl=impl))
    (tok, tgt, ids), (s_tok, s_tgt, s_mask), spans = _packed_data(c.vocab_size)
    loss_p, logits_p, grads_p = _loss_and_grads(model, params, tok, tgt, np.ones_like(tok), ids)
    loss_s, logits_s, grads_s = _loss_and_grads(model, params, s_tok, s_tgt, s_mask)
    for i, (row, start, n) in enumerate(spans):
        np.testing.assert_allclose(logits_p[row, start:start + n], logits_s[i, :n],
                                   atol=1e-5, rtol=1e-5, err_msg=f"sequence {i}")
    np.testing.assert_allclose(loss_p, loss_s, rtol=1e-5)
    flat_p = jax.tree_util.tree_leaves_with_path(grads_p)
    flat_s = jax.tree_util.tree_leaves(grads_s)
    for (path, gp), gs in zip(flat_p, flat_s):
        scale = float(jnp.max(jnp.abs(gs))) + 1e-12
        err = float(jnp.max(jnp.abs(gp - gs))) / scale
        assert err < 2e-5, (jax.tree_util.keystr(path), err)


def test_packed_sequences_reject_cache_and_bad_ids():
    c, m, params, _ = _setup("mamba")
    tok = _tokens(1, 6)
    with pytest.raises(ValueError, match="segment_ids"):
        m.apply({"params": params}, tok, segment_ids=jnp.ones_like(tok), cache=jf.init_cache(m, 1, 8))
    from jaxformers.layers.mamba import MambaMixer
    x = jnp.zeros((1, 6, c.d_model))
    mixer = MambaMixer(c)
    with pytest.raises(ValueError, match="segment_ids"):
        mixer.init(jax.random.PRNGKey(0), x, segment_ids=jnp.zeros((1, 6)))  # float ids


# ----------------------------------------------------------------- scan implementations
@pytest.mark.parametrize("key", ["mamba", "mamba2"])
def test_reference_and_pallas_scan_agree(key):
    # a kernel module that fails to import fails here (scan_functions raises), it is not skipped
    c, _, params, _ = _setup(key)
    m_ref = jf.build(c.replace(scan_impl="reference"))
    m_pal = jf.build(c.replace(scan_impl="pallas"))  # Pallas interpret mode on CPU
    tok = _tokens(2, 20)  # > one SSD chunk of 16, not a multiple of it
    ref = jax.jit(m_ref.apply)({"params": params}, tok)
    out = jax.jit(m_pal.apply)({"params": params}, tok)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_auto_scan_impl_is_reference_on_cpu():
    from jaxformers.layers.mamba import resolve_scan_impl
    if jax.default_backend() != "gpu":
        assert resolve_scan_impl("auto", "selective_scan") == "reference"
        assert resolve_scan_impl("auto", "ssd") == "reference"
    with pytest.raises(ValueError, match="scan_impl"):
        resolve_scan_impl("cuda")


@pytest.mark.parametrize("family", ["selective_scan", "ssd"])
def test_auto_scan_impl_uses_the_kernels_on_tpu(monkeypatch, family):
    """On TPU ``auto`` picks the Pallas kernel when its package has a TPU (Mosaic) variant."""
    import importlib
    from jaxformers.layers.mamba import _PACKAGES, resolve_scan_impl
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert hasattr(importlib.import_module(_PACKAGES[family]), "tpu_vmem_bytes")
    assert resolve_scan_impl("auto", family) == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_scan_impl("auto", family) == "pallas"


# ----------------------------------------------------------------- validation / errors
@pytest.mark.parametrize("name, kwargs, field", [
    ("mamba", dict(d_state=0), "d_state"),
    ("mamba", dict(d_conv=-1), "d_conv"),
    ("mamba", dict(expand=1.5), "expand"),
    ("mamba", dict(dt_rank="big"), "dt_rank"),
    ("mamba", dict(dt_rank=0), "dt_rank"),
    ("mamba", dict(scan_impl="cuda"), "scan_impl"),
    ("mamba", dict(dt_min=0.2, dt_max=0.1), "dt_min"),
    ("mamba", dict(dt_init_floor=-1.0), "dt_init_floor"),
    ("mamba", dict(dt_init="zeros"), "dt_init"),
    ("mamba", dict(a_init="hippo"), "a_init"),
    ("mamba", dict(a_init_range=(0.0, 1.0)), "a_init_range"),
    ("mamba", dict(conv_bias="yes"), "conv_bias"),
    ("mamba2", dict(headdim=48), "headdim"),
    ("mamba2", dict(n_groups=3), "n_groups"),
    ("mamba2", dict(chunk_size=0), "chunk_size"),
    ("mamba2", dict(chunk_size=24, scan_impl="pallas"), "chunk_size"),
    ("hybrid", dict(mixer="rwkv"), "mixer"),
    ("hybrid", dict(attn_layers=(0, 9)), "attn_layers"),
    ("hybrid", dict(attn_layers=(1, 1)), "attn_layers"),
    ("hybrid", dict(attn_every=0), "attn_every"),
    ("hybrid", dict(scan_layers=True), "scan_layers"),
    ("hybrid", dict(mixer="mamba2", headdim=48), "headdim"),
    ("hybrid", dict(n_head=5), "n_head"),
])
def test_validation_errors_name_the_field(name, kwargs, field):
    with pytest.raises(ValueError, match=field):
        jf.get_config(name, "tiny", **kwargs)


def test_config_roundtrip_json_lists():
    c = jf.get_config("hybrid", "tiny", attn_layers=[0, 2], attn_every=None)
    assert c.attn_layers == (0, 2)
    back = jf.config_from_dict(__import__("json").loads(c.to_json()))
    assert back == c and hash(back) == hash(c)

