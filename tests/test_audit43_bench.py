"""Audit 43 (bench): the attention / scan benchmarks time execution, not tracing + compilation,
even with ``--warmup 0`` (each function is compiled ahead of time, outside the timed calls); the
fla anchor's fwd+bwd returns its gradients instead of accumulating them into ``.grad``."""
import jax.numpy as jnp

from experiments import bench_attention as ba
from experiments import bench_scan as bs


def _counting(fn, traces):
    def wrapped(*args, **kwargs):
        traces.append(1)  # a Python side effect: runs while tracing, never when compiled code runs
        return fn(*args, **kwargs)
    return wrapped


def _no_trace_while_timed(monkeypatch, module, traces):
    """Wrap ``module.median_ms``: the timed calls (warm-up included) must not trace anything."""
    real, calls = module.median_ms, []

    def timed(fn, args, warmup, iters):
        before = len(traces)
        ms = real(fn, args, warmup, iters)
        calls.append(len(traces) - before)
        return ms

    monkeypatch.setattr(module, "median_ms", timed)
    return calls


def test_attention_timing_excludes_compilation_with_no_warmup(monkeypatch):
    traces = []
    fn = _counting(lambda q, k, v: q + k + v, traces)
    monkeypatch.setattr(ba, "make_attention", lambda impl, **kw: (fn, None))
    calls = _no_trace_while_timed(monkeypatch, ba, traces)
    rows = ba.bench_one("xla", batch=1, seq_len=8, heads=1, head_dim=4, dtype=jnp.float32, on_gpu=False,
                        warmup=0, iters=1)
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"]
    assert all(r.get("error") is None for r in rows), rows
    # the old code traced (and compiled) inside the first timed call: [1, 1]
    assert calls == [0, 0] and traces, (calls, traces)


def test_scan_timing_excludes_compilation_with_no_warmup(monkeypatch):
    traces = []
    fn = _counting(lambda x, y: x * y, traces)
    inputs = dict(x=jnp.ones((4,)), y=jnp.arange(4.0))
    calls = _no_trace_while_timed(monkeypatch, bs, traces)
    rows = bs._bench_jax(dict(kernel="k", impl="i"), fn, inputs, ("x",), False, 0, 1)
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"]
    assert all(r.get("error") is None for r in rows), rows
    assert calls == [0, 0] and traces, (calls, traces)


def test_attention_smoke_rows_have_the_printed_numbers(tmp_path, capsys):
    # every printed ms / TFLOP/s is in results.json, with TFLOP/s = causal_flops / ms
    import json
    assert ba.main(["--quick", "--impls", "xla", "--warmup", "0", "--iters", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    out = capsys.readouterr().out
    assert len(rows) == 2
    for r in rows:
        want = ba.causal_flops(r["batch"], r["heads"], r["seq_len"], r["head_dim"], r["mode"]) / (r["ms"] * 1e9)
        assert abs(r["tflops"] - want) <= 1e-12 * want
        assert f"{r['ms']:.3f}" in out


def test_fla_fwd_bwd_does_not_accumulate_gradients(monkeypatch):
    # o.backward(do) added every call's gradients into q/k/v/g.grad: an extra read-modify-write of each
    # input per call, timed as part of the fla anchor's fwd+bwd (gpu_check's ssd ratio uses it)
    import sys
    import types

    import pytest
    torch = pytest.importorskip("torch")
    seen = {}

    class Fake(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, g):
            return v * 2

        @staticmethod
        def backward(ctx, do):
            return None, None, do * 2, None

    def chunk_simple_gla(q, k, v, g=None, scale=None):
        seen["v"] = v
        return Fake.apply(q, k, v, g), None

    fla = types.ModuleType("fla.ops.simple_gla")
    fla.chunk_simple_gla = chunk_simple_gla
    for name, mod in (("fla", types.ModuleType("fla")), ("fla.ops", types.ModuleType("fla.ops")),
                      ("fla.ops.simple_gla", fla)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self, raising=False)
    inputs = bs._ssd_inputs(1, 8, 2, 4, 4, 1, jnp.float32)
    rows = list(bs._bench_fla(dict(kernel="ssd", impl="fla"), inputs, warmup=2, iters=3))
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"] and all(r["ms"] > 0 for r in rows)
    assert seen["v"].grad is None  # was 2 * do summed over the 5 fwd+bwd calls


# --------------------------------------------------------------------------- bench_models: partial results, OOM words
def test_bench_models_keeps_the_rows_of_a_sweep_cut_short(tmp_path, monkeypatch):
    """results.json was written only at the end: a sweep killed (or failing) in its second model
    lost the first model's rows.  Now it is rewritten after every model, ``complete`` false."""
    import json

    import pytest

    from experiments import bench_models

    def fake(model, cfg, dtype):
        if model == "mamba":
            raise KeyboardInterrupt  # the sweep cut short during the second model
        return [{"kind": "train", "model": model, "status": "ok"}]

    monkeypatch.setattr(bench_models, "bench_model", fake)
    with pytest.raises(KeyboardInterrupt):
        bench_models.main(["--quick", "--models", "gpt,mamba", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == [{"kind": "train", "model": "gpt", "status": "ok"}]
    assert saved["complete"] is False
    monkeypatch.setattr(bench_models, "bench_model", lambda m, c, d: [{"kind": "train", "model": m, "status": "oom"}])
    bench_models.main(["--quick", "--models", "gpt,mamba", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["gpt", "mamba"] and saved["complete"] is True  # the last model done


def test_oom_is_the_word_not_a_substring():
    from experiments.common import is_out_of_memory

    assert is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: out of memory"))
    assert is_out_of_memory(RuntimeError("kernel OOM at 1.0 GiB"))
    assert not is_out_of_memory(ValueError("no room for the bloom filter"))
