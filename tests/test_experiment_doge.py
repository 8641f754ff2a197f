"""Smoke test of ``python -m experiments.doge`` (a few steps on small domains, every stage)."""
import json

from experiments import doge as exp


def test_doge_experiment_writes_results(tmp_path):
    out = tmp_path / "doge"
    results = exp.main(["--preset", "tiny", "--out", str(out), "--steps", "2", "--proxy-steps", "3",
                        "--eval-batches", "1", "--max-bytes", "30000", "--no-compile-cache"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is True  # rewritten as it went, finished at the end
    assert saved["doge_weights"] == results["doge_weights"]
    assert set(saved["doge_weights"]) == set(exp.DOMAINS)
    assert abs(sum(saved["doge_weights"].values()) - 1) < 1e-5
    assert saved["weight_history"]["steps"][-1] == 3
    assert set(saved["base_runs"]) == {"uniform", "doge", "proportional"}
    for run in saved["base_runs"].values():
        assert run["avg_ppl"] > 1 and all(d["val_ppl"] > 1 for d in run["domains"].values())
    ood = saved["ood"]
    assert ood["target"] == "poems" and ood["doge_weights"]["poems"] == 0.0
    assert ood["runs"]["doge_ood"]["weights"]["poems"] == 0.0 and ood["runs"]["uniform"]["target_val_ppl"] > 1
    for png in ("weights.png", "ppl.png"):
        assert (out / png).stat().st_size > 1000
