"""Regression tests of the Hadamard audit: float64 precision, the refused-size message, the TPU
compiler params' required argument, and the two benchmarks keeping finished rows when cut short."""
import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.hadamard import hadamard_matrix, hadamard_transform


@pytest.mark.parametrize("lead, n", [((4,), 64), ((2, 3), 96)])  # 2^k only; 12 x 8 (dense factor)
def test_float64_input_is_transformed_in_float64(lead, n):
    """Under ``jax_enable_x64`` a float64 input accumulated in float32 (errors ~1e-7)."""
    x = np.random.default_rng(n).standard_normal(lead + (n,))
    ct = np.random.default_rng(n + 1).standard_normal(lead + (n,))
    with jax.enable_x64(True):
        y, vjp = jax.vjp(lambda x: hadamard_transform(x, interpret=True), jnp.asarray(x))
        (dx,) = vjp(jnp.asarray(ct))
        assert y.dtype == dx.dtype == jnp.float64
        y, dx = np.asarray(y), np.asarray(dx)
    h = hadamard_matrix(n).astype(np.float64) / np.sqrt(n)
    np.testing.assert_allclose(y, x @ h, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dx, ct @ h.T, rtol=0, atol=1e-12)


def test_refused_size_names_x_and_every_supported_factor():
    with pytest.raises(ValueError, match=r"x: shape \(2, 6\).*size 6") as e:
        hadamard_transform(jnp.ones((2, 6)))
    assert "172" in str(e.value) and "252" in str(e.value)   # the full factor list, not 12 of 40
    with pytest.raises(ValueError, match=r"x: shape \(3, 0\)"):
        hadamard_transform(jnp.ones((3, 0)))


def test_tpu_compiler_params_need_dimension_semantics():
    from pallas_kernels._common import compiler_params
    with pytest.raises(ValueError, match="dimension_semantics"):
        compiler_params(0, 0, platform="tpu")
    with pytest.raises(ValueError, match="platform"):
        compiler_params(4, 1, platform="tpus", dimension_semantics=("parallel",))
    assert "compiler_params" in compiler_params(0, 0, platform="tpu", dimension_semantics=("parallel",))


def test_bench_hadamard_keeps_finished_sizes_when_cut_short(tmp_path, monkeypatch):
    from experiments import bench_hadamard

    def fake_median(fn, args, warmup, iters):  # the second size is interrupted (a stage timeout)
        if args[0].shape[-1] == 352:
            raise KeyboardInterrupt
        return 1.0
    monkeypatch.setattr(bench_hadamard, "median_ms", fake_median)
    with pytest.raises(KeyboardInterrupt):
        bench_hadamard.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["complete"] is False and {r["n"] for r in res["rows"]} == {64} and len(res["rows"]) == 4


def test_bench_quantize_keeps_finished_jobs_when_cut_short(tmp_path, monkeypatch):
    from experiments import bench_quantize
    calls = []

    def fake_run(cmd, **kw):  # the child processes: the second one is interrupted
        calls.append(cmd)
        if len(calls) > 1:
            raise KeyboardInterrupt
        row = dict(json.loads(cmd[-1]), seconds=1.0, peak_rss_gb=1.0, rss_before_gb=0.5)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + "\n", stderr="")
    monkeypatch.setattr(bench_quantize.subprocess, "run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        bench_quantize.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["complete"] is False
    assert [(r["spec"], r["layers"]) for r in res["rows"]] == [("rotate", 1)]
    assert "| rotate |" in res["table"]
