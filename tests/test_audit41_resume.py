"""Audit 41, "nothing lost on interruption": an interrupted run resumed (twice, with grad_accum and
dropout, an evaluation interrupted) ends with the uninterrupted run's parameters, optimizer state
and metrics; a kill right after a checkpoint keeps the TensorBoard events of the steps the resume
keeps; the CLI resumes / extends a run given as ``--out=~/...``, names an unreadable config.json,
and quotes run directories with spaces in the commands it suggests."""
import json
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxformers.training import CompileCache, TrainConfig, read_metrics, train, trainer
from jaxformers.training.checkpoint import Checkpointer
from jaxformers.training.losses import get_loss
from jaxformers.training.mesh import make_mesh

from experiments import evaluate as evaluate_cli
from experiments import train as train_cli

from test_audit_checkpoint import _tensorboard_scalars
from test_training import REPO, env, tiny_model  # noqa: F401 - env: the module's corpus fixture
from test_training import tiny_train as _tiny_train

CACHE = CompileCache(max_entries=8)


def tiny_train(env, out, **kw):
    """4 steps, evaluations and checkpoints every 2."""
    return _tiny_train(env, out, **{**dict(steps=4, eval_every=2, checkpoint_every=2), **kw})


def _state(run_dir, model_config, tc):
    """``(params, opt_state)`` of the newest checkpoint of ``run_dir``, on the host."""
    program = trainer.train_program(model_config, tc, make_mesh(None), "float32", get_loss(tc.loss))
    ckpt = Checkpointer(run_dir)
    try:
        params, opt_state, _ = ckpt.restore(ckpt.latest_step(), *program.abstract_state())
    finally:
        ckpt.close()
    return jax.device_get((params, opt_state))


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in read_metrics(run_dir)]


def test_interrupted_twice_with_grad_accum_and_dropout_ends_bitwise_equal(env, monkeypatch):
    """Stopped at step 3 (evaluations every 2: the stop does not fall on one), then an
    exception in the evaluation of step 4 (checkpointed first), then resumed to the end: the
    parameters, the optimizer state and metrics.jsonl are the uninterrupted run's, exactly."""
    model = tiny_model(dropout=0.1)
    kw = dict(steps=5, grad_accum=2, eval_every=2, checkpoint_every=2, keep_checkpoints=1)
    ref, out = env["root"] / "a41_ref", env["root"] / "a41_int"
    train(model, tiny_train(env, ref, **kw), progress=False, cache=CACHE)
    train(model, tiny_train(env, out, **kw), progress=False, cache=CACHE, stop_after=3)

    calls = []
    real_eval = trainer.eval_loss

    def failing_eval(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C with no handler left (a second one), mid-evaluation
        return real_eval(*a, **k)

    monkeypatch.setattr(trainer, "eval_loss", failing_eval)
    with pytest.raises(KeyboardInterrupt):
        train(model, tiny_train(env, out, **kw), progress=False, cache=CACHE, resume=True)
    monkeypatch.setattr(trainer, "eval_loss", real_eval)
    summary = train(model, tiny_train(env, out, **kw), progress=False, cache=CACHE, resume=True)
    assert summary["resumed_from"] == 4 and summary["finished"]
    assert _rows(out) == _rows(ref)
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]
    want, got = _state(ref, model, tiny_train(env, ref, **kw)), _state(out, model, tiny_train(env, out, **kw))
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_KILLED_RUN = """
import json, os, sys
import jaxformers as jf
from jaxformers.training import TrainConfig, train
from jaxformers.training.checkpoint import Checkpointer
finalize = Checkpointer._finalize
def finalize_then_die(self, step):
    finalize(self, step)  # the manifest is written: checkpoint 2 is complete
    if step == 2:
        os._exit(9)  # as kill -9: no writer is closed
Checkpointer._finalize = finalize_then_die
train(jf.get_config("gpt", "tiny", **json.loads(sys.argv[1])), TrainConfig(**json.loads(sys.argv[2])),
      progress=False)
"""


def test_a_kill_after_a_checkpoint_keeps_the_tensorboard_events_of_its_steps(env):
    """Event files are buffered (flushed every 10 s): a process killed right after checkpoint 2 had
    the events of steps 1-2 in memory only; the resume purges from step 3, so they were lost for
    good while metrics.jsonl had them.  Now they are flushed before the checkpoint, and the
    restored step's rows are written again."""
    out = env["root"] / "a41_tb_kill"
    tc = tiny_train(env, out, tensorboard=True, eval_every=0)
    model = tiny_model()
    model_kw = {k: v for k, v in model.to_dict().items() if k in ("vocab_size", "d_model", "n_layer", "n_head",
                                                                  "max_seq_len")}
    res = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(model_kw), json.dumps(tc.to_dict())],
                         cwd=str(REPO), env=env["sub_env"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 9, res.stderr[-3000:]
    train(model, tc, resume=True, progress=False, cache=CACHE)
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    scalars = _tensorboard_scalars(out)
    assert scalars["train/loss"] == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in rows}


def _write_run_config(out, env, **train_kw):
    out.mkdir(parents=True, exist_ok=True)
    tc = TrainConfig(data=env["corpus"], out_dir=str(out), **train_kw)
    (out / "config.json").write_text(json.dumps({"model": tiny_model().to_dict(), "train": tc.to_dict()}))


def test_cli_resume_and_extend_of_an_out_dir_given_with_a_tilde(env, tmp_path, monkeypatch):
    """``--out=~/run`` (a tilde the shell does not expand): the library expands it, the CLI read
    the run's config.json without doing so and built a new run's config (another model: the
    resume was refused) and ``--extend-steps`` said there was no run."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_run_config(tmp_path / "my run", env, steps=5, lr=1e-3)
    args = train_cli._parser().parse_args(["--out=~/my run", "--resume", "--data", env["corpus"]])
    model, tc = train_cli.build_configs(args)
    assert model == tiny_model() and (tc.steps, tc.lr) == (5, 1e-3)
    assert tc.out_dir == str(tmp_path / "my run")
    model, tc = train_cli.build_configs(train_cli._parser().parse_args(["--out=~/my run", "--extend-steps", "2"]))
    assert model == tiny_model() and tc.steps == 7


def test_evaluate_cli_of_a_run_given_with_a_tilde(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_run_config(tmp_path / "my run", env)
    assert evaluate_cli.main(["--run=~/my run", "--tokenizer", "byte"]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "No such file" not in err


@pytest.mark.parametrize("text, match", [("[1, 2]", "must hold a JSON object"),
                                         ('{"model": {"model": "gpt"', "is unreadable"),
                                         ('{"model": {"model": "gpt"}}', "no train section")])
def test_cli_resume_names_an_unreadable_config_json(tmp_path, capsys, text, match):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(text)
    for extra in (["--resume"], ["--extend-steps", "2"]):
        assert train_cli.main(["--out", str(out), "--quiet", "--no-compile-cache", *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and "config.json" in err, err


def test_the_summary_quotes_a_run_dir_with_spaces():
    run = "/tmp/my runs/gpt tiny"
    text = train_cli.human_summary({"run_dir": run, "model": "gpt", "final_step": 2, "steps": 4,
                                    "finished": False, "trained_steps": 2, "wall_s": 1.0})
    lines = text.splitlines()
    resume = lines[0].split("continue with ")[1]
    assert shlex.split(resume) == ["--resume", "--out", run]
    reproduce = next(line for line in lines if "reproduce" in line).split("reproduce")[1]
    assert shlex.split(reproduce)[4] == f"{run}/run.yaml"
    tensorboard = next(line for line in lines if "TensorBoard" in line).split("TensorBoard")[1]
    assert shlex.split(tensorboard) == ["tensorboard", "--logdir", run]


def test_a_resume_that_adds_or_removes_gradient_clipping_is_refused_naming_grad_clip(env):
    """grad_clip=0 drops the clipping stage from the optimizer (another opt_state tree): the
    restore failed with a CheckpointError blaming the model config and advising to move the
    checkpoint away; another positive value still resumes."""
    out = env["root"] / "a41_clip"
    model = tiny_model()
    train(model, tiny_train(env, out), progress=False, cache=CACHE, stop_after=2)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ValueError, match=r"grad_clip 1.0 -> 0.0 removes the optimizer's clipping stage"):
        train(model, tiny_train(env, out, grad_clip=0.0), progress=False, cache=CACHE, resume=True)
    assert sorted(p.name for p in out.rglob("*")) == before  # refused before anything is written
    summary = train(model, tiny_train(env, out, grad_clip=0.5), progress=False, cache=CACHE, resume=True,
                    stop_after=3)
    assert summary["resumed_from"] == 2 and summary["final_step"] == 3
