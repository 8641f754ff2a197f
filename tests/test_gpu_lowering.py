"""The GPU side of every Pallas kernel, checked on the CPU.

1. Lowering: each kernel (forward and backward, every mask / shape feature) is
   lowered *for CUDA* from this CPU-only jaxlib; Pallas' Triton lowering runs
   then, so unsupported ops, bad block shapes or dtypes fail here, not on a
   borrowed GPU.  The test checks which Triton kernels come out and their grids.
2. Compilation (needs the ``triton`` package, in the ``test`` extra): the
   kernels at the benchmark shapes are compiled for Hopper (sm_90) and must fit
   its shared memory, not spill registers, and put their dots on ``wgmma``.
   This is the pip Triton, not the one inside XLA: a proxy, see
   :mod:`pallas_kernels.triton_inspect`.
"""
import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.flash_attention import BlockSizes, flash_attention
from pallas_kernels.hadamard import hadamard_transform
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.ssd import ssd
from pallas_kernels.triton_inspect import H100_SHARED_PER_BLOCK, compile_report, triton_calls

S = jax.ShapeDtypeStruct
bf16, f32 = jnp.bfloat16, jnp.float32


def _grad_all(fn, n):
    """``fn`` -> function returning ``(sum of fn's output, gradients wrt its first n arguments)``.

    The value keeps the forward kernels in the lowered program: jax >= 0.12 drops a kernel
    whose outputs only an unused primal needs (the scans' backward recomputes its chunks).
    """
    return jax.value_and_grad(lambda *a: fn(*a).astype(f32).sum(), argnums=tuple(range(n)))


def _names(calls):
    return [c.name for c in calls]


# --------------------------------------------------------------------------- flash attention
def _attention_case(b, tq, tk, hq, hkv, d, *, dtype=bf16, segments=False, **kw):
    args = [S((b, tq, hq, d), dtype), S((b, tk, hkv, d), dtype), S((b, tk, hkv, d), dtype)]
    if segments:
        args.append(S((b, tq), jnp.int32))

        def fn(q, k, v, ids):
            return flash_attention(q, k, v, segment_ids=ids, interpret=False, **kw)
    else:
        def fn(q, k, v):
            return flash_attention(q, k, v, interpret=False, **kw)
    return fn, args


ATTENTION_CASES = {
    "causal_d128": dict(b=2, tq=1024, tk=1024, hq=8, hkv=8, d=128),
    "gqa4_d64_odd_length": dict(b=1, tq=1000, tk=1000, hq=8, hkv=2, d=64),
    "window_d256": dict(b=1, tq=512, tk=512, hq=4, hkv=4, d=256, window=100),
    "segments_mqa": dict(b=2, tq=384, tk=384, hq=4, hkv=1, d=64, segments=True),
    "decode_queries_fp32": dict(b=1, tq=16, tk=700, hq=4, hkv=2, d=128, dtype=f32),
    "non_causal_d80": dict(b=1, tq=300, tk=300, hq=2, hkv=2, d=80, causal=False),
    "non_causal_window_segments": dict(b=1, tq=200, tk=200, hq=2, hkv=1, d=32, causal=False,
                                       window=50, segments=True),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_flash_attention_lowers_to_triton(case):
    fn, args = _attention_case(**ATTENTION_CASES[case])
    assert _names(triton_calls(fn, *args)) == ["flash_attention_fwd"]
    n_diff = 3
    grad = _grad_all(fn, n_diff) if len(args) == 3 else _grad_all(
        lambda q, k, v: fn(q, k, v, jnp.zeros(args[3].shape, jnp.int32)), n_diff)
    calls = triton_calls(grad, *args[:3])
    assert sorted(_names(calls)) == ["flash_attention_bwd_dkdv", "flash_attention_bwd_dq",
                                     "flash_attention_fwd"]


def test_flash_attention_grid_and_knobs():
    """Grid = (q blocks * batch folded, 1, heads); the block-size knobs reach Triton."""
    bs = BlockSizes(block_q=64, block_k=32, num_warps=4, num_stages=3)
    fn, args = _attention_case(2, 1000, 1000, 8, 2, 64, block_sizes=bs)
    (fwd,) = triton_calls(fn, *args)
    assert (fwd.num_warps, fwd.num_stages) == (4, 3)
    assert fwd.grid[2] == 8 and fwd.grid[0] * fwd.grid[1] == 2 * 16  # ceil(1000/64)=16 q blocks


# --------------------------------------------------------------------------- selective scan
def _scan_case(b, l, dim, n, groups=None, dtype=bf16, z=True, init=False, segments=False, **kw):
    bc = (b, l, n) if groups is None else (b, l, groups, n)
    args = [S((b, l, dim), dtype), S((b, l, dim), dtype), S((dim, n), f32), S(bc, dtype),
            S(bc, dtype), S((dim,), f32), S((dim,), f32)]
    if z:
        args.append(S((b, l, dim), dtype))
    if init:
        args.append(S((b, dim, n), f32))
    seg = jnp.arange(b * l, dtype=jnp.int32).reshape(b, l) // 50 if segments else None

    def fn(x, dt, A, B, C, D, bias, *rest):
        rest = list(rest)
        return selective_scan(x, dt, A, B, C, D=D, z=rest.pop(0) if z else None, dt_bias=bias,
                              initial_state=rest.pop(0) if init else None, segment_ids=seg,
                              dt_softplus=True, interpret=False, **kw)
    return fn, args


@pytest.mark.parametrize("case", [
    dict(b=2, l=300, dim=96, n=16),
    dict(b=1, l=130, dim=64, n=5, groups=2, z=False, dtype=f32),
    dict(b=2, l=200, dim=64, n=16, init=True, segments=True),
])
def test_selective_scan_lowers_to_triton(case):
    fn, args = _scan_case(**case)
    assert _names(triton_calls(fn, *args)) == ["selective_scan_chunk_states", "selective_scan_fwd"]
    calls = triton_calls(_grad_all(fn, len(args)), *args)
    assert sorted(_names(calls)) == ["selective_scan_bwd", "selective_scan_chunk_states",
                                     "selective_scan_fwd"]


def test_selective_scan_forward_is_time_parallel():
    """Forward grids are (batch, channel blocks, time chunks); the backward's (batch, blocks)."""
    fn, args = _scan_case(2, 300, 96, 16)  # chunk 64 -> 5 chunks; block_d 32 -> 3 blocks
    grids = {c.name: c.grid for c in triton_calls(_grad_all(fn, len(args)), *args)}
    assert grids["selective_scan_chunk_states"] == grids["selective_scan_fwd"] == (2, 3, 5)
    assert grids["selective_scan_bwd"] == (2, 3, 1)


def test_selective_scan_last_state_lowers():
    fn, args = _scan_case(1, 64, 32, 16, z=False)
    both = lambda *a: selective_scan(*a[:5], return_final_state=True, interpret=False)  # noqa: E731
    assert _names(triton_calls(both, *args[:5])) == ["selective_scan_chunk_states",
                                                     "selective_scan_fwd"]
    # the final state alone comes from the chunk states (jax >= 0.12 also drops the y kernel)
    last_names = _names(triton_calls(lambda *a: both(*a)[1], *args[:5]))
    assert last_names[0] == "selective_scan_chunk_states"
    assert set(last_names) <= {"selective_scan_chunk_states", "selective_scan_fwd"}


# --------------------------------------------------------------------------- SSD
def _ssd_case(b, l, h, p, g, n, dtype=bf16, chunk_size=64, segments=False, **kw):
    args = [S((b, l, h, p), dtype), S((b, l, h), dtype), S((h,), f32), S((b, l, g, n), dtype),
            S((b, l, g, n), dtype), S((b, h, p, n), f32)]
    seg = jnp.arange(b * l, dtype=jnp.int32).reshape(b, l) // 50 if segments else None

    def fn(x, dt, A, B, C, s0):
        return ssd(x, dt, A, B, C, chunk_size=chunk_size, initial_state=s0, segment_ids=seg,
                   dt_softplus=True, interpret=False, **kw)
    return fn, args


SSD_KERNELS = ["ssd_chunk_scan", "ssd_chunk_state"]
SSD_BWD_KERNELS = ["ssd_chunk_bwd", "ssd_chunk_state_grad"]


@pytest.mark.parametrize("case", [
    dict(b=2, l=200, h=4, p=64, g=2, n=64),
    dict(b=1, l=37, h=2, p=20, g=1, n=5, dtype=f32, chunk_size=16, block_p=16),
    dict(b=2, l=200, h=4, p=64, g=2, n=64, segments=True),
])
def test_ssd_lowers_to_triton(case):
    fn, args = _ssd_case(**case)
    assert sorted(_names(triton_calls(fn, *args))) == SSD_KERNELS
    calls = triton_calls(_grad_all(fn, len(args)), *args)
    assert sorted(_names(calls)) == sorted(SSD_KERNELS + SSD_BWD_KERNELS)


# --------------------------------------------------------------------------- hadamard
HADAMARD_CASES = {  # (leading shape, n, dtype): butterflies only, one dot, dots + butterflies, Paley
    "n8_fp32": ((5, 3), 8, f32),
    "n128_bf16": ((2, 100), 128, bf16),
    "n4096_bf16": ((33,), 4096, bf16),
    "n8192_bf16": ((3,), 8192, bf16),  # split: H_4 (x) H_2048
    "n352_fp32": ((2, 7), 352, f32),
}


@pytest.mark.parametrize("case", sorted(HADAMARD_CASES))
def test_hadamard_lowers_to_triton(case):
    lead, n, dtype = HADAMARD_CASES[case]
    fn = lambda x: hadamard_transform(x, interpret=False)  # noqa: E731
    x = S(lead + (n,), dtype)
    (fwd,) = triton_calls(fn, x)
    assert fwd.name == "hadamard_transform"
    assert _names(triton_calls(_grad_all(fn, 1), x)) == ["hadamard_transform"] * 2


def quarot_forward_case():
    """The rotated ``quarot`` tiny model's bf16 forward with the online Hadamards on the kernel:
    q/k head dim 32, 4 heads (butterflies only), d_ff 352 = 44 x 8 (Paley factor)."""
    from jaxformers import registry
    from jaxformers.utils import abstract_params
    cfg = registry.get_config("quarot", "tiny", rotated=True, hadamard_impl="pallas", a_bits=4,
                              kv_bits=4, dtype="bfloat16")
    model = registry.build(cfg)

    def fwd(params, tokens):
        return model.apply({"params": params}, tokens)
    return fwd, abstract_params(model), S((2, 64), jnp.int32)


def test_quarot_model_lowers_with_hadamard_kernel(monkeypatch):
    monkeypatch.setattr("pallas_kernels.hadamard.kernel.resolve_interpret", lambda interpret: False)
    fwd, params, tokens = quarot_forward_case()
    # per layer: q, k, across heads, before down
    assert _names(triton_calls(fwd, params, tokens)) == ["hadamard_transform"] * 8


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("name, overrides, expect", [
    ("gpt", dict(attention_impl="pallas"), "flash_attention_bwd_dq"),
    ("mamba", dict(scan_impl="pallas"), "selective_scan_bwd"),
    ("mamba2", dict(scan_impl="pallas"), "ssd_chunk_bwd"),
])
def test_model_train_step_lowers_with_pallas_kernels(name, overrides, expect, monkeypatch):
    """A bf16 training gradient of each tiny model with its Pallas path lowers for CUDA.

    ``interpret=None`` resolves from the default backend (CPU here), so the test
    forces compiled mode the way a GPU backend would.
    """
    from jaxformers import registry
    from jaxformers.utils import init_params
    import pallas_kernels._common as common

    monkeypatch.setattr(common, "resolve_interpret", lambda interpret: False)
    for mod in ("pallas_kernels.flash_attention.kernel", "pallas_kernels.selective_scan.kernel",
                "pallas_kernels.ssd.kernel"):
        monkeypatch.setattr(f"{mod}.resolve_interpret", lambda interpret: False)
    cfg = registry.get_config(name, "tiny", **overrides, dtype="bfloat16")
    model = registry.build(cfg)
    params = jax.eval_shape(functools.partial(init_params, model, jax.random.PRNGKey(0)))
    tokens = S((2, 128), jnp.int32)

    def loss(params, tokens):
        return model.apply({"params": params}, tokens).astype(f32).mean()

    calls = triton_calls(jax.grad(loss), params, tokens)
    assert expect in _names(calls)


# --------------------------------------------------------------------------- sm_90 compile
BENCH_CASES = {
    # the issues' benchmark shapes, default block sizes
    "attention_d128": lambda: _attention_case(1, 4096, 4096, 16, 16, 128),
    "attention_d64": lambda: _attention_case(1, 4096, 4096, 16, 16, 64),
    "selective_scan": lambda: _scan_case(4, 4096, 2048, 16, z=False),
    "ssd": lambda: _ssd_case(4, 4096, 16, 128, 1, 128),
    "hadamard": lambda: (lambda x: hadamard_transform(x, interpret=False), [S((4096, 128), bf16)]),
    # wider than the kernel's 2048 columns: split, so no spills (8192 in one pass spilled 22 KB)
    "hadamard_n8192": lambda: (lambda x: hadamard_transform(x, interpret=False), [S((64, 8192), bf16)]),
}


@pytest.mark.parametrize("case", sorted(BENCH_CASES))
def test_kernels_compile_for_hopper(case):
    pytest.importorskip("triton")
    fn, args = BENCH_CASES[case]()
    n = 3 if case.startswith("attention") else len(args)
    for call in triton_calls(_grad_all(fn, n), *args):
        r = compile_report(call)
        assert r["shared_bytes"] <= H100_SHARED_PER_BLOCK, r
        assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, f"register spills: {r}"
        if not call.name.startswith("selective_scan"):  # the scan has no matmuls
            assert r["wgmma"] + r["mma_sync"] > 0, r  # dots on tensor cores
        if call.name.startswith("flash_attention"):
            assert r["wgmma"] > 0, r  # Hopper warpgroup MMA for the 64+-row tiles
        assert r["ctas_per_sm"] >= 1, r
