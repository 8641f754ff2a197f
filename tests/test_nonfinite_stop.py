"""A run whose loss or gradient norm becomes NaN / infinite stops (``TrainingDiverged``) before it
checkpoints that state: before, it warned and trained on NaN to its last step, checkpointing NaN
parameters that ``keep_checkpoints`` rotation let replace every finite checkpoint."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.training import CompileCache, TrainConfig, TrainingDiverged, load_run, train
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
