"""Stateless, resumable batches of token windows (and of synthetic tasks), as arrays or batch dicts.

:class:`TokenLoader` draws ``batch_size`` random windows of ``seq_len + 1``
tokens (inputs are ``w[:, :-1]``, targets ``w[:, 1:]``).  The batch at a step
is a pure function of ``(seed, step)`` -- the window starts come from
``np.random.default_rng([seed, step])`` -- so resuming from a checkpoint at
step ``s`` is ``loader.iterate(s)``, with nothing else to save.  Windows are
drawn with replacement (no epochs) and may span documents: the model attends
across the end-of-text token between them (no ``segment_ids``), as in GPT-2 /
nanoGPT training on a flat token stream.

Multi-host: every process computes the same *global* batch of
``batch_size`` rows and keeps rows ``[p * B / P, (p + 1) * B / P)``, where
``p = process_index`` and ``P = process_count`` (by default
``jax.process_index()`` / ``jax.process_count()``).

:func:`eval_batches` walks a split sequentially with stride ``seq_len``
(windows overlap by the one token that is both the last target of a window
and the first input of the next), so every token after the first is a
target at most once -- a deterministic evaluation, the same for any number of
processes (each gets its share of every global batch, the short last one
included: possibly 0 rows, which the trainer pads with rows of weight 0).  It is
exhaustive up to the tail: the last ``(n - 1) % seq_len`` tokens (too few for a
window) are never targets, nor (with ``drop_last``) the windows of a short last
batch, nor what lies past ``max_batches``.

The trainer consumes *batch dicts* (see :mod:`jaxformers.training.losses`):
:meth:`TokenLoader.batch_dict_at` is ``{"tokens": batch_at(step)}``, and
:class:`SyntheticLoader` returns ``{"tokens", "loss_mask"[, "segment_ids"]}``
rows of a task from :mod:`jaxformers.data.synthetic`, with the same
``(seed, step)`` purity and per-process row split.
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterator, Mapping

import numpy as np

from ..utils import int_arg, is_int
from . import synthetic

__all__ = ["SYNTHETIC_TASKS", "SyntheticLoader", "TokenLoader", "eval_batches", "iterate_rows",
           "resolve_process", "strided_eval_batches", "strided_windows", "synthetic_rows", "synthetic_vocab_size"]


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Fill in ``(process_index, process_count)`` from JAX where not given, and validate."""
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415  (only needed for the defaults)
        if process_count is None:
            process_count = jax.process_count()
        if process_index is None:
            process_index = jax.process_index()
    for name, value in (("process_index", process_index), ("process_count", process_count)):
        if not is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}")
    process_index, process_count = int(process_index), int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    return process_index, process_count


def check_token_array(tokens, what: str = "tokens") -> np.ndarray:
    """``tokens`` as a 1-D numpy array of integer ids in ``[0, 2**31)``; ``ValueError`` naming
    ``what`` otherwise.  Windows are int32: a negative id or one past int32 would wrap silently.
    (Prepared datasets are uint16 / uint32 memmaps and are not scanned here: the loaders check
    each batch's ids instead; a signed or 64-bit array is, and so is an in-memory uint32 array,
    whose ids may reach 2**32.)"""
    if not isinstance(tokens, np.ndarray):
        tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of token ids, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{what} must be integer token ids, got dtype {tokens.dtype}")
    if tokens.size and (np.issubdtype(tokens.dtype, np.signedinteger) or tokens.dtype.itemsize > 4
                        or (tokens.dtype.itemsize == 4 and not isinstance(tokens, np.memmap))):
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi > np.iinfo(np.int32).max:
            raise ValueError(f"{what} must be token ids in [0, 2**31), got ids from {lo} to {hi}")
    return tokens


def _check_vocab(vocab_size) -> int | None:
    return None if vocab_size is None else int_arg("vocab_size", vocab_size, lo=1)


def _int32_rows(raw: np.ndarray, vocab_size: int | None, what: str) -> np.ndarray:
    """Windows ``raw`` (the token array's dtype) as int32, checked per batch: ``ValueError``
    naming ``what`` and the id for an id ``>= vocab_size`` (when known: the model would index
    past its embedding) or ``>= 2**31`` (int32 would wrap it; an unscanned uint32 memmap may
    hold one)."""
    if raw.size:
        hi = int(raw.max())
        if hi > np.iinfo(np.int32).max or (vocab_size is not None and hi >= vocab_size):
            limit = "2**31" if vocab_size is None else f"vocab_size={vocab_size}"
            raise ValueError(f"{what} holds token id {hi}, not below {limit} (a corrupt or "
                             "mislabelled dataset?)")
    return raw.astype(np.int32)


def _check_tokens(tokens, seq_len: int, what: str = "tokens") -> np.ndarray:
    tokens = check_token_array(tokens, what)
    seq_len = int_arg("seq_len", seq_len, lo=1)
    if tokens.shape[0] < seq_len + 1:
        raise ValueError(
            f"{what} has {tokens.shape[0]} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a shorter seq_len or more data (or a larger val_fraction for the val split)")
    return tokens


class TokenLoader:
    """Random windows ``[local_batch_size, seq_len + 1]`` (int32), deterministic in (seed, step).
    Each batch's ids are checked to be below ``vocab_size`` (when given) and ``2**31``
    (``ValueError`` naming ``what``, e.g. the dataset file, and the id)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, *,
                 process_index: int | None = None, process_count: int | None = None,
                 vocab_size: int | None = None, what: str = "tokens"):
        self.tokens = _check_tokens(tokens, seq_len)
        self.vocab_size, self.what = _check_vocab(vocab_size), str(what)
        self.batch_size = int_arg("batch_size", batch_size, lo=1)
        self.seq_len = int(seq_len)
        self.seed = int_arg("seed", seed, lo=0)
        self.process_index, self.process_count = resolve_process(process_index, process_count)
        if self.batch_size % self.process_count:
            raise ValueError(
                f"global batch_size {self.batch_size} is not divisible by process_count {self.process_count}")
        self.local_batch_size = self.batch_size // self.process_count

    @property
    def global_batch_size(self) -> int:
        return self.batch_size

    def offsets_at(self, step: int) -> np.ndarray:
        """Start offsets of the global batch's windows at ``step`` (shape ``[batch_size]``)."""
        step = int_arg("step", step, lo=0)
        n_starts = self.tokens.shape[0] - self.seq_len  # starts 0 .. n - (T + 1)
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, n_starts, size=self.batch_size, dtype=np.int64)

    def _windows(self, starts: np.ndarray) -> np.ndarray:
        raw = np.empty((len(starts), self.seq_len + 1), dtype=self.tokens.dtype)
        for r, s in enumerate(starts.tolist()):
            raw[r] = self.tokens[s:s + self.seq_len + 1]
        return _int32_rows(raw, self.vocab_size, self.what)

    def global_batch_at(self, step: int) -> np.ndarray:
        """The full ``[batch_size, seq_len + 1]`` batch (identical on every process)."""
        return self._windows(self.offsets_at(step))

    def batch_at(self, step: int) -> np.ndarray:
        """This process's rows of the global batch: ``[local_batch_size, seq_len + 1]``."""
        lo = self.process_index * self.local_batch_size
        return self._windows(self.offsets_at(step)[lo:lo + self.local_batch_size])

    def batch_dict_at(self, step: int) -> Dict[str, np.ndarray]:
        """This process's rows as a batch dict: ``{"tokens": int32 [local_batch_size, seq_len + 1]}``."""
        return {"tokens": self.batch_at(step)}

    def iterate(self, start_step: int = 0) -> Iterator[np.ndarray]:
        """Endless batches ``batch_at(start_step), batch_at(start_step + 1), ...`` (``start_step``
        is checked here, not at the first batch)."""
        step = int_arg("start_step", start_step, lo=0)
        return (self.batch_at(s) for s in itertools.count(step))

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.iterate(0)

    def __repr__(self) -> str:
        return (f"TokenLoader(n_tokens={self.tokens.shape[0]}, batch_size={self.batch_size}, "
                f"seq_len={self.seq_len}, seed={self.seed}, process={self.process_index}/{self.process_count})")


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None, *,
                 drop_last: bool = False, process_index: int | None = None,
                 process_count: int | None = None, vocab_size: int | None = None,
                 what: str = "tokens") -> Iterator[np.ndarray]:
    """Sequential windows ``[b, seq_len + 1]`` (int32) covering ``tokens`` in order (ids checked per
    batch as in :class:`TokenLoader`).

    Window ``i`` starts at ``i * seq_len``; the tail shorter than a window is
    skipped.  Batches hold ``batch_size`` windows globally; with several
    processes each gets its contiguous share of rows, as in
    :class:`TokenLoader`.  The last batch may be smaller unless ``drop_last``
    (with several processes each still gets its share of it, possibly 0 rows:
    every process yields the same number of batches, and together they are the
    batches of one process).  At most ``max_batches`` batches are yielded.
    """
    tokens = _check_tokens(tokens, seq_len)
    batch_size, seq_len = int_arg("batch_size", batch_size, lo=1), int(seq_len)
    vocab_size, what = _check_vocab(vocab_size), str(what)
    n_windows = (tokens.shape[0] - 1) // seq_len
    ranges = _local_row_ranges(n_windows, batch_size, max_batches, drop_last, process_index, process_count)

    def windows(lo, hi):
        raw = np.empty((hi - lo, seq_len + 1), dtype=tokens.dtype)
        for r, w in enumerate(range(lo, hi)):
            raw[r] = tokens[w * seq_len:w * seq_len + seq_len + 1]
        return _int32_rows(raw, vocab_size, what)

    return (windows(lo, hi) for lo, hi in ranges)


def strided_windows(n_tokens: int, seq_len: int, stride: int,
                    max_windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, first_scored)`` of the sliding evaluation windows over a stream of ``n_tokens``.

    The scored targets are the ones :func:`eval_batches` scores (tokens ``1 .. n * seq_len`` of the
    stream, ``n = (n_tokens - 1) // seq_len`` full windows, capped at ``max_windows``; the tail that
    fills no window is not scored, as there), now read by windows of ``seq_len`` targets starting every
    ``stride`` tokens (``0, stride, 2 * stride, ...``) whose last one ends where the scored tokens end
    (its start is moved back to ``n * seq_len - seq_len``, as Hugging Face's recipe ends its last
    window at the stream's end).  Window ``i`` scores only its targets not scored by window ``i - 1``:
    its target ``t`` (1-based, token ``starts[i] + t``) counts iff ``t >= first_scored[i]``; so every
    target is scored exactly once, with at least ``seq_len - stride`` tokens of context after the
    first window (which scores all its targets).  ``stride == seq_len`` gives :func:`eval_batches`'
    windows exactly.  Windows cross end-of-text tokens as in :func:`eval_batches` (nothing special)."""
    seq_len = int_arg("seq_len", seq_len, lo=1)
    if not is_int(stride) or not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be an int with 1 <= stride <= seq_len = {seq_len}, got {stride!r}")
    n = (int_arg("n_tokens", n_tokens, lo=0) - 1) // seq_len
    if max_windows is not None:
        n = min(n, int_arg("max_windows", max_windows, lo=0))
    if n <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    end = n * seq_len  # last scored token
    starts = np.append(np.arange(0, end - seq_len, int(stride), dtype=np.int64), end - seq_len)
    prev_end = np.concatenate([[0], starts[:-1] + seq_len])
    return starts, prev_end - starts + 1


def strided_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, stride: int,
                         max_batches: int | None = None, *, max_windows: int | None = None,
                         max_rows: int | None = None, process_index: int | None = None,
                         process_count: int | None = None, vocab_size: int | None = None,
                         what: str = "tokens") -> Iterator[Dict[str, np.ndarray]]:
    """Batch dicts ``{"tokens": int32 [b, seq_len + 1], "loss_mask": float32 [b, seq_len + 1]}`` of the
    windows of :func:`strided_windows` (the mask is 1 on the targets each window scores), batched and
    split across processes as :func:`eval_batches` does (a short last batch is kept).  At most
    ``max_batches`` batches; ``max_windows`` caps the scored tokens at the first ``max_windows *
    seq_len`` (e.g. a run's evaluation set, read with any stride); ``max_rows``: at most the first
    ``max_rows`` strided windows (``max_batches`` batches of another batch size).  Ids are checked
    per batch as in :class:`TokenLoader`."""
    tokens = _check_tokens(tokens, seq_len)
    batch_size, seq_len = int_arg("batch_size", batch_size, lo=1), int(seq_len)
    vocab_size, what = _check_vocab(vocab_size), str(what)
    starts, first = strided_windows(tokens.shape[0], seq_len, stride, max_windows)
    if max_rows is not None:
        n = int_arg("max_rows", max_rows, lo=1, where="strided_eval_batches")
        starts, first = starts[:n], first[:n]
    ranges = _local_row_ranges(len(starts), batch_size, max_batches, False, process_index, process_count)
    cols = np.arange(seq_len + 1)

    def batch(lo, hi):
        raw = np.empty((hi - lo, seq_len + 1), dtype=tokens.dtype)
        for r, w in enumerate(range(lo, hi)):
            raw[r] = tokens[starts[w]:starts[w] + seq_len + 1]
        mask = (cols[None, :] >= first[lo:hi, None]).astype(np.float32)
        return {"tokens": _int32_rows(raw, vocab_size, what), "loss_mask": mask}

    return (batch(lo, hi) for lo, hi in ranges)


def _local_row_ranges(n_rows, batch_size, max_batches, drop_last, process_index, process_count):
    """``[lo, hi)`` of this process's rows in each consecutive global batch of ``batch_size`` rows
    (a short last batch is kept unless ``drop_last``; with several processes every process gets
    its share of it, possibly empty (``lo == hi``), so every process runs the same number of
    batches and the evaluation does not depend on the process count).  The arguments are
    checked at the call (``ValueError``), the ranges made as they are taken."""
    p, n_proc = resolve_process(process_index, process_count)
    if not isinstance(drop_last, (bool, np.bool_)):
        raise ValueError(f"drop_last must be True or False, got {drop_last!r}")
    if max_batches is not None:
        max_batches = int_arg("max_batches", max_batches, lo=0)
    if batch_size % n_proc:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {n_proc}")
    local = batch_size // n_proc

    def ranges():
        for n_done, first in enumerate(range(0, n_rows, batch_size)):
            if max_batches is not None and n_done >= max_batches:
                return
            count = min(batch_size, n_rows - first)
            if count < batch_size and drop_last:
                return
            yield first + min(p * local, count), first + min((p + 1) * local, count)

    return ranges()


def iterate_rows(arrays: Mapping[str, np.ndarray], batch_size: int, max_batches: int | None = None, *,
                 drop_last: bool = False, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[Dict[str, np.ndarray]]:
    """Batch dicts of consecutive rows of ``arrays`` (every array ``[N, ...]``), split across
    processes like :func:`eval_batches` (each gets its contiguous share of a global batch of
    ``batch_size`` rows; a short last batch is yielded unless ``drop_last``, with several
    processes as every process's share of it, possibly 0 rows)."""
    batch_size = int_arg("batch_size", batch_size, lo=1)
    if not isinstance(arrays, Mapping) or any(np.ndim(v) == 0 for v in arrays.values()):
        raise ValueError(f"arrays must be a mapping of names to arrays [N, ...], got {type(arrays).__name__}"
                         + (f" with shapes { {k: np.shape(v) for k, v in arrays.items()} }"
                            if isinstance(arrays, Mapping) else ""))
    lengths = {k: len(v) for k, v in arrays.items()}
    if not lengths or len(set(lengths.values())) != 1:
        raise ValueError(f"arrays must be one or more arrays with the same number of rows, got lengths {lengths}")
    n_rows = next(iter(lengths.values()))
    ranges = _local_row_ranges(n_rows, batch_size, max_batches, drop_last, process_index, process_count)
    return ({k: np.ascontiguousarray(v[lo:hi]) for k, v in arrays.items()} for lo, hi in ranges)


# ----------------------------------------------------------------------------- synthetic tasks
# task -> default parameters.  ``copying`` and ``passkey`` make sequences of exactly the row
# length; ``recall`` and ``arithmetic`` have a length fixed by their parameters and are packed
# (``pack=1``: as many whole examples per row as fit, one segment each) or padded (``pack=0``).
SYNTHETIC_TASKS: Dict[str, Dict[str, int]] = {
    "copying": {"vocab": 16},
    "passkey": {"n_digits": 5},
    "recall": {"n_pairs": 8, "vocab": 64, "pack": 1},
    "arithmetic": {"n_digits": 3, "worked_steps": 1, "answer_only": 0, "pack": 1},
}
_TASK_ALIASES = {"associative_recall": "recall", "copy": "copying"}
_FLAG_PARAMS = ("pack", "worked_steps", "answer_only")


def _task_params(task: str, params: Mapping[str, int] | None) -> tuple[str, Dict[str, int]]:
    task = _TASK_ALIASES.get(task, task)
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {sorted(SYNTHETIC_TASKS)}")
    out = dict(SYNTHETIC_TASKS[task])
    for k, v in dict(params or {}).items():
        if k not in out:
            raise ValueError(f"synthetic task {task!r} has no parameter {k!r}; parameters: {sorted(out)}")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"synthetic {task} parameter {k} must be an int, got {v!r}")
        if k in _FLAG_PARAMS and v not in (0, 1):
            raise ValueError(f"synthetic {task} parameter {k} must be 0 or 1, got {v!r}")
        out[k] = int(v)
    return task, out


def synthetic_vocab_size(task: str, params: Mapping[str, int] | None = None) -> int:
    """Vocabulary size of a synthetic task's token ids."""
    task, p = _task_params(task, params)
    if task == "passkey":
        return synthetic.PASSKEY_VOCAB_SIZE
    if task == "arithmetic":
        return synthetic.ARITH_VOCAB_SIZE
    return p["vocab"]


def _example_length(task: str, p: Mapping[str, int], row_len: int) -> int:
    if task == "recall":
        return 2 * p["n_pairs"] + 4
    if task == "arithmetic":
        return synthetic.arithmetic_length(p["n_digits"], bool(p["worked_steps"]))
    return row_len


def _shortest_row(task: str, p: Mapping[str, int]) -> int:
    """The shortest row a task of row-length examples (copying, passkey) fits in (1: no minimum
    known here; the task itself checks the rest)."""
    if task == "copying":
        return synthetic.COPYING_MIN_LENGTH
    if task == "passkey" and 1 <= p["n_digits"] <= 18:
        return synthetic.passkey_min_length(p["n_digits"])
    return 1


def _examples(task: str, p: Mapping[str, int], n: int, length: int, seed: int, split=None):
    def make(m, s):
        if task == "copying":
            return synthetic.copying(m, length, p["vocab"], s)
        if task == "passkey":
            return synthetic.passkey(m, length, p["n_digits"], s)
        if task == "recall":
            return synthetic.associative_recall(m, p["n_pairs"], p["vocab"], s)
        return synthetic.arithmetic(m, p["n_digits"], bool(p["worked_steps"]), s,
                                    answer_only=bool(p["answer_only"]))
    # a sum's problem is its operands, whatever follows them (steps, answer-only mask)
    prompt_len = synthetic.arithmetic_prompt_length(p["n_digits"]) if task == "arithmetic" else None
    return synthetic.draw_split(make, n, seed, split, prompt_len)


def synthetic_rows(task: str, n_rows: int, row_len: int, seed: int,
                   params: Mapping[str, int] | None = None, split=None) -> Dict[str, np.ndarray]:
    """``n_rows`` rows of ``row_len`` tokens of a synthetic task, a pure function of the arguments.
    ``split``: ``None`` (every problem), ``"train"`` or ``"heldout"`` (the training / held-out
    problems, :func:`jaxformers.data.synthetic.draw_split`).

    Returns ``tokens`` int32 and ``loss_mask`` float32 ``[n_rows, row_len]`` (the task's
    answer mask, aligned with the tokens), plus ``segment_ids`` int32 (1, 2, ... per packed
    example, 0 on padding) when a row holds more than one example.  Padding is ``PAD`` with
    mask 0.  ``ValueError`` if an example does not fit in a row.
    """
    task, p = _task_params(task, params)
    n_rows, row_len = int_arg("n_rows", n_rows, lo=1), int_arg("row_len", row_len, lo=2)
    length = _example_length(task, p, row_len)
    if length > row_len:
        raise ValueError(f"synthetic {task} examples ({p}) are {length} tokens long: they need "
                         f"seq_len >= {length - 1} (got seq_len={row_len - 1})")
    shortest = _shortest_row(task, p)
    if row_len < shortest:  # said in terms of seq_len (the row is seq_len + 1 tokens), not the task's length
        raise ValueError(f"synthetic {task} examples ({p}) are at least {shortest} tokens long: they need "
                         f"seq_len >= {shortest - 1} (got seq_len={row_len - 1})")
    per_row = row_len // length if p.get("pack", 0) else 1
    tokens, mask = _examples(task, p, n_rows * per_row, length, seed, split)
    out_tokens = np.full((n_rows, row_len), synthetic.PAD, np.int32)
    out_mask = np.zeros((n_rows, row_len), np.float32)
    used = per_row * length
    out_tokens[:, :used] = tokens.reshape(n_rows, used)
    out_mask[:, :used] = mask.reshape(n_rows, used)
    out = {"tokens": out_tokens, "loss_mask": out_mask}
    if per_row > 1:
        seg = np.zeros((n_rows, row_len), np.int32)
        seg[:, :used] = np.repeat(np.arange(1, per_row + 1, dtype=np.int32), length)[None]
        out["segment_ids"] = seg
    return out


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(x) for x in parts]).generate_state(1, np.uint64)[0])


class SyntheticLoader:
    """Batch dicts of a synthetic task, ``[local_batch_size, seq_len + 1]``, pure in (seed, step).

    The global batch at ``step`` is ``synthetic_rows(task, batch_size, seq_len + 1,
    seed=f(seed, step), split="train")`` (never a held-out problem); each process keeps its
    contiguous share of rows, as :class:`TokenLoader` does.
    """

    SPLIT_IDS = {"train": 0, "val": 1}

    def __init__(self, task: str, batch_size: int, seq_len: int, seed: int = 0, params=None, *,
                 process_index: int | None = None, process_count: int | None = None):
        self.task, self.params = _task_params(task, params)
        self.batch_size = int_arg("batch_size", batch_size, lo=1)
        self.seq_len = int_arg("seq_len", seq_len, lo=1)
        self.seed = int_arg("seed", seed, lo=0)
        self.process_index, self.process_count = resolve_process(process_index, process_count)
        if self.batch_size % self.process_count:
            raise ValueError(
                f"global batch_size {self.batch_size} is not divisible by process_count {self.process_count}")
        self.local_batch_size = self.batch_size // self.process_count
        synthetic_rows(self.task, 1, self.seq_len + 1, 0, self.params)  # fail early if it does not fit

    def global_batch_dict_at(self, step: int) -> Dict[str, np.ndarray]:
        step = int_arg("step", step, lo=0)
        seed = _derived_seed(self.seed, self.SPLIT_IDS["train"], step)
        return synthetic_rows(self.task, self.batch_size, self.seq_len + 1, seed, self.params, "train")

    def batch_dict_at(self, step: int) -> Dict[str, np.ndarray]:
        lo = self.process_index * self.local_batch_size
        return {k: np.ascontiguousarray(v[lo:lo + self.local_batch_size])
                for k, v in self.global_batch_dict_at(step).items()}

    def __repr__(self) -> str:
        return (f"SyntheticLoader({self.task}, {self.params}, batch_size={self.batch_size}, "
                f"seq_len={self.seq_len}, seed={self.seed}, "
                f"process={self.process_index}/{self.process_count})")
