"""The training loop: sharded, jit-compiled, resumable and reproducible.

    from jaxformers import get_config
    from jaxformers.training import TrainConfig, train
    summary = train(get_config("gpt", "tiny", vocab_size=257), TrainConfig(steps=300, out_dir="runs/x"))

Run directory (``train_config.out_dir``)::

    config.json        {"model": ModelConfig dict, "train": TrainConfig dict, "compute_dtype": ...}
    metrics.jsonl      {"step", "loss", "lr", "grad_norm", "tokens_per_s", ...} every log_every steps,
                       {"step", "val_loss", "val_ppl"} at every evaluation
    summary.json       final losses, perplexity, n_params, throughput, MFU (GPU/TPU)
    loss.png           train / val loss curves
    tokenizer/         the dataset's tokenizer (for generation)
    checkpoints/<step> see :mod:`jaxformers.training.checkpoint`

``step`` counts completed optimizer updates; the ``loss`` logged at ``step=s``
is the training loss of the batch used for update ``s`` (before the update).

Reproducibility: parameters come from ``PRNGKey(seed)`` and the batch of update
``s`` is a pure function of ``(seed, s)`` (:class:`jaxformers.data.TokenLoader`),
so the same config gives the same losses, and ``resume=True`` continues from
the newest complete checkpoint on exactly the curve of an uninterrupted run
(rows of ``metrics.jsonl`` after the restored step are dropped first).

Resume policy: ``resume=True`` with no complete checkpoint starts from scratch
(with a message) -- so a job script can always pass ``--resume`` after
preemption.  ``resume=False`` refuses (``FileExistsError``) to touch a run
directory that already holds checkpoints (one without checkpoints, e.g. from a
run killed before its first save, is reused and its metrics are reset).  A corrupt newest checkpoint is an
error (:class:`CheckpointError`), never silently skipped; an incomplete one (a
save cut short) is moved to ``checkpoints.incomplete/`` and the previous one is used.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import ModelConfig
from ..registry import build, config_from_dict
from ..utils import count_params, flops_per_token
from . import mesh as mesh_lib
from .checkpoint import Checkpointer, CheckpointError
from .config import TrainConfig
from .optim import decay_mask, make_optimizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"
TOKENIZER_DIR = "tokenizer"

# Dense bf16 peak FLOP/s per device, keyed by a lower-case substring of ``device.device_kind``
# (first match wins, so more specific names come first).
PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
)


def peak_flops(device=None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one device (``None`` if unknown, e.g. CPU)."""
    device = jax.devices()[0] if device is None else device
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return None


def resolve_dtype(name: str) -> str:
    if name == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return name


# ============================================================================ small file helpers
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(run_dir) -> list:
    """Rows of ``metrics.jsonl`` (a torn last line from a crash is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _truncate_metrics(run_dir: Path, last_step: int) -> None:
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    _atomic_write(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def plot_losses(run_dir) -> Optional[Path]:
    """Write ``loss.png`` (train and val loss vs step) from ``metrics.jsonl``."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if not train and not val:
        return None
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / PLOT_FILE
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ============================================================================ model / loss
def _compute_config(model_config: ModelConfig, dtype: str) -> ModelConfig:
    return model_config.replace(dtype=dtype, param_dtype="float32")


def _global_norm(tree):
    tree_lib = getattr(optax, "tree", None)
    if tree_lib is not None and hasattr(tree_lib, "norm"):
        return tree_lib.norm(tree)
    return optax.global_norm(tree)


def _token_loss(module, params, tokens):
    """Per-token next-token cross-entropy (float32) for windows ``[B, T+1]`` -> ``[B, T]``."""
    logits = module.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])


class _Setup:
    """Everything derived from (model config, mesh, train config): shardings and jitted functions."""

    def __init__(self, model_config: ModelConfig, tc: Optional[TrainConfig], mesh, dtype: str,
                 init_batch: int):
        self.mesh = mesh
        self.config = _compute_config(model_config, dtype)
        self.module = build(self.config)
        self.tc = tc
        tokens0 = jnp.zeros((init_batch, min(8, self.config.max_seq_len)), jnp.int32)
        self._tokens0 = tokens0
        # Parameter creation runs without logical rules: flax's DenseGeneral reshapes boxed
        # kernels (unbox -> with_logical_constraint on the flat shape), which fails under rules.
        # Parameter shardings come from the jit out_shardings instead.
        boxed = jax.eval_shape(self.module.init, jax.random.PRNGKey(0), tokens0)
        self.logical_specs = nn.get_partition_spec(boxed)["params"]
        self.abstract_params = nn.unbox(boxed)["params"]
        shardings = mesh_lib.logical_to_sharding(self.logical_specs, mesh)
        self.param_shardings = mesh_lib.fit_shardings(shardings, self.abstract_params)
        self.replicated = mesh_lib.replicated(mesh)
        self.batch_sharding = mesh_lib.batch_sharding(mesh, 2)
        self.row_sharding = mesh_lib.batch_sharding(mesh, 1)
        if tc is not None:
            self.tx, self.schedule = make_optimizer(tc, decay_mask(self.logical_specs, self.abstract_params))
            self.abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
            self.opt_shardings = mesh_lib.fit_shardings(
                mesh_lib.opt_state_shardings(self.tx, self.abstract_opt, self.param_shardings, mesh),
                self.abstract_opt)
        self._train_step = None
        self._eval_step = None
        self._init = None

    # ------------------------------------------------------------------ abstract trees
    def abstract_with_shardings(self, tree, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    # ------------------------------------------------------------------ init
    def init(self, seed: int):
        """Freshly initialized ``(params, opt_state)``, created directly with their shardings."""
        if self._init is None:
            module, tx, tokens0 = self.module, self.tx, self._tokens0

            def init_fn(rng):
                params = nn.unbox(module.init(rng, tokens0))["params"]
                return params, tx.init(params)

            fn = jax.jit(init_fn, out_shardings=(self.param_shardings, self.opt_shardings))
            key = jax.random.PRNGKey(0)
            with mesh_lib.use_mesh(self.mesh):  # no logical rules here: see __init__
                self._init = fn.lower(jax.ShapeDtypeStruct(key.shape, key.dtype)).compile()
        return self._init(jax.random.PRNGKey(seed))

    # ------------------------------------------------------------------ train step
    def train_step(self):
        if self._train_step is not None:
            return self._train_step
        module, tx, schedule, tc = self.module, self.tx, self.schedule, self.tc
        accum = tc.grad_accum
        micro_sharding = NamedSharding(self.mesh, P(None, mesh_lib.BATCH_AXES, None))

        def loss_fn(params, tokens):
            return _token_loss(module, params, tokens).mean()

        grad_fn = jax.value_and_grad(loss_fn)

        def step_fn(params, opt_state, batch, step):
            if accum == 1:
                loss, grads = grad_fn(params, batch)
            else:
                b, t1 = batch.shape
                # micro-batch a = rows a, a + A, a + 2A, ...: each device keeps its own rows
                micro = batch.reshape(b // accum, accum, t1).swapaxes(0, 1)
                micro = jax.lax.with_sharding_constraint(micro, micro_sharding)

                def body(carry, tokens):
                    g_sum, l_sum = carry
                    loss, grads = grad_fn(params, tokens)
                    return (jax.tree.map(jnp.add, g_sum, grads), l_sum + loss), None

                zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
                (g_sum, l_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)
                grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), g_sum, params)
                loss = l_sum / accum
            grad_norm = _global_norm(grads)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step)}
            return params, opt_state, metrics

        jitted = jax.jit(
            step_fn,
            in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding, self.replicated),
            out_shardings=(self.param_shardings, self.opt_shardings, self.replicated),
            donate_argnums=(0, 1))
        args = (self.abstract_with_shardings(self.abstract_params, self.param_shardings),
                self.abstract_with_shardings(self.abstract_opt, self.opt_shardings),
                jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len + 1), jnp.int32,
                                     sharding=self.batch_sharding),
                jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated))
        self._train_step = self.compile(jitted, args)
        return self._train_step

    def compile(self, jitted, args):
        """Lower + compile under the mesh and the logical axis rules (activation constraints on)."""
        with mesh_lib.activate(self.mesh):
            return jitted.lower(*args).compile()

    # ------------------------------------------------------------------ eval step
    def eval_step(self):
        if self._eval_step is None:
            module = self.module

            def eval_fn(params, batch, weights):
                per_token = _token_loss(module, params, batch)
                w = weights.astype(jnp.float32)[:, None]
                return jnp.sum(per_token * w), jnp.sum(w) * per_token.shape[1]

            jitted = jax.jit(eval_fn,
                             in_shardings=(self.param_shardings, self.batch_sharding, self.row_sharding),
                             out_shardings=(self.replicated, self.replicated))
            self._eval_jitted = jitted
            self._eval_compiled = {}

            def run(params, batch, weights):
                key = batch.shape
                if key not in self._eval_compiled:
                    args = (self.abstract_with_shardings(self.abstract_params, self.param_shardings),
                            jax.ShapeDtypeStruct(batch.shape, batch.dtype, sharding=self.batch_sharding),
                            jax.ShapeDtypeStruct(weights.shape, weights.dtype, sharding=self.row_sharding))
                    self._eval_compiled[key] = self.compile(jitted, args)
                return self._eval_compiled[key](params, batch, weights)

            self._eval_step = run
        return self._eval_step

    # ------------------------------------------------------------------ data placement
    def put_batch(self, local_rows: np.ndarray, global_rows: int):
        return jax.make_array_from_process_local_data(
            self.batch_sharding, np.ascontiguousarray(local_rows, np.int32),
            (global_rows, local_rows.shape[1]))

    def put_rows(self, local: np.ndarray, global_rows: int):
        return jax.make_array_from_process_local_data(self.row_sharding, np.ascontiguousarray(local),
                                                      (global_rows,))


_SETUP_CACHE: "Dict[Any, _Setup]" = {}
_SETUP_CACHE_SIZE = 4


def _cached_setup(model_config, tc, mesh, dtype, init_batch) -> _Setup:
    """Reuse compiled functions across ``train`` calls whose programs are identical
    (fields that do not change the compiled step -- paths, seed, intervals -- are ignored)."""
    program = None
    if tc is not None:
        program = tc.replace(out_dir="-", data="-", tokenizer="byte", seed=0, eval_every=0, eval_batches=1,
                             log_every=1, checkpoint_every=0, keep_checkpoints=1, mesh=None)
        if program.schedule == "constant":  # the total step count does not enter the program
            program = program.replace(steps=1, min_lr_ratio=0.0, decay_fraction=0.0)
    key = (_compute_config(model_config, dtype), mesh, program, init_batch)
    setup = _SETUP_CACHE.pop(key, None)
    if setup is None:
        setup = _Setup(model_config, tc, mesh, dtype, init_batch)
    _SETUP_CACHE[key] = setup  # most recently used last
    while len(_SETUP_CACHE) > _SETUP_CACHE_SIZE:
        _SETUP_CACHE.pop(next(iter(_SETUP_CACHE)))
    return setup


def _eval_loss(setup: _Setup, params, tokens: np.ndarray, batch_size: int, seq_len: int,
               max_batches: Optional[int]) -> Dict[str, Any]:
    """Mean next-token loss over sequential windows of ``tokens`` (padded rows weigh 0)."""
    from ..data import eval_batches

    if tokens is None or len(tokens) < seq_len + 1 or max_batches == 0:
        return {"val_loss": None, "val_ppl": None, "val_tokens": 0}
    n_par = mesh_lib.batch_parallelism(setup.mesh)
    n_proc = jax.process_count()
    rows_global = -(-batch_size // n_par) * n_par  # round up: every data shard gets rows
    local_rows = rows_global // n_proc
    step = setup.eval_step()
    total, count = 0.0, 0.0
    for batch in eval_batches(tokens, rows_global, seq_len, max_batches):
        weights = np.zeros(local_rows, np.float32)
        weights[:batch.shape[0]] = 1.0
        if batch.shape[0] < local_rows:
            batch = np.concatenate([batch, np.zeros((local_rows - batch.shape[0], batch.shape[1]), np.int32)])
        s, c = step(params, setup.put_batch(batch, rows_global), setup.put_rows(weights, rows_global))
        total += float(s)
        count += float(c)
    if count == 0:
        return {"val_loss": None, "val_ppl": None, "val_tokens": 0}
    loss = total / count
    return {"val_loss": loss, "val_ppl": float(math.exp(min(loss, 700.0))), "val_tokens": int(count)}


# ============================================================================ data
def open_dataset(data: str, tokenizer: str):
    """``(dataset dir, meta, train tokens, val tokens)`` for a built-in name, a path or a prepared dir
    (prepared on first use)."""
    from ..data import ensure_dataset, load_prepared

    path = Path(str(data)).expanduser()
    if (path / "meta.json").is_file():  # already a prepared dataset directory
        ds_dir = path
    else:
        ds_dir = ensure_dataset(data, tokenizer)
    meta, train_tokens, val_tokens = load_prepared(ds_dir)
    return Path(ds_dir), meta, train_tokens, val_tokens


def _config_diff(old: dict, new: dict, ignore=()) -> list:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in keys if k not in ignore and old.get(k) != new.get(k)]


class _Progress:
    def __init__(self, mode, total, initial):
        self.bar = None
        self.lines = False
        self.postfix = {}
        if mode is None:
            mode = "bar" if sys.stderr.isatty() else "lines"
        elif mode is True:
            mode = "bar"
        elif mode is False:
            mode = "off"
        if mode == "bar":
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.lines = mode == "lines"

    def update(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def message(self, row: dict):
        if self.bar is not None:
            self.postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                                 if k in ("loss", "val_loss", "lr", "tokens_per_s") and v is not None})
            self.bar.set_postfix(self.postfix, refresh=False)
        elif self.lines:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  file=sys.stderr, flush=True)

    def info(self, text: str):
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.lines:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ============================================================================ train
class _StopRequest:
    """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into "checkpoint after this step, then stop".

    Only installed from the main thread (signal handlers cannot be set elsewhere);
    a second signal falls through to the previous handler.
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
            signal.signal(sig, handler)
        self._previous = {}


def train(model_config: ModelConfig, train_config: TrainConfig, *, resume: bool = False,
          progress: Optional[bool] = None, stop_after: Optional[int] = None) -> Dict[str, Any]:
    """Train ``model_config`` with ``train_config``; returns the summary dict (also in summary.json).

    ``progress``: ``None`` = a tqdm bar if stderr is a terminal, else one line per
    log step on stderr; ``True`` = bar; ``False`` = silent.  ``stop_after=k``
    stops once step ``k`` is done (checkpointing it), as if preempted -- for
    time-sliced jobs; continue with ``resume=True`` (the schedule still runs to
    ``train_config.steps``).  See the module docstring for the run directory,
    resume and reproducibility rules.
    """
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    if not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    tc = train_config
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    end_step = tc.steps if stop_after is None else min(tc.steps, stop_after)
    mesh_lib.maybe_initialize_distributed()
    t_start = time.perf_counter()
    run_dir = Path(tc.out_dir).expanduser()
    is_main = jax.process_index() == 0
    ckpt = Checkpointer(run_dir, keep=tc.keep_checkpoints)

    # ---------------------------------------------------------------- refuse to clobber
    if not resume and ckpt.step_dirs():
        raise FileExistsError(
            f"{run_dir} already holds checkpoints (steps {ckpt.step_dirs()}); pass resume=True "
            "(--resume) to continue that run, or choose a new output directory (--out)")

    # ---------------------------------------------------------------- data + checks
    ds_dir, meta, train_tokens, val_tokens = open_dataset(tc.data, tc.tokenizer)
    if model_config.vocab_size < int(meta["vocab_size"]):
        raise ValueError(
            f"model vocab_size={model_config.vocab_size} is smaller than the dataset's vocab_size="
            f"{meta['vocab_size']} ({ds_dir}); set vocab_size >= {meta['vocab_size']}")
    if tc.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len={tc.seq_len} exceeds the model's max_seq_len={model_config.max_seq_len}")
    mesh = mesh_lib.make_mesh(tc.mesh)
    n_par = mesh_lib.batch_parallelism(mesh)
    if tc.micro_batch_size % n_par:
        raise ValueError(
            f"batch_size / grad_accum = {tc.micro_batch_size} must be divisible by data*fsdp = {n_par} "
            f"(mesh {mesh_lib.describe(mesh)})")
    if tc.batch_size % jax.process_count():
        raise ValueError(
            f"batch_size={tc.batch_size} must be divisible by the process count {jax.process_count()}")
    dtype = resolve_dtype(tc.dtype)

    # ---------------------------------------------------------------- resume checks (read-only)
    saved = None
    if resume and (run_dir / CONFIG_FILE).exists():
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
        diff = _config_diff(saved.get("model", {}), model_config.to_dict())
        if diff:
            raise ValueError(f"cannot resume {run_dir}: the model config differs from the saved one: "
                             + "; ".join(diff))
    start_step, restored_meta = 0, None
    with_ckpt = resume and ckpt.latest_step() is not None
    if resume and not with_ckpt and ckpt.incomplete_steps() and not ckpt.complete_steps():
        log.warning("only incomplete checkpoints in %s", ckpt.directory)

    setup = _cached_setup(model_config, tc, mesh, dtype, n_par)
    n_params = count_params(setup.abstract_params)
    prog_msgs = []
    if with_ckpt:
        step = ckpt.latest_step()
        ckpt.verify(step)  # raises CheckpointError before anything is modified
        moved = ckpt.quarantine_incomplete()  # before orbax lists the step directories
        if moved:
            prog_msgs.append(f"moved incomplete checkpoint(s) aside: {moved}")
        params, opt_state, restored_meta = ckpt.restore(
            step,
            setup.abstract_with_shardings(setup.abstract_params, setup.param_shardings),
            setup.abstract_with_shardings(setup.abstract_opt, setup.opt_shardings), verify=False)
        start_step = int(restored_meta["data_step"])
        if saved is not None:
            diff = _config_diff(saved.get("train", {}), tc.to_dict(), ignore=("out_dir",))
            if diff:
                prog_msgs.append("resuming with a changed train config: " + "; ".join(diff))
        prog_msgs.append(f"resumed from {ckpt.step_dir(step)} (step {start_step})")
    else:
        if resume:
            prog_msgs.append(
                f"resume requested but {run_dir} has no complete checkpoint: starting from scratch")
            log.warning(prog_msgs[-1])
            ckpt.quarantine_incomplete()
        params, opt_state = setup.init(tc.seed)

    # ---------------------------------------------------------------- run dir files
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(run_dir / CONFIG_FILE, json.dumps(
            {"model": model_config.to_dict(), "train": tc.to_dict(), "compute_dtype": dtype,
             "dataset": {"dir": str(ds_dir), "vocab_size": meta["vocab_size"], "source": meta.get("source"),
                         "tokenizer": meta.get("tokenizer")},
             "n_params": n_params, "mesh": mesh_lib.describe(mesh)}, indent=2, sort_keys=True) + "\n")
        if with_ckpt:
            _truncate_metrics(run_dir, start_step)
        else:
            _atomic_write(run_dir / METRICS_FILE, "")
        try:
            from ..data import load_tokenizer
            load_tokenizer(ds_dir).save(run_dir / TOKENIZER_DIR)
        except Exception as e:  # noqa: BLE001 - generation is optional
            log.warning("could not copy the tokenizer into %s: %s", run_dir, e)

    # ---------------------------------------------------------------- loop
    from ..data import TokenLoader

    loader = TokenLoader(train_tokens, tc.batch_size, tc.seq_len, seed=tc.seed)
    t_compile = time.perf_counter()
    step_fn = setup.train_step()
    compile_s = time.perf_counter() - t_compile
    progress_ = _Progress(progress if is_main else False, tc.steps, start_step)
    for msg in prog_msgs:
        progress_.info(msg)
    metrics_file = open(run_dir / METRICS_FILE, "a") if is_main else None

    def write_row(row):
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        progress_.message(row)

    eval_bs = tc.micro_batch_size
    last_train, last_eval = None, None
    train_time, train_tokens_done = 0.0, 0
    interval_t0, interval_step = time.perf_counter(), start_step
    tokens_seen0 = start_step * tc.tokens_per_step

    def end_interval(done):
        nonlocal train_time, train_tokens_done, interval_t0, interval_step
        jax.block_until_ready(params)
        now = time.perf_counter()
        dt, n = now - interval_t0, done - interval_step
        train_time += dt
        train_tokens_done += n * tc.tokens_per_step
        interval_t0, interval_step = now, done
        return (n * tc.tokens_per_step / dt) if dt > 0 and n > 0 else None

    stop = _StopRequest()
    try:
        for step in range(start_step, end_step):
            batch = setup.put_batch(loader.batch_at(step), tc.batch_size)
            params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.asarray(step, jnp.int32))
            done = step + 1
            progress_.update(1)
            is_last = done == tc.steps
            do_log = done % tc.log_every == 0 or is_last
            do_eval = (tc.eval_every and done % tc.eval_every == 0) or is_last
            stopping = stop.signum is not None  # read once: a signal may land mid-iteration
            do_ckpt = (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == end_step or stopping
            if do_log:
                m = jax.device_get(metrics)
                tps = end_interval(done)
                last_train = {"step": done, "loss": float(m["loss"]), "lr": float(m["lr"]),
                              "grad_norm": float(m["grad_norm"]),
                              "tokens_per_s": None if tps is None else round(tps, 1),
                              "tokens": tokens_seen0 + (done - start_step) * tc.tokens_per_step}
                if not math.isfinite(last_train["loss"]):
                    progress_.info(f"warning: non-finite loss {last_train['loss']} at step {done}")
                write_row(last_train)
            if do_eval or do_ckpt:
                if not do_log:
                    end_interval(done)
                if do_eval:
                    ev = _eval_loss(setup, params, val_tokens, eval_bs, tc.seq_len, tc.eval_batches)
                    if ev["val_loss"] is not None:
                        last_eval = {"step": done, "val_loss": ev["val_loss"], "val_ppl": ev["val_ppl"]}
                        write_row(last_eval)
                if do_ckpt:
                    ckpt.save(done, params, opt_state, {
                        "data_step": done, "seed": tc.seed, "batch_size": tc.batch_size,
                        "seq_len": tc.seq_len, "tokens_seen": done * tc.tokens_per_step})
                interval_t0 = time.perf_counter()
            if stopping:
                progress_.info(f"stopping on signal {stop.signum}: checkpoint saved at step {done}; "
                               "continue with resume=True (--resume)")
                end_step = done
                break
        ckpt.wait()
    finally:
        stop.restore()
        progress_.close()
        if metrics_file is not None:
            metrics_file.close()
        ckpt.close()

    # ---------------------------------------------------------------- summary
    if start_step >= end_step:  # nothing left to train: report the restored state
        rows = read_metrics(run_dir)
        last_train = next((r for r in reversed(rows) if "loss" in r), None)
        last_eval = next((r for r in reversed(rows) if r.get("val_loss") is not None), None)
    finished = max(start_step, end_step) >= tc.steps
    if last_eval is None and finished:
        ev = _eval_loss(setup, params, val_tokens, eval_bs, tc.seq_len, tc.eval_batches)
        if ev["val_loss"] is not None:
            last_eval = {"step": max(start_step, tc.steps), **ev}
    tokens_per_s = train_tokens_done / train_time if train_time > 0 else None
    fpt = flops_per_token(setup.config, tc.seq_len, n_params)
    peak = peak_flops()
    mfu = (fpt * tokens_per_s / (peak * jax.device_count())) if (peak and tokens_per_s) else None
    summary = {
        "model": model_config.model,
        "run_dir": str(run_dir),
        "steps": tc.steps,
        "final_step": max(start_step, end_step),
        "finished": finished,
        "stopped_by_signal": stop.signum,
        "resumed_from": start_step if with_ckpt else None,
        "train_loss": None if last_train is None else last_train["loss"],
        "val_loss": None if last_eval is None else last_eval["val_loss"],
        "val_ppl": None if last_eval is None else last_eval["val_ppl"],
        "n_params": n_params,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": fpt,
        "mfu": mfu,
        "compile_s": compile_s,
        "wall_s": time.perf_counter() - t_start,
        "compute_dtype": dtype,
        "mesh": mesh_lib.describe(mesh),
        "n_devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
    }
    if is_main:
        _atomic_write(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        try:
            plot_losses(run_dir)
        except Exception as e:  # noqa: BLE001 - a plot must never fail a run
            log.warning("could not plot losses: %s", e)
    return summary


# ============================================================================ load / evaluate
def load_run(run_dir, *, step: Optional[int] = None, mesh=None) -> Tuple[ModelConfig, TrainConfig, Any]:
    """``(model_config, train_config, params)`` of a run (newest complete checkpoint, or ``step``).

    Params are float32, on the first local device unless ``mesh`` is given (then
    sharded by the logical rules).  Raises ``FileNotFoundError`` / ``CheckpointError``.
    """
    run_dir = Path(run_dir).expanduser()
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    saved = json.loads(cfg_path.read_text())
    model_config = config_from_dict(saved["model"])
    train_config = TrainConfig.from_dict(saved["train"])
    ckpt = Checkpointer(run_dir, keep=train_config.keep_checkpoints)
    if step is None:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"{run_dir} has no complete checkpoint under {ckpt.directory}")
    module = build(_compute_config(model_config, "float32"))
    tokens0 = jnp.zeros((1, min(8, model_config.max_seq_len)), jnp.int32)
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens0)
    abstract = nn.unbox(boxed)["params"]
    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: sharding, abstract)
    else:
        shardings = mesh_lib.fit_shardings(
            mesh_lib.logical_to_sharding(nn.get_partition_spec(boxed)["params"], mesh), abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    try:
        params, _, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    return model_config, train_config, params


def _normalize_params(params):
    params = nn.unbox(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    return params


def evaluate(run: Union[str, os.PathLike, Tuple[ModelConfig, Any]], data=None, *,
             tokenizer: Optional[str] = None,
             split: str = "val", batch_size: Optional[int] = None, seq_len: Optional[int] = None,
             max_batches: Optional[int] = -1, mesh: Optional[str] = None,
             dtype: Optional[str] = None) -> Dict[str, Any]:
    """Mean next-token loss and perplexity: ``{"val_loss", "val_ppl", "val_tokens"}``.

    ``run``: a run directory, or ``(model_config, params)``.  ``data``: a corpus
    spec / folder (prepared with ``tokenizer``), a prepared dataset directory,
    or a 1-D array of token ids; default: the run's dataset.  ``split``: ``val``
    or ``train``.  Defaults for ``batch_size`` / ``seq_len`` / ``max_batches``
    come from the run's train config, and ``dtype`` (compute dtype) from the run
    or float32 (so a run's final ``val_loss`` is reproduced); ``max_batches=None``
    evaluates the whole split.
    """
    tc = None
    if isinstance(run, (str, os.PathLike)):
        model_config, tc, params = load_run(run)
    else:
        model_config, params = run
        params = _normalize_params(params)
    if data is None:
        if tc is None:
            raise ValueError("data is required when evaluating (model_config, params)")
        data = tc.data
    if split not in ("val", "train"):
        raise ValueError(f"split={split!r} is not allowed; choose one of ['val', 'train']")
    if isinstance(data, (np.ndarray, list, tuple)):
        tokens = np.asarray(data)
    else:
        tok = tokenizer or (tc.tokenizer if tc is not None else "byte")
        _, _, train_tokens, val_tokens = open_dataset(str(data), tok)
        tokens = val_tokens if split == "val" else train_tokens
    batch_size = batch_size or (tc.micro_batch_size if tc is not None else 8)
    seq_len = seq_len or (tc.seq_len if tc is not None else model_config.max_seq_len)
    if max_batches == -1:
        max_batches = tc.eval_batches if tc is not None else None
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the {split} split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    mesh_obj = mesh_lib.make_mesh(mesh)
    if dtype is None:
        dtype = tc.dtype if tc is not None else "float32"
    setup = _cached_setup(model_config, None, mesh_obj, resolve_dtype(dtype),
                          mesh_lib.batch_parallelism(mesh_obj))
    params = jax.device_put(params, setup.param_shardings)
    return _eval_loss(setup, params, tokens, batch_size, seq_len, max_batches)
