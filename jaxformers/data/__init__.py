"""Data pipeline: corpora, tokenizers, on-disk token datasets, loaders, synthetic tasks.

Typical use (what the trainer does)::

    from jaxformers.data import ensure_dataset, load_prepared, TokenLoader
    ds_dir = ensure_dataset("shakespeare", "byte")        # prepares once, then reuses
    meta, train, val = load_prepared(ds_dir)              # uint16/uint32 memmaps
    loader = TokenLoader(train, batch_size=32, seq_len=256, seed=0)
    batch = loader.batch_at(step)                         # int32 [B_local, T + 1]

What the trainer uses: ``open_data(spec, tokenizer)`` (a prepared corpus, or
``"synthetic:TASK[:k=v,...]"`` with answer masks) -> a source whose
``train_loader(...).batch_dict_at(step)`` gives batch dicts (``{"tokens",
"loss_mask", ...}``, see :mod:`jaxformers.training.losses`).
"""

from . import synthetic
from .corpus import cache_dir, iter_corpus, list_corpora, load_corpus, resolve_corpus
from .loader import SYNTHETIC_TASKS, SyntheticLoader, TokenLoader, eval_batches, iterate_rows, synthetic_rows
from .prepare import default_out_dir, ensure_dataset, load_prepared, prepare
from .sources import SyntheticSource, TextSource, open_data, open_dataset
from .tokenizer import (BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer, get_tokenizer, load_tokenizer,
                        parse_tokenizer_spec)

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "SYNTHETIC_TASKS",
    "SyntheticLoader",
    "SyntheticSource",
    "TextSource",
    "TokenLoader",
    "Tokenizer",
    "cache_dir",
    "default_out_dir",
    "ensure_dataset",
    "eval_batches",
    "iterate_rows",
    "iter_corpus",
    "get_tokenizer",
    "list_corpora",
    "load_corpus",
    "load_prepared",
    "load_tokenizer",
    "open_data",
    "open_dataset",
    "parse_tokenizer_spec",
    "prepare",
    "resolve_corpus",
    "synthetic",
    "synthetic_rows",
]
