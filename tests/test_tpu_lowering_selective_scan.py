"""The TPU (Mosaic) variant of the Mamba-1 selective scan, checked on the CPU the same two ways
as the flash-attention kernels in ``tests/test_tpu_lowering.py``:

1. every selective-scan variant of ``tests/test_gpu_lowering.py`` exported for TPU through the
   public call (``interpret=False``): Mosaic kernels only, no Triton;
2. the TPU variant in Pallas' TPU interpreter (``pltpu.InterpretParams``) vs the float32
   reference, forward and every gradient, on small awkward shapes; one case (bf16: 16-step
   groups) under the race detector.
"""
import functools as _ft
import re as _re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.selective_scan import reference as scan_reference
from pallas_kernels.selective_scan import selective_scan, tpu_vmem_bytes
from scan_testing import rel as _scan_rel, segments as _scan_segments
from test_gpu_lowering import _grad_all, _scan_case
from test_tpu_lowering import FAST_COMPILE, _export_tpu

SCAN_KERNELS = {"selective_scan_chunk_states", "selective_scan_fwd", "selective_scan_bwd"}


def _tpu_kernel_names(module: str) -> list:
    """Names of the Mosaic kernels (``tpu_custom_call``s) in an exported module."""
    assert "triton" not in module
    names = _re.findall(r'kernel_name = "([^"]*)"', module)
    assert len(names) == module.count("tpu_custom_call") and names, module[:2000]
    return names


# the selective-scan cases of test_gpu_lowering.test_selective_scan_lowers_to_triton
SCAN_EXPORT_CASES = {
    "bf16_z_padded_dim": dict(b=2, l=300, dim=96, n=16),
    "f32_groups_n5_no_z": dict(b=1, l=130, dim=64, n=5, groups=2, z=False, dtype=jnp.float32),
    "init_segments": dict(b=2, l=200, dim=64, n=16, init=True, segments=True),
}


def _value_and_vjp(fn):
    """``fn`` and its VJP (cotangent = the output) in one function: every scan kernel runs."""
    def both(*a):
        y, vjp = jax.vjp(fn, *a)
        return y, vjp(y)
    return both


@pytest.mark.parametrize("case", sorted(SCAN_EXPORT_CASES))
def test_selective_scan_lowers_for_tpu(case):
    fn, args = _scan_case(**SCAN_EXPORT_CASES[case])
    assert sorted(_tpu_kernel_names(_export_tpu(fn, *args))) == [
        "selective_scan_chunk_states", "selective_scan_fwd"]
    # the gradient alone needs no y: the output kernel may be dropped
    grad = _grad_all(fn, len(args))
    assert {"selective_scan_chunk_states", "selective_scan_bwd"} <= set(
        _tpu_kernel_names(_export_tpu(grad, *args))) <= SCAN_KERNELS
    assert sorted(_tpu_kernel_names(_export_tpu(_value_and_vjp(fn), *args))) == sorted(SCAN_KERNELS)


def test_selective_scan_last_state_lowers_for_tpu():
    fn, args = _scan_case(1, 64, 32, 16, z=False)
    both = lambda *a: selective_scan(*a[:5], return_final_state=True, interpret=False)  # noqa: E731
    assert sorted(_tpu_kernel_names(_export_tpu(both, *args[:5]))) == [
        "selective_scan_chunk_states", "selective_scan_fwd"]
    # the final state alone needs only the chunk states (the output kernel may be dropped)
    last = lambda *a: both(*a)[1]  # noqa: E731
    assert "selective_scan_chunk_states" in _tpu_kernel_names(_export_tpu(last, *args[:5]))


def _mosaic_calls(fn, *args):
    """``{name: (grid, dimension_semantics)}`` of the Mosaic-TPU ``pallas_call``s in ``fn``'s
    jaxpr (compiled calls hold both variants; the Triton ones have no dimension semantics)."""
    found = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                sem = getattr(eqn.params["compiler_params"], "dimension_semantics", None)
                if sem is not None:
                    found[eqn.params["name"]] = (tuple(eqn.params["grid_mapping"].grid),
                                                 tuple(str(x).lower() for x in sem))
                continue
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_selective_scan_tpu_grids():
    """TPU grids: forward (batch, 128-channel blocks, chunks) all "parallel"; the backward the
    same with the chunk axis "arbitrary" (it carries the adjoint)."""
    fn, args = _scan_case(2, 300, 200, 16, dtype=jnp.float32)   # 2 blocks of 128, 5 chunks of 64
    calls = _mosaic_calls(_value_and_vjp(fn), *args)
    assert set(calls) == SCAN_KERNELS
    par = ("parallel",) * 3
    assert calls["selective_scan_chunk_states"] == calls["selective_scan_fwd"] == ((2, 2, 5), par)
    grid, sem = calls["selective_scan_bwd"]
    assert grid == (2, 2, 5) and sem[:2] == par[:2] and "arbitrary" in sem[2]


def test_selective_scan_tpu_vmem_bytes():
    small = tpu_vmem_bytes(2, 300, 96, 16, dtype=jnp.float32)
    assert set(small) == SCAN_KERNELS
    # per grid step: independent of batch and length, grows with chunk and N
    assert tpu_vmem_bytes(8, 4096, 96, 16, dtype=jnp.float32) == small
    assert all(v > 0 for v in small.values())
    big = tpu_vmem_bytes(2, 300, 96, 64, chunk_size=128, dtype=jnp.float32,
                         initial_state=True, segments=True)
    assert all(big[k] > small[k] for k in small)
    assert max(tpu_vmem_bytes(4, 4096, 2048, 16).values()) < 4 * 2**20  # fits v5e's 16 MiB scope
    with pytest.raises(ValueError, match="groups"):
        tpu_vmem_bytes(2, 300, 96, 16, groups=5)


def test_mamba_train_step_lowers_for_tpu(monkeypatch):
    """A bf16 training gradient of the tiny Mamba with ``scan_impl="pallas"`` exports for TPU
    (compiled mode forced, as on a TPU backend)."""
    from jaxformers import registry
    from jaxformers.utils import init_params
    import pallas_kernels._common as common

    monkeypatch.setattr(common, "resolve_interpret", lambda interpret: False)
    monkeypatch.setattr("pallas_kernels.selective_scan.kernel.resolve_interpret",
                        lambda interpret: False)
    cfg = registry.get_config("mamba", "tiny", scan_impl="pallas", dtype="bfloat16")
    model = registry.build(cfg)
    params = jax.eval_shape(_ft.partial(init_params, model, jax.random.PRNGKey(0)))

    def loss(params, tokens):
        return model.apply({"params": params}, tokens).astype(jnp.float32).mean()

    names = _tpu_kernel_names(_export_tpu(jax.grad(loss), params,
                                          jax.ShapeDtypeStruct((2, 128), jnp.int32)))
    assert "selective_scan_bwd" in names and set(names) <= SCAN_KERNELS


# --------------------------------------------------------------------- TPU interpret mode
def _scan_inputs(seed, b, l, dim, n, g=None, dtype=jnp.float32, D=True, z=True, bias=True,
                 init=False):
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    bc = (b, l, n) if g is None else (b, l, g, n)
    return dict(
        x=jnp.asarray(r(b, l, dim), dtype), dt=jnp.asarray(0.5 * r(b, l, dim), dtype),
        A=jnp.asarray(-np.exp(0.5 * r(dim, n))),
        B=jnp.asarray(r(*bc), dtype), C=jnp.asarray(r(*bc), dtype),
        D=jnp.asarray(r(dim)) if D else None,
        z=jnp.asarray(r(b, l, dim), dtype) if z else None,
        dt_bias=jnp.asarray(0.3 * r(dim)) if bias else None,
        initial_state=jnp.asarray(r(b, dim, n)) if init else None)


def _scan_fwd_bwd(fn, inputs, seg, seed=1, **kw):
    """``(y, final_state)`` and the VJP wrt every float input for fixed random cotangents."""
    diff = {k: v for k, v in inputs.items() if v is not None}
    b, l, dim = inputs["x"].shape
    rng = np.random.default_rng(seed)
    cts = (jnp.asarray(rng.standard_normal((b, l, dim), np.float32), inputs["x"].dtype),
           jnp.asarray(rng.standard_normal((b, dim, inputs["A"].shape[1]), np.float32)))

    def f(diff, cts):
        out, vjp = jax.vjp(lambda p: fn(**p, segment_ids=seg, return_final_state=True, **kw), diff)
        return out, vjp(cts)[0]
    return jax.jit(f, compiler_options=FAST_COMPILE)(diff, cts)


def _scan_check(inputs, seg, static, kernel_kw, tol):
    (y, h), grads = _scan_fwd_bwd(_ft.partial(selective_scan, **kernel_kw), inputs, seg, **static)
    f32_inputs = {k: (None if v is None else v.astype(jnp.float32)) for k, v in inputs.items()}
    (y_r, h_r), grads_r = _scan_fwd_bwd(scan_reference, f32_inputs, seg, **static)
    assert y.dtype == inputs["x"].dtype and y.shape == y_r.shape and h.shape == h_r.shape
    errs = {"y": _scan_rel(y, y_r), "final_state": _scan_rel(h, h_r)}
    assert set(grads) == set(grads_r)
    for k in grads_r:
        assert grads[k].dtype == inputs[k].dtype, k
        assert np.all(np.isfinite(np.asarray(grads[k], np.float32))), k
        errs["d" + k] = _scan_rel(grads[k], grads_r[k])
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"scaled max errors above {tol}: {bad}"


# L=37 with chunk 16 (three chunks, the last padded; row 0 has segment starts at the chunk
# edge 16, a length-1 segment, several in chunk 1 and one in the padded chunk), G=3 groups of
# 8 channels (each padded to one 128-lane block), N=6 (padded to 8), initial state, z, D, bias.
SCAN_PACKED_STARTS = [(16, 17, 20, 22, 33), (5, 30)]


def test_selective_scan_tpu_interpret_all_features():
    inputs = _scan_inputs(0, 2, 37, 24, 6, g=3, init=True)
    seg = _scan_segments(2, 37, SCAN_PACKED_STARTS)
    _scan_check(inputs, seg, dict(dt_softplus=True),
                dict(chunk_size=16, interpret=pltpu.InterpretParams()), 3e-5)


def test_selective_scan_tpu_interpret_wide_minimal():
    """dim 136 = two 128-lane blocks (the second mostly padding), no group axis, N=5, no D /
    z / bias / softplus / segments; L=21 with chunk_size 6: the GPU's 4 chunks, each rounded
    up to 8 steps on TPU, so the last chunk is all padding."""
    inputs = _scan_inputs(1, 1, 21, 136, 5, D=False, z=False, bias=False)
    _scan_check(inputs, None, {}, dict(chunk_size=6, interpret=pltpu.InterpretParams()), 3e-5)


def test_selective_scan_states_shared_between_variants():
    """Compiled calls keep the chunk-start states in the GPU plan's layout between forward and
    backward; the TPU branch converts to and from it without losing anything."""
    from pallas_kernels.selective_scan import kernel as K

    x, A = jax.ShapeDtypeStruct((2, 37, 24), jnp.float32), jax.ShapeDtypeStruct((24, 6), jnp.float32)
    gpu = K._make_plan(x, A, 3, True, True, True, True, False, 4, 5)
    tpu = K._make_plan(x, A, 3, True, True, True, True, False, 4, 5, platform="tpu")
    assert gpu.nc == tpu.nc == 8 and (gpu.chunk, tpu.chunk, tpu.lp) == (5, 8, 64)
    st = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 3, 8, 6), np.float32))
    canon = K._pad_axis(K._pad_chan(st.reshape(2, 8, 24, 6), gpu, 2), 3, gpu.np_)
    as_tpu = K._convert_states(gpu, tpu, canon)
    assert as_tpu.shape == (2, 8, 8, 3 * 128)
    np.testing.assert_array_equal(K._convert_states(tpu, gpu, as_tpu), canon)
    np.testing.assert_array_equal(as_tpu[:, :, :6].reshape(2, 8, 6, 3, 128)[..., :8],
                                  jnp.moveaxis(st, -1, 2))


def test_selective_scan_tpu_interpret_race_detector_bf16(capfd):
    """bf16 (16-step groups), the "parallel" batch axis split over two simulated cores with
    ``detect_races=True``: no race is reported (and the values still match).  Kept tiny: the
    race detector's bookkeeping makes every access slow."""
    inputs = _scan_inputs(2, 2, 16, 16, 4, z=False, dtype=jnp.bfloat16)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    _scan_check(inputs, None, dict(dt_softplus=True), dict(chunk_size=16, interpret=params), 3e-2)
    assert "RACE DETECTED" not in capfd.readouterr().out
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    races = getattr(ipc, "races", None)  # the detector's global state (this jax version)
    assert races is not None and not races.races_found
