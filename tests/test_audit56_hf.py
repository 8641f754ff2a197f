"""Hugging Face conversion, audit 56: regressions found.

* config.json floats were read with ``float()``: ``rms_norm_eps: "1e-5"``, ``rope_theta: true``
  (1.0) or ``initializer_range: "0.02"`` imported silently (transformers' configs refuse them),
  ``[1]`` was a ``TypeError`` and ``"abc"`` a ``ValueError`` naming no key; Mamba's
  ``time_step_rank: 2.5`` read as 2 (transformers refuses it) and ``"x"`` named no key; Mamba
  ``intermediate_size: "64"`` was read as 64, ``[64]`` and ``expand: [2]`` were TypeErrors, a
  ``time_step_limit`` of ``5`` or ``[0, "x"]`` named nothing useful.
* A config.json that is a Git LFS pointer, truncated JSON or a list was a ``JSONDecodeError``
  naming no file, or an ``AttributeError``.
* A directory with ``pytorch_model.bin`` weights only said "no *.safetensors weights" without
  naming the pickles or how to convert them."""
import pytest

from jaxformers.convert import config_from_hf, config_from_hf_mamba, from_hf, from_hf_mamba

LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=48)
MAMBA = dict(model_type="mamba", vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=4)


@pytest.mark.parametrize("key,value", [
    ("rms_norm_eps", "1e-5"), ("rms_norm_eps", True), ("rms_norm_eps", [1e-5]),
    ("initializer_range", "0.02"), ("rope_theta", True), ("rope_theta", "abc"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": "5e5"})])
def test_a_llama_float_that_is_not_a_number_is_refused_naming_the_key(key, value):
    name = "rope_theta" if key == "rope_parameters" else key
    with pytest.raises(ValueError, match=name):
        config_from_hf({**LLAMA, key: value})


def test_numbers_still_read_as_before():
    c = config_from_hf({**LLAMA, "rms_norm_eps": 1e-5, "initializer_range": 0.1, "rope_theta": 500000,
                        "rope_parameters": None})
    assert (c.norm_eps, c.init_std, c.rope_theta) == (1e-5, 0.1, 500000.0)
    c = config_from_hf({**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 3e4}})
    assert c.rope_theta == 3e4
    m = config_from_hf_mamba({**MAMBA, "time_step_rank": 3, "layer_norm_epsilon": 1e-4})
    assert (m.dt_rank, m.norm_eps) == (3, 1e-4)


@pytest.mark.parametrize("key,value", [
    ("layer_norm_epsilon", "1e-5"), ("time_step_min", True), ("initializer_range", [0.1]),
    ("time_step_rank", 2.5), ("time_step_rank", "x")])
def test_a_mamba_number_of_the_wrong_type_is_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        config_from_hf_mamba({**MAMBA, key: value})


def test_a_pytorch_bin_only_directory_names_the_pickles(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*save_pretrained"):
        from_hf(str(tmp_path))


@pytest.mark.parametrize("key,value", [
    ("expand", "2"), ("expand", [2]), ("expand", 1.5),
    ("intermediate_size", "64"), ("intermediate_size", [64])])
def test_a_mamba_expand_or_intermediate_size_that_is_not_an_integer_is_refused_naming_it(key, value):
    with pytest.raises(ValueError, match=key):  # "2" gave intermediate_size=2222..., [2] a TypeError
        config_from_hf_mamba({**MAMBA, key: value})
    assert config_from_hf_mamba({**MAMBA, "expand": 2.0, "intermediate_size": 64}).expand == 2


@pytest.mark.parametrize("value", [[0.0, "x"], 5, "0,inf"])
def test_a_mamba2_time_step_limit_that_is_not_a_pair_of_numbers_is_a_value_error(value):
    hf = dict(MAMBA, model_type="mamba2", num_heads=8, head_dim=8, n_groups=1, time_step_limit=value)
    with pytest.raises(ValueError, match="time_step_limit"):  # was "could not convert" / a TypeError
        config_from_hf_mamba(hf)


@pytest.mark.parametrize("text", ["version https://git-lfs.github.com/spec/v1\n", "[1, 2]",
                                  '{"model_type": '])
@pytest.mark.parametrize("loader", [from_hf, from_hf_mamba])
def test_a_config_json_that_is_not_a_json_object_is_a_value_error_naming_it(tmp_path, text, loader):
    (tmp_path / "config.json").write_text(text)  # was a JSONDecodeError naming no file / an AttributeError
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json"):
        loader(str(tmp_path))
