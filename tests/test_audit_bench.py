"""Regression tests of the GPU check's audit: FLOP convention, ratio baselines, results written while a
run is still going, and the fla anchor timed like JAX (all on the CPU, with fakes for what needs a GPU)."""
import json
import subprocess
import sys
import types

import jax.numpy as jnp
import pytest

from experiments import bench_attention as ba
from experiments import bench_scan as bs
from experiments import gpu_check as gc


class _Pipe:  # compiles nothing: run_timed is faked
    def add(self, fn, args, **kw):
        return None

    def wait_idle(self):
        pass


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fwd_bwd_attention_flops_are_3_5x_the_forward(tmp_path, monkeypatch):
    # forward 2 matmuls, backward 5 (QK^T recomputed, dV, dP, dQ, dK): fwd+bwd = 3.5x fwd (was 2.5x)
    fwd = ba.causal_flops(2, 16, 4096, 128, "fwd")
    assert fwd == 4 * 2 * 16 * 128 * (4096 * 4097 // 2)  # the visible pairs, the diagonal included
    from experiments.gpu_check import causal_pairs  # the GPU check counts the same pairs
    assert ba.causal_flops(1, 1, 333, 1, "fwd") == 4 * causal_pairs(333)
    assert ba.causal_flops(2, 16, 4096, 128, "fwd+bwd") == 3.5 * fwd
    with pytest.raises(ValueError, match="mode"):
        ba.causal_flops(2, 16, 4096, 128, "bwd")
    seen = {}

    def fake_run_timed(part, fut, args, **row):
        seen[row["mode"]] = row["flops"]
        return dict(row, ms=1.0), None
    monkeypatch.setattr(gc, "run_timed", fake_run_timed)
    part = gc.Part("attention", tmp_path, smoke=True)
    gc.attention_group(part, _Pipe(), group="causal", impls=("pallas",), b=1, t=64, h=2, d=32,
                       dtype=jnp.float32, pairs=gc.causal_pairs(64))()
    assert seen["fwd"] == 4 * 2 * 32 * (64 * 65 // 2)
    assert seen["fwd+bwd"] == 3.5 * seen["fwd"] and gc.FWD_BWD_FLOPS == ba.FWD_BWD_FLOPS


def test_layer_parallel_speedup_only_against_the_unpaired_model(tmp_path, monkeypatch):
    # the unpaired decode failing made the first paired variant the baseline: a made-up speed-up
    def fake_run_timed(part, fut, args, **row):
        ms = None if row["impl"] == "unpaired" else (10.0 if row["impl"].startswith("1 ") else 8.0)
        return part.row(**row, ms=ms), None
    monkeypatch.setattr(gc, "run_timed", fake_run_timed)
    part = gc.Part("kernels", tmp_path, smoke=True)
    gc.layer_parallel_decode(part, _Pipe())
    rows = _rows(tmp_path / "kernels.jsonl")
    rates = [r for r in rows if r["kind"] == "layer_parallel_rate"]
    assert rates and all(r["speedup"] is None for r in rates)
    target = next(t for t in gc.evaluate_targets(rows) if t["key"] == "layer_parallel_decode")
    assert target["measured"] is None and target["met"] is None


def test_results_are_written_while_later_parts_run(tmp_path, monkeypatch):
    # a run killed by the device's timeout during a part still returns results.json / table.md
    out, work = tmp_path / "out", tmp_path / "work"
    seen = []

    class FakePopen:
        def __init__(self, cmd, **kw):
            self.name, self.waits = cmd[cmd.index("--part") + 1], 0
            (work / f"{self.name}.jsonl").write_text(json.dumps(
                dict(part=self.name, kind="correct", case=self.name, ok=True)) + "\n")

        def wait(self, timeout=None):
            self.waits += 1
            if self.name == "attention" and self.waits == 1:  # still running after a refresh interval
                raise subprocess.TimeoutExpired("part", timeout)
            if self.name == "attention":
                res = json.loads((out / "results.json").read_text())
                seen.append(({p["part"]: p["status"] for p in res["parts"]}, len(res["rows"]),
                             (out / "table.md").is_file()))
            return 0
    monkeypatch.setattr(gc.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(gc, "REFRESH_S", 0.01, raising=False)
    monkeypatch.setattr(gc, "_kill", lambda proc: None)  # nothing to kill: no process was started
    res = gc.orchestrate(["correct", "attention"], out, work, smoke=True, budgets={}, deadline=1e9,
                         command="t")
    assert seen, "results.json was not (re)written while the part ran"
    status, n_rows, table = seen[0]
    assert status["correct"] == "ok" and status["attention"].startswith("running") and table
    assert n_rows == 2  # the running part's rows so far are in it too
    assert [p["status"] for p in res["parts"]] == ["ok", "ok"]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "table.md"]


def test_fla_rows_stream_and_are_timed_back_to_back(monkeypatch):
    torch = pytest.importorskip("torch")
    events = []

    class Fake(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, g):
            events.append("fwd")
            return v * 2

        @staticmethod
        def backward(ctx, do):
            events.append("bwd")
            return None, None, do * 2, None

    fla = types.ModuleType("fla.ops.simple_gla")
    fla.chunk_simple_gla = lambda q, k, v, g=None, scale=None: (Fake.apply(q, k, v, g), None)
    for name, mod in (("fla", types.ModuleType("fla")), ("fla.ops", types.ModuleType("fla.ops")),
                      ("fla.ops.simple_gla", fla)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("sync"))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self, raising=False)
    inputs = bs._ssd_inputs(1, 8, 2, 4, 4, 1, jnp.float32)
    rows = bs._bench_fla(dict(kernel="ssd", impl="fla"), inputs, warmup=1, iters=3, min_sample_ms=5.0)
    first = next(rows)  # the fwd row comes before any backward ran (a part cut short keeps it)
    assert first["mode"] == "fwd" and first["ms"] > 0 and "bwd" not in events
    second = next(rows)
    assert second["mode"] == "fwd+bwd" and second["ms"] > 0
    runs, n = [], 0  # calls between two synchronisations: back-to-back, as gpu_check times JAX
    for e in events:
        if e == "sync":
            runs.append(n)
            n = 0
        elif e == "fwd":
            n += 1
    assert max(runs) > 1
    # per-call synchronisation when no sample length is asked for (bench_scan's own sweep)
    events.clear()
    list(bs._bench_fla(dict(kernel="ssd", impl="fla"), inputs, warmup=1, iters=3))
    assert events.count("sync") == 2 * (1 + 3)  # per mode: after the warm-up, after each timed call
