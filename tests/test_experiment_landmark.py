"""Smoke tests of ``python -m experiments.landmark_passkey`` and ``experiments.landmark_lm``
(a few steps, small widths, two lengths, top-k 1)."""
import json

from experiments import landmark_lm, landmark_passkey


def test_passkey_generator():
    import numpy as np
    tokens, mask, answer = landmark_passkey.passkey_batch(np.random.default_rng(0), 3, 40, 3)
    assert tokens.shape == mask.shape == (3, 40) and answer.tolist() == [37, 38, 39]
    for row in tokens:
        k = int(np.nonzero(row == landmark_passkey.KEY)[0][0])
        assert row[36] == landmark_passkey.QUERY
        assert row[k + 1:k + 4].tolist() == row[37:].tolist()      # the passkey is the answer
    assert mask.sum() == 9 and mask[:, 37:].all()


def test_passkey_experiment_writes_results(tmp_path):
    out = tmp_path / "pk"
    res = landmark_passkey.main(["--preset", "tiny", "--out", str(out), "--steps", "2",
                                 "--factors", "2", "--top-k", "1", "--eval-samples", "2",
                                 "--d-model", "32", "--n-layer", "1"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is True  # rewritten as it went, finished at the end
    assert saved["models"]["baseline"]["accuracy"].keys() == {"2"}
    assert saved["models"]["landmark"]["accuracy"]["top1"].keys() == {"2"}
    assert all(0 <= a <= 1 for a in res["models"]["landmark"]["accuracy"]["top1"].values())
    assert (out / "passkey.png").stat().st_size > 1000


def test_lm_experiment_writes_results(tmp_path):
    out = tmp_path / "lm"
    landmark_lm.main(["--preset", "tiny", "--out", str(out), "--steps", "2", "--factors", "2",
                      "--top-k", "1", "--eval-windows", "1", "--d-model", "32", "--n-layer", "1",
                      "--no-compile-cache"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is True  # rewritten as it went, finished at the end
    assert saved["ppl"].keys() == {"2"}
    for row in saved["ppl"].values():
        assert row.keys() == {"baseline_full", "landmark_top1", "landmark_all"}
        assert all(v > 1 for v in row.values())
    cost = saved["cost"]["2"]
    assert cost["landmark_top1_host"]["device_memory_bytes"] == 0
    assert cost["landmark_top1_host"]["device_transfer_bytes"] > 0  # per-layer gathered blocks
    assert cost["baseline_kv_cache"]["memory_bytes"] > 0 and cost["landmark_top1"]["memory_bytes"] > 0
    decode = saved["decode"]  # one context per evaluation length: 2 x 90 raw tokens
    assert decode.keys() == {"180"}
    assert decode["180"].keys() == {"baseline_kv_cache", "landmark_kv_cache", "landmark_memory_top1"}
    assert all(v > 0 for v in decode["180"].values())
    assert (out / "landmark_lm.png").stat().st_size > 1000
