"""Audit 46 (rundir2): resume_config / load_run / metrics.jsonl on bad input."""
import json

import numpy as np
import pytest

import jaxformers as jf
from jaxformers.training import rundir
from jaxformers.training.checkpoint import CONFIG, MANIFEST, Checkpointer, CheckpointError
from jaxformers.training.config import TrainConfig


def _complete_step(run, step=5):
    (run / "checkpoints" / str(step)).mkdir(parents=True)
    (run / "checkpoints" / str(step) / MANIFEST).write_text("{}")
    return run / "checkpoints" / str(step)


def _run_config(run):
    (run / rundir.CONFIG_FILE).write_text(json.dumps(
        {"model": jf.get_config("gpt", "tiny").to_dict(), "train": TrainConfig().to_dict()}))


# ----------------------------------------------------------------------------- resume_config
def test_resume_config_names_a_checkpoint_config_that_is_not_utf8(tmp_path):
    step_dir = _complete_step(tmp_path)
    (step_dir / CONFIG).write_bytes(b'{"model": "\xff"}')
    # old code: a bare UnicodeDecodeError naming no file
    with pytest.raises(ValueError, match="is unreadable") as info:
        rundir.resume_config(tmp_path)
    assert str(step_dir / CONFIG) in str(info.value)
    assert not isinstance(info.value, UnicodeDecodeError)
    with pytest.raises(ValueError, match="cannot decode|can't decode"):
        rundir.check_resume(tmp_path, jf.get_config("gpt", "tiny"))


# ----------------------------------------------------------------------------- load_run
@pytest.mark.parametrize("step", [5.0, True, "5", 5.5])
def test_load_run_refuses_a_step_that_is_not_an_int(tmp_path, step):
    _run_config(tmp_path)
    _complete_step(tmp_path)
    # old code: "no complete checkpoint at step 5.0; complete ones: [5]" (or, for "5", a restore attempt)
    with pytest.raises(ValueError, match=r"step must be an int .* got " + repr(step).replace(".", r"\.")):
        rundir.load_run(tmp_path, step=step)


def test_load_run_takes_a_numpy_integer_step(tmp_path):
    _run_config(tmp_path)
    _complete_step(tmp_path)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint at step 4; complete ones: \[5\]"):
        rundir.load_run(tmp_path, step=np.int64(4))


@pytest.mark.parametrize("step", [None, 4])
def test_load_run_closes_its_checkpointer_when_there_is_no_checkpoint_to_load(tmp_path, monkeypatch, step):
    _run_config(tmp_path)
    closed = []
    monkeypatch.setattr(Checkpointer, "close", lambda self: closed.append(self))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        rundir.load_run(tmp_path, step=step)
    assert len(closed) == 1  # old code, step=None: never closed


# ----------------------------------------------------------------------------- metrics.jsonl
def test_metrics_lines_that_are_not_json_objects_are_ignored_like_unparsable_ones(tmp_path):
    (tmp_path / rundir.METRICS_FILE).write_bytes(
        b'{"step": 1, "loss": 2.0}\n[1, 2]\n3\n"x"\nnull\n{bad\n\xff\xfe\n{"step": 5, "loss": 1.0}\n')
    # old code: [1, 2], 3, "x", None among the rows; a UnicodeDecodeError for the \xff line
    assert rundir.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 5, "loss": 1.0}]
    rundir.truncate_metrics(tmp_path, 2)  # old code: AttributeError: 'list' object has no attribute 'get'
    assert (tmp_path / rundir.METRICS_FILE).read_text() == '{"step": 1, "loss": 2.0}\n'


def test_truncate_metrics_drops_rows_whose_step_is_not_a_number(tmp_path):
    (tmp_path / rundir.METRICS_FILE).write_text(
        '{"step": 1}\n{"step": null}\n{"step": "1"}\n{"step": true}\n{"note": "no step"}\n{"step": 3}\n')
    rundir.truncate_metrics(tmp_path, 2)  # old code: TypeError comparing None / str with int
    assert rundir.read_metrics(tmp_path) == [{"step": 1}, {"note": "no step"}]
    rundir.reset_metrics(tmp_path, 0)
    assert rundir.read_metrics(tmp_path) == [{"note": "no step"}]


# ----------------------------------------------------------------------------- check_resume
@pytest.mark.parametrize("saved", [{"model": [1, 2]}, {"model": None}, {"model": "gpt"},
                                   {"model": jf.get_config("gpt", "tiny").to_dict(), "train": [1]}])
def test_check_resume_names_a_saved_section_that_is_not_an_object(tmp_path, saved):
    (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps(saved))
    # old code: TypeError from dict() deep in config_from_dict / TrainConfig.from_dict (or the
    # model "gpt" reported as "dictionary update sequence element #0 has length 1")
    with pytest.raises(ValueError, match=r"cannot resume .*not a run config: its (model|train) section is not a JSON object"):
        rundir.check_resume(tmp_path, jf.get_config("gpt", "tiny"))


# ----------------------------------------------------------------------------- checkpoint
@pytest.mark.parametrize("entry", [3, None, "x", [1]])
def test_a_manifest_whose_file_entries_are_not_objects_is_unreadable(tmp_path, entry):
    from jaxformers.training.checkpoint import verify_step_dir
    (tmp_path / "a").write_text("x")
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 1, "files": {"a": entry}}))
    # old code: AttributeError: '...' object has no attribute 'get'
    with pytest.raises(CheckpointError, match="unreadable"):
        verify_step_dir(tmp_path)


def test_step_dirs_ignore_names_that_are_not_step_directories(tmp_path):
    for name in ("\u00b2", "\u0665", "05", "007", "3"):  # superscript two, Arabic-Indic five
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    ckpt = Checkpointer(tmp_path)
    # old code: ValueError from int("²"); without it, "05" listed as step 5 (and "٥" too), whose
    # step_dir "5" does not exist, so quarantine_incomplete's rename raised FileNotFoundError
    assert ckpt.step_dirs() == [3] and ckpt.incomplete_steps() == [3]
    ckpt.quarantine_incomplete()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(["\u00b2", "\u0665", "05", "007"])


def test_plot_losses_leaves_out_rows_without_a_numeric_step(tmp_path):
    from jaxformers.training.metrics import plot_losses

    (tmp_path / "metrics.jsonl").write_text('{"loss": 1.0}\n{"step": "x", "loss": 2.0}\n'
                                            '{"step": 1, "loss": 3.0, "val_loss": 2.5, "lr": 0.1}\n')
    assert plot_losses(tmp_path).is_file()  # was a KeyError on the first row
