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
