"""Training: config, losses, step functions, optimizer, mesh/sharding, checkpoints, run directories
and the training loop.

    from jaxformers import get_config
    from jaxformers.training import TrainConfig, train, evaluate, load_run
    summary = train(get_config("gpt", "tiny", vocab_size=257), TrainConfig(out_dir="runs/gpt-tiny"))
    print(evaluate("runs/gpt-tiny"))            # {"val_loss": ..., "val_ppl": ...}
    model_config, train_config, params = load_run("runs/gpt-tiny")

Modules: :mod:`.losses` (batch dicts, loss registry, auxiliary losses), :mod:`.steps`
(``train_step`` / ``eval_step`` and their compiled form), :mod:`.rundir` (run directory
files and policy), :mod:`.metrics` (MFU, plots, progress), :mod:`.trainer` (``train``,
``evaluate``), :mod:`.doge` (DoGE domain reweighting: a ``step_fn`` for ``train``).
"""
from .doge import DogeStep, doge_weights
from .config import COMPUTE_DTYPES, SCHEDULES, TrainConfig
from .checkpoint import CheckpointError, Checkpointer
from .losses import (apply_model, cross_entropy, get_loss, list_losses, next_token_targets,
                     register_loss, weighted_mean)
from .mesh import (activate, batch_sharding, make_mesh, maybe_initialize_distributed, parse_mesh,
                   logical_to_sharding)
from .metrics import peak_flops, plot_losses
from .optim import decay_mask, make_optimizer, make_schedule
from .rundir import load_run, read_metrics
from .steps import CompileCache, Program, eval_step, train_step
from .trainer import TrainingDiverged, evaluate, open_dataset, resolve_dtype, train

__all__ = [
    "TrainConfig", "SCHEDULES", "COMPUTE_DTYPES", "CheckpointError", "Checkpointer",
    "activate", "batch_sharding", "make_mesh", "maybe_initialize_distributed", "parse_mesh",
    "logical_to_sharding", "decay_mask", "make_optimizer", "make_schedule",
    "apply_model", "cross_entropy", "get_loss", "list_losses", "next_token_targets", "register_loss",
    "weighted_mean",
    "CompileCache", "DogeStep", "doge_weights", "Program", "eval_step", "train_step",
    "evaluate", "load_run", "open_dataset", "peak_flops", "plot_losses", "read_metrics", "resolve_dtype",
    "train", "TrainingDiverged",
]
