"""The GPU (Triton) and TPU (Mosaic) sides of the sparse causal flash-attention kernels,
checked on the CPU.

1. GPU: the public call with ``interpret=False`` is lowered *for CUDA* from this CPU-only
   jaxlib (:func:`pallas_kernels.triton_inspect.triton_calls`, Pallas' Triton lowering
   runs): forward and gradients, hash-sparse and QK-sparse, GQA, odd lengths, D 64 / 128,
   bf16 / fp32; checks the kernel names and grids.
2. TPU: the same calls exported with ``jax.export(..., platforms=("tpu",))`` (Pallas'
   Mosaic lowering runs; Mosaic's own passes only run in the TPU compiler): three
   ``tpu_custom_call`` kernels for the gradient, one for the forward, and no Triton.
3. TPU numerics: the TPU variant in Pallas' TPU interpret mode
   (``interpret=pltpu.InterpretParams()``) against the float32 reference, forward and all
   three gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention import (hash_attention, hash_reference, qk_sparse_attention,
                                             qk_sparse_reference)
from pallas_kernels.triton_inspect import triton_calls

S = jax.ShapeDtypeStruct
bf16, f32 = jnp.bfloat16, jnp.float32
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
KERNELS = ["sparse_attention_bwd_dkdv", "sparse_attention_bwd_dq", "sparse_attention_fwd"]


def _case(kind, b, t, hq, hkv, d, dtype=bf16, **kw):
    lab = jnp.int32 if kind == "hash" else jnp.bool_
    args = [S((b, t, hq, d), dtype), S((b, t, hkv, d), dtype), S((b, t, hkv, d), dtype),
            S((b, t, hq), lab), S((b, t, hkv), lab)]
    op = hash_attention if kind == "hash" else qk_sparse_attention

    def fn(q, k, v, ql, kl):
        return op(q, k, v, ql, kl, interpret=False, **kw)

    def grad(q, k, v, ql, kl):
        return jax.grad(lambda q, k, v: fn(q, k, v, ql, kl).astype(f32).sum(),
                        argnums=(0, 1, 2))(q, k, v)
    return fn, grad, args


CASES = {
    "hash_gqa_d64_odd": ("hash", 2, 1000, 4, 2, 64),
    "hash_d128_fp32": ("hash", 1, 300, 2, 2, 128, f32),
    "qk_mqa_d128": ("qk", 1, 777, 4, 1, 128),
    "qk_d64_blocks": ("qk", 2, 256, 2, 2, 64, bf16, dict(block_q=32, block_k=16)),
}


def _unpack(case):
    kind, *dims = CASES[case]
    kw = dims.pop() if isinstance(dims[-1], dict) else {}
    return kind, dims, kw


@pytest.mark.parametrize("case", sorted(CASES))
def test_lowers_to_triton(case):
    kind, dims, kw = _unpack(case)
    fn, grad, args = _case(kind, *dims, **kw)
    b, t, hq, hkv = dims[:4]
    bq, bk = kw.get("block_q", 64), kw.get("block_k", 64)
    (fwd,) = triton_calls(fn, *args)
    assert fwd.name == "sparse_attention_fwd"
    calls = {c.name: c for c in triton_calls(grad, *args)}
    assert sorted(calls) == KERNELS
    t_pad = -(-t // max(bq, bk)) * max(bq, bk)
    grids = {name: c.grid[0] * c.grid[1] * c.grid[2] for name, c in calls.items()}
    assert grids["sparse_attention_fwd"] == grids["sparse_attention_bwd_dq"] == (t_pad // bq) * b * hq
    assert grids["sparse_attention_bwd_dkdv"] == (t_pad // bk) * b * hkv


def _export_tpu(fn, *args):
    return jax.export.export(jax.jit(fn), platforms=("tpu",))(*args).mlir_module()


@pytest.mark.parametrize("case", sorted(CASES))
def test_lowers_for_tpu(case):
    kind, dims, kw = _unpack(case)
    fn, grad, args = _case(kind, *dims, **kw)
    fwd = _export_tpu(fn, *args)
    assert fwd.count("tpu_custom_call") == 1 and "triton" not in fwd
    assert "sparse_attention_fwd" in fwd
    bwd = _export_tpu(grad, *args)
    assert bwd.count("tpu_custom_call") == 3 and "triton" not in bwd
    for name in KERNELS:
        assert name in bwd


def _fwd_bwd(fn, q, k, v, ct, ql, kl, **kw):
    def f(q, k, v, ct, ql, kl):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, ql, kl, **kw), q, k, v)
        return (o,) + vjp(ct)
    return jax.jit(f, compiler_options=FAST_COMPILE)(q, k, v, ct, ql, kl)


@pytest.mark.parametrize("kind", ["hash"])  # "qk" runs the same kernels (slow: ~10 s)
def test_tpu_interpret_matches_reference(kind):
    """GQA, T=200 (not a multiple of the 128 TPU tile: two q / k tiles), D=64 (padded to 128
    lanes), 3 buckets / 60% kept."""
    b, t, hq, hkv, d = 1, 200, 2, 1, 64
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in
                   ((b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d), (b, t, hq, d)))
    if kind == "hash":
        ql = jnp.asarray(rng.integers(0, 3, (b, t, hq)), jnp.int32)
        kl = jnp.asarray(rng.integers(0, 3, (b, t, hkv)), jnp.int32)
        op, ref = hash_attention, hash_reference
    else:
        ql, kl = jnp.asarray(rng.random((b, t, hq)) < 0.6), jnp.asarray(rng.random((b, t, hkv)) < 0.6)
        op, ref = qk_sparse_attention, qk_sparse_reference
    got = _fwd_bwd(op, q, k, v, ct, ql, kl, interpret=pltpu.InterpretParams())
    want = _fwd_bwd(ref, q, k, v, ct, ql, kl)
    for what, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert np.all(np.isfinite(g)), f"{kind} {what}: non-finite"
        err = np.max(np.abs(g - w)) / max(1.0, float(np.max(np.abs(w))))
        assert err <= 1e-5, f"{kind} {what}: scaled max error {err:.3g}"


def test_return_tile_count_refuses_tpu_interpret():
    q = jnp.zeros((1, 16, 1, 16))
    ids = jnp.zeros((1, 16, 1), jnp.int32)
    with pytest.raises(ValueError, match="return_tile_count"):
        hash_attention(q, q, q, ids, ids, interpret=pltpu.InterpretParams(),
                       return_tile_count=True)


@pytest.mark.parametrize("d", [128, pytest.param(64, marks=pytest.mark.slow)])
def test_kernels_compile_for_hopper(d):
    """The benchmark shape (T=4096, 16 heads, bf16, default tiles) compiles for sm_90 with the
    pip Triton: fits shared memory, no register spills, dots on ``wgmma``."""
    pytest.importorskip("triton")
    from pallas_kernels.triton_inspect import H100_SHARED_PER_BLOCK, compile_report
    _, grad, args = _case("hash", 1, 4096, 16, 16, d)
    calls = triton_calls(grad, *args)
    assert sorted(c.name for c in calls) == KERNELS
    for call in calls:
        r = compile_report(call)
        assert r["shared_bytes"] <= H100_SHARED_PER_BLOCK, r
        assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, f"register spills: {r}"
        assert r["wgmma"] > 0 and r["ctas_per_sm"] >= 1, r


def test_tpu_vmem_bytes():
    """The TPU block specs' VMEM per kernel: positive, growing with T, under a v5e's 128 MiB for
    the benchmark shape."""
    from pallas_kernels.sparse_attention import tpu_vmem_bytes
    small = tpu_vmem_bytes((1, 1024, 16, 64), (1, 1024, 16, 64), bf16)
    big = tpu_vmem_bytes((1, 4096, 16, 64), (1, 4096, 16, 64), bf16)
    assert sorted(big) == KERNELS
    assert all(0 < small[n] < big[n] < 128 * 2 ** 20 for n in KERNELS), (small, big)
