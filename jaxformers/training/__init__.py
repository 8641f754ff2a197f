"""Training: config, optimizer, mesh/sharding, checkpoints and the training loop.

    from jaxformers import get_config
    from jaxformers.training import TrainConfig, train, evaluate, load_run
    summary = train(get_config("gpt", "tiny", vocab_size=257), TrainConfig(out_dir="runs/gpt-tiny"))
    print(evaluate("runs/gpt-tiny"))            # {"val_loss": ..., "val_ppl": ...}
    model_config, train_config, params = load_run("runs/gpt-tiny")
"""
from .config import COMPUTE_DTYPES, SCHEDULES, TrainConfig
from .checkpoint import CheckpointError, Checkpointer
from .mesh import (activate, batch_sharding, make_mesh, maybe_initialize_distributed, parse_mesh,
                   logical_to_sharding)
from .optim import decay_mask, make_optimizer, make_schedule
from .trainer import evaluate, load_run, peak_flops, plot_losses, read_metrics, train

__all__ = [
    "TrainConfig", "SCHEDULES", "COMPUTE_DTYPES", "CheckpointError", "Checkpointer",
    "activate", "batch_sharding", "make_mesh", "maybe_initialize_distributed", "parse_mesh",
    "logical_to_sharding", "decay_mask", "make_optimizer", "make_schedule",
    "evaluate", "load_run", "peak_flops", "plot_losses", "read_metrics", "train",
]
