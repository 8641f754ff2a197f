"""Stateless, resumable batches of token windows.

:class:`TokenLoader` draws ``batch_size`` random windows of ``seq_len + 1``
tokens (inputs are ``w[:, :-1]``, targets ``w[:, 1:]``).  The batch at a step
is a pure function of ``(seed, step)`` -- the window starts come from
``np.random.default_rng([seed, step])`` -- so resuming from a checkpoint at
step ``s`` is ``loader.iterate(s)``, with nothing else to save.

Multi-host: every process computes the same *global* batch of
``batch_size`` rows and keeps rows ``[p * B / P, (p + 1) * B / P)``, where
``p = process_index`` and ``P = process_count`` (by default
``jax.process_index()`` / ``jax.process_count()``).

:func:`eval_batches` walks a split sequentially with stride ``seq_len``
(windows overlap by the one token that is both the last target of a window
and the first input of the next), so every token after the first is a
target exactly once -- a deterministic, exhaustive evaluation.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["TokenLoader", "eval_batches", "resolve_process"]


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Fill in ``(process_index, process_count)`` from JAX where not given, and validate."""
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415  (only needed for the defaults)
        if process_count is None:
            process_count = jax.process_count()
        if process_index is None:
            process_index = jax.process_index()
    process_index, process_count = int(process_index), int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    return process_index, process_count


def _check_tokens(tokens, seq_len: int, what: str = "tokens") -> np.ndarray:
    if not isinstance(tokens, np.ndarray):
        tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of token ids, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{what} must hold integers, got dtype {tokens.dtype}")
    if int(seq_len) < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if tokens.shape[0] < seq_len + 1:
        raise ValueError(
            f"{what} has {tokens.shape[0]} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a shorter seq_len or more data (or a larger val_fraction for the val split)")
    return tokens


class TokenLoader:
    """Random windows ``[local_batch_size, seq_len + 1]`` (int32), deterministic in (seed, step)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, *,
                 process_index: int | None = None, process_count: int | None = None):
        self.tokens = _check_tokens(tokens, seq_len)
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
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
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        n_starts = self.tokens.shape[0] - self.seq_len  # starts 0 .. n - (T + 1)
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, n_starts, size=self.batch_size, dtype=np.int64)

    def _windows(self, starts: np.ndarray) -> np.ndarray:
        out = np.empty((len(starts), self.seq_len + 1), dtype=np.int32)
        for r, s in enumerate(starts.tolist()):
            out[r] = self.tokens[s:s + self.seq_len + 1]
        return out

    def global_batch_at(self, step: int) -> np.ndarray:
        """The full ``[batch_size, seq_len + 1]`` batch (identical on every process)."""
        return self._windows(self.offsets_at(step))

    def batch_at(self, step: int) -> np.ndarray:
        """This process's rows of the global batch: ``[local_batch_size, seq_len + 1]``."""
        lo = self.process_index * self.local_batch_size
        return self._windows(self.offsets_at(step)[lo:lo + self.local_batch_size])

    def iterate(self, start_step: int = 0) -> Iterator[np.ndarray]:
        """Endless batches ``batch_at(start_step), batch_at(start_step + 1), ...``."""
        step = int(start_step)
        while True:
            yield self.batch_at(step)
            step += 1

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.iterate(0)

    def __repr__(self) -> str:
        return (f"TokenLoader(n_tokens={self.tokens.shape[0]}, batch_size={self.batch_size}, "
                f"seq_len={self.seq_len}, seed={self.seed}, process={self.process_index}/{self.process_count})")


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None, *,
                 drop_last: bool = False, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[np.ndarray]:
    """Sequential windows ``[b, seq_len + 1]`` (int32) covering ``tokens`` in order.

    Window ``i`` starts at ``i * seq_len``; the tail shorter than a window is
    skipped.  Batches hold ``batch_size`` windows globally; with several
    processes each gets its contiguous share of rows, as in
    :class:`TokenLoader`.  The last batch may be smaller unless ``drop_last``
    (with more than one process a short last batch is always dropped, since
    the shares must line up).  At most ``max_batches`` batches are yielded.
    """
    tokens = _check_tokens(tokens, seq_len)
    batch_size, seq_len = int(batch_size), int(seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    p, n_proc = resolve_process(process_index, process_count)
    if batch_size % n_proc:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {n_proc}")
    n_windows = (tokens.shape[0] - 1) // seq_len
    local = batch_size // n_proc
    n_done = 0
    for first in range(0, n_windows, batch_size):
        if max_batches is not None and n_done >= max_batches:
            return
        count = min(batch_size, n_windows - first)
        if count < batch_size and (drop_last or n_proc > 1):
            return
        rows = range(first + p * local, first + min((p + 1) * local, count))
        out = np.empty((len(rows), seq_len + 1), dtype=np.int32)
        for r, w in enumerate(rows):
            out[r] = tokens[w * seq_len:w * seq_len + seq_len + 1]
        yield out
        n_done += 1
