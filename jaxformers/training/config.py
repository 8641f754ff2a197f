"""Training hyper-parameters: one frozen dataclass, validated on construction.

Validation errors are ``ValueError``s naming the field and the allowed values,
like :class:`jaxformers.config.ModelConfig`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Mapping, Optional, Tuple

from ..config import ConfigMixin, check_fields, plain_scalars

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
    ``lr * min_lr_ratio``.  Warmup lasts ``warmup_steps`` updates, or when that is ``None``
    (the default) ``round(warmup_fraction * schedule length)``.  ``schedule_steps`` is
    the length the schedule is laid out over (``None`` = ``steps``): a run extended
    past its schedule (``--extend-steps``) keeps the original length, so the LR
    continues at the value it had reached (continuous, never re-stretched).
    ``dtype`` is the compute dtype (``auto``: bfloat16 on
    GPU/TPU, float32 on CPU); parameters and optimizer state stay float32.
    ``mesh`` is ``"data=D,fsdp=F,expert=E,tensor=T"`` (missing axes are 1; one axis may be
    ``-1``: the devices the others leave; ``None`` = pure data parallelism over every device; a
    blank spec is stored as ``None``).  ``checkpoint_every=0`` saves only the
    final checkpoint (the final step is always saved).  ``eval_every=0`` evaluates
    only at the end; ``eval_batches=0`` never evaluates.  An evaluation covers
    ``eval_batches`` full batches (``eval_batches * batch_size`` sequences, run as
    ``eval_batches * grad_accum`` micro-batches of ``batch_size / grad_accum`` rows:
    :attr:`eval_micro_batches`), so ``val_loss`` is over the same tokens whatever
    ``grad_accum`` is.

    ``loss`` names a registered loss function (:mod:`jaxformers.training.losses`;
    ``train(..., loss_fn=fn)`` overrides it).  ``aux_loss_weights`` weighs the
    auxiliary losses that modules sow into the ``losses`` collection: a mapping
    ``{name: weight}``, where names not listed weigh 1.0.  It is stored as a
    sorted tuple of ``(name, weight)`` pairs (the config stays hashable) and
    accepts a dict, a list of pairs, a JSON object string or ``"name=w,name=w"``
    (what ``--train-set aux_loss_weights=...`` passes); ``to_dict`` writes a dict.

    ``imports``: Python modules the run needs imported -- your own code that registers its
    architecture (:func:`jaxformers.registry.register`) or its loss (``register_loss``);
    ``experiments.train --import MODULE`` records them here.  Saved with the run (config.json,
    run.yaml, every checkpoint), they are imported again wherever the run is loaded or resumed
    (:func:`~jaxformers.training.rundir.load_run`, a resume, ``init_from``, the CLIs' ``--run``)
    before its model name is looked up; :func:`~jaxformers.training.train` imports them first too.
    Dotted module names (``my_pkg.my_arch``), stored as a tuple; a string is split at commas.
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: Optional[int] = None  # None: warmup_fraction of the schedule
    warmup_fraction: float = 0.1
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent decaying (0: none, lr throughout)
    schedule_steps: Optional[int] = None  # None: steps (see the class docstring)
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
    loss: str = "cross_entropy"
    aux_loss_weights: Tuple[Tuple[str, float], ...] = ()
    tensorboard: bool = True  # TensorBoard event files in out_dir, beside metrics.jsonl
    init_from: Optional[str] = None  # fine-tuning: initial params from this run / HF checkpoint dir
    imports: Tuple[str, ...] = ()  # modules that register the run's architecture / loss (--import)

    def __post_init__(self):
        plain_scalars(self)
        object.__setattr__(self, "aux_loss_weights", _aux_weights(self.aux_loss_weights))
        object.__setattr__(self, "imports", module_names(self.imports))
        if isinstance(self.mesh, str) and not self.mesh.strip():  # blank: no mesh, as None
            object.__setattr__(self, "mesh", None)
        self.validate()

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["aux_loss_weights"] = dict(self.aux_loss_weights)
        out["imports"] = list(self.imports)
        return out

    def aux_weight(self, name: str) -> float:
        """Weight of the auxiliary loss ``name`` (1.0 when not listed)."""
        return dict(self.aux_loss_weights).get(name, 1.0)

    def validate(self) -> None:
        def integer(name, minimum):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

        def number(name, lo, hi, lo_open=False, hi_open=False):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            bad_lo = value <= lo if lo_open else value < lo
            bad_hi = value >= hi if hi_open else value > hi
            if bad_lo or bad_hi:  # inf is never in range: the check above refuses it
                interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open or math.isinf(hi) else ']'}"
                raise ValueError(f"{name} must be in {interval}, got {value!r}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "keep_checkpoints"):
            integer(name, 1)
        for name in ("eval_every", "eval_batches", "checkpoint_every", "seed"):
            integer(name, 0)
        if self.seed >= 2**32:  # PRNGKey keeps the low 32 bits: seed 2**32 would silently equal seed 0
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.warmup_steps is not None:
            integer("warmup_steps", 0)
        if self.schedule_steps is not None:
            integer("schedule_steps", 1)
        if self.warmup_steps is not None and self.warmup_steps > self.schedule_length:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, {self.schedule_length}] (the "
                             f"schedule's length, {'schedule_steps' if self.schedule_steps else 'steps'}): a "
                             "longer warmup never reaches lr")
        number("warmup_fraction", 0.0, 1.0)
        if not isinstance(self.tensorboard, bool):
            raise ValueError(f"tensorboard must be a bool (true/false), got {self.tensorboard!r}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ValueError(f"init_from must be a non-empty string or None, got {self.init_from!r}")
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
        for name in ("data", "tokenizer", "out_dir", "loss"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.mesh is not None:
            from .mesh import parse_mesh  # syntax check only; device count is checked at build time
            parse_mesh(self.mesh)

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def eval_micro_batches(self) -> int:
        """Micro-batches (``micro_batch_size`` rows) per evaluation: ``eval_batches * grad_accum``,
        i.e. ``eval_batches`` full batches whatever ``grad_accum`` is."""
        return self.eval_batches * self.grad_accum

    @property
    def schedule_length(self) -> int:
        """The number of updates the LR schedule is laid out over (``schedule_steps`` or ``steps``)."""
        return self.steps if self.schedule_steps is None else self.schedule_steps

    @property
    def warmup(self) -> int:
        """Warmup updates: ``warmup_steps``, else ``round(warmup_fraction * schedule_length)``."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(round(self.warmup_fraction * self.schedule_length))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Rebuild a config saved with ``to_dict`` (fields added since then take their defaults)."""
        check_fields(cls, values)
        return cls(**values)


def _aux_weights(value) -> Tuple[Tuple[str, float], ...]:
    """Normalise ``aux_loss_weights`` to a sorted tuple of ``(name, float weight)`` pairs."""
    if value is None:
        return ()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"aux_loss_weights: bad JSON {text!r}: {e}") from None
        else:
            pairs = []
            for part in text.split(","):
                name, sep, weight = part.partition("=")
                if not sep or not name.strip():
                    raise ValueError(f"aux_loss_weights: expected NAME=WEIGHT[,NAME=WEIGHT...], got {text!r}")
                pairs.append((name.strip(), weight.strip()))
            value = pairs
    try:
        items = list(value.items()) if isinstance(value, Mapping) else list(value)
    except TypeError:
        raise ValueError(f"aux_loss_weights must be a mapping {{name: weight}}, (name, weight) pairs or "
                         f"a 'name=w,name=w' string, got {value!r}") from None
    out = {}
    for item in items:
        try:
            name, weight = item
        except (TypeError, ValueError):
            raise ValueError(
                f"aux_loss_weights: expected (name, weight) pairs or a mapping, got {value!r}") from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"aux_loss_weights: names must be non-empty strings, got {name!r}")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(
                f"aux_loss_weights: weight of {name!r} must be a number, got {weight!r}") from None
        if isinstance(item[1], bool) or weight != weight or weight in (float("inf"), float("-inf")):
            raise ValueError(f"aux_loss_weights: weight of {name!r} must be a finite number, got {item[1]!r}")
        if name in out:
            raise ValueError(f"aux_loss_weights: {name!r} given twice")
        out[name] = weight
    return tuple(sorted(out.items()))


def module_names(value, name: str = "imports") -> Tuple[str, ...]:
    """``value`` (module names: a list / tuple, or a string of comma-separated names) as a tuple of
    dotted module names, duplicates dropped (first kept); ``ValueError`` naming ``name`` for
    anything else."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of module names (e.g. ['my_arch']), got {value!r}")
    out = []
    for module in value:
        if not isinstance(module, str) or not all(part.isidentifier() for part in module.split(".")):
            raise ValueError(f"{name}: {module!r} is not a module name (dotted Python identifiers, e.g. "
                             "my_pkg.my_arch)")
        if module not in out:
            out.append(module)
    return tuple(out)
