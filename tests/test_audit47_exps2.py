"""Audit 47 (experiments: mamba, distill, quarot, layer_parallel): the numbers each experiment
reports, with its training / evaluation / timing helpers replaced by fakes returning known
numbers, checked against hand-computed values (right run, right metric, right direction)."""
import json
import math
import types

import jax
import pytest

import jaxformers as jf


# ============================================================================ layer_parallel
def _lp_model(n_layer=6):
    cfg = jf.get_config("llama", "tiny", vocab_size=257, d_model=16, n_layer=n_layer, n_head=2, n_kv_head=1,
                        d_ff=32, max_seq_len=64)
    params = jax.device_get(jf.init_params(jf.build(cfg), jax.random.PRNGKey(0)))
    return cfg, params


# 6 layers: spans (1,3) early, (2,4) middle, (3,5) late (+ mean norm), (1,5) early (+ mean norm)
_LP_ROWS = [(1, 3, "own"), (2, 4, "own"), (3, 5, "own"), (3, 5, "mean"), (1, 5, "own"), (1, 5, "mean")]
_LP_TPS = {"baseline": {"prefill": 100.0, "decode_b1": 40.0, "decode_b2": 80.0},
           "1:3": {"prefill": 110.0, "decode_b1": 42.0, "decode_b2": 160.0},
           "2:4": {"prefill": 120.0, "decode_b1": 44.0, "decode_b2": 88.0},
           "3:5": {"prefill": 130.0, "decode_b1": 46.0, "decode_b2": 84.0},
           "1:5": {"prefill": 140.0, "decode_b1": 60.0, "decode_b2": 96.0}}


def _run_lp(tmp_path, monkeypatch, ppls, argv=()):
    """The experiment with an evaluator returning ``ppls`` in call order (baseline first) and
    speeds ``_LP_TPS``; returns (results, saved results.json, the evaluated configs)."""
    from experiments import layer_parallel as exp

    cfg, params = _lp_model()
    monkeypatch.setattr(exp, "load_model", lambda args, preset, out: (cfg, params, "default", "byte",
                                                                      {"source": "test"}))
    seen, it = [], iter(ppls)

    class FakeEvaluator:
        def __init__(self, *a, **k):
            self.batches = [None]

        def __call__(self, c, p):
            seen.append(c)
            ppl = next(it)
            return {"val_loss": math.log(ppl), "val_ppl": ppl, "val_acc": 1.0 / ppl, "val_tokens": 7}

    monkeypatch.setattr(exp, "Evaluator", FakeEvaluator)
    monkeypatch.setattr(exp, "speed_fns", lambda c, p, **kw: {n: (None, 1) for n in _LP_TPS["baseline"]})
    monkeypatch.setattr(exp, "time_all", lambda entries, iters: {k: dict(_LP_TPS[k]) for k in entries})
    monkeypatch.setattr(exp, "plot", lambda results, path: None)
    out = tmp_path / "lp"
    res = exp.main(["--out", str(out), "--n-layer", "6", "--batch-size", "2", "--decode-tokens", "3",
                    "--seq-len", "16", "--no-compile-cache", *argv])
    return res, json.loads((out / "results.json").read_text()), seen


@pytest.mark.parametrize("last_ppl, best, met", [(10.45, (1, 5, "mean"), True), (12.5, (3, 5, "mean"), True)])
def test_layer_parallel_reports_the_rows_speedups_and_verdict_from_the_right_numbers(
        tmp_path, monkeypatch, last_ppl, best, met):
    # rows in order: +2%, +4%, +10%, +3%, +20%, then +4.5% (within 5%) or +25%; the study after
    n_study = 6 + 5 + 4
    study_ppl = [20.0 + i for i in range(n_study)]
    ppls = [10.0, 10.2, 10.4, 11.0, 10.3, 12.0, last_ppl] + study_ppl
    res, saved, seen = _run_lp(tmp_path, monkeypatch, ppls)
    assert len(seen) == len(ppls)  # everything evaluated, nothing skipped
    assert saved == json.loads(json.dumps(res))
    rows = saved["pairs"]
    assert [(r["start"], r["end"], r["mlp_norm"]) for r in rows] == _LP_ROWS
    assert [r["n_pairs"] for r in rows] == [1, 1, 1, 1, 2, 2]
    assert [r["effective_depth"] for r in rows] == [5, 5, 5, 5, 4, 4]
    assert [r["position"] for r in rows] == ["early", "middle", "late", "late", "early", "early"]
    for r, ppl in zip(rows, ppls[1:7]):
        assert r["val_ppl"] == ppl and r["rel_ppl_increase"] == pytest.approx(ppl / 10.0 - 1)
        t = _LP_TPS[f"{r['start']}:{r['end']}"]
        for n in ("prefill", "decode_b1", "decode_b2"):
            assert r[f"{n}_tokens_per_s"] == t[n]
            assert r[f"{n}_speedup"] == pytest.approx(t[n] / _LP_TPS["baseline"][n])
    assert saved["baseline"]["decode_b1_tokens_per_s"] == 40.0 and saved["baseline"]["val_ppl"] == 10.0
    # the study: every layer deleted, every adjacent pair swapped, every window of 3 shuffled
    st = saved["study"]
    assert [d["layer"] for d in st["delete"]] == list(range(6))
    assert [s["layers"] for s in st["swap"]] == [[i, i + 1] for i in range(5)]
    assert [s["layers"] for s in st["shuffle"]] == [[i, i + 3] for i in range(4)]
    got = [x["val_ppl"] for k in ("delete", "swap", "shuffle") for x in st[k]]
    assert got == study_ppl
    assert all(x["rel_ppl_increase"] == pytest.approx(x["val_ppl"] / 10.0 - 1)
               for k in ("delete", "swap", "shuffle") for x in st[k])
    # verdict: the fastest decode at batch 1 among the rows within +5% perplexity; met at >= 1.15x
    tgt = saved["target"]
    b = tgt["best_within_ppl"]
    assert (b["start"], b["end"], b["mlp_norm"]) == best
    assert b["decode_b1_speedup"] == pytest.approx(_LP_TPS[f"{best[0]}:{best[1]}"]["decode_b1"] / 40.0)
    assert b["decode_b2_speedup"] == pytest.approx(_LP_TPS[f"{best[0]}:{best[1]}"]["decode_b2"] / 80.0)
    assert tgt["met"] is met and saved["complete"] is True


def test_layer_parallel_verdict_is_not_met_when_no_row_is_fast_enough_within_the_ppl_target(
        tmp_path, monkeypatch):
    # within +5%: (1,3) 1.05x, (2,4) 1.1x only; (3,5) and (1,5) are over +5%
    ppls = [10.0, 10.2, 10.4, 11.0, 11.0, 12.0, 12.0]
    res, saved, _ = _run_lp(tmp_path, monkeypatch, ppls, ["--no-study"])
    b = saved["target"]["best_within_ppl"]
    assert (b["start"], b["end"], b["mlp_norm"]) == (2, 4, "own")
    assert saved["target"]["met"] is False
    # nothing within the target at all: no best row, not met
    res, saved, _ = _run_lp(tmp_path, monkeypatch, [10.0] + [20.0] * 6, ["--no-study"])
    assert saved["target"]["best_within_ppl"] is None and saved["target"]["met"] is False


# ============================================================================ mamba
def test_mamba_reports_each_models_own_numbers_and_ratios(tmp_path, monkeypatch, capsys):
    import jaxformers.training
    from experiments import mamba

    trained = {}

    def fake_train(name, cfg, out, reusable, **kw):
        i = len(trained)
        trained[name] = cfg
        summary = dict(val_loss=1.0 + i, val_ppl=math.exp(1.0 + i), train_loss=2.0 + i, n_params=1000 * (i + 1),
                       tokens_per_s=100.0 * (i + 1), wall_s=10.0 + i, compile_s=0.5 + i)
        return summary, None, "float32", types.SimpleNamespace(steps=5, tokens_per_step=64 * (i + 1))

    def fake_decode(cfg, params, contexts, **kw):
        i = list(trained).index(cfg.model if cfg.model in trained else "gpt")
        return [dict(context=c, decode_step_ms=(i + 1) * (1.0 + j), cache_bytes=(i + 1) * 10 * (j + 2) ** 2)
                for j, c in enumerate(contexts)]

    def fake_metrics(run_dir):
        k = 1 + list(trained).index(run_dir.name)
        return [dict(step=1, loss=5.0 * k), dict(step=2, loss=4.0 * k, val_loss=4.5 * k), dict(step=3, val_loss=None)]

    monkeypatch.setattr(mamba, "reuse_or_train", fake_train)
    monkeypatch.setattr(mamba, "decode_scaling", fake_decode)
    monkeypatch.setattr(jaxformers.training, "read_metrics", fake_metrics)
    plotted = []
    monkeypatch.setattr(mamba, "plot_val_ppl", lambda r, p: plotted.append(p))
    monkeypatch.setattr(mamba, "plot_decode_scaling", lambda r, p: plotted.append(p))
    res = mamba.main(["--out", str(tmp_path), "--contexts", "8,16,64", "--seed", "3", "--no-compile-cache"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(res)) and saved["complete"] is True and saved["seed"] == 3
    assert list(saved["models"]) == ["gpt", "mamba", "mamba2", "hybrid"] == list(trained)
    assert saved["contexts"] == [8, 16, 64] and saved["context_ratio"] == 8.0
    for i, (name, row) in enumerate(saved["models"].items()):
        cfg = trained[name]
        assert row["model"] == cfg.model and row["n_layer"] == cfg.n_layer
        assert row["val_loss"] == 1.0 + i and row["val_ppl"] == pytest.approx(math.exp(1.0 + i))
        assert row["train_loss"] == 2.0 + i and row["n_params"] == 1000 * (i + 1)
        assert row["params_vs_base"] == pytest.approx(1000 * (i + 1) / saved["target_params"])
        assert row["train_tokens"] == 5 * 64 * (i + 1) and row["train_tokens_per_s"] == 100.0 * (i + 1)
        assert row["train_wall_s"] == 10.0 + i and row["compile_s"] == 0.5 + i
        assert row["loss_curve"] == [[1, 5.0 * (i + 1)], [2, 4.0 * (i + 1)]]
        assert row["val_curve"] == [[2, 4.5 * (i + 1)]]
        assert [d["context"] for d in row["decode"]] == [8, 16, 64]
        assert row["cache_bytes_ratio"] == pytest.approx(16 / 4)  # last / first context
        assert row["decode_latency_ratio"] == pytest.approx(3.0)
    hyb = saved["models"]["hybrid"]
    assert hyb["attention_layers"] == [i for i in range(hyb["n_layer"]) if i % 2 == 1]
    assert saved["models"]["gpt"]["attention_layers"] == [0, 1] and saved["models"]["mamba"]["attention_layers"] == []
    # the printed table: each model's own numbers
    out = capsys.readouterr().out.splitlines()
    for line, (name, row) in zip(out[1:], saved["models"].items()):
        f = line.split()
        assert f[0] == name and int(f[1]) == row["n_layer"] and int(f[2]) == row["n_params"]
        assert float(f[3]) == pytest.approx(row["val_ppl"], abs=1e-3)


def test_mamba_decode_scaling_rows(monkeypatch):
    from experiments import mamba

    cfg = jf.get_config("mamba", "tiny", vocab_size=32, d_model=16, n_layer=1, d_state=4, max_seq_len=16)
    params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
    lat = iter([0.002, 0.004])
    seen = []

    def fake_time(fn, v, tok, cache):
        seen.append(int(cache["index"]))
        return next(lat)

    monkeypatch.setattr(mamba, "_median_time", fake_time)
    rows = mamba.decode_scaling(cfg, params, [4, 32], batch=2)
    assert seen == [3, 31]  # the next token is the last one that fits
    assert [r["context"] for r in rows] == [4, 32] and all(r["batch"] == 2 for r in rows)
    assert [r["decode_step_ms"] for r in rows] == pytest.approx([2.0, 4.0])
    assert [r["decode_tokens_per_s"] for r in rows] == pytest.approx([1000.0, 500.0])
    assert rows[0]["cache_bytes"] == rows[1]["cache_bytes"] > 0  # a constant-size SSM state


# ============================================================================ distill
def test_distill_sample_problems_coverage_and_majority(monkeypatch):
    import numpy as np

    from experiments import distill
    from jaxformers.data.synthetic import SEP

    digits, k = 1, 3
    prompts = np.zeros((3, 5), np.int32)
    answers = [(5, 6), (7, 8), (9, 9)]
    gen = [[SEP, 5, 6], [SEP, 1, 1], [SEP, 1, 1],     # problem 0: covered, majority wrong
           [7, 7, 7], [SEP, 7, 8], [0, SEP, 7],       # problem 1: covered, majority right (no-answer rows don't vote)
           [SEP, 9, 8], [SEP, 9, 8], [SEP, 9, 9]]     # problem 2: covered, majority wrong
    calls = []

    def fake_generate(module, variables, p, new, *, temperature, rng, num_samples):
        calls.append((new, temperature, num_samples))
        return np.concatenate([np.repeat(np.asarray(p), num_samples, 0), np.asarray(gen, np.int32)], 1)

    monkeypatch.setattr(jf, "generate", fake_generate)
    secs, cov, maj = distill.sample_problems(None, None, prompts, answers, k, 3, digits, 0.7, 0)
    assert calls == [(3, 0.7, 3)] * 2 and secs >= 0
    assert cov == 1.0 and maj == pytest.approx(1 / 3)
    # problem 1's right answer only in the last sample: majority over the problem's own k rows
    gen[3:6] = [[SEP, 7, 8], [SEP, 1, 2], [SEP, 1, 2]]
    gen[6:9] = [[SEP, 9, 9], [SEP, 9, 9], [SEP, 0, 0]]
    secs, cov, maj = distill.sample_problems(None, None, prompts, answers, k, 3, digits, 0.7, 0)
    assert cov == 1.0 and maj == pytest.approx(1 / 3)
    assert distill.extract_answers([[0, 0, 0, SEP, 5], [4, SEP, 5, 6, 7], [1, 3, 3, 3, 3]], 1) == [None, (5, 6), None]


def test_distill_reports_each_students_numbers(tmp_path, monkeypatch, capsys):
    import numpy as np

    import jaxformers.distill
    import jaxformers.training
    import jaxformers.training.rundir
    from experiments import distill

    params_of = {}

    def fake_stage(name, cfg, tc, record, *, reuse, **kw):
        run = tc.out_dir.split("/")[-1]
        params_of[tc.out_dir] = {"w": np.zeros(len(params_of) + 1, np.float32)}
        return {"n_params": 100 + len(params_of), "val_loss": 0.25 * len(params_of)}, False

    class FakeStep:
        settings = {"kl_weight": 1.0}

        def __init__(self, *a, **k):
            pass

    kls = iter(float(i) for i in range(1, 100))
    kl_calls = []

    def fake_kl(*a, **k):
        kl_calls.append(a[3]["w"].size if isinstance(a[3], dict) else None)
        return next(kls)

    monkeypatch.setattr(distill, "train_stage", fake_stage)
    monkeypatch.setattr(jaxformers.training, "load_run", lambda d: (None, None, params_of[str(d)]))
    monkeypatch.setattr(jaxformers.distill, "DistillStep", FakeStep)
    monkeypatch.setattr(jaxformers.distill, "init_student", lambda *a, **k: {"w": np.zeros(0, np.float32)})
    monkeypatch.setattr(jaxformers.training.rundir, "read_metrics",
                        lambda d: [{"step": 1, "loss": 9.0, "d": str(d)}, {"step": 2},
                                   {"step": 3, "loss": float(len(str(d)))}])
    monkeypatch.setattr(distill, "mean_kl", fake_kl)
    monkeypatch.setattr(distill, "throughput", lambda m, p, b, n: 1000.0 * b + n)
    sample = iter(range(1, 100))

    problems = []

    def fake_sample(module, params, prompts, answers, k, new, digits, temperature, seed):
        problems.append((np.asarray(prompts), list(answers), new, digits, temperature, k))
        i = next(sample)
        return 0.5 * i * len(answers), 0.01 * i, 0.001 * i

    monkeypatch.setattr(distill, "sample_problems", fake_sample)
    monkeypatch.setattr(distill, "plot", lambda results, out: [])
    out = tmp_path / "d"
    res = distill.main(["--out", str(out), "--problems", "4", "--samples", "1,2", "--speed-batches", "1,4",
                        "--speed-lengths", "16,32", "--seed", "5", "--no-compile-cache"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["seed"] == 5 and saved["complete"] is True and saved["samples"] == [1, 2]
    st = saved["students"]
    assert list(st) == ["mamba2", "hybrid", "mamba2_random"]
    # mean_kl in order: mamba2 init/aligned/final, hybrid init/aligned/final, random init/final
    assert [(s["kl_init"], s["kl_aligned"], s["kl_final"]) for s in st.values()] == \
        [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0), (7.0, None, 8.0)]
    # the aligned KL from the aligned params, the final KL from the distilled params
    assert kl_calls == [0, 2, 3, 0, 4, 5, 0, 6]
    assert [s["align_steps"] for s in st.values()] == [50, 50, 0]
    assert [s["attn_layers"] for s in st.values()] == [[], [3], []]
    for name, s in st.items():
        assert s["run_dir"].endswith(f"runs/{name}")
        assert s["distill_loss_first"] == 9.0 and s["distill_loss_last"] == float(len(s["run_dir"]))
    assert [s["val_loss"] for s in st.values()] == [0.75, 1.25, 1.5]  # the distillation runs' summaries
    assert [s["n_params"] for s in st.values()] == [103, 105, 106]
    rows = saved["models"]
    assert list(rows) == ["teacher", "mamba2", "hybrid", "mamba2_random"]
    for j, (name, row) in enumerate(rows.items()):
        assert [(t["batch"], t["length"], t["tokens_per_s"]) for t in row["throughput"]] == \
            [(1, 16, 1016.0), (1, 32, 1032.0), (4, 16, 4016.0), (4, 32, 4032.0)]
        i = 3 * j + 1  # greedy, then k = 1, 2
        assert row["greedy_accuracy"] == pytest.approx(0.01 * i)
        assert [b["k"] for b in row["budget"]] == [1, 2]
        for b, ii in zip(row["budget"], (i + 1, i + 2)):
            assert b["seconds_per_problem"] == pytest.approx(0.5 * ii)
            assert b["coverage"] == pytest.approx(0.01 * ii) and b["majority_accuracy"] == pytest.approx(0.001 * ii)
    # the test problems: the prompt up to "=", the answer digits of a + b, the rest generated
    from jaxformers.data.synthetic import N_SPECIAL, arithmetic_length
    prompts, answers, new, digits, _, _ = problems[0]
    assert digits == 3 and prompts.shape == (4, 2 * 3 + 3) and new == arithmetic_length(3) - 9
    for row, ans in zip(prompts.tolist(), answers):
        a = int("".join(str(t - N_SPECIAL) for t in row[1:4]))
        b = int("".join(str(t - N_SPECIAL) for t in row[5:8]))
        assert ans == tuple(N_SPECIAL + int(c) for c in f"{a + b:04d}")
    # per model: greedy (one sample at temperature 0), then k = 1, 2 at the preset's temperature
    assert [(t, k) for *_, t, k in problems] == [(0.0, 1), (1.0, 1), (1.0, 2)] * 4
    text = capsys.readouterr().out
    printed = json.loads(text[text.index("{"):])
    for name, p in printed.items():
        assert p["greedy"] == round(rows[name]["greedy_accuracy"], 3)
        assert p["coverage"] == [round(b["coverage"], 3) for b in rows[name]["budget"]]


# ============================================================================ quarot
def _quarot_loss(fields):
    """A made-up loss, different for every scheme of ``SCHEMES``."""
    return (1.0 + (16 - fields.get("w_bits", 16)) * 0.01 + (16 - fields.get("a_bits", 16)) * 0.001
            + (16 - fields.get("kv_bits", 16)) * 0.0001 + 0.3 * fields["rotate"]
            + 0.05 * (fields.get("w_method") == "gptq"))


def test_quarot_reports_each_schemes_own_perplexity_and_spec(tmp_path, monkeypatch):
    import numpy as np

    import jaxformers.quant
    import jaxformers.training
    from experiments import quarot as exp

    cfg = jf.get_config("llama", "tiny", vocab_size=260, d_model=16, n_layer=1, n_head=2, n_kv_head=1, d_ff=32,
                        max_seq_len=32)
    ev_kw = dict(batch_size=3, seq_len=16, eval_batches=2)
    monkeypatch.setattr(exp, "_load_source", lambda args, preset, out: (
        cfg, {"p": 1}, "DATA", "TOK", dict(ev_kw), "float32", {"val_ppl": 1.5}))
    monkeypatch.setattr(exp, "check_data_vocab", lambda *a: None)
    calib = np.arange(70 * 16, dtype=np.int32).reshape(70, 16)
    monkeypatch.setattr(exp, "calibration_tokens", lambda data, tok, n, seq_len, seed: calib[:n])
    quantized = []

    def fake_quantize(c, p, spec, calibration=None):
        quantized.append((spec, None if calibration is None else len(calibration)))
        return ("Q", spec), p

    evals = []

    def fake_evaluate(model, data, *, tokenizer, batch_size, seq_len, max_batches, dtype):
        evals.append((data, tokenizer, batch_size, seq_len, max_batches, dtype))
        spec = model[0][1]
        fields = dict(rotate=spec.rotate, w_bits=spec.w_bits, a_bits=spec.a_bits, kv_bits=spec.kv_bits,
                      w_method=spec.w_method)
        loss = _quarot_loss(fields)
        return {"val_loss": loss, "val_ppl": 100 + loss}

    seen = {}
    monkeypatch.setattr(jaxformers.quant, "quantize", fake_quantize)
    monkeypatch.setattr(jaxformers.training, "evaluate", fake_evaluate)
    monkeypatch.setattr(exp, "int_path", lambda c, p, dt, tokens, names, seed: seen.setdefault(
        "int", (len(tokens), list(names))) and {"schemes": []})
    monkeypatch.setattr(exp, "outlier_stats", lambda c, p, cal, batch, seed: seen.setdefault(
        "outliers", (len(cal), batch)) and {"original": {}, "rotated": {}})
    monkeypatch.setattr(exp, "int8_table", lambda shapes, dtype: [{"shapes": len(shapes), "dtype": dtype}])
    monkeypatch.setattr(exp, "plot", lambda results, out: None)
    res = exp.main(["--out", str(tmp_path), "--calib", "70", "--seed", "4", "--int-schemes", "W4A4,W8A8",
                    "--no-compile-cache"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is True and saved["seed"] == 4 and saved["train_summary"] == {"val_ppl": 1.5}
    assert list(saved["schemes"]) == list(exp.SCHEMES)
    assert evals == [("DATA", "TOK", 3, 16, 2, "float32")] * len(exp.SCHEMES)
    for (spec, n_cal), (name, fields) in zip(quantized, exp.SCHEMES.items()):
        row = saved["schemes"][name]
        assert row["val_loss"] == pytest.approx(_quarot_loss(fields))
        assert row["val_ppl"] == pytest.approx(100 + _quarot_loss(fields))
        # GPTQ calibrated on every calibration sequence; RTN needs none
        assert n_cal == (70 if fields.get("w_method") == "gptq" else None)
        s = row["spec"]
        assert s["seed"] == 4 and s["rotate"] == fields["rotate"]
        assert s["a_clip"] == (0.9 if fields.get("a_bits", 16) == 4 else 1.0)
        assert s["kv_clip"] == (0.95 if fields.get("kv_bits", 16) == 4 else 1.0)
        assert (s["w_bits"], s["a_bits"], s["kv_bits"]) == tuple(fields.get(k, 16) for k in ("w_bits", "a_bits",
                                                                                              "kv_bits"))
    # the integer path on one eval batch of calibration windows; outliers on the first 64 sequences
    assert seen["int"] == (3, ["W4A4", "W8A8"])
    assert seen["outliers"] == (64, exp.PRESETS["tiny"]["calib_batch"]) and saved["outlier_sequences"] == 64
    assert saved["calibration"] == {"sequences": 70, "seq_len": 16}
    assert saved["int8_linear"] == [{"shapes": len(exp.PRESETS["tiny"]["linear_shapes"]), "dtype": "float32"}]


def test_mamba_run_without_a_validation_loss_is_reported_not_a_crash(tmp_path, monkeypatch):
    """A run whose data has no validation window (``val_ppl`` None in its summary, which the plot
    and the table handle) crashed on the progress line after training: a TypeError formatting
    None, with the trained model's row never written to results.json."""
    import jaxformers.training
    from experiments import mamba

    def fake_train(name, cfg, out, reusable, **kw):
        summary = dict(val_loss=None, val_ppl=None, train_loss=1.0, n_params=10, tokens_per_s=None, wall_s=1.0,
                       compile_s=1.0)
        return summary, None, "float32", types.SimpleNamespace(steps=1, tokens_per_step=1)

    monkeypatch.setattr(mamba, "reuse_or_train", fake_train)
    monkeypatch.setattr(mamba, "decode_scaling", lambda cfg, p, ctx, **k: [
        dict(context=c, decode_step_ms=1.0, cache_bytes=4) for c in ctx])
    monkeypatch.setattr(jaxformers.training, "read_metrics", lambda d: [])
    monkeypatch.setattr(mamba, "plot_val_ppl", lambda r, p: None)
    monkeypatch.setattr(mamba, "plot_decode_scaling", lambda r, p: None)
    res = mamba.main(["--out", str(tmp_path), "--models", "mamba", "--contexts", "4,8", "--no-compile-cache"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is True and saved["models"]["mamba"]["val_ppl"] is None
    assert res["models"]["mamba"]["val_loss"] is None


def test_layer_parallel_records_a_sweep_cut_by_max_pairs_and_a_skipped_study(tmp_path, monkeypatch):
    """``--max-pairs 1`` cut the sweep to one pair and ``--no-study`` skipped the study, and
    results.json recorded neither (``pair_counts: null``, the preset's "1 .. max"): a truncated
    sweep could not be told from a complete one."""
    res, saved, _ = _run_lp(tmp_path, monkeypatch, [10.0, 10.1, 10.2, 10.3, 10.4], ["--max-pairs", "1",
                                                                                   "--no-study"])
    assert [(r["start"], r["end"]) for r in saved["pairs"]] == [(1, 3), (2, 4), (3, 5), (3, 5)]
    assert saved["infer"]["max_pairs"] == 1 and saved["infer"]["no_study"] is True
    res, saved, _ = _run_lp(tmp_path, monkeypatch, [10.0] * 7 + [11.0] * 15)
    assert saved["infer"]["max_pairs"] is None and saved["infer"]["no_study"] is False


# ============================================================================ helpers the fakes replaced
class _Clock:
    """A ``time`` stand-in whose ``perf_counter`` advances by the given durations, one per
    timed call (each timed call reads the clock twice)."""

    def __init__(self, durations):
        self.durations, self.now, self.calls = list(durations), 0.0, 0

    def perf_counter(self):
        self.calls += 1
        if self.calls % 2 == 0:
            self.now += self.durations.pop(0)
        return self.now


def test_layer_parallel_time_all_keeps_the_fastest_call(monkeypatch):
    from experiments import layer_parallel as exp

    entries = {"baseline": {"prefill": (lambda: None, 100), "decode_b1": (lambda: None, 10)},
               "1:3": {"prefill": (lambda: None, 100), "decode_b1": (lambda: None, 10)}}
    # rounds x keys x names x iters = 2 x 2 x 2 x 2 timed calls
    durs = [2.0, 1.0, 4.0, 5.0, 1.0, 2.0, 0.5, 0.8,
            1.5, 3.0, 2.0, 9.0, 4.0, 4.0, 1.0, 0.25]
    monkeypatch.setattr(exp, "time", _Clock(durs))
    got = exp.time_all(entries, iters=2, rounds=2)
    assert got == {"baseline": {"prefill": 100 / 1.0, "decode_b1": 10 / 2.0},
                   "1:3": {"prefill": 100 / 1.0, "decode_b1": 10 / 0.25}}


def test_layer_parallel_evaluator_perplexity_and_accuracy():
    import numpy as np

    from experiments.layer_parallel import Evaluator
    from jaxformers.data import open_data

    data = "synthetic:copying"
    src = open_data(data, "byte")
    cfg = jf.get_config("llama", "tiny", vocab_size=src.vocab_size, d_model=16, n_layer=1, n_head=2, n_kv_head=1,
                        d_ff=32, max_seq_len=32)
    model = jf.build(cfg)
    params = jf.init_params(model, jax.random.PRNGKey(1))
    got = Evaluator(data, "byte", 2, 16, 2, "float32")(cfg, params)
    nll = correct = n = 0.0
    for b in src.eval_batches(2, 16, 2, drop_last=True):
        tok = np.asarray(b["tokens"])
        logits = np.asarray(model.apply({"params": params}, tok[:, :-1]), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        tgt, w = tok[:, 1:], np.asarray(b["loss_mask"], np.float64)[:, 1:]
        nll += float(-(np.take_along_axis(logp, tgt[..., None], -1)[..., 0] * w).sum())
        correct += float(((logits.argmax(-1) == tgt) * w).sum())
        n += float(w.sum())
    assert got["val_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["val_acc"] == pytest.approx(correct / n) and got["val_tokens"] == int(n)


def test_mamba_matched_layers_is_the_exact_closest_count():
    """Against brute force (the exact parameter count of every depth), with an attention period
    longer than some of the depths tried (a hybrid of fewer layers still has one attention layer)."""
    from experiments import mamba

    preset = dict(mamba.PRESETS["tiny"], n_layer=1, attn_every=4)
    target = mamba.n_params(mamba._base_config(preset, "gpt", 64, 32))
    for kind in ("mamba", "mamba2", "hybrid"):
        counts = {n: mamba.n_params(mamba._ssm_config(kind, preset, n, 64, 32)) for n in range(1, 5)}
        want = min(counts, key=lambda n: (abs(counts[n] - target), n))
        assert mamba._matched_layers(kind, preset, target, 64, 32) == want, (kind, counts, target)


def test_distill_throughput_counts_the_generated_tokens(monkeypatch):
    import numpy as np

    from experiments import distill

    calls = []

    def fake_generate(module, variables, prompt, new, *, temperature, rng):
        calls.append((prompt.shape, new))
        return np.zeros((prompt.shape[0], prompt.shape[1] + new), np.int32)

    monkeypatch.setattr(jf, "generate", fake_generate)
    monkeypatch.setattr(distill, "time", _Clock([3.0, 2.0]))
    got = distill.throughput(None, None, 4, 40, prompt_len=8)
    assert calls == [((4, 8), 32)] * 3
    assert got == pytest.approx(4 * 32 / 2.0)  # generated tokens / the faster of the timed calls


def test_quarot_outlier_stats_from_the_collected_absmax(monkeypatch):
    import numpy as np

    import jaxformers.quant
    from experiments import quarot

    absmax = {False: {"blocks_10": {"o_in": np.array([1.0, 2.0, 3.0, 10.0])},
                      "blocks_2": {"attn_in": np.array([4.0, 1.0, 2.0])}},
              True: {"blocks_10": {"o_in": np.array([2.0, 2.0, 3.0, 3.0])},
                     "blocks_2": {"attn_in": np.array([2.0, 2.0, 2.0])}}}
    monkeypatch.setattr(jaxformers.quant, "quantize", lambda c, p, spec: (spec.rotate, p))
    monkeypatch.setattr(jaxformers.quant, "collect_stats", lambda rot, p, calib, batch: {
        layer: {k: {"absmax": v} for k, v in st.items()} for layer, st in absmax[rot].items()})
    got = quarot.outlier_stats(None, None, None, 4, 0)
    assert list(got["original"]) == ["blocks_2/attn_in", "blocks_10/o_in"]  # by layer number
    o = got["original"]["blocks_10/o_in"]
    assert (o["max"], o["median"], o["max_over_median"]) == (10.0, 2.5, 4.0)
    assert o["channel_absmax"] == [1.0, 2.0, 3.0, 10.0]
    assert got["original"]["blocks_2/attn_in"]["max_over_median"] == 2.0
    r = got["rotated"]["blocks_10/o_in"]
    assert (r["max"], r["median"], r["max_over_median"]) == (3.0, 2.5, 1.2)


def test_quarot_int_path_losses_and_weight_bytes(monkeypatch):
    import jax.numpy as jnp
    import numpy as np

    from experiments import quarot
    from jaxformers.quant import QuantSpec, quantize

    monkeypatch.setattr(quarot, "median_ms", lambda fn, args, warmup, iters: 1.0)
    cfg = jf.get_config("llama", "tiny", vocab_size=64, d_model=16, n_layer=1, n_head=2, n_kv_head=1, d_ff=32,
                        max_seq_len=16)
    params = jax.tree.map(lambda x: x * 4, jax.device_get(jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))))
    tok = np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)
    got = quarot.int_path(cfg, params, "float32", tok, ["W4A16"], 0)
    assert [r["scheme"] for r in got["schemes"]] == ["W4A16"] and got["tokens"] == [2, 12]
    for row, (wb, ab) in zip(got["schemes"], ((4, 16),)):
        # oracle: the float model with the same rotated RTN weights, next-token loss in numpy
        qc, qp = quantize(cfg, params, QuantSpec(rotate=True, seed=0, w_bits=wb, w_clip=False, a_bits=ab,
                                                 a_clip=1.0))
        lg = np.asarray(jf.build(qc).apply({"params": qp}, jnp.asarray(tok)), np.float64)[:, :-1]
        lp = lg - lg.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        want = -np.mean(np.take_along_axis(lp, tok[:, 1:, None], -1))
        assert row["nll_fake_quant"] == pytest.approx(want, rel=1e-5)
        assert row["nll_int"] == pytest.approx(want, rel=1e-4)
    # block linears of d 16, kv 8, ff 32: 768 + 1536 = 2304 weights, 128 per-channel scales
    mem = got["weight_memory"]
    assert mem["float32"]["total"] == 4 * 2304 and mem["bfloat16"]["total"] == 2 * 2304
    assert mem["int8"] == {"weights": 2304, "scales": 4 * 128, "total": 2304 + 512,
                           "ratio_to_float32": (2304 + 512) / (4 * 2304)}
    assert mem["int4_packed"]["weights"] == 1152 and mem["int4_packed"]["total"] == 1152 + 512
    assert [r["linear_bytes"] for r in got["schemes"]] == [1152 + 512]
