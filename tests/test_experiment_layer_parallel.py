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


def test_layer_parallel_run_checks(tmp_path, capsys):
    """A scanned ``--run`` is unrolled before the baseline is timed (its speed-ups compared the
    scanned layer loop with unrolled pairs); a non-gpt/llama run and data whose vocabulary
    exceeds the model's are usage errors before any evaluation."""
    import jax
    import pytest

    import jaxformers as jf
    from jaxformers.convert import to_hf
    from jaxformers.training import TrainConfig, train

    kw = dict(vocab_size=257, d_model=32, n_layer=4, n_head=4, max_seq_len=64)

    def mk(name, cfg):
        train(cfg, TrainConfig(seed=0, data="default", out_dir=str(tmp_path / name), steps=2, batch_size=2,
                               seq_len=16, warmup_steps=0, eval_every=0, eval_batches=1, checkpoint_every=0),
              progress=False)
        return str(tmp_path / name)
    common = ["--eval-batches", "1", "--seq-len", "16", "--batch-size", "2", "--decode-tokens", "3",
              "--iters", "1", "--no-study", "--no-compile-cache"]
    scanned = mk("scanned", jf.get_config("llama", "tiny", n_kv_head=2, d_ff=64, scan_layers=True, **kw))
    res = exp.main(["--run", scanned, "--out", str(tmp_path / "o1"), *common])
    assert res["source"]["unrolled_from_scan"] is True and res["baseline"]["decode_b1_tokens_per_s"] > 0
    assert [(r["start"], r["end"]) for r in res["pairs"]] == [(1, 3), (1, 3)]
    dense = mk("dense", jf.get_config("denseformer", "tiny", **kw))
    with pytest.raises(SystemExit):
        exp.main(["--run", dense, "--out", str(tmp_path / "o2"), *common])
    assert "got model 'denseformer'" in capsys.readouterr().err
    small = jf.get_config("llama", "tiny", **dict(kw, vocab_size=100))
    to_hf(small, jf.init_params(jf.build(small), jax.random.PRNGKey(0)), str(tmp_path / "hf100"))
    with pytest.raises(SystemExit):
        exp.main(["--run", str(tmp_path / "hf100"), "--data", "default", "--tokenizer", "byte",
                  "--out", str(tmp_path / "o3"), *common])
    assert "vocabulary of 257 > the model's vocab_size=100" in capsys.readouterr().err
    assert not any((tmp_path / o / "results.json").exists() for o in ("o2", "o3"))
