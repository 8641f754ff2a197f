"""Audit 47 (bench): a mutation pass over the benchmarks' measurement and reporting logic.

Behaviour only, never timing: fake clocks, faked ``median_ms`` / ``_time`` / subprocesses, tiny
shapes.  Each number a benchmark records is checked against an independent hand formula
(causal FLOPs, bytes moved, speedup = anchor ms / row ms, slope between the two largest layer
counts), and every skipped or failed case must still be a row of ``results.json``."""
import contextlib
import importlib
import io
import json
import subprocess
import types

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_attention as ba
from experiments import bench_hadamard as bh
from experiments import bench_models as bm
from experiments import bench_quantize as bq
from experiments import bench_scan as bs
from experiments import kernel_report as kr
from experiments import scfa_speed as sp


class FakeClock:
    """``perf_counter`` that only advances when a faked call says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


# --------------------------------------------------------------------------- scfa_speed
def test_scfa_speed_timing_excludes_compilation_with_no_warmup(monkeypatch):
    """``--warmup 0`` timed tracing + compilation in the first call (median of 1 = compile time:
    53 ms for a 0.4 ms add on the CPU), and the Pallas kernels compile far longer than cuDNN, so
    the recorded speedups were skewed; now each function is compiled ahead of time."""
    traces = []

    def fn(q, k, v):
        traces.append(1)  # runs while tracing only
        return q + k + v

    real, calls = sp.median_ms, []

    def timed(f, args, warmup, iters):
        before = len(traces)
        ms = real(f, args, warmup, iters)
        calls.append(len(traces) - before)
        return ms

    monkeypatch.setattr(sp, "median_ms", timed)
    x = jnp.ones((1, 8, 1, 4))
    out = sp.bench("x", fn, x, x, x, x, on_gpu=False, warmup=0, iters=1)
    assert out["fwd"] is not None and out["fwd+bwd"] is not None, out
    assert calls == [0, 0] and traces, (calls, traces)  # was [1, 1]


def test_scfa_speed_speedups_are_anchor_over_row_per_mode(tmp_path, monkeypatch):
    ms = {"flash": (8.0, 24.0), "hash_nb2": (2.0, 12.0), "qk_keep0.5": (4.0, 6.0)}
    monkeypatch.setattr(sp, "bench", lambda name, *a, **kw: dict(zip(("fwd", "fwd+bwd"), ms[name])))
    drawn = []
    real_labels = sp._labels
    monkeypatch.setattr(sp, "_labels", lambda *a: drawn.append(a) or real_labels(*a))
    monkeypatch.setattr(sp, "plot", lambda rows, path: None)
    sp.main(["--quick", "--buckets", "2", "--keep", "0.5", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["impl"]: r for r in res["rows"]}
    assert res["complete"] is True
    # the anchor that cannot run here is a row, not a gap
    assert rows["cudnn"]["skipped"] and rows["cudnn"]["fwd_ms"] is None
    assert rows["flash"]["speedup_vs_flash_fwd"] == 1.0
    assert rows["hash_nb2"]["speedup_vs_flash_fwd"] == 8.0 / 2.0
    assert rows["hash_nb2"]["speedup_vs_flash_fwd_bwd"] == 24.0 / 12.0
    assert rows["qk_keep0.5"]["speedup_vs_flash_fwd"] == 8.0 / 4.0
    assert rows["qk_keep0.5"]["speedup_vs_flash_fwd_bwd"] == 24.0 / 6.0
    assert all(r["speedup_vs_cudnn_fwd"] is None for r in rows.values() if "skipped" not in r)
    # the tile fraction counts the labels that were timed (same kind, rate, shape and seed)
    timed = [a for a in drawn[0::2]]
    counted = [a for a in drawn[1::2]]
    assert len(drawn) == 4 and timed == counted, drawn


# --------------------------------------------------------------------------- bench_attention
def test_attention_sweep_rows_flops_batches_and_skips(tmp_path, monkeypatch):
    real_make = ba.make_attention
    seen = []

    def make(impl, **kw):
        if impl == "cudnn":
            return real_make(impl, **kw)  # skipped on the CPU

        def fn(q, k, v):
            seen.append((q.shape, q.dtype))
            return q + k + v
        return fn, None

    monkeypatch.setattr(ba, "make_attention", make)
    monkeypatch.setattr(ba, "median_ms", lambda f, args, warmup, iters: 2.0)
    assert ba.main(["--quick", "--impls", "xla,cudnn", "--head-dims", "8,16", "--seq-lens", "16,32",
                    "--tokens", "64", "--heads", "2", "--warmup", "0", "--iters", "1",
                    "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    got = {(r["impl"], r["head_dim"], r["seq_len"], r["mode"]) for r in rows}
    assert got == {(i, d, t, m) for i in ("xla", "cudnn") for d in (8, 16) for t in (16, 32)
                   for m in ("fwd", "fwd+bwd")} and len(rows) == 16
    for r in rows:
        assert r["batch"] == 64 // r["seq_len"] and r["heads"] == 2
        if r["impl"] == "cudnn":
            assert r["skipped"] and r["ms"] is None and r["tflops"] is None
            continue
        b, t, h, d = r["batch"], r["seq_len"], 2, r["head_dim"]
        fwd = 4 * b * h * d * sum(range(1, t + 1))  # QK^T and PV over the visible pairs
        flops = fwd if r["mode"] == "fwd" else 3.5 * fwd
        assert r["ms"] == 2.0 and r["tflops"] == pytest.approx(flops / 2e-3 / 1e12, rel=1e-12)
    assert {s for s, _ in seen} == {(64 // t, t, 2, d) for d in (8, 16) for t in (16, 32)}


def test_attention_all_inputs_in_the_benchmarked_dtype(monkeypatch):
    seen = []

    def fn(q, k, v):
        seen.append((q.dtype, k.dtype, v.dtype))
        return q * k + v

    monkeypatch.setattr(ba, "make_attention", lambda impl, **kw: (fn, None))
    monkeypatch.setattr(ba, "median_ms", lambda f, args, warmup, iters: (
        seen.append(tuple(a.dtype for a in args)), 1.0)[1])
    rows = ba.bench_one("xla", batch=1, seq_len=4, heads=1, head_dim=4, dtype=jnp.bfloat16, on_gpu=False,
                        warmup=0, iters=1)
    assert all(r.get("error") is None for r in rows), rows
    assert rows[0]["dtype"] == "bfloat16"
    assert seen and all(set(s) == {jnp.dtype(jnp.bfloat16)} for s in seen), seen  # do included


# --------------------------------------------------------------------------- bench_scan
@pytest.mark.parametrize("impls", ["pallas", "pallas,fla"])
def test_scan_main_records_every_impl_and_the_timing_counts(impls, tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "_bench_jax", lambda base, fn, inputs, keys, on_gpu, warmup, iters: [
        dict(base, mode=m, ms=1.0) for m in ("fwd", "fwd+bwd")])
    assert bs.main(["--quick", "--impls", impls, "--warmup", "0", "--iters", "2",
                    "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["warmup"] == 0 and res["iters"] == 2
    got = {(r["kernel"], r["impl"], r["mode"]): r for r in res["rows"]}
    want = {("selective_scan", i, m) for i in bs.SS_IMPLS for m in ("fwd", "fwd+bwd")} | {
        ("ssd", i, m) for i in bs.SSD_IMPLS for m in ("fwd", "fwd+bwd")}
    assert set(got) == want and len(res["rows"]) == len(want)
    for (kernel, impl, mode), r in got.items():
        if impl == "pallas":
            assert r["ms"] == 1.0
        else:
            assert r["ms"] is None and r["skipped"], r
            if impl == "fla" and "fla" in impls:  # asked for, but only benchmarked on a GPU
                assert "GPU" in r["skipped"], r


def test_torch_median_is_the_median_per_call(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bs, "time", types.SimpleNamespace(perf_counter=clock))
    durations = iter([0.100, 0.004, 0.001, 0.002])  # warm-up (compiles), then 3 samples

    def f():
        clock.advance(next(durations))
    ms = bs.torch_median_ms(f, lambda: None, warmup=1, iters=3)
    assert ms == pytest.approx(2.0)  # the median, not the best (1) nor the mean (2.33)
    # back-to-back samples: one call of 2 ms -> 5 calls a 10 ms sample; per call 2 ms, not 10
    monkeypatch.setattr(bs, "time", types.SimpleNamespace(perf_counter=clock))
    calls = []

    def g():
        calls.append(1)
        clock.advance(0.002)
    ms = bs.torch_median_ms(g, lambda: None, warmup=0, iters=3, min_sample_ms=10.0)
    assert ms == pytest.approx(2.0) and len(calls) == 1 + 3 * 5


# --------------------------------------------------------------------------- bench_hadamard
def test_hadamard_bandwidth_anchor_dtype_and_failed_cases(monkeypatch):
    seen = []

    def fake_median(fn, args, warmup, iters):
        x, h = args
        seen.append((x.shape, x.dtype, h.dtype))
        if x.shape[-1] == 352 and len(seen) % 4 == 1:  # the pallas forward of n = 352 fails
            raise RuntimeError("boom")
        return 2.0

    monkeypatch.setattr(bh, "median_ms", fake_median)
    rows = bh.bench((64, 352), 8, jnp.dtype(jnp.bfloat16), 0, 1)
    assert [(r["n"], r["impl"], r["mode"]) for r in rows] == [
        (n, i, m) for n in (64, 352) for i in ("pallas", "dense") for m in ("fwd", "fwd+bwd")]
    for r in rows:
        if (r["n"], r["impl"], r["mode"]) == (352, "pallas", "fwd"):
            assert r["ms"] is None and "boom" in r["note"] and r["fwd_gbs"] is None
            continue
        assert r["ms"] == 2.0 and r["note"] is None
        # read + write of x: 2 * rows * n * 2 bytes in 2 ms
        want = 2 * 8 * r["n"] * 2 / 2e-3 / 1e9 if r["mode"] == "fwd" else None
        assert r["fwd_gbs"] == (pytest.approx(want) if want else None)
    # the dense anchor multiplies in the benchmarked dtype (its H_n too)
    assert all(xd == hd == jnp.dtype(jnp.bfloat16) for _, xd, hd in seen), seen


# --------------------------------------------------------------------------- bench_quantize
def test_quantize_table_growth_is_the_slope_between_the_two_largest():
    rows = [dict(spec="rtn4", layers=n, seconds=1.0, peak_rss_gb=p) for n, p in ((1, 1.0), (2, 1.2), (4, 2.0))]
    line = next(ln for ln in bq.table(rows).splitlines() if ln.startswith("| rtn4 |"))
    assert line.rstrip().endswith("| 0.40 |"), line  # (2.0 - 1.2) / (4 - 2)


def test_quantize_failed_job_is_a_row(monkeypatch):
    def fake_run(cmd, **kw):
        job = json.loads(cmd[-1])
        if job["layers"] == 2:
            return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="MemoryError")
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(dict(job, seconds=1.0, peak_rss_gb=1.0)),
                                           stderr="")
    monkeypatch.setattr(bq.subprocess, "run", fake_run)
    jobs = [dict(spec="rotate", layers=n, widths="tiny", calib=1, calib_len=8) for n in (1, 2)]
    rows = bq.bench(jobs)
    assert [r["layers"] for r in rows] == [1, 2]
    assert "seconds" not in rows[1] and "MemoryError" in rows[1]["note"]
    assert "failed" in bq.table(rows)


# --------------------------------------------------------------------------- bench_models
def test_models_time_is_the_median_after_the_warmup(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bm, "time", types.SimpleNamespace(perf_counter=clock))
    durations = iter([100.0, 3.0, 1.0, 2.0])

    def fn(x):
        clock.advance(next(durations))
        return x
    assert bm._time(fn, (jnp.zeros(1),), warmup=1, iters=3) == 2.0


def test_models_rows_throughput_formulas(monkeypatch):
    class Lowered:
        def __init__(self, fn):
            self.fn = fn

        def lower(self, *args):
            return types.SimpleNamespace(compile=lambda: self.fn)

    class FakeMB:
        def __init__(self, name, preset, dtype, max_len):
            self.max_len, self.n_params, self.module = max_len, 10, None
            self.params = {"w": jnp.zeros(2)}
            self.tx = types.SimpleNamespace(init=lambda p: {})
            self.config = types.SimpleNamespace(vocab_size=7)

        def random_tokens(self, shape, seed=0):
            return jnp.zeros(shape, jnp.int32)

        def train_step(self):
            return Lowered(lambda p, o, t: (p, o, 0.0))

        def prefill(self):
            return Lowered(lambda p, t: (t, None))

        def generate(self, n):
            return Lowered(lambda p, tok, cache: (tok, cache))

    import jaxformers
    monkeypatch.setattr(bm, "ModelBench", FakeMB)
    monkeypatch.setattr(jaxformers, "init_cache", lambda module, b, n: {"k": jnp.zeros((b, n), jnp.float32)})
    monkeypatch.setattr(bm, "_time", lambda fn, state, warmup, iters, carry=False: 0.5)
    cfg = dict(preset="tiny", seq_lens=(16, 32), tokens=64, gen_batches=(1, 3), gen_prompt=4, gen_tokens=5,
               warmup=0, iters=1)
    rows = bm.bench_model("gpt", cfg, "float32")
    assert [(r["kind"], r.get("seq_len"), r["batch"]) for r in rows] == [
        ("train", 16, 4), ("prefill", 16, 4), ("train", 32, 2), ("prefill", 32, 2),
        ("generate", 9, 1), ("generate", 9, 3)]
    for r in rows:
        assert r["status"] == "ok" and r["ms"] == 500.0, r
        if r["kind"] == "generate":
            assert r["tokens_per_s"] == r["batch"] * 5 / 0.5 and r["ms_per_step"] == 500.0 / 5
            assert r["cache_bytes"] == r["batch"] * 9 * 4 + 4  # + the int32 index
        else:  # train: T inputs a row predict T next tokens (the [B, T + 1] batch's shift)
            assert r["tokens_per_s"] == r["batch"] * r["seq_len"] / 0.5


# --------------------------------------------------------------------------- kernel_report
def test_kernel_report_rows_spills_tpu_columns_and_progress(monkeypatch):
    calls = {"a": [types.SimpleNamespace(name="k_fwd"), types.SimpleNamespace(name="k_bwd")],
             "b": [types.SimpleNamespace(name="k_fwd")]}
    monkeypatch.setattr(kr, "cases", lambda preset, families: [
        ("fam", label, lambda label=label: kr.Case(label, (), lambda: {})) for label in ("a", "b")])
    monkeypatch.setattr(kr, "tpu_columns", lambda case: {
        "k_fwd": {"tpu_lowers": True, "tpu_error": None, "tpu_vmem_bytes": 123}})
    monkeypatch.setattr(kr, "triton_calls", lambda fn, *a, arch: calls[fn])
    spill = {"k_fwd": (0, 0), "k_bwd": (0, 16)}
    monkeypatch.setattr(kr, "compile_report", lambda call, arch: dict(
        name=call.name, stack_bytes=spill[call.name][0], local_bytes=spill[call.name][1], num_warps=4,
        registers=32, shared_bytes=1024, fits=True, wgmma=0, mma_sync=0, ctas_per_sm=1))
    progress = []
    with contextlib.redirect_stdout(io.StringIO()):
        rows = kr.run("quick", 90, progress=lambda rows: progress.append(len(rows)))
    assert progress == [2, 3]
    assert [(r["config"], r["name"], r["spills"]) for r in rows] == [
        ("a", "k_fwd", False), ("a", "k_bwd", True), ("b", "k_fwd", False)]
    assert rows[0]["tpu_vmem_bytes"] == 123 and rows[0]["tpu_lowers"] is True
    assert "tpu_lowers" not in rows[1]


# --------------------------------------------------------------------------- bad flags
BAD_FLAGS = [
    ("bench_attention", ["--head-dims", "0"], "--head-dims"),
    ("bench_attention", ["--seq-lens", "64,64"], "--seq-lens"),
    ("bench_attention", ["--tokens", "0"], "--tokens"),
    ("bench_attention", ["--heads", "-1"], "--heads"),
    ("bench_attention", ["--warmup", "-1"], "--warmup"),
    ("bench_attention", ["--impls", "pallas,nope"], "--impls"),
    ("bench_scan", ["--warmup", "-1"], "--warmup"),
    ("bench_scan", ["--iters", "0"], "--iters"),
    ("bench_scan", ["--impls", ""], "--impls"),
    ("bench_hadamard", ["--dtype", "float16"], "--dtype"),
    ("bench_hadamard", ["--sizes", "0"], "--sizes"),
    ("bench_hadamard", ["--sizes", "64,64"], "--sizes"),
    ("bench_quantize", ["--calib-len", "0"], "--calib-len"),
    ("bench_quantize", ["--widths", "huge"], "--widths"),
    ("bench_quantize", ["--layers", "1,1"], "--layers"),
    ("bench_quantize", ["--specs", ""], "--specs"),
    ("bench_models", ["--gen-tokens", "0"], "--gen-tokens"),
    ("bench_models", ["--gen-prompt", "-1"], "--gen-prompt"),
    ("bench_models", ["--gen-batches", "0"], "--gen-batches"),
    ("bench_models", ["--tokens", "0"], "--tokens"),
    ("bench_models", ["--dtype", "float16"], "--dtype"),
    ("bench_models", ["--warmup", "-1"], "--warmup"),
    ("bench_models", ["--iters", "0"], "--iters"),
    ("scfa_speed", ["--block", "24"], "--block"),
    ("scfa_speed", ["--heads", "0"], "--heads"),
    ("scfa_speed", ["--head-dim", "0"], "--head-dim"),
    ("scfa_speed", ["--buckets", "0"], "--buckets"),
    ("scfa_speed", ["--keep", "1.5"], "--keep"),
    ("scfa_speed", ["--tokens", "0"], "--tokens"),
    ("scfa_speed", ["--iters", "0"], "--iters"),
    ("scfa_speed", ["--warmup", "-1"], "--warmup"),
    ("kernel_report", ["--arch", "70"], "--arch"),
    ("kernel_report", ["--preset", "huge"], "--preset"),
    ("kernel_report", ["--families", "attention,nope"], "--families"),
]


@pytest.mark.parametrize("module,argv,flag", BAD_FLAGS, ids=[f"{m}{' '.join(a)}" for m, a, _ in BAD_FLAGS])
def test_every_benchmark_refuses_bad_flags_naming_them(module, argv, flag, tmp_path, capsys):
    mod = importlib.import_module(f"experiments.{module}")
    quick = [] if module == "kernel_report" else ["--quick"]
    with pytest.raises(SystemExit) as exc:
        mod.main(quick + argv + ["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()
