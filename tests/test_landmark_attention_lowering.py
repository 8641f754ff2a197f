"""The GPU (Triton) and TPU (Mosaic) sides of the landmark-attention kernel, checked on the CPU.

1. GPU: ``interpret=False`` lowered for CUDA (Pallas' Triton lowering runs): forward and
   gradients, GQA, T not a multiple of the block, L = 50 (padded to 64), bf16 / fp32; kernel
   names and grids.
2. TPU: ``jax.export(..., platforms=("tpu",))`` (Pallas' Mosaic lowering): one
   ``tpu_custom_call`` for the forward, three for the gradient, no Triton.
3. TPU numerics: the TPU variant in Pallas' TPU interpret mode vs the float32 reference,
   forward and all three gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.landmark_attention import (landmark_attention, landmark_attention_reference,
                                               tpu_vmem_bytes)
from pallas_kernels.triton_inspect import triton_calls

S = jax.ShapeDtypeStruct
bf16, f32 = jnp.bfloat16, jnp.float32
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
KERNELS = ["landmark_attention_bwd_dkdv", "landmark_attention_bwd_dq", "landmark_attention_fwd"]

CASES = {  # b, t, hq, hkv, d, block_size, dtype
    "gqa_d64_L50_odd": (2, 1000, 4, 2, 64, 50, bf16),
    "d128_L64_fp32": (1, 512, 2, 2, 128, 64, f32),
}


def _case(b, t, hq, hkv, d, L, dtype):
    args = [S((b, t, hq, d), dtype), S((b, t, hkv, d), dtype), S((b, t, hkv, d), dtype)]

    def fn(q, k, v):
        return landmark_attention(q, k, v, block_size=L, interpret=False)

    def grad(q, k, v):
        return jax.grad(lambda q, k, v: fn(q, k, v).astype(f32).sum(), argnums=(0, 1, 2))(q, k, v)
    return fn, grad, args


@pytest.mark.parametrize("case", sorted(CASES))
def test_lowers_to_triton(case):
    b, t, hq, hkv, d, L, dtype = CASES[case]
    fn, grad, args = _case(*CASES[case])
    (fwd,) = triton_calls(fn, *args)
    assert fwd.name == "landmark_attention_fwd"
    calls = {c.name: c for c in triton_calls(grad, *args)}
    assert sorted(calls) == KERNELS
    lp, nb = 64, -(-t // L)
    t_pad = -(-nb * lp // 64) * 64
    grids = {name: c.grid[0] * c.grid[1] * c.grid[2] for name, c in calls.items()}
    assert grids["landmark_attention_fwd"] == grids["landmark_attention_bwd_dq"] == (t_pad // 64) * b * hq
    assert grids["landmark_attention_bwd_dkdv"] == (t_pad // lp) * b * hkv


@pytest.mark.parametrize("case", sorted(CASES))
def test_lowers_for_tpu(case):
    fn, grad, args = _case(*CASES[case])
    fwd = jax.export.export(jax.jit(fn), platforms=("tpu",))(*args).mlir_module()
    assert fwd.count("tpu_custom_call") == 1 and "triton" not in fwd
    assert "landmark_attention_fwd" in fwd
    bwd = jax.export.export(jax.jit(grad), platforms=("tpu",))(*args).mlir_module()
    assert bwd.count("tpu_custom_call") == 3 and "triton" not in bwd
    for name in KERNELS:
        assert name in bwd


def test_tpu_interpret_matches_reference():
    """GQA, T=150 with L=40 (3 full blocks + a partial one; blocks padded to 128 rows, two
    128-row q tiles... one 256-row q tile), D=32 (padded to 128 lanes); o and lse with
    cotangents on both."""
    b, t, hq, hkv, d, L = 1, 150, 2, 1, 32, 40
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in
                   ((b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d), (b, t, hq, d)))

    ct_lse = jnp.asarray(rng.standard_normal((b, hq, t), np.float32))  # the lse output's cotangent

    def fwd_bwd(fn, **kw):
        def f(q, k, v, ct):
            (o, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, block_size=L, return_lse=True, **kw),
                                    q, k, v)
            return (o, lse) + vjp((ct, ct_lse))
        return jax.jit(f, compiler_options=FAST_COMPILE)(q, k, v, ct)

    got = fwd_bwd(landmark_attention, interpret=pltpu.InterpretParams())
    want = fwd_bwd(landmark_attention_reference)
    for what, g, w in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert np.all(np.isfinite(g)), what
        err = np.max(np.abs(g - w)) / max(1.0, float(np.max(np.abs(w))))
        assert err <= 1e-5, f"{what}: scaled max error {err:.3g}"


def test_tpu_vmem_bytes():
    small = tpu_vmem_bytes((1, 1024, 16, 64), (1, 1024, 16, 64), bf16, block_size=64)
    big = tpu_vmem_bytes((1, 4096, 16, 64), (1, 4096, 16, 64), bf16, block_size=64)
    assert sorted(big) == KERNELS
    assert all(0 < small[n] < big[n] < 128 * 2 ** 20 for n in KERNELS), (small, big)


def test_kernels_compile_for_hopper():
    """T=4096, 16 heads, D=64, L=64, bf16 compiles for sm_90 with the pip Triton: fits shared
    memory, no register spills, dots on ``wgmma`` (D=128's dK/dV spills 8 bytes:
    ``python -m experiments.kernel_report --families landmark_attention``)."""
    pytest.importorskip("triton")
    from pallas_kernels.triton_inspect import H100_SHARED_PER_BLOCK, compile_report
    _, grad, args = _case(1, 4096, 16, 16, 64, 64, bf16)
    calls = triton_calls(grad, *args)
    assert sorted(c.name for c in calls) == KERNELS
    for call in calls:
        r = compile_report(call)
        assert r["shared_bytes"] <= H100_SHARED_PER_BLOCK, r
        assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, f"register spills: {r}"
        assert r["wgmma"] > 0 and r["ctas_per_sm"] >= 1, r
