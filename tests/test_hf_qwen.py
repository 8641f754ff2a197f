"""HF Qwen2 / Qwen3 interop through the shared attention options ``qkv_bias`` (Qwen2's q/k/v
biases) and ``qk_norm`` (Qwen3's per-head RMSNorm of q and k before RoPE): logits parity with
transformers both ways, bit-equal round trips, KV-cache decoding and greedy generation, the
refusals, and the options through scan_layers / layer-parallel pairs / QuaRot.  Biases and norm
scales are random (transformers zero-inits the biases and one-inits the scales), so dropping
either, or normalising after RoPE, moves the logits by far more than the tolerance."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxformers as jf  # noqa: E402
import jaxformers.layers.attention as attention_mod  # noqa: E402
from jaxformers.convert import config_from_hf, config_to_hf, from_hf, stack_layers, to_hf  # noqa: E402
from jaxformers.utils import abstract_params  # noqa: E402
from test_convert_hf import (  # noqa: E402
    assert_export_round_trip, _edit_config, hf_logits, hf_model, jax_logits, load_auto, max_diff,
    stepwise_logits, tokens, TOL)

pytestmark = pytest.mark.hf

def qwen_model(arch, seed=0, **overrides):
    """Small random float32 Qwen2/Qwen3ForCausalLM, GQA (4 heads, 2 kv heads), with random norm
    scales (around 1) and biases."""
    return hf_model(seed, arch, norm_std=0.3, bias_std=0.5, **overrides)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """qwen2: tied embeddings, head_dim = D / H; qwen3: untied, explicit head_dim 32 (not 64 / 4)."""
    out = {}
    for arch, kw in (("qwen2", dict(tie_word_embeddings=True)), ("qwen3", dict(head_dim=32))):
        model = qwen_model(arch, **kw)
        path = str(tmp_path_factory.mktemp(f"hf_{arch}"))
        model.save_pretrained(path, safe_serialization=True)
        out[arch] = model, path
    return out


def random_params(config, seed=0):
    """numpy params of ``config``: norm scales around 1, everything else (biases too) random."""
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: np.float32(("scale" in jax.tree_util.keystr(path)) + 0.2 * rng.standard_normal(s.shape)),
        abstract_params(jf.build(config)))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_import_matches_transformers_and_the_test_would_catch_a_bug(checkpoints, arch, monkeypatch):
    model, path = checkpoints[arch]
    config, params = from_hf(path)
    attn = params["blocks_0"]["attn"]
    if arch == "qwen2":
        assert (config.qkv_bias, config.qk_norm, config.tie_embeddings, config.dim_head) == (True, False, True, 16)
        assert attn["q"]["bias"].shape == (4, 16) and attn["k"]["bias"].shape == (2, 16)
        assert "bias" not in attn["o"] and "q_norm" not in attn
    else:
        assert (config.qkv_bias, config.qk_norm, config.tie_embeddings, config.dim_head) == (False, True, False, 32)
        assert attn["q_norm"]["scale"].shape == attn["k_norm"]["scale"].shape == (32,)
        assert "bias" not in attn["q"]
    assert (config.n_head, config.kv_heads, config.window) == (4, 2, None)
    toks = tokens()
    ref = hf_logits(model, toks)
    diff = max_diff(ref, jax_logits(config, params, toks))
    print(f"{arch}: max |logit diff| vs transformers {diff:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert np.abs(ref).max() > 1.0 and diff < TOL

    # the comparison sees the option: without it (or with it applied differently) it fails
    if arch == "qwen2":
        no_bias = jax.tree_util.tree_map_with_path(
            lambda p, x: np.zeros_like(x) if "bias" in jax.tree_util.keystr(p) else x, params)
        dropped = max_diff(ref, jax_logits(config, no_bias, toks))
        print(f"qwen2 without its biases: {dropped:.2e}")
        assert dropped > 100 * TOL
    else:
        stripped = {k: ({**v, "attn": {n: w for n, w in v["attn"].items() if not n.endswith("_norm")}}
                        if k.startswith("blocks_") else v) for k, v in params.items()}
        no_norm = max_diff(ref, jax_logits(config.replace(qk_norm=False), stripped, toks))
        print(f"qwen3 without qk_norm: {no_norm:.2e}")
        assert no_norm > 100 * TOL

        def norm_after_rope(c, x, positions, linear=attention_mod.Linear):  # the bug: RoPE, then the norm
            with monkeypatch.context() as m:
                m.setattr(attention_mod, "RMSNorm", lambda **kw: (lambda y: y))  # skip it before RoPE
                q, k, v = orig(c, x, positions, linear)
            norm = lambda n, y: attention_mod.RMSNorm(eps=c.norm_eps, axis_name="head_dim", name=n)(y)  # noqa: E731
            return norm("q_norm", q), norm("k_norm", k), v  # (q, k already rotated)

        orig = attention_mod.project_qkv
        monkeypatch.setattr(attention_mod, "project_qkv", norm_after_rope)
        wrong = np.asarray(jf.build(config).apply({"params": params}, jnp.asarray(toks)))
        monkeypatch.undo()
        print(f"qwen3 with the norm after RoPE: {max_diff(ref, wrong):.2e}")
        assert max_diff(ref, wrong) > 100 * TOL


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_export_loads_in_transformers_and_round_trips_bit_equal(arch, tmp_path):
    """qkv_bias -> Qwen2ForCausalLM (here with a sliding window in every layer: the same mask);
    qk_norm (+ qkv_bias) -> Qwen3ForCausalLM with attention_bias and zero o_proj biases."""
    opts = dict(qkv_bias=True, window=4, tie_embeddings=True) if arch == "qwen2" else \
        dict(qk_norm=True, qkv_bias=True, head_dim=16, n_kv_head=1)
    config = jf.get_config("llama", "tiny", vocab_size=96, d_model=32, n_head=4, d_ff=48, max_seq_len=64,
                           **{"n_kv_head": 2, **opts})
    params = random_params(config)
    out = to_hf(config, params, str(tmp_path / "out"))
    hf = json.load(open(f"{out}/config.json"))
    want = "Qwen2ForCausalLM" if arch == "qwen2" else "Qwen3ForCausalLM"
    assert (hf["model_type"], hf["architectures"]) == (arch, [want])
    if arch == "qwen3":
        assert hf["attention_bias"] is True
    model = load_auto(out)
    assert type(model).__name__ == want
    if arch == "qwen2":
        assert model.config.sliding_window == 4 and set(model.config.layer_types) == {"sliding_attention"}
    else:
        assert not model.model.layers[0].self_attn.o_proj.bias.any()
    assert_export_round_trip(config, params, out, model)


def test_kv_cache_decoding_and_scan_layers_with_both_options(checkpoints):
    """Step-by-step decoding (prefill 3, then one token a step) reproduces the full forward;
    greedy ``jf.generate`` picks transformers' tokens; scan_layers gives the unrolled logits."""
    model, path = checkpoints["qwen3"]
    config, params = from_hf(path)
    config = config.replace(qkv_bias=True)  # both options (biases from the random init below)
    rng = np.random.RandomState(3)
    for i in range(config.n_layer):
        for n, heads in (("q", 4), ("k", 2), ("v", 2)):
            params[f"blocks_{i}"]["attn"][n]["bias"] = jnp.asarray(0.5 * rng.standard_normal((heads, 32)),
                                                                   jnp.float32)
    toks = jnp.asarray(tokens(2, shape=(2, 12)))
    full = jax_logits(config, params, np.asarray(toks))
    decoded = stepwise_logits(config, params, toks)
    print(f"decode vs forward: max |diff| {np.abs(decoded - full).max():.2e}")
    np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=1e-5)

    scanned = config.replace(scan_layers=True)
    np.testing.assert_allclose(jax_logits(scanned, stack_layers(params, "blocks"), np.asarray(toks)), full,
                               atol=1e-5, rtol=1e-5)

    # greedy generation of the imported Qwen3 (no biases) == transformers' generate
    config, params = from_hf(path)
    module = jf.build(config)
    prompt, new = np.asarray(toks[:, :3]), 8
    ours = np.asarray(jf.generate(module, {"params": params}, prompt, new, temperature=0.0))
    with torch.no_grad():
        no_eos = transformers.GenerationConfig(max_new_tokens=new, do_sample=False)
        theirs = model.generate(torch.from_numpy(prompt.astype(np.int64)), generation_config=no_eos).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_the_options_off_leave_the_param_tree_and_outputs_unchanged():
    base = jf.get_config("llama", "tiny", n_layer=1)
    plain = jax.tree.map(lambda s: s.shape, abstract_params(jf.build(base)))
    assert sorted(plain["blocks_0"]["attn"]) == ["k", "o", "q", "v"]
    assert all(sorted(plain["blocks_0"]["attn"][n]) == ["kernel"] for n in "qkvo")
    both = jax.tree.map(lambda s: s.shape, abstract_params(jf.build(base.replace(qkv_bias=True, qk_norm=True))))
    attn = both["blocks_0"]["attn"]
    assert sorted(attn) == ["k", "k_norm", "o", "q", "q_norm", "v"]
    assert (attn["q"]["bias"], attn["k"]["bias"], attn["v"]["bias"], attn["q_norm"]["scale"]) == \
        ((4, 32), (2, 32), (2, 32), (32,))
    assert "bias" not in attn["o"]
    boxed = jf.build(base.replace(qkv_bias=True, qk_norm=True)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]["blocks_0"]["attn"]
    assert (boxed["q"]["bias"].names, boxed["k"]["bias"].names, boxed["v"]["bias"].names) == (
        ("heads", "head_dim"), ("kv_heads", "head_dim"), ("kv_heads", "head_dim"))  # the kernels' head axes
    assert boxed["q_norm"]["scale"].names == boxed["k_norm"]["scale"].names == ("head_dim",)
    # zero-init biases and one-init scales: a fresh model with the options computes nearly the
    # same as without (the norm changes q/k's scale, so only the bias-only model is exact)
    toks = jnp.asarray(tokens(shape=(1, 8), vocab=256))
    variables = jf.build(base).init(jax.random.PRNGKey(0), toks)
    with_bias = jf.build(base.replace(qkv_bias=True)).init(jax.random.PRNGKey(0), toks)
    got = jf.build(base.replace(qkv_bias=True)).apply(with_bias, toks)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jf.build(base).apply(variables, toks)))
    with pytest.raises(ValueError, match="qk_norm"):
        jf.get_config("llama", "tiny", qk_norm=1)


def test_omitted_keys_read_as_transformers_reads_them(tmp_path):
    """Qwen2Config / Qwen3Config defaults (not Llama's): 32 kv heads, d_ff 22016, 32768
    positions, no window (use_sliding_window false); Qwen3 head_dim 128; a window when every
    layer slides (max_window_layers=0)."""
    sizes = dict(vocab_size=64, hidden_size=64, num_attention_heads=32, num_hidden_layers=2)
    for arch, extra, window in (("qwen2", dict(), None), ("qwen3", dict(), None),
                                ("qwen2", dict(use_sliding_window=True, max_window_layers=0), 4096),
                                ("qwen3", dict(use_sliding_window=True, sliding_window=7,
                                               layer_types=["sliding_attention"] * 2), 7),
                                ("qwen2", dict(use_sliding_window=True, max_window_layers=2), None)):
        hf = {"model_type": arch, **sizes, **extra}
        ours = config_from_hf(hf)
        (tmp_path / "config.json").write_text(json.dumps(hf))
        theirs = transformers.AutoConfig.from_pretrained(str(tmp_path))
        head_dim = getattr(theirs, "head_dim", theirs.hidden_size // theirs.num_attention_heads)
        assert (ours.kv_heads, ours.ff_dim, ours.max_seq_len, ours.dim_head, ours.vocab_size) == (
            theirs.num_key_value_heads, theirs.intermediate_size, theirs.max_position_embeddings, head_dim, 64)
        assert ours.dim_head == (128 if arch == "qwen3" else 2), (arch, extra)
        theirs_window = {theirs.sliding_window if t == "sliding_attention" else None for t in theirs.layer_types}
        assert {ours.window} == theirs_window == {window}, (arch, extra)
        assert (ours.qkv_bias, ours.qk_norm) == (arch == "qwen2", arch == "qwen3")
    back = config_to_hf(config_from_hf({"model_type": "qwen3", **sizes, "attention_bias": True}))
    assert back["attention_bias"] is True and back["model_type"] == "qwen3"


@pytest.mark.parametrize("arch, changes, key", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, layer_types=None),
     "max_window_layers"),  # layer_types (saved by transformers) null: derived from max_window_layers
    ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                   layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    ("qwen3", dict(layer_types=["sliding_attention"] * 2), "layer_types"),  # no window to slide with
    ("qwen2", dict(use_sliding_window=True, sliding_window=0, max_window_layers=0), "sliding_window"),
    ("qwen3", dict(hidden_act="gelu"), "hidden_act"),
    ("qwen2", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}), "rope_type"),
    ("qwen3", dict(mlp_bias=True), "mlp_bias"),
])
def test_a_config_jaxformers_cannot_compute_is_refused_naming_the_key(checkpoints, tmp_path, arch, changes, key):
    _, path = checkpoints[arch]
    with pytest.raises(ValueError, match=key):
        from_hf(_edit_config(path, str(tmp_path / "bad"), **changes))


def test_a_qwen3_output_bias_that_is_not_zero_is_refused(tmp_path):
    model = qwen_model("qwen3", 1, attention_bias=True)  # random o_proj biases
    model.save_pretrained(str(tmp_path / "q3"))
    with pytest.raises(ValueError, match="attention_bias"):
        from_hf(str(tmp_path / "q3"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    model.save_pretrained(str(tmp_path / "q3zero"))
    config, params = from_hf(str(tmp_path / "q3zero"))
    assert config.qkv_bias and config.qk_norm
    toks = tokens(4)
    assert max_diff(hf_logits(model, toks), jax_logits(config, params, toks)) < TOL


def test_layer_parallel_quarot_and_distillation_with_the_options():
    """Layer-parallel pairs: qkv_bias and qk_norm fuse (fused == unfused; qk_norm through
    per-head q/k norm scales); QuaRot's rotation keeps the function with both options (v's
    bias rotated with W_v), integer storage keeps the biases; the Mamba distillation refuses."""
    from jaxformers.distill.convert import student_config
    from jaxformers.quant import QuantSpec, quantize
    from jaxformers.transforms import pair_layers

    config = jf.get_config("llama", "tiny", vocab_size=64, d_model=32, n_head=4, n_kv_head=2, d_ff=64, n_layer=2,
                           qkv_bias=True, qk_norm=True)
    params = random_params(config, 5)
    toks = tokens(5, shape=(2, 10), vocab=64)
    want = jax_logits(config, params, toks)
    np.testing.assert_allclose(jax_logits(*pair_layers(config, params, 2, 2), toks), want, atol=1e-6)  # no pair
    unfused = jax_logits(*pair_layers(config, params, 0, 2, fused=False), toks)
    assert np.isfinite(unfused).all() and max_diff(unfused, want) > 1e-3  # (the pair is another function)
    np.testing.assert_allclose(jax_logits(*pair_layers(config, params, 0, 2), toks), unfused, atol=2e-5)
    biased = config.replace(qk_norm=False)
    bparams = {k: ({**v, "attn": {n: w for n, w in v["attn"].items() if "norm" not in n}}
                   if k.startswith("blocks_") else v) for k, v in params.items()}
    np.testing.assert_allclose(jax_logits(*pair_layers(biased, bparams, 0, 2), toks),
                               jax_logits(*pair_layers(biased, bparams, 0, 2, fused=False), toks), atol=2e-5)

    qcfg, qparams = quantize(config, params, QuantSpec(rotate=True, seed=1))
    assert qcfg.qkv_bias and qcfg.qk_norm and qcfg.rotated
    np.testing.assert_allclose(jax_logits(qcfg, qparams, toks), want, atol=1e-4)
    icfg, iparams = quantize(config, params, QuantSpec(rotate=False, w_bits=8, a_bits=16, storage="int"))
    fcfg, fparams = quantize(config, params, QuantSpec(rotate=False, w_bits=8, a_bits=16))
    np.testing.assert_array_equal(iparams["blocks_0"]["attn"]["v"]["bias"], params["blocks_0"]["attn"]["v"]["bias"])
    np.testing.assert_allclose(jax_logits(icfg, iparams, toks), jax_logits(fcfg, fparams, toks), atol=1e-4)

    with pytest.raises(ValueError, match="qkv_bias"):
        student_config(biased)


def test_hf_directory_consumers_read_a_qwen_checkpoint(tmp_path, monkeypatch, capsys):
    """``--init-from QWEN_DIR`` (source_config + load_params) gets the options and the params;
    ``experiments.evaluate --run QWEN_DIR`` the val loss of the imported (config, params)."""
    from experiments import evaluate as eval_cli
    from jaxformers.training import evaluate
    from jaxformers.training.init_from import load_params, source_config

    model = qwen_model("qwen2", 3, vocab_size=260, tie_word_embeddings=True)  # byte tokens: 257 ids
    path = str(tmp_path / "qwen2")
    model.save_pretrained(path)
    config, params = from_hf(path)
    source, _ = source_config(path)
    assert source == config and source.qkv_bias and not source.qk_norm
    loaded = load_params(path, abstract_params(jf.build(config)), config)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    want = evaluate((config, params), str(corpus), tokenizer="byte", batch_size=2, seq_len=16, max_batches=None)
    assert eval_cli.main(["--run", path, "--data", str(corpus), "--tokenizer", "byte", "--batch-size", "2",
                          "--seq-len", "16"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)


def test_every_attention_architecture_takes_the_options_or_refuses_them():
    """Every registered model on the shared attention (GPT, Llama, DenseFormer, CoTFormer, SCFA,
    landmark, hybrid, QuaRot, layer_parallel's fused pairs) gets the bias / q_norm / k_norm
    params in each attention layer."""
    from jaxformers.config import TransformerConfig
    from jaxformers.registry import get_spec, list_models

    seen = []
    for name in list_models():
        spec = get_spec(name)
        if not issubclass(spec.config_cls, TransformerConfig):
            continue
        preset = "tiny" if "tiny" in spec.presets else sorted(spec.presets)[0]
        config = jf.get_config(name, preset, qkv_bias=True, qk_norm=True)
        paths = [jax.tree_util.keystr(k) for k, _ in
                 jax.tree_util.tree_flatten_with_path(abstract_params(jf.build(config)))[0]]
        kernels = [p for p in paths if "['q']['kernel']" in p]
        if not kernels:  # (a model other tests register, e.g. with a mixer of their own)
            continue
        for part in ("['q']['bias']", "['k']['bias']", "['v']['bias']", "['q_norm']['scale']", "['k_norm']['scale']"):
            assert len([p for p in paths if part in p]) == len(kernels) > 0, (name, part)
        seen.append(name)
    assert {"gpt", "llama", "denseformer", "cotformer", "landmark", "hybrid", "quarot", "layer_parallel"} <= set(seen)
