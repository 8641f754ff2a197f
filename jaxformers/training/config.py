"""Training hyper-parameters: one frozen dataclass, validated on construction.

Validation errors are ``ValueError``s naming the field and the allowed values,
like :class:`jaxformers.config.ModelConfig`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..config import ConfigMixin, check_fields

SCHEDULES = ("cosine", "wsd", "constant")


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigMixin):
    """What to train on, for how long, and how.

    ``batch_size`` is the global batch (sequences per optimizer step, summed over
    every device and host); it is split into ``grad_accum`` micro-batches that
    run one after another.  ``seq_len`` is the number of input tokens per
    sequence.  ``lr`` is the peak learning rate; the schedule ends at
    ``lr * min_lr_ratio``.  ``dtype`` is the compute dtype (``auto``: bfloat16 on
    GPU/TPU, float32 on CPU); parameters and optimizer state stay float32.
    ``mesh`` is ``"data=D,fsdp=F,tensor=T"`` (missing axes are 1; ``None`` = pure
    data parallelism over every device).  ``checkpoint_every=0`` saves only the
    final checkpoint (the final step is always saved).  ``eval_every=0`` evaluates
    only at the end; ``eval_batches=0`` never evaluates.
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    data: str = "default"
    tokenizer: str = "byte"
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    mesh: Optional[str] = None
    dtype: str = "auto"
    out_dir: str = "runs/default"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def integer(name, minimum):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

        def number(name, lo, hi, lo_open=False, hi_open=False):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number, got {value!r}")
            bad_lo = value <= lo if lo_open else value < lo
            bad_hi = value >= hi if hi_open else value > hi
            if bad_lo or bad_hi:
                interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
                raise ValueError(f"{name} must be in {interval}, got {value!r}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "keep_checkpoints"):
            integer(name, 1)
        for name in ("warmup_steps", "eval_every", "eval_batches", "checkpoint_every", "seed"):
            integer(name, 0)
        inf = float("inf")
        number("lr", 0.0, inf, lo_open=True)
        number("min_lr_ratio", 0.0, 1.0)
        number("decay_fraction", 0.0, 1.0)
        number("weight_decay", 0.0, inf)
        number("beta1", 0.0, 1.0, hi_open=True)
        number("beta2", 0.0, 1.0, hi_open=True)
        number("eps", 0.0, inf, lo_open=True)
        number("grad_clip", 0.0, inf)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not allowed; choose one of {list(SCHEDULES)}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not allowed; choose one of {list(COMPUTE_DTYPES)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size} "
                f"(allowed grad_accum: {_divisors(self.batch_size)})")
        for name in ("data", "tokenizer", "out_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.mesh is not None:
            from .mesh import parse_mesh  # syntax check only; device count is checked at build time
            parse_mesh(self.mesh)

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        check_fields(cls, values)
        return cls(**values)
