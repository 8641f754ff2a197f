"""Audit 44, "nothing lost on interruption": a stop signal that lands after the last step's read
of it (during the run's final evaluation or checkpoint) was swallowed -- ``train`` returned
``stopped_by_signal: None`` and an experiment went on to its next run (with ``checkpoint_every=0``,
a run then lost whole to the SIGKILL that follows a time limit's SIGTERM).

A run whose loss or gradient norm becomes NaN / infinite stops (``TrainingDiverged``) before it
checkpoints that state: before, it warned and trained on NaN to its last step, checkpointing NaN
parameters that ``keep_checkpoints`` rotation let replace every finite checkpoint."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.training import CompileCache, TrainConfig, TrainingDiverged, load_run, train, trainer
from jaxformers.training.steps import Program

CACHE = CompileCache(max_entries=2)


def _tiny_gpt():
    return jf.get_config("gpt", "tiny", vocab_size=257, n_layer=1, d_model=32, n_head=2, max_seq_len=32)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return str(path)


@pytest.fixture
def signal_in_last_eval(monkeypatch):
    """SIGTERM to this process from inside every evaluation (a time limit during the final one)."""
    real = trainer.eval_loss

    def evaluate(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(trainer, "eval_loss", evaluate)


def test_a_signal_during_the_final_evaluation_is_reported(corpus, tmp_path, signal_in_last_eval):
    tc = TrainConfig(steps=2, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=0, data=corpus, out_dir=str(tmp_path / "r"),
                     eval_every=0, eval_batches=1, log_every=1)
    summary = train(_tiny_gpt(), tc, progress=False, cache=CACHE)
    assert summary["finished"] and summary["final_step"] == 2
    assert summary["stopped_by_signal"] == signal.SIGTERM  # was None: the signal was lost
    assert summary["versions"]["jax"] == jax.__version__  # the summary.json's, returned too


def test_an_experiment_stops_on_a_signal_at_its_runs_last_step(corpus, tmp_path, signal_in_last_eval):
    """``train_fresh`` returned the finished run and the experiment started its next one; now it
    stops (``SystemExit``), and ``--reuse`` keeps the finished run."""
    from experiments.common import check_finished, check_reuse, train_fresh

    kw = dict(seed=0, data=corpus, log_points=2,
              train_kw=dict(steps=2, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=0, eval_every=0,
                            eval_batches=1))
    with pytest.raises(SystemExit, match="finished .*then signal 15 stopped the experiment"):
        train_fresh("a", _tiny_gpt(), tmp_path, tag="t", cache=CACHE, **kw)
    assert check_reuse(tmp_path, [("a", _tiny_gpt())], **kw) == ["a"]
    # a signal at the last step itself (finished, stopped_by_signal set) stops it too; none does not
    with pytest.raises(SystemExit, match="then signal 2 stopped"):
        check_finished({"finished": True, "final_step": 5, "steps": 5, "stopped_by_signal": 2}, "b", "t")
    check_finished({"finished": True, "final_step": 5, "steps": 5, "stopped_by_signal": None}, "b", "t")


@pytest.fixture
def nan_from_step_5(monkeypatch):
    """From the 5th step on, the update makes every parameter NaN and the step's loss is NaN."""
    real = Program.train_step

    def poisoned(self, params, opt_state, batch, step, rng):
        params, opt_state, metrics = real(self, params, opt_state, batch, step, rng)
        if step >= 4:
            params = jax.tree.map(lambda x: x * jnp.nan, params)
            metrics = dict(metrics, loss=jnp.float32(jnp.nan))
        return params, opt_state, metrics

    monkeypatch.setattr(Program, "train_step", poisoned)


def _config(corpus, out, **kw):
    return TrainConfig(**{**dict(steps=10, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=0, data=corpus,
                                 out_dir=str(out), eval_every=0, eval_batches=1, log_every=3,
                                 checkpoint_every=2, keep_checkpoints=1, tensorboard=False), **kw})


def test_divergence_stops_before_checkpointing_nan(corpus, tmp_path, nan_from_step_5):
    run = tmp_path / "r"
    # step 5 is neither logged nor checkpointed; step 6 is a checkpoint step: checked, not saved
    with pytest.raises(TrainingDiverged, match=r"diverged at step 6: loss = nan.*step 4, is kept"):
        train(_tiny_gpt(), _config(corpus, run), progress=False, cache=CACHE)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ["4"], kept  # was ["10"]: NaN parameters, the finite ones pruned
    _, _, params = load_run(run)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) <= 6


def test_divergence_on_a_logged_step_and_from_the_cli(corpus, tmp_path, nan_from_step_5, capsys):
    from experiments import train as train_cli

    run = tmp_path / "cli"
    code = train_cli.main(["--model", "gpt", "--preset", "tiny", "--data", corpus, "--out", str(run),
                           "--steps", "10", "--batch-size", "2", "--seq-len", "16", "--quiet",
                           "--set", "n_layer=1", "--set", "d_model=32", "--set", "n_head=2",
                           "--train-set", "log_every=5", "--train-set", "checkpoint_every=4",
                           "--train-set", "eval_every=0", "--train-set", "eval_batches=1",
                           "--train-set", "tensorboard=false", "--no-compile-cache"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "error: training diverged at step 5: loss = nan" in err and "step 4, is kept" in err
    assert "Traceback" not in err


def test_divergence_in_the_update_alone_is_not_checkpointed(corpus, tmp_path, monkeypatch):
    """The 6th step's loss is finite but its update makes the parameters NaN: checkpoint step 6
    refuses to save them (was: saved, then found by the NaN loss of step 7 at step 8, with the
    NaN checkpoint 6 kept as the newest)."""
    real = Program.train_step

    def overflow(self, params, opt_state, batch, step, rng):
        params, opt_state, metrics = real(self, params, opt_state, batch, step, rng)
        if step == 5:
            params = jax.tree.map(lambda x: x * jnp.inf, params)
        return params, opt_state, metrics

    monkeypatch.setattr(Program, "train_step", overflow)
    run = tmp_path / "r"
    with pytest.raises(TrainingDiverged, match=r"diverged at step 6: parameters or optimizer state = not finite"
                                               r".*step 4, is kept"):
        train(_tiny_gpt(), _config(corpus, run), progress=False, cache=CACHE)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ["4"], kept
