"""``python -m experiments.kernel_report`` runs end to end (needs ``triton``; no GPU)."""
import json
import os

import pytest

from experiments import kernel_report


def test_kernel_report_quick_selective_scan(tmp_path):
    pytest.importorskip("triton")
    kernel_report.main(["--preset", "quick", "--families", "selective_scan", "--out", str(tmp_path)])
    res = json.load(open(tmp_path / "results.json"))
    assert res["arch"] == "sm_90" and res["families"] == ["selective_scan"]
    names = sorted(r["name"] for r in res["rows"])
    assert names == ["selective_scan_bwd", "selective_scan_chunk_states", "selective_scan_fwd"]
    for r in res["rows"]:
        assert r["fits"] and not r["spills"] and r["registers"] > 0 and r["ctas_per_sm"] >= 1
    assert os.path.getsize(tmp_path / "kernel_report.png") > 0


def test_kernel_report_rejects_unknown_family(tmp_path):
    with pytest.raises(SystemExit):
        kernel_report.main(["--families", "attn", "--out", str(tmp_path)])
