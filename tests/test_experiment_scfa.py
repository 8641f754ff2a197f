"""Smoke tests of ``python -m experiments.scfa_lm`` (2 steps) and ``experiments.scfa_speed --quick``."""
import json

from experiments import scfa_lm, scfa_speed


def test_scfa_lm_experiment_writes_results(tmp_path):
    out = tmp_path / "lm"
    results = scfa_lm.main(["--preset", "tiny", "--out", str(out), "--steps", "2", "--eval-batches", "1",
                            "--only", "hash_nb4", "--no-kernel-check",
                            "--no-compile-cache"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"].keys() == results["models"].keys() == {"hash_nb4_T128"}  # one model: CI time
    assert saved["complete"] is True  # written after every model with complete=False, then finished
    for row in saved["models"].values():
        for key in ("val_ppl", "step_time_s", "attention_tiles_per_step", "train_tokens"):
            assert row[key] is not None, key
        assert row["val_ppl"] > 1 and row["step_time_s"] > 0
        assert row["dense_attention_tiles_per_step"] == 2 * 8 * 4 * 36  # layers x batch x heads x (8*9/2)
    rows = saved["models"]
    assert rows["hash_nb4_T128"]["train_tokens"] == 2 * 8 * 128
    for name in ("hash_nb4_T128",):  # sparse: fewer tiles than dense causal
        assert 0 < rows[name]["tile_fraction"] < 1
        assert len(rows[name]["tiles_per_sparse_layer"]) == 2
    assert (out / "scfa_lm.png").stat().st_size > 1000


def test_scfa_speed_quick(tmp_path):
    scfa_speed.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = {r["impl"]: r for r in saved["rows"]}
    assert {"flash", "hash_nb2", "hash_nb4", "qk_keep0.5"} <= rows.keys()
    for name in ("flash", "hash_nb2", "hash_nb4", "qk_keep0.5"):
        assert rows[name]["fwd_ms"] > 0 and rows[name]["fwd_bwd_ms"] > 0, rows[name]
    for name in ("hash_nb2", "hash_nb4", "qk_keep0.5"):
        assert 0 < rows[name]["tile_fraction"] <= 1
        assert rows[name]["speedup_vs_flash_fwd"] is not None
    assert (tmp_path / "speedup_vs_T.png").stat().st_size > 1000
