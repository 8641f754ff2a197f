"""Audit 57: run-directory and training-config edges (schedule_steps under --steps, resume checks
that skipped or named the wrong file, blank meshes, Program.put_batch's row check)."""
import json
import types

import numpy as np
import pytest
import yaml

from jaxformers.training import TrainConfig
from jaxformers.training.rundir import CONFIG_FILE, check_resume
from jaxformers.training.trainer import resume_schedule


def _build(argv):
    from experiments import train as train_cli

    return train_cli.build_configs(train_cli._parser().parse_args(argv))


def _config_file(tmp_path, **train):
    path = tmp_path / "run.yaml"
    base = dict(batch_size=2, seq_len=16, data="synthetic:copying", eval_batches=0)
    path.write_text(yaml.safe_dump({"model": "gpt", "train": {**base, **train}}))
    return str(path)


def test_steps_flag_over_a_config_file_schedule_steps(tmp_path):
    """``--config FILE --steps N`` kept the file's ``schedule_steps``: the LR schedule ran over the
    file's length, not N.  Equal to the file's steps: it follows N; another length (an extended
    run's run.yaml): a CLIError unless ``--train-set schedule_steps=`` says which is meant."""
    from experiments.train import CLIError

    out = ["--out", str(tmp_path / "new")]
    same = _config_file(tmp_path, steps=8, schedule_steps=8)
    assert _build(["--config", same, "--steps", "20", *out])[1].schedule_length == 20
    assert _build(["--config", same, "--train-set", "steps=20", *out])[1].schedule_length == 20
    assert _build(["--config", same, *out])[1].schedule_steps == 8  # no --steps: the file as it is
    extended = _config_file(tmp_path, steps=12, schedule_steps=8)
    with pytest.raises(CLIError, match=r"schedule_steps=8 \(its steps=12\): with --steps 20 .* "
                                       r"--train-set schedule_steps=N"):
        _build(["--config", extended, "--steps", "20", *out])
    for value, length in (("none", 20), ("8", 8), ("20", 20)):
        tc = _build(["--config", extended, "--steps", "20", "--train-set", f"schedule_steps={value}", *out])[1]
        assert tc.schedule_length == length
    assert _build(["--config", extended, *out])[1].schedule_length == 8  # a reproduction: unchanged


def test_resume_schedule_names_an_invalid_saved_config():
    """A saved train config that no longer validates skipped the LR check without a word: now a
    ValueError naming the file, or a warning under allow_lr_jump."""
    tc = TrainConfig(steps=10, batch_size=2, seq_len=8)
    bad = {"train": {**tc.to_dict(), "lr": -1.0}}
    with pytest.raises(ValueError, match=r"cannot resume: its saved train config \(RUN/config.json\) is not "
                                         r"valid here \(lr must be .*--allow-lr-jump"):
        resume_schedule(bad, tc, 4, config_file="RUN/config.json")
    new, notes = resume_schedule(bad, tc, 4, allow_lr_jump=True)
    assert new == tc and notes[0].startswith("warning: its saved train config is not valid here")
    assert resume_schedule({"train": tc.to_dict()}, tc, 4) == (tc, [])  # a valid one: as before


def test_check_resume_names_the_file_it_read(tmp_path):
    """A bad ``train.imports`` entry was named as coming from ``RUN/saved config`` (no such file)."""
    from jaxformers.training.rundir import resume_config_file

    run = tmp_path / "run"
    run.mkdir()
    saved = {"model": {"model": "gpt"}, "train": {"imports": ["audit57_no_such_module"]}}
    (run / CONFIG_FILE).write_text(json.dumps(saved))
    assert resume_config_file(run) == run / CONFIG_FILE and resume_config_file(tmp_path) is None
    with pytest.raises(ValueError, match=r"\(its config.json: train.imports\) names module 'audit57_no_such"):
        check_resume(run, None)
    saved["train"]["imports"] = [3]
    (run / CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(ValueError) as e:
        check_resume(run, None)
    assert str(e.value).startswith(f"{run / CONFIG_FILE}: ") and "saved config" not in str(e.value)


def test_a_blank_training_mesh_is_no_mesh():
    """``TrainConfig(mesh=" ")`` kept the blank string (config.json recorded it, a resume with no
    mesh saw a change); it is ``None`` now, the trainer's default, as ``""`` is."""
    for blank in ("", " ", "\t"):
        assert TrainConfig(mesh=blank).mesh is None
        assert TrainConfig(mesh=blank) == TrainConfig()
    assert TrainConfig(mesh="data=1").mesh == "data=1"


def test_put_batch_rows_the_batch_axes_do_not_divide():
    """``Program.put_batch`` with rows the mesh's batch axes do not divide failed inside jax."""
    from jax.sharding import AbstractMesh

    from jaxformers.training.steps import Program

    mesh = AbstractMesh((2, 1, 3, 1), ("data", "fsdp", "expert", "tensor"))
    fake = types.SimpleNamespace(mesh=mesh, batch_sharding=None)
    batch = {"tokens": np.zeros((4, 8), np.int32)}
    with pytest.raises(ValueError, match=r"global_rows=4 is not divisible by the mesh's batch axes "
                                         r"\(data=2, fsdp=1, expert=3: 6 ways\)"):
        Program.put_batch(fake, batch, 4)
    with pytest.raises(ValueError, match="global_rows must be an int"):
        Program.put_batch(fake, batch, 6.0)


def test_train_set_of_a_field_the_schedule_ignores(tmp_path):
    """``--train-set min_lr_ratio=`` with ``constant``, ``decay_fraction=`` with ``cosine``: the
    value changed nothing, silently.  A config file's (run.yaml records every field) still loads."""
    from experiments.train import CLIError

    out = ["--out", str(tmp_path / "new"), "--data", "synthetic:copying", "--seq-len", "16"]
    for argv, name, users in ((["--schedule", "constant", "--train-set", "min_lr_ratio=0"], "min_lr_ratio",
                               "cosine / wsd use it"),
                              (["--train-set", "decay_fraction=0.5"], "decay_fraction", "wsd uses it")):
        with pytest.raises(CLIError, match=rf"--train-set {name}=\.\.\. has no effect with schedule=.*only "
                                           rf"{users}"):
            _build([*argv, *out])
    assert _build(["--schedule", "wsd", "--train-set", "decay_fraction=0.5", *out])[1].decay_fraction == 0.5
    assert _build(["--train-set", "min_lr_ratio=0", *out])[1].min_lr_ratio == 0
    tc = _build(["--config", _config_file(tmp_path, steps=8, schedule="constant", min_lr_ratio=0.0), *out])[1]
    assert tc.schedule == "constant" and tc.min_lr_ratio == 0.0
    import jaxformers as jf  # a resume (the run's own config, flags on top) too

    run = tmp_path / "run"
    run.mkdir()
    saved = {"model": jf.get_config("gpt", "tiny", vocab_size=64).to_dict(),
             "train": TrainConfig(schedule="constant", out_dir=str(run)).to_dict()}
    (run / CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(CLIError, match="min_lr_ratio=... has no effect with schedule='constant'"):
        _build(["--resume", "--out", str(run), "--train-set", "min_lr_ratio=0"])
    assert _build(["--resume", "--out", str(run)])[1].schedule == "constant"
