"""Audit regressions of the GPU check's driver (experiments/gpu_check.py, scripts/gpu_check.sh):
the table's cells, stale rows of an earlier run, a NaN among the correctness errors, the
driver's end by SIGTERM (the device's command limit), and the time-limited set-up."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]


def _table_rows_have_equal_cells(md: str):
    for block in md.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        widths = {line.replace("\\|", "").count("|") for line in lines}
        assert len(widths) <= 1, block


def test_table_cells_escape_pipes():
    """The follow-up's tile tags ("fwd 128x64 ... | dq ...") and error messages contain "|": each
    row must keep its table's columns (table.md is pasted into BENCHMARKS.md)."""
    rows = [dict(part="flash_tiles", kind="attention", group="tiles fwd 128x64 w8 s3 | dq 64x64 dkv 64x64 w8 s2",
                 head_dim=128, batch=1, seq_len=16384, impl="pallas", mode="fwd", ms=1.0, tflops=500.0),
            dict(part="scfa_tiles", kind="scfa_tiles", impl="hash_nb16", tiles="64x64 wdefault", seq_len=16384,
                 heads=16, head_dim=64, mode="fwd+bwd", ms=None, error="ValueError: a | b"),
            dict(part="correct", kind="correct", case="flash | x", ok=False, error="E: 1 | 2\nmore")]
    md = gc.markdown(dict(rows=rows, env={}, date="d", command="c", wall_s=1.0, parts=[], targets=[]))
    _table_rows_have_equal_cells(md)
    assert "tiles fwd 128x64 w8 s3 \\| dq" in md


def test_rows_of_an_earlier_run_are_not_reported(tmp_path):
    """/tmp/gpu_check_parts outlives a run on a warm machine: a part skipped (or dead before it
    starts writing) must not bring back an earlier run's rows, nor a target judged on them."""
    work = tmp_path / "work"
    work.mkdir()
    old = dict(part="models", kind="model_rate", model="gpt", task="train", mfu=0.55)
    (work / "models.jsonl").write_text(json.dumps(old) + "\n")
    res = gc.orchestrate(["models"], tmp_path / "out", work, smoke=True, budgets={}, deadline=1.0, command="t")
    assert res["parts"][0]["status"] == "skipped: out of time"
    assert res["rows"] == []
    assert {t["key"]: t for t in res["targets"]}["gpt_small_mfu"]["measured"] is None


def test_a_nan_error_is_the_worst_error(tmp_path, monkeypatch):
    """A NaN gradient with an exact forward: max_rel_err NaN and not "IEEE level" (Python's max()
    skipped the NaN after a number: 0.0, True)."""
    import jax.numpy as jnp

    def kern(x):
        return x + 0.0 * jnp.sqrt(jnp.abs(x) - x)  # the value x, the derivative NaN

    monkeypatch.setattr(gc, "correctness_cases",
                        lambda smoke, seed, interpret=None: [("nan grad", kern, lambda x: x, (jnp.ones(4),), ())])
    with gc.Part("correct", tmp_path, smoke=True) as part:
        gc.part_correct(part)
    row = [json.loads(line) for line in (tmp_path / "correct.jsonl").read_text().splitlines()][-1]
    assert row["rel_errs"][0] == 0.0 and row["rel_errs"][1] != row["rel_errs"][1]
    assert row["max_rel_err"] != row["max_rel_err"]  # NaN
    assert row["ieee_level"] is False and row["ok"] is False


def _pids_with(text: str):
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_sigterm_ends_the_running_part_and_writes_the_results(tmp_path):
    """The device's command limit sends SIGTERM to the driver: the part it runs (in its own
    session) must die too (not keep the GPU for the follow-up), and the results be written."""
    work, out = tmp_path / "work", tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAXFORMERS_GPU_CHECK_TEST="hang:correct")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.gpu_check", "correct", "--smoke", "--out", str(out),
                             "--work", str(work)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not ((work / "correct.jsonl").is_file() and (work / "correct.jsonl").read_text()):
            assert time.time() - t0 < 120 and proc.poll() is None
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        time.sleep(0.5)
        orphans = _pids_with(f"--part correct --work {work}")
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _pids_with(f"--part correct --work {work}"):  # the orphaned part of the old driver
            os.kill(pid, signal.SIGKILL)
    assert orphans == []
    assert rc == 128 + signal.SIGTERM
    res = json.loads((out / "results.json").read_text())
    assert res["parts"][0]["status"].startswith("killed") and res["parts"][0]["rows"] == 1


def test_setup_time_counts_against_the_deadline(tmp_path, monkeypatch):
    seen = {}

    def fake(parts, out, work, **kw):
        seen.update(kw)
        return dict(parts=[])
    monkeypatch.setattr(gc, "orchestrate", fake)
    monkeypatch.setenv("JAXFORMERS_GPU_CHECK_T0", str(time.time() - 30))
    gc.main(["correct", "--smoke", "--deadline", "100", "--out", str(tmp_path / "o")])
    assert 69 <= seen["deadline"] <= 70.5
    monkeypatch.setenv("JAXFORMERS_GPU_CHECK_T0", "not a time")
    gc.main(["correct", "--smoke", "--deadline", "100", "--out", str(tmp_path / "o")])
    assert seen["deadline"] == 100


def test_gpu_check_sh_setup_has_a_time_limit(tmp_path):
    """A wedged nvidia-smi (or CUDA init) in the script's set-up must not eat the device call:
    the set-up steps are time-limited and the driver still writes results.json."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/usr/bin/env bash\nsleep 1000\n")
    (fake / "nvidia-smi").chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OUT=str(out), GPU_CHECK_PROBE_S="2")
    env.pop("JAXFORMERS_GPU_CHECK_T0", None)
    proc = subprocess.Popen(["bash", "scripts/gpu_check.sh", "correct", "--smoke", "--deadline", "1"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("scripts/gpu_check.sh still in its set-up after 60 s")
    assert "nvidia-smi: failed or timed out" in (out / "gpu.txt").read_text()
    assert json.loads((out / "results.json").read_text())["parts"][0]["status"] == "skipped: out of time"


def test_sigkill_of_the_driver_ends_the_running_part(tmp_path):
    """``timeout -k`` ends the driver with SIGKILL (no handler runs): the part must not outlive it."""
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAXFORMERS_GPU_CHECK_TEST="hang:correct")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.gpu_check", "correct", "--smoke", "--out",
                             str(tmp_path / "out"), "--work", str(work)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not ((work / "correct.jsonl").is_file() and (work / "correct.jsonl").read_text()):
            assert time.time() - t0 < 120 and proc.poll() is None
            time.sleep(0.2)
        proc.kill()
        proc.wait(timeout=30)
        time.sleep(1.0)
        orphans = _pids_with(f"--part correct --work {work}")
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _pids_with(f"--part correct --work {work}"):
            os.kill(pid, signal.SIGKILL)
    assert orphans == []


def test_a_part_that_does_not_die_when_killed_does_not_stop_the_driver(monkeypatch):
    """A process stuck in the GPU driver survives SIGKILL for a while: the driver waits a bounded
    time, then goes on with the other parts (``proc.wait()`` without a timeout hung it)."""
    import threading

    class Stuck:
        pid = 2 ** 22 + 12345  # no such process group: killpg fails, kill() is the fallback

        def kill(self):
            pass

        def wait(self, timeout=None):
            if timeout is None:
                threading.Event().wait()
            raise subprocess.TimeoutExpired("part", timeout)

    monkeypatch.setattr(gc, "KILL_WAIT_S", 0.1, raising=False)
    monkeypatch.setattr(os, "killpg", lambda *a: (_ for _ in ()).throw(ProcessLookupError()))
    result = []
    t = threading.Thread(target=lambda: result.append(gc._kill(Stuck())), daemon=True)
    t.start()
    t.join(5)
    assert result == [False]
