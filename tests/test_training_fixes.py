"""Regression tests of the training loop's edge cases: checkpoints marked complete as soon as
they are written and old ones deleted only after, resumes that train nothing leave the run's config
alone, validation independent of grad_accum, ``--extend-steps`` with the default run dir, loading
from a run that is still training, ``tokens`` across a batch-size change, tiny temperatures."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.decoding import sample_logits
from jaxformers.training import CompileCache, evaluate, load_run, read_metrics, train
from jaxformers.training.checkpoint import MANIFEST, Checkpointer

from experiments import evaluate as evaluate_cli
from experiments import train as train_cli

from test_training import env, tiny_model  # noqa: F401 - env: the module's corpus fixture
from test_training import tiny_train as _tiny_train

REPO = Path(__file__).resolve().parents[1]


def _tree(seed):
    return {"w": jnp.full((4, 4), float(seed)), "b": jnp.arange(3.0) + seed}


def _wait_for(pred, what, timeout=60.0):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, what
        time.sleep(0.01)


# ----------------------------------------------------------------------------- 1: checkpoints
def test_async_save_is_complete_without_a_later_save_and_keep_1_never_loses_the_last(tmp_path):
    """The manifest appears once orbax has finished (no later save / wait needed), and with
    keep=1 an old checkpoint is deleted only after the newer one is complete."""
    ckpt = Checkpointer(tmp_path / "run", keep=1)
    try:
        ckpt.save(1, _tree(1), _tree(1), {"data_step": 1})
        _wait_for(lambda: ckpt.is_complete(1), "step 1 never got its manifest without wait()")
        ckpt.save(2, _tree(2), _tree(2), {"data_step": 2})
        seen = []
        deadline = time.time() + 60
        while ckpt.step_dirs() != [2]:
            complete = ckpt.complete_steps()
            assert complete, "no complete checkpoint on disk while step 2 was being saved"
            seen.append(tuple(complete))
            assert time.time() < deadline, f"step 2 never became the only checkpoint: {ckpt.step_dirs()}"
            time.sleep(0.002)
        assert ckpt.step_dirs() == [2]
        assert all(c in ((1,), (1, 2), (2,)) for c in seen), seen
    finally:
        ckpt.close()
    params, _, meta = Checkpointer(tmp_path / "run").restore(2, jax.tree.map(np.asarray, _tree(0)))
    assert meta["data_step"] == 2 and float(params["w"][0, 0]) == 2.0


def _cli(env, out, steps, *extra):
    return [sys.executable, "-m", "experiments.train", "--model", "gpt", "--preset", "tiny",
            "--set", "d_model=32", "--set", "n_layer=1", "--set", "n_head=4", "--set", "max_seq_len=32",
            "--data", env["corpus"], "--steps", str(steps), "--batch-size", "8", "--seq-len", "32",
            "--lr", "3e-3", "--warmup-steps", "5", "--eval-every", "0", "--log-every", "1",
            "--out", str(out), "--quiet", *extra]


def test_sigkill_right_after_a_checkpoint_commits_resumes_from_it(env):
    """keep_checkpoints=1: SIGKILL as soon as the second checkpoint (step 20) is committed and the
    first one (step 10) is no longer complete, i.e. while old checkpoints are being deleted: the
    resume starts from step 20, never from scratch."""
    out = env["root"] / "killed_keep1"
    cmd = _cli(env, out, 60, "--checkpoint-every", "10", "--keep-checkpoints", "1")
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env["sub_env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpts = out / "checkpoints"
    try:
        _wait_for(lambda: proc.poll() is not None or (
            (ckpts / "20" / "commit_success.txt").exists() and not (ckpts / "10" / MANIFEST).exists()),
            "the second checkpoint never appeared", timeout=240)
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = max(r["step"] for r in read_metrics(out))
    assert 20 <= done_before < 60
    res = subprocess.run(cmd + ["--resume"],
                         cwd=str(REPO), env=env["sub_env"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["resumed_from"] is not None and summary["resumed_from"] >= 20, res.stderr[-2000:]
    assert summary["finished"] and [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, 61))


# ----------------------------------------------------------------------------- in-process runs
CACHE = CompileCache(max_entries=8)


def tiny_train(env, out, **kw):
    """``test_training.tiny_train`` with 4 steps, evaluations and checkpoints every 2."""
    return _tiny_train(env, out, **{**dict(steps=4, eval_every=2, checkpoint_every=2), **kw})


@pytest.fixture(scope="module")
def base_run(env):
    """A finished 4-step run (checkpoints at 2 and 4)."""
    out = env["root"] / "base"
    train(tiny_model(), tiny_train(env, out), progress=False, cache=CACHE)
    return out


def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# ----------------------------------------------------------------------------- 2: no-op resumes
def test_a_resume_that_trains_nothing_leaves_config_and_run_file_alone(env, base_run):
    run = _copy(base_run, env["root"] / "noop")
    before = {name: (run / name).read_bytes() for name in ("config.json", "run.yaml")}
    # a finished run resumed with another LR: nothing to train
    assert train_cli.main(["--out", str(run), "--resume", "--lr", "1e-2", "--quiet"]) == 0
    # --steps equal to a checkpointed step of a longer run: nothing to train either
    longer = _copy(base_run, env["root"] / "noop_longer")
    shutil.rmtree(longer / "checkpoints" / "4")
    before_longer = {name: (longer / name).read_bytes() for name in ("config.json", "run.yaml")}
    assert train_cli.main(["--out", str(longer), "--resume", "--steps", "2", "--lr", "1e-2",
                           "--quiet"]) == 0
    assert {name: (run / name).read_bytes() for name in before} == before
    assert {name: (longer / name).read_bytes() for name in before} == before_longer
    # so an extension continues the LR the run actually reached
    assert train_cli.main(["--out", str(run), "--extend-steps", "1", "--quiet"]) == 0
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["lr"] == 3e-3 and saved["steps"] == 5
    lrs = {r["step"]: r["lr"] for r in read_metrics(run) if "loss" in r}
    assert lrs[5] == pytest.approx(lrs[4], rel=1e-6) or lrs[5] < lrs[4]


def test_a_resume_that_trains_records_its_config(env, base_run):
    run = _copy(base_run, env["root"] / "trained_resume")
    assert train_cli.main(["--out", str(run), "--resume", "--steps", "6", "--eval-batches", "1",
                           "--quiet"]) == 0
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["steps"] == 6 and saved["eval_batches"] == 1
    assert "eval_batches: 1" in (run / "run.yaml").read_text()


# ----------------------------------------------------------------------------- 3: eval vs grad_accum
def test_validation_covers_the_same_tokens_whatever_grad_accum(env):
    results = {}
    for ga in (1, 4):
        out = env["root"] / f"ga{ga}"
        summary = train(tiny_model(), tiny_train(env, out, steps=1, warmup_steps=0, grad_accum=ga, checkpoint_every=0),
                        progress=False, cache=CACHE)
        results[ga] = (summary["val_loss"], evaluate(str(out), cache=CACHE))
    assert results[1][1]["val_tokens"] == results[4][1]["val_tokens"] == 2 * 8 * 32
    assert results[4][0] == pytest.approx(results[1][0], rel=1e-5)
    assert results[4][1]["val_loss"] == pytest.approx(results[4][0], rel=1e-6)


# ----------------------------------------------------------------------------- 4: default run dir
def test_extend_steps_without_out_uses_the_default_run_dir(env, monkeypatch):
    cwd = env["root"] / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = ["--model", "gpt", "--preset", "tiny", "--set", "d_model=32", "--set", "n_layer=1",
            "--set", "n_head=4", "--set", "max_seq_len=32", "--data", env["corpus"], "--batch-size", "8",
            "--seq-len", "32", "--steps", "2", "--eval-every", "0", "--eval-batches", "1",
            "--log-every", "1", "--quiet"]
    assert train_cli.main(args) == 0
    assert (cwd / "runs" / "gpt-tiny" / "config.json").is_file()
    assert train_cli.main(["--extend-steps", "1", "--quiet"]) == 0
    assert max(r["step"] for r in read_metrics(cwd / "runs" / "gpt-tiny")) == 3


# ----------------------------------------------------------------------------- 5: loading a live run
def _deleting_restore(monkeypatch, delete_every_time):
    """Checkpointer.restore that first deletes the step it restores (as the trainer's
    garbage collection would, mid-load)."""
    original = Checkpointer.restore
    deleted = []

    def restore(self, step, *a, **k):
        if delete_every_time or not deleted:
            shutil.rmtree(str(self.step_dir(step)))
            deleted.append(step)
        return original(self, step, *a, **k)

    monkeypatch.setattr(Checkpointer, "restore", restore)
    return deleted


def test_load_run_falls_back_when_the_checkpoint_is_deleted_mid_load(env, base_run, monkeypatch):
    run = _copy(base_run, env["root"] / "live")
    deleted = _deleting_restore(monkeypatch, delete_every_time=False)
    _, _, params = load_run(run)
    assert deleted == [4]
    monkeypatch.undo()
    _, _, want = load_run(base_run, step=2)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, want))


def test_load_run_of_a_missing_step_names_the_complete_ones(base_run):
    from jaxformers.training import CheckpointError

    steps = Checkpointer(base_run).complete_steps()
    assert steps and 3 not in steps
    with pytest.raises(CheckpointError, match=rf"no complete checkpoint at step 3; complete ones: \{steps}"):
        load_run(base_run, step=3)


def test_evaluate_cli_says_the_checkpoints_were_deleted(env, base_run, monkeypatch, capsys):
    run = _copy(base_run, env["root"] / "live_gone")
    _deleting_restore(monkeypatch, delete_every_time=True)
    assert evaluate_cli.main(["--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "deleted while" in err and "different model config" not in err


# ----------------------------------------------------------------------------- 6: tokens
def test_tokens_continue_from_the_checkpoint_after_a_batch_size_change(env, base_run):
    run = _copy(base_run, env["root"] / "bs16")
    train(tiny_model(), tiny_train(env, run, steps=6, batch_size=16), resume=True, progress=False,
          cache=CACHE)
    tokens = {r["step"]: r["tokens"] for r in read_metrics(run) if "loss" in r}
    assert tokens[4] == 4 * 8 * 32
    assert tokens[5] == 4 * 8 * 32 + 16 * 32 and tokens[6] == 4 * 8 * 32 + 2 * 16 * 32
    meta = json.loads((run / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["tokens_seen"] == tokens[6]


# ----------------------------------------------------------------------------- 7: tiny temperatures
@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-39, 1e-45, 1e-300])
def test_a_tiny_temperature_samples_greedily(temperature):
    logits = jnp.array([[1.0, 5.0, 3.0, -2.0], [-1.0, -3.0, -0.5, -4.0], [0.0, 0.0, 1e-3, 0.0]])
    for seed in range(3):
        got = sample_logits(logits, jax.random.PRNGKey(seed), temperature=temperature)
        assert got.tolist() == [1, 2, 2]
    got = sample_logits(logits, jax.random.PRNGKey(0), temperature=temperature, top_k=2, top_p=0.5)
    assert got.tolist() == [1, 2, 2]
