"""Smoke test of ``python -m experiments.layer_parallel`` (a few steps, 4 layers, one pair);
the transform's invariants are tests/test_layer_parallel.py's."""
import json

from experiments import layer_parallel as exp


def test_spans_cover_positions_and_never_pair_the_first_or_last_layer():
    assert exp.spans(8) == [("early", 1, 3), ("middle", 3, 5), ("late", 5, 7), ("early", 1, 5),
                            ("middle", 2, 6), ("late", 3, 7), ("early", 1, 7)]
    assert exp.spans(8, max_pairs=1, positions=("late",)) == [("late", 5, 7)]


def test_layer_parallel_experiment_writes_results(tmp_path):
    out = tmp_path / "lp"
    results = exp.main(["--preset", "tiny", "--out", str(out), "--steps", "2", "--eval-batches", "1",
                        "--n-layer", "4", "--d-model", "32", "--seq-len", "16", "--batch-size", "2",
                        "--decode-tokens", "3", "--iters", "1", "--no-compile-cache"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["pairs"] == results["pairs"]
    base = saved["baseline"]
    assert base["val_ppl"] > 1 and 0 <= base["val_acc"] <= 1
    # 4 layers: one span (1, 3), with the per-layer and the authors' mean MLP norm
    assert [(r["start"], r["end"], r["mlp_norm"]) for r in saved["pairs"]] == [(1, 3, "own"), (1, 3, "mean")]
    for row in saved["pairs"]:
        assert row["effective_depth"] == 3 and row["val_ppl"] > 1
        for key in ("prefill", "decode_b1", "decode_b2"):
            assert row[f"{key}_tokens_per_s"] > 0 and row[f"{key}_speedup"] > 0
    st = saved["study"]
    assert [d["layer"] for d in st["delete"]] == [0, 1, 2, 3]
    assert [s["layers"] for s in st["swap"]] == [[0, 1], [1, 2], [2, 3]]
    assert len(st["shuffle"]) == 2 and all(sorted(s["order"]) == [0, 1, 2, 3] for s in st["shuffle"])
    assert (out / "layer_parallel.png").stat().st_size > 1000
