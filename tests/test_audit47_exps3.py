"""Audit 47 (exps3: quarot, distill, denseformer, landmark_passkey, kernel_report): silent
reporting problems.  Training / evaluation / timing helpers are replaced by fakes returning known
numbers; the full presets never run."""
import json
import math
import types

import numpy as np
import pytest


def _capture_figures(monkeypatch):
    """Keep every figure the plot closes (to read its lines / legend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    return figs, real_close


# ----------------------------------------------------------------------------- quarot
def _run_quarot(tmp_path, monkeypatch, ppl, dtype="float32"):
    import jaxformers as jf
    import jaxformers.quant
    import jaxformers.training
    from experiments import quarot as exp

    cfg = jf.get_config("llama", "tiny", vocab_size=260, d_model=16, n_layer=1, n_head=2, n_kv_head=1, d_ff=32,
                        max_seq_len=32)
    monkeypatch.setattr(exp, "_load_source", lambda args, preset, out: (
        cfg, {"p": 1}, "DATA", "TOK", dict(batch_size=2, seq_len=16, eval_batches=1), dtype, None))
    monkeypatch.setattr(exp, "check_data_vocab", lambda *a: None)
    monkeypatch.setattr(exp, "calibration_tokens", lambda data, tok, n, seq_len, seed: np.zeros((n, seq_len), np.int32))
    monkeypatch.setattr(jaxformers.quant, "quantize", lambda c, p, spec, calibration=None: (spec, p))
    monkeypatch.setattr(jaxformers.training, "evaluate", lambda model, data, **kw: {
        "val_loss": math.log(ppl[model[0].rotate]), "val_ppl": ppl[model[0].rotate]})
    monkeypatch.setattr(exp, "outlier_stats", lambda *a: {"original": {}, "rotated": {}})
    monkeypatch.setattr(exp, "int8_table", lambda shapes, dtype: [])
    monkeypatch.setattr(exp, "plot", lambda results, out: None)
    res = exp.main(["--out", str(tmp_path), "--calib", "2", "--only", "fp,fp_rot", "--int-schemes", "none",
                    "--no-compile-cache"])
    return res, json.loads((tmp_path / "results.json").read_text())


def test_quarot_records_fp_rot_vs_fp_within_tolerance(tmp_path, monkeypatch, capsys):
    res, saved = _run_quarot(tmp_path, monkeypatch, {False: 10.0, True: 10.0001})
    rc = saved["fp_rot_vs_fp"]
    assert rc["fp_val_ppl"] == 10.0 and rc["fp_rot_val_ppl"] == 10.0001
    assert rc["val_ppl_delta"] == pytest.approx(1e-4) and rc["rel_ppl_diff"] == pytest.approx(1e-5)
    assert rc["val_loss_delta"] == pytest.approx(math.log(10.0001) - math.log(10.0))
    assert rc["tolerance"] == 1e-3 and rc["within_tolerance"] is True
    assert saved["complete"] is True and res["fp_rot_vs_fp"] == rc
    err = capsys.readouterr().err
    assert "fp_rot vs fp" in err and "WARNING" not in err


def test_quarot_flags_a_rotated_model_that_does_not_match(tmp_path, monkeypatch, capsys):
    # 1 % apart: far beyond float32 rounding (a broken rotation), but within the bf16 tolerance
    _, saved = _run_quarot(tmp_path, monkeypatch, {False: 10.0, True: 10.1})
    rc = saved["fp_rot_vs_fp"]
    assert rc["rel_ppl_diff"] == pytest.approx(0.01) and rc["within_tolerance"] is False
    assert saved["complete"] is True  # still written
    assert "WARNING" in capsys.readouterr().err
    _, saved = _run_quarot(tmp_path / "bf16", monkeypatch, {False: 10.0, True: 10.1}, dtype="bfloat16")
    assert saved["fp_rot_vs_fp"]["tolerance"] == 2e-2 and saved["fp_rot_vs_fp"]["within_tolerance"] is True


def test_quarot_rotation_check_without_both_schemes_and_with_nan():
    from experiments import quarot as exp

    assert exp.rotation_check({"fp": {"val_ppl": 2.0, "val_loss": 0.7}}, "float32") is None
    rc = exp.rotation_check({"fp": {"val_ppl": 2.0, "val_loss": 0.7},
                             "fp_rot": {"val_ppl": float("nan"), "val_loss": float("nan")}}, "float32")
    assert rc["within_tolerance"] is False


# ----------------------------------------------------------------------------- distill
def test_distill_records_validation_set_size_and_prints_k(tmp_path, monkeypatch, capsys):
    import jaxformers.distill
    import jaxformers.training
    import jaxformers.training.rundir
    from experiments import distill

    params_of = {}

    def fake_stage(name, cfg, tc, record, *, reuse, **kw):
        params_of[tc.out_dir] = {"w": np.zeros(1, np.float32)}
        return {"n_params": 1, "val_loss": 0.5}, False

    class FakeStep:
        settings = {"kl_weight": 1.0}

        def __init__(self, *a, **k):
            pass

    kl_rows = []
    monkeypatch.setattr(distill, "train_stage", fake_stage)
    monkeypatch.setattr(jaxformers.training, "load_run", lambda d: (None, None, params_of[str(d)]))
    monkeypatch.setattr(jaxformers.distill, "DistillStep", FakeStep)
    monkeypatch.setattr(jaxformers.distill, "init_student", lambda *a, **k: {"w": np.zeros(0, np.float32)})
    monkeypatch.setattr(jaxformers.training.rundir, "read_metrics", lambda d: [{"loss": 1.0}])
    monkeypatch.setattr(distill, "mean_kl", lambda t, tp, s, sp, rows, mask: kl_rows.append(len(rows)) or 0.1)
    monkeypatch.setattr(distill, "throughput", lambda m, p, b, n: 1.0)
    monkeypatch.setattr(distill, "sample_problems", lambda *a: (1.0, 0.5, 0.5))
    monkeypatch.setattr(distill, "plot", lambda results, out: [])
    distill.main(["--out", str(tmp_path), "--problems", "2", "--samples", "4,1", "--speed-batches", "1",
                  "--speed-lengths", "16", "--students", "mamba2_random", "--no-compile-cache"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["val_sequences"] == 64 == distill.VAL_SEQUENCES
    assert set(kl_rows) == {64}  # the KL numbers are over those sequences
    # the printed summary says which k each coverage belongs to (the order given: 4, 1)
    text = capsys.readouterr().out
    printed = json.loads(text[text.index("{"):])
    assert printed["teacher"]["k"] == [4, 1] and len(printed["teacher"]["coverage"]) == 2


def test_distill_plot_draws_lines_in_increasing_x(tmp_path, monkeypatch):
    from experiments import distill

    figs, real_close = _capture_figures(monkeypatch)
    # --samples 16,4,1 and --speed-batches 64,1,16: rows in the order given
    budget = [{"k": k, "seconds_per_problem": 0.001 * k, "coverage": 0.1 * i, "majority_accuracy": 0.05 * i}
              for i, k in enumerate((16, 4, 1))]
    throughput = [{"batch": b, "length": 32, "tokens_per_s": 10.0 * b} for b in (64, 1, 16)]
    results = {"task": "t", "temperature": 1.0,
               "models": {"teacher": {"budget": budget, "throughput": throughput}}}
    distill.plot(results, tmp_path)
    fig = figs[-1]
    cov, maj, tp = (ax.get_lines()[0] for ax in fig.axes)
    assert list(cov.get_xdata()) == [1.0, 4.0, 16.0]  # ms, increasing
    assert list(cov.get_ydata()) == pytest.approx([0.2, 0.1, 0.0])  # each k's own numbers, unchanged
    assert list(maj.get_ydata()) == pytest.approx([0.1, 0.05, 0.0])
    assert list(tp.get_xdata()) == [1, 16, 64] and list(tp.get_ydata()) == [10.0, 160.0, 640.0]
    real_close(fig)


# ----------------------------------------------------------------------------- denseformer
def test_denseformer_records_a_denseformer_without_its_baseline(tmp_path, monkeypatch, capsys):
    from experiments import denseformer
    import jaxformers.models.denseformer as dfm

    def fake_train(name, cfg, out, reusable, **kw):
        return ({"val_loss": 1.0, "val_ppl": math.e, "train_loss": 1.0, "n_params": 10, "tokens_per_s": 5.0,
                 "wall_s": 1.0}, {"id": name}, "float32", types.SimpleNamespace(steps=1, tokens_per_step=4, seq_len=4))

    monkeypatch.setattr(denseformer, "reuse_or_train", fake_train)
    monkeypatch.setattr(denseformer, "prepare_measurement", lambda cfg, params, b, t, dt: (
        (lambda: None), 4, {"infer_peak_bytes": 1, "train_peak_bytes": 2, "memory_method": "fake"}))
    monkeypatch.setattr(denseformer, "time_forwards", lambda fns: {n: 1.0 for n in fns})
    monkeypatch.setattr(dfm, "dwa_weights", lambda cfg, params: (np.ones((1, 2)), [cfg.n_layer]))
    monkeypatch.setattr(denseformer, "plot_ppl_vs_depth", lambda *a: None)
    monkeypatch.setattr(denseformer, "plot_alpha", lambda *a: None)
    denseformer.main(["--out", str(tmp_path), "--no-compile-cache", "--only", "denseformer_1x1_L4,gpt_L6"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["dwa_overhead"] == {}
    miss = saved["dwa_overhead_missing"]
    assert [m["model"] for m in miss] == ["denseformer_1x1_L4"] and "gpt_L4" in miss[0]["reason"]
    assert "denseformer_1x1_L4: no dwa_overhead" in capsys.readouterr().out


# ----------------------------------------------------------------------------- landmark_passkey
def test_passkey_plot_legend_orders_top_k_numerically(tmp_path, monkeypatch):
    from experiments import landmark_passkey as pk

    figs, real_close = _capture_figures(monkeypatch)
    results = {"train_len_raw": 10, "preset": "tiny", "seed": 0,
               "models": {"baseline": {"accuracy": {"1": 1.0, "2": 0.5}},
                          "landmark": {"accuracy": {"top16": {"1": 1.0, "2": 0.9}, "top2": {"1": 1.0, "2": 0.7},
                                                    "top4": {"1": 1.0, "2": 0.8}}}}}
    pk.plot(results, tmp_path / "p.png")
    ax = figs[-1].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["baseline (full attention)", "landmark, memory top2", "landmark, memory top4",
                      "landmark, memory top16"]
    real_close(figs[-1])


# ----------------------------------------------------------------------------- kernel_report
def _fake_report_cases(monkeypatch, with_calls):
    from experiments import kernel_report as kr

    case = kr.Case(fn=None, args=(), tpu_vmem=lambda: {})
    monkeypatch.setattr(kr, "cases", lambda preset, families: [
        ("ssd", "default (chunk 64)", lambda: case), ("ssd", "chunk 32", lambda: case)])
    monkeypatch.setattr(kr, "tpu_columns", lambda c: {})
    call = types.SimpleNamespace(name="ssd_fwd")
    # the first configuration lowers to no Triton call
    it = iter([[], [call] if with_calls else []])
    monkeypatch.setattr(kr, "triton_calls", lambda fn, *a, arch: next(it))
    monkeypatch.setattr(kr, "compile_report", lambda c, arch: {
        "name": c.name, "arch": f"sm_{arch}", "triton_version": "x", "num_warps": 4, "registers": 100,
        "stack_bytes": 0, "local_bytes": 0, "shared_bytes": 1024, "fits": True, "wgmma": 1, "mma_sync": 0,
        "ctas_per_sm": 2})
    return kr


def test_kernel_report_records_configurations_without_triton_calls(tmp_path, monkeypatch):
    kr = _fake_report_cases(monkeypatch, with_calls=True)
    kr.main(["--families", "ssd", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["name"], r["config"]) for r in res["rows"]] == [("ssd_fwd", "chunk 32")]
    assert res["no_triton_calls"] == [{"family": "ssd", "config": "default (chunk 64)"}]
    assert res["complete"] is True


def test_kernel_report_with_no_rows_writes_a_plot_saying_so(tmp_path, monkeypatch):
    kr = _fake_report_cases(monkeypatch, with_calls=False)
    kr.main(["--families", "ssd", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["rows"] == [] and len(res["no_triton_calls"]) == 2 and res["complete"] is True
    assert (tmp_path / "kernel_report.png").stat().st_size > 0


def test_kernel_report_plot_shows_families_without_a_default_label(tmp_path, monkeypatch):
    """Sparse / landmark attention configurations are labelled by shape ("hash 16 buckets D64"),
    never "default": the default-tiles plot left those families out entirely."""
    from experiments import kernel_report as kr

    figs, real_close = _capture_figures(monkeypatch)

    def row(family, config, name):
        return {"family": family, "config": config, "name": name, "arch": "sm_90", "triton_version": "x",
                "registers": 100, "shared_bytes": 1024, "spills": False, "fits": True}

    rows = [row("attention D64", "default", "flash_attention_fwd"),
            row("attention D64", "fwd 128x128 w8 s2", "flash_attention_fwd"),  # a sweep row: not shown
            row("sparse_attention", "hash 16 buckets D64", "sparse_attention_fwd"),
            row("landmark_attention", "block 64 D64", "landmark_attention_fwd")]
    kr.plot(rows, tmp_path / "k.png")
    labels = [t.get_text() for t in figs[-1].axes[0].get_xticklabels()]
    assert labels == ["attention D64\nflash_attention_fwd",
                      "sparse_attention\nsparse_attention_fwd\nhash 16 buckets D64",
                      "landmark_attention\nlandmark_attention_fwd\nblock 64 D64"]
    real_close(figs[-1])
