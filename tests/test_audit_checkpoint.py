"""Audit regression tests of checkpoints / resume: an interrupted evaluation keeps its step's
checkpoint (the checkpoint is saved first, the resume evaluates again), a stop signal at an
evaluation step checkpoints without evaluating, orbax staging directories of killed saves are
moved aside, ``init_from`` names the parameters a tree mismatch is about."""
import os
import shutil
import signal

import pytest

import jaxformers as jf
from jaxformers.training import CompileCache, read_metrics, train, trainer
from jaxformers.training.checkpoint import MANIFEST, Checkpointer
from jaxformers.training.init_from import load_params
from jaxformers.training.steps import abstract_params

from test_training import env, tiny_model  # noqa: F401 - env: the module's corpus fixture
from test_training import tiny_train as _tiny_train
from test_train_ux import tfevents

CACHE = CompileCache(max_entries=8)


def tiny_train(env, out, **kw):
    """4 steps, evaluations and checkpoints every 2."""
    return _tiny_train(env, out, **{**dict(steps=4, eval_every=2, checkpoint_every=2), **kw})


def rows(run_dir):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def ref_run(env):
    out = env["root"] / "audit_ckpt_ref"
    train(tiny_model(), tiny_train(env, out), progress=False, cache=CACHE)
    return out


def test_an_interrupted_evaluation_keeps_the_checkpoint_of_its_step(env, ref_run, monkeypatch):
    """Ctrl-C / an error / a preemption deadline during the evaluation of a checkpoint step used to
    lose that checkpoint (the evaluation ran first); now it is saved, and the resume evaluates the
    step again: the curve is the uninterrupted one, without duplicated rows."""
    out = env["root"] / "audit_eval_interrupted"
    real, calls = trainer.eval_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the evaluation of step 4 (step 2's is the first)
            raise KeyboardInterrupt("during evaluation")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "eval_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), tiny_train(env, out), progress=False, cache=CACHE)
    monkeypatch.setattr(trainer, "eval_loss", real)
    assert Checkpointer(out).complete_steps() == [2, 4]
    summary = train(tiny_model(), tiny_train(env, out), resume=True, progress=False, cache=CACHE)
    assert summary["resumed_from"] == 4 and summary["finished"]
    assert rows(out) == rows(ref_run)
    assert summary["val_loss"] == read_metrics(ref_run)[-1]["val_loss"]
    # a resume from a step whose evaluation row exists rewrites it, once
    run = env["root"] / "audit_eval_again"
    train(tiny_model(), tiny_train(env, run), progress=False, cache=CACHE, stop_after=2)
    train(tiny_model(), tiny_train(env, run), resume=True, progress=False, cache=CACHE)
    assert rows(run) == rows(ref_run)


def test_a_stop_signal_at_an_evaluation_step_checkpoints_first(env, ref_run, monkeypatch):
    """SIGTERM at an evaluation step: the checkpoint is written without waiting for the evaluation
    (a preemption deadline), which the resume runs."""
    out = env["root"] / "audit_stop_at_eval"
    seen = []
    monkeypatch.setattr(trainer._StopVote, "agreed",
                        lambda self, signum: seen.append(1) or (signal.SIGTERM if len(seen) == 2 else None))
    summary = train(tiny_model(), tiny_train(env, out), progress=False, cache=CACHE)
    monkeypatch.undo()
    assert summary["stopped_by_signal"] == signal.SIGTERM and summary["final_step"] == 2
    assert Checkpointer(out).complete_steps() == [2]
    assert not [r for r in read_metrics(out) if "val_loss" in r]
    summary = train(tiny_model(), tiny_train(env, out), resume=True, progress=False, cache=CACHE)
    assert summary["resumed_from"] == 2 and rows(out) == rows(ref_run)


def test_orbax_staging_dirs_of_killed_saves_are_moved_aside(env, tmp_path):
    """A save killed before orbax renamed it into place leaves ``<step>.orbax-checkpoint-tmp-*``
    (a full checkpoint's size on disk): it is moved to checkpoints.incomplete/ like an incomplete
    step directory, on resume and on a fresh start."""
    ckpt = Checkpointer(tmp_path / "run")
    staging = ckpt.directory / "6.orbax-checkpoint-tmp-1234"
    (staging / "params").mkdir(parents=True)
    (ckpt.directory / "3").mkdir()  # an incomplete step directory (no manifest)
    assert ckpt.unfinished_saves() == [staging.name] and ckpt.incomplete_steps() == [3]
    moved = ckpt.quarantine_incomplete()
    assert len(moved) == 2 and sorted(os.listdir(ckpt.directory)) == []
    assert sorted(p.split("-")[0] for p in os.listdir(tmp_path / "run" / "checkpoints.incomplete")) == \
        ["3", "6.orbax"]
    # a fresh run into a directory left with only a staging directory
    out = env["root"] / "audit_fresh_staging"
    (out / "checkpoints" / "2.orbax-checkpoint-tmp-99").mkdir(parents=True)
    train(tiny_model(), tiny_train(env, out), progress=False, cache=CACHE, stop_after=2)
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]
    assert (out / "checkpoints" / "2" / MANIFEST).is_file()


def test_init_from_tree_mismatch_names_the_parameters(ref_run):
    abstract, _ = abstract_params(jf.build(tiny_model(n_layer=2)))
    with pytest.raises(ValueError, match=r"missing from the source: \['blocks_1'\]") as info:
        load_params(ref_run, abstract)
    assert "PyTreeDef" not in str(info.value) and len(str(info.value)) < 600


def test_resume_over_a_changed_corpus_warns(env, caplog):
    """The same data spec over a changed corpus (same path, other content) continues on another
    data path: a warning naming the dataset's fingerprint, as for a changed seed."""
    corpus = env["root"] / "audit_corpus"
    shutil.copytree(env["corpus"], corpus)
    out = env["root"] / "audit_changed_corpus"
    tc = tiny_train(env, out, data=str(corpus))
    train(tiny_model(), tc, progress=False, cache=CACHE, stop_after=2)
    with caplog.at_level("WARNING", logger="jaxformers"):
        train(tiny_model(), tc, resume=True, progress=False, cache=CACHE, stop_after=3)
    assert "another data path" not in caplog.text  # unchanged: no warning
    with open(corpus / "doc0.txt", "a") as f:
        f.write("a paragraph that was not in the corpus when the run started. " * 20)
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxformers"):
        train(tiny_model(), tc, resume=True, progress=False, cache=CACHE)
    assert "another data path" in caplog.text and "dataset corpus_sha256" in caplog.text


def _tensorboard_scalars(run_dir):
    """``{tag: {step: value}}`` as TensorBoard reads the event files of a run directory (in file
    order; a ``SessionLog.START`` event at step ``s`` -- tensorboardX's ``purge_step`` -- drops
    every event at steps >= ``s`` read before it)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for event in tfevents(run_dir):
        if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
            out = {tag: {s: v for s, v in vals.items() if s < event.step} for tag, vals in out.items()}
        for value in event.summary.value:
            out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_a_fresh_start_over_an_earlier_start_drops_its_tensorboard_events(env):
    """A run killed before its first checkpoint and started again (fresh, here with another lr)
    resets metrics.jsonl; its TensorBoard events of the earlier start must go too."""
    out = env["root"] / "audit_tb_fresh"
    train(tiny_model(), tiny_train(env, out, tensorboard=True), progress=False, cache=CACHE, stop_after=3)
    shutil.rmtree(out / "checkpoints")  # as if killed before its first checkpoint completed
    train(tiny_model(), tiny_train(env, out, lr=1e-3, tensorboard=True), progress=False, cache=CACHE,
          stop_after=1)
    scalars = _tensorboard_scalars(out)
    assert scalars["train/loss"] == {1: pytest.approx(read_metrics(out)[0]["loss"], rel=1e-6)}
    assert not scalars.get("val/loss")


def test_a_finished_run_resumes_without_evaluating_again(env, ref_run, monkeypatch):
    """The last checkpoint of a run records its evaluation as due (saved before it ran); the
    evaluation row is there, so a resume of the finished run evaluates nothing and keeps the rows."""
    run = env["root"] / "audit_finished_again"
    shutil.copytree(ref_run, run)
    before = rows(run)
    calls = []
    real = trainer.eval_loss
    monkeypatch.setattr(trainer, "eval_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    summary = train(tiny_model(), tiny_train(env, run), resume=True, progress=False, cache=CACHE)
    assert summary["trained_steps"] == 0 and calls == [] and rows(run) == before


class _MyStep:
    """A step function: ``train_step`` under another name (its state and objective the same)."""

    def __call__(self, *args, **kwargs):
        from jaxformers.training.steps import train_step
        return train_step(*args, **kwargs)


def test_resume_with_another_step_function_is_refused(env, ref_run):
    """A run trained with a ``step_fn`` (DoGE's weights in the optimizer state, distillation's
    objective) resumed without it, or the reverse, failed in orbax with "different model config?"
    or silently changed the objective; config.json records the step function now."""
    run = env["root"] / "audit_step_fn"
    shutil.copytree(ref_run, run)
    with pytest.raises(ValueError, match=r"step_fn=None .*this call passes step_fn=_MyStep"):
        train(tiny_model(), tiny_train(env, run, steps=6), resume=True, progress=False, step_fn=_MyStep())
    run2 = env["root"] / "audit_step_fn2"
    train(tiny_model(), tiny_train(env, run2, steps=2), progress=False, step_fn=_MyStep())
    with pytest.raises(ValueError, match=r"step_fn=_MyStep .*this call passes step_fn=None"):
        train(tiny_model(), tiny_train(env, run2, steps=4), resume=True, progress=False)
    summary = train(tiny_model(), tiny_train(env, run2, steps=4), resume=True, progress=False, step_fn=_MyStep())
    assert summary["resumed_from"] == 2 and summary["finished"]
