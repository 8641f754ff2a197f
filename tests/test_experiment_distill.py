"""Smoke test of ``python -m experiments.distill`` (tiny teacher, one attention-initialised hybrid
and a random-init mamba2 student, two sample counts)."""
import json

from experiments import distill as exp


def test_distill_experiment_writes_results(tmp_path):
    out = tmp_path / "distill"
    results = exp.main(["--preset", "tiny", "--out", str(out), "--teacher-steps", "20", "--steps", "3", "--align-steps", "2",
                        "--students", "hybrid,mamba2_random", "--problems", "4", "--samples", "1,2",
                        "--speed-batches", "2", "--speed-lengths", "24",
                        "--no-compile-cache"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is True  # rewritten as it went, finished at the end
    assert set(saved["models"]) == set(results["models"]) == {"teacher", "hybrid", "mamba2_random"}
    for name, row in saved["models"].items():
        assert [p["k"] for p in row["budget"]] == [1, 2]
        assert all(p["seconds_per_problem"] > 0 and 0 <= p["coverage"] <= 1 for p in row["budget"])
        assert row["throughput"] and all(p["tokens_per_s"] > 0 for p in row["throughput"])
    for name, s in saved["students"].items():
        assert s["kl_init"] > 0 and s["kl_final"] >= 0 and s["val_loss"] > 0
        assert (tmp_path / "distill" / "runs" / name / "config.json").is_file()  # a normal run directory
    assert saved["students"]["hybrid"]["attn_layers"] == [3]
    assert saved["students"]["hybrid"]["align_steps"] == 2 and saved["students"]["hybrid"]["kl_aligned"] > 0
    assert saved["students"]["mamba2_random"]["kl_aligned"] is None
    assert (out / "coverage.png").stat().st_size > 1000
