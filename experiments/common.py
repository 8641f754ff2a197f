"""Helpers shared by the experiment and benchmark entry points."""
import argparse
import os
import statistics
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
                      data_default="default", data_help="corpus / prepared dataset (default: built-in)"):
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


def parse_experiment_args(ap, argv=None, positive=("steps", "eval_batches")):
    """``ap.parse_args(argv)``; every option named in ``positive`` that was given must be >= 1 (a
    usage error naming it otherwise); then the persistent compile cache unless
    ``--no-compile-cache``."""
    args = ap.parse_args(argv)
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.no_compile_cache:
        enable_compile_cache()
    return args


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


def write_results(out_dir, **fields) -> str:
    """``out_dir/results.json`` = :func:`environment` + ``fields``; returns the path."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump({**environment(), **fields}, f, indent=1)
    print(f"wrote {path}")
    return path


def save_progress(out_dir, results: dict) -> None:
    """``out_dir/results.json`` with ``complete: false``: experiments call this after each finished
    piece (a trained model, an evaluated length), so a run cut short (a GPU stage's time limit, a
    kill) keeps every number it finished; the final write sets ``complete: true``."""
    import json
    from pathlib import Path

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "results.json").write_text(json.dumps({**results, "complete": False}, indent=1,
                                                           default=str) + "\n")


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


def train_fresh(name: str, cfg, out, *, seed: int, data: str, train_kw: dict, log_points: int,
                tag: str, cache=None):
    """Train ``cfg`` from scratch into ``out/runs/name`` (an old run there is removed) on
    byte-level ``data``; returns ``(summary, params, compute_dtype, train_config)``.
    ``cache``: a ``jaxformers.training.CompileCache`` shared by the runs of one experiment
    (a model trained twice with the same program is compiled once)."""
    import shutil
    import sys
    from pathlib import Path

    from jaxformers.training import TrainConfig, load_run, train
    from jaxformers.training.steps import resolve_dtype

    run_dir = Path(out) / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    tc = TrainConfig(seed=seed, data=data, tokenizer="byte", out_dir=str(run_dir),
                     checkpoint_every=0, keep_checkpoints=1,
                     log_every=max(1, train_kw["steps"] // log_points), **train_kw)
    print(f"[{tag}] training {name} ({cfg.n_layer} layers)", file=sys.stderr, flush=True)
    summary = train(cfg, tc, progress=False, cache=cache)
    _, _, params = load_run(run_dir)
    return summary, params, resolve_dtype(tc.dtype), tc
