"""Smoke test of ``python -m experiments.quarot`` (a few steps, three schemes)."""
import json

from experiments import quarot as exp


def test_quarot_experiment_writes_results(tmp_path):
    out = tmp_path / "quarot"
    results = exp.main(["--preset", "tiny", "--out", str(out), "--steps", "3", "--eval-batches", "1",
                        "--seq-len", "32", "--batch-size", "4", "--calib", "4",
                        "--only", "fp_rot,W4A4KV4_GPTQ_rot", "--int-schemes", "W4A4",
                        "--no-compile-cache"])
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["schemes"]) == list(results["schemes"]) == ["fp_rot", "W4A4KV4_GPTQ_rot"]
    s = saved["schemes"]
    # the rotated model scores what the trained one did at the end of training (same batches)
    assert abs(s["fp_rot"]["val_loss"] - saved["train_summary"]["val_loss"]) < 1e-4
    assert all(r["val_ppl"] > 1 for r in s.values())
    for label in ("original", "rotated"):
        rows = saved["outliers"][label]
        assert {"blocks_0/attn_in", "blocks_0/o_in", "blocks_0/mlp_in", "blocks_0/down_in"} <= set(rows)
        assert all(r["max_over_median"] >= 1 for r in rows.values())
    assert all(r["max_rel_diff_vs_fake_quant"] < 1e-4 for r in saved["int8_linear"])
    ip = saved["int_path"]
    assert [r["scheme"] for r in ip["schemes"]] == ["W4A4"] and ip["tokens"] == [4, 32]
    row = ip["schemes"][0]  # equal up to float rounding (and rare activation-code flips)
    assert row["max_rel_logit_diff"] < 0.05 and abs(row["nll_int"] - row["nll_fake_quant"]) < 1e-3
    mem = ip["weight_memory"]
    assert mem["bfloat16"]["total"] * 2 == mem["float32"]["total"]
    assert 0.125 < mem["int4_packed"]["ratio_to_float32"] < 0.16 < 0.25 < mem["int8"]["ratio_to_float32"] < 0.3
    for png in ("quarot_ppl.png", "quarot_outliers.png", "quarot_int.png"):
        assert (out / png).stat().st_size > 1000
