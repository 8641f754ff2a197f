"""Audit 44, "nothing lost on interruption": a stop signal that lands after the last step's read
of it (during the run's final evaluation or checkpoint) was swallowed -- ``train`` returned
``stopped_by_signal: None`` and an experiment went on to its next run (with ``checkpoint_every=0``,
a run then lost whole to the SIGKILL that follows a time limit's SIGTERM)."""
import os
import signal

import pytest

import jaxformers as jf
from jaxformers.training import CompileCache, TrainConfig, train, trainer

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
    import jax
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
