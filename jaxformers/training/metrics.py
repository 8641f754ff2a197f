"""Throughput, MFU, loss plots and the progress display of a training run.

* :func:`peak_flops` -- dense bf16 peak FLOP/s of a device (``None`` if unknown, e.g. CPU);
* :func:`model_flops_per_token` -- training FLOPs per token of a model config
  (the config's ``flops_per_token`` method at the context the model runs; see below);
* :func:`mfu` -- model FLOPs utilisation from tokens/s;
* :class:`Throughput` -- tokens/s over the training intervals (evaluation and
  checkpoint time excluded);
* :func:`plot_losses` -- ``loss.png`` (losses, and the learning rate on a second axis) from
  ``metrics.jsonl``;
* :class:`Progress` -- a tqdm bar, one line per logged row, or nothing.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from .rundir import PLOT_FILE, metrics_step, read_metrics

__all__ = ["PEAK_FLOPS", "Progress", "Throughput", "mfu", "model_flops_per_token", "peak_flops",
           "plot_losses"]

# Dense bf16 peak FLOP/s per device, keyed by a lower-case substring of ``device.device_kind``
# (first match wins, so more specific names come first).
PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),  # NVL cards: 1671 TFLOP/s with sparsity, half of it dense
    ("h200 nvl", 835e12),
    ("h100", 989e12),
    ("gh200", 989e12),
    ("h200", 989e12),
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
    """Peak dense bf16 FLOP/s of one device (``None`` if unknown, e.g. CPU), from its
    ``device_kind`` (:data:`PEAK_FLOPS`).  MFU is measured against this peak whatever the
    compute dtype (a float32 run is compared with the bf16 peak)."""
    device = jax.devices()[0] if device is None else device
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return None


def model_flops_per_token(config, seq_len: int, params=None, loss_fn=None) -> float:
    """Training FLOPs per token of ``config`` at context ``seq_len``: ``config.flops_per_token``
    (each weight counted as often as a token uses it; ``params``, a params tree abstract or not,
    saves building the model).  With a ``loss_fn`` whose ``model_positions(config, seq_len)``
    is ``T' > seq_len`` (the model runs ``T'`` positions per window, e.g. with landmarks
    inserted): ``flops_per_token(T') * T' / seq_len``, per token of the data."""
    positions = getattr(loss_fn, "model_positions", None)
    t = seq_len if positions is None else int(positions(config, seq_len))
    return float(config.flops_per_token(t, params)) * t / seq_len


def mfu(flops_per_token: float, tokens_per_s: Optional[float], n_devices: Optional[int] = None,
        device=None) -> Optional[float]:
    """``flops_per_token * tokens_per_s / (peak * n_devices)``; ``None`` without a known peak (or
    without a throughput).  ``ValueError`` naming ``n_devices`` unless it is an int >= 1, naming
    ``tokens_per_s`` / ``flops_per_token`` for a negative or non-finite value."""
    from ..utils import int_arg

    if n_devices is not None:
        n_devices = int_arg("n_devices", n_devices, lo=1, where="mfu")
    for name, value in (("flops_per_token", flops_per_token), ("tokens_per_s", tokens_per_s)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                  or not math.isfinite(value) or value < 0):
            raise ValueError(f"mfu: {name} must be a finite number >= 0, got {value!r}")
    peak = peak_flops(device)
    if not peak or not tokens_per_s:
        return None
    n_devices = jax.device_count() if n_devices is None else n_devices
    return flops_per_token * tokens_per_s / (peak * n_devices)


class Throughput:
    """Training tokens/s measured over intervals that end at log steps (and before evaluations /
    checkpoints, whose time is excluded by :meth:`restart`)."""

    def __init__(self, start_step: int, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.train_time = 0.0
        self.train_tokens = 0
        self._t0, self._step0 = time.perf_counter(), start_step

    def end_interval(self, done: int, block_on=None) -> Optional[float]:
        """Close the interval at step ``done`` (after ``block_until_ready(block_on)``);
        returns its tokens/s (``None`` for an empty interval).  ``ValueError`` for a step before
        the interval's start (its tokens would be subtracted from the totals)."""
        if done < self._step0:
            raise ValueError(f"done={done} is before the interval's start step {self._step0}")
        if block_on is not None:
            jax.block_until_ready(block_on)
        now = time.perf_counter()
        dt, n = now - self._t0, done - self._step0
        self.train_time += dt
        self.train_tokens += n * self.tokens_per_step
        self._t0, self._step0 = now, done
        return (n * self.tokens_per_step / dt) if dt > 0 and n > 0 else None

    def restart(self) -> None:
        """Start the next interval now (time since the last :meth:`end_interval` is not training)."""
        self._t0 = time.perf_counter()

    @property
    def tokens_per_s(self) -> Optional[float]:
        return self.train_tokens / self.train_time if self.train_time > 0 else None


def plot_losses(run_dir) -> Optional[Path]:
    """Write ``loss.png`` (train and val loss vs step) from ``metrics.jsonl`` (rows without a
    numeric ``step``, and values that are not numbers -- ``null``, a string, e.g. hand-edited --
    are left out)."""
    rows = [r for r in read_metrics(run_dir) if metrics_step(r) is not None]

    def points(key):
        return [(r["step"], r[key]) for r in rows
                if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]

    train, val = points("loss"), points("val_loss")
    if not train and not val:
        return None
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lrs = points("lr")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    handles = []
    if train:
        handles += ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        handles += ax.plot(*zip(*val), "o-", label="val", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/target)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    if lrs:  # the learning rate on a second axis
        ax_lr = ax.twinx()
        handles += ax_lr.plot(*zip(*lrs), color="tab:gray", ls="--", lw=1.0, label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.legend(handles=handles, labels=[h.get_label() for h in handles])
    fig.tight_layout()
    out = Path(run_dir) / PLOT_FILE
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``mode``: ``None`` = a tqdm bar if stderr is a terminal, else one line per logged row;
    ``True`` = bar; ``False`` = silent."""

    BAR_KEYS = ("loss", "val_loss", "lr", "tokens_per_s", "mfu")

    def __init__(self, mode, total: int, initial: int):
        self.bar = None
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
        self.total, self.initial, self.current = total, initial, initial
        self._t0 = time.perf_counter()

    @property
    def active(self) -> bool:
        """Whether anything is shown (a bar or lines)."""
        return self.bar is not None or self.lines

    def timing(self) -> str:
        """``"elapsed=12s eta=30s"`` from the steps done since the start (lines mode)."""
        elapsed = time.perf_counter() - self._t0
        done = self.current - self.initial
        eta = (self.total - self.current) * elapsed / done if done > 0 else None
        return f"elapsed={_hms(elapsed)}" + ("" if eta is None else f" eta={_hms(eta)}")

    def update(self, n: int = 1) -> None:
        self.current += n
        if self.bar is not None:
            self.bar.update(n)

    def message(self, row: dict) -> None:
        if self.bar is not None:
            self.postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                                 if (k in self.BAR_KEYS or k.startswith("aux/")) and v is not None})
            self.bar.set_postfix(self.postfix, refresh=False)
        elif self.lines:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            if "loss" in row:  # a training row: how long so far, how long to go (the bar shows its own)
                text += " " + self.timing()
            print(text, file=sys.stderr, flush=True)

    def info(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.lines:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
