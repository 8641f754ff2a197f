"""Smoke test of ``python -m experiments.cotformer`` (a few steps, a small width, two models;
``n_repeat=1`` == gpt is tests/test_cotformer.py's)."""
import json

from experiments import cotformer as exp


def test_cotformer_experiment_writes_results(tmp_path):
    out = tmp_path / "cot"
    results = exp.main(["--preset", "tiny", "--out", str(out), "--steps", "2", "--eval-batches", "1",
                        "--d-model", "32", "--seq-len", "16", "--batch-size", "2",
                        "--only", "cotformer_L2x2,adaptive_L2x3", "--budgets", "0,0;1,1",
                        "--no-compile-cache"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"].keys() == results["models"].keys() == {"cotformer_L2x2", "adaptive_L2x3"}
    for row in saved["models"].values():
        for key in ("val_ppl", "n_params", "macs_per_token", "average_depth", "train_tokens_per_s",
                    "infer_tokens_per_s"):
            assert row[key] is not None and row[key] > 0, key
    m = saved["models"]
    assert m["cotformer_L2x2"]["macs_per_token"] < m["adaptive_L2x3"]["macs_per_token"]
    assert m["cotformer_L2x2"]["average_depth"] == 4
    curve = saved["adaptive_curve"]
    assert [p["length_factors"] for p in curve] == [[0.0, 0.0], [1.0, 1.0]]
    assert curve[0]["macs_per_token"] < curve[1]["macs_per_token"]
    assert curve[0]["tokens_per_repeat"] == [16, 0, 0] and curve[1]["average_depth"] == 6
    assert all(p["val_ppl"] > 1 and p["infer_tokens_per_s"] > 0 for p in curve)
    assert (out / "ppl_vs_macs.png").stat().st_size > 1000
