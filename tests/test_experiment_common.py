"""Helpers shared by the experiments."""
import json

from experiments.common import save_progress


def test_save_progress_writes_what_is_finished_marked_incomplete(tmp_path):
    results = {"models": {"a": {"val_ppl": 3.5}}}
    save_progress(tmp_path / "out", results)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == {"models": {"a": {"val_ppl": 3.5}}, "complete": False}
    assert "complete" not in results  # the caller's dict is not changed
