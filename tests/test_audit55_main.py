"""Audit 55 (lead): regression tests for carry-overs fixed this stop."""
import jax
import jax.numpy as jnp
import pytest

import jaxformers as jf
from jaxformers.training import TrainConfig


def _tiny():
    return jf.get_config("gpt", "tiny", vocab_size=300)


# ----------------------------------------------------------------------------- step_fn metrics
def test_a_step_fn_without_the_lr_metric_is_a_value_error_after_its_first_step(tmp_path):
    """A custom step_fn whose metrics lacked 'lr' raised a bare KeyError: 'lr' when the first
    row was logged; now a ValueError naming step_fn and the missing metric, at the first step."""
    from jaxformers.training import train
    from jaxformers.training.steps import train_step

    class NoLr:
        def __call__(self, *args, **kwargs):
            params, opt_state, metrics = train_step(*args, **kwargs)
            return params, opt_state, {k: v for k, v in metrics.items() if k != "lr"}

    tc = TrainConfig(steps=3, log_every=3, batch_size=2, seq_len=8, data="synthetic:copying",
                     eval_every=0, out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"step_fn=NoLr.*missing \['lr'\]"):
        train(_tiny(), tc, step_fn=NoLr(), progress=False)


# ----------------------------------------------------------------------------- lr's message
def test_a_negative_lr_message_gives_an_open_interval_at_inf():
    """lr=-1 said 'lr must be in (0.0, inf]', yet inf is refused: now '(0.0, inf)'."""
    with pytest.raises(ValueError, match=r"lr must be in \(0\.0, inf\),"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        TrainConfig(lr=float("inf"))


# ----------------------------------------------------------------------------- eval_step NaN
def test_eval_step_of_a_batch_of_weight_zero_adds_zero_even_for_a_nan_mean():
    """A custom loss whose mean over a batch of weight 0 is 0 / 0 = NaN made eval_step's total
    NaN (loss * 0), and so the whole evaluation's mean; a batch of weight 0 now adds 0."""
    from jaxformers.training.steps import eval_step

    def loss_fn(module, params, batch, rng):
        w = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(w) / jnp.sum(w), {"n_targets": jnp.sum(w)}

    batch = {"tokens": jnp.zeros((2, 8), jnp.int32), "loss_mask": jnp.zeros((2, 8), jnp.int32)}
    total, n = eval_step(None, loss_fn, None, batch)
    assert float(n) == 0.0 and float(total) == 0.0
    batch["loss_mask"] = jnp.ones((2, 8), jnp.int32)
    total, n = eval_step(None, loss_fn, None, batch)
    assert (float(total), float(n)) == (16.0, 16.0)

    def nan_loss(module, params, batch, rng):  # a NaN with targets stays NaN
        return jnp.float32(jnp.nan), {"n_targets": jnp.float32(4)}
    total, _ = eval_step(None, nan_loss, None, batch)
    assert jnp.isnan(total)
