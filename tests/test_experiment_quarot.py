"""Smoke test of ``python -m experiments.quarot`` (a few steps, three schemes)."""
import json

from experiments import quarot as exp


def test_quarot_experiment_writes_results(tmp_path, capsys):
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
    assert saved["outlier_sequences"] == 4  # min(--calib, OUTLIER_SEQUENCES)
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
    assert saved["complete"] is True

    # --reuse keeps the trained llama (same settings): not trained again, same numbers
    capsys.readouterr()
    again = exp.main(["--preset", "tiny", "--out", str(out), "--steps", "3", "--eval-batches", "1",
                      "--seq-len", "32", "--batch-size", "4", "--calib", "4", "--only", "fp_rot",
                      "--int-schemes", "none", "--no-compile-cache", "--reuse"])
    assert "reusing" in capsys.readouterr().err
    assert again["schemes"]["fp_rot"]["val_loss"] == s["fp_rot"]["val_loss"]


def test_quarot_on_hf_and_scanned_runs(tmp_path, capsys):
    """``--run`` a HF Llama dir (every HF dir was taken for a run trained here: KeyError
    'model'), a run trained with ``scan_layers`` (failed in ``quantize``), and data whose
    vocabulary exceeds the model's (NaN perplexities, then a crash in the plot): a usage
    error before anything is evaluated."""
    import jax
    import pytest

    import jaxformers as jf
    from jaxformers.convert import to_hf
    from jaxformers.training import TrainConfig, train

    kw = dict(d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64, max_seq_len=64)
    run = tmp_path / "scanned"
    train(jf.get_config("llama", "tiny", vocab_size=257, scan_layers=True, **kw),
          TrainConfig(seed=0, data="default", out_dir=str(run), steps=2, batch_size=2, seq_len=16,
                      warmup_steps=0, eval_every=0, eval_batches=1, checkpoint_every=0), progress=False)
    small = jf.get_config("llama", "tiny", vocab_size=100, **kw)
    to_hf(small, jf.init_params(jf.build(small), jax.random.PRNGKey(0)), str(tmp_path / "hf100"))
    cfg = jf.get_config("llama", "tiny", vocab_size=257, **kw)
    to_hf(cfg, jf.init_params(jf.build(cfg), jax.random.PRNGKey(0)), str(tmp_path / "hf"))
    common = ["--eval-batches", "1", "--seq-len", "16", "--batch-size", "2", "--calib", "2",
              "--only", "fp,W4A4KV4_RTN_rot", "--int-schemes", "none", "--no-compile-cache"]
    for src, extra in ((run, []), (tmp_path / "hf", ["--data", "default", "--tokenizer", "byte"])):
        res = exp.main(["--run", str(src), "--out", str(tmp_path / f"out_{src.name}"), *extra, *common])
        assert all(1 < r["val_ppl"] < 1e4 for r in res["schemes"].values()), res["schemes"]
    with pytest.raises(SystemExit):
        exp.main(["--run", str(tmp_path / "hf100"), "--data", "default", "--tokenizer", "byte",
                  "--out", str(tmp_path / "o100"), *common])
    assert "vocabulary of 257 > the model's vocab_size=100" in capsys.readouterr().err
    assert not (tmp_path / "o100" / "results.json").exists()
