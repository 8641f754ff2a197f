"""Audit 47 of the HF interop (jaxformers.convert, experiments.export): a mutation pass and the
bugs it led to.  Params whose shapes disagree with the config are refused naming the leaf before
any reshape (a Llama export of another head split was silently a different model); checkpoints
whose config disagrees with the tensors, and two files holding the same tensor, are refused."""
import dataclasses
import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxformers as jf
from jaxformers.convert import from_hf, to_hf


def _perturbed(config, seed=0):
    params = jf.init_params(jf.build(config), jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _llama(**kw):
    return jf.get_config("llama", "tiny", **{**dict(vocab_size=64, d_model=32, n_layer=1, n_head=4, n_kv_head=2,
                                                     d_ff=48, tie_embeddings=False), **kw})


# ----------------------------------------------------------------------------- export: shapes
def test_llama_export_refuses_params_of_another_head_split(tmp_path):
    """Params of 8 heads of 4 under a config of 4 heads of 8 (same d_model): q/o reshape without
    error, so to_hf wrote a checkpoint of a different model (HF would compute 4 heads of 8 on
    weights trained as 8 heads of 4).  Now a ValueError naming the leaf and both shapes."""
    config = _llama(n_head=8, n_kv_head=8)
    params = _perturbed(config)
    with pytest.raises(ValueError, match=r"blocks_0/attn/q/kernel has shape \(32, 8, 4\), config implies \(32, 4, 8\)"):
        to_hf(dataclasses.replace(config, n_head=4, n_kv_head=4), params, str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # nothing written
    # kv heads that do not match: was numpy's "cannot reshape array of size 512 into shape (32,32)"
    config = _llama(n_head=4, n_kv_head=2)
    with pytest.raises(ValueError, match=r"blocks_0/attn/k/kernel has shape \(32, 2, 8\), config implies \(32, 4, 8\)"):
        to_hf(dataclasses.replace(config, n_kv_head=4), _perturbed(config), str(tmp_path / "b"))


def test_mamba_export_refuses_an_in_proj_of_another_width(tmp_path):
    """A Mamba-1 in_proj kernel [D, 2, I] of another d_inner was numpy's "cannot reshape array of
    size 4096 into shape (32,64)"; now the ValueError names the layer and in_proj."""
    config = jf.get_config("mamba", "tiny", vocab_size=64, d_model=32, n_layer=1, d_state=8, expand=2)
    params = _perturbed(config)
    with pytest.raises(ValueError, match=r"blocks_0/mixer/in_proj/kernel has shape \(32, 2, 64\), config implies \(32, 2, 32\)"):
        to_hf(dataclasses.replace(config, expand=1), params, str(tmp_path))


# ----------------------------------------------------------------------------- import: checks
def _export(tmp_path, name="ckpt", **kw):
    config = _llama(**kw)
    params = _perturbed(config)
    return config, params, to_hf(config, params, str(tmp_path / name))


@pytest.mark.parametrize("change, tensor", [
    (dict(num_key_value_heads=1), "model.layers.0.self_attn.k_proj.weight has shape (16, 32), config implies (8, 32)"),
    (dict(vocab_size=65), "model.embed_tokens.weight has shape (64, 32), config implies (65, 32)"),
    (dict(intermediate_size=40), "model.layers.0.mlp.gate_proj.weight has shape (48, 32), config implies (40, 32)"),
])
def test_a_config_that_disagrees_with_the_tensors_is_a_value_error_naming_the_tensor(tmp_path, change, tensor):
    """Kills the mutant that skips read_checkpoint's shape check (the tensors then reach the
    layout reshape or the model with the wrong shapes)."""
    _, _, out = _export(tmp_path)
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg.update(change)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(ValueError) as e:
        from_hf(out)
    assert tensor in str(e.value)


def test_two_files_holding_the_same_tensor_are_refused(tmp_path):
    """A directory without model.safetensors or an index is read file by file: two complete
    copies (e.g. a consolidated and a renamed checkpoint) must not silently take the last one."""
    _, _, out = _export(tmp_path)
    os.rename(os.path.join(out, "model.safetensors"), os.path.join(out, "a.safetensors"))
    config2 = _llama()
    to_hf(config2, _perturbed(config2, seed=5), str(tmp_path / "other"))
    os.rename(str(tmp_path / "other" / "model.safetensors"), os.path.join(out, "b.safetensors"))
    with pytest.raises(ValueError, match="is in both"):
        from_hf(out)
    config, params = from_hf(os.path.join(out, "a.safetensors"))  # naming one file reads it
    assert params["lm_head"]["kernel"].shape == (32, 64)


@pytest.mark.hf
def test_rope_parameters_theta_wins_over_a_stale_top_level_rope_theta(tmp_path):
    """config.json with both a top-level rope_theta (1e4) and rope_parameters' own (5e5):
    transformers (>= 5, ``rope_parameters.setdefault("rope_theta", rope_theta)``) uses 5e5;
    kills the mutant that prefers the top-level value."""
    transformers = pytest.importorskip("transformers")
    _, _, out = _export(tmp_path, rope_theta=5e5)
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["rope_theta"] = 10000.0
    assert cfg["rope_parameters"]["rope_theta"] == 5e5
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    theirs = transformers.LlamaConfig.from_pretrained(out).rope_parameters["rope_theta"]
    assert theirs == 5e5
    assert from_hf(out)[0].rope_theta == theirs


@pytest.mark.parametrize("value", ["absent", None])
def test_a_config_without_num_key_value_heads_is_multi_head(tmp_path, value):
    """HF's LlamaConfig: num_key_value_heads omitted or null -> num_attention_heads (MHA)."""
    config, params, out = _export(tmp_path, n_kv_head=4)
    cfg = json.load(open(os.path.join(out, "config.json")))
    if value == "absent":
        del cfg["num_key_value_heads"]
    else:
        cfg["num_key_value_heads"] = None
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    back, p = from_hf(out)
    assert back.kv_heads == 4
    np.testing.assert_array_equal(p["blocks_0"]["attn"]["k"]["kernel"], params["blocks_0"]["attn"]["k"]["kernel"])


def test_a_bare_llama_model_checkpoint_without_the_model_prefix(tmp_path):
    """``LlamaModel.save_pretrained`` names tensors without ``model.``; from_hf adds the prefix
    (tied embeddings: no lm_head) and reads the same params."""
    from safetensors.numpy import load_file, save_file
    config, params, out = _export(tmp_path, tie_embeddings=True)
    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)
    assert all(k.startswith("model.") for k in tensors)
    save_file({k[len("model."):]: v for k, v in tensors.items()}, path)
    back, p = from_hf(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_explicit_head_dim_where_heads_do_not_divide_the_width():
    """hidden_size=34, 4 heads, head_dim=8 (HF allows it: q_proj is [32, 34]): the head_dim is
    carried, not left to d_model // n_head (which the config refuses for 34 / 4)."""
    from jaxformers.convert import config_from_hf
    c = config_from_hf(dict(model_type="llama", vocab_size=64, hidden_size=34, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, head_dim=8))
    assert (c.dim_head, c.head_dim) == (8, 8)


# ----------------------------------------------------------------------------- tokenizer bridge
def test_the_exported_byte_tokenizer_maps_every_byte_to_its_own_id(tmp_path):
    """Every code point U+0000..U+00FF plus a soft hyphen run (UTF-8 covers bytes 0x00-0x7F,
    0x80-0xBF, 0xC2, 0xC3): the exported tokenizer.json encodes to the UTF-8 bytes (an
    independent oracle) and decodes back; the end-of-text token is id 256.  Kills a shifted
    byte-level alphabet (the earlier tests' text has no byte 0xAD)."""
    tokenizers = pytest.importorskip("tokenizers")
    from jaxformers.convert.hf_tokenizer import save_hf_tokenizer
    from jaxformers.data.tokenizer import EOS_TEXT, ByteTokenizer
    eos = save_hf_tokenizer(ByteTokenizer(), str(tmp_path))
    assert eos == EOS_TEXT
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "".join(map(chr, range(256))) + "soft\u00adhyphen \u00ff\u0100"
    ids = tok.encode(text).ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.token_to_id(EOS_TEXT) == 256
    cfg = json.load(open(tmp_path / "tokenizer_config.json"))
    assert cfg["eos_token"] == cfg["bos_token"] == cfg["pad_token"] == EOS_TEXT


# ----------------------------------------------------------------------------- Mamba import
@pytest.mark.hf
def test_mamba2_keys_a_config_omits_take_transformers_defaults():
    """A Mamba-2 config.json without n_groups / state_size / head_dim / conv_kernel reads as
    transformers' Mamba2Config defaults (the oracle: the installed transformers)."""
    transformers = pytest.importorskip("transformers")
    from jaxformers.convert import config_from_hf_mamba
    ref = transformers.Mamba2Config(hidden_size=256, num_heads=8, expand=2)  # head_dim default 64
    c = config_from_hf_mamba(dict(model_type="mamba2", vocab_size=96, hidden_size=256, num_hidden_layers=1,
                                  num_heads=8, expand=2))
    assert (c.n_groups, c.d_state, c.headdim, c.d_conv, c.norm_eps, c.tie_embeddings) == \
        (ref.n_groups, ref.state_size, ref.head_dim, ref.conv_kernel, ref.layer_norm_epsilon, ref.tie_word_embeddings)


def test_an_old_mamba_checkpoint_with_backbone_embedding_reads_the_same_params(tmp_path):
    """Old Mamba checkpoints name the table ``backbone.embedding.weight`` (transformers renames it
    on load); from_hf reads it as ``backbone.embeddings.weight``."""
    from safetensors.numpy import load_file, save_file
    config = jf.get_config("mamba", "tiny", vocab_size=64, d_model=32, n_layer=1, d_state=8)
    params = _perturbed(config)
    out = to_hf(config, params, str(tmp_path))
    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    save_file(tensors, path)
    _, p = from_hf(out)
    np.testing.assert_array_equal(np.asarray(p["embed"]["embedding"]), np.asarray(params["embed"]["embedding"]))


@pytest.mark.parametrize("kind", ["llama", "mamba2"])
def test_bfloat16_params_are_exported_as_float32(tmp_path, kind):
    """to_hf's contract: model.safetensors is float32 whatever the params' dtype (HF reads the
    config's torch_dtype float32), and from_hf reads the bfloat16 values back exactly."""
    from jaxformers.convert.hf_io import read_header
    if kind == "llama":
        config = _llama(dtype="bfloat16", param_dtype="bfloat16")
    else:
        config = jf.get_config("mamba2", "tiny", vocab_size=64, d_model=32, n_layer=1, d_state=8, headdim=16,
                               n_groups=1, dtype="bfloat16", param_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _perturbed(config))
    out = to_hf(config, params, str(tmp_path))
    header, _ = read_header(os.path.join(out, "model.safetensors"))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}
    _, back = from_hf(out, dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.hf
def test_llama_keys_a_config_omits_or_nulls_take_transformers_defaults():
    """``{"model_type": "llama"}`` alone, or with null values, was a KeyError ('hidden_size') or a
    TypeError (float(None)); transformers reads its LlamaConfig defaults (the oracle).  A null
    size is refused (transformers refuses it too)."""
    transformers = pytest.importorskip("transformers")
    from jaxformers.convert import config_from_hf
    ref = transformers.LlamaConfig()
    for hf in ({"model_type": "llama"},
               {"model_type": "llama", "rms_norm_eps": None, "rope_theta": None, "num_key_value_heads": None,
                "head_dim": None, "tie_word_embeddings": None}):
        c = config_from_hf(hf)
        assert (c.vocab_size, c.d_model, c.ff_dim, c.n_layer, c.n_head, c.kv_heads, c.dim_head) == \
            (ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers,
             ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim)
        assert (c.norm_eps, c.rope_theta, c.tie_embeddings, c.max_seq_len) == \
            (ref.rms_norm_eps, ref.rope_parameters["rope_theta"], ref.tie_word_embeddings, ref.max_position_embeddings)
    with pytest.raises(ValueError, match=r"sets \['hidden_size', 'num_hidden_layers'\] to null"):
        config_from_hf({"model_type": "llama", "hidden_size": None, "num_hidden_layers": None})


def test_stack_layers_refuses_layers_of_different_dtypes():
    """A layer with a bfloat16 leaf where layer 0 has float32 (same shape): stacking would promote
    silently (jnp.stack) -- refused naming the layer."""
    from jaxformers.convert import stack_layers
    params = {"blocks_0": {"w": np.zeros((2, 3), np.float32)}, "blocks_1": {"w": jnp.zeros((2, 3), jnp.bfloat16)}}
    with pytest.raises(ValueError, match="blocks_1 has a leaf"):
        stack_layers(params)


def test_an_index_naming_a_missing_shard_is_refused_naming_the_index(tmp_path):
    _, _, out = _export(tmp_path)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    os.rename(os.path.join(out, "model.safetensors"), os.path.join(out, "model-00001-of-00002.safetensors"))
    json.dump(index, open(os.path.join(out, "model.safetensors.index.json"), "w"))
    with pytest.raises(FileNotFoundError, match=r"index.json lists shard\(s\) \['model-00002-of-00002.safetensors'\]"):
        from_hf(out)
