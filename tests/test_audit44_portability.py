"""Audit 44 (portability): run directories and checkpoints record the library versions that wrote
them, and a restore that fails after an upgrade / a downgrade names the versions that wrote the
checkpoint and those reading it, in one line (not orbax's pages-long error).  Runs with the suite's
single environment: another environment is faked by editing a manifest's ``versions``."""
import json

import jax
import jax.numpy as jnp
import pytest

from jaxformers.training import checkpoint as ckpt_lib
from jaxformers.training import rundir
from jaxformers.training.checkpoint import MANIFEST, Checkpointer, CheckpointError


def _save(tmp_path):
    ck = Checkpointer(tmp_path, async_save=False)
    params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}
    ck.save(2, params, {"m": jnp.zeros(3)}, {"pos": 0})
    ck.close()
    return params


def _mismatched_target():  # another shape: orbax refuses to restore
    return {"w": jax.ShapeDtypeStruct((4, 5), jnp.float32)}


def _set_written_versions(tmp_path, versions):
    path = tmp_path / "checkpoints" / "2" / MANIFEST
    manifest = json.loads(path.read_text())
    if versions is None:
        manifest.pop("versions", None)
    else:
        manifest["versions"] = versions
    path.write_text(json.dumps(manifest))


def test_manifest_records_library_versions(tmp_path):
    _save(tmp_path)
    manifest = Checkpointer(tmp_path).verify(2)
    versions = manifest["versions"]
    assert versions["jax"] == jax.__version__
    import flax
    assert versions["flax"] == flax.__version__
    assert versions["orbax-checkpoint"] and versions["python"]


def test_summary_records_library_versions(tmp_path):
    rundir.write_summary(tmp_path, {"val_loss": 1.0})
    summary = json.loads((tmp_path / rundir.SUMMARY_FILE).read_text())
    assert summary["val_loss"] == 1.0 and summary["versions"]["jax"] == jax.__version__


def test_restore_failure_names_writing_and_reading_versions(tmp_path):
    _save(tmp_path)
    written = dict(ckpt_lib.library_versions(), jax="0.0.1", **{"orbax-checkpoint": "0.0.2"})
    _set_written_versions(tmp_path, written)
    ck = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError) as info:
        ck.restore(2, _mismatched_target())
    ck.close()
    msg = str(info.value)
    assert f"jax 0.0.1 -> {jax.__version__}" in msg and "libraries that store it" in msg
    assert "orbax-checkpoint 0.0.2 -> " in msg and "flax" not in msg  # only what changed
    assert "different model config" in msg  # the other cause stays named
    assert "\n" not in msg  # one line, not orbax's traceback text
    assert "__cause__" in msg and info.value.__cause__ is not None  # the full error


def test_restore_failure_after_a_python_or_optax_change_keeps_the_config_hint(tmp_path):
    """Review of audit 44: a change of a library that does not store arrays (python, optax,
    jaxformers) is no reason to blame the versions; it is reported, beside the usual hint."""
    _save(tmp_path)
    _set_written_versions(tmp_path, dict(ckpt_lib.library_versions(), python="3.0.0", optax="0.0.1"))
    ck = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError) as info:
        ck.restore(2, _mismatched_target())
    ck.close()
    msg = str(info.value)
    assert "different model config" in msg and "libraries that store it" not in msg
    assert "python 3.0.0 -> " in msg and "optax 0.0.1 -> " in msg and "\n" not in msg


def test_restore_failure_same_versions_keeps_the_config_hint(tmp_path):
    _save(tmp_path)
    ck = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError) as info:
        ck.restore(2, _mismatched_target())
    ck.close()
    msg = str(info.value)
    assert "different model config" in msg and "Written by other" not in msg and "\n" not in msg


def test_restore_failure_without_recorded_versions_says_which_read_it(tmp_path):
    _save(tmp_path)
    _set_written_versions(tmp_path, None)  # a checkpoint from before versions were recorded
    ck = Checkpointer(tmp_path)
    assert ck.verify(2)  # still a complete, valid checkpoint
    with pytest.raises(CheckpointError) as info:
        ck.restore(2, _mismatched_target())
    ck.close()
    msg = str(info.value)
    assert f"jax {jax.__version__}" in msg and "not recorded" in msg and "\n" not in msg


def test_version_changes():
    reading = {"python": "3.12.1", "jax": "0.12.0", "flax": "0.12.12"}
    assert ckpt_lib.version_changes(dict(reading), reading) == ""
    assert ckpt_lib.version_changes({"jax": "0.10.2", "flax": "0.12.12", "python": "3.11.7"}, reading) == \
        "python 3.11.7 -> 3.12.1, jax 0.10.2 -> 0.12.0"
    assert ckpt_lib.version_changes(None, reading) is None
    assert ckpt_lib.version_changes("garbage", reading) is None
    assert ckpt_lib.version_changes({"jax": "0.10.2", "python": "3.11.7"}, reading, only=("jax",)) == \
        "jax 0.10.2 -> 0.12.0"


def test_manifest_with_versions_keeps_its_format(tmp_path):
    """The manifest format stays 1 (the verifier only needs ``format`` and ``files``;
    ``versions`` is extra), so code from before versions were recorded still verifies it."""
    _save(tmp_path)
    manifest = json.loads((tmp_path / "checkpoints" / "2" / MANIFEST).read_text())
    assert manifest["format"] == ckpt_lib.MANIFEST_FORMAT == 1 and "versions" in manifest
    params, _, meta = Checkpointer(tmp_path).restore(2, {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
    assert meta["step"] == 2 and float(params["w"][1, 2]) == 5.0
