"""Audit 57: HF interop and data.  Per-batch token id checks of prepared (memmapped) datasets; the
Qwen window rule with a transformers check; tests killing mutants of jaxformers/convert that the
HF parity tests let through."""
import json

import numpy as np
import pytest

from jaxformers.data.loader import TokenLoader, eval_batches, strided_eval_batches
from jaxformers.data.sources import open_data

ONE = dict(process_index=0, process_count=1)


def _prepared(folder, train, val, vocab_size, dtype):
    """A prepared dataset folder written by hand (meta.json + train.bin / val.bin)."""
    folder.mkdir()
    arrays = {"train": np.asarray(train, dtype), "val": np.asarray(val, dtype)}
    for split, arr in arrays.items():
        arr.tofile(folder / f"{split}.bin")
    meta = dict(format_version=1, vocab_size=vocab_size, eos_id=vocab_size - 1, dtype=np.dtype(dtype).name,
                n_tokens={s: int(a.size) for s, a in arrays.items()},
                files={"train": "train.bin", "val": "val.bin"}, tokenizer="byte")
    (folder / "meta.json").write_text(json.dumps(meta))
    return str(folder)


# ----------------------------------------------------------------------------- per-batch id checks
def test_a_uint32_memmap_id_past_int32_is_refused_naming_the_file_not_wrapped(tmp_path):
    """An unscanned uint32 memmap holding 2**31 + 5 gave a window with -2**31 + 5 (int32 wrap)."""
    src = open_data(_prepared(tmp_path / "ds", [1, 2, 2 ** 31 + 5, 3, 4, 5], [1, 2, 3], 70000, np.uint32))
    loader = src.train_loader(2, 4, 0, **ONE)
    with pytest.raises(ValueError, match=r"train\.bin holds token id 2147483653"):
        loader.batch_at(0)


def test_an_id_past_the_dataset_vocab_is_refused_per_batch_naming_the_file(tmp_path):
    """An id >= vocab_size (here 300 in a byte-vocabulary uint16 file) reached the model, whose
    embedding lookup clamps it: a silent wrong answer.  Now every batch is checked, train and val."""
    src = open_data(_prepared(tmp_path / "ds", [1, 300, 2, 3, 4], [5, 6, 7, 300, 8], 257, np.uint16))
    with pytest.raises(ValueError, match=r"train\.bin holds token id 300, not below vocab_size=257"):
        src.train_loader(1, 3, 0, **ONE).batch_at(0)
    batches = src.eval_batches(1, 2, None, "val", **ONE)
    assert next(batches)["tokens"].tolist() == [[5, 6, 7]]  # batches before the bad id are fine
    with pytest.raises(ValueError, match=r"val\.bin holds token id 300"):
        next(batches)


def test_the_loaders_check_vocab_size_and_keep_good_batches_unchanged():
    toks = np.array([0, 9, 3, 4, 9, 1, 2], np.uint16)
    assert TokenLoader(toks, 2, 3, vocab_size=10, **ONE).batch_at(0).tolist() == \
        TokenLoader(toks, 2, 3, **ONE).batch_at(0).tolist()
    with pytest.raises(ValueError, match="my.bin holds token id 9, not below vocab_size=9"):
        list(eval_batches(toks, 2, 3, vocab_size=9, what="my.bin", **ONE))
    with pytest.raises(ValueError, match="token id 9"):
        list(strided_eval_batches(toks, 1, 3, 2, vocab_size=9, **ONE))
    got = next(strided_eval_batches(toks, 2, 3, 2, vocab_size=10, **ONE))
    assert got["tokens"].dtype == np.int32 and got["tokens"].tolist() == [[0, 9, 3, 4], [3, 4, 9, 1]]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="vocab_size"):
            TokenLoader(toks, 1, 2, vocab_size=bad, **ONE)


# ----------------------------------------------------------------------------- Qwen windows
@pytest.mark.hf
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_sliding_layers_without_a_window_are_refused_as_transformers_cannot_run_them(arch):
    """Carry-over: ``layer_types`` 'sliding_attention' with ``use_sliding_window`` false.  It was
    believed transformers reads it as full attention; transformers 5 raises instead (its config
    sets ``sliding_window=None``, and the sliding mask / cache need a number), so there are no
    logits to match and the refusal stays.  Should transformers start running it, this fails."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxformers.convert import config_from_hf

    keys = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, use_sliding_window=False, sliding_window=3,
                layer_types=["sliding_attention"] * 2)
    with pytest.raises(ValueError, match="layer_types has 'sliding_attention' layers but no window"):
        config_from_hf({"model_type": arch, **keys})
    config = getattr(transformers, f"{arch.capitalize()}Config")(**keys)
    model = getattr(transformers, f"{arch.capitalize()}ForCausalLM")(config).eval()
    for use_cache in (False, True):
        with pytest.raises((TypeError, ValueError)):
            model(torch.arange(6)[None], use_cache=use_cache)


# ----------------------------------------------------------------------------- convert mutants
def _tiny_llama(**kw):
    import jaxformers as jf
    return jf.get_config("llama", "tiny", vocab_size=32, d_model=16, n_layer=2, n_head=2, max_seq_len=16, **kw)


def test_a_windowed_qwen_export_reads_the_same_without_its_layer_types():
    """Kills 'max_window_layers flipped' (hf_llama.config_to_hf: ``n_layer if windowed else 0``):
    transformers before 4.53 reads no ``layer_types``, only ``max_window_layers`` (layers at or
    past it slide), so a windowed export must say 0 there and an unwindowed one ``n_layer``."""
    transformers = pytest.importorskip("transformers")
    from jaxformers.convert import config_from_hf, config_to_hf

    for window, want in ((5, ["sliding_attention"] * 2), (None, ["full_attention"] * 2)):
        hf = config_to_hf(_tiny_llama(qkv_bias=True, window=window))
        hf.pop("layer_types")
        assert config_from_hf(hf).window == window
        keys = {k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
        assert transformers.Qwen2Config(**keys).layer_types == want


def test_a_safetensors_file_short_by_a_few_bytes_is_named_truncated(tmp_path):
    """Kills 'truncation check off by the header' (hf_io.read_header ``end > data_size + 8``):
    a download missing its last bytes is a ValueError saying so, not safetensors' own error."""
    from safetensors.numpy import save_file

    from jaxformers.convert.hf_io import read_header

    path = str(tmp_path / "model.safetensors")
    save_file({"w": np.arange(6, dtype=np.float32)}, path)
    raw = open(path, "rb").read()
    for cut in (1, 4, 8):
        open(path, "wb").write(raw[:-cut])
        with pytest.raises(ValueError, match="is truncated"):
            read_header(path)


def test_a_mistral_config_without_kv_heads_has_mistrals_default_of_8():
    """Kills 'mistral kv heads default dropped' (hf_llama.config_from_hf): MistralConfig's omitted
    ``num_key_value_heads`` is 8, not Llama's ``num_attention_heads``."""
    transformers = pytest.importorskip("transformers")
    from jaxformers.convert import config_from_hf

    hf = dict(model_type="mistral", vocab_size=32, hidden_size=64, num_attention_heads=16, num_hidden_layers=1,
              intermediate_size=32)
    theirs = transformers.MistralConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    assert config_from_hf(hf).kv_heads == theirs.num_key_value_heads == 8


def test_the_byte_tokenizer_export_uses_exactly_the_byte_level_alphabet(tmp_path):
    """Kills 'byte alphabet drops 0xFF' (hf_tokenizer._byte_level_chars): every id 0..255 must be
    the ByteLevel alphabet's character of that byte, or AutoTokenizer decodes it as another text
    (byte 0xFF never occurs in UTF-8 text, so encoding alone does not show it)."""
    tokenizers = pytest.importorskip("tokenizers")
    from jaxformers.convert.hf_tokenizer import save_hf_tokenizer
    from jaxformers.data.tokenizer import ByteTokenizer

    save_hf_tokenizer(ByteTokenizer(), str(tmp_path))
    pipeline = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    chars = [pipeline.id_to_token(b) for b in range(256)]
    assert set(chars) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert chars[ord("A")] == "A" and chars[0xFF] == "\u00ff"


def test_a_single_file_checkpoint_beside_an_index_is_read_first(tmp_path):
    """Kills 'index preferred over single file' (hf_io.weight_files): as transformers'
    ``from_pretrained``, a folder's ``model.safetensors`` wins over a ``model.safetensors.index.json``
    left beside it."""
    from safetensors.numpy import save_file

    from jaxformers.convert.hf_io import weight_files

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
    shard = "model-00001-of-00001.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    assert weight_files(str(tmp_path)) == (str(tmp_path), [str(tmp_path / "model.safetensors")])
