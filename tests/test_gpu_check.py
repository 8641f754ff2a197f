"""The GPU check script's driver on the CPU (``--smoke``: tiny shapes, interpret mode): every part
runs and is recorded, a hanging or crashing part costs only itself, and what comes back fits the
device's limits (at most 8 files).  The numbers themselves need the GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from experiments import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check", *args, "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    results = json.loads((out / "results.json").read_text())
    return proc, out, results


# The whole check on the CPU takes ~100 s of one core: it runs where the jax is closest to the
# device's (0.11.2), i.e. in CI's leg 2 (the newest jax), not in leg 1 (jax 0.10.2); the driver's
# other tests below (two parts, a hanging / crashing part, deadlines, budgets) run on both.
_DEVICE_JAX = (0, 11)


@pytest.mark.skipif(tuple(int(p) for p in jax.__version__.split(".")[:2]) < _DEVICE_JAX,
                    reason="the whole smoke check runs on jax >= 0.11 (the device's; CI's leg 2)")
def test_smoke_runs_every_part_and_writes_what_the_device_returns(tmp_path):
    proc, out, res = _run(["check", "followup"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p["part"] for p in res["parts"]] == list(gc.CHECK_PARTS + gc.FOLLOWUP_PARTS)
    assert all(p["status"] == "ok" and p["rows"] > 1 for p in res["parts"]), res["parts"]
    # the device returns at most 8 files, no deeper than 2 folders: the driver writes 3
    assert sorted(os.listdir(out)) == ["log.txt", "results.json", "table.md"]
    rows = res["rows"]
    kinds = {r.get("kind") for r in rows}
    assert {"env", "seed", "correct", "ceiling", "attention", "attention_diff", "scan", "model", "model_rate",
            "scfa", "landmark", "hadamard", "int8", "layer_parallel", "layer_parallel_rate",
            "scfa_tiles"} <= kinds
    # every kernel family checked against its reference, forward and gradients, and bit-stable
    correct = [r for r in rows if r.get("kind") == "correct"]
    families = ("flash causal", "flash window", "selective scan", "SSD", "hash-sparse", "QK-sparse", "landmark",
                "Hadamard", "int8 linear")
    for fam in families:
        cases = [r for r in correct if r["case"].startswith(fam)]
        assert cases and all(r["ok"] and r["repeat_identical"] for r in cases), (fam, cases)
    assert all(len(r["rel_errs"]) >= 4 for r in correct if not r["case"].startswith(("Hadamard", "int8")))
    # anchors the GPU alone runs are recorded as skipped, not silently dropped
    cudnn = [r for r in rows if r.get("kind") == "attention" and r.get("impl") == "cudnn"]
    assert cudnn and all(r["skipped"] == "needs a GPU" for r in cudnn)
    timed = [r for r in rows if r.get("kind") in ("attention", "scan", "model", "scfa", "hadamard", "int8")
             and not r.get("skipped")]
    assert timed and all(r.get("ms") and r["ms"] > 0 and not r.get("error") for r in timed), \
        [r for r in timed if not r.get("ms")]
    # one row per target; measured where the CPU has both sides, never claimed where it has not
    targets = {t["key"]: t for t in res["targets"]}
    assert set(targets) == {k for k, *_ in gc.TARGETS}
    assert targets["flash_fwd_vs_cudnn"]["measured"] is None and targets["flash_fwd_vs_cudnn"]["met"] is None
    assert targets["selective_scan_fwd_vs_assoc"]["measured"] is not None
    table = (out / "table.md").read_text()
    for title in ("**Targets**", "**Correctness on the device**", "**Attention**", "**Scans**", "**Models**",
                  "**Sparse causal flash attention**", "**Hadamard transform**", "**Layer-parallel decode**"):
        assert title in table
    assert table in proc.stdout  # printed last: the device's reply carries the end of the output


@pytest.mark.parametrize("hook,status", [("hang", "timed out after 12 s"), ("fail", "failed (exit 1)")])
def test_a_hanging_or_crashing_part_costs_only_itself(tmp_path, hook, status):
    proc, out, res = _run(["correct", "scfa_tiles", "--budget", "correct=12"], tmp_path,
                          {"JAXFORMERS_GPU_CHECK_TEST": f"{hook}:correct"})
    assert proc.returncode == 1
    parts = {p["part"]: p for p in res["parts"]}
    assert parts["correct"]["status"] == status
    assert parts["correct"]["rows"] == 1  # what it wrote before it hung / crashed is kept
    assert parts["scfa_tiles"]["status"] == "ok" and parts["scfa_tiles"]["rows"] > 1
    assert "part correct" in (out / "log.txt").read_text()


def test_deadline_skips_the_parts_it_cannot_fit(tmp_path):
    res = gc.orchestrate(["correct", "attention"], tmp_path / "out", tmp_path / "work", smoke=True, budgets={},
                         deadline=1.0, command="test")
    assert [p["status"] for p in res["parts"]] == ["skipped: out of time"] * 2
    assert all(t["met"] is None for t in res["targets"])


def test_default_budgets_fit_their_deadlines():
    """A part that uses its whole budget must not take time from the parts after it: the
    budgets add up to at most the deadline less the script's set-up."""
    assert sum(gc.BUDGET[p] for p in gc.CHECK_PARTS) <= gc.DEADLINE_S - gc.SETUP_ALLOWANCE_S
    assert sum(gc.BUDGET[p] for p in gc.FOLLOWUP_PARTS) <= gc.FOLLOWUP_DEADLINE_S - gc.SETUP_ALLOWANCE_S
    assert set(gc.BUDGET) == set(gc.ALL_PARTS)


def test_part_names_and_budgets_are_checked():
    with pytest.raises(SystemExit) as e:
        gc.main(["nope", "--smoke"])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match="PART=SECONDS"):
        gc._budgets(["attention"])
    with pytest.raises(SystemExit, match="PART=SECONDS"):
        gc._budgets(["bogus=3"])
    assert gc._budgets(["models=100"]) == {"models": 100.0}


def _att(impl, d, mode, ms, t=16384):
    return dict(kind="attention", group="causal", impl=impl, head_dim=d, seq_len=t, mode=mode, ms=ms)


def test_targets_are_ratios_of_the_same_run_and_the_worse_head_dim_counts():
    rows = [_att("cudnn", 128, "fwd", 1.0), _att("pallas", 128, "fwd", 1.25),    # 0.8x
            _att("cudnn", 64, "fwd", 1.0), _att("pallas", 64, "fwd", 2.0),       # 0.5x: the worse
            _att("jax_pallas", 128, "fwd+bwd", 9.0), _att("pallas", 128, "fwd+bwd", 3.0),
            _att("jax_pallas", 64, "fwd+bwd", 8.0), _att("pallas", 64, "fwd+bwd", 4.0),
            _att("cudnn", 128, "fwd", 9.0, t=4096), _att("pallas", 128, "fwd", 1.0, t=4096),  # ignored: T < 16k
            dict(kind="scan", kernel="selective_scan", impl="assoc_scan", mode="fwd", ms=5.0),
            dict(kind="scan", kernel="selective_scan", impl="pallas", mode="fwd", ms=0.2),
            dict(kind="scan", kernel="ssd", impl="pallas", mode="fwd", ms=0.9),
            dict(kind="scan", kernel="ssd", impl="fla", mode="fwd", ms=0.5),
            dict(kind="model_rate", model="gpt", task="train", mfu=0.41),
            dict(kind="layer_parallel_rate", impl="unpaired", speedup=1.0),
            dict(kind="layer_parallel_rate", impl="4 pairs", speedup=1.1),
            dict(kind="layer_parallel_rate", impl="8 pairs", speedup=1.3)]
    t = {x["key"]: x for x in gc.evaluate_targets(rows)}
    assert t["flash_fwd_vs_cudnn"]["measured"] == pytest.approx(0.5) and t["flash_fwd_vs_cudnn"]["met"] is False
    assert t["flash_fwd_vs_cudnn"]["gap"] == pytest.approx(1.5)  # 0.75 / 0.5: 1.5x still missing
    assert t["flash_fwdbwd_vs_mha"]["measured"] == pytest.approx(2.0) and t["flash_fwdbwd_vs_mha"]["met"] is True
    assert t["selective_scan_fwd_vs_assoc"]["measured"] == pytest.approx(25.0)
    assert t["selective_scan_fwdbwd_vs_assoc"]["met"] is None  # one side missing: not measured
    assert t["ssd_fwd_vs_fla"]["measured"] == pytest.approx(1.8) and t["ssd_fwd_vs_fla"]["met"] is False
    assert t["ssd_fwd_vs_fla"]["gap"] == pytest.approx(1.2)  # a "<=" target: 1.8 / 1.5
    assert t["gpt_small_mfu"]["met"] is True
    assert t["layer_parallel_decode"]["measured"] == pytest.approx(1.3)
    # one head dim missing at the longest T: not measured rather than judged on half the data
    t2 = {x["key"]: x for x in gc.evaluate_targets(rows[:3])}
    assert t2["flash_fwd_vs_cudnn"]["measured"] is None


def test_pipeline_holds_later_stages_until_asked_and_reports_errors_per_case():
    """Nothing compiles while something is timed: the cases after a stage boundary are lowered
    and compiled only when the main thread asks for one of them."""
    import time
    import types

    import jax
    import jax.numpy as jnp

    part = types.SimpleNamespace(jit=jax.jit)
    pipe = gc.Pipeline(part)
    assert part.pipe is pipe
    first = pipe.add(lambda x: x + 1, (jnp.float32(1),))
    pipe.stage()
    second = pipe.add(lambda x: x * 2, (jnp.float32(1),))
    bad = pipe.add(lambda x: x.reshape(7), (jnp.ones(3),))
    compiled, compile_s = pipe.result(first)
    assert float(compiled(jnp.float32(4))) == 5 and compile_s >= 0
    pipe.wait_idle()
    time.sleep(0.3)
    assert not second.done() and not bad.done()  # held at the boundary, however long we wait
    assert float(pipe.result(second)[0](jnp.float32(3))) == 6
    with pytest.raises(TypeError):  # a case that cannot lower fails alone
        pipe.result(bad)
    pipe.wait_idle()
    # closing (a part's end) ends its threads; a case still queued behind a boundary fails
    pipe.stage()
    queued = pipe.add(lambda x: x - 1, (jnp.float32(1),))
    pipe.close()
    for t in (pipe.thread, *pipe.pool._threads):
        t.join(5)
        assert not t.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        queued.result(0)
    pipe.close()  # idempotent


def test_a_part_closes_its_pipeline_and_a_new_pipeline_closes_the_old(tmp_path):
    with gc.Part("correct", tmp_path, smoke=True) as part:
        first = gc.Pipeline(part)
        second = gc.Pipeline(part)
        first.thread.join(5)
        assert not first.thread.is_alive() and second.thread.is_alive()
    second.thread.join(5)
    assert not second.thread.is_alive() and part.pipe is second


def test_every_correctness_case_lowers_to_triton_and_fits_sm90():
    """The correctness part runs float32 kernels (more shared memory than the bf16 benchmark shapes
    the kernel report checks): each case's forward + backward lowers to Triton for CUDA and
    compiles for Hopper within the shared-memory limit, without register spills."""
    pytest.importorskip("triton")
    import jax
    from pallas_kernels.triton_inspect import compile_report, triton_calls

    def abstract(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)

    seen = set()
    for name, kfn, _, diff, static in gc.correctness_cases(False, 0, interpret=False):
        if not diff:
            continue  # the int8 linear is plain XLA
        args = tuple(diff) + tuple(static)
        _, fwd_bwd = gc.fwd_and_fwd_bwd(kfn, len(diff))
        calls = triton_calls(fwd_bwd, *abstract(args), abstract(jax.eval_shape(kfn, *args)))
        assert len(calls) >= 2, name  # forward and backward kernels
        for call in calls:
            r = compile_report(call)
            assert r["fits"] and r["local_bytes"] == 0, (name, r)
            seen.add(call.name)
    assert {"flash_attention_fwd", "selective_scan_bwd", "ssd_chunk_bwd", "sparse_attention_bwd_dkdv",
            "landmark_attention_fwd", "hadamard_transform"} <= seen


def test_mfu_against_the_measured_matmul_rate():
    def train_row():
        return dict(kind="model_rate", model="gpt", task="train", mfu=0.4, peak_tflops=1000.0)
    rows = [dict(kind="ceiling", case="matmul bf16 8192^3", tflops=800.0), train_row()]
    assert gc.add_ceiling_mfu(rows)[1]["mfu_vs_measured"] == pytest.approx(0.5)
    assert "mfu_vs_measured" not in gc.add_ceiling_mfu([train_row()])[0]  # no ceiling measured: nothing claimed
