"""Audit 56 (mutckpt): tests that kill the mutants of checkpoint.py / rundir.py that survived the
suite: the exact files a manifest lists (nested, with the config), end hashing of large files and
whole hashing at the limit, verify's messages (truncated / empty manifest / none), a second
quarantine of one step, pruning (manifest first, fsynced, then the files), a save that waits for the
previous one and never overwrites, a restore pruned meanwhile, step 0, atomic_write leftovers,
config_diff / dataset_changes / train_config_changes text, check_resume's implementation fields and
imports, metrics kept up to the restored step, resume_config / restore_checkpoint_config, the run
lock, refuse_clobber, load_run's fallback, earlier_measurements and tokenizer leftovers."""
import json
import os

import jax
import jax.numpy as jnp
import pytest

from jaxformers.training import checkpoint as ckpt_lib
from jaxformers.training import rundir
from jaxformers.training.checkpoint import CONFIG, MANIFEST, Checkpointer, CheckpointError


def _tree(v):
    return {"w": jnp.full((2,), float(v), jnp.float32)}


def _abstract():
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _tree(0))


def _save(ckpt, step, files=None):
    ckpt.save(step, _tree(step), {"count": jnp.asarray(step, jnp.int32)}, {"data_step": step}, files=files)
    ckpt.wait()


def _step_dir(tmp_path, files, step=1):
    """A step directory holding ``files`` ({rel: bytes}) and its manifest."""
    d = tmp_path / "checkpoints" / str(step)
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    from etils import epath
    (d / MANIFEST).write_text(json.dumps(ckpt_lib.build_manifest(epath.Path(d))))
    return d


# ----------------------------------------------------------------------------- manifest / verify
def test_the_manifest_lists_every_file_with_nested_paths_and_the_config(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    try:
        _save(ckpt, 1, files={CONFIG: '{"a": 1}\n'})
        listed = ckpt.verify(1)["files"]
        d = tmp_path / "checkpoints" / "1"
        on_disk = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()} - {MANIFEST}
        assert set(listed) == on_disk and CONFIG in listed and any("/" in rel for rel in listed)
        assert ckpt.read_file(1, CONFIG) == '{"a": 1}\n'
        (tmp_path / "checkpoints" / "1" / CONFIG).write_text('{"a": 2}\n')  # same size, other content
        with pytest.raises(CheckpointError, match=f"{CONFIG}: checksum mismatch"):
            ckpt.verify(1)
    finally:
        ckpt.close()


def test_large_files_hash_their_ends_and_a_file_at_the_limit_is_hashed_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_lib, "_FULL_HASH_LIMIT", 1024)
    monkeypatch.setattr(ckpt_lib, "_END_BYTES", 256)
    d = _step_dir(tmp_path, {"at_limit": b"a" * 1024, "big": bytes(range(256)) * 16})
    files = json.loads((d / MANIFEST).read_text())["files"]
    assert "sha256" in files["at_limit"] and "sha256_ends" in files["big"]
    data = bytearray((d / "big").read_bytes())
    data[-10] ^= 1  # in the last _END_BYTES
    (d / "big").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="big: checksum mismatch"):
        ckpt_lib.verify_step_dir(d)


def test_verify_names_an_empty_manifest_a_missing_one_and_a_truncated_file(tmp_path):
    d = _step_dir(tmp_path, {"x": b"12345"})
    (d / "x").write_bytes(b"123")
    with pytest.raises(CheckpointError, match="is corrupt: x: size 3 bytes, expected 5"):
        ckpt_lib.verify_step_dir(d)
    (d / MANIFEST).write_text(json.dumps({"format": ckpt_lib.MANIFEST_FORMAT, "files": {}}))
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt_lib.verify_step_dir(d)
    (d / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="is incomplete"):
        ckpt_lib.verify_step_dir(d)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.step_dirs() == [1] and ckpt.complete_steps() == [] and ckpt.latest_step() is None


def test_quarantining_the_same_step_twice_keeps_both(tmp_path):
    ckpt = Checkpointer(tmp_path)
    for n in range(2):
        (tmp_path / "checkpoints" / "3").mkdir(parents=True)
        (tmp_path / "checkpoints" / "3" / "f").write_text(str(n))
        assert len(ckpt.quarantine_incomplete()) == 1
    moved = sorted((tmp_path / "checkpoints.incomplete").iterdir())
    assert len(moved) == 2 and sorted((m / "f").read_text() for m in moved) == ["0", "1"]
    assert ckpt.step_dirs() == []


# ----------------------------------------------------------------------------- pruning / wait
def test_pruning_makes_the_old_step_incomplete_and_fsyncs_before_deleting(tmp_path, monkeypatch):
    events = []
    real_fsync = ckpt_lib.fsync_dir
    monkeypatch.setattr(ckpt_lib, "fsync_dir", lambda d: (events.append(("fsync", str(d))), real_fsync(d)))
    ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
    try:
        _save(ckpt, 1)
        path_type = type(ckpt.step_dir(1))

        def failing_rmtree(self, *a, **k):
            events.append(("rmtree", str(self)))
            raise OSError("disk went away")
        monkeypatch.setattr(path_type, "rmtree", failing_rmtree)
        events.clear()  # (saving step 1 fsynced its folder too)
        _save(ckpt, 2)
    finally:
        ckpt.close()
    old = str(ckpt.step_dir(1))
    # the deletion cut short leaves step 1 incomplete (its manifest went first, fsynced), step 2 complete
    assert ckpt.complete_steps() == [2] and ckpt.step_dirs() == [1, 2]
    assert events.index(("fsync", old)) < events.index(("rmtree", old))


# ----------------------------------------------------------------------------- atomic_write
def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    path.write_text("old")

    def no_rename(src, dst):
        raise OSError("rename failed")
    monkeypatch.setattr(ckpt_lib.os, "replace", no_rename)
    with pytest.raises(OSError, match="rename failed"):
        ckpt_lib.atomic_write(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


# ----------------------------------------------------------------------------- rundir policy
def test_config_diff_text_covers_both_sides_and_honours_ignore():
    old, new = {"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "c": 4, "d": "x"}
    assert rundir.config_diff(old, new, ignore=("c",)) == ["b: 2 -> 5", "d: None -> 'x'"]


def test_dataset_changes_compare_the_common_fields_but_the_cache_dir():
    saved = {"dataset": {"source": "synthetic:copy", "dir": "/a", "corpus_sha256": "1", "n_tokens": 10}}
    same = {"source": "synthetic:copy", "dir": "/b", "corpus_sha256": "1"}
    assert rundir.dataset_changes(saved, same) == []
    assert rundir.dataset_changes(saved, {"source": "synthetic:copy", "corpus_sha256": "2", "extra": 1}) == [
        "corpus_sha256: '1' -> '2'"]


def test_metrics_keep_the_restored_steps_rows_and_rows_without_a_step(tmp_path):
    rows = [{"step": 0, "val_loss": 5.0}, {"note": "x"}, {"step": 4, "loss": 1.0}, {"step": 5, "loss": 0.9},
            {"step": 6, "loss": 0.8}]
    (tmp_path / rundir.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    rundir.reset_metrics(tmp_path, 5)
    assert rundir.read_metrics(tmp_path) == rows[:4]
    rundir.reset_metrics(tmp_path, 0)  # a checkpoint at step 0 keeps its rows
    assert rundir.read_metrics(tmp_path) == rows[:2]
    rundir.reset_metrics(tmp_path, None)
    assert rundir.read_metrics(tmp_path) == []


def test_resume_config_is_the_newest_checkpoints_and_must_be_an_object(tmp_path):
    for step, text in ((3, '{"v": 3}'), (7, '{"v": 7}')):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
        (tmp_path / "checkpoints" / str(step) / MANIFEST).write_text("{}")
        (tmp_path / "checkpoints" / str(step) / CONFIG).write_text(text)
    assert rundir.resume_config(tmp_path) == {"v": 7}
    (tmp_path / "checkpoints" / "7" / CONFIG).write_text("[1]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        rundir.resume_config(tmp_path)


def test_step_settings_of_a_run_with_only_incomplete_checkpoints_are_recorded_anew(tmp_path):
    (tmp_path / "s.json").write_text('{"a": 1}')
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)  # a first save cut short: not a resume
    rundir.check_step_settings(tmp_path, "s.json", {"a": 2}, lambda saved: ["a: 1 -> 2"], "settings")
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 2}


def test_the_lock_holds_exactly_this_pid_excludes_a_second_holder_and_frees_its_fd(tmp_path):
    (tmp_path / ".lock").write_text("123456789012\n")
    fds = len(os.listdir("/proc/self/fd"))
    with rundir.run_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(rundir.RunDirBusy, match=f"pid {os.getpid()}"):
            rundir.lock_dir(tmp_path, ".lock", "another training process")
    assert len(os.listdir("/proc/self/fd")) == fds
    with rundir.run_lock(tmp_path):  # released
        pass


def test_a_step_fn_of_none_is_recorded_and_summary_versions_are_kept(tmp_path):
    import jaxformers as jf
    from jaxformers.training.config import TrainConfig
    kw = dict(model_config=jf.get_config("gpt", "tiny"), train_config=TrainConfig(), compute_dtype="float32",
              dataset={}, n_params=1, mesh="")
    assert json.loads(rundir.config_text(**kw, step_fn=None))["step_fn"] is None
    assert "step_fn" not in json.loads(rundir.config_text(**kw))
    rundir.write_summary(tmp_path, {"final_step": 3, "versions": {"jax": "0.0.1"}})
    assert json.loads((tmp_path / rundir.SUMMARY_FILE).read_text())["versions"] == {"jax": "0.0.1"}


def test_train_config_changes_ignore_the_out_dir_and_run_yaml_records_it_absolute(tmp_path, monkeypatch):
    import yaml

    import jaxformers as jf
    from jaxformers.training.config import TrainConfig
    saved = {"train": TrainConfig(out_dir="runs/a").to_dict()}
    assert rundir.train_config_changes(saved, TrainConfig(out_dir=str(tmp_path / "moved"))) == []
    assert rundir.train_config_changes(saved, TrainConfig(out_dir="runs/a", seed=1)) == ["seed: 0 -> 1"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    rundir.write_run_file(tmp_path, jf.get_config("gpt", "tiny"),
                          TrainConfig(out_dir="runs/a", init_from="src"))
    train = yaml.safe_load((tmp_path / rundir.RUN_FILE).read_text())["train"]
    assert train["out_dir"] == str(tmp_path / "runs" / "a")
    assert train["init_from"] == str((tmp_path / "src").resolve())


def test_check_resume_lets_only_the_implementation_fields_change(tmp_path):
    import jaxformers as jf
    from jaxformers.training.config import TrainConfig
    cfg = jf.get_config("landmark", "tiny")
    (tmp_path / rundir.CONFIG_FILE).write_text(
        json.dumps({"model": cfg.to_dict(), "train": TrainConfig().to_dict()}))
    other = "reference" if cfg.landmark_impl != "reference" else "pallas"
    changed = cfg.replace(landmark_impl=other, remat="full")
    assert rundir.check_resume(tmp_path, changed)["model"] == cfg.to_dict()
    assert rundir.implementation_changes(rundir.read_config(tmp_path), changed) == [
        f"landmark_impl: {cfg.landmark_impl!r} -> {other!r}", "remat: 'none' -> 'full'"]
    with pytest.raises(ValueError, match=f"n_layer: {cfg.n_layer} -> {cfg.n_layer + 1}"):
        rundir.check_resume(tmp_path, cfg.replace(n_layer=cfg.n_layer + 1))


def test_restore_checkpoint_config_puts_back_config_json_and_run_yaml(tmp_path):
    import yaml

    import jaxformers as jf
    from jaxformers.training.config import TrainConfig
    kw = dict(model_config=jf.get_config("gpt", "tiny"), compute_dtype="float32", dataset={}, n_params=1,
              mesh="")
    text = rundir.config_text(train_config=TrainConfig(steps=10), **kw)
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    (tmp_path / "checkpoints" / "10" / CONFIG).write_text(text)
    (tmp_path / rundir.CONFIG_FILE).write_text(rundir.config_text(train_config=TrainConfig(steps=20), **kw))
    ckpt = Checkpointer(tmp_path)
    assert rundir.restore_checkpoint_config(tmp_path, ckpt, 10) is True
    assert (tmp_path / rundir.CONFIG_FILE).read_text() == text
    assert yaml.safe_load((tmp_path / rundir.RUN_FILE).read_text())["train"]["steps"] == 10
    assert rundir.restore_checkpoint_config(tmp_path, ckpt, 10) is False


def test_load_run_raises_for_a_corrupt_newest_checkpoint_and_falls_back_to_the_newest_left(
        tmp_path, monkeypatch):
    import jaxformers as jf
    from jaxformers.training.config import TrainConfig
    (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps(
        {"model": jf.get_config("gpt", "tiny").to_dict(), "train": TrainConfig().to_dict()}))
    on_disk = {1, 3, 7}

    def restore(self, step, target, *a, **k):
        if step == 7:
            if deleted:
                on_disk.discard(7)
            raise CheckpointError("checkpoint 7 is corrupt" if not deleted else "gone")
        return step, None, {}
    monkeypatch.setattr(Checkpointer, "complete_steps", lambda self: sorted(on_disk))
    monkeypatch.setattr(Checkpointer, "is_complete", lambda self, step: step in on_disk)
    monkeypatch.setattr(Checkpointer, "restore", restore)
    deleted = False
    with pytest.raises(CheckpointError, match="7 is corrupt"):  # a real error, never an older checkpoint
        rundir.load_run(tmp_path)
    deleted = True  # pruned by the run still training: the newest one left
    assert rundir.load_run(tmp_path)[2] == 3
    on_disk.discard(3)
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)  # a save cut short: named, never restored
    with pytest.raises(CheckpointError, match=r"no complete checkpoint at step 3; complete ones: \[1\]"):
        rundir.load_run(tmp_path, step=3)


def test_a_save_waits_for_the_previous_one_to_be_complete_and_never_overwrites(tmp_path, monkeypatch):
    import threading
    events, second_save = [], threading.Event()
    real_build = ckpt_lib.build_manifest

    def build(step_dir):
        if step_dir.name == "1":
            second_save.wait(2.0)  # a save(2) that does not wait for step 1 comes first
        events.append(("manifest", step_dir.name))
        return real_build(step_dir)
    monkeypatch.setattr(ckpt_lib, "build_manifest", build)
    ckpt = Checkpointer(tmp_path, keep=2, async_save=True)
    try:
        ckpt.save(1, _tree(1), _tree(1), {"data_step": 1}, files={CONFIG: "one"})
        real_save = ckpt.manager.save

        def save(step, *a, **k):
            events.append(("save", str(step)))
            second_save.set()
            return real_save(step, *a, **k)
        monkeypatch.setattr(ckpt.manager, "save", save)
        ckpt.save(2, _tree(2), _tree(2), {"data_step": 2}, files={CONFIG: "two"})
        ckpt.wait()
        assert events == [("manifest", "1"), ("save", "2"), ("manifest", "2")]
        assert [ckpt.read_file(s, CONFIG) for s in (1, 2)] == ["one", "two"]
        with pytest.raises(CheckpointError, match="refusing to overwrite"):
            ckpt.save(2, _tree(3), _tree(3), {"data_step": 3})
        assert float(ckpt.restore(2, _abstract())[0]["w"][0]) == 2.0
    finally:
        ckpt.close()


def test_a_new_run_refuses_a_directory_with_only_an_incomplete_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"steps \[5\]"):
        rundir.refuse_clobber(tmp_path, Checkpointer(tmp_path), resume=False)
    rundir.refuse_clobber(tmp_path, Checkpointer(tmp_path), resume=True)


def test_earlier_measurements_only_of_the_same_final_step(tmp_path):
    summary = {"final_step": 10, "tokens_per_s": 5.0, "val_loss": 1.0}
    (tmp_path / rundir.SUMMARY_FILE).write_text(json.dumps(summary))
    assert rundir.earlier_measurements(tmp_path, 10) == {"tokens_per_s": 5.0}
    assert rundir.earlier_measurements(tmp_path, 12) == {}


def test_two_previous_tokenizers_are_both_kept_and_none_guessed(tmp_path):
    for name in (".tokenizer.old-a", ".tokenizer.old-b"):
        (tmp_path / name / "tokenizer").mkdir(parents=True)
    rundir.copy_tokenizer(tmp_path, None)
    assert not (tmp_path / "tokenizer").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tokenizer.old-a", ".tokenizer.old-b"]


def test_a_checkpoint_pruned_during_its_restore_is_named_as_such(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    try:
        _save(ckpt, 1)

        def pruned(step, *a, **k):  # the process training into the run deletes it meanwhile
            (tmp_path / "checkpoints" / "1" / MANIFEST).unlink()
            raise FileNotFoundError("params/_METADATA")
        monkeypatch.setattr(ckpt.manager, "restore", pruned)
        with pytest.raises(CheckpointError, match="was deleted while it was being restored"):
            ckpt.restore(1, _abstract())
    finally:
        ckpt.close()


def test_a_checkpoint_without_its_config_falls_back_to_config_json(tmp_path):
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    # written before configs were saved with them
    (tmp_path / "checkpoints" / "4" / MANIFEST).write_text("{}")
    (tmp_path / rundir.CONFIG_FILE).write_text('{"v": "config.json"}')
    assert Checkpointer(tmp_path).read_file(4, CONFIG) is None
    assert rundir.resume_config(tmp_path) == {"v": "config.json"}


def test_check_resume_imports_the_modules_the_run_recorded(tmp_path):
    import jaxformers as jf
    from jaxformers.training.config import TrainConfig
    train = dict(TrainConfig().to_dict(), imports=["jaxformers_audit56_no_such_module"])
    (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps({"model": jf.get_config("gpt", "tiny").to_dict(),
                                                           "train": train}))
    with pytest.raises(ValueError, match="jaxformers_audit56_no_such_module"):
        rundir.check_resume(tmp_path, jf.get_config("gpt", "tiny"))


def test_a_checkpoint_at_step_0_is_saved_and_restored(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
    try:
        _save(ckpt, 0)
        assert ckpt.latest_step() == 0 and ckpt.restore(0, _abstract())[2] == {"data_step": 0, "step": 0}
    finally:
        ckpt.close()
