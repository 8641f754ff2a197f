"""Helpers shared by the experiment and benchmark entry points."""
import argparse
import os
import statistics
import sys
import time


def enable_compile_cache():
    """Persistent XLA compilation cache in ``<jaxformers cache>/xla`` (unless the user set one)."""
    import jax
    from jaxformers.data import cache_dir

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = cache_dir() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def experiment_parser(name: str, doc: str, presets, *, default_preset="tiny", preset_help=None,
                      steps_help="override the preset's training steps", data=True,
                      data_default="default",
                      data_help="corpus (byte tokens) / prepared dataset (its tokens) (default: built-in)"):
    """The ``argparse`` parser of ``python -m experiments.NAME`` with the options every paper
    experiment takes: ``--preset`` (one of ``presets``), ``--out``, ``--steps``, ``--seed``,
    ``--data`` (unless ``data=False``) and ``--no-compile-cache``; the experiment adds its own.
    ``doc``: the module docstring (first line: description; whole: epilog)."""
    ap = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=doc.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--preset", choices=sorted(presets), default=default_preset, help=preset_help)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--steps", type=int, help=steps_help)
    ap.add_argument("--seed", type=int, default=0)
    if data:
        ap.add_argument("--data", default=data_default, help=data_help)
    ap.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA cache")
    return ap


#: count / size options that must be >= 1 when given (only the options a parser has are checked)
POSITIVE = ("steps", "eval_batches", "seq_len", "d_model", "batch_size", "n_layer", "eval_samples", "digits",
            "iters", "decode_tokens", "eval_windows", "problems", "calib", "proxy_steps", "teacher_steps",
            "max_pairs", "tokens", "heads", "head_dim", "rows", "block", "gen_tokens")
#: options where 0 is meaningful ("skip", "no cap") but a negative value is not
NONNEGATIVE = ("align_steps", "max_bytes", "warmup", "gen_prompt")


def check_counts(ap, args, positive=POSITIVE, nonnegative=NONNEGATIVE) -> None:
    """A usage error (``ap.error``: exit 2) naming the option unless every option of ``args``
    listed in ``positive`` that was given is >= 1 and every one in ``nonnegative`` is >= 0
    (options ``args`` does not have, or left at ``None``, are skipped)."""
    for names, low in ((positive, 1), (nonnegative, 0)):
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not value >= low:
                ap.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def check_data(ap, data, *, specs=False) -> None:
    """A usage error naming ``--data`` unless ``data`` is ``None``, a prepared dataset directory,
    a built-in corpus, an existing file / folder or ``hf:NAME`` (``specs``: also a
    ``synthetic:TASK[:k=v,...]`` or ``domains:...`` spec) -- checked without loading anything."""
    from pathlib import Path

    if data is None or (Path(str(data)).expanduser() / "meta.json").is_file():
        return
    from jaxformers.data.corpus import resolve_corpus

    try:
        if specs and str(data).startswith("synthetic:"):
            from jaxformers.data.sources import parse_synthetic_spec
            parse_synthetic_spec(str(data))
        elif not (specs and str(data).startswith("domains:")):
            resolve_corpus(data)
    except ValueError as e:
        ap.error(f"--data: {e}")


_KIND = {int: "an integer", float: "a number"}


def parse_list(ap, flag: str, text, *, cast=str, allowed=None, lo=None, hi=None, unique=False, sep=",",
               none=False):
    """The ``sep``-separated list ``text`` given to option ``flag`` as a list of ``cast`` values
    (``None`` if ``text`` is ``None``: the option was not given).  A usage error (``ap.error``:
    exit 2, the message names ``flag`` and what is allowed) for an empty list or entry, an entry
    ``cast`` cannot parse (a float must be finite), a name not in ``allowed``, a number below
    ``lo`` / above ``hi``, or (``unique``) an entry given twice.  ``none=True``: the single
    word ``none`` means the empty list (the option's "skip")."""
    import math

    if text is None:
        return None
    choices = f"; choose from {list(allowed)}" if allowed is not None else ""
    if none:
        choices += " or 'none' (alone: skip)"
        if text.strip().lower() == "none":
            return []
    parts = [s.strip() for s in text.split(sep)]
    if none and "none" in (p.lower() for p in parts):
        ap.error(f"{flag}: 'none' (skip) stands alone, not in a list ({text!r})")
    if not any(parts):
        ap.error(f"{flag}: empty list {text!r} (expected a '{sep}'-separated list{choices})")
    if not all(parts):
        ap.error(f"{flag}: empty entry in {text!r} (expected a '{sep}'-separated list{choices})")
    values = []
    for part in parts:
        try:
            value = cast(part)
        except (TypeError, ValueError):
            ap.error(f"{flag}: {part!r} is not {_KIND.get(cast, cast.__name__)} (in {text!r})")
        if isinstance(value, float) and not math.isfinite(value):
            ap.error(f"{flag}: {part!r} is not a finite number (in {text!r})")
        values.append(value)
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            ap.error(f"{flag}: unknown {', '.join(map(repr, bad))}{choices}")
    if lo is not None or hi is not None:
        for v in values:
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                bound = (f"in [{lo}, {hi}]" if lo is not None and hi is not None else
                         f">= {lo}" if lo is not None else f"<= {hi}")
                ap.error(f"{flag}: {v!r} is out of range (each entry must be {bound})")
    if unique:
        seen = set()
        for v in values:
            if v in seen:
                ap.error(f"{flag}: {v!r} is given twice in {text!r}")
            seen.add(v)
    return values


def check_out(ap, out, flag: str = "--out") -> None:
    """A usage error naming ``flag`` when the output directory ``out`` cannot be a folder: it, or
    a folder above it, exists and is a file (it was a ``FileExistsError`` / ``NotADirectoryError``
    traceback from the first ``mkdir``, after the data was loaded or a benchmark had run), or it
    is empty (``Path("")`` is the current directory).  ``None`` (the option's default) passes."""
    from jaxformers.utils import file_in_the_way

    if out is None:
        return
    if not str(out).strip():  # Path("") is ".": the results would land in the current directory
        ap.error(f"{flag}: empty path (name an output directory)")
    blocker = file_in_the_way(str(out))
    if blocker is not None:
        ap.error(f"{flag} {str(out)!r}: {str(blocker)!r} is a file, not a folder (choose another output "
                 "directory)")


def check_heads(ap, model: dict) -> None:
    """A usage error naming ``--d-model`` unless the preset's ``model`` fields (after the overrides)
    have ``n_head`` dividing ``d_model``."""
    if model["d_model"] % model["n_head"]:
        ap.error(f"--d-model must be a multiple of the preset's {model['n_head']} heads, got {model['d_model']}")


def add_import_flag(ap) -> None:
    """``--import MODULE`` (repeatable) on a CLI: see :func:`import_modules`.  A run trained with
    ``experiments.train --import`` records its modules (``train.imports``), and loading it
    (``--run``, ``--resume``, ``--init-from``) imports them again: no ``--import`` needed then."""
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import a Python module first (repeatable), e.g. one that registers your own "
                         "architecture (jaxformers.registry.register) or loss (register_loss); a run "
                         "trained with --import records it and imports it again when loaded")


def import_modules(names, flag: str = "--import") -> None:
    """Import each ``--import`` module (its ``register`` / ``register_loss`` calls run; one imported
    before is not run again), with the current directory importable; ``ValueError`` naming
    ``flag``, the module and the cause when one fails."""
    import importlib
    import traceback

    if names and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported with the module's name and the cause
            where = traceback.extract_tb(e.__traceback__)[-1]
            raise ValueError(f"{flag} {name}: {type(e).__name__}: {e} "
                             f"({where.filename}:{where.lineno})") from e


def import_or_exit(ap, args) -> None:
    """:func:`import_modules` of ``args.imports`` (``--import``); a failed import is ``ap.error``
    (usage, exit 2) naming the module."""
    try:
        import_modules(args.imports)
    except ValueError as e:
        ap.error(str(e))


def usage_error(ap, message: str):
    """``ap.error(message)`` (usage, exit 2) -- for a check that needs a loaded model (``--run``);
    ``SystemExit(message)`` when called without a parser (``ap=None``)."""
    if ap is None:
        raise SystemExit(message)
    ap.error(message)


def run_kind(ap, run) -> str:
    """``"run"`` (a run directory trained here) or ``"hf"`` (a Hugging Face checkpoint directory)
    for ``--run``, told apart by its ``config.json`` (both have one); a usage error otherwise."""
    from pathlib import Path

    from jaxformers.training.init_from import source_kind

    if not Path(run).expanduser().is_dir():
        usage_error(ap, f"--run {str(run)!r}: no such directory")
    try:
        return source_kind(run, name="--run")
    except ValueError as e:
        usage_error(ap, str(e))


def is_hf_checkpoint(path) -> bool:
    """Whether ``path`` is a Hugging Face checkpoint directory (its ``config.json`` has a
    ``model_type``) rather than a run trained here; False for anything else (the caller's own
    loading then says what is wrong)."""
    from pathlib import Path

    from jaxformers.training.init_from import source_kind

    try:
        return Path(path).expanduser().is_dir() and source_kind(path) == "hf"
    except ValueError:
        return False


def run_tokenizer(ap, run, kind: str, tokenizer):
    """The tokenizer of ``--data`` for a ``--run`` of ``kind``: a run trained here uses its own
    (``None``: ``--tokenizer`` is refused), a HF checkpoint ``--tokenizer`` or else its
    ``tokenizer.json`` (``hf:RUN``; a usage error when it has none)."""
    from pathlib import Path

    if kind == "run":
        if tokenizer is not None:
            usage_error(ap, "--tokenizer is for a --run Hugging Face checkpoint; a run trained here "
                            "evaluates with its own tokenizer (drop --tokenizer)")
        return None
    if tokenizer is not None:
        return tokenizer
    if (Path(run).expanduser() / "tokenizer.json").is_file():
        return f"hf:{run}"
    usage_error(ap, f"--run {str(run)!r} has no tokenizer.json: pass --tokenizer (hf:DIR of the model's "
                    "tokenizer, or byte for a byte-level model)")


def check_run_args(ap, args) -> None:
    """The ``--run`` / ``--data`` / ``--tokenizer`` usage errors of an experiment that evaluates a
    run trained here or a HF checkpoint (``args.tokenizer`` becomes the tokenizer to use, None
    for a run trained here); without ``--run``, ``--tokenizer`` is refused (presets train on
    byte tokens)."""
    if args.run:
        kind = run_kind(ap, args.run)
        if kind == "hf" and not args.data:
            usage_error(ap, "--run with a HF checkpoint needs --data (text to evaluate on, tokenized with "
                            "its tokenizer)")
        args.tokenizer = run_tokenizer(ap, args.run, kind, args.tokenizer)
    elif args.tokenizer is not None:
        usage_error(ap, "--tokenizer is for a --run HF checkpoint; the preset's model trains on byte tokens")


def check_data_vocab(ap, data, tokenizer, vocab_size: int) -> None:
    """A usage error naming ``--data`` / ``--tokenizer`` when ``data`` tokenized with
    ``tokenizer`` has ids the model (``vocab_size``) has no embedding for (they give NaN
    logits under jit)."""
    from jaxformers.data import open_data

    n = int(open_data(data, tokenizer or "byte").vocab_size)
    if n > vocab_size:
        usage_error(ap, f"--data {str(data)!r} (tokenizer {tokenizer or 'byte'!r}) has a vocabulary of {n} > the "
                        f"model's vocab_size={vocab_size}: pass data tokenized with the model's tokenizer "
                        "(--tokenizer / a dataset prepared with it)")


def unrolled(config, params):
    """``(config, params)`` of a model trained with ``scan_layers=True`` as the same model with
    per-layer parameter trees (``blocks_0 ..``; unchanged when not scanned)."""
    if not getattr(config, "scan_layers", False):
        return config, params
    from jaxformers.convert.layers import unstack_layers
    return config.replace(scan_layers=False), unstack_layers(params, "blocks", n_layer=config.n_layer)


def parse_experiment_args(ap, argv=None, positive=POSITIVE, nonnegative=NONNEGATIVE, check=None,
                          data_specs=False):
    """``ap.parse_args(argv)``, then the checks, each a usage error (``ap.error``: exit 2)
    naming the option, all before anything is loaded or trained: every option named in
    ``positive`` that was given must be >= 1 and every one in ``nonnegative`` >= 0
    (:func:`check_counts`; only the options ``ap`` has), ``--out`` must not be (or lie below) a
    file (:func:`check_out`), ``--seed`` in ``[0, 2**32)``, ``--data`` must name a dataset
    (:func:`check_data`; ``data_specs``: synthetic / domains specs too), and ``check(ap, args)``
    runs the experiment's own checks (its lists: :func:`parse_list`).  Then the persistent
    compile cache unless ``--no-compile-cache``."""
    args = ap.parse_args(argv)
    check_counts(ap, args, positive, nonnegative)
    check_out(ap, getattr(args, "out", None))
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:  # TrainConfig's range (numpy refuses negatives)
        ap.error(f"--seed must be in [0, 2**32), got {seed}")
    check_data(ap, getattr(args, "data", None), specs=data_specs)
    if check is not None:
        check(ap, args)
    if not args.no_compile_cache:
        enable_compile_cache()
    return args


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a device / host allocation failure (XLA's ``RESOURCE_EXHAUSTED``, an
    "out of memory" message, the word "OOM")."""
    import re

    text = f"{type(e).__name__} {e}".lower()
    return (any(s in text for s in ("resource_exhausted", "out of memory", "failed to allocate"))
            or re.search(r"\boom\b", text) is not None)  # the word, not "room" / "bloom"


def median_ms(fn, args, warmup: int, iters: int) -> float:
    """Median wall time in ms of ``fn(*args)`` (compiled; block_until_ready)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_forwards(fns: dict, rounds: int = 3, min_time: float = 0.3) -> dict:
    """Tokens/s per model from ``fns = {name: (fn, tokens per call)}`` (``fn()`` runs one compiled
    forward): interleaved rounds (robust to load spikes), each the median of >= 3 calls lasting
    >= ``min_time`` s; the best round counts."""
    import jax

    best = {name: 0.0 for name in fns}
    for _ in range(rounds):
        for name, (fn, tokens) in fns.items():
            times, t_end = [], time.perf_counter() + min_time
            while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 200):
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times.append(time.perf_counter() - t0)
            best[name] = max(best[name], tokens / statistics.median(times))
    return best


def environment() -> dict:
    """Where a number was measured: device kind, backend, device count, date, jax version."""
    import datetime

    import jax

    return dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                n_devices=jax.device_count(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                jax_version=jax.__version__)


def write_json(path, obj, *, indent=1, default=None) -> str:
    """``obj`` as JSON to ``path`` atomically (a temporary file in the same folder, fsync, then
    ``os.replace`` and an fsync of the folder: ``jaxformers.training.checkpoint.atomic_write``):
    an interruption, a power loss or a value JSON cannot encode leaves the previous file whole
    (never a torn or truncated one).  NumPy / JAX scalars and arrays are written as numbers and
    lists (before ``default``, which sees only the other values).  A NaN or infinity is written
    as ``NaN`` / ``Infinity`` (what ``json`` reads back; strict JSON parsers refuse it): the
    experiments write ``null`` for a number they do not have, so a NaN is a number that was
    computed (a diverged loss).  Returns the path."""
    import json

    from jaxformers.training.checkpoint import atomic_write

    def encode(value):  # numpy / jax scalars and arrays as JSON numbers and lists (not strings)
        if type(value).__module__.split(".")[0] in ("numpy", "jax", "jaxlib") and hasattr(value, "tolist"):
            return value.tolist()
        if default is None:
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
        return default(value)

    path = os.fspath(path)
    text = json.dumps(obj, indent=indent, default=encode) + "\n"  # encode first: a TypeError writes nothing
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, text)
    return path


def write_results(out_dir, **fields) -> str:
    """``out_dir/results.json`` = :func:`environment` + ``fields`` (written atomically:
    :func:`write_json`); returns the path."""
    path = write_json(os.path.join(out_dir, "results.json"), {**environment(), **fields})
    print(f"wrote {path}")
    return path


def start_results(out_dir, plots=()) -> None:
    """At the start of an experiment's or benchmark's run (its arguments checked, nothing trained
    or measured yet): an ``out_dir/results.json`` an earlier invocation left is moved to
    ``results.previous.json``.  It described runs this invocation replaces (``OUT/runs/<name>``
    is retrained from scratch unless ``--reuse`` keeps it), and until this run's first
    :func:`save_progress` (a benchmark's first saved row) a run cut short (a kill, a time limit,
    a crash) left it in place -- ``"complete": true`` and the old settings' numbers -- as if it
    were this run's result.  Likewise each of ``plots`` (the file names of the PNGs the
    experiment draws at its end, e.g. ``("ppl.png",)``) an earlier invocation left in
    ``out_dir`` is moved to ``NAME.previous.png``: a run cut short before drawing them leaves no
    old plot beside its partial ``results.json``.

    It also locks ``out_dir`` (``.experiment.lock``, :func:`jaxformers.training.rundir.lock_dir`)
    for the rest of the process: a second invocation into the same ``--out`` while this one runs
    is refused (``RunDirBusy`` naming its pid), instead of both retraining ``OUT/runs/<name>`` and
    writing one ``results.json``."""
    _hold_out_lock(out_dir)
    old = os.path.join(out_dir, "results.json")
    if os.path.isfile(old):
        os.replace(old, os.path.join(out_dir, "results.previous.json"))
        print(f"moved the earlier run's {old} to results.previous.json", file=sys.stderr, flush=True)
    for name in plots:
        if os.path.basename(name) != name or not name.endswith(".png"):
            raise ValueError(f"plots must be PNG file names in out_dir, got {name!r}")
        plot = os.path.join(out_dir, name)
        if os.path.isfile(plot):
            os.replace(plot, os.path.join(out_dir, name[:-len(".png")] + ".previous.png"))
            print(f"moved the earlier run's {plot} to {name[:-len('.png')]}.previous.png", file=sys.stderr,
                  flush=True)


_OUT_LOCKS = {}  # realpath of an experiment's out_dir -> the fd holding its lock (this process)


def _hold_out_lock(out_dir) -> None:
    from jaxformers.training.rundir import lock_dir

    key = os.path.realpath(out_dir)
    if key not in _OUT_LOCKS:  # the same process again (a test's second run): it holds it already
        _OUT_LOCKS[key] = lock_dir(out_dir, ".experiment.lock", "another experiment")


def save_progress(out_dir, results: dict) -> None:
    """``out_dir/results.json`` with ``complete: false`` (written atomically: :func:`write_json`):
    experiments call this after each finished piece (a trained model, an evaluated length), so a
    run cut short (a GPU stage's time limit, a kill) keeps every number it finished; the final
    write sets ``complete: true``."""
    write_json(os.path.join(out_dir, "results.json"), {**results, "complete": False}, default=str)


def train_overrides(preset_train: dict, steps=None, eval_batches=None) -> dict:
    """A preset's trainer settings with the ``--steps`` / ``--eval-batches`` overrides applied
    (warmup shrinks to at most a tenth of a shortened run; evaluation only at the end if the
    run is shorter than the eval interval)."""
    kw = dict(preset_train)
    if steps is not None:
        kw["steps"] = steps
        kw["warmup_steps"] = min(kw.get("warmup_steps", 0), steps // 10)
        if kw.get("eval_every") and kw["eval_every"] >= steps:
            kw["eval_every"] = 0
    if eval_batches is not None:
        kw["eval_batches"] = eval_batches
    return kw


def fresh_train_config(name: str, out, *, seed: int, data: str, train_kw: dict, log_points: int):
    """The ``TrainConfig`` :func:`train_fresh` trains ``out/runs/name`` with."""
    from pathlib import Path

    from jaxformers.training import TrainConfig

    return TrainConfig(seed=seed, data=data, tokenizer="byte", out_dir=str(Path(out) / "runs" / name),
                       checkpoint_every=0, keep_checkpoints=1,
                       log_every=max(1, train_kw["steps"] // log_points), **train_kw)


def check_finished(summary: dict, name: str, tag: str) -> None:
    """``SystemExit`` unless the trainer's ``summary`` says the run finished with no stop signal: a
    stop signal (SIGTERM from a GPU stage's time limit, Ctrl-C) makes ``train`` save a checkpoint
    and return early, and an experiment must not go on to report the partly trained model as its
    result (the runs finished before it stay in ``OUT/runs``, their numbers in ``OUT/results.json``
    where the experiment saves its progress); a signal that came at the run's last step (e.g.
    during its final evaluation) leaves it finished, and still stops the experiment."""
    signal = summary.get("stopped_by_signal")
    if summary.get("finished", True):
        if not signal:
            return
        # the run finished (its signal came at its last step, e.g. during its final evaluation) and
        # is kept, yet the signal asks the experiment to stop, not to start its next run
        raise SystemExit(f"[{tag}] {name} finished (step {summary.get('final_step')} of {summary.get('steps')}), "
                         f"then signal {signal} stopped the experiment (the finished runs stay in OUT/runs; "
                         "with --reuse a rerun keeps them)")
    raise SystemExit(f"[{tag}] training of {name} stopped at step {summary.get('final_step')} of "
                     f"{summary.get('steps')} (signal {summary.get('stopped_by_signal')}): not reported "
                     "(the runs finished before it stay in OUT/runs; with --reuse a rerun keeps them and "
                     "continues this one from its checkpoint)")


def train_fresh(name: str, cfg, out, *, seed: int, data: str, train_kw: dict, log_points: int,
                tag: str, cache=None, step_fn=None):
    """Train ``cfg`` from scratch into ``out/runs/name`` (an old run there is removed) on
    byte-level ``data``; returns ``(summary, params, compute_dtype, train_config)``.
    ``cache``: a ``jaxformers.training.CompileCache`` shared by the runs of one experiment
    (a model trained twice with the same program is compiled once); ``step_fn``: ``train``'s."""
    import shutil
    import sys
    from pathlib import Path

    from jaxformers.training import load_run, train
    from jaxformers.training.steps import resolve_dtype

    run_dir = Path(out) / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    tc = fresh_train_config(name, out, seed=seed, data=data, train_kw=train_kw, log_points=log_points)
    print(f"[{tag}] training {name} ({cfg.n_layer} layers)", file=sys.stderr, flush=True)
    summary = train(cfg, tc, progress=False, cache=cache, step_fn=step_fn)
    check_finished(summary, name, tag)
    _, _, params = load_run(run_dir)
    return summary, params, resolve_dtype(tc.dtype), tc


def reuse_or_train(name: str, cfg, out, reusable, *, seed: int, data: str, train_kw: dict,
                   log_points: int, tag: str, cache=None, step_fn=None):
    """``(summary, params, compute_dtype, train_config)`` of run ``out/runs/name``: when ``name``
    is in ``reusable`` (:func:`check_reuse`: a run of an earlier invocation with the same config
    and settings), loaded if it finished, or continued from its checkpoint if a signal stopped
    it; else trained from scratch (:func:`train_fresh`)."""
    import json
    import sys
    from pathlib import Path

    if name not in reusable:
        return train_fresh(name, cfg, out, seed=seed, data=data, train_kw=train_kw, log_points=log_points,
                           tag=tag, cache=cache, step_fn=step_fn)
    from jaxformers.training import load_run, train
    from jaxformers.training.steps import resolve_dtype

    run_dir = Path(out) / "runs" / name
    summary = json.loads((run_dir / "summary.json").read_text())
    if not summary.get("finished", True):  # stopped by a signal with these settings: continue it
        tc = fresh_train_config(name, out, seed=seed, data=data, train_kw=train_kw, log_points=log_points)
        print(f"[{tag}] resuming {name} from its checkpoint (step {summary.get('final_step')})",
              file=sys.stderr, flush=True)
        summary = train(cfg, tc, progress=False, cache=cache, resume=True, step_fn=step_fn)
        check_finished(summary, name, tag)
    else:
        print(f"[{tag}] reusing {run_dir}", file=sys.stderr, flush=True)
    _, tc, params = load_run(run_dir)
    return summary, params, resolve_dtype(tc.dtype), tc


def check_reuse(out, runs, *, seed: int, data: str, train_kw: dict, log_points: int, step_fn=None) -> list:
    """``--reuse``, checked before anything trains: the names in ``runs`` (``[(name, cfg)]``)
    whose run ``out/runs/name`` can be reused: a finished run, or one a signal stopped before its
    last step (:func:`reuse_or_train` continues it from its checkpoint; with other settings it
    is trained again from scratch).  ``SystemExit`` naming the run and the fields when a
    finished run was trained with another model config or other training settings (steps,
    seed, data, batch, ...) or, for a ``step_fn`` with a ``run_changes(run_dir)`` hook (DoGE's
    settings), other step settings: reusing it would report numbers of another experiment; rerun
    without ``--reuse`` (or with another ``--out``)."""
    from pathlib import Path

    from jaxformers.training.rundir import check_resume, train_config_changes

    import json

    reusable, bad = [], []
    for name, cfg in runs:
        run_dir = Path(out) / "runs" / name
        if not (run_dir / "summary.json").is_file():
            continue
        stopped = not json.loads((run_dir / "summary.json").read_text()).get("finished", True)
        try:
            saved = check_resume(run_dir, cfg)
        except ValueError as e:
            if not stopped:
                bad.append(str(e).replace("cannot resume", "cannot reuse"))
            continue
        tc = fresh_train_config(name, out, seed=seed, data=data, train_kw=train_kw, log_points=log_points)
        changes = [c for c in train_config_changes(saved, tc) if not c.startswith("log_every:")]
        if hasattr(step_fn, "run_changes"):
            changes += [f"{type(step_fn).__name__} {c}" for c in step_fn.run_changes(run_dir)]
        if changes and stopped:
            continue  # stopped by a signal, with other settings: trained again from scratch
        if changes:
            bad.append(f"cannot reuse {run_dir}: it was trained with other settings: " + "; ".join(changes))
        else:
            reusable.append(name)
    if bad:
        raise SystemExit("--reuse: " + "\n".join(bad) + "\n(rerun without --reuse to retrain, or use another --out)")
    return reusable
