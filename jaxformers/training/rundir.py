"""The run directory: its files, the resume / clobber policy, and loading a trained run.

Layout (``train_config.out_dir``)::

    config.json        {"model": ModelConfig dict, "train": TrainConfig dict, "compute_dtype", "dataset"
                        (the source's description + corpus_sha256 / n_tokens of a prepared dataset),
                        "n_params", "mesh"[, "loss_fn": "module.qualname" of a Python loss function],
                        "step_fn": the class name of train's step_fn (null: train_step; checked on resume)}
    metrics.jsonl      {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens"[, "aux/<name>",
                        "total_loss", other loss metrics]} every log_every steps,
                       {"step", "val_loss", "val_ppl"} at every evaluation
    summary.json       final losses, perplexity, n_params, throughput, MFU (GPU/TPU), ``versions``
                       (python, jax, flax, orbax-checkpoint, ... that trained it; every checkpoint's
                       manifest records the versions that wrote it); a call that trains nothing (a
                       finished run resumed again) keeps the earlier ones (:data:`MEASURED_FIELDS`)
    run.yaml           model name + full model config + train config: ``experiments.train
                       --config run.yaml`` reproduces the run (see :func:`write_run_file`)
                       (the train config's ``imports``, also in config.json: the modules of your
                       own the run needs, imported again wherever it is loaded:
                       :func:`import_run_modules`)
    events.out.tfevents.*  TensorBoard scalars (``train/<metric>``, ``val/loss``, ``val/ppl``);
                       ``tensorboard --logdir runs``
    loss.png           train / val loss curves and the learning rate
    tokenizer/         the dataset's tokenizer (for generation; absent for synthetic data)
    checkpoints/<step> see :mod:`jaxformers.training.checkpoint`
    .lock              held (``flock``) by the process training into the directory

Policy: one training run at a time per directory (:func:`run_lock`; a second one raises
:class:`RunDirBusy`).  ``resume=False`` refuses (``FileExistsError``) to touch a run directory that
already holds checkpoints; one without checkpoints (e.g. from a run killed before its
first save) is reused and its metrics are reset.  ``resume=True`` requires the model
config to equal the saved one (after normalising the saved dict through
:func:`jaxformers.registry.config_from_dict`, so configs saved by older versions compare
equal), reports train-config changes and a changed dataset (:func:`dataset_changes`: e.g. the
same corpus path with other content), and drops ``metrics.jsonl`` rows after the restored step
(a restored step whose checkpoint says its evaluation was due and whose evaluation row is missing
is evaluated again); it writes its (possibly changed) config to ``config.json`` / ``run.yaml`` only
just before the first checkpoint it saves, so a resume that trains nothing (a finished run, or
``steps`` equal to the checkpointed step) or is stopped before its first save leaves them
describing the run's checkpoints.  Every checkpoint also holds the config it was trained with
(``checkpoints/<step>/jaxformers_config.json``, listed in its manifest), and a resume checks
against the newest complete checkpoint's (:func:`resume_config`): a resume killed between writing
``config.json`` and completing its first checkpoint leaves a ``config.json`` ahead of the
checkpoints, which is then not taken for theirs.  Only process 0 writes files, each atomically
(:func:`atomic_write`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, List, Optional, Tuple

import jax

from ..registry import build, config_from_dict
from ..utils import file_in_the_way, is_int, read_json_object
from . import mesh as mesh_lib
from .checkpoint import CONFIG as CHECKPOINT_CONFIG
from .checkpoint import Checkpointer, CheckpointError
from .checkpoint import atomic_write as _atomic_write
from .checkpoint import fsync_dir
from .checkpoint import library_versions
from .config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["CONFIG_FILE", "METRICS_FILE", "PLOT_FILE", "RUN_FILE", "SUMMARY_FILE", "TOKENIZER_DIR",
           "MEASURED_FIELDS", "MetricsWriter", "earlier_measurements",
           "IMPLEMENTATION_FIELDS", "atomic_write", "check_resume", "config_diff", "config_text", "copy_tokenizer", "dataset_changes", "load_run",
           "import_modules", "import_run_modules", "read_config", "resume_config",
           "read_metrics", "refuse_clobber", "reset_metrics", "truncate_metrics", "write_config",
           "write_run_file", "write_summary"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"
TOKENIZER_DIR = "tokenizer"
RUN_FILE = "run.yaml"
LOCK_FILE = ".lock"  # held by the training process (run_lock)


# ============================================================================ files
def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file + fsync + rename + fsync of the folder
    (never a torn file, also after a power loss: the data reaches the disk before the rename
    publishes it, and the rename is on disk when this returns): :func:`.checkpoint.atomic_write`."""
    _atomic_write(Path(path), text)


def read_metrics(run_dir) -> list:
    """Rows of ``metrics.jsonl`` (a torn last line from a crash is ignored, as is any line that
    is not a JSON object: not UTF-8, unparsable, or e.g. a hand-edited ``[1, 2]``)."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    if not path.exists():
        return rows
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode().strip()
        except UnicodeDecodeError:
            continue
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def metrics_step(row: dict):
    """A metrics row's ``step`` when it is a number (not a bool), else ``None`` (no step, or a
    hand-edited one)."""
    step = row.get("step")
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def truncate_metrics(run_dir, last_step: int) -> None:
    """Drop the rows after ``last_step`` (they belong to steps that will be replayed), and, like
    the lines :func:`read_metrics` ignores, rows whose ``step`` is not a number (hand-edited)."""
    def kept(row):  # a row without a step stays
        step = metrics_step(row)
        return "step" not in row or (step is not None and step <= last_step)
    rows = [r for r in read_metrics(run_dir) if kept(r)]
    atomic_write(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def reset_metrics(run_dir, restored_step: Optional[int]) -> None:
    """Start ``metrics.jsonl`` afresh, or keep its rows up to ``restored_step`` on resume."""
    if restored_step is None:
        atomic_write(Path(run_dir) / METRICS_FILE, "")
    else:
        truncate_metrics(run_dir, restored_step)


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` (flushed per row) and, with ``tensorboard``, writes
    their numbers as TensorBoard scalars (``tensorboardX``) into the run directory: training
    rows as ``train/<key>``, evaluation rows as ``val/loss`` / ``val/ppl``.  ``purge_step``
    (on resume: the restored step) makes TensorBoard drop events from that step on;
    ``replay``: rows already in ``metrics.jsonl`` written again to the event files only (on
    resume: the restored step's rows, which a kill may have left in the event writer's buffer).
    Event files are buffered (:meth:`flush` before a checkpoint: a kill after it loses no event
    of a step the resume keeps, nor a power loss a row of ``metrics.jsonl``).  A no-op where ``enabled`` is False (processes other than 0)."""

    def __init__(self, run_dir, enabled: bool = True, tensorboard: bool = False,
                 purge_step: Optional[int] = None, replay=()):
        self._file = open(Path(run_dir) / METRICS_FILE, "a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # a declared dependency; a run must not fail for want of it
                log.warning("tensorboardX is not installed (pip install tensorboardX): no TensorBoard "
                            "event files, metrics.jsonl only")
            else:
                self._tb = SummaryWriter(logdir=str(run_dir), purge_step=purge_step, flush_secs=10)
                for row in replay:
                    self._write_events(row)

    def write(self, row: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        self._write_events(row)

    def flush(self) -> None:
        """Write the buffered TensorBoard events to their file and ``fsync`` ``metrics.jsonl``
        (flushed per row): called before a checkpoint, so a power loss after that checkpoint
        keeps the rows of the steps it holds."""
        if self._file is not None:
            os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def _write_events(self, row: dict) -> None:
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self._tb.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def import_modules(names, *, where: str) -> None:
    """Import each module of ``names`` (a module imported before is not run again, so what it
    registers is not registered twice); ``ValueError`` naming the module, ``where`` it was named
    and the cause when one fails, and saying how to make it importable."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported with the module's name and the cause
            raise ValueError(f"{where} names module {name!r}, which cannot be imported here "
                             f"({type(e).__name__}: {e}); it registers the run's architecture or loss: put "
                             f"the folder that holds it on PYTHONPATH (PYTHONPATH=FOLDER python ...) or work "
                             "from that folder") from e


def import_run_modules(saved: Optional[dict], run_dir, file: str = CONFIG_FILE) -> Tuple[str, ...]:
    """Import the modules a run recorded (``train.imports`` of its saved config ``saved``:
    ``experiments.train --import``, :attr:`TrainConfig.imports`) -- done before its model name is
    looked up wherever a run is loaded (:func:`load_run`, :func:`check_resume`, ``init_from``);
    returns their names.  A config saved before the field existed records none.  ``ValueError``
    naming the module and the run when one cannot be imported (:func:`import_modules`)."""
    from .config import module_names

    train = (saved or {}).get("train")
    if not isinstance(train, dict) or not train.get("imports"):
        return ()
    try:
        names = module_names(train["imports"], name="train.imports")
    except ValueError as e:
        raise ValueError(f"{Path(run_dir) / file}: {e}") from None
    import_modules(names, where=f"the run {run_dir} (its {file}: train.imports)")
    return names


def read_config(run_dir) -> Optional[dict]:
    """The saved ``config.json`` (``None`` if there is none); ``ValueError`` naming the file when
    it is not a JSON object (hand-edited, or truncated by a crash of the file system)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return _read_json_object(path)


def _read_json_object(path: Path) -> dict:
    """A run file holding one JSON object (:func:`~jaxformers.utils.read_json_object`: hand-edited,
    or truncated by a crash of the file system: a ``ValueError`` naming ``path``)."""
    return read_json_object(path, "repair it, or move the run directory aside")


def config_text(*, model_config, train_config: TrainConfig, compute_dtype: str, dataset: dict,
                n_params: int, mesh: str, loss_fn: Optional[str] = None, step_fn: Optional[str] = "") -> str:
    """The text of ``config.json`` (see :func:`write_config`); the trainer saves it with every
    checkpoint too (:data:`CHECKPOINT_CONFIG`, read back by :func:`resume_config`)."""
    payload = {"model": model_config.to_dict(), "train": train_config.to_dict(),
               "compute_dtype": compute_dtype, "dataset": dataset, "n_params": n_params, "mesh": mesh}
    if loss_fn is not None:
        payload["loss_fn"] = loss_fn
    if step_fn != "":
        payload["step_fn"] = step_fn
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def write_config(run_dir, *, model_config, train_config: TrainConfig, compute_dtype: str, dataset: dict,
                 n_params: int, mesh: str, loss_fn: Optional[str] = None, step_fn: Optional[str] = "") -> None:
    """``config.json``; ``step_fn``: the class name of ``train``'s ``step_fn`` (None: ``train_step``;
    "" leaves it out, as configs written before it was recorded)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / CONFIG_FILE, config_text(
        model_config=model_config, train_config=train_config, compute_dtype=compute_dtype, dataset=dataset,
        n_params=n_params, mesh=mesh, loss_fn=loss_fn, step_fn=step_fn))


def restore_checkpoint_config(run_dir, ckpt, step: int) -> bool:
    """Put back ``config.json`` / ``run.yaml`` from the config saved with checkpoint ``step``
    (:data:`CHECKPOINT_CONFIG`) when ``config.json`` holds another text: a resume killed after
    writing them and before its first checkpoint was complete left them ahead (e.g. an
    ``--extend-steps`` total that never took), and the next resume may train nothing (a no-op
    resume would leave them ahead for good, so ``load_run`` reported the never-trained
    ``steps``).  ``True`` if restored; nothing happens for a checkpoint without its config."""
    text = ckpt.read_file(step, CHECKPOINT_CONFIG)
    path = Path(run_dir) / CONFIG_FILE
    if text is None or (path.is_file() and path.read_text() == text):
        return False
    data = json.loads(text)
    atomic_write(path, text)
    write_run_file(run_dir, config_from_dict(data["model"]), TrainConfig.from_dict(data["train"]))
    return True


def resume_config(run_dir) -> Optional[dict]:
    """The config a resume continues from: the one saved with the newest complete checkpoint
    (:data:`CHECKPOINT_CONFIG`, the config that checkpoint was trained with), else ``config.json``
    (:func:`read_config`; checkpoints written before configs were saved with them).  They differ
    when a resume with a changed config (e.g. ``--extend-steps``) wrote ``config.json`` and was
    killed before its first checkpoint was complete."""
    return _resume_config(run_dir)[0]


def resume_config_file(run_dir) -> Optional[Path]:
    """The file :func:`resume_config` reads (``None`` without one): to name it in messages."""
    return _resume_config(run_dir)[1]


def _resume_config(run_dir) -> Tuple[Optional[dict], Optional[Path]]:
    """``(resume_config(run_dir), the file it was read from)``."""
    ckpt = Checkpointer(run_dir)
    text = step = None
    error = None
    for step in sorted(ckpt.complete_steps(), reverse=True):
        try:
            text = ckpt.read_file(step, CHECKPOINT_CONFIG)
            break  # None: a checkpoint written before configs were saved with them
        except OSError:  # deleted meanwhile (a live run pruning old checkpoints): the next newest
            continue
        except UnicodeDecodeError as e:  # not UTF-8: named below, like unparsable JSON
            text, error = "", e
            break
    if text is None:
        saved = read_config(run_dir)
        return saved, (None if saved is None else Path(run_dir) / CONFIG_FILE)
    path = ckpt.step_dir(step) / CHECKPOINT_CONFIG
    try:
        if error is not None:
            raise error
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path} is unreadable ({e}): move the checkpoint directory {ckpt.step_dir(step)} "
                         "aside to fall back to an older checkpoint") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data, Path(str(path))


def write_run_file(run_dir, model_config, train_config: TrainConfig) -> Path:
    """``run.yaml``: ``model``, ``overrides`` (every model-config field) and ``train`` (every
    train-config field) -- the ``--config`` file format of ``experiments.train``, so passing it
    back reproduces the run (give a new ``--out``)."""
    import yaml

    model = model_config.to_dict()
    name = model.pop("model")
    payload = {"model": name, "overrides": _json(model), "train": _json(_absolute_paths(train_config.to_dict()))}
    text = ("# written by jaxformers: python -m experiments.train --config THIS_FILE --out NEW_DIR "
            "reproduces the run\n" + yaml.safe_dump(payload, sort_keys=False))
    path = Path(run_dir) / RUN_FILE
    atomic_write(path, text)
    return path


def _absolute_paths(train: dict) -> dict:
    """``train`` with its local file-system paths made absolute (``data``:
    :func:`~jaxformers.data.sources.absolute_data_spec`; an ``hf:DIR`` tokenizer's folder,
    ``out_dir``, an existing ``init_from``), so ``run.yaml`` means the same files from any
    working directory."""
    from ..data.sources import absolute_data_spec

    train = dict(train)
    if isinstance(train.get("data"), str):
        train["data"] = absolute_data_spec(train["data"])
    tok = train.get("tokenizer")
    if isinstance(tok, str) and tok.strip().startswith("hf:"):
        d = Path(tok.strip()[3:]).expanduser()
        if d.is_dir():
            train["tokenizer"] = f"hf:{d.resolve()}"
    if isinstance(train.get("out_dir"), str):
        train["out_dir"] = str(Path(train["out_dir"]).expanduser().absolute())
    init = train.get("init_from")
    if isinstance(init, str) and Path(init).expanduser().exists():
        train["init_from"] = str(Path(init).expanduser().resolve())
    return train


def write_summary(run_dir, summary: dict) -> None:
    """``summary.json``: ``summary`` plus ``versions`` (python, jax, flax, orbax, ... that trained the
    run: :func:`.checkpoint.library_versions`; each checkpoint's manifest records its own)."""
    summary = {**summary, "versions": summary.get("versions") or library_versions()}
    atomic_write(Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


#: The ``summary.json`` fields that describe how a run's training went (throughput, timing, the
#: machine and the library versions that trained it): kept from the earlier summary by a call
#: that trains nothing (:func:`earlier_measurements`).
MEASURED_FIELDS = ("tokens_per_s", "mfu", "compile_s", "wall_s", "compute_dtype", "mesh", "n_devices",
                   "device_kind", "backend", "versions")


def earlier_measurements(run_dir, final_step: int) -> dict:
    """The :data:`MEASURED_FIELDS` of the run's ``summary.json`` when it describes ``final_step``
    (else ``{}``: none, unreadable, or of another step) -- for a resume that trains nothing (a
    finished run resumed again, e.g. by a job script that always passes ``--resume``), whose own
    numbers (no throughput, a wall time of a fraction of a second, the machine that merely
    reopened the run) would otherwise replace those of the training that reached that step."""
    try:
        old = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("final_step") != final_step:
        return {}
    return {k: old[k] for k in MEASURED_FIELDS if k in old}


def _recover_tokenizer_leftovers(run_dir) -> None:
    """Clean up after a :func:`copy_tokenizer` killed between its renames: stale
    ``.tokenizer.tmp-*`` folders (a staged copy, perhaps incomplete) are removed; when
    ``tokenizer/`` is missing and exactly one ``.tokenizer.old-*/tokenizer`` exists, that is the
    previous tokenizer (moved aside, the new one not yet in place): it is put back as
    ``tokenizer/``; then the ``.tokenizer.old-*`` folders are removed.  Several candidates with
    ``tokenizer/`` missing: nothing is guessed, they are kept and named in a warning.  Best effort
    (process 0 only, under the run lock, like :func:`copy_tokenizer`)."""
    import shutil
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    dest = run_dir / TOKENIZER_DIR
    try:
        for d in run_dir.glob(f".{TOKENIZER_DIR}.tmp-*"):
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
        olds = [d for d in run_dir.glob(f".{TOKENIZER_DIR}.old-*") if d.is_dir() and not d.is_symlink()]
        if not olds:
            return
        if not (dest.exists() or dest.is_symlink()):
            kept = [d for d in olds if (d / TOKENIZER_DIR).exists()]
            if len(kept) > 1:
                log.warning("%s has no %s/ and several previous tokenizers %s: none restored, they are kept",
                            run_dir, TOKENIZER_DIR, sorted(str(d) for d in kept))
                return
            if kept:
                os.rename(kept[0] / TOKENIZER_DIR, dest)
                fsync_dir(run_dir)
                log.info("restored the previous tokenizer of %s from %s", run_dir, kept[0])
        for d in olds:
            shutil.rmtree(d, ignore_errors=True)
    except OSError as e:
        log.warning("could not clean up the tokenizer leftovers of %s: %s", run_dir, e)


def copy_tokenizer(run_dir, ds_dir, tokenizer=None) -> None:
    """Save the data's tokenizer into ``run_dir/tokenizer`` (for generation); best effort.
    ``tokenizer``: the source's tokenizer object when it has one (a multi-domain source has no
    dataset dir), else the one of the prepared dataset ``ds_dir`` (``None``: nothing to save).
    First cleans up what an earlier call killed between its renames left behind
    (:func:`_recover_tokenizer_leftovers`: a tokenizer that was only in a ``.tokenizer.old-*``
    folder is put back, then replaced as usual)."""
    _recover_tokenizer_leftovers(run_dir)
    if ds_dir is None and tokenizer is None:
        return
    import shutil
    import tempfile
    dest = Path(run_dir) / TOKENIZER_DIR
    tmp = old = None
    try:
        from ..data import load_tokenizer
        tok = load_tokenizer(ds_dir) if tokenizer is None else tokenizer
        # staged in a sibling folder and renamed into place: an interruption never leaves a
        # half-written tokenizer/ that a later resume or generation would load
        tmp = Path(tempfile.mkdtemp(prefix=f".{TOKENIZER_DIR}.tmp-", dir=Path(run_dir)))
        os.chmod(tmp, 0o755)
        tok.save(tmp)
        if dest.exists() or dest.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{TOKENIZER_DIR}.old-", dir=Path(run_dir)))
            os.rename(dest, old / TOKENIZER_DIR)
        os.rename(tmp, dest)
        tmp = None
        fsync_dir(run_dir)
    except Exception as e:  # noqa: BLE001 - generation is optional
        if old is not None and (old / TOKENIZER_DIR).exists() and not dest.exists():
            try:  # the new one could not be put in place: keep the previous one
                os.rename(old / TOKENIZER_DIR, dest)
            except OSError as e2:
                log.warning("the previous tokenizer of %s is kept in %s (%s)", run_dir, old, e2)
                old = None  # never deleted: it is the only copy
        log.warning("could not copy the tokenizer into %s: %s", run_dir, e)
    finally:
        if old is not None and (old / TOKENIZER_DIR).exists() and not (dest.exists() or dest.is_symlink()):
            old = None  # interrupted (KeyboardInterrupt, SystemExit) between the renames: the only
            #             copy, kept for _recover_tokenizer_leftovers to put back
        for d in (tmp, old):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)


# ============================================================================ policy
def config_diff(old: dict, new: dict, ignore=()) -> List[str]:
    """``["field: old -> new", ...]`` for the fields that differ."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in keys if k not in ignore and old.get(k) != new.get(k)]


def check_step_settings(out_dir, filename: str, settings: dict, changes, what: str) -> None:
    """For a step function whose settings shape what a run learns (DoGE, distillation): a run
    directory holding checkpoints (a resume) must have been trained with the same settings --
    ``changes(saved)`` lists how ``filename``'s saved ones differ (``["field: old -> new"]``), a
    ``ValueError`` names them (one names ``filename`` when it is unreadable or not a JSON object);
    a new run records ``settings`` (JSON) in ``filename``."""
    run_dir = Path(out_dir).expanduser()
    path = run_dir / filename
    if path.is_file() and Checkpointer(run_dir).complete_steps():
        changed = changes(_read_json_object(path))
        if changed:
            raise ValueError(f"cannot resume {run_dir} with another {what} ({'; '.join(changed)}): its checkpoints "
                             f"were trained with the settings in its {filename}; resume with the same {what}, or "
                             "train into a new out_dir")
        return
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(settings, indent=1) + "\n")


class RunDirBusy(RuntimeError):
    """Another process is training into the run directory."""


@contextlib.contextmanager
def run_lock(run_dir, enabled: bool = True):
    """Hold an exclusive lock on ``run_dir/.lock`` (``fcntl.flock``, released when the block
    ends or the process dies) while training: a second run started into the same directory
    would otherwise rewrite config.json / metrics.jsonl under the first and clash with its
    checkpoints.  ``RunDirBusy`` names the holder's pid.  A no-op where ``fcntl`` is missing
    (Windows) or ``enabled`` is False (processes other than the first of a multi-host run)."""
    fd = lock_dir(run_dir, LOCK_FILE, "another training process") if enabled else None
    if fd is None:
        yield
        return
    import fcntl
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def lock_dir(run_dir, lock_file: str, holder_kind: str) -> Optional[int]:
    """Take an exclusive ``fcntl.flock`` on ``run_dir/lock_file`` (the folder created) and
    return its file descriptor, the holder's pid written in it (the lock goes with the process
    or when the fd is closed); ``RunDirBusy`` naming the ``holder_kind`` and its pid when another
    one holds it; ``None`` where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file in the way (was an OSError traceback)
        blocker = file_in_the_way(run_dir) or run_dir
        raise ValueError(f"the output directory {run_dir} cannot be created: {blocker} is a file, not a "
                         "folder; choose another output directory (out_dir, --out)") from None
    fd = os.open(run_dir / lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirBusy(f"{run_dir} is in use by {holder_kind} (pid {holder}): wait "
                         "for it to finish, or choose a new output directory (--out)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def refuse_clobber(run_dir, ckpt: Checkpointer, resume: bool) -> None:
    """``FileExistsError`` unless ``resume`` when ``run_dir`` already holds checkpoints."""
    if not resume and ckpt.step_dirs():
        raise FileExistsError(
            f"{run_dir} already holds checkpoints (steps {ckpt.step_dirs()}); pass resume=True "
            "(--resume) to continue that run, or choose a new output directory (--out)")


def _json(d: dict) -> dict:
    return json.loads(json.dumps(d, sort_keys=True))  # tuples vs lists etc. compare as saved


def _normalised_model(saved_model: dict) -> dict:
    """A saved model-config dict as the current code would write it (fields that moved or were
    added since it was saved: dropped / defaulted by ``config_from_dict``)."""
    return config_from_dict(saved_model).to_dict()


#: Model-config fields that choose how the same parameters are computed (rematerialisation, the
#: attention / scan / sparse-attention / landmark kernel), not what: a resume may change them
#: (e.g. ``--set remat=full`` after running out of memory); :func:`implementation_changes` names them.
IMPLEMENTATION_FIELDS = ("remat", "attention_impl", "scan_impl", "sparse_impl", "landmark_impl")


def _in_run(path: Path, run_dir) -> str:
    """``path`` relative to ``run_dir`` when inside it (``checkpoints/10/config.json``)."""
    run = Path(os.path.abspath(os.path.expanduser(str(run_dir))))
    path = Path(os.path.abspath(path))
    return str(path.relative_to(run)) if path.is_relative_to(run) else str(path)


def check_resume(run_dir, model_config) -> Optional[dict]:
    """The saved config of ``run_dir`` (:func:`resume_config`: its newest complete checkpoint's,
    else ``config.json``; ``None`` without one); ``ValueError`` if its model config differs from
    ``model_config`` in anything but :data:`IMPLEMENTATION_FIELDS`."""
    saved, path = _resume_config(run_dir)
    if saved is None:
        return None
    bad = [k for k in ("model", "train") if k in saved and not isinstance(saved[k], dict)]
    if bad:
        raise ValueError(f"cannot resume {run_dir}: its saved config is not a run config: its "
                         f"{' / '.join(bad)} section is not a JSON object")
    # its architecture / loss of your own; the file named as it lies in the run directory
    import_run_modules(saved, run_dir, _in_run(path, run_dir))
    try:
        old = _normalised_model(saved.get("model", {}))
    except ValueError as e:
        raise ValueError(f"cannot resume {run_dir}: its saved model config is not valid here: {e}") from None
    diff = config_diff(_json(old), _json(model_config.to_dict()), ignore=IMPLEMENTATION_FIELDS)
    if diff:
        raise ValueError(f"cannot resume {run_dir}: the model config differs from the saved one: "
                         + "; ".join(diff) + f" (only {', '.join(IMPLEMENTATION_FIELDS)} may change on a resume)")
    return saved


def implementation_changes(saved: Optional[dict], model_config) -> List[str]:
    """``["remat: none -> full", ...]``: the :data:`IMPLEMENTATION_FIELDS` a resume changes."""
    if not saved or "model" not in saved:
        return []
    old = _json(_normalised_model(saved["model"]))
    new = _json(model_config.to_dict())
    return config_diff({k: old[k] for k in IMPLEMENTATION_FIELDS if k in old},
                       {k: new[k] for k in IMPLEMENTATION_FIELDS if k in new})


def train_config_changes(saved: Optional[dict], train_config: TrainConfig) -> List[str]:
    """Differences between the saved train config (normalised: new fields at their defaults)
    and ``train_config``, ignoring ``out_dir``; local paths compare as absolute paths (a
    ``run.yaml`` records ``--data corpus_dir`` as its absolute path: not a change)."""
    if not saved or "train" not in saved:
        return []
    try:
        old = TrainConfig.from_dict(saved["train"]).to_dict()
    except ValueError:
        old = dict(saved["train"])
    return config_diff(_json(_absolute_paths(old)), _json(_absolute_paths(train_config.to_dict())),
                       ignore=("out_dir",))


def dataset_changes(saved: Optional[dict], dataset: dict) -> List[str]:
    """Differences between the saved ``dataset`` record and ``dataset`` (the fields both have,
    except ``dir``, the cache location): a changed corpus behind the same data spec."""
    old = (saved or {}).get("dataset")
    if not isinstance(old, dict):
        return []
    from ..data.sources import absolute_data_spec

    common = (set(old) & set(dataset)) - {"dir"}

    def absolute(record):  # a source spec as run.yaml records it (local paths absolute)
        record = {k: record[k] for k in common}
        if isinstance(record.get("source"), str):
            record["source"] = absolute_data_spec(record["source"])
        return _json(record)
    return config_diff(absolute(old), absolute(dataset))


# ============================================================================ load
#: How many checkpoints :func:`load_run` tries when the one it loads is deleted meanwhile.
LOAD_ATTEMPTS = 3


def run_configs(run_dir) -> Tuple[Any, TrainConfig]:
    """``(model_config, train_config)`` of a run directory's ``config.json``, the modules the run
    recorded imported first (:func:`import_run_modules`); ``FileNotFoundError`` without one,
    ``ValueError`` for a file that is not a run config."""
    run_dir = Path(run_dir).expanduser()
    saved = read_config(run_dir)
    if saved is None:
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    missing = [k for k in ("model", "train") if not isinstance(saved.get(k), dict)]
    if missing:
        raise ValueError(f"{run_dir / CONFIG_FILE} is not a run config: no {' / '.join(missing)} section")
    import_run_modules(saved, run_dir)  # a run of your own architecture: the module that registers it
    return config_from_dict(saved["model"]), TrainConfig.from_dict(saved["train"])


def load_run(run_dir, *, step: Optional[int] = None, mesh=None) -> Tuple[Any, TrainConfig, Any]:
    """``(model_config, train_config, params)`` of a run (newest complete checkpoint, or ``step``).

    A run that is still training deletes its old checkpoints: when the checkpoint being loaded
    is deleted meanwhile, the newest complete one is tried next (``LOAD_ATTEMPTS`` in all), then
    :class:`CheckpointError` says so.  Params are float32, on the first local device unless
    ``mesh`` is given (a ``jax.sharding.Mesh`` or a spec such as ``"data=2,fsdp=2"``; then sharded
    by the logical rules).  Raises ``FileNotFoundError`` / ``CheckpointError`` (``ValueError`` for
    a ``step`` that is not an int, e.g. ``5.0``).
    Run directories written by older versions load too (new config fields take their
    defaults).  The modules the run recorded (``train.imports``: your own architecture or loss,
    ``experiments.train --import``) are imported first (:func:`import_run_modules`: a
    ``ValueError`` naming the module and the run when one cannot be imported).
    """
    from .steps import abstract_params, compute_config

    if step is not None:
        if not is_int(step):
            raise ValueError(f"step must be an int (a checkpoint's step) or None (the newest), got {step!r}")
        step = int(step)
    if isinstance(mesh, str):  # a spec, as evaluate(mesh=) and TrainConfig.mesh take it
        mesh = mesh_lib.make_mesh(mesh)
    elif mesh is not None and not isinstance(mesh, jax.sharding.Mesh):  # was an AttributeError deep inside
        raise ValueError(f"mesh must be None (the first local device), a jax.sharding.Mesh or a mesh spec "
                         f"such as 'data=2,fsdp=2', got {mesh!r}")
    run_dir = Path(run_dir).expanduser()
    model_config, train_config = run_configs(run_dir)
    ckpt = Checkpointer(run_dir, keep=train_config.keep_checkpoints)
    explicit = step is not None
    if explicit and not ckpt.is_complete(step):  # name the ones there are
        steps = ckpt.complete_steps()
        ckpt.close()
        raise CheckpointError(f"{run_dir} has no complete checkpoint at step {step}; complete ones: "
                              f"{steps if steps else 'none'}")
    if step is None:
        step = ckpt.latest_step()
        if step is None:
            ckpt.close()
            raise CheckpointError(f"{run_dir} has no complete checkpoint under {ckpt.directory}")
    abstract, specs = abstract_params(build(compute_config(model_config, "float32")))
    if mesh is None:
        # make_single_device_sharding (jax >= 0.10): the class SingleDeviceSharding is deprecated
        # as a public name from jax 0.12.1
        sharding = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: sharding, abstract)
    else:
        shardings = mesh_lib.fit_shardings(mesh_lib.logical_to_sharding(specs, mesh), abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    deleted = []
    try:
        for _ in range(LOAD_ATTEMPTS):
            try:
                params, _, _ = ckpt.restore(step, target)
                return model_config, train_config, params
            except CheckpointError:
                if explicit or ckpt.is_complete(step):  # corrupt / another config: a real error
                    raise
                deleted.append(step)
                log.warning("checkpoint %s was deleted while loading it (the run is still training): "
                            "trying the newest complete one", ckpt.step_dir(step))
            newer = [s for s in ckpt.complete_steps() if s not in deleted]
            if not newer:
                break
            step = newer[-1]
    finally:
        ckpt.close()
    raise CheckpointError(
        f"could not load {run_dir}: checkpoint(s) {deleted} were deleted while being loaded (the run is "
        f"still training and keeps only its newest checkpoints); try again, or load a finished run")
