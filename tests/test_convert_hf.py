"""HF Llama interop: logits parity both ways, tied/sharded/bf16/scanned checkpoints, errors."""
import functools
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402

import jaxformers as jf  # noqa: E402
from jaxformers.convert import from_hf, stack_layers, to_hf, unstack_layers  # noqa: E402

pytestmark = pytest.mark.hf

TOL = 1e-4
SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=160, rope_theta=5e5, max_position_embeddings=64,
             rms_norm_eps=1e-6, initializer_range=0.1)


HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def hf_model(seed=0, arch="llama", *, norm_std=0.2, bias_std=0.0, **overrides):
    """Small random float32 ``LlamaForCausalLM`` (``arch``: ``"mistral"`` / ``"qwen2"`` / ``"qwen3"``
    for their classes); norm scales randomised too (HF inits them to 1: ``1 + norm_std * N(0, 1)``),
    and biases with ``bias_std`` (HF zero-inits them)."""
    config_cls, model_cls = (getattr(transformers, name) for name in HF_CLASSES[arch])
    torch.manual_seed(seed)
    config = config_cls(**{**SMALL, **overrides})
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + norm_std * torch.randn_like(p))
            elif name.endswith("bias") and bias_std:
                p.copy_(bias_std * torch.randn_like(p))
    return model


def load_auto(path):
    """A checkpoint directory loaded by transformers' ``AutoModelForCausalLM`` (float32, eager)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


def assert_export_round_trip(config, params, out, model, vocab=96):
    """``model`` (the export ``out`` of ``config`` / ``params`` loaded by transformers) gives our
    logits (< TOL, on logits large enough to matter), and ``from_hf(out)`` gives back ``config``
    and bit-equal ``params``."""
    toks = tokens(1, shape=(2, 14), vocab=vocab)
    ours = jax_logits(config, params, toks)
    assert np.abs(ours).max() > 1.0
    assert max_diff(hf_logits(model, toks), ours) < TOL
    back, back_params = from_hf(out)
    assert back == config
    jax.tree.map(np.testing.assert_array_equal, back_params, params)


def stepwise_logits(config, params, toks, first=3):
    """Logits ``[B, T, V]`` of ``toks`` decoded through a KV cache: ``first`` tokens prefilled,
    then one token a step (to compare with the full forward, :func:`jax_logits`)."""
    module = jf.build(config)
    step = jax.jit(lambda t, cache: module.apply({"params": params}, t, cache=cache))
    cache = jf.init_cache(module, toks.shape[0], toks.shape[1])
    logits, cache = step(toks[:, :first], cache)
    outs = [logits]
    for i in range(first, toks.shape[1]):
        logits, cache = step(toks[:, i:i + 1], cache)
        outs.append(logits)
    return np.concatenate(outs, axis=1)


def tokens(seed=0, shape=(2, 24), vocab=128):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def hf_logits(model, toks, **kw):
    with torch.no_grad():
        return model(torch.from_numpy(toks.astype(np.int64)), **kw).logits.float().numpy()


@functools.lru_cache(maxsize=None)
def _apply_fn(config):  # one XLA compile per config (eager op-by-op is slower on CPU)
    return jax.jit(jf.build(config).apply)


def jax_logits(config, params, toks):
    return np.asarray(_apply_fn(config)({"params": params}, jnp.asarray(toks)))


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def load_hf(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                         dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    model = hf_model()
    path = str(tmp_path_factory.mktemp("hf_untied"))
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def test_from_hf_and_back_match_logits(untied, tmp_path):
    model, path = untied
    config, params = from_hf(path)
    assert (config.model, config.norm, config.mlp) == ("llama", "rmsnorm", "swiglu")
    assert (config.d_model, config.n_layer, config.n_head, config.kv_heads, config.ff_dim) == (64, 2, 4, 2, 160)
    assert config.rope_theta == 5e5 and config.norm_eps == 1e-6 and not config.tie_embeddings
    assert params["blocks_0"]["attn"]["q"]["kernel"].shape == (64, 4, 16)
    assert params["blocks_0"]["attn"]["o"]["kernel"].shape == (4, 16, 64)
    assert params["lm_head"]["kernel"].shape == (64, 128)
    toks = tokens()
    ref = hf_logits(model, toks)
    out = jax_logits(config, params, toks)
    assert np.abs(ref).max() > 1.0  # the comparison is not trivially small
    assert max_diff(ref, out) < TOL

    out_dir = str(tmp_path / "exported")
    to_hf(config, params, out_dir)
    with open(os.path.join(out_dir, "config.json")) as fh:
        exported = json.load(fh)
    assert exported["architectures"] == ["LlamaForCausalLM"] and exported["torch_dtype"] == "float32"
    reloaded = load_hf(out_dir)
    assert max_diff(hf_logits(reloaded, toks), out) < TOL
    for name, p in model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), p.numpy(), err_msg=name)


def test_tied_embeddings(tmp_path):
    model = hf_model(seed=1, tie_word_embeddings=True, head_dim=32)  # also: head_dim != D / H
    model.save_pretrained(str(tmp_path / "hf"))
    config, params = from_hf(str(tmp_path / "hf"))
    assert config.tie_embeddings and "lm_head" not in params
    assert config.head_dim == 32 and params["blocks_0"]["attn"]["o"]["kernel"].shape == (4, 32, 64)
    toks = tokens(1)
    out = jax_logits(config, params, toks)
    assert max_diff(hf_logits(model, toks), out) < TOL
    to_hf(config, params, str(tmp_path / "back"))
    reloaded = load_hf(str(tmp_path / "back"))
    assert reloaded.config.tie_word_embeddings
    assert max_diff(hf_logits(reloaded, toks), out) < TOL


def test_scan_layers_equals_unscanned(untied, tmp_path):
    model, path = untied
    config, params = from_hf(path)
    sconfig, sparams = from_hf(path, scan_layers=True)
    assert sconfig == config.replace(scan_layers=True)
    assert "blocks" in sparams and "blocks_0" not in sparams
    assert sparams["blocks"]["attn"]["q"]["kernel"].shape == (2, 64, 4, 16)
    jax.tree.map(np.testing.assert_array_equal, sparams, stack_layers(params))
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(sparams), params)
    toks = tokens(2)
    ref = jax_logits(config, params, toks)
    assert max_diff(jax_logits(sconfig, sparams, toks), ref) < 1e-5
    to_hf(sconfig, sparams, str(tmp_path / "from_scanned"))
    assert max_diff(hf_logits(load_hf(str(tmp_path / "from_scanned")), toks), ref) < TOL


def test_sharded_checkpoint(untied, tmp_path):
    model, _ = untied
    path = str(tmp_path / "sharded")
    model.save_pretrained(path, max_shard_size="40KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    config, params = from_hf(path)
    toks = tokens(3)
    assert max_diff(hf_logits(model, toks), jax_logits(config, params, toks)) < TOL


def test_bf16_checkpoint_read_without_torch(untied, tmp_path):
    model, path = untied
    bf16 = hf_model().to(torch.bfloat16)
    bf16.save_pretrained(str(tmp_path / "bf16"))
    config, params = from_hf(str(tmp_path / "bf16"))
    _, ref = from_hf(path)
    expect = bf16.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), expect)
    q = bf16.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["blocks_1"]["attn"]["q"]["kernel"]), q.T.reshape(64, 4, 16))
    # bf16 rounding only: relative error ~ 2^-8
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2), params, ref)
    cfg16, p16 = from_hf(str(tmp_path / "bf16"), dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16" and p16["embed"]["embedding"].dtype == jnp.bfloat16


def test_to_hf_boxed_scanned_params_from_init(tmp_path):
    """Boxed (LogicallyPartitioned) scanned variables with module.init's exact structure."""
    config = jf.get_config("llama", "tiny", vocab_size=128, d_model=64, n_head=4, n_kv_head=1, d_ff=160,
                           scan_layers=True, rope_theta=1e5, tie_embeddings=True)
    toks = tokens(4)
    abstract = jax.eval_shape(jf.build(config).init, jax.random.PRNGKey(0), jnp.asarray(toks))
    assert any(isinstance(x, nn.LogicallyPartitioned)
               for x in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
    rng = np.random.RandomState(0)

    def fill(path, s):  # random values (norm scales around 1); no compile needed
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return (base + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, abstract)
    to_hf(config, variables, str(tmp_path / "out"))
    reloaded = load_hf(str(tmp_path / "out"))
    assert reloaded.config.num_key_value_heads == 1 and reloaded.config.tie_word_embeddings and reloaded.config.rope_parameters["rope_theta"] == 1e5
    params = unstack_layers(nn.unbox(variables)["params"])
    ref = jax_logits(config.replace(scan_layers=False), params, toks)
    assert np.abs(ref).max() > 1.0
    assert max_diff(hf_logits(reloaded, toks), ref) < TOL


def _edit_config(src, dst, **changes):
    os.makedirs(dst)
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
    with open(os.path.join(src, "config.json")) as fh:
        hf = json.load(fh)
    hf.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(hf, fh)
    return dst


@pytest.mark.parametrize("changes, field", [
    (dict(attention_bias=True), r"missing \['model\.layers\.0\.self_attn\.k_proj\.bias'"),  # no bias tensors
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_type"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "rope_type"),
    # mixed-version config: a default rope_parameters must not hide a llama3 rope_scaling
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5},
          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 32}), "rope_scaling rope_type='llama3'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5},
          rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling rope_type='linear'"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 5e5, "factor": 2.0},
          rope_scaling={"rope_type": "default"}), "rope_parameters rope_type='dynamic'"),
    (dict(rope_scaling={"rope_type": "default", "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    (dict(rope_scaling="llama3"), "rope_scaling"),
])
def test_unsupported_config_raises(untied, tmp_path, changes, field):
    _, path = untied
    bad = _edit_config(path, str(tmp_path / "bad"), **changes)
    with pytest.raises(ValueError, match=field):
        from_hf(bad)


def test_legacy_rope_theta_field(untied, tmp_path):
    _, path = untied
    legacy = _edit_config(path, str(tmp_path / "legacy"), rope_parameters=None, rope_scaling=None, rope_theta=5e5)
    config, _ = from_hf(legacy)
    assert config.rope_theta == 5e5
    both = _edit_config(path, str(tmp_path / "both"), rope_scaling={"rope_type": "default"})
    # default in both dicts: plain RoPE; as in transformers, a non-empty rope_scaling takes the place
    # of rope_parameters, and its base (missing there) is the top-level rope_theta, else 10000
    assert from_hf(both)[0].rope_theta == 1e4


def test_attention_bias_model_raises(tmp_path):
    """attention_bias biases o_proj too, which jaxformers has not: a non-zero one is refused (a zero
    one imports as qkv_bias: tests/test_audit53_hf.py)."""
    model = hf_model(attention_bias=True, bias_std=0.1)
    model.save_pretrained(str(tmp_path / "bias"))
    with pytest.raises(ValueError, match=r"attention_bias=True with a non-zero model\.layers\.0\.self_attn\.o_proj"):
        from_hf(str(tmp_path / "bias"))


def test_to_hf_rejects_non_llama(tmp_path):
    gpt = jf.get_config("gpt", "tiny")
    with pytest.raises(ValueError, match="norm"):
        to_hf(gpt, {}, str(tmp_path / "gpt"))
    gelu = jf.get_config("llama", "tiny", mlp="gelu")
    with pytest.raises(ValueError, match="mlp"):
        to_hf(gelu, {}, str(tmp_path / "gelu"))
    assert not os.path.exists(str(tmp_path / "gpt"))


def test_stack_unstack_helpers():
    layers = {f"blocks_{i}": {"w": np.full((3, 2), i, np.float32), "b": {"s": np.arange(2) + i}}
              for i in range(3)}
    params = {"embed": {"e": np.zeros(4)}, **layers, "final": {"s": np.ones(2)}}
    stacked = stack_layers(params)
    assert list(stacked) == ["embed", "blocks", "final"]
    assert stacked["blocks"]["w"].shape == (3, 3, 2) and isinstance(stacked["blocks"]["w"], np.ndarray)
    back = unstack_layers(stacked)
    assert list(back) == list(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    with pytest.raises(ValueError, match="missing"):
        stack_layers({"blocks_0": layers["blocks_0"], "blocks_2": layers["blocks_2"]})
    with pytest.raises(ValueError, match="n_layer"):
        stack_layers(params, n_layer=4)
    with pytest.raises(ValueError, match="structure"):
        stack_layers({"blocks_0": {"w": np.zeros(2)}, "blocks_1": {"v": np.zeros(2)}})
    custom = stack_layers({"layers_0": {"a": np.zeros(2)}, "layers_1": {"a": np.ones(2)}}, prefix="layers")
    assert custom["layers"]["a"].shape == (2, 2)
