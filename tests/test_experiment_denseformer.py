"""Smoke test of ``python -m experiments.denseformer`` (a few steps, two models)."""
import json

from experiments import denseformer as exp


def test_denseformer_experiment_writes_results(tmp_path):
    out = tmp_path / "df"
    results = exp.main(["--preset", "tiny", "--out", str(out), "--steps", "2", "--eval-batches", "1",
                        "--only", "gpt_L4,denseformer_2x2_L4", "--no-compile-cache"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is True  # rewritten as it went, finished at the end
    assert saved["models"].keys() == results["models"].keys() == {"gpt_L4", "denseformer_2x2_L4"}
    for row in saved["models"].values():
        for key in ("val_loss", "val_ppl", "n_params", "train_tokens_per_s", "infer_tokens_per_s",
                    "infer_peak_bytes", "train_peak_bytes", "memory_method", "n_layer"):
            assert row[key] is not None, key
        assert row["val_ppl"] > 1 and row["infer_tokens_per_s"] > 0
    dense = saved["models"]["denseformer_2x2_L4"]
    assert dense["dwa_after_blocks"] == [2, 4] and len(dense["alpha"]) == 2 and len(dense["alpha"][0]) == 5
    assert dense["n_params"] - saved["models"]["gpt_L4"]["n_params"] == 10  # 2 rows x 5 columns
    assert "denseformer_2x2_L4" in saved["dwa_overhead"]
    for png in ("ppl_vs_depth.png", "alpha_heatmap.png"):
        assert (out / png).stat().st_size > 1000
