"""Audit 43, "nothing lost on interruption": a resume with a changed config killed between writing
config.json and completing its first checkpoint leaves the run resumable as the checkpoint's own
run (each checkpoint holds the config it was trained with); every run-directory write (the
checkpoint manifest included) goes through one atomic helper that fsyncs the file and the folder."""
import json
import os

import pytest

from jaxformers.training import CompileCache, train
from jaxformers.training import checkpoint as checkpoint_lib
from jaxformers.training import rundir
from jaxformers.training.checkpoint import Checkpointer

from test_training import env, tiny_model  # noqa: F401 - env: the module's corpus fixture
from test_training import tiny_train as _tiny_train

from experiments import common


CACHE = CompileCache(max_entries=4)


def tiny_train(env, out, **kw):
    return _tiny_train(env, out, **{**dict(steps=4, eval_every=0, checkpoint_every=2, log_every=2), **kw})


class Killed(BaseException):
    """Stands for a kill: raised at a precise point, caught by nobody."""


def _kill_first_save(monkeypatch):
    """The next checkpoint save dies before orbax writes anything (config.json already rewritten)."""
    def die(self, *a, **k):
        raise Killed
    monkeypatch.setattr(Checkpointer, "save", die)


def _stop_then_kill_resume(monkeypatch, model, first, changed, **resume_kw):
    """Train ``first`` to step 2 and stop; resume with the ``changed`` train config, killed in its
    first save (after it has written config.json)."""
    train(model, first, progress=False, cache=CACHE, stop_after=2)
    with monkeypatch.context() as m:
        _kill_first_save(m)
        with pytest.raises(Killed):
            train(model, changed, progress=False, cache=CACHE, resume=True, **resume_kw)


def test_resume_killed_before_its_first_checkpoint_is_checked_against_the_checkpoints_config(env, monkeypatch):
    """Stopped at step 2 (lr 3e-3); resumed with lr 6e-3 (--allow-lr-jump), which writes config.json
    and is killed before checkpoint 4 is complete.  The run's checkpoint (2) was trained with lr
    3e-3: resuming with the original config must work (it was refused: the LR 'jumps' against the
    newer config.json), and resuming with lr 6e-3 again without allow_lr_jump must be refused (it
    trained silently with the jump)."""
    model = tiny_model()
    out = env["root"] / "a43_killed_resume"
    _stop_then_kill_resume(monkeypatch, model, tiny_train(env, out), tiny_train(env, out, lr=6e-3),
                           allow_lr_jump=True)
    assert json.loads((out / rundir.CONFIG_FILE).read_text())["train"]["lr"] == 6e-3  # ahead of ckpt 2
    assert Checkpointer(out).complete_steps() == [2]
    with pytest.raises(ValueError, match="moves the learning rate"):
        train(model, tiny_train(env, out, lr=6e-3), progress=False, cache=CACHE, resume=True)
    assert rundir.resume_config(out)["train"]["lr"] == 3e-3
    summary = train(model, tiny_train(env, out), progress=False, cache=CACHE, resume=True)
    assert summary["resumed_from"] == 2 and summary["final_step"] == 4
    saved = json.loads((Checkpointer(out).step_dir(4) / checkpoint_lib.CONFIG).read_text())
    assert saved["train"]["lr"] == 3e-3 and saved == rundir.read_config(out)
    checkpoint_lib.verify_step_dir(Checkpointer(out).step_dir(4))  # the config is in the manifest
    assert checkpoint_lib.CONFIG in json.loads(
        (Checkpointer(out).step_dir(4) / checkpoint_lib.MANIFEST).read_text())["files"]


def test_extension_killed_before_its_first_checkpoint_resumes_the_original_schedule(env, monkeypatch):
    """An extension (steps 4 -> 6) killed before its first checkpoint: a job script's original
    command (steps=4, --resume) resumes checkpoint 2 with the run's own schedule, LR unchanged
    (a guard: this case was tolerated before too), and resume_config names the checkpoint's."""
    model = tiny_model()
    out = env["root"] / "a43_killed_extension"
    _stop_then_kill_resume(monkeypatch, model, tiny_train(env, out), tiny_train(env, out, steps=6))
    assert json.loads((out / rundir.CONFIG_FILE).read_text())["train"]["schedule_steps"] == 4
    saved = rundir.resume_config(out)["train"]
    assert saved["steps"] == 4 and saved["schedule_steps"] is None
    summary = train(model, tiny_train(env, out), progress=False, cache=CACHE, resume=True)
    assert summary["resumed_from"] == 2 and summary["final_step"] == 4 and summary["finished"]
    # --extend-steps N raises the run's *total* by N (documented in experiments/train.py), not
    # "N more" than the checkpointed step: the refusal of a shortening says so
    with pytest.raises(ValueError, match=r"--extend-steps N: the run's total steps \+ N"):
        train(model, tiny_train(env, out, steps=3), progress=False, cache=CACHE, resume=True)


def test_one_atomic_write_fsyncs_file_and_folder_and_leaves_no_temporary(tmp_path, monkeypatch):
    """rundir.atomic_write, the checkpoint manifest and experiments.common.write_json all fsync the
    file before the rename and the folder after it; a failed write leaves the old file and no
    temporary file."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    for write in (lambda p: rundir.atomic_write(p, "x"), lambda p: checkpoint_lib.atomic_write(p, b"x"),
                  lambda p: common.write_json(p, {"a": 1})):
        synced.clear()
        write(tmp_path / "f.json")
        assert synced == [False, True], synced  # the file, then its folder
    (tmp_path / "f.json").write_text("old")

    def fail(*a):
        raise Killed
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(Killed):
        rundir.atomic_write(tmp_path / "f.json", "new")
    assert (tmp_path / "f.json").read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_manifest_write_goes_through_the_atomic_helper(tmp_path, monkeypatch):
    """The checkpoint manifest (what marks a checkpoint complete) is written with file + folder
    fsync: a power loss right after it cannot leave an empty manifest that --resume refuses."""
    import numpy as np

    written = []
    real = checkpoint_lib.atomic_write

    def spy(path, data):
        written.append(os.path.basename(str(path)))
        real(path, data)
    monkeypatch.setattr(checkpoint_lib, "atomic_write", spy)
    ckpt = Checkpointer(tmp_path / "run", async_save=False)
    try:
        ckpt.save(1, {"w": np.ones(3, np.float32)}, {"m": np.zeros(3, np.float32)}, {"data_step": 1},
                  files={"extra.json": "{}"})
        ckpt.wait()
    finally:
        ckpt.close()
    assert written == ["extra.json", checkpoint_lib.MANIFEST]
    manifest = checkpoint_lib.verify_step_dir(ckpt.step_dir(1))
    assert "extra.json" in manifest["files"] and ckpt.read_file(1, "extra.json") == "{}"
    assert not [n for n in os.listdir(ckpt.step_dir(1)) if ".tmp-" in n]


def test_metrics_are_fsynced_before_each_checkpoint(tmp_path, monkeypatch):
    """MetricsWriter.flush (called just before every checkpoint save) fsyncs metrics.jsonl: a
    power loss after the checkpoint cannot lose the rows of the steps it holds."""
    writer = rundir.MetricsWriter(tmp_path)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    try:
        writer.write({"step": 1, "loss": 1.0})
        writer.flush()
    finally:
        writer.close()
    assert synced == [str(tmp_path / rundir.METRICS_FILE)]


def test_atomic_write_takes_long_file_names(tmp_path):
    """The temporary name added ~48 characters to the file's: a 220-character name failed with
    'File name too long' (the writes it replaced added 12-14)."""
    name = "r" * 240 + ".json"
    checkpoint_lib.atomic_write(tmp_path / name, "{}")
    assert (tmp_path / name).read_text() == "{}"
    assert os.listdir(tmp_path) == [name]


def test_resume_config_skips_a_checkpoint_deleted_while_read(tmp_path, monkeypatch):
    """The newest checkpoint pruned between listing and reading (a live run): the next newest
    checkpoint's config counts, not config.json (which may be ahead of the checkpoints)."""
    (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps({"which": "config.json (ahead)"}))

    def read_file(self, step, name):
        if step == 2:
            raise FileNotFoundError(f"checkpoints/{step}/{name}")
        return json.dumps({"which": f"checkpoint {step}"})

    monkeypatch.setattr(Checkpointer, "complete_steps", lambda self: [1, 2])
    monkeypatch.setattr(Checkpointer, "read_file", read_file)
    assert rundir.resume_config(tmp_path) == {"which": "checkpoint 1"}
    monkeypatch.setattr(Checkpointer, "read_file", lambda self, step, name: None)  # checkpoints before configs
    assert rundir.resume_config(tmp_path) == {"which": "config.json (ahead)"}
