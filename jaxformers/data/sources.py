"""What the trainer trains on: a data spec -> a source of batch dicts.

``open_data(spec, tokenizer)`` accepts

* everything :func:`jaxformers.data.ensure_dataset` does (a built-in corpus name, a
  folder/file of text, ``hf:NAME``) or a prepared dataset directory: a
  :class:`TextSource` of random token windows (``{"tokens"}`` batches), evaluated on
  sequential windows of the val split;
* ``synthetic:TASK[:k=v,...]`` -- a :class:`SyntheticSource` of task sequences from
  :mod:`jaxformers.data.synthetic` with their answer masks (``{"tokens",
  "loss_mask"[, "segment_ids"]}`` batches: the loss only counts the answers), e.g.
  ``synthetic:copying``, ``synthetic:copying:vocab=32``, ``synthetic:recall:n_pairs=4``,
  ``synthetic:arithmetic:n_digits=2,pack=0``, ``synthetic:passkey``.  Tasks and
  parameters: :data:`jaxformers.data.loader.SYNTHETIC_TASKS` (plus ``val_rows``, the
  size of the fixed validation set, default 256, made of held-out problems that training
  never draws: :func:`jaxformers.data.synthetic.draw_split`).  The tokenizer is ignored.
* ``domains:NAME[=SOURCE][@W],...[:OPTIONS]`` -- a
  :class:`~jaxformers.data.domains.DomainSource` of several named domains sampled by
  weight, with per-domain validation (``{"tokens", "domain"}`` batches); see
  :mod:`jaxformers.data.domains`.

Both give ``vocab_size``, ``train_loader(batch_size, seq_len, seed)`` (``batch_dict_at(step)``:
this process's rows, a pure function of ``(seed, step)``) and ``eval_batches(batch_size,
seq_len, max_batches, split)`` (local rows; the last batch may be short).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, Optional

import numpy as np

from ..utils import check_token_ids, int_arg
from .domains import DOMAINS_PREFIX, DomainSource, _check_split
from .loader import (SyntheticLoader, TokenLoader, _task_params, eval_batches, iterate_rows,
                     synthetic_rows, synthetic_vocab_size)

__all__ = ["SYNTHETIC_PREFIX", "SyntheticSource", "TextSource", "open_data", "open_dataset",
           "parse_synthetic_spec"]

SYNTHETIC_PREFIX = "synthetic:"


def open_dataset(data: str, tokenizer: str):
    """``(dataset dir, meta, train tokens, val tokens)`` for a built-in name, a path or a prepared
    dir (prepared on first use).  A prepared dir carries its own tokenizer: ``tokenizer`` must be
    that one, or ``"byte"`` (the default, meaning "the dataset's")."""
    from .prepare import _canonical_tokenizer, ensure_dataset, load_prepared

    path = Path(str(data)).expanduser()
    prepared = (path / "meta.json").is_file()  # already a prepared dataset directory
    ds_dir = path if prepared else ensure_dataset(data, tokenizer)
    meta, train_tokens, val_tokens = load_prepared(ds_dir)
    made_with = meta.get("tokenizer")
    if prepared and tokenizer not in (None, "byte") and made_with is not None \
            and _canonical_tokenizer(tokenizer) != made_with:
        raise ValueError(f"tokenizer={tokenizer!r} differs from the tokenizer {made_with!r} that the "
                         f"prepared dataset {path} was made with: omit --tokenizer to use the dataset's, or "
                         "prepare the corpus again with the tokenizer you want")
    return Path(ds_dir), meta, train_tokens, val_tokens


class TextSource:
    """Token windows of a prepared dataset (or of a raw token array, ``ds_dir=None``)."""

    kind = "text"

    def __init__(self, spec: str, ds_dir: Optional[Path], meta: dict, train_tokens, val_tokens):
        self.spec, self.ds_dir, self.meta = spec, ds_dir, meta
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.vocab_size = int(meta["vocab_size"])

    @classmethod
    def from_tokens(cls, tokens, vocab_size: Optional[int] = None) -> "TextSource":
        """A source whose val (and train) split is ``tokens`` (1-D ids); ``vocab_size`` (an int >= 1,
        default: the largest id + 1) must exceed every id (``ValueError`` otherwise, and for
        ``tokens`` that are not a 1-D array of integer ids in ``[0, 2**31)``)."""
        from .loader import check_token_array

        tokens = np.asarray(tokens)
        if tokens.shape == (0,):
            tokens = tokens.astype(np.int32)  # np.asarray([]) is float64: no ids, fine
        vocab = None if vocab_size is None else int_arg("vocab_size", vocab_size, lo=1)
        if vocab is not None and tokens.ndim == 1 and np.issubdtype(tokens.dtype, np.integer):
            check_token_ids(tokens, vocab, "tokens must be ids")  # naming the vocabulary
        tokens = check_token_array(tokens)  # the loader's rule: 1-D integer ids in [0, 2**31)
        if vocab is None:
            vocab = int(tokens.max()) + 1 if tokens.size else 1
        return cls("<array>", None, {"vocab_size": vocab, "source": "array"}, tokens, tokens)

    def describe(self) -> dict:
        return {"dir": None if self.ds_dir is None else str(self.ds_dir), "vocab_size": self.vocab_size,
                "source": self.meta.get("source"), "tokenizer": self.meta.get("tokenizer")}

    def split_tokens(self, split: str):
        """The tokens of ``split`` (``"val"`` or ``"train"``; ``ValueError`` otherwise)."""
        return self.val_tokens if _check_split(split) == "val" else self.train_tokens

    def split_name(self, split: str) -> str:
        """What the batches' id checks name for ``split``: its dataset file, else ``"tokens"``."""
        files = self.meta.get("files") or {}
        if self.ds_dir is None or _check_split(split) not in files:
            return "tokens"
        return f"dataset file {Path(self.ds_dir) / files[split]}"

    def train_loader(self, batch_size: int, seq_len: int, seed: int, **process) -> TokenLoader:
        """Random windows of the train split; every batch's ids are checked to be below
        ``vocab_size`` (``ValueError`` naming the dataset file and the id)."""
        return TokenLoader(self.train_tokens, batch_size, seq_len, seed=seed, vocab_size=self.vocab_size,
                           what=self.split_name("train"), **process)

    def has_eval_data(self, seq_len: int, split: str = "val") -> bool:
        tokens = self.split_tokens(split)
        return tokens is not None and len(tokens) >= seq_len + 1

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: Optional[int], split: str = "val",
                     **process) -> Iterator[Dict[str, np.ndarray]]:
        batches = eval_batches(self.split_tokens(split), batch_size, seq_len, max_batches,
                               vocab_size=self.vocab_size, what=self.split_name(split), **process)
        return ({"tokens": rows} for rows in batches)


def parse_synthetic_spec(spec: str):
    """``"synthetic:TASK[:k=v,...]"`` -> ``(task, params, val_rows)`` (ValueError if malformed)."""
    body = spec[len(SYNTHETIC_PREFIX):] if spec.startswith(SYNTHETIC_PREFIX) else spec
    task, _, rest = body.partition(":")
    params, val_rows, seen = {}, 256, set()
    for part in filter(None, (x.strip() for x in rest.split(","))):
        name, sep, value = part.partition("=")
        try:
            number = int(value)
        except ValueError:
            number = None
        if not sep or number is None:
            raise ValueError(f"data={spec!r}: expected synthetic:TASK[:NAME=INT,...], bad entry {part!r}")
        if name.strip() in seen:  # a second value would silently win
            raise ValueError(f"data={spec!r}: parameter {name.strip()!r} is given twice")
        seen.add(name.strip())
        if name.strip() == "val_rows":
            val_rows = number
        else:
            params[name.strip()] = number
    task, params = _task_params(task.strip(), params)
    if val_rows < 1:
        raise ValueError(f"data={spec!r}: val_rows must be >= 1, got {val_rows}")
    return task, params, val_rows


class SyntheticSource:
    """A synthetic task (:mod:`jaxformers.data.synthetic`) with loss masks; a fixed val set of
    ``val_rows`` rows of held-out problems (the same for every seed), train rows drawn per
    ``(seed, step)`` from the other problems."""

    kind = "synthetic"
    VAL_SEED = 0x5A1

    def __init__(self, spec: str):
        self.spec = spec
        self.task, self.params, self.val_rows = parse_synthetic_spec(spec)
        self.vocab_size = synthetic_vocab_size(self.task, self.params)
        self.ds_dir = None
        self.meta = {"vocab_size": self.vocab_size, "source": spec, "tokenizer": None}
        self._val = {}

    def describe(self) -> dict:
        return {"dir": None, "vocab_size": self.vocab_size, "source": self.spec, "tokenizer": None,
                "task": self.task, "params": self.params, "val_rows": self.val_rows}

    def train_loader(self, batch_size: int, seq_len: int, seed: int, **process) -> SyntheticLoader:
        return SyntheticLoader(self.task, batch_size, seq_len, seed, self.params, **process)

    def has_eval_data(self, seq_len: int, split: str = "val") -> bool:
        """True once ``split``'s rows are drawn; the draw's ``ValueError`` when the task's problem
        space has none of the split's problems (raised here, so a run fails before training, not
        at its first evaluation)."""
        self.split_rows(seq_len, split)
        return True

    def split_rows(self, seq_len: int, split: str = "val") -> Dict[str, np.ndarray]:
        """The fixed evaluation rows of ``split``: ``val``, held-out problems; ``train``, another fixed
        set drawn like the train rows."""
        key = (int_arg("seq_len", seq_len, lo=1), _check_split(split))
        seq_len = key[0]
        if key not in self._val:
            seed = int(np.random.SeedSequence([self.VAL_SEED, SyntheticLoader.SPLIT_IDS[split]])
                       .generate_state(1, np.uint64)[0])
            self._val[key] = synthetic_rows(self.task, self.val_rows, seq_len + 1, seed, self.params,
                                            "heldout" if split == "val" else "train")
        return self._val[key]

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: Optional[int], split: str = "val",
                     **process) -> Iterator[Dict[str, np.ndarray]]:
        return iterate_rows(self.split_rows(seq_len, split), batch_size, max_batches, **process)


def absolute_data_spec(data: str) -> str:
    """``data`` as a spec that means the same files from any working directory (what a run's
    ``run.yaml`` records), dispatched as :func:`open_data` does: a prepared dataset folder or a
    local corpus file / folder becomes its absolute path, a ``domains:`` spec has its local
    sources made absolute (:func:`~jaxformers.data.domains.absolute_source_paths`), anything else
    (``synthetic:``, ``hf:``, built-in corpora, a path that does not exist here) is kept."""
    from .corpus import resolve_corpus
    from .domains import absolute_source_paths

    if data.startswith(SYNTHETIC_PREFIX) or data.startswith("hf:"):
        return data
    if data.startswith(DOMAINS_PREFIX):
        return absolute_source_paths(data)
    path = Path(data).expanduser()
    if (path / "meta.json").is_file():  # a prepared dataset (open_dataset reads it first)
        return str(path.resolve())
    try:
        src = resolve_corpus(data)
    except Exception:  # noqa: BLE001 - not resolvable here: kept as given
        return data
    return str(src.path) if src.kind == "path" else data


def open_data(data, tokenizer: str = "byte"):
    """A :class:`TextSource` or :class:`SyntheticSource` for a data spec (see the module docstring);
    a 1-D array of token ids gives a text source over that array."""
    if isinstance(data, (np.ndarray, list, tuple)):
        return TextSource.from_tokens(data)
    data = str(data)
    if data.startswith(SYNTHETIC_PREFIX):
        return SyntheticSource(data)
    if data.startswith(DOMAINS_PREFIX):
        return DomainSource(data, tokenizer)
    ds_dir, meta, train_tokens, val_tokens = open_dataset(data, tokenizer)
    return TextSource(data, ds_dir, meta, train_tokens, val_tokens)
