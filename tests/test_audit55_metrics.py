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


def test_the_finiteness_check_of_a_checkpoint_between_log_steps_is_not_training_time(tmp_path, monkeypatch):
    """At a checkpoint step that is not a log step (a stop, stop_after, checkpoint_every not a
    multiple of log_every) the interval was closed only after the parameters' finiteness check,
    whose first call compiles a jitted function over the whole state: the summary's tokens_per_s /
    mfu counted it as training (952 tokens/s in a run whose logged rows said ~3400)."""
    import time

    from jaxformers.training import train, trainer
    from test_training import tiny_model

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the quick brown fox jumps over a lazy dog".split()
    (corpus / "d.txt").write_text(" ".join(np.random.default_rng(0).choice(words, size=3000)) + ".\n")
    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    check = trainer._all_finite

    def slow_check(*args):
        time.sleep(3.0)
        return check(*args)

    monkeypatch.setattr(trainer, "_all_finite", slow_check)
    tc = TrainConfig(steps=6, batch_size=4, seq_len=16, warmup_steps=1, data=str(corpus), out_dir=str(tmp_path / "run"),
                     log_every=5, eval_every=0, eval_batches=0, checkpoint_every=0, tensorboard=False)
    summary = train(tiny_model(), tc, progress=False, stop_after=3)  # step 3: a checkpoint, no log
    assert summary["final_step"] == 3
    train_time = 3 * tc.tokens_per_step / summary["tokens_per_s"]
    assert train_time < 3.0, train_time  # the check's 3 s are not in it


@pytest.mark.parametrize("model", ["mamba", "hybrid"])
def test_a_split_projection_bias_is_not_weight_decayed(model):
    """With proj_bias=True Mamba's in_proj bias is [2, d_inner] (logical axes (None, mlp)): the shape
    rule decayed it, though biases are never decayed (mamba_ssm's in_proj bias is 1-D)."""
    import jax
    import jaxformers as jf
    from jaxformers.training.optim import decay_mask
    from jaxformers.training.steps import abstract_params

    config = jf.get_config(model, "tiny", n_layer=2, d_model=32, vocab_size=64, proj_bias=True)
    abstract, specs = abstract_params(jf.build(config))
    mask = decay_mask(specs, abstract, *config.weight_decay_names())
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    shapes = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    biases = {k: v for k, v in got.items() if k.endswith("['bias']")}
    assert any(len(shapes[k]) == 2 for k in biases), shapes  # the split bias is there
    assert not any(biases.values()), biases
    assert all(v for k, v in got.items() if k.endswith("['kernel']") and "proj" in k)  # kernels still are
    assert decay_mask({"bias": None}, {"bias": jax.ShapeDtypeStruct((2, 3), "float32")}, (), ("bias",)) == {
        "bias": True}  # a family may still name it for decay


def test_the_human_summary_blames_the_device_for_a_missing_mfu_only_when_there_is_a_throughput():
    """A run that trained nothing (and had no earlier summary to keep) has no tokens/s: the CLI
    said "MFU n/a (no peak FLOP/s known for NVIDIA H100 80GB HBM3)", a device whose peak is known."""
    from experiments.train import human_summary

    base = dict(run_dir="/tmp/r", model="gpt", final_step=5, steps=5, trained_steps=0, finished=True,
                wall_s=1.0, val_loss=None, val_ppl=None, train_loss=None, device_kind=H100.device_kind)
    text = human_summary({**base, "tokens_per_s": None, "mfu": None})
    assert "n/a tokens/s, MFU n/a\n" in text and "no peak" not in text
    cpu = human_summary({**base, "tokens_per_s": 1000.0, "mfu": None, "device_kind": "cpu"})
    assert "1,000 tokens/s, MFU n/a (no peak FLOP/s known for cpu)" in cpu


def test_a_step_fn_returning_a_metric_that_is_not_a_scalar_is_a_value_error_at_the_first_step(tmp_path, monkeypatch):
    """A vector metric passed the first step's check and crashed the first logged step with numpy's
    "TypeError: only 0-dimensional arrays can be converted to Python scalars"."""
    import jax.numpy as jnp

    from jaxformers.training import steps, train
    from test_training import tiny_model

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "d.txt").write_text(" ".join(np.random.default_rng(0).choice("a b c d e".split(), size=3000)) + ".\n")
    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))

    def per_layer_step(*args, **kw):
        params, opt_state, metrics = steps.train_step(*args, **kw)
        return params, opt_state, {**metrics, "per_layer": jnp.zeros(3)}

    tc = TrainConfig(steps=4, batch_size=4, seq_len=16, warmup_steps=1, data=str(corpus), out_dir=str(tmp_path / "run"),
                     log_every=2, eval_every=0, eval_batches=0, tensorboard=False)
    with pytest.raises(ValueError, match=r"not scalars: per_layer of shape \(3,\)"):
        train(tiny_model(), tc, progress=False, step_fn=per_layer_step)
