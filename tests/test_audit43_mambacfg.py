"""Audit 43 (mambacfg): MambaConfig family defaults and the HF export's special-token ids."""
import json

import numpy as np
import pytest

import jax

import jaxformers as jf
from jaxformers.models.mamba import HybridConfig, MambaConfig
from jaxformers.registry import config_from_dict


# ------------------------------------------------------------- family-dependent defaults
def test_mamba2_config_built_directly_gets_mamba2_defaults():
    # was: d_state=16, a_init="s4d_real" (Mamba-1's) for a Mamba-2 model built without the registry
    m2 = MambaConfig(model="mamba2", vocab_size=32, d_model=64, n_layer=1)
    assert (m2.d_state, m2.a_init) == (128, "uniform")
    m1 = MambaConfig(model="mamba", vocab_size=32, d_model=64, n_layer=1)
    assert (m1.d_state, m1.a_init) == (16, "s4d_real")
    h2 = HybridConfig(mixer="mamba2", vocab_size=32, d_model=64, n_layer=2, n_head=2, attn_every=2)
    assert (h2.d_state, h2.a_init) == (128, "uniform")
    h1 = HybridConfig(mixer="mamba", vocab_size=32, d_model=64, n_layer=2, n_head=2, attn_every=2)
    assert (h1.d_state, h1.a_init) == (16, "s4d_real")
    # explicit values win; saved dicts and replace keep the resolved values
    e = MambaConfig(model="mamba2", vocab_size=32, d_model=64, n_layer=1, d_state=8, a_init="s4d_real")
    assert (e.d_state, e.a_init) == (8, "s4d_real")
    assert config_from_dict(m2.to_dict()) == m2 and config_from_dict(json.loads(m2.to_json())) == m2
    assert m1.replace(model="mamba2").d_state == 16


def test_mamba2_direct_config_initialises_a_uniform_per_head():
    c = MambaConfig(model="mamba2", vocab_size=32, d_model=64, n_layer=1, headdim=16, d_state=8)
    params = jf.init_params(jf.build(c), jax.random.PRNGKey(0))
    a = np.exp(np.asarray(params["blocks_0"]["mixer"]["A_log"]))
    assert a.shape == (8,) and np.all((a >= 1.0) & (a <= 16.0))
    assert not np.allclose(a, np.arange(1, 9))  # not S4D-real's 1..H


PRESET_SSM = {  # (d_state, a_init) of every preset: unchanged by the family defaults
    ("mamba", "tiny"): (16, "s4d_real"), ("mamba", "small"): (16, "s4d_real"),
    ("mamba", "medium"): (16, "s4d_real"), ("mamba2", "tiny"): (32, "uniform"),
    ("mamba2", "small"): (128, "uniform"), ("hybrid", "tiny"): (16, "s4d_real"),
    ("hybrid", "tiny-m2"): (32, "uniform"), ("hybrid", "small"): (16, "s4d_real"),
}


@pytest.mark.parametrize("name,preset", list(PRESET_SSM))
def test_presets_keep_their_ssm_fields_and_shapes(name, preset):
    c = jf.get_config(name, preset)
    assert (c.d_state, c.a_init) == PRESET_SSM[name, preset]
    assert config_from_dict(c.to_dict()) == c
    shapes = jax.eval_shape(lambda: jf.init_params(jf.build(c), jax.random.PRNGKey(0)))
    mixer = shapes["blocks_0"]["mixer"]
    if c.mixer_kind == "mamba2":
        assert mixer["A_log"].shape == (c.d_inner // c.headdim,)
        assert mixer["in_bc"]["kernel"].shape == (c.d_model, 2 * c.n_groups * c.d_state)
    else:
        assert mixer["A_log"].shape == (c.d_inner, c.d_state)


def test_hf_conversion_keeps_mamba_fields():
    from jaxformers.convert import config_from_hf_mamba
    c1 = config_from_hf_mamba({"model_type": "mamba", "vocab_size": 64, "hidden_size": 32,
                               "num_hidden_layers": 1})
    assert (c1.d_state, c1.a_init) == (16, "s4d_real")
    c2 = config_from_hf_mamba({"model_type": "mamba2", "vocab_size": 64, "hidden_size": 32,
                               "num_hidden_layers": 1, "num_heads": 4, "head_dim": 16, "n_groups": 1})
    assert (c2.d_state, c2.a_init) == (128, "uniform")


# ------------------------------------------------------------- HF export: special-token ids
@pytest.mark.hf
@pytest.mark.parametrize("name", ["llama", "mamba", "mamba2"])
def test_to_hf_writes_no_default_special_token_ids(name, tmp_path):
    # was: no ids in config.json, so transformers read its class defaults (Llama eos 2, Mamba
    # eos 0, Mamba-2 eos 2 / pad 1): ordinary tokens of this vocabulary that generation stops at
    transformers = pytest.importorskip("transformers")
    from jaxformers.convert import to_hf
    c = jf.get_config(name, "tiny", vocab_size=64, n_layer=1)
    to_hf(c, jf.init_params(jf.build(c), jax.random.PRNGKey(0)), str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["bos_token_id"] is None and cfg["eos_token_id"] is None and cfg["pad_token_id"] is None
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (None, None, None)
