"""Audit 55 (what a run reports about itself, and the optimizer): regression tests."""
import json
import types

import numpy as np
import pytest

from jaxformers.training import TrainConfig
from jaxformers.training.metrics import mfu, plot_losses
from jaxformers.training.optim import lr_at

H100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_lr_at_refuses_a_step_that_is_not_an_update_count(bad):
    """lr_at(tc, -1) was 0.0 and lr_at(tc, 2.5) a value between two updates, without a word."""
    tc = TrainConfig(steps=10, lr=1.0, warmup_steps=4)
    with pytest.raises(ValueError, match="lr_at: step must be"):
        lr_at(tc, bad)
    assert lr_at(tc, np.int64(3)) == pytest.approx(1.0) and lr_at(tc, 0) == pytest.approx(0.25)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_mfu_refuses_a_device_count_that_is_not_a_positive_int(bad):
    """n_devices=0 was a ZeroDivisionError, -1 a negative MFU, 2.5 a fraction of a device."""
    with pytest.raises(ValueError, match="mfu: n_devices must be"):
        mfu(6e9, 1e5, n_devices=bad, device=H100)
    assert mfu(6e9, 1e5, n_devices=np.int64(2), device=H100) == pytest.approx(6e14 / (2 * 989e12))


@pytest.mark.parametrize("name, args", [("tokens_per_s", (6e9, -5.0)), ("tokens_per_s", (6e9, float("nan"))),
                                        ("flops_per_token", (-6e9, 1e5)),
                                        ("flops_per_token", (float("inf"), 1e5))])
def test_mfu_refuses_a_negative_or_non_finite_rate(name, args):
    """A negative throughput gave a negative MFU, NaN a NaN MFU."""
    with pytest.raises(ValueError, match=f"mfu: {name} must be a finite number >= 0"):
        mfu(*args, n_devices=1, device=H100)
    assert mfu(6e9, 0, n_devices=1, device=H100) is None  # no throughput: nothing to report


def test_plot_losses_leaves_out_values_that_are_not_numbers(tmp_path):
    """A hand-edited "lr": "a" crashed plot_losses (matplotlib's ScalarFormatter); a string loss
    was drawn as a category axis."""
    rows = [{"step": 1, "loss": 3.0, "lr": "a"}, {"step": 2, "loss": "x", "lr": 0.1},
            {"step": 2, "val_loss": None}, {"step": 3, "loss": 2.0, "lr": None, "val_loss": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_losses(tmp_path) == tmp_path / "loss.png"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": None, "lr": True}) + "\n")
    assert plot_losses(tmp_path) is None  # nothing numeric to draw
