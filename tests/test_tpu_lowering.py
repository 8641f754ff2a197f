"""The TPU (Mosaic) side of the flash-attention kernels, checked on the CPU.

1. Lowering: every variant of ``tests/test_gpu_lowering.py`` (forward and the
   gradients; causal / non-causal, window, segments, GQA / MQA, several head
   dims, odd lengths, decode queries, bf16 / fp32) is exported *for TPU* with
   ``jax.export(..., platforms=("tpu",))`` from this CPU-only jaxlib, through
   the normal public call (``interpret=False``).  That runs Pallas' Mosaic TPU
   lowering (block-shape tiling rules, dtypes, op coverage); the test checks
   that three Mosaic kernels (``tpu_custom_call``) come out and no Triton one.
   Mosaic's own layout passes run only in the TPU compiler, so this is not a
   full compile.
2. Numerics: the TPU variant runs in Pallas' TPU interpret mode
   (``interpret=pltpu.InterpretParams()``, TPU memory-space semantics) against
   the float32 reference, forward and all three gradients, on small awkward
   shapes; one case runs with the race detector.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import flash_attention, reference

from test_gpu_lowering import ATTENTION_CASES, _attention_case, _grad_all

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _export_tpu(fn, *args):
    return jax.export.export(jax.jit(fn), platforms=("tpu",))(*args).mlir_module()


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_flash_attention_lowers_for_tpu(case):
    fn, args = _attention_case(**ATTENTION_CASES[case])
    fwd = _export_tpu(fn, *args)
    assert fwd.count("tpu_custom_call") == 1 and "__gpu$xla.gpu.triton" not in fwd
    assert "flash_attention_fwd" in fwd
    grad = _grad_all(fn, 3) if len(args) == 3 else _grad_all(
        lambda q, k, v: fn(q, k, v, jnp.zeros(args[3].shape, jnp.int32)), 3)
    bwd = _export_tpu(grad, *args[:3])
    assert bwd.count("tpu_custom_call") == 3 and "triton" not in bwd
    for name in ("flash_attention_fwd", "flash_attention_bwd_dq", "flash_attention_bwd_dkdv"):
        assert name in bwd


def test_tpu_export_with_segments_grad_lowers():
    """Segment ids as a traced argument of the gradient (not a constant)."""
    fn, args = _attention_case(2, 200, 200, 4, 1, 64, segments=True, window=64)
    grad = jax.grad(lambda q, k, v, ids: fn(q, k, v, ids).astype(jnp.float32).sum(),
                    argnums=(0, 1, 2))
    assert _export_tpu(grad, *args).count("tpu_custom_call") == 3


# --------------------------------------------------------------------- TPU interpret mode
def _inputs(seed, b, tq, tk, hq, hkv, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    mk = lambda kk, s: jax.random.normal(kk, s, jnp.float32).astype(dtype)  # noqa: E731
    return (mk(ks[0], (b, tq, hq, d)), mk(ks[1], (b, tk, hkv, d)), mk(ks[2], (b, tk, hkv, d)),
            mk(ks[3], (b, tq, hq, d)))


def _packed_ids(seed, b, t, n_docs):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, t), size=(b, n_docs - 1)), axis=1)
    return jnp.asarray((np.arange(t)[None, None, :] >= cuts[:, :, None]).sum(1), jnp.int32)


def _fwd_bwd(fn, q, k, v, ct, **kw):
    def f(q, k, v, ct):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
        return (o,) + vjp(ct)
    return jax.jit(f, compiler_options=FAST_COMPILE)(q, k, v, ct)


def _assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want))))
    assert err <= tol, f"{what}: scaled max error {err:.3g} > {tol}"


# (B, Tq, Tk, Hq, Hkv, D, kwargs): lengths not multiples of the 128 TPU tile, D padded to 128.
INTERPRET_CASES = {
    "causal_gqa_odd": (1, 200, 200, 4, 2, 64, dict(causal=True)),
    "noncausal_window_segments": (2, 150, 150, 2, 1, 32, dict(causal=False, window=40,
                                                              segments=3)),
    "decode_window_gqa": (1, 9, 260, 4, 1, 64, dict(causal=True, window=100)),
}


@pytest.mark.parametrize("name", sorted(INTERPRET_CASES))
def test_tpu_interpret_matches_reference(name):
    b, tq, tk, hq, hkv, d, kw = INTERPRET_CASES[name]
    kw = dict(kw)
    q, k, v, ct = _inputs(0, b, tq, tk, hq, hkv, d)
    if kw.get("segments"):
        kw["segment_ids"] = _packed_ids(1, b, tq, kw.pop("segments"))
    got = _fwd_bwd(flash_attention, q, k, v, ct, interpret=pltpu.InterpretParams(), **kw)
    want = _fwd_bwd(reference, q, k, v, ct, **kw)
    for what, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, 1e-5, f"{name} {what}")


def test_tpu_interpret_race_detector_bf16(capfd):
    """bf16, multiple q/kv blocks (block 128, T = 300), the "parallel" grid split over two
    simulated cores with ``detect_races=True``: no race is reported."""
    q, k, v, ct = _inputs(2, 1, 300, 300, 2, 2, 128, jnp.bfloat16)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    got = _fwd_bwd(flash_attention, q, k, v, ct, causal=True, interpret=params)
    want = _fwd_bwd(reference, *(x.astype(jnp.float32) for x in (q, k, v, ct)), causal=True)
    for what, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, 3e-2, f"bf16 {what}")
    assert "RACE DETECTED" not in capfd.readouterr().out
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    races = getattr(ipc, "races", None)  # the detector's global state (this jax version)
    assert races is not None and not races.races_found


def test_gpt_train_step_lowers_for_tpu(monkeypatch):
    """A bf16 training gradient of the tiny GPT with ``attention_impl="pallas"`` exports for TPU
    (compiled mode forced, as on a TPU backend)."""
    import functools

    from jaxformers import registry
    from jaxformers.utils import init_params

    monkeypatch.setattr("pallas_kernels.flash_attention.kernel.resolve_interpret",
                        lambda interpret: False)
    cfg = registry.get_config("gpt", "tiny", attention_impl="pallas", dtype="bfloat16")
    model = registry.build(cfg)
    params = jax.eval_shape(functools.partial(init_params, model, jax.random.PRNGKey(0)))

    def loss(params, tokens):
        return model.apply({"params": params}, tokens).astype(jnp.float32).mean()

    mod = _export_tpu(jax.grad(loss), params, jax.ShapeDtypeStruct((2, 128), jnp.int32))
    assert "flash_attention_bwd_dkdv" in mod and "triton" not in mod


def test_forward_with_stats_refuses_tpu_interpret():
    from pallas_kernels.flash_attention import forward_with_stats
    q, k, v, _ = _inputs(0, 1, 16, 16, 1, 1, 16)
    with pytest.raises(ValueError, match="forward_with_stats"):
        forward_with_stats(q, k, v, interpret=pltpu.InterpretParams())
