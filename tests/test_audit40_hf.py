"""Audit of the Hugging Face interop (jaxformers.convert, experiments.export): the RoPE base of a
config with both rope dicts, a stale sharded index beside model.safetensors, Mamba-2-only fields
of a Mamba-1 export, and special-token text in the exported tokenizer."""
import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxformers as jf
from jaxformers.convert import config_to_hf_mamba, from_hf, to_hf


def _perturbed(config, seed=0):
    params = jf.init_params(jf.build(config), jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _logits(config, params, toks):
    return np.asarray(jax.jit(jf.build(config).apply)({"params": params}, jnp.asarray(toks)))


@pytest.mark.hf
@pytest.mark.parametrize("top_level", [None, 700.0])
def test_a_non_empty_rope_scaling_takes_the_place_of_rope_parameters_as_in_transformers(tmp_path, top_level):
    """config.json with rope_parameters (theta 5e5) and a default rope_scaling without a theta:
    transformers reads rope_scaling (5.x: ``rope_scaling or rope_parameters``; 4.x ignores
    rope_parameters) with the top-level rope_theta, else 10000; from_hf took 5e5 (logits off by ~0.3)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = jf.get_config("llama", "tiny", vocab_size=64, d_model=32, n_head=4, n_kv_head=2, d_ff=48,
                           rope_theta=5e5, tie_embeddings=False)
    params = _perturbed(config)
    to_hf(config, params, str(tmp_path))
    hf = json.loads((tmp_path / "config.json").read_text())
    hf.pop("rope_theta")
    hf["rope_scaling"] = {"rope_type": "default"}
    if top_level is not None:
        hf["rope_theta"] = top_level
    (tmp_path / "config.json").write_text(json.dumps(hf))
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    want = top_level or 10000.0
    assert model.config.rope_parameters["rope_theta"] == want
    back, back_params = from_hf(str(tmp_path))
    assert back.rope_theta == want
    toks = np.random.RandomState(0).randint(0, 64, (2, 16)).astype(np.int32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(toks.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(_logits(back, back_params, toks), theirs, atol=1e-4, rtol=0)


def test_from_hf_reads_model_safetensors_before_a_stale_sharded_index(tmp_path):
    """to_hf over a sharded checkpoint leaves its index and shards: transformers reads the new
    model.safetensors first, from_hf read the index (the old weights, silently)."""
    from safetensors.numpy import load_file, save_file

    config = jf.get_config("llama", "tiny", vocab_size=64, d_model=32, n_head=4, d_ff=48)
    params = _perturbed(config)
    to_hf(config, params, str(tmp_path))
    old = {k: 2 * v for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    save_file(old, str(tmp_path / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in old}}))
    _, back = from_hf(str(tmp_path))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)
    os.remove(tmp_path / "model.safetensors")  # the index alone is still read
    _, sharded = from_hf(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(sharded["final_norm"]["scale"]),
                                  2 * np.asarray(params["final_norm"]["scale"]))


def test_a_mamba1_export_ignores_the_mamba2_only_fields(tmp_path):
    """headdim / n_groups are never read by a Mamba-1 layer; the export refused such a config as
    'headdim=16 (HF Mamba: 64)'."""
    config = jf.get_config("mamba", "tiny", vocab_size=64, d_model=32, n_layer=1, headdim=16, n_groups=2)
    hf = config_to_hf_mamba(config)
    assert hf["model_type"] == "mamba" and "headdim" not in hf and "n_groups" not in hf
    params = _perturbed(config)
    to_hf(config, params, str(tmp_path))
    back, back_params = from_hf(str(tmp_path))
    toks = np.random.RandomState(1).randint(0, 64, (1, 9)).astype(np.int32)
    np.testing.assert_allclose(_logits(back, back_params, toks), _logits(config, params, toks), atol=1e-6)
    two = config_to_hf_mamba(jf.get_config("mamba2", "tiny", d_model=32, headdim=16, n_groups=2, d_state=16))
    assert (two["head_dim"], two["n_groups"]) == (16, 2)  # a Mamba-2 reads them: carried


@pytest.mark.hf
def test_the_exported_tokenizer_encodes_special_token_text_as_jaxformers_does(tmp_path):
    """jaxformers encodes a special token's text inside a document as plain text; the exported
    AutoTokenizer mapped it to the special id (<|endoftext|>, and a hf: tokenizer's </s>, <s>, <unk>)."""
    transformers = pytest.importorskip("transformers")
    from test_audit_cli import _sentencepiece_tokenizer

    from jaxformers.convert.hf_tokenizer import save_hf_tokenizer
    from jaxformers.data.tokenizer import get_tokenizer

    for name, tok in (("byte", get_tokenizer("byte")), ("sp", _sentencepiece_tokenizer(tmp_path / "sp_src"))):
        save_hf_tokenizer(tok, str(tmp_path / name))
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
        for text in ("a<|endoftext|>b", "hello </s> world <s>", "<unk> x"):
            assert hf_tok(text)["input_ids"] == tok.encode(text), (name, text)
            assert hf_tok.decode(hf_tok(text)["input_ids"]) == tok.decode(tok.encode(text)), (name, text)
        assert hf_tok.eos_token_id == tok.eos_id
