"""The training loop: sharded, jit-compiled, resumable and reproducible.

    from jaxformers import get_config
    from jaxformers.training import TrainConfig, train
    summary = train(get_config("gpt", "tiny", vocab_size=257), TrainConfig(steps=300, out_dir="runs/x"))

What lives where: the step functions and their compiled form in :mod:`.steps`, the
losses in :mod:`.losses`, the run directory (files, resume policy, ``load_run``)
in :mod:`.rundir`, throughput / MFU / plots / progress in :mod:`.metrics`; this
module is the loop that ties them together, plus :func:`evaluate`.

``step`` counts completed optimizer updates; the ``loss`` logged at ``step=s``
is the training loss of the batch used for update ``s`` (before the update).

Reproducibility: parameters come from ``PRNGKey(seed)`` and the batch of update
``s`` is a pure function of ``(seed, s)`` (:class:`jaxformers.data.TokenLoader`,
:class:`jaxformers.data.SyntheticLoader`), as is the rng the loss function sees,
so the same config gives the same losses, and ``resume=True`` continues from
the newest complete checkpoint on exactly the curve of an uninterrupted run
(rows of ``metrics.jsonl`` after the restored step are dropped first).  At a step that both
evaluates and checkpoints, the checkpoint is saved first (an evaluation cut short never costs
it) and records that the evaluation is due; a resume from it evaluates that step again when
``metrics.jsonl`` has no evaluation row of it.

Resume policy: ``resume=True`` with no complete checkpoint starts from scratch
(with a message) -- so a job script can always pass ``--resume`` after
preemption.  ``resume=False`` refuses (``FileExistsError``) to touch a run
directory that already holds checkpoints (one without checkpoints, e.g. from a
run killed before its first save, is reused and its metrics are reset).  A corrupt newest checkpoint is an
error (:class:`CheckpointError`), never silently skipped; an incomplete one (a
save cut short) is moved to ``checkpoints.incomplete/`` and the previous one is used.
See :mod:`.rundir` for the files.

Several processes (``jax.distributed``, see :func:`.mesh.maybe_initialize_distributed`): each
process reads only the rows of the global batch its devices hold (:func:`train_loader`), process
0 alone writes the run directory's files, and a stop signal received by any process is agreed on
by all (:class:`_StopVote`), so they checkpoint the same step and stop together; one received
during the last step's evaluation or checkpoint is reported by all (the run is finished).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import jax
import numpy as np
import flax.linen as nn

from pallas_kernels._common import check_flag

from ..config import ModelConfig
from ..data.loader import strided_eval_batches
from ..data.sources import open_data, open_dataset
from ..registry import build
from ..utils import count_params, is_int
from . import mesh as mesh_lib
from . import rundir
from .checkpoint import Checkpointer, library_versions
from .config import TrainConfig, module_names
from .losses import LossFn, get_loss
from .metrics import Progress, Throughput, mfu, model_flops_per_token, peak_flops, plot_losses
from .optim import SCHEDULE_FIELDS, decay_mask, lr_at, make_optimizer
from .rundir import (CONFIG_FILE, METRICS_FILE, PLOT_FILE, SUMMARY_FILE, TOKENIZER_DIR, load_run,
                     read_metrics)
from .steps import CompileCache, Program, abstract_params, compute_config, program_key, resolve_dtype

log = logging.getLogger(__name__)

__all__ = ["TrainingDiverged", "CONFIG_FILE", "METRICS_FILE", "PLOT_FILE", "SUMMARY_FILE", "TOKENIZER_DIR", "evaluate",
           "load_run", "open_dataset", "peak_flops", "plot_losses", "read_metrics", "resolve_dtype", "train"]


# ============================================================================ building blocks
def _with_imports(tc: TrainConfig, names) -> TrainConfig:
    """``tc`` with the module names ``names`` (a run's or a fine-tuning source's recorded
    ``imports``) ahead of its own ``imports``: a run keeps recording the modules that loading it
    needs."""
    merged = module_names(list(module_names(names)) + list(tc.imports))
    return tc if merged == tc.imports else tc.replace(imports=merged)


def _record_own_modules(model_config, tc: TrainConfig) -> TrainConfig:
    """``tc`` with the modules that registered the model's architecture and ``tc.loss``, when they
    are your own (not ``jaxformers.*``), added to ``imports``: loading or resuming the run in a
    new process then imports them (without ``--import``).  A script's own registration
    (``__main__``) cannot be imported by another process: a warning says how to make the run
    loadable."""
    from ..registry import get_spec
    from .losses import loss_module
    owners = [(f"architecture {model_config.model!r}", get_spec(model_config.model).module),
              (f"loss {tc.loss!r}", loss_module(tc.loss))]
    found = []
    for what, module in owners:
        if module is None or module == "jaxformers" or module.startswith("jaxformers."):
            continue
        if module == "__main__":
            log.warning("the %s is registered by the script being run (__main__), which another process "
                        "cannot import: loading or resuming this run elsewhere needs it registered first; "
                        "move the registration into a module and name it in TrainConfig.imports / --import",
                        what)
            continue
        found.append(module)
    return _with_imports(tc, found) if found else tc


def _resolve_loss(tc: TrainConfig, loss_fn: Optional[LossFn]) -> Tuple[LossFn, Optional[str]]:
    """``(loss function, its "module.qualname" if it came from Python, else None)``."""
    if loss_fn is None:
        return get_loss(tc.loss), None
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable (module, params, batch, rng) -> (loss, metrics), "
                         f"got {type(loss_fn).__name__}")
    name = f"{getattr(loss_fn, '__module__', '?')}.{getattr(loss_fn, '__qualname__', repr(loss_fn))}"
    return loss_fn, name


def train_program(model_config: ModelConfig, tc: TrainConfig, mesh, dtype: str, loss_fn: LossFn,
                  cache: Optional[CompileCache] = None, step_fn=None) -> Program:
    """The :class:`Program` ``train`` runs (from ``cache`` when it holds an equal one)."""
    config = compute_config(model_config, dtype)

    def build_program():
        module = build(config)
        abstract, specs = abstract_params(module)
        tx, schedule = make_optimizer(tc, decay_mask(specs, abstract, *config.weight_decay_names()))
        return Program(module, mesh, loss_fn=loss_fn, tx=tx, schedule=schedule, grad_accum=tc.grad_accum,
                       aux_weights=tc.aux_loss_weights, step_fn=step_fn)

    if cache is None:
        return build_program()
    return cache.get(program_key(config, mesh, tc, loss_fn, step_fn), build_program)


def eval_program(model_config: ModelConfig, mesh, dtype: str, loss_fn: LossFn,
                 cache: Optional[CompileCache] = None) -> Program:
    """A :class:`Program` without optimizer (evaluation only)."""
    config = compute_config(model_config, dtype)

    def build_program():
        return Program(build(config), mesh, loss_fn=loss_fn)

    if cache is None:
        return build_program()
    return cache.get(program_key(config, mesh, None, loss_fn), build_program)


def _pad_rows(batch: Dict[str, np.ndarray], rows: int) -> Dict[str, np.ndarray]:
    """Give the batch a ``loss_mask`` (ones where absent) and pad every array to ``rows`` rows
    with zeros (padded rows weigh 0)."""
    tokens = batch["tokens"]
    out = dict(batch)
    if out.get("loss_mask") is None:
        out["loss_mask"] = np.ones(tokens.shape, np.float32)
    n = tokens.shape[0]
    if n < rows:
        out = {k: np.concatenate([v, np.zeros((rows - n, *v.shape[1:]), v.dtype)]) for k, v in out.items()}
    return out


def _eval_rows(program: Program, batch_size: int) -> Tuple[int, int, int, int]:
    """``(rows_global, block, n_blocks, local_rows)`` of an evaluation batch of ``batch_size`` rows:
    rounded up so every batch shard gets rows, and this process's block of them."""
    n_par = mesh_lib.batch_parallelism(program.mesh)
    rows_global = -(-batch_size // n_par) * n_par  # round up: every batch shard gets rows
    block, n_blocks = mesh_lib.process_rows(program.mesh, rows_global)
    return rows_global, block, n_blocks, rows_global // n_blocks


def _loss_mask_ignored(program: Program, params, batch, rows_global: int, vocab_size: int) -> Optional[str]:
    """Why the program's loss ignores ``loss_mask`` (``None``: it honours it), tested on ``batch``
    (this process's rows, padded, with a ``loss_mask``): three evaluation steps, as it is, with its
    last column's weight set to 0, then with that column given other ids.  The last column is a
    target only, never an input of the model, so a loss that weights its targets by ``loss_mask``
    counts fewer targets (``n_targets``) after the first change and keeps its value (to float
    rounding) after the second.  A loss that ignores the mask fails one of them -- unless the
    model gives both ids the same probability at every row's last position (e.g. uniform
    predictions, where ignoring the mask changes nothing)."""
    zeroed = dict(batch, loss_mask=batch["loss_mask"].copy())
    zeroed["loss_mask"][:, -1] = 0
    # other last ids: the batch's rarest id (a trained model gives it a low probability: a large change)
    counts = np.bincount(np.clip(batch["tokens"].ravel(), 0, vocab_size - 1), minlength=vocab_size)
    rare = int(np.argmin(counts))
    changed = dict(zeroed, tokens=batch["tokens"].copy())
    changed["tokens"][:, -1] = np.where(batch["tokens"][:, -1] == rare, (rare + 1) % vocab_size, rare)
    (_, c_all), (s_zero, c_zero), (s_changed, c_changed) = [
        tuple(float(v) for v in program.eval_step(params, program.put_batch(b, rows_global)))
        for b in (batch, zeroed, changed)]
    before = s_zero / c_zero if c_zero else 0.0
    after = s_changed / c_changed if c_changed else 0.0
    if not c_all - c_zero > 0.5:
        return (f"a target of weight 0 still counts in its n_targets ({c_all:g} targets before a column's "
                f"weight was set to 0, {c_zero:g} after)")
    if not (math.isfinite(after) and abs(after - before) <= 1e-5 * max(1.0, abs(before))):
        return f"a target of weight 0 still changes its value ({before:.7g} -> {after:.7g})"
    return None


def check_loss_mask(program: Program, params, tokens, batch_size: int, seq_len: int, stride: int,
                    vocab_size: int, loss_name: str) -> None:
    """``ValueError`` naming ``loss_name`` and the stride unless the program's loss honours
    ``loss_mask``, through which strided evaluation scores only each window's new targets.
    Tested on the first strided batch of ``tokens`` (the shape the evaluation compiles anyway,
    :func:`_loss_mask_ignored`)."""
    rows_global, block, n_blocks, local_rows = _eval_rows(program, batch_size)
    batch = next(strided_eval_batches(tokens, rows_global, seq_len, stride, 1, process_index=block,
                                      process_count=n_blocks), None)
    if batch is None:
        return
    why = _loss_mask_ignored(program, params, _pad_rows(batch, local_rows), rows_global, vocab_size)
    if why is None:
        return
    raise ValueError(f"loss {loss_name!r} ignores loss_mask: {why}; strided evaluation (stride={stride} < "
                     f"seq_len={seq_len}, --stride) scores only each window's new targets through loss_mask, so "
                     f"its perplexity would be wrong: evaluate without a stride, or weight the loss's targets by "
                     f"loss_mask (jaxformers.training.losses.next_token_targets)")


def _eval_windows(source, seq_len: int, split: str) -> Optional[int]:
    """How many evaluation rows ``source.eval_batches`` reads from ``split`` (``None``: unknown)."""
    if hasattr(source, "split_tokens"):
        return max(0, (len(source.split_tokens(split)) - 1) // seq_len)
    if hasattr(source, "split_rows"):
        return len(source.split_rows(seq_len, split)["tokens"])
    return None


def _check_padding_weighs_nothing(program: Program, params, source, batch_size: int, seq_len: int,
                                  n_batches: Optional[int], limit: Optional[int], split: str,
                                  loss_name: Optional[str]) -> None:
    """``ValueError`` naming the loss when the evaluation's last batch has rows that weigh 0 only
    through ``loss_mask`` (padding past the split's last window, or windows past ``limit``) and the
    program's loss ignores ``loss_mask``: those rows would count in the loss.  The loss is tested
    once per program (:func:`_loss_mask_ignored`), only when such rows occur."""
    if getattr(program, "_honours_loss_mask", False):
        return
    rows_global, block, n_blocks, local_rows = _eval_rows(program, batch_size)
    windows = _eval_windows(source, seq_len, split)
    if windows is None:
        return
    scored = windows if n_batches is None else min(windows, n_batches * rows_global)
    if limit is not None:
        scored = min(scored, limit)
    if scored == 0 or scored % rows_global == 0:
        return
    batch = next(iter(source.eval_batches(rows_global, seq_len, 1, split, process_index=block,
                                          process_count=n_blocks)), None)
    if batch is None:
        return
    # every target weighs 1 for the test (a synthetic task's own mask may already zero the last column)
    batch = dict(batch, loss_mask=np.ones(batch["tokens"].shape, np.float32))
    vocab_size = program.module.config.vocab_size
    why = _loss_mask_ignored(program, params, _pad_rows(batch, local_rows), rows_global, vocab_size)
    if why is None:
        program._honours_loss_mask = True
        return
    if loss_name is None:
        fn = program.loss_fn
        loss_name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    size = f"batch_size={batch_size}" + (f" (rounded up to {rows_global} rows for the mesh)"
                                          if rows_global != batch_size else "")
    raise ValueError(f"loss {loss_name!r} ignores loss_mask: {why}; with {size} the last of the "
                     f"{scored} evaluation windows' batches has {scored % rows_global} rows, and its other "
                     f"{rows_global - scored % rows_global} rows weigh 0 only through loss_mask, so the loss "
                     f"would count them and its perplexity would be wrong: evaluate with a batch_size that "
                     f"divides {scored}, or weight the loss's targets by loss_mask "
                     f"(jaxformers.training.losses.next_token_targets)")


def _check_eval_padding(program: Program, params, source, batch_size: int, seq_len: int,
                        max_batches: Optional[int], split: str = "val") -> None:
    """:func:`_check_padding_weighs_nothing` for the batches :func:`eval_loss` reads (without
    ``unit_rows`` or ``stride``; each group of a source with ``eval_groups``)."""
    groups, per = _eval_groups(source, seq_len, split, max_batches)
    sources = [source] if groups is None else list(groups.values())
    for one in sources:
        if one.has_eval_data(seq_len, split):
            _check_padding_weighs_nothing(program, params, one, batch_size, seq_len, per, None, split, None)


def _eval_groups(source, seq_len: int, split: str, max_batches: Optional[int]):
    """``({name: group}, batches per group)``: the evaluation groups of ``source`` that have data
    (``source.eval_groups()``), each read for ``max_batches // n_groups`` batches (at least one);
    ``(None, max_batches)`` for a source without groups."""
    groups = getattr(source, "eval_groups", None)
    if groups is None:
        return None, max_batches
    groups = {n: g for n, g in groups().items() if g.has_eval_data(seq_len, split)}
    return groups, None if max_batches is None else max(1, max_batches // max(1, len(groups)))


def eval_loss(program: Program, params, source, batch_size: int, seq_len: int, max_batches: Optional[int],
              split: str = "val", *, unit_rows: Optional[int] = None,
              stride: Optional[int] = None, loss_name: Optional[str] = None) -> Dict[str, Any]:
    """``{"val_loss", "val_ppl", "val_tokens"}``: the loss function's mean over the evaluation
    batches of ``source`` (weighted by ``n_targets``; ``None`` values without data).

    A source with named evaluation groups (``source.eval_groups()``, e.g. the domains of a
    multi-domain source) is evaluated group by group, each with ``max_batches // n_groups``
    batches (at least one), once: the result adds ``val_loss/<group>`` and the overall loss
    is over all the groups' targets.

    ``unit_rows``: ``max_batches`` counts batches of ``unit_rows`` rows, not of ``batch_size``:
    the first ``max_batches * unit_rows`` windows (of each group) are evaluated, read in batches
    of ``batch_size`` (the rows of the last one past that count weigh 0) -- the evaluation set of
    a run whose batches had ``unit_rows`` rows, in batches of any size.

    ``stride`` (a token stream's source, one with ``split_tokens``; ``None``: non-overlapping windows,
    as ``stride == seq_len``): sliding windows of ``seq_len`` tokens starting every ``stride`` tokens,
    each scoring only its targets the previous window did not
    (:func:`~jaxformers.data.loader.strided_windows`): the same tokens as without it, each scored
    once, with at least ``seq_len - stride`` tokens of context.  ``max_batches`` counts strided
    batches of ``batch_size`` windows (whatever a mesh rounds a batch up to); with ``unit_rows``
    the scored tokens are those of the first ``max_batches * unit_rows`` non-overlapping windows,
    in as many strided batches as they take."""
    empty = {"val_loss": None, "val_ppl": None, "val_tokens": 0}
    if max_batches == 0 or not source.has_eval_data(seq_len, split):
        return empty
    groups, per = _eval_groups(source, seq_len, split, max_batches)
    if groups is not None:
        out, total, count = {}, 0.0, 0.0
        for name, group in groups.items():
            ev = eval_loss(program, params, group, batch_size, seq_len, per, split, unit_rows=unit_rows,
                           stride=stride, loss_name=loss_name)
            if ev["val_loss"] is not None:
                out[f"val_loss/{name}"] = ev["val_loss"]
                total += ev["val_loss"] * ev["val_tokens"]
                count += ev["val_tokens"]
        if count == 0:
            return empty
        loss = total / count
        return {"val_loss": loss, "val_ppl": float(math.exp(min(loss, 700.0))), "val_tokens": int(round(count)),
                **out}
    rows_global, block, n_blocks, local_rows = _eval_rows(program, batch_size)
    limit = None if unit_rows is None or max_batches is None else max_batches * unit_rows  # windows
    n_batches = max_batches if limit is None else -(-limit // rows_global)
    total, count = 0.0, 0.0
    if stride is not None and stride != seq_len:  # sliding windows with a loss mask (the limit: tokens)
        if not hasattr(source, "split_tokens"):
            raise ValueError(f"stride={stride} needs a token stream (text data); this source "
                             f"({getattr(source, 'kind', type(source).__name__)}) has fixed rows")
        # max_batches strided batches of batch_size windows, not of the rows a mesh rounds a batch
        # up to (their count depended on the mesh)
        rows = None if limit is not None or max_batches is None else max_batches * batch_size
        checks = dict(vocab_size=getattr(source, "vocab_size", None),
                      what=source.split_name(split) if hasattr(source, "split_name") else f"{split} tokens")
        batches = strided_eval_batches(source.split_tokens(split), rows_global, seq_len, stride,
                                       max_windows=limit, max_rows=rows,
                                       process_index=block, process_count=n_blocks, **checks)
        limit = None
    else:  # the last batch's rows past the windows (or past limit) weigh 0 through loss_mask only
        _check_padding_weighs_nothing(program, params, source, batch_size, seq_len, n_batches, limit, split,
                                      loss_name)
        batches = source.eval_batches(rows_global, seq_len, n_batches, split, process_index=block,
                                      process_count=n_blocks)
    for i, batch in enumerate(batches):
        batch = _pad_rows(batch, local_rows)
        if limit is not None:  # this process's rows are windows first, first + 1, ... of the split
            first = i * rows_global + block * local_rows
            keep = int(np.clip(limit - first, 0, local_rows))
            if keep < local_rows:
                batch["loss_mask"] = np.where(np.arange(local_rows)[:, None] < keep, batch["loss_mask"], 0)
        s, c = program.eval_step(params, program.put_batch(batch, rows_global))
        total += float(s)
        count += float(c)
    if count == 0:
        return empty
    loss = total / count
    return {"val_loss": loss, "val_ppl": float(math.exp(min(loss, 700.0))), "val_tokens": int(round(count))}


def _warn_unused_aux_weights(tc: TrainConfig, metrics) -> None:
    """Warn about ``aux_loss_weights`` names that no module of the model sows (a typo would
    otherwise leave the real auxiliary loss at weight 1.0 without a word)."""
    sown = sorted(k[len("aux/"):] for k in metrics if k.startswith("aux/"))
    unused = [name for name, _ in tc.aux_loss_weights if name not in sown]
    if unused:
        log.warning("aux_loss_weights names %s, which the model does not sow (it sows %s): those weights "
                    "have no effect", unused, sown or "no auxiliary loss")


_STEP_METRICS = ("loss", "lr", "grad_norm")


def _check_step_metrics(metrics, step_fn_name) -> None:
    """``ValueError`` when a ``step_fn``'s first step returned metrics without the scalars every
    ``metrics.jsonl`` row and the divergence check read (a ``KeyError`` at the first logged step
    before)."""
    keys = sorted(metrics) if isinstance(metrics, Mapping) else None
    missing = [k for k in _STEP_METRICS if keys is None or k not in keys]
    if missing:
        got = f"metrics {keys}" if keys is not None else f"a {type(metrics).__name__}"
        raise ValueError(f"step_fn={step_fn_name or 'None'} must return (params, opt_state, metrics) with "
                         f"metrics a dict holding {list(_STEP_METRICS)} (scalars, as train_step's do); it "
                         f"returned {got}, missing {missing}")
    # every metric becomes a number of a metrics.jsonl row (a TypeError at the first logged step before)
    shaped = {k: tuple(np.shape(v)) for k, v in metrics.items() if np.size(v) != 1}
    if shaped:
        raise ValueError(f"step_fn={step_fn_name or 'None'} returned metrics that are not scalars: "
                         + ", ".join(f"{k} of shape {s}" for k, s in sorted(shaped.items()))
                         + " (every metric is a number of a metrics.jsonl row: reduce it, or one scalar "
                           "per entry)")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm of a step became NaN / infinite (read at logged and
    checkpointed steps), or the parameters / optimizer state to checkpoint are not finite: the
    state is no longer finite (or is about to be), so the run stops -- before it
    checkpoints that state, keeping the last finite checkpoints (``keep_checkpoints`` would
    otherwise prune them) -- instead of training on NaN until its last step."""


class _StopRequest:
    """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into "checkpoint after this step, then stop"
    (an evaluation due at that step is left to the resume, which runs it first).

    Only installed from the main thread (signal handlers cannot be set elsewhere);
    a second signal falls through to the previous handler (the default action where that
    was not installed from Python, which cannot reinstall it).
    """

    def __init__(self):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # pragma: no cover - exotic embedders
                pass

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up gracefully-stopping
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def restore(self):
        for sig, handler in self._previous.items():
            # None: the previous handler was not installed from Python (an embedding
            # interpreter's C handler), which cannot be reinstalled: the default action it is
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


#: Train-config fields that decide which tokens each step sees: changing one on resume is a warning.
_DATA_PATH_FIELDS = ("data", "tokenizer", "seed", "batch_size", "seq_len")


def _dataset_record(source) -> dict:
    """``source.describe()`` plus what identifies a prepared dataset's content (its corpus'
    SHA-256 and token counts): config.json's ``dataset``, compared on resume."""
    record = dict(source.describe())
    meta = getattr(source, "meta", None) or {}
    for key in ("corpus_sha256", "n_tokens"):
        if meta.get(key) is not None:
            record[key] = meta[key]
    return record


def _check_inputs(model_config, tc, source, mesh) -> None:
    if model_config.vocab_size < source.vocab_size:
        where = source.ds_dir or source.spec
        raise ValueError(
            f"model vocab_size={model_config.vocab_size} is smaller than the dataset's vocab_size="
            f"{source.vocab_size} ({where}); set vocab_size >= {source.vocab_size}")
    if tc.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len={tc.seq_len} exceeds the model's max_seq_len={model_config.max_seq_len}")
    n_par = mesh_lib.batch_parallelism(mesh)
    if tc.micro_batch_size % n_par:
        raise ValueError(
            f"batch_size / grad_accum = {tc.micro_batch_size} must be divisible by "
            f"data*fsdp*expert = {n_par} "
            f"(mesh {mesh_lib.describe(mesh)})")
    mesh_lib.process_rows(mesh, tc.batch_size)  # ValueError unless each process holds one block
    if tc.eval_batches and not source.has_eval_data(tc.seq_len):
        log.warning("%s has no validation window of seq_len + 1 = %d tokens: no evaluation will run "
                    "(val_loss stays null); use a larger validation split or a shorter seq_len",
                    source.ds_dir or source.spec, tc.seq_len + 1)


def train_loader(source, tc: TrainConfig, mesh):
    """The training batches of this process: its block of rows of every global batch (the rows
    its devices hold under the batch sharding; see :func:`.mesh.process_rows`)."""
    block, n_blocks = mesh_lib.process_rows(mesh, tc.batch_size)
    return source.train_loader(tc.batch_size, tc.seq_len, tc.seed, process_index=block,
                               process_count=n_blocks)


class _StopVote:
    """Agreement on "stop after this step" across processes.

    Each process contributes the signal it received (0 = none); the maximum over processes is
    computed by a tiny collective that is read one step later, so every process stops after the
    same step (without a host round trip per step).  With one process it is the local signal.
    """

    def __init__(self):
        self.multi = jax.process_count() > 1
        self._pending = None
        if self.multi:
            import jax.numpy as jnp
            from jax.sharding import NamedSharding, PartitionSpec as P

            flat = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
            self._sharding = NamedSharding(flat, P("all"))
            self._max = jax.jit(jnp.max, out_shardings=NamedSharding(flat, P()))

    def agreed(self, signum: Optional[int]) -> Optional[int]:
        """The agreed signal after the current step (``None``: go on); call once per step."""
        if not self.multi:
            return signum
        previous, self._pending = self._pending, self._vote(signum)
        if previous is None:
            return None
        return int(previous) or None

    def final(self, signum: Optional[int]) -> Optional[int]:
        """The signal any process has received by now, read at once (not one step later): every
        process calls it once, after its last step (a signal during the last evaluation or
        checkpoint is read by no step's vote)."""
        if not self.multi:
            return signum
        return int(self._vote(signum)) or None

    def _vote(self, signum: Optional[int]) -> jax.Array:
        """The maximum over processes of each one's signal (0 = none), not yet read."""
        local = np.full((jax.local_device_count(),), signum or 0, np.int32)
        return self._max(jax.make_array_from_process_local_data(self._sharding, local, (jax.device_count(),)))


def _train_row(done: int, metrics: dict, tokens_per_s, tokens: int) -> dict:
    """A ``metrics.jsonl`` row: step, loss, lr, grad_norm, throughput, then every other metric
    of the loss (``aux/<name>``, ``total_loss``, ...) except ``n_targets``."""
    m = {k: float(v) for k, v in metrics.items()}
    row = {"step": done, "loss": m.pop("loss"), "lr": m.pop("lr"), "grad_norm": m.pop("grad_norm"),
           "tokens_per_s": None if tokens_per_s is None else round(tokens_per_s, 1), "tokens": tokens}
    m.pop("n_targets", None)
    row.update(sorted(m.items()))
    return row


def _non_finite(metrics) -> Dict[str, float]:
    """The entries of ``loss`` / ``grad_norm`` in ``metrics`` that are NaN or infinite."""
    values = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
    return {k: v for k, v in values.items() if not math.isfinite(v)}


@jax.jit
def _all_finite(params, opt_state) -> jax.Array:
    """Whether every float of ``params`` and every float array (``ndim >= 1``: Adam's moments; not
    a scalar such as a best-so-far value that starts at inf) of ``opt_state`` is finite (a
    scalar, the same on every process)."""
    import jax.numpy as jnp
    leaves = jax.tree.leaves(params) + [x for x in jax.tree.leaves(opt_state) if jnp.ndim(x) >= 1]
    checks = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def _diverged(bad: Dict[str, object], done: int, last_checkpoint: Optional[int], run_dir) -> TrainingDiverged:
    kept = (f"its newest checkpoint, step {last_checkpoint}, is kept" if last_checkpoint is not None
            else "no checkpoint was saved")
    return TrainingDiverged(
        f"training diverged at step {done}: {', '.join(f'{k} = {v}' for k, v in bad.items())}; stopped "
        f"without checkpointing it ({run_dir}: {kept}). Lower --lr or lengthen the warmup (resuming from "
        "the kept checkpoint needs --allow-lr-jump), or check the data")


# ============================================================================ train
def resume_schedule(saved: Optional[dict], tc: TrainConfig, step: int, allow_lr_jump: bool = False,
                    config_file=None) -> Tuple[TrainConfig, List[str]]:
    """``(train config to continue with, messages)`` for resuming at ``step`` a run whose saved
    config is ``saved``.  The LR never jumps silently:

    * only ``steps`` grew (an extension): the schedule keeps its old length
      (``schedule_steps``), so the LR follows the old curve and then holds its final value;
      so does a config without ``schedule_steps`` resuming a run that has one (an extended run
      resumed again by the call that extended it);
    * any other change that moves the LR at ``step``: ``ValueError`` unless ``allow_lr_jump``
      (then a message names the jump).

    A saved train config that is not valid here (hand-edited, or refused by a newer check):
    ``ValueError`` naming ``config_file`` (the file ``saved`` was read from), unless
    ``allow_lr_jump`` (then a warning says the LR was not compared).
    """
    if not saved or "train" not in saved:
        return tc, []
    try:
        old = TrainConfig.from_dict(saved["train"])
    except (ValueError, TypeError) as e:  # TypeError: "train" is not a mapping
        where = f"its saved train config ({config_file})" if config_file else "its saved train config"
        text = f"{where} is not valid here ({e}), so the LR at step {step} cannot be compared"
        if not allow_lr_jump:
            raise ValueError(f"cannot resume: {text}; repair that file, or accept any LR change with "
                             "allow_lr_jump=True (--allow-lr-jump)") from None
        return tc, [f"warning: {text} (allowed by allow_lr_jump)"]
    messages = []
    same = all(getattr(tc, f) == getattr(old, f) for f in SCHEDULE_FIELDS
               if f not in ("steps", "schedule_steps"))
    if same and tc.schedule_steps is None and old.schedule_steps is not None and tc.steps <= old.steps:
        tc = tc.replace(schedule_steps=old.schedule_steps)  # e.g. an extension preempted, resumed again
    if same and tc.steps > old.steps and tc.schedule_steps in (None, old.schedule_steps):
        tc = tc.replace(schedule_steps=old.schedule_length)
        messages.append(
            f"extending the run from {old.steps} to {tc.steps} steps: the LR schedule keeps its length "
            f"{old.schedule_length} (from step {old.schedule_length} on the LR stays at its final value "
            f"{lr_at(old, old.schedule_length):.3g})")
    before, after = lr_at(old, step), lr_at(tc, step)
    if abs(after - before) > 1e-6 * max(abs(before), 1e-12):
        changed = [f"{f}: {getattr(old, f)!r} -> {getattr(tc, f)!r}" for f in SCHEDULE_FIELDS
                   if getattr(old, f) != getattr(tc, f)]
        text = (f"the schedule change ({'; '.join(changed)}) moves the learning rate at step {step} from "
                f"{before:.4g} to {after:.4g}")
        if not allow_lr_jump:
            raise ValueError(f"cannot resume: {text}. To train longer keep the schedule and raise only "
                             "steps (--extend-steps N: the LR continues at its final value), or accept "
                             "the jump with allow_lr_jump=True (--allow-lr-jump)")
        messages.append(f"warning: {text} (allowed by allow_lr_jump)")
    return tc, messages


def train(model_config: ModelConfig, train_config: TrainConfig, *, resume: bool = False,
          progress: Optional[bool] = None, stop_after: Optional[int] = None,
          loss_fn: Optional[LossFn] = None, cache: Optional[CompileCache] = None,
          step_fn=None, allow_lr_jump: bool = False, init_params=None) -> Dict[str, Any]:
    """Train ``model_config`` with ``train_config``; returns the summary dict (also in summary.json).

    ``progress``: ``None`` = a tqdm bar if stderr is a terminal, else one line per
    log step on stderr; ``True`` = bar; ``False`` = silent.  ``stop_after=k``
    stops once step ``k`` is done (checkpointing it), as if preempted -- for
    time-sliced jobs; continue with ``resume=True`` (the schedule still runs to
    ``train_config.steps``; the progress bar and ETA count to ``k``).  ``resume=True`` with a
    larger ``steps`` extends a run
    (the LR continues at its final value, :func:`resume_schedule`); other schedule
    changes that move the LR are refused unless ``allow_lr_jump``.
    ``train_config.init_from`` (a run directory or a Hugging Face checkpoint
    directory, :func:`jaxformers.training.init_from.load_params`) starts a fresh run from
    those parameters (fresh optimizer state; ignored when resuming from a checkpoint).
    ``loss_fn``: a loss function
    ``(module, params, batch, rng) -> (loss, metrics)`` that overrides
    ``train_config.loss`` (its name is recorded in config.json; pass it again to
    resume).  ``cache``: a :class:`~jaxformers.training.steps.CompileCache` to reuse
    compiled programs across calls.  ``step_fn``: a replacement for
    :func:`~jaxformers.training.steps.train_step` (see :class:`Program`), e.g.
    :class:`jaxformers.training.doge.DogeStep`; pass it again to resume.  ``init_params``:
    start from these parameters (this model's tree, e.g. converted weights; copied: they stay
    usable) with a fresh optimizer instead of a random init (ignored when resuming from a
    checkpoint).  ``train_config.imports``: the modules of your own that register the model's
    architecture or the loss, imported first (``ValueError`` naming one that cannot be) and
    recorded with the run, so that loading or resuming it imports them again; the modules that
    registered the model's architecture and ``train_config.loss`` are added to them when they
    are not jaxformers' own (a script's ``__main__`` cannot be: a warning says so).  See the module
    docstring for the run directory, resume and reproducibility rules.
    """
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    if not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    if init_params is not None and train_config.init_from is not None:
        raise ValueError("pass either init_params or train_config.init_from, not both")
    tc = train_config
    # ("no" is truthy: resume="no" resumed)
    resume, allow_lr_jump = check_flag("resume", resume), check_flag("allow_lr_jump", allow_lr_jump)
    if progress is not None and not isinstance(progress, (bool, np.bool_)):  # 1 / "yes" showed nothing
        raise ValueError(f"progress must be None (a bar on a terminal, else one line per log step), True "
                         f"(a bar) or False (silent), got {progress!r}")
    progress = None if progress is None else bool(progress)
    if stop_after is not None and (not is_int(stop_after) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    stop_after = None if stop_after is None else int(stop_after)  # numpy ints too
    # the modules that register the run's architecture / loss (recorded with the run, imported
    # again wherever it is loaded): importable now, or the run could not be loaded later
    rundir.import_modules(tc.imports, where="train_config.imports")
    tc = _record_own_modules(model_config, tc)  # the modules that registered them, if your own
    loss_fn, loss_fn_name = _resolve_loss(tc, loss_fn)
    own = type(model_config).default_loss  # e.g. a landmark model's, which inserts its landmarks
    if loss_fn_name is None and tc.loss == "cross_entropy" and own != "cross_entropy":
        log.warning("model %r is trained with loss=%r; TrainConfig.loss='cross_entropy' skips what that loss "
                    "adds (e.g. the landmarks): pass loss=%r unless you mean it", model_config.model, own, own)
    multi = mesh_lib.maybe_initialize_distributed()
    run_dir = Path(tc.out_dir).expanduser()
    is_main = jax.process_index() == 0
    # one training process (group) per run directory: a second run into it would mix the files
    with rundir.run_lock(run_dir, enabled=is_main):
        return _train(model_config, tc, run_dir=run_dir, is_main=is_main, multi=multi, resume=resume,
                      progress=progress, stop_after=stop_after, loss_fn=loss_fn, loss_fn_name=loss_fn_name,
                      cache=cache, step_fn=step_fn, allow_lr_jump=allow_lr_jump, init_params=init_params)


def _train(model_config, tc, *, run_dir, is_main, multi, resume, progress, stop_after, loss_fn, loss_fn_name,
           cache, step_fn, allow_lr_jump, init_params):
    """:func:`train` once its arguments are checked and the run directory is locked."""
    end_step = tc.steps if stop_after is None else min(tc.steps, stop_after)
    t_start = time.perf_counter()
    if multi and jax.process_count() > 1:
        log.warning("process %d of %d: if another process dies, this one stops once the JAX distributed "
                    "service has missed its heartbeats for %s s (JAXFORMERS_HEARTBEAT_TIMEOUT); then "
                    "restart every process with --resume", jax.process_index(), jax.process_count(),
                    os.environ.get("JAXFORMERS_HEARTBEAT_TIMEOUT", "").strip() or 100)
    ckpt = Checkpointer(run_dir, keep=tc.keep_checkpoints)
    rundir.refuse_clobber(run_dir, ckpt, resume)

    # ---------------------------------------------------------------- data, mesh, checks
    source = open_data(tc.data, tc.tokenizer)
    mesh = mesh_lib.make_mesh(tc.mesh)
    _check_inputs(model_config, tc, source, mesh)
    if hasattr(step_fn, "check_source"):  # e.g. DogeStep: the batches it needs
        step_fn.check_source(source, tc)
    loader = train_loader(source, tc, mesh)
    dtype = resolve_dtype(tc.dtype)

    # ---------------------------------------------------------------- resume checks (read-only)
    saved = rundir.check_resume(run_dir, model_config) if resume else None
    # the modules the run recorded stay recorded (a resume whose train_config does not name them)
    tc = _with_imports(tc, ((saved or {}).get("train") or {}).get("imports"))
    with_ckpt = resume and ckpt.latest_step() is not None
    step_fn_name = None if step_fn is None else type(step_fn).__name__
    if with_ckpt and saved is not None and "step_fn" in saved and saved["step_fn"] != step_fn_name:
        # another step function has another optimizer state (DogeStep's weights) or objective (DistillStep)
        raise ValueError(f"cannot resume {run_dir}: it was trained with step_fn={saved['step_fn'] or 'None'} "
                         f"(train_step when None), this call passes step_fn={step_fn_name or 'None'}; resume "
                         "with the same step function, or train into a new out_dir")
    saved_train = (saved or {}).get("train") if with_ckpt else None
    old_clip = saved_train.get("grad_clip", TrainConfig.grad_clip) if isinstance(saved_train, dict) else None
    if isinstance(old_clip, (int, float)) and (old_clip > 0) != (tc.grad_clip > 0):
        # grad_clip=0 has no clipping stage: the optimizer state the checkpoint holds has another tree
        raise ValueError(f"cannot resume {run_dir}: grad_clip {old_clip!r} -> {tc.grad_clip!r} "
                         f"{'removes' if old_clip > 0 else 'adds'} the optimizer's clipping stage, whose state "
                         f"the checkpoint holds; resume with grad_clip {'> 0' if old_clip > 0 else '= 0'} "
                         "(another value is fine), or train into a new out_dir")
    if resume and not with_ckpt and ckpt.incomplete_steps() and not ckpt.complete_steps():
        log.warning("only incomplete checkpoints in %s", ckpt.directory)
    messages = []  # (text, is_warning): shown by the progress display, else logged (warning / info)
    changed = rundir.implementation_changes(saved, model_config) if with_ckpt else []
    if changed:  # how the same parameters are computed (remat, kernels): allowed on a resume
        messages.append(("resuming with other implementation settings: " + "; ".join(changed), False))
    if with_ckpt and ckpt.latest_step() < end_step:  # something to train: the LR must not jump
        tc, notes = resume_schedule(saved, tc, ckpt.latest_step(), allow_lr_jump,
                                    config_file=rundir.resume_config_file(run_dir))
        messages += [(m, m.startswith("warning")) for m in notes]
    elif with_ckpt and ckpt.latest_step() > tc.steps:  # before anything is written
        raise ValueError(f"steps={tc.steps} is below the step {ckpt.latest_step()} checkpointed in {run_dir}: "
                         f"a run cannot be shortened; resume with steps >= {ckpt.latest_step()} (or "
                         "--extend-steps N: the run's total steps + N)")
    elif with_ckpt and ckpt.latest_step() == tc.steps:
        messages.append((f"{run_dir} is already finished (step {ckpt.latest_step()} of {tc.steps}): "
                         "nothing to train; to train further pass --extend-steps N (or a larger steps)",
                         True))

    # ---------------------------------------------------------------- setup: the compiled program
    program = train_program(model_config, tc, mesh, dtype, loss_fn, cache, step_fn)
    n_params = count_params(program.abstract_params)
    if program.unfit_params:  # a warning when it costs much memory per device
        line, share = program.unfit_params
        messages.append((f"mesh {mesh_lib.describe(mesh)}: {line}", share > 0.1))

    # ---------------------------------------------------------------- restore or initialise
    start_step = 0
    tokens_base = 0
    eval_due = False
    if with_ckpt:
        step = ckpt.latest_step()
        ckpt.verify(step)  # raises CheckpointError before anything is modified
        moved = ckpt.quarantine_incomplete()  # before orbax lists the step directories
        if moved:
            messages.append((f"moved incomplete checkpoint(s) aside: {moved}", True))
        params, opt_state, restored_meta = ckpt.restore(step, *program.abstract_state(), verify=False)
        start_step = int(restored_meta["data_step"])
        # the evaluation of the restored step may have been cut short after its checkpoint was saved
        eval_due = bool(restored_meta.get("eval_due", False))
        if eval_due and any(r.get("step") == start_step and "val_loss" in r for r in rundir.read_metrics(run_dir)):
            eval_due = False  # it finished before the stop: its row stands (a finished run resumes to nothing)
        # tokens trained so far (counted with the batch shape of each step, which a resume may change)
        tokens_base = int(restored_meta.get("tokens_seen", start_step * tc.tokens_per_step))
        changes = rundir.train_config_changes(saved, tc)
        # the same data spec over a changed corpus (same path, other content) is another data path too
        data_changes = [f"dataset {c}" for c in rundir.dataset_changes(saved, _dataset_record(source))]
        if changes or data_changes:  # a changed seed / batch / data / corpus: another data path, a warning
            path = [c for c in changes if c.split(":")[0] in _DATA_PATH_FIELDS] + data_changes
            messages.append(((f"warning: resuming on another data path than the run's ({'; '.join(path)})"
                              if path else "")
                             + ("; " if path and changes else "")
                             + ("resuming with a changed train config: " + "; ".join(changes)
                                if changes else ""),
                             bool(path)))
        if saved is not None and saved.get("loss_fn") != loss_fn_name:
            messages.append((f"the run was trained with loss_fn={saved.get('loss_fn') or tc.loss!r}; "
                             f"continuing with {loss_fn_name or tc.loss!r}", True))
        messages.append((f"resumed from {ckpt.step_dir(step)} (step {start_step})", False))
    else:
        if resume:
            messages.append((f"resume requested but {run_dir} has no complete checkpoint: "
                             "starting from scratch", True))
        ckpt.quarantine_incomplete()  # incomplete saves of an earlier start (orbax staging dirs)
        if tc.init_from is not None:  # fine-tuning: the source's parameters, a fresh optimizer
            from .init_from import load_params, source_imports
            params = jax.device_put(load_params(tc.init_from, program.abstract_params, model_config=model_config),
                                    program.param_shardings)
            tc = _with_imports(tc, source_imports(tc.init_from))  # the source's architecture of your own
            opt_state = program.init_opt_state(params)
            messages.append((f"initialised the parameters from {tc.init_from} (fresh optimizer state)",
                             False))
        elif init_params is not None:  # given weights (converted, e.g. a distillation student)
            params, opt_state = program.init_from(init_params)
            messages.append(("initialised the parameters from init_params (fresh optimizer state)", False))
        else:
            params, opt_state = program.init(tc.seed)
    if tc.eval_batches:  # a loss that would count padding rows: refused now, not at its first evaluation
        _check_eval_padding(program, params, source, tc.micro_batch_size, tc.seq_len, tc.eval_micro_batches)

    # ---------------------------------------------------------------- run directory files
    # config.json's text, also saved with every checkpoint (rundir.CHECKPOINT_CONFIG): a resume
    # checks against the newest complete checkpoint's (rundir.resume_config)
    run_config_text = rundir.config_text(
        model_config=model_config, train_config=tc, compute_dtype=dtype, dataset=_dataset_record(source),
        n_params=n_params, mesh=mesh_lib.describe(mesh), loss_fn=loss_fn_name, step_fn=step_fn_name)

    def write_run_config():
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write(run_dir / rundir.CONFIG_FILE, run_config_text)
        rundir.write_run_file(run_dir, model_config, tc)

    # a resume records its (possibly changed) config only with the first checkpoint it trains
    # under it: a resume that trains nothing, or is stopped before its first save, leaves the
    # run's config.json / run.yaml as they were (they describe the run's checkpoints); one killed
    # after writing them and before that checkpoint is complete leaves them ahead of the newest
    # complete checkpoint, whose own copy (rundir.CHECKPOINT_CONFIG) the next resume checks against
    # and puts back (rundir.restore_checkpoint_config) before it trains, or trains nothing
    config_pending = is_main and with_ckpt
    if is_main:
        if not with_ckpt:
            write_run_config()
        elif rundir.restore_checkpoint_config(run_dir, ckpt, step):
            messages.append((f"{rundir.CONFIG_FILE} was ahead of the checkpoint of step {step} (a resume "
                             "killed before its first save): put back the checkpoint's config", True))
        rundir.reset_metrics(run_dir, start_step if with_ckpt else None)
        rundir.copy_tokenizer(run_dir, source.ds_dir, getattr(source, "tokenizer", None))

    # ---------------------------------------------------------------- compile
    t_compile = time.perf_counter()
    if start_step < end_step:
        program.compile_train_step(program.put_batch(loader.batch_dict_at(start_step), tc.batch_size))
    compile_s = time.perf_counter() - t_compile
    rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(tc.seed), 1), program.replicated)

    # ---------------------------------------------------------------- loop
    progress_ = Progress(progress if is_main else False, end_step, start_step)  # this call's end: its ETA
    for msg, warning in messages:
        if progress_.active:
            progress_.info(msg)
        elif warning:
            log.warning(msg)
        else:
            log.info(msg)
    # a fresh start drops the events of an earlier start; a resume those from the restored step
    # on, and writes that step's rows again (a kill may have cut them from the event file's buffer;
    # the earlier steps' events were flushed before the checkpoint was saved)
    metrics_log = rundir.MetricsWriter(
        run_dir, enabled=is_main, tensorboard=tc.tensorboard, purge_step=start_step if with_ckpt else 0,
        replay=[r for r in read_metrics(run_dir) if r.get("step") == start_step] if with_ckpt and is_main else ())
    fpt = model_flops_per_token(program.module.config, tc.seq_len, program.abstract_params,
                                program.loss_fn)

    def write_row(row):
        metrics_log.write(row)
        progress_.message(row)

    def evaluate_now(done):
        ev = eval_loss(program, params, source, tc.micro_batch_size, tc.seq_len, tc.eval_micro_batches)
        if ev["val_loss"] is None:
            return None
        row = {"step": done, **{k: v for k, v in ev.items() if k != "val_tokens"}}
        write_row(row)
        return row

    def tokens_at(done):
        return tokens_base + (done - start_step) * tc.tokens_per_step

    last_train, last_eval = None, None
    if tc.init_from is not None and not with_ckpt and start_step < end_step:
        evaluate_now(0)  # the source model's loss on this data: where fine-tuning starts
    if eval_due:  # the restored step's evaluation, cut short before it wrote its row
        last_eval = evaluate_now(start_step)
    clock = Throughput(start_step, tc.tokens_per_step)
    stop = _StopRequest()
    vote = _StopVote()
    stopped_by = None
    try:
        for step in range(start_step, end_step):
            batch = program.put_batch(loader.batch_dict_at(step), tc.batch_size)
            params, opt_state, metrics = program.train_step(params, opt_state, batch, step, rng)
            if step == start_step:
                _check_step_metrics(metrics, step_fn_name)
                _warn_unused_aux_weights(tc, metrics)
            done = step + 1
            progress_.update(1)
            stopped_by = vote.agreed(stop.signum)  # read once: a signal may land mid-iteration
            stopping = stopped_by is not None  # the same step on every process
            do_log = done % tc.log_every == 0 or done == tc.steps
            do_eval = (tc.eval_every and done % tc.eval_every == 0) or done == tc.steps
            do_ckpt = ((tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == end_step
                       or stopping)
            if do_log:  # ------------------------------------------- log
                tps = clock.end_interval(done, params)
                last_train = _train_row(done, jax.device_get(metrics), tps, tokens_at(done))
                if tps is not None and mfu(fpt, tps) is not None:
                    last_train["mfu"] = round(mfu(fpt, tps), 4)
                write_row(last_train)
            elif do_eval or do_ckpt:  # the interval ends here: the checks, the checkpoint and the
                clock.end_interval(done, params)  # evaluation below are not training time
            if do_log or do_ckpt:  # ------------------------------------- divergence
                health = last_train if do_log else jax.device_get(
                    {k: metrics[k] for k in ("loss", "grad_norm")})
                bad = _non_finite(health)
                if do_ckpt and not bad and not bool(_all_finite(params, opt_state)):
                    # a finite loss whose update overflowed: the state to save is not finite
                    bad = {"parameters or optimizer state": "not finite"}
                if bad:  # never checkpoint NaN: keep_checkpoints would prune the finite ones
                    ckpt.wait()
                    raise _diverged(bad, done, ckpt.latest_step(), run_dir)
            if do_eval or do_ckpt:
                # the checkpoint first: an evaluation that fails or is cut short (Ctrl-C, OOM, a
                # preemption deadline) must not cost the step's checkpoint; a checkpoint whose
                # evaluation is due records it (``eval_due``) and a resume from it evaluates
                # again (rewriting the row), so the curve stays the uninterrupted run's
                if do_ckpt:  # ------------------------------------- checkpoint
                    if config_pending:  # the first checkpoint trained with this config
                        write_run_config()
                        config_pending = False
                    metrics_log.flush()  # the events of the steps this checkpoint keeps
                    ckpt.save(done, params, opt_state, {
                        "data_step": done, "seed": tc.seed, "batch_size": tc.batch_size,
                        "seq_len": tc.seq_len, "tokens_seen": tokens_at(done), "eval_due": bool(do_eval)},
                        files={rundir.CHECKPOINT_CONFIG: run_config_text})
                if do_eval and not (stopping and done < end_step):  # eval (on a stop: at the resume)
                    last_eval = evaluate_now(done) or last_eval
                clock.restart()
            if stopping:  # ---------------------------------------- signals
                progress_.info(f"stopping on signal {stopped_by}: checkpoint saved at step {done}; "
                               "continue with resume=True (--resume)")
                end_step = done
                break
        ckpt.wait()
        if stopped_by is None:
            # a signal during the last step's evaluation or checkpoint (read by no step): the run
            # is finished, yet the caller must hear of it (an experiment must not go on to its
            # next run); with several processes, every one hears of a signal any one received
            stopped_by = vote.final(stop.signum)
    finally:
        stop.restore()
        progress_.close()
        metrics_log.close()
        ckpt.close()

    # ---------------------------------------------------------------- summary
    if start_step >= end_step:  # nothing left to train: report the restored state
        rows = read_metrics(run_dir)
        last_train = next((r for r in reversed(rows) if "loss" in r), None)
        last_eval = next((r for r in reversed(rows) if r.get("val_loss") is not None), None)
    finished = max(start_step, end_step) >= tc.steps
    if last_eval is None and finished:
        ev = eval_loss(program, params, source, tc.micro_batch_size, tc.seq_len, tc.eval_micro_batches)
        if ev["val_loss"] is not None:
            last_eval = {"step": max(start_step, tc.steps), **ev}
    tokens_per_s = clock.tokens_per_s
    summary = {
        "model": model_config.model,
        "run_dir": str(run_dir),
        "steps": tc.steps,
        "final_step": max(start_step, end_step),
        "trained_steps": max(0, end_step - start_step),
        "finished": finished,
        "stopped_by_signal": stopped_by,
        "resumed_from": start_step if with_ckpt else None,
        "loss_fn": loss_fn_name or tc.loss,
        "train_loss": None if last_train is None else last_train["loss"],
        "val_loss": None if last_eval is None else last_eval["val_loss"],
        "val_ppl": None if last_eval is None else last_eval["val_ppl"],
        **({} if last_eval is None else {k: v for k, v in last_eval.items() if k.startswith("val_loss/")}),
        "n_params": n_params,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": fpt,
        "mfu": mfu(fpt, tokens_per_s),
        "compile_s": compile_s,
        "wall_s": time.perf_counter() - t_start,
        "compute_dtype": dtype,
        "mesh": mesh_lib.describe(mesh),
        "n_devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "init_from": tc.init_from,
        "versions": library_versions(),  # python, jax, flax, orbax-checkpoint, ... (also in summary.json)
    }
    if start_step >= end_step:  # trained nothing: the throughput / timing of the training that got here
        summary.update(rundir.earlier_measurements(run_dir, summary["final_step"]))
    if is_main:
        rundir.write_summary(run_dir, summary)
        try:
            plot_losses(run_dir)
        except Exception as e:  # noqa: BLE001 - a plot must never fail a run
            log.warning("could not plot losses: %s", e)
    return summary


# ============================================================================ evaluate
def _normalize_params(params):
    params = nn.unbox(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    return params


def evaluate(run: Union[str, os.PathLike, Tuple[ModelConfig, Any]], data=None, *,
             tokenizer: Optional[str] = None,
             split: str = "val", batch_size: Optional[int] = None, seq_len: Optional[int] = None,
             max_batches: Optional[int] = -1, mesh=None,
             dtype: Optional[str] = None, loss_fn: Optional[LossFn] = None,
             cache: Optional[CompileCache] = None,
             model_overrides: Optional[Dict[str, Any]] = None,
             stride: Optional[int] = None) -> Dict[str, Any]:
    """Mean loss and perplexity: ``{"val_loss", "val_ppl", "val_tokens", "stride"}`` (``val_tokens``: the
    total target weight, i.e. the number of counted targets for 0/1 masks).

    ``run``: a run directory, or ``(model_config, params)``.  ``data``: a data spec
    (corpus / folder prepared with ``tokenizer``, prepared dataset directory,
    ``synthetic:TASK``) or a 1-D array of token ids; default: the run's data.
    ``split``: ``val`` or ``train``.  Defaults for ``batch_size`` / ``seq_len`` /
    ``max_batches`` come from the run's train config (``max_batches=-1``: the run's
    ``eval_batches`` full batches, i.e. exactly the run's ``eval_batches * batch_size`` sequences
    (per domain of a ``domains:`` run, as many as the run took) of its ``val_loss``,
    whatever its ``grad_accum`` and whatever ``batch_size`` reads them), and ``dtype`` (compute dtype)
    from the run or float32 (so a run's final ``val_loss`` is reproduced);
    ``max_batches=None`` evaluates the whole split (as ``-1`` does for a run trained with
    ``eval_batches=0``); ``max_batches >= 1``: the first ``max_batches * batch_size`` windows, on
    any mesh (a mesh whose batch axes do not divide ``batch_size`` reads bigger batches, with the
    rows past those windows weighing 0).  ``mesh``: a spec such as ``"data=2,fsdp=2"`` or a
    ``jax.sharding.Mesh`` (None: every device on ``data``).  The loss is ``loss_fn``, else the
    run's ``loss`` by name, else cross-entropy.  ``model_overrides``: model config fields to
    replace for this evaluation, ones that leave the parameters as they are (e.g. a landmark
    model's ``{"mem_chunk_len": 96}``: its loss read through the retrieval memory, windows
    longer than ``max_seq_len`` allowed); an unknown field is a ``ValueError``.

    ``stride`` (``1 <= stride <= seq_len``; default ``seq_len``: non-overlapping windows, the run's
    ``val_loss``): strided ("sliding-window") perplexity, as Hugging Face's "Perplexity of
    fixed-length models": windows of ``seq_len`` tokens start every ``stride`` tokens and each scores
    only the targets the previous one did not, so the tokens scored are the same as with
    ``stride == seq_len`` (the tail that fills no window is skipped; the last window is moved back
    to end where the scored tokens end), each exactly once (``val_tokens``), every one after the first
    window with at least ``seq_len - stride`` tokens of context.  ``max_batches`` counts the (more)
    strided batches; ``-1`` scores the run's evaluation tokens.  Text data only (not ``synthetic:``
    rows); windows cross end-of-text tokens as without it.  The overlapping context is masked
    through ``loss_mask``: a loss that ignores it is a ``ValueError`` naming it (checked on the first
    strided batch, :func:`check_loss_mask`).  So are the rows of a last batch that the evaluation
    windows do not fill (``batch_size`` not dividing them): they weigh 0 through ``loss_mask``, and a
    loss that ignores it (a ``loss_fn`` of your own) is refused when such rows occur.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if value is not None and (not is_int(value) or value < 1):
            raise ValueError(f"{name} must be a positive int or None (the run's), got {value!r}")
    if max_batches is not None and (not is_int(max_batches) or max_batches < -1 or max_batches == 0):
        raise ValueError(f"max_batches must be None (the whole split), -1 (the run's eval_batches) or an "
                         f"int >= 1, got {max_batches!r}")
    if stride is not None and (not is_int(stride) or stride < 1):
        raise ValueError(f"stride must be an int with 1 <= stride <= seq_len or None (seq_len), got {stride!r}")
    batch_size, seq_len, max_batches = (None if v is None else int(v) for v in (batch_size, seq_len, max_batches))
    tc = None
    if mesh is not None and not isinstance(mesh, (str, jax.sharding.Mesh)):  # was "bad entry" of a repr
        raise ValueError(f"mesh must be None (every device on data), a mesh spec such as 'data=2,fsdp=2' "
                         f"or a jax.sharding.Mesh (as load_run / generate take it), got {mesh!r}")
    mesh_lib.maybe_initialize_distributed()
    mesh_obj = mesh if isinstance(mesh, jax.sharding.Mesh) else mesh_lib.make_mesh(mesh)
    if isinstance(run, (str, os.PathLike)):
        model_config, tc, params = load_run(run, mesh=mesh_obj)  # restored sharded (every process)
    else:
        model_config, params = run
        params = _normalize_params(params)
    if model_overrides:
        model_config = model_config.replace(**model_overrides)
    if data is None:
        if tc is None:
            raise ValueError("data is required when evaluating (model_config, params)")
        data = tc.data
    if split not in ("val", "train"):
        raise ValueError(f"split={split!r} is not allowed; choose one of ['val', 'train']")
    if tokenizer is None and tc is not None and isinstance(data, (str, os.PathLike)) \
            and os.fspath(data) != tc.data:  # (an array of token ids needs no tokenizer)
        # other text: encode it with the run's own vocabulary (its saved tokenizer), never a new
        # BPE trained on that text (whose ids would not be the model's)
        from .init_from import source_config
        tokenizer = source_config(run)[1]
    tokenizer = tokenizer or (tc.tokenizer if tc is not None else "byte")
    source = open_data(data, tokenizer)
    what = repr(data) if isinstance(data, (str, os.PathLike)) else \
        f"<{type(data).__name__} of shape {getattr(data, 'shape', '?')}>"  # (not a whole array's repr)
    vocab = getattr(source, "vocab_size", None)
    if vocab is not None and vocab > model_config.vocab_size:
        how = f"tokenized with tokenizer={tokenizer!r}" if isinstance(data, (str, os.PathLike)) else "of ids"
        raise ValueError(f"data={what} {how} has vocab_size="
                         f"{vocab}, larger than the model's vocab_size={model_config.vocab_size} (ids past it "
                         "have no embedding: NaN losses); pass the model's tokenizer")
    if batch_size is None:
        batch_size = tc.micro_batch_size if tc is not None else 8
    if seq_len is None:
        seq_len = tc.seq_len if tc is not None else model_config.max_seq_len
    if stride is not None and stride > seq_len:
        raise ValueError(f"stride must be an int with 1 <= stride <= seq_len = {seq_len}, got {stride}")
    if stride is not None and stride < seq_len and not hasattr(source, "split_tokens"):
        raise ValueError(f"stride={stride} needs text data (a token stream); data={what} has fixed rows "
                         f"({getattr(source, 'kind', type(source).__name__)}): evaluate it without stride")
    trained_len = tc.seq_len if tc is not None else model_config.max_seq_len
    if seq_len > trained_len:
        log.warning("seq_len=%d is longer than the %s (%d): the loss measures length extrapolation",
                    seq_len, "sequences the run was trained on" if tc is not None else "model's max_seq_len",
                    trained_len)
    unit_rows = None
    if max_batches == -1:  # the run's eval_batches; the whole split for a run trained without evaluation
        if tc is not None and tc.eval_batches:  # exactly the windows the run evaluated, in any batch size
            max_batches, unit_rows = tc.eval_micro_batches, tc.micro_batch_size
        else:
            max_batches = None
    elif max_batches is not None and (stride is None or stride == seq_len):
        # max_batches batches of batch_size rows, not of the rows a mesh rounds a batch up to (8 on
        # data=8 for batch_size=3): the windows scored were the mesh's
        unit_rows = batch_size
    if not source.has_eval_data(seq_len, split):
        groups = getattr(source, "eval_groups", None)
        if groups is not None:  # e.g. domains: windows never cross groups, name each one's size
            sizes = ", ".join(f"{name}: {len(g.split_tokens(split))}" for name, g in groups().items())
            raise ValueError(f"no {split} group has seq_len + 1 = {seq_len + 1} tokens (tokens per group: "
                             f"{sizes})")
        n = len(source.split_tokens(split))
        raise ValueError(f"the {split} split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    if loss_fn is None:
        loss_name = tc.loss if tc is not None else "cross_entropy"
        loss_fn = get_loss(loss_name)
    else:  # named as the trainer records a loss function of your own (ValueError unless callable)
        loss_fn, loss_name = _resolve_loss(tc, loss_fn)
    if dtype is None:
        dtype = tc.dtype if tc is not None else "float32"
    program = eval_program(model_config, mesh_obj, resolve_dtype(dtype), loss_fn, cache)
    try:
        program.check_params(params, "they")
    except ValueError as e:
        raise ValueError("the parameters do not fit the model config"
                         + (f" with model_overrides={model_overrides}" if model_overrides else "")
                         + f": {e}") from None
    params = jax.device_put(params, program.param_shardings)
    stride = seq_len if stride is None else int(stride)
    if stride < seq_len:  # the overlapping context is masked through loss_mask: the loss must honour it
        check_loss_mask(program, params, source.split_tokens(split), batch_size, seq_len, stride,
                        model_config.vocab_size, loss_name)
    result = eval_loss(program, params, source, batch_size, seq_len, max_batches, split, unit_rows=unit_rows,
                       stride=stride, loss_name=loss_name)
    return {**result, "stride": stride}
