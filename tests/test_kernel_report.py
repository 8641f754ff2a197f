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


def test_tpu_attention_columns():
    """The attention rows' TPU columns: Mosaic lowering succeeds, VMEM from the block specs."""
    cols = kernel_report.tpu_attention_columns(64, None, t=512, heads=2)
    assert sorted(cols) == ["flash_attention_bwd_dkdv", "flash_attention_bwd_dq",
                            "flash_attention_fwd"]
    for c in cols.values():
        assert c["tpu_lowers"] and c["tpu_error"] is None
        assert 0 < c["tpu_vmem_bytes"] < 16 * 2**20
    # fwd: q + o tiles [128, 128] bf16, the head's whole K and V [512, 128], lse [128, 1] -> x2
    assert cols["flash_attention_fwd"]["tpu_vmem_bytes"] == 2 * (
        2 * 128 * 128 * 2 + 2 * 512 * 128 * 2 + 128 * 128 * 4)


@pytest.mark.parametrize("family", ["selective_scan", "ssd", "sparse_attention", "landmark_attention",
                                    "hadamard"])
def test_tpu_columns_of_every_family(family):
    """Every kernel family's rows get TPU columns: the Mosaic lowering of the same gradient
    succeeds and each TPU kernel has a VMEM figure (named like its Triton kernel)."""
    case = {"selective_scan": kernel_report.scan_case, "ssd": kernel_report.ssd_case,
            "sparse_attention": lambda: kernel_report.sparse_case("hash", 64, t=512, heads=2),
            "landmark_attention": lambda: kernel_report.landmark_case(64, t=512, heads=2),
            "hadamard": lambda: kernel_report.hadamard_case(128, rows=256)}[family]()
    cols = kernel_report.tpu_columns(case)
    assert len(cols) >= (1 if family == "hadamard" else 3)
    assert all(name.startswith(family) for name in cols)
    for c in cols.values():
        assert c["tpu_lowers"] and c["tpu_error"] is None, c
        assert 0 < c["tpu_vmem_bytes"] < 32 * 2**20
