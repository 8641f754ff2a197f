"""Audit 46, training: regression tests from a mutation pass over stop 45's additions (the stop
vote of several processes, the finiteness check at checkpoints, the compile-cache switch for
multi-process CPU runs, weight-decay groups, run.yaml paths).  Unit-level, tiny shapes, CPU."""
from __future__ import annotations

import signal

import jax
import jax.numpy as jnp
import pytest

import jaxformers as jf
from jaxformers.training import TrainConfig, TrainingDiverged, trainer
from jaxformers.training import mesh as mesh_lib
from jaxformers.training.steps import Program
from test_audit44_resume import CACHE, _config, _tiny_gpt, corpus, nan_from_step_5  # noqa: F401 (fixtures)


# ----------------------------------------------------------------------------- _StopVote
def _multi_vote(monkeypatch):
    """A :class:`trainer._StopVote` taking the several-process path (its collective runs over this
    process's devices: the maximum of one process's signal is that signal)."""
    with monkeypatch.context() as m:
        m.setattr(jax, "process_count", lambda: 2)
        vote = trainer._StopVote()
    assert vote.multi
    return vote


def test_stop_vote_of_several_processes_is_read_one_step_later(monkeypatch):
    vote = _multi_vote(monkeypatch)
    assert vote.agreed(None) is None  # the first step: nothing read yet
    assert vote.agreed(signal.SIGTERM) is None  # cast now, read after the next step
    assert vote.agreed(None) == signal.SIGTERM  # every process stops after this same step
    assert vote.agreed(None) is None


def test_stop_vote_final_reads_at_once(monkeypatch):
    vote = _multi_vote(monkeypatch)
    assert vote.agreed(None) is None
    assert vote.final(None) is None
    assert vote.final(signal.SIGINT) == signal.SIGINT  # a signal during the last checkpoint


def test_stop_vote_of_one_process_is_the_local_signal():
    vote = trainer._StopVote()
    assert not vote.multi
    assert vote.agreed(signal.SIGTERM) == signal.SIGTERM and vote.final(None) is None


# ----------------------------------------------------------------------------- finiteness
def test_overflow_in_the_optimizer_state_alone_is_not_checkpointed(corpus, tmp_path, monkeypatch):
    """The parameters and the loss are finite, Adam's first moment is not (an overflowed
    gradient): checkpoint step 6 refuses to save that state (resuming from it would make the
    parameters NaN at the first update)."""
    real = Program.train_step

    def overflow(self, params, opt_state, batch, step, rng):
        params, opt_state, metrics = real(self, params, opt_state, batch, step, rng)
        if step == 5:
            opt_state = jax.tree.map(lambda x: x * jnp.inf if jnp.ndim(x) >= 1 else x, opt_state)
        return params, opt_state, metrics

    monkeypatch.setattr(Program, "train_step", overflow)
    tc = TrainConfig(steps=10, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=0, data=corpus,
                     out_dir=str(tmp_path / "r"), eval_every=0, eval_batches=1, log_every=3,
                     checkpoint_every=2, keep_checkpoints=1, tensorboard=False)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 6: parameters or optimizer state = not finite"
                                               r".*step 4, is kept"):
        trainer.train(_tiny_gpt(), tc, progress=False, cache=CACHE)


# ----------------------------------------------------------------------------- compile cache
@pytest.fixture
def compile_cache_setting():
    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_enable_compilation_cache", saved[1])


def test_compile_cache_without_a_directory_is_left_alone(monkeypatch, compile_cache_setting):
    """No cache directory: jax caches nothing, so there is nothing to turn off (and no warning
    naming a ``None`` cache)."""
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_enable_compilation_cache", True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert not mesh_lib._no_compile_cache_on_cpu()
    assert jax.config.jax_enable_compilation_cache


@pytest.mark.parametrize("launch_env", [True, False])
def test_compile_cache_off_when_the_caller_initialized_jax_distributed(monkeypatch, launch_env):
    """``jax.distributed.initialize`` called by the user before ``train``: jax runs distributed
    (``True``) and the cache is turned off all the same, also when no launch variable describes
    the launch (the caller passed ``jax.distributed.initialize`` its own arguments; was: ``False``,
    the cache left on)."""
    calls = []
    monkeypatch.setattr(mesh_lib, "_INITIALIZED", False)
    monkeypatch.setattr(mesh_lib, "distributed_settings", lambda env: ("test", {}) if launch_env else None)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("initialized twice"))
    monkeypatch.setattr(mesh_lib, "_no_compile_cache_on_cpu", lambda: calls.append(1) or True)
    assert mesh_lib.maybe_initialize_distributed()
    assert calls == [1]


# ----------------------------------------------------------------------------- weight-decay groups on resume
def test_resume_with_a_config_naming_weight_decay_groups_keeps_the_files_value(tmp_path):
    """``--config FILE --resume`` where FILE names ``weight_decay_groups``: the file's value is
    used (and a change from the run's is then refused by ``train``), never silently replaced by
    the saved run's; only a file without the field gets the run's groups."""
    import json

    import yaml

    from experiments import train as train_cli
    from jaxformers.training.rundir import CONFIG_FILE

    run = tmp_path / "run"
    run.mkdir()
    model = jf.get_config("cotformer", "tiny", vocab_size=64, weight_decay_groups="shape").to_dict()
    tc = TrainConfig(steps=4, batch_size=2, seq_len=16, data="synthetic:copying", out_dir=str(run)).to_dict()
    (run / CONFIG_FILE).write_text(json.dumps({"model": model, "train": tc}))
    overrides = {k: v for k, v in model.items() if k != "model"}
    file = tmp_path / "new.yaml"
    file.write_text(yaml.safe_dump({"model": "cotformer", "overrides": {**overrides, "weight_decay_groups": "nanogpt"},
                                    "train": tc}))
    args = train_cli._parser().parse_args(["--config", str(file), "--resume", "--out", str(run)])
    assert train_cli.build_configs(args)[0].weight_decay_groups == "nanogpt"
    args = train_cli._parser().parse_args(["--config", str(file), "--resume", "--out", str(run),
                                           "--set", "weight_decay_groups=shape"])
    assert train_cli.build_configs(args)[0].weight_decay_groups == "shape"


# ----------------------------------------------------------------------------- run.yaml paths
def test_run_yaml_paths_that_do_not_exist_here_are_kept_as_given(tmp_path, monkeypatch):
    """``_absolute_paths`` makes absolute only the local paths that exist: a missing ``hf:DIR``
    tokenizer folder or ``init_from`` (e.g. a saved config read on another machine) stays as
    written, not rebased onto the current directory."""
    from jaxformers.training.rundir import _absolute_paths

    monkeypatch.chdir(tmp_path)
    out = _absolute_paths({"tokenizer": "hf:gone_tok", "init_from": "gone_run", "data": "synthetic:copying"})
    assert out["tokenizer"] == "hf:gone_tok" and out["init_from"] == "gone_run"


def test_divergence_at_a_checkpoint_step_that_is_not_logged(corpus, tmp_path, nan_from_step_5):
    """A NaN loss first seen at a checkpoint step that logs nothing (log_every=7): the step is
    checked all the same and not saved; checkpoint 4 stays the newest."""
    run = tmp_path / "r"
    with pytest.raises(TrainingDiverged, match=r"diverged at step 6: loss = nan.*step 4, is kept"):
        trainer.train(_tiny_gpt(), _config(corpus, run, log_every=7), progress=False, cache=CACHE)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]


@pytest.mark.parametrize("stop_after", [True, False, 0, 1.0])
def test_stop_after_must_be_a_positive_int(stop_after, tmp_path):
    """``stop_after=True`` was taken as 1 (a bool is an int): the run stopped after one step."""
    tc = TrainConfig(steps=4, batch_size=2, seq_len=16, data="synthetic:copying", out_dir=str(tmp_path / "r"))
    with pytest.raises(ValueError, match="stop_after must be a positive int"):
        trainer.train(_tiny_gpt(), tc, stop_after=stop_after, progress=False)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- _StopRequest
def test_stop_request_first_signal_is_recorded_a_second_falls_through():
    """The first SIGTERM asks for "checkpoint, then stop"; a second one gives up waiting and goes
    to the handler that was there before (e.g. the default: the process dies at once); the
    previous handlers are back after ``restore``."""
    import os

    seen = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        mine = signal.getsignal(signal.SIGTERM)
        stop = trainer._StopRequest()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]  # the earlier handler ran
        assert signal.getsignal(signal.SIGTERM) is mine
        stop.restore()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
