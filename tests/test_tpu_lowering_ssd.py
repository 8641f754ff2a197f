"""The TPU (Mosaic) variant of the Mamba-2 SSD kernels, checked on the CPU.

1. Lowering: the SSD variants of ``tests/test_gpu_lowering.py`` (bf16 / fp32, groups,
   ragged lengths, P / N not multiples of 128, initial state, packed segments) and a
   tiny Mamba-2 training step are exported *for TPU* with ``jax.export(...,
   platforms=("tpu",))`` through the public call with ``interpret=False``: Pallas'
   Mosaic TPU lowering runs (block-shape tiling rules, dtypes, op coverage) and the
   module must hold the Mosaic kernels (``tpu_custom_call``) and no Triton one.  Mosaic's
   own layout passes run only in the TPU compiler, so this is not a full compile.
2. Numerics: the TPU variant in Pallas' TPU interpret mode
   (``interpret=pltpu.InterpretParams()``) against the float32 sequential reference,
   forward and every gradient, on small awkward shapes; one case with the race detector
   and the "parallel" grid split over two simulated cores.
3. :func:`pallas_kernels.ssd.tpu_vmem_bytes` against a hand count.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from scan_testing import rel, segments

from pallas_kernels.ssd import reference, ssd, tpu_vmem_bytes

from test_gpu_lowering import _grad_all, _ssd_case

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
f32 = jnp.float32


def _export_tpu(fn, *args):
    return jax.export.export(jax.jit(fn), platforms=("tpu",))(*args).mlir_module()


def _kernels(module):
    return sorted(set(re.findall(r"ssd_chunk_[a-z_]+", module)))


# The cases of tests/test_gpu_lowering.py::test_ssd_lowers_to_triton, and its SSD benchmark shape.
LOWERING_CASES = {
    "bf16_groups_ragged": dict(b=2, l=200, h=4, p=64, g=2, n=64),
    "fp32_tiny_chunk16": dict(b=1, l=37, h=2, p=20, g=1, n=5, dtype=f32, chunk_size=16,
                              block_p=16),
    "bf16_segments": dict(b=2, l=200, h=4, p=64, g=2, n=64, segments=True),
    # test_kernels_compile_for_hopper's benchmark shape
    "bf16_bench_shape": dict(b=4, l=4096, h=16, p=128, g=1, n=128),
}


@pytest.mark.parametrize("case", sorted(LOWERING_CASES))
def test_ssd_lowers_for_tpu(case):
    fn, args = _ssd_case(**LOWERING_CASES[case])
    fwd = _export_tpu(fn, *args)
    assert fwd.count("tpu_custom_call") == 2 and "triton" not in fwd
    assert _kernels(fwd) == ["ssd_chunk_scan", "ssd_chunk_state"]
    bwd = _export_tpu(_grad_all(fn, len(args)), *args)
    assert "triton" not in bwd
    # _grad_all is value_and_grad: the value keeps the forward's chunk_scan (a bare grad drops
    # it, the backward recomputes its chunks), so all four kernels lower on every jax version.
    assert _kernels(bwd) == ["ssd_chunk_bwd", "ssd_chunk_scan", "ssd_chunk_state", "ssd_chunk_state_grad"]
    assert bwd.count("tpu_custom_call") == 4


def test_tpu_export_traced_segments_final_state_grad():
    """Segment ids as a traced argument, D / z / dt_bias, and a loss on y and the final state."""
    S = jax.ShapeDtypeStruct
    b, l, h, p, g, n = 2, 300, 4, 64, 1, 128
    args = [S((b, l, h, p), f32), S((b, l, h), f32), S((h,), f32), S((b, l, g, n), f32),
            S((b, l, g, n), f32), S((b, h, p, n), f32), S((h, p), f32), S((b, l, h, p), f32),
            S((h,), f32)]

    def loss(x, dt, A, B, C, s0, D, z, bias, ids):
        y, fin = ssd(x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True, initial_state=s0,
                     segment_ids=ids, return_final_state=True, chunk_size=256, interpret=False)
        return y.sum() + fin.sum()

    mod = _export_tpu(jax.grad(loss, argnums=tuple(range(9))), *args, S((b, l), jnp.int32))
    assert _kernels(mod) == ["ssd_chunk_bwd", "ssd_chunk_scan", "ssd_chunk_state",
                             "ssd_chunk_state_grad"]
    assert mod.count("tpu_custom_call") == 4 and "triton" not in mod


def test_mamba2_train_step_lowers_for_tpu(monkeypatch):
    """A bf16 training gradient of the tiny Mamba-2 with ``scan_impl="pallas"`` exports for TPU
    (compiled mode forced, as on a TPU backend)."""
    from jaxformers import registry
    from jaxformers.utils import init_params

    monkeypatch.setattr("pallas_kernels.ssd.kernel.resolve_interpret", lambda interpret: False)
    cfg = registry.get_config("mamba2", "tiny", scan_impl="pallas", dtype="bfloat16")
    model = registry.build(cfg)
    params = jax.eval_shape(functools.partial(init_params, model, jax.random.PRNGKey(0)))

    def loss(params, tokens):
        return model.apply({"params": params}, tokens).astype(f32).mean()

    mod = _export_tpu(jax.grad(loss), params, jax.ShapeDtypeStruct((2, 128), jnp.int32))
    assert "ssd_chunk_bwd" in mod and "triton" not in mod


# --------------------------------------------------------------------- TPU interpret mode
def _inputs(seed, b, l, h, p, g, n, *, D="hp", z=True, bias=True, init=True):
    rng = np.random.default_rng(seed)
    r = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
    inp = dict(x=r(b, l, h, p), dt=r(b, l, h), A=-jnp.exp(0.5 * r(h)), B=r(b, l, g, n),
               C=r(b, l, g, n))
    if D:
        inp["D"] = r(*{"h": (h,), "hp": (h, p)}[D])
    if z:
        inp["z"] = r(b, l, h, p)
    if bias:
        inp["dt_bias"] = 0.3 * r(h)
    if init:
        inp["initial_state"] = r(b, h, p, n)
    return inp


def _fwd_bwd(fn, inp, static, seed=1):
    """Outputs and the VJP wrt every float input for fixed random cotangents (jitted with the
    cheap compile options: the interpret-mode kernels unroll into large XLA programs)."""
    out_shapes = jax.eval_shape(lambda d: fn(**d, **static), inp)
    rng = np.random.default_rng(seed)
    cts = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32)), out_shapes)

    def f(inp, cts):
        out, vjp = jax.vjp(lambda d: fn(**d, **static), inp)
        return out, vjp(cts)[0]
    return jax.jit(f, compiler_options=FAST_COMPILE)(inp, cts)


def _run(inp, static, interpret, ids=None):
    """``(kernel (outputs, grads), reference (outputs, grads))``."""
    kw = dict(static, segment_ids=ids)
    return (_fwd_bwd(functools.partial(ssd, interpret=interpret), inp, kw),
            _fwd_bwd(reference, inp, kw))


def _check(name, inp, got, want, tol):
    (got_out, got_g), (want_out, want_g) = got, want
    for k, (a, b) in enumerate(zip(jax.tree_util.tree_leaves(got_out),
                                   jax.tree_util.tree_leaves(want_out))):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, k)
        assert np.all(np.isfinite(np.asarray(a))), (name, k)
        assert rel(a, b) < tol, (name, "out", k, rel(a, b))
    assert set(got_g) == set(want_g) == set(inp)
    for k in want_g:
        assert got_g[k].shape == inp[k].shape, (name, k)
        assert np.all(np.isfinite(np.asarray(got_g[k]))), (name, k)
        assert rel(got_g[k], want_g[k]) < tol, (name, "d" + k, rel(got_g[k], want_g[k]))


# (B, L, H, P, G, N, input options, ssd options, per-row segment starts or None).
# The TPU chunk is >= 128: L = 150 / 300 are 2 chunks with a padded last one.
INTERPRET_CASES = {
    # H=4 in G=2 groups, D [H, P], z, dt_bias + softplus, initial state, final state.
    "groups_ragged_all_features": (2, 150, 4, 6, 2, 5, dict(),
                                   dict(dt_softplus=True, return_final_state=True), None),
    # Packed rows: a start at the chunk edge 128, a length-1 segment [128, 129), starts in
    # the padded last chunk; row 1 reuses ids.  P = 130 -> two 128-column P blocks (the
    # backward's per-P-block partial sums); initial state reaches the first segments only.
    "segments_two_p_blocks": (2, 150, 2, 130, 1, 5, dict(D="h", z=False),
                              dict(dt_softplus=True, return_final_state=True),
                              [(3, 128, 129, 140), (60, 128)]),
    # chunk_size 256 (L = 300: 2 chunks), N = 130 -> 256, no initial state / z / D.
    "chunk256_no_options": (1, 300, 2, 8, 1, 130, dict(D=None, z=False, bias=False, init=False),
                            dict(chunk_size=256), None),
}


@pytest.mark.parametrize("name", sorted(INTERPRET_CASES))
def test_tpu_interpret_matches_reference(name):
    b, l, h, p, g, n, in_kw, static, starts = INTERPRET_CASES[name]
    inp = _inputs(0, b, l, h, p, g, n, **in_kw)
    ids = None if starts is None else segments(b, l, starts)
    _check(name, inp, *_run(inp, static, pltpu.InterpretParams(), ids), 1e-4)


def test_tpu_interpret_race_detector(capfd):
    """The all-"parallel" grid split over two simulated cores with ``detect_races=True``:
    every program owns its output blocks, so no race is reported."""
    inp = _inputs(3, 1, 200, 2, 8, 1, 8, D="h", z=False)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    got, want = _run(inp, dict(dt_softplus=True, return_final_state=True), params,
                     segments(1, 200, [(70,)]))
    assert "RACE DETECTED" not in capfd.readouterr().out
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    races = getattr(ipc, "races", None)  # the detector's global state (this jax version)
    assert races is not None and not races.races_found
    _check("races", inp, got, want, 1e-4)


def test_tpu_interpret_validates_like_gpu():
    z = jnp.zeros
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(z((1, 8, 2, 4)), z((1, 8, 2)), z((2,)), z((1, 8, 1, 4)), z((1, 8, 1, 4)), chunk_size=24,
            interpret=pltpu.InterpretParams())
    with pytest.raises(ValueError, match="divisible"):
        ssd(z((1, 8, 4, 4)), z((1, 8, 4)), z((4,)), z((1, 8, 3, 4)), z((1, 8, 3, 4)),
            interpret=pltpu.InterpretParams())


# --------------------------------------------------------------------- VMEM estimate
def test_tpu_vmem_bytes():
    tile = 128 * 128 * 4   # one [128, 128] f32 block; [Q, 1] columns also take 128 lanes
    row = 8 * 128 * 4      # one [1, 128] row: 8 sublanes
    got = tpu_vmem_bytes((1, 256, 2, 64), (1, 256, 1, 16))
    assert set(got) == {"ssd_chunk_state", "ssd_chunk_scan", "ssd_chunk_state_grad",
                        "ssd_chunk_bwd"}
    # x, dt, Acs, B, Acs row -> state; double-buffered.
    assert got["ssd_chunk_state"] == 2 * (5 * tile + row)
    # x, dt, Acs, B, C, Acs row, S -> y
    assert got["ssd_chunk_scan"] == 2 * (7 * tile + row)
    # dy, Acs, C, Acs row -> dS
    assert got["ssd_chunk_state_grad"] == 2 * (4 * tile + row)
    # x, dt, Acs, B, C, Acs row, S, dS, dy -> dx, d dt, dAcs, dB, dC, dAcs row
    assert got["ssd_chunk_bwd"] == 2 * (13 * tile + 2 * row)
    seg = tpu_vmem_bytes((1, 256, 2, 64), (1, 256, 1, 16), segments=True)
    assert seg["ssd_chunk_bwd"] == got["ssd_chunk_bwd"] + 2 * (tile + row)  # seg column + row
    # The benchmark shape (bf16, chunk 256) fits the default 16 MiB scoped VMEM with room to
    # spare for the [Q, Q] temporaries.
    big = tpu_vmem_bytes((4, 4096, 16, 128), (4, 4096, 1, 128), jnp.bfloat16, chunk_size=256)
    assert max(big.values()) < 8 * 2 ** 20
