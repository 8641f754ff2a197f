"""HF Mamba / Mamba-2 -> jaxformers: logits parity with the transformers (torch) path, errors."""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxformers as jf  # noqa: E402
from jaxformers.convert import from_hf, from_hf_mamba  # noqa: E402

pytestmark = pytest.mark.hf

TOL = 1e-4
VOCAB = 96
MAMBA = dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
             layer_norm_epsilon=1e-5)
MAMBA2 = dict(vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2, head_dim=16,
              num_heads=4, n_groups=2, conv_kernel=4, chunk_size=8, layer_norm_epsilon=1e-5)


def _randomise(model):
    """HF inits norms/D to 1, conv bias to 0 and A_log deterministically: perturb them all."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", "conv1d.bias")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("A_log") or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _save(kind, path, seed=0, **overrides):
    torch.manual_seed(seed)
    if kind == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**{**MAMBA, **overrides}))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**{**MAMBA2, **overrides}))
    model = _randomise(model.to(torch.float32).eval())
    model.save_pretrained(path, safe_serialization=True)
    return model


def _tokens(shape=(2, 21), seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, shape).astype(np.int32)


def _hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.from_numpy(toks.astype(np.int64)), use_cache=False).logits.float().numpy()


def _jax_logits(config, params, toks):
    return np.asarray(jax.jit(jf.build(config).apply)({"params": params}, jnp.asarray(toks)))


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


@pytest.fixture(scope="module")
def mamba_ckpt(tmp_path_factory):  # biases on the projections, untied head
    path = str(tmp_path_factory.mktemp("hf_mamba"))
    return _save("mamba", path, use_bias=True, tie_word_embeddings=False), path


@pytest.fixture(scope="module")
def mamba2_ckpt(tmp_path_factory):  # 2 groups, chunk 8 (< the sequence): multi-chunk SSD in torch
    path = str(tmp_path_factory.mktemp("hf_mamba2"))
    return _save("mamba2", path), path


def test_mamba_logits_match_hf(mamba_ckpt):
    model, path = mamba_ckpt
    config, params = from_hf(path)  # dispatches on model_type
    assert (config.model, config.d_model, config.n_layer, config.d_inner, config.d_state) == \
        ("mamba", 32, 2, 64, 8)
    assert (config.resolved_dt_rank, config.proj_bias, config.conv_bias, config.tie_embeddings) == \
        (2, True, True, False)
    toks = _tokens()
    diff = _max_diff(_jax_logits(config, params, toks), _hf_logits(model, toks))
    assert diff < TOL, diff


def test_mamba2_logits_match_hf(mamba2_ckpt):
    model, path = mamba2_ckpt
    config, params = from_hf_mamba(path, chunk_size=8)  # HF's tile here: several chunks
    assert (config.model, config.ssm_heads, config.headdim, config.n_groups, config.chunk_size) == \
        ("mamba2", 4, 16, 2, 8)
    assert from_hf_mamba(path)[0].chunk_size == 64  # HF's tile is not carried over
    toks = _tokens(seed=1)
    diff = _max_diff(_jax_logits(config, params, toks), _hf_logits(model, toks))
    assert diff < TOL, diff


def test_scanned_layout_and_tied_head(tmp_path):
    model = _save("mamba", str(tmp_path))  # defaults: tied head, no projection biases
    config, params = from_hf(str(tmp_path), scan_layers=True)
    assert config.tie_embeddings and "lm_head" not in params and config.scan_layers
    assert params["blocks"]["mixer"]["A_log"].shape == (2, 64, 8)
    toks = _tokens((1, 13), seed=2)
    diff = _max_diff(_jax_logits(config, params, toks), _hf_logits(model, toks))
    assert diff < TOL, diff


def test_config_errors(mamba2_ckpt, tmp_path):
    _, path = mamba2_ckpt
    with open(os.path.join(path, "config.json")) as fh:
        hf = json.load(fh)

    def load_with(**changes):
        d = tmp_path / "_".join(changes)
        shutil.copytree(path, d)
        with open(d / "config.json", "w") as fh:
            json.dump({**hf, **changes}, fh)
        return from_hf(str(d))

    with pytest.raises(ValueError, match="hidden_act"):
        load_with(hidden_act="gelu")
    with pytest.raises(ValueError, match="time_step_limit"):
        load_with(time_step_limit=[0.0, 0.1])
    with pytest.raises(ValueError, match="num_heads"):
        load_with(num_heads=3)
    with pytest.raises(ValueError, match="missing|shape"):
        load_with(num_hidden_layers=3)
    with pytest.raises(ValueError, match="model_type"):
        from jaxformers.convert import config_from_hf_mamba
        config_from_hf_mamba({"model_type": "jamba"})
