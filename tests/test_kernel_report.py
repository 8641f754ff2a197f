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


def test_occupancy_bounds_by_registers_shared_memory_warps_and_ctas():
    from pallas_kernels.triton_inspect import occupancy
    # 24 regs x 4 warps: registers allow 21 CTAs, but sm_90 holds 64 warps = 16 such CTAs
    assert occupancy(24, 0, 4, 90) == 16
    assert occupancy(24, 0, 4, 86) == 12  # 48 warps on sm_86
    assert occupancy(16, 0, 2, 90) == 32 and occupancy(16, 0, 2, 86) == 16  # the CTA limit
    assert occupancy(253, 96 * 1024, 8, 90) == 1  # the flash D128 forward's row in BENCHMARKS.md
    assert occupancy(48, 0, 2, 90) == 21  # the selective-scan forward's
    # shared memory: 48 KiB + 1 KiB reserved per block: 228 KiB -> 4, 164 KiB (A100) -> 3
    assert occupancy(32, 48 * 1024, 4, 90) == 4 and occupancy(32, 48 * 1024, 4, 80) == 3
    with pytest.raises(ValueError, match="arch must be one of"):
        occupancy(32, 0, 4, 70)


def test_kernel_report_for_an_a100_uses_its_limits(tmp_path):
    """``--arch 80``: compiled for sm_80 (no wgmma there: the dots become mma.sync), ``fits``
    against the A100's 163 KiB per block: the D256 forward at 64x64 with 3 stages needs 168 KiB
    compiled for sm_80 (224 KiB for sm_90, where it fits) and does not fit an A100."""
    pytest.importorskip("triton")
    from pallas_kernels.triton_inspect import compile_report, triton_calls
    kernel_report.main(["--preset", "quick", "--families", "hadamard", "--arch", "80", "--out", str(tmp_path)])
    res = json.load(open(tmp_path / "results.json"))
    assert res["arch"] == "sm_80" and res["rows"]
    for r in res["rows"]:
        assert r["arch"] == "sm_80" and r["wgmma"] == 0 and r["mma_sync"] > 0 and r["fits"], r
    import jax
    import jax.numpy as jnp
    from pallas_kernels.flash_attention import BlockSizes, flash_attention
    q = jax.ShapeDtypeStruct((1, 256, 1, 256), jnp.bfloat16)
    blocks = BlockSizes(block_q=64, block_k=64, num_warps=8, num_stages=3)
    calls = triton_calls(lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=blocks,
                                                         interpret=False), q, q, q, arch=80)
    fwd = [c for c in calls if c.name.endswith("fwd")]
    assert len(fwd) == 1
    on_a100, on_h100 = compile_report(fwd[0], arch=80), compile_report(fwd[0], arch=90)
    assert 163 * 1024 < on_a100["shared_bytes"] and on_h100["shared_bytes"] <= 227 * 1024
    assert on_h100["fits"] and not on_a100["fits"] and on_a100["wgmma"] == 0 < on_h100["wgmma"]
