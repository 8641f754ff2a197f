"""experiments.bench_models --quick: every row runs (or records its failure) and results.json is complete."""
import json

from experiments import bench_models


def test_bench_models_quick(tmp_path, capsys):
    # one T (the loop over T is plain Python) and one timed call per row: the compiles are the cost
    results = bench_models.main(["--quick", "--seq-lens", "64", "--warmup", "0", "--iters", "1",
                                 "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    for key in ("device", "device_kind", "date", "jax_version", "compute_dtype", "config"):
        assert saved[key], key
    rows = saved["rows"]
    # 2 models x (1 train + 1 prefill + 2 generate)
    assert len(rows) == 8
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    for model in ("gpt", "mamba"):
        train = [r for r in rows if r["model"] == model and r["kind"] == "train"]
        assert [(r["seq_len"], r["batch"]) for r in train] == [(64, 8)]  # B = --quick's 512 tokens // T
        gen = [r for r in rows if r["model"] == model and r["kind"] == "generate"]
        assert [r["batch"] for r in gen] == [1, 4]
        assert all(r["tokens_per_s"] > 0 and r["ms"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "tok/s" in out and "jax" in out


def test_oom_is_recorded():
    def boom():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

    row = bench_models._run_row({"kind": "train", "model": "gpt"}, boom)
    assert row["status"] == "oom" and "RESOURCE_EXHAUSTED" in row["error"]
    row = bench_models._run_row({"kind": "train", "model": "gpt"}, lambda: 1 / 0)
    assert row["status"] == "error"
