"""Audit 47 (exps1): what the paper experiments (denseformer, cotformer, scfa_lm, landmark_lm,
landmark_passkey) report.  Training / evaluation helpers are replaced by fakes returning known
numbers; the reported results are checked against hand-computed values (right run, right metric,
right direction, every printed number in results.json)."""
import json
import math
import types

import jax
import numpy as np
import pytest


def _summary(**kw):
    s = dict(val_loss=1.0, val_ppl=math.e, train_loss=1.0, n_params=1, tokens_per_s=1.0, wall_s=1.0,
             flops_per_token=6.0, compile_s=0.5, mfu=None)
    s.update(kw)
    return s


# ----------------------------------------------------------------------------- denseformer
def test_denseformer_overhead_compares_each_denseformer_with_its_own_same_depth_baseline(tmp_path, monkeypatch):
    from experiments import denseformer
    import jaxformers.models.denseformer as dfm

    # distinct numbers per model: val_ppl, params, train speed, infer speed, train peak
    nums = {"gpt_L4": (10.0, 1000, 400.0, 800.0, 4000),
            "denseformer_1x1_L4": (8.0, 1010, 380.0, 760.0, 4400),
            "denseformer_2x2_L4": (9.0, 1004, 390.0, 600.0, 4200),
            "gpt_L6": (7.0, 1500, 300.0, 500.0, 6000),
            "gpt_L8": (6.0, 2000, 200.0, 400.0, 8000)}
    by_id = {}

    def fake_train(name, cfg, out, reusable, **kw):
        ppl, n, tps, _, _ = nums[name]
        params = {"id": name}
        by_id[name] = cfg
        return (_summary(val_ppl=ppl, val_loss=math.log(ppl), n_params=n, tokens_per_s=tps), params, "float32",
                types.SimpleNamespace(steps=3, tokens_per_step=64, seq_len=16))

    def fake_prepare(cfg, params, batch, seq_len, dtype):
        name = params["id"]
        return (lambda: name), batch * seq_len, {"infer_peak_bytes": 1, "train_peak_bytes": nums[name][4],
                                                 "memory_method": "fake"}

    monkeypatch.setattr(denseformer, "reuse_or_train", fake_train)
    monkeypatch.setattr(denseformer, "prepare_measurement", fake_prepare)
    monkeypatch.setattr(denseformer, "time_forwards", lambda fns: {n: nums[fn()][3] for n, (fn, _) in fns.items()})
    monkeypatch.setattr(dfm, "dwa_weights", lambda cfg, params: (np.ones((1, 2)), [cfg.n_layer]))
    monkeypatch.setattr(denseformer, "plot_ppl_vs_depth", lambda *a: None)
    monkeypatch.setattr(denseformer, "plot_alpha", lambda *a: None)
    res = denseformer.main(["--out", str(tmp_path), "--no-compile-cache"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is True and saved["seed"] == 0
    for name, (ppl, n, tps, itps, peak) in nums.items():
        row = saved["models"][name]
        assert (row["val_ppl"], row["n_params"], row["train_tokens_per_s"], row["infer_tokens_per_s"],
                row["train_peak_bytes"]) == (ppl, n, tps, itps, peak), name
        assert row["n_layer"] == by_id[name].n_layer
        assert row["train_tokens"] == 3 * 64
    ov = saved["dwa_overhead"]
    assert set(ov) == {"denseformer_1x1_L4", "denseformer_2x2_L4"}
    o = ov["denseformer_1x1_L4"]
    assert o["infer_throughput_ratio"] == pytest.approx(760 / 800)
    assert o["train_throughput_ratio"] == pytest.approx(380 / 400)
    assert o["extra_params"] == 10
    assert o["train_peak_bytes_ratio"] == pytest.approx(4400 / 4000)
    assert o["val_ppl_delta"] == pytest.approx(8.0 - 10.0)     # negative: the DenseFormer is better
    o = ov["denseformer_2x2_L4"]
    assert (o["infer_throughput_ratio"], o["extra_params"], o["val_ppl_delta"]) == (
        pytest.approx(600 / 800), 4, pytest.approx(-1.0))
    assert res["dwa_overhead"] == saved["dwa_overhead"]


# ----------------------------------------------------------------------------- cotformer
def test_cotformer_adaptive_curve_numbers_belong_to_their_budget(tmp_path, monkeypatch):
    import jaxformers.training as training
    from experiments import cotformer
    from jaxformers.models.cotformer import routed_counts

    def fake_train(name, cfg, out, reusable, **kw):
        ppl = {"adaptive_L2x3": 5.0, "gpt_L2": 9.0}[name]
        return (_summary(val_ppl=ppl, val_loss=math.log(ppl), tokens_per_s=123.0, flops_per_token=60.0),
                {"id": name}, "float32", types.SimpleNamespace(steps=2, tokens_per_step=32, batch_size=2,
                                                                eval_batches=1, dtype="float32"))

    def fake_evaluate(model, data, **kw):
        cfg, _ = model
        loss = 1.0 + sum(cfg.length_factors)          # a distinct loss per budget
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    def fake_forward(cfg, params, batch, seq_len, dtype):
        key = (params["id"], tuple(cfg.length_factors) if cfg.model == "adaptive_cotformer" else None)
        return (lambda: key), batch * seq_len

    def fake_speeds(fns):
        out = {}
        for n, (fn, _) in fns.items():
            _, lf = fn()
            out[n] = 1000.0 + (100 * sum(lf) if lf is not None else 0) + (0 if "adaptive" in n else 7)
        return out

    monkeypatch.setattr(cotformer, "reuse_or_train", fake_train)
    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    monkeypatch.setattr(cotformer, "forward_fn", fake_forward)
    monkeypatch.setattr(cotformer, "time_forwards", fake_speeds)
    monkeypatch.setattr(cotformer, "plot", lambda *a: None)
    budgets = [(0.0, 0.0), (1.0, 0.5), (0.5, 0.25), (1.0, 1.0)]
    cotformer.main(["--out", str(tmp_path), "--only", "gpt_L2,adaptive_L2x3", "--d-model", "32",
                    "--seq-len", "16", "--batch-size", "2", "--no-compile-cache",
                    "--budgets", ";".join(f"{a},{b}" for a, b in budgets)])
    saved = json.loads((tmp_path / "results.json").read_text())
    curve = saved["adaptive_curve"]
    assert [tuple(p["length_factors"]) for p in curve] == budgets
    for p, (a, b) in zip(curve, budgets):
        assert p["val_loss"] == pytest.approx(1.0 + a + b)
        assert p["val_ppl"] == pytest.approx(math.exp(1.0 + a + b))
        assert p["infer_tokens_per_s"] == pytest.approx(1000.0 + 100 * (a + b))
        assert p["tokens_per_repeat"] == routed_counts((a, b), 3, 16)
    # more budget: more compute and depth (monotone in the budget)
    order = sorted(curve, key=lambda p: sum(p["length_factors"]))
    assert [p["average_depth"] for p in order] == sorted(p["average_depth"] for p in curve)
    assert order[0]["average_depth"] == pytest.approx(2.0) and order[-1]["average_depth"] == pytest.approx(6.0)
    rows = saved["models"]
    assert rows["gpt_L2"]["val_ppl"] == 9.0 and rows["adaptive_L2x3"]["val_ppl"] == 5.0
    assert rows["gpt_L2"]["infer_tokens_per_s"] == 1007.0
    assert rows["adaptive_L2x3"]["infer_tokens_per_s"] == pytest.approx(1200.0)   # the full budget's forward
    assert rows["adaptive_L2x3"]["average_depth"] == pytest.approx(6.0)
    assert rows["adaptive_L2x3"]["macs_per_token"] == pytest.approx(
        [p for p in curve if p["length_factors"] == [1.0, 1.0]][0]["macs_per_token"])
    assert rows["gpt_L2"]["average_depth"] == 2 and saved["seed"] == 0


# ----------------------------------------------------------------------------- scfa_lm
def test_scfa_lm_ratios_to_the_same_length_baseline(tmp_path, monkeypatch):
    from experiments import scfa_lm

    nums = {"baseline_T128": (10.0, 1000.0, 80), "hash_nb4_T128": (11.0, 2000.0, 30),
            "qk_s50_T128": (12.5, 500.0, 50)}

    def fake_train(key, cfg, out, reusable, **kw):
        ppl, tps, _ = nums[key]
        return (_summary(val_ppl=ppl, val_loss=math.log(ppl), tokens_per_s=tps), {"id": key}, "float32",
                types.SimpleNamespace(steps=4, tokens_per_step=1024, batch_size=8))

    monkeypatch.setattr(scfa_lm, "reuse_or_train", fake_train)
    monkeypatch.setattr(scfa_lm, "tile_counts",
                        lambda cfg, params, *a, **k: (nums[params["id"]][2], 80, [nums[params["id"]][2] // 2] * 2))
    monkeypatch.setattr(scfa_lm, "kernel_check", lambda cfg, params, *a: 1e-6)
    monkeypatch.setattr(scfa_lm, "plot", lambda *a: None)
    scfa_lm.main(["--out", str(tmp_path), "--no-compile-cache"])
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = saved["models"]
    for key, (ppl, tps, tiles) in nums.items():
        r = rows[key]
        assert r["val_ppl"] == ppl and r["train_tokens_per_s"] == tps
        assert r["step_time_s"] == pytest.approx(1024 / tps)
        assert r["tile_fraction"] == pytest.approx(tiles / 80)
        assert r["speedup_vs_baseline"] == pytest.approx(tps / 1000.0)     # > 1: faster than the baseline
        assert r["val_ppl_delta_vs_baseline"] == pytest.approx(ppl - 10.0)   # > 0: worse than the baseline
    assert "kernel_check_max_abs_diff" not in rows["baseline_T128"]
    assert rows["hash_nb4_T128"]["n_buckets"] == 4 and rows["qk_s50_T128"]["qk_drop_rate"] == 0.5
    assert saved["complete"] is True and saved["seed"] == 0


# ----------------------------------------------------------------------------- landmark_lm
def _landmark_lm_fakes(monkeypatch, calls):
    from experiments import landmark_lm

    def fake_train(name, cfg, out, reusable, **kw):
        calls.setdefault("train", []).append((name, kw["train_kw"]))
        return _summary(val_ppl=3.0 if name == "landmark" else 4.0), {"id": name}, "float32", None

    def fake_eval_baseline(cfg, params, windows):
        assert params["id"] == "baseline"
        return 0.001 * windows.shape[1]

    def fake_eval_landmark(cfg, params, windows, *, chunk_len, top_k, max_blocks):
        assert params["id"] == "landmark"
        calls.setdefault("eval", []).append((windows.shape, chunk_len, top_k, max_blocks))
        return 0.001 * windows.shape[1] + 0.01 * top_k

    def fake_cost_landmark(cfg, params, window, chunk_len, top_k, max_blocks, offload=None):
        calls.setdefault("cost", []).append((len(window), top_k, offload))
        st = {"memory_bytes": 100 * top_k}
        if offload:
            st.update(device_memory_bytes=0, device_transfer_bytes=7 * top_k)
        return 1e-3 * top_k, st

    def fake_decode(cfg, params, n, steps):
        calls.setdefault("decode", []).append((params["id"], getattr(cfg, "mem_top_k", None),
                                               getattr(cfg, "mem_chunk_len", None), n, steps))
        return 1e-4 * n

    monkeypatch.setattr(landmark_lm, "reuse_or_train", fake_train)
    monkeypatch.setattr(landmark_lm, "eval_baseline", fake_eval_baseline)
    monkeypatch.setattr(landmark_lm, "eval_landmark", fake_eval_landmark)
    monkeypatch.setattr(landmark_lm, "cost_baseline", lambda cfg, params, window, chunk: (2e-3, 555))
    monkeypatch.setattr(landmark_lm, "cost_landmark", fake_cost_landmark)
    monkeypatch.setattr(landmark_lm, "cost_decode", fake_decode)
    monkeypatch.setattr(landmark_lm, "plot", lambda *a: None)
    return landmark_lm


def test_landmark_lm_reports_each_length_and_top_k(tmp_path, monkeypatch):
    calls = {}
    landmark_lm = _landmark_lm_fakes(monkeypatch, calls)
    landmark_lm.main(["--out", str(tmp_path), "--no-compile-cache", "--factors", "1,2", "--top-k", "1,2",
                      "--decode-steps", "3"])
    saved = json.loads((tmp_path / "results.json").read_text())
    L, nb = 16, 6
    raw, chunk = nb * (L - 1), nb * L
    assert saved["train_len_raw"] == raw and saved["chunk_len"] == chunk and saved["seed"] == 0
    max_blocks = 2 * nb
    for f in (1, 2):
        row = saved["ppl"][str(f)]
        n = f * raw
        assert set(row) == {"baseline_full", "landmark_top1", "landmark_top2", "landmark_all"}
        assert row["baseline_full"] == pytest.approx(math.exp(0.001 * n))
        assert row["landmark_top1"] == pytest.approx(math.exp(0.001 * n + 0.01))
        assert row["landmark_top2"] == pytest.approx(math.exp(0.001 * n + 0.02))
        assert row["landmark_all"] == pytest.approx(math.exp(0.001 * n + 0.01 * max_blocks))
        cost = saved["cost"][str(f)]
        assert cost["baseline_kv_cache"] == {"s_per_token": pytest.approx(2e-3 / n), "memory_bytes": 555,
                                             "keys_per_token": (n + 1) / 2}
        assert cost["landmark_top2"]["s_per_token"] == pytest.approx(2e-3 / n)
        assert cost["landmark_top2"]["memory_bytes"] == 200
        assert cost["landmark_top2"]["keys_per_token"] == landmark_lm.memory_keys_per_token(f * chunk, chunk, L, 2)
        assert cost["landmark_top2_host"]["device_transfer_bytes"] == 14
    assert {(s[0][1], s[2], s[3]) for s in calls["eval"]} == {
        (f * raw, k, max_blocks) for f in (1, 2) for k in (1, 2, max_blocks)}
    assert all(c == chunk for _, c, _, _ in calls["eval"])
    for n in (raw, 2 * raw):
        d = saved["decode"][str(n)]
        n_lm = n + n // (L - 1)
        assert d == {"baseline_kv_cache": pytest.approx(1e-4 * n), "landmark_kv_cache": pytest.approx(1e-4 * n_lm),
                     "landmark_memory_top2": pytest.approx(1e-4 * n_lm)}
    assert ("landmark", 2, chunk, 2 * raw + 2 * raw // (L - 1), 3) in calls["decode"]


def test_landmark_lm_memory_decoding_uses_the_largest_top_k_whatever_the_order(tmp_path, monkeypatch):
    """The docstring: decoding through the memory uses ``mem_top_k`` = the largest ``--top-k`` (and
    the host-offload cost row the same); ``top_ks[-1]`` was the last one given, so ``--top-k 4,1``
    decoded and offloaded with top-1 (and labelled the rows ``top1``)."""
    calls = {}
    landmark_lm = _landmark_lm_fakes(monkeypatch, calls)
    landmark_lm.main(["--out", str(tmp_path), "--no-compile-cache", "--factors", "1", "--top-k", "4,1",
                      "--decode-steps", "2"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {c[1] for c in calls["decode"] if c[2] is not None} == {4}
    assert list(saved["decode"]["90"]) == ["baseline_kv_cache", "landmark_kv_cache", "landmark_memory_top4"]
    assert "landmark_top4_host" in saved["cost"]["1"]
    assert [c for c in calls["cost"] if c[2] == "host"] == [(90, 4, "host")]


# ----------------------------------------------------------------------------- landmark_passkey
def _passkey_fakes(monkeypatch, calls):
    from experiments import landmark_passkey as pk

    def fake_train(cfg, preset, raw_len, seed, landmark):
        calls.setdefault("train", []).append((cfg.model, raw_len, seed, landmark))
        return {"w": np.zeros(1, np.float32) + (1.0 if landmark else 2.0)}, [(0, 3.0), (9, 0.25 if landmark else 0.5)]

    def fake_base(cfg, params, tokens, answer):
        assert float(params["w"][0]) == 2.0 and cfg.model == "gpt"
        assert answer.tolist() == list(range(tokens.shape[1] - 2, tokens.shape[1]))
        return 1.0 / tokens.shape[1]

    def fake_lm(cfg, params, tokens, answer, *, chunk_len, top_k, max_blocks):
        assert float(params["w"][0]) == 1.0 and cfg.model == "landmark"
        calls.setdefault("eval", []).append((tokens.shape[1], chunk_len, top_k, max_blocks))
        return top_k / tokens.shape[1]

    monkeypatch.setattr(pk, "train_model", fake_train)
    monkeypatch.setattr(pk, "eval_baseline", fake_base)
    monkeypatch.setattr(pk, "eval_landmark", fake_lm)
    monkeypatch.setattr(pk, "plot", lambda *a: None)
    return pk


def test_passkey_accuracies_per_length_and_top_k(tmp_path, monkeypatch):
    calls = {}
    pk = _passkey_fakes(monkeypatch, calls)
    pk.main(["--out", str(tmp_path), "--steps", "10", "--factors", "4,1,2", "--top-k", "2,1",
             "--eval-samples", "3", "--seed", "5"])
    saved = json.loads((tmp_path / "results.json").read_text())
    raw, chunk = 6 * 15, 6 * 16
    assert saved["seed"] == 5 and saved["train_len_raw"] == raw and saved["complete"] is True
    assert sorted(calls["train"]) == [("gpt", raw, 5, False), ("landmark", raw, 5, True)]
    base = saved["models"]["baseline"]
    assert base["accuracy"] == {str(f): pytest.approx(1.0 / (f * raw)) for f in (4, 1, 2)}
    assert base["final_train_loss"] == 0.5 and saved["models"]["landmark"]["final_train_loss"] == 0.25
    acc = saved["models"]["landmark"]["accuracy"]
    assert set(acc) == {"top1", "top2"}
    for k in (1, 2):
        assert acc[f"top{k}"] == {str(f): pytest.approx(k / (f * raw)) for f in (4, 1, 2)}
    assert sorted(calls["eval"]) == sorted((f * raw, chunk, k, 4 * 6) for f in (4, 1, 2) for k in (2, 1))


# ----------------------------------------------------------------------------- evaluation helpers
def _raw_to_landmark_positions(n: int, L: int):
    """Independent oracle: the with-landmark index of each raw token (a landmark after every L-1)."""
    pos, j = [], 0
    for _ in range(n):
        if j % L == L - 1:
            j += 1
        pos.append(j)
        j += 1
    return np.asarray(pos)


class _OracleModel:
    """``apply`` returns logits whose argmax at position i is the true token i+1 (``full``: the whole
    sequence the inputs are a prefix of), except where ``wrong(row_tokens)`` says to break the last one."""

    def __init__(self, vocab, full, wrong=lambda row: False):
        self.vocab, self.full, self.wrong = vocab, full, wrong

    def logits(self, t):
        t = np.asarray(t)
        out = np.zeros(t.shape + (self.vocab,), np.float32)
        for b in range(t.shape[0]):
            r = next(i for i in range(len(self.full)) if (self.full[i, :t.shape[1]] == t[b]).all())
            nxt = np.append(self.full[r, 1:t.shape[1] + 1], 0)[:t.shape[1]] if t.shape[1] < self.full.shape[1] \
                else np.append(self.full[r, 1:], 0)
            out[b, np.arange(t.shape[1]), nxt] = 5.0
            if self.wrong(self.full[r]):
                out[b, self.full.shape[1] - 2, :] = 0.0
                out[b, self.full.shape[1] - 2, (self.full[r, -1] + 1) % self.vocab] = 5.0
        return out


def test_passkey_eval_baseline_scores_exact_match_of_all_digits_at_the_answer(monkeypatch):
    import jaxformers
    from experiments import landmark_passkey as pk

    tokens, _, answer = pk.passkey_batch(np.random.default_rng(0), 10, 40, 3)
    wrong = lambda row: row[-1] % 2 == 1            # the last digit mispredicted when it is odd
    oracle = _OracleModel(pk.VOCAB, tokens, wrong)
    monkeypatch.setattr(jax, "jit", lambda f: f)  # the fake model runs on concrete arrays
    monkeypatch.setattr(jaxformers, "build", lambda cfg: types.SimpleNamespace(
        apply=lambda v, t: oracle.logits(t)))
    expected = np.mean([not wrong(r) for r in tokens])
    assert 0 < expected < 1
    assert pk.eval_baseline(None, None, tokens, answer, batch=3) == pytest.approx(expected)


def test_passkey_eval_landmark_reads_the_answer_through_the_landmarks(monkeypatch):
    """Answer digits straddling a block boundary (raw 90 = 6 blocks of 15): the prediction of each
    digit is read at the with-landmark position before it."""
    import jaxformers.models.landmark as lmod
    from experiments import landmark_passkey as pk

    L, digits, n = 16, 3, 92
    tokens, _, answer = pk.passkey_batch(np.random.default_rng(1), 8, n, digits)
    pos = _raw_to_landmark_positions(n, L)
    cfg = types.SimpleNamespace(landmark_block=L, landmark_token=pk.VOCAB - 1)
    wrong = lambda row: row[-2] % 2 == 1           # the middle digit (raw 90, after a landmark) when odd

    def fake_memory_forward(cfg_, params, seq, **kw):
        seq = np.asarray(seq)
        out = np.zeros(seq.shape + (pk.VOCAB,), np.float32)
        for b in range(seq.shape[0]):
            out[b, np.arange(seq.shape[1] - 1), seq[b, 1:]] = 5.0      # the true next token
            raw = next(i for i in range(len(tokens)) if (tokens[i] == seq[b, pos]).all())
            if wrong(tokens[raw]):
                j = pos[n - 2] - 1
                out[b, j] = 0.0
                out[b, j, (seq[b, j + 1] + 1) % 10] = 5.0
        return out

    assert pos[n - 2] - 1 == pos[n - 3] + 1            # a landmark between the first two digits
    monkeypatch.setattr(lmod, "memory_forward", fake_memory_forward)
    expected = np.mean([not wrong(r) for r in tokens])
    assert 0 < expected < 1
    assert pk.eval_landmark(cfg, None, tokens, answer, chunk_len=96, top_k=1, max_blocks=6,
                            batch=3) == pytest.approx(expected)


def test_landmark_lm_eval_losses_cover_the_same_raw_targets(monkeypatch):
    """Both evaluations average the next-token loss over raw targets 1..n-1; with oracle logits
    (5 on the true next token) every target costs log(e^5 + V - 1) - 5."""
    import jaxformers
    import jaxformers.models.landmark as lmod
    from experiments import landmark_lm

    V, L, n = 12, 4, 20
    windows = np.random.default_rng(2).integers(0, V - 1, (3, n)).astype(np.int32)
    per_target = math.log(math.exp(5) + V - 1) - 5
    cfg = types.SimpleNamespace(landmark_block=L, landmark_token=V - 1)

    def fake_memory_forward(cfg_, params, seq, **kw):
        seq = np.asarray(seq)
        out = np.zeros(seq.shape + (V,), np.float32)
        for b in range(seq.shape[0]):
            out[b, np.arange(seq.shape[1] - 1), seq[b, 1:]] = 5.0
        return out

    monkeypatch.setattr(lmod, "memory_forward", fake_memory_forward)
    got = landmark_lm.eval_landmark(cfg, None, windows, chunk_len=8, top_k=1, max_blocks=6)
    assert got == pytest.approx(per_target, rel=1e-5)
    monkeypatch.setattr(jax, "jit", lambda f: f)  # the fake model runs on concrete arrays
    oracle = _OracleModel(V, windows)
    monkeypatch.setattr(jaxformers, "build", lambda c: types.SimpleNamespace(apply=lambda v, t: oracle.logits(t)))
    assert landmark_lm.eval_baseline(None, None, windows) == pytest.approx(per_target, rel=1e-5)


def test_scfa_lm_perplexity_delta_does_not_need_a_throughput(tmp_path, monkeypatch):
    """The trainer reports ``tokens_per_s=None`` when no timed interval ran (a 1-step run: the only
    step compiles); the perplexity delta to the baseline (no clock in it) was then silently left
    out with the speedup."""
    from experiments import scfa_lm

    def fake_train(key, cfg, out, reusable, **kw):
        ppl, tps = {"baseline_T128": (10.0, None), "hash_nb4_T128": (11.0, 2000.0), "qk_s50_T128": (9.5, 500.0)}[key]
        return (_summary(val_ppl=ppl, tokens_per_s=tps), {"id": key}, "float32",
                types.SimpleNamespace(steps=1, tokens_per_step=1024, batch_size=8))

    monkeypatch.setattr(scfa_lm, "reuse_or_train", fake_train)
    monkeypatch.setattr(scfa_lm, "tile_counts", lambda *a, **k: (40, 80, [20, 20]))
    monkeypatch.setattr(scfa_lm, "plot", lambda *a: None)
    scfa_lm.main(["--out", str(tmp_path), "--no-compile-cache", "--no-kernel-check", "--steps", "1"])
    rows = json.loads((tmp_path / "results.json").read_text())["models"]
    assert rows["baseline_T128"]["step_time_s"] is None
    assert rows["hash_nb4_T128"]["val_ppl_delta_vs_baseline"] == pytest.approx(1.0)
    assert rows["qk_s50_T128"]["val_ppl_delta_vs_baseline"] == pytest.approx(-0.5)
    assert "speedup_vs_baseline" not in rows["hash_nb4_T128"]      # no baseline step time: no ratio


def test_scfa_lm_plot_does_not_draw_a_missing_step_time_as_zero(tmp_path, monkeypatch):
    """A row without a step time (``step_time_s`` None: no timed step) was drawn as a 0 s bar
    labelled "0" -- a number in the plot that results.json does not have."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.axes import Axes
    from experiments import scfa_lm

    labels = []
    real_text = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **k: (labels.append(s), real_text(self, x, y, s, *a, **k))[1])
    row = dict(model="gpt", val_ppl=12.5, step_time_s=None, tile_fraction=1.0)
    results = {"models": {"baseline_T128": row, "hash_nb4_T128": dict(row, model="hash_sparse", step_time_s=0.25,
                                                                      tile_fraction=0.5)},
               "preset": "tiny", "train": {"steps": 1}, "device": "cpu"}
    scfa_lm.plot(results, tmp_path / "p.png")
    assert labels == ["12.5", "12.5", "n/a", "0.25", "1", "0.5"]
