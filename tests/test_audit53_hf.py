"""Hugging Face conversion, audit 53: regressions found.

* A Llama config.json with ``attention_bias: true`` (``LlamaForCausalLM`` then biases q/k/v AND o)
  was refused; it imports as ``qkv_bias`` when every ``o_proj.bias`` is zero, as Qwen3's does.
* A float16 export stored weights with |w| >= 65520 as inf, silently.
* ``max_shard_size="123"`` was read as bytes; huggingface_hub (``save_pretrained``) refuses a
  string without a unit.
* A Qwen3 ``head_dim: null`` was read as hidden / heads; transformers 5 refuses it."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

import jaxformers as jf  # noqa: E402
from jaxformers.convert import config_from_hf, from_hf, to_hf  # noqa: E402
from test_audit52_export import _export, _fake_run, _perturbed, _snapshot  # noqa: E402
from test_convert_hf import (  # noqa: E402
    TOL, assert_export_round_trip, hf_logits, hf_model, jax_logits, load_auto, max_diff, tokens)

pytestmark = pytest.mark.hf


# --------------------------------------------------------------------------- llama attention_bias
def _biased_llama(seed=0):
    """A random ``LlamaForCausalLM`` with ``attention_bias=True``: random q/k/v biases, o biases
    set to zero explicitly (transformers would zero-init them all)."""
    model = hf_model(seed, attention_bias=True, bias_std=0.5)
    with torch.no_grad():
        for layer in model.model.layers:
            assert layer.self_attn.q_proj.bias.abs().max() > 0.1
            layer.self_attn.o_proj.bias.zero_()
    return model


def test_a_llama_attention_bias_checkpoint_imports_as_qkv_bias_with_logits_parity(tmp_path):
    model = _biased_llama()
    model.save_pretrained(str(tmp_path / "llama"))
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["attention_bias"] is True
    config, params = from_hf(str(tmp_path / "llama"))
    assert (config.qkv_bias, config.qk_norm) == (True, False)
    assert np.abs(np.asarray(params["blocks_1"]["attn"]["k"]["bias"])).max() > 0.1
    toks = tokens(3)
    assert max_diff(hf_logits(model, toks), jax_logits(config, params, toks)) < TOL
    # the export is a Qwen2ForCausalLM (Llama + q/k/v biases, no o bias), computing the same function
    to_hf(config, params, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert_export_round_trip(config, params, str(tmp_path / "out"), load_auto(str(tmp_path / "out")), vocab=128)


def test_a_llama_non_zero_output_bias_is_refused_naming_the_tensor_and_layer(tmp_path):
    model = _biased_llama(seed=1)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.bias[3] = 0.25
    model.save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.bias \(layer 1, max \|value\| 0\.25"):
        from_hf(str(tmp_path / "llama"))


def test_attention_bias_values_per_model_type():
    sizes = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=48)
    assert config_from_hf({"model_type": "llama", **sizes, "attention_bias": True}).qkv_bias
    assert not config_from_hf({"model_type": "llama", **sizes, "attention_bias": False}).qkv_bias
    with pytest.raises(ValueError, match="attention_bias=1 .*true or false"):
        config_from_hf({"model_type": "llama", **sizes, "attention_bias": 1})
    with pytest.raises(ValueError, match="mlp_bias"):
        config_from_hf({"model_type": "llama", **sizes, "attention_bias": True, "mlp_bias": True})
    # MistralForCausalLM has no biases and reads no attention_bias: still refused, as ambiguous
    with pytest.raises(ValueError, match="attention_bias=True .*'mistral'"):
        config_from_hf({"model_type": "mistral", **sizes, "attention_bias": True})


# --------------------------------------------------------------------------- float16 overflow
def _big(params, value):
    """``params`` with one MLP weight of layer 1 set to ``value``."""
    params = jax.tree.map(lambda x: x, params)  # (a copy of the nesting)
    params["blocks_1"]["mlp"]["down"]["kernel"] = params["blocks_1"]["mlp"]["down"]["kernel"].at[2, 5].set(value)
    return params


def _llama():
    config = jf.get_config("llama", "tiny", vocab_size=64, d_model=32, n_head=4, n_kv_head=2, d_ff=48,
                           n_layer=2, tie_embeddings=False)
    return config, _perturbed(config)


def test_a_float16_export_of_a_weight_beyond_its_range_is_refused_before_writing(tmp_path):
    config, params = _llama()
    big = _big(params, -131072.0)  # 2 ** 17: exact in bfloat16
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight has max \|value\| 131072, "
                                         r"which overflows float16 .*65504.*'bfloat16'.*'float32'"):
        to_hf(config, big, str(tmp_path / "f16"), dtype="float16")
    assert os.listdir(tmp_path) == []  # nothing written, nothing staged left behind
    to_hf(config, big, str(tmp_path / "bf16"), dtype="bfloat16")  # in bfloat16's range: exported
    _, back = from_hf(str(tmp_path / "bf16"))
    assert float(back["blocks_1"]["mlp"]["down"]["kernel"][2, 5]) == -131072.0
    # 65504 (the largest float16) and what rounds to it are kept, not refused
    to_hf(config, _big(params, 65519.0), str(tmp_path / "edge"), dtype="float16")
    _, back = from_hf(str(tmp_path / "edge"))
    assert float(back["blocks_1"]["mlp"]["down"]["kernel"][2, 5]) == 65504.0


def test_a_float16_mamba_export_is_checked_too(tmp_path):
    config = jf.get_config("mamba2", "tiny", vocab_size=64, d_model=32, n_layer=1, headdim=16, n_groups=2,
                           d_state=16, chunk_size=8)
    params = jax.tree.map(lambda x: x, _perturbed(config))
    params["embed"]["embedding"] = params["embed"]["embedding"].at[0, 0].set(1e6)
    with pytest.raises(ValueError, match=r"embeddings\.weight has max \|value\| 1e\+06, which overflows float16"):
        to_hf(config, params, str(tmp_path / "m"), dtype="float16")
    assert not (tmp_path / "m").exists()


def test_the_export_cli_refuses_a_float16_overflow_and_leaves_out_untouched(tmp_path, monkeypatch, capsys):
    config, params = _llama()
    out = tmp_path / "hf"
    run = _fake_run(tmp_path, monkeypatch, config, params)
    assert _export(run, out) == 0, capsys.readouterr().err
    before = _snapshot(out)
    run = _fake_run(tmp_path, monkeypatch, config, _big(params, 1e5))
    capsys.readouterr()
    assert _export(run, out, "--force", "--dtype", "float16") == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.down_proj.weight" in err and "overflows float16" in err and "bfloat16" in err
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]


# --------------------------------------------------------------------------- max_shard_size
@pytest.mark.parametrize("size", ["5GB", "500MB", "1.5kb", " 10 KB ", "2TB", "0.5GB"])
def test_max_shard_size_strings_read_as_huggingface_hub_reads_them(size):
    from huggingface_hub.serialization._base import parse_size_to_int

    from jaxformers.convert.hf_write import parse_size
    assert parse_size(size) == parse_size_to_int(size)


def test_a_digit_string_max_shard_size_is_refused_as_huggingface_hub_refuses_it(tmp_path):
    from huggingface_hub.serialization._base import parse_size_to_int

    from jaxformers.convert.hf_write import parse_size
    with pytest.raises(ValueError):
        parse_size_to_int("123")
    with pytest.raises(ValueError, match=r"max_shard_size='123' has no unit.*'123KB'.*int of bytes \(123\)"):
        parse_size("123")
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("\u00b2")  # a non-ASCII digit: str.isdigit, but no number of bytes
    config, params = _llama()
    with pytest.raises(ValueError, match="max_shard_size"):
        to_hf(config, params, str(tmp_path / "x"), max_shard_size="20000")
    assert not (tmp_path / "x").exists()


def test_the_cli_still_reads_a_bare_max_shard_size_as_bytes(tmp_path, monkeypatch, capsys):
    config, params = _llama()
    run = _fake_run(tmp_path, monkeypatch, config, params)
    assert _export(run, tmp_path / "hf", "--max-shard-size", "20000") == 0, capsys.readouterr().err
    assert "model.safetensors.index.json" in json.loads(capsys.readouterr().out)["weights"]
    assert _export(run, tmp_path / "hf2", "--max-shard-size", "٣") == 2  # a non-ASCII digit: refused
    assert "max_shard_size" in capsys.readouterr().err


# --------------------------------------------------------------------------- qwen head_dim null
@pytest.mark.parametrize("model_type", ["qwen3", "qwen2"])
def test_a_qwen_head_dim_null_is_refused(model_type):
    sizes = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=1, intermediate_size=48)
    with pytest.raises(ValueError, match=f"head_dim=null is not supported for model_type='{model_type}'"):
        config_from_hf({"model_type": model_type, **sizes, "head_dim": None})
    assert config_from_hf({"model_type": model_type, **sizes, "head_dim": 16}).dim_head == 16
    omitted = config_from_hf({"model_type": model_type, **sizes}).dim_head
    assert omitted == (128 if model_type == "qwen3" else 8)
