"""Audit 46 (rundir): split_documents on copies of one text, copy_tokenizer / tokenizer leftovers."""
import os

import pytest

from jaxformers.data import ByteTokenizer, load_tokenizer
from jaxformers.data.prepare import split_documents
from jaxformers.training import rundir
from test_audit45_misc import _bpe, _run_with_byte_tokenizer as _run


# ----------------------------------------------------------------------------- split_documents
@pytest.mark.parametrize("docs, frac, train, val", [
    (["a", "a"], 0.1, ["a", "a"], []),                       # old: train [], val ["a", "a"]
    (["a", "a", "a"], 0.5, ["a", "a", "a"], []),
    (["ab", "ab"], 0.9, ["a", "a"], ["b", "b"]),             # old: train [], val ["ab", "ab"]
    (["ab\ncd", "ab\ncd"], 0.95, ["ab\n", "ab\n"], ["cd", "cd"]),
])
def test_split_documents_copies_of_one_text_always_leave_train(docs, frac, train, val):
    for seed in (0, 1):
        assert split_documents(docs, frac, seed) == (train, val, "tail")
    # as for one document
    one = split_documents(docs[:1], frac, 0)
    assert (one[0] * len(docs), one[1] * len(docs)) == (train, val)


def test_split_documents_unchanged_where_train_was_never_empty():
    assert split_documents(["a", "a", "b", "b"], 0.1, 0) == (["b", "b"], ["a", "a"], "tail")
    assert split_documents(["abcd", "abcd"], 0.5, 0) == (["ab", "ab"], ["cd", "cd"], "tail")
    assert split_documents(["ab", "ab"], 0.7, 0) == (["a", "a"], ["b", "b"], "tail")


# ----------------------------------------------------------------------------- copy_tokenizer


def _tree(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def _second_rename_raises(monkeypatch, error):
    """``os.rename`` raising ``error`` on its second call (the first moved tokenizer/ aside, the
    second puts the new one in place); returns the list of calls."""
    real, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise error
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    return calls


def test_copy_tokenizer_interrupted_between_renames_keeps_the_only_copy(tmp_path, monkeypatch):
    run = _run(tmp_path)
    with monkeypatch.context() as m:
        _second_rename_raises(m, KeyboardInterrupt())  # Ctrl-C before the new one is in place
        with pytest.raises(KeyboardInterrupt):
            rundir.copy_tokenizer(run, None, _bpe())
    # old code: the finally removed the moved-aside folder too: no tokenizer left anywhere
    kept = [p for p in run.iterdir() if p.name.startswith(".tokenizer.old-")]
    assert len(kept) == 1 and load_tokenizer(kept[0] / "tokenizer").spec == "byte"
    rundir.copy_tokenizer(run, None, None)  # the next call puts it back
    assert [p.name for p in run.iterdir()] == ["tokenizer"]
    assert load_tokenizer(run / "tokenizer").spec == "byte"


# mutation pass: survivors of tests/test_audit45_{data,review,misc}.py
def test_copy_tokenizer_restores_the_previous_one_at_once_when_the_new_cannot_be_put_in_place(tmp_path, monkeypatch):
    run = _run(tmp_path)
    with monkeypatch.context() as m:  # the new one into place fails; putting the old one back works
        calls = _second_rename_raises(m, OSError("disk gone"))
        rundir.copy_tokenizer(run, None, _bpe())  # best effort: no exception
    assert len(calls) == 3
    assert [p.name for p in run.iterdir()] == ["tokenizer"]  # not only in a .tokenizer.old-* folder
    assert load_tokenizer(run / "tokenizer").spec == "byte"


def test_copy_tokenizer_interrupted_while_saving_leaves_tokenizer_in_place(tmp_path):
    run = _run(tmp_path)

    class Interrupted(ByteTokenizer):
        def save(self, directory):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rundir.copy_tokenizer(run, None, Interrupted())
    assert [p.name for p in run.iterdir()] == ["tokenizer"]  # never moved aside before the new copy is saved
    assert load_tokenizer(run / "tokenizer").spec == "byte"


def test_copy_tokenizer_failing_fsync_after_the_swap_keeps_the_new_one_and_no_leftovers(tmp_path, monkeypatch):
    run = _run(tmp_path)

    def fsync_dir(path):
        raise OSError("fsync failed")

    monkeypatch.setattr(rundir, "fsync_dir", fsync_dir)
    rundir.copy_tokenizer(run, None, _bpe())
    assert [p.name for p in run.iterdir()] == ["tokenizer"]
    assert load_tokenizer(run / "tokenizer").spec == "bpe:300"


def test_copy_tokenizer_is_best_effort_for_any_error(tmp_path):
    run = _run(tmp_path)

    class Broken(ByteTokenizer):
        def save(self, directory):
            raise ValueError("cannot serialise")

    rundir.copy_tokenizer(run, None, Broken())  # logs, never stops training
    assert [p.name for p in run.iterdir()] == ["tokenizer"]
    assert load_tokenizer(run / "tokenizer").spec == "byte"


def test_copy_tokenizer_folder_is_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        run = _run(tmp_path)
    finally:
        os.umask(old)
    assert (run / "tokenizer").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0o700


def test_leftover_recovery_ignores_an_empty_old_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ByteTokenizer().save(run / ".tokenizer.old-a" / "tokenizer")
    (run / ".tokenizer.old-b").mkdir()  # killed after mkdtemp, before anything was moved into it
    rundir.copy_tokenizer(run, None, None)
    assert [p.name for p in run.iterdir()] == ["tokenizer"]
    assert load_tokenizer(run / "tokenizer").spec == "byte"


# ----------------------------------------------------------------------------- check_step_settings
@pytest.mark.parametrize("text, match", [('{"a": 1', "is unreadable"), ("[1, 2]", "must hold a JSON object, got list")])
def test_check_step_settings_names_an_unreadable_settings_file(tmp_path, text, match):
    from jaxformers.training.checkpoint import MANIFEST
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    (tmp_path / "checkpoints" / "5" / MANIFEST).write_text("{}")
    (tmp_path / "s.json").write_text(text)
    # old code: a bare JSONDecodeError without the file / an AttributeError from changes()
    with pytest.raises(ValueError, match=match) as info:
        rundir.check_step_settings(tmp_path, "s.json", {"a": 1}, lambda saved: [] if saved.get("a") == 1 else ["a"],
                                   "DogeStep")
    assert "s.json" in str(info.value)
