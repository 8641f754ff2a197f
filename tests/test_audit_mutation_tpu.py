"""TPU-variant checks added by a mutation audit of the Pallas kernels' TPU (Mosaic) code paths.

Each test kills a class of realistic bugs that the other TPU tests let through:

1. VMEM estimates (``tpu_vmem_bytes`` of every kernel family) against an independent count
   taken from the block specs the TPU variant actually passes to ``pallas_call`` (traced with
   ``jax.eval_shape`` under ``pltpu.InterpretParams()``, so only the TPU variant is built):
   every VMEM block double-buffered, each padded to the ``(8 | 16, 128)`` tile, SMEM specs not
   counted, scratch counted once.  Catches an estimate that forgets the double buffering of
   one kernel or drifts from the specs.
2. Flash attention in TPU interpret mode with ``block_q != block_k`` (the TPU tiles are
   otherwise always 128 x 128, which hides a q/k block-size mix-up in the TPU dK/dV body).
3. Flash attention in TPU interpret mode with a ``(q_ids, kv_ids)`` pair, ``Tq != Tk`` and
   three kv tiles (the flat-SMEM segment bounds: row stride / per-side block counts are
   indistinguishable with two equal-size sides).
4. Hash-sparse attention in TPU interpret mode with batch 2 (the flat-SMEM tile tables'
   batch offset is invisible at batch 1).

Tolerances: float32 inputs against the float32 references; the kernels differ from the
references only by summation order (blocked online softmax), which stays within ~1e-6 of the
scaled max error at these sizes, so 1e-5 leaves margin while any masking / indexing mistake
gives errors of order 1e-2 .. 1.
"""
import jax
import jax.experimental.pallas as plmod
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
S = jax.ShapeDtypeStruct
bf16 = jnp.bfloat16


# ----------------------------------------------------------------------------- VMEM oracle
def _tile(shape, isz):
    """Bytes of one VMEM block: squeezed dims 1, last two dims padded to (8*4/isz, 128)."""
    shape = [1 if not isinstance(d, (int, np.integer)) else int(d) for d in shape]
    shape = [1] * max(0, 2 - len(shape)) + shape
    *lead, r, c = shape
    sub = 8 * max(1, 4 // isz)
    return int(np.prod(lead)) * (-(-r // sub) * sub) * (-(-c // 128) * 128) * isz


def _spec_vmem(monkeypatch, fn, *args):
    """``{kernel name: bytes}`` from the block specs of every ``pallas_call`` that tracing
    ``fn(*args)`` makes: 2x each VMEM in/out block (the pipeline's double buffer), 1x scratch."""
    log = {}
    orig = plmod.pallas_call

    def wrapper(kernel, *, out_shape, in_specs, out_specs, name, **kw):
        def call(*xs):
            outs = out_shape if isinstance(out_shape, (list, tuple)) else [out_shape]
            ospecs = out_specs if isinstance(out_specs, (list, tuple)) else [out_specs]
            total = 0
            for spec, a in list(zip(in_specs, xs)) + list(zip(ospecs, outs)):
                if spec.block_shape is None:   # SMEM / whole-array memory-space spec
                    continue
                total += 2 * _tile(spec.block_shape, jnp.dtype(a.dtype).itemsize)
            for sc in kw.get("scratch_shapes", ()):
                total += _tile(sc.shape, jnp.dtype(sc.dtype).itemsize)
            log[name] = total
            return orig(kernel, out_shape=out_shape, in_specs=in_specs, out_specs=out_specs,
                        name=name, **kw)(*xs)
        return call

    monkeypatch.setattr(plmod, "pallas_call", wrapper)
    jax.eval_shape(fn, *args)
    monkeypatch.setattr(plmod, "pallas_call", orig)
    return log


def _grads(f, n):
    return jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=tuple(range(n)))


IP = pltpu.InterpretParams()


def _vmem_case(family):
    """``(fn, args, estimate)`` for one family at a small bf16 shape."""
    q = S((1, 512, 2, 64), bf16)
    if family == "flash":
        from pallas_kernels.flash_attention import flash_attention, tpu_vmem_bytes
        return (_grads(lambda q, k, v: flash_attention(q, k, v, interpret=IP), 3), (q, q, q),
                tpu_vmem_bytes(q.shape, q.shape, bf16))
    if family == "flash_segments":
        from pallas_kernels.flash_attention import flash_attention, tpu_vmem_bytes
        fn = lambda q, k, v, i: _grads(
            lambda q, k, v: flash_attention(q, k, v, segment_ids=i, interpret=IP), 3)(q, k, v)
        return fn, (q, q, q, S((1, 512), jnp.int32)), tpu_vmem_bytes(q.shape, q.shape, bf16,
                                                                      segments=True)
    if family == "sparse":
        from pallas_kernels.sparse_attention import hash_attention, tpu_vmem_bytes
        fn = lambda q, k, v, i: _grads(
            lambda q, k, v: hash_attention(q, k, v, i, i, interpret=IP), 3)(q, k, v)
        return fn, (q, q, q, S((1, 512, 2), jnp.int32)), tpu_vmem_bytes(q.shape, q.shape, bf16)
    if family == "landmark":
        from pallas_kernels.landmark_attention import landmark_attention, tpu_vmem_bytes
        return (_grads(lambda q, k, v: landmark_attention(q, k, v, block_size=64, interpret=IP), 3),
                (q, q, q), tpu_vmem_bytes(q.shape, q.shape, bf16, block_size=64))
    if family == "hadamard":
        from pallas_kernels.hadamard import hadamard_transform, tpu_vmem_bytes
        return (_grads(lambda x: hadamard_transform(x, interpret=IP), 1), (S((4096, 256), bf16),),
                tpu_vmem_bytes(256, bf16))
    if family == "selective_scan":
        from pallas_kernels.selective_scan import selective_scan, tpu_vmem_bytes
        b, l, dim, n = 2, 300, 96, 16
        f32 = jnp.float32
        args = (S((b, l, dim), bf16), S((b, l, dim), bf16), S((dim, n), f32), S((b, l, n), f32),
                S((b, l, n), f32), S((dim,), f32), S((b, l, dim), bf16))
        fn = lambda x, dt, A, B, C, D, z: selective_scan(
            x, dt, A, B, C, D=D, z=z, dt_softplus=True, interpret=IP)
        return _grads(fn, 7), args, tpu_vmem_bytes(b, l, dim, n, dtype=bf16, z=True)
    raise AssertionError(family)


@pytest.mark.parametrize("family", ["flash", "flash_segments", "sparse", "landmark", "hadamard",
                                    "selective_scan"])
def test_tpu_vmem_bytes_match_the_block_specs(monkeypatch, family):
    fn, args, estimate = _vmem_case(family)
    from_specs = _spec_vmem(monkeypatch, fn, *args)
    assert from_specs == estimate


# ----------------------------------------------------------------------------- numerics
def _assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want))))
    assert err <= tol, f"{what}: scaled max error {err:.3g} > {tol}"


def _fwd_bwd(fn, args, ct, **kw):
    q, k, v, *rest = args

    def f(q, k, v, ct, *rest):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *rest, **kw), q, k, v)
        return (o,) + vjp(ct)
    return jax.jit(f, compiler_options=FAST_COMPILE)(q, k, v, ct, *rest)


def _qkv(seed, b, tq, tk, hq, hkv, d):
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))
    return r(b, tq, hq, d), r(b, tk, hkv, d), r(b, tk, hkv, d), r(b, tq, hq, d)


def test_flash_tpu_interpret_unequal_q_and_k_tiles():
    """block_q = 256, block_k = 128 on TPU (T = 200: one 256-row q tile, two kv tiles), causal,
    GQA: the TPU dK/dV body must place key columns with the kv tile, not the q tile."""
    from pallas_kernels.flash_attention import BlockSizes, flash_attention, reference
    from pallas_kernels.flash_attention import kernel as K
    bs = BlockSizes(block_q=256, block_k=128)
    q, k, v, ct = _qkv(0, 1, 200, 200, 2, 1, 64)
    plan = K._make_plan(q, k, None, True, None, None, bs, IP, platform="tpu")
    assert plan.blocks == (256, 128) * 3   # the user's (>= 128) tiles are kept on TPU
    got = _fwd_bwd(flash_attention, (q, k, v), ct, causal=True, block_sizes=bs, interpret=IP)
    want = _fwd_bwd(reference, (q, k, v), ct, causal=True)
    for what, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, 1e-5, what)


def _sorted_ids(rng, b, t, n_docs):
    return jnp.asarray(np.sort(rng.integers(0, n_docs, (b, t)), axis=1), jnp.int32)


def test_flash_tpu_interpret_segment_pair_three_kv_tiles():
    """(q_ids, kv_ids) with Tq = 130 (2 q tiles), Tk = 300 (3 kv tiles), batch 2, not causal:
    the per-block id bounds in flat SMEM are read with the right strides per side and batch."""
    from pallas_kernels.flash_attention import flash_attention, reference
    rng = np.random.default_rng(3)
    q, k, v, ct = _qkv(1, 2, 130, 300, 1, 1, 64)
    ids = (_sorted_ids(rng, 2, 130, 6), _sorted_ids(rng, 2, 300, 6))
    got = _fwd_bwd(flash_attention, (q, k, v), ct, causal=False, segment_ids=ids, interpret=IP)
    want = _fwd_bwd(reference, (q, k, v), ct, causal=False, segment_ids=ids)
    for what, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, 1e-5, what)


def test_sparse_tpu_interpret_batch_two():
    """Hash attention, batch 2 (differently spread buckets per row), GQA, T = 200: the flat SMEM tile
    tables are offset by the program's batch row."""
    from pallas_kernels.sparse_attention import hash_attention, hash_reference
    b, t, hq, hkv, d = 2, 200, 2, 1, 64
    rng = np.random.default_rng(5)
    q, k, v, ct = _qkv(2, b, t, t, hq, hkv, d)
    # row 0: 4 buckets; row 1: almost all bucket 0 -> the two rows' tile tables differ
    ql = jnp.asarray(rng.integers(0, 4, (b, t, hq)), jnp.int32)
    kl = jnp.asarray(rng.integers(0, 4, (b, t, hkv)), jnp.int32)
    ql = ql.at[1].set(jnp.where(rng.random((t, hq)) < 0.9, 0, ql[1]))
    kl = kl.at[1].set(jnp.where(rng.random((t, hkv)) < 0.9, 0, kl[1]))
    got = _fwd_bwd(hash_attention, (q, k, v, ql, kl), ct, interpret=IP)
    want = _fwd_bwd(hash_reference, (q, k, v, ql, kl), ct)
    for what, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, 1e-5, what)


# ----------------------------------------------------------------------------- plans
def test_compiled_tpu_variant_is_the_tpu_interpret_variant():
    """The TPU plan a compiled call carries (lowered by ``lax.platform_dependent``) is the one
    TPU interpret mode runs and the tests check numerically, including the platform-specific
    knobs (selective_scan: 16-step row groups for 16-bit inputs, the bf16 sublane tile)."""
    import dataclasses

    from pallas_kernels.selective_scan import kernel as K
    x, A = S((2, 37, 24), bf16), S((24, 6), jnp.float32)
    compiled = K._plan_for_call(x, x, x, A, 3, True, True, True, False, None, 16)
    interp = K._plan_for_call(x, x, x, A, 3, True, True, True, IP, None, 16)
    assert interp.platform == "tpu" and interp.rows == 16
    assert compiled.tpu_plan == dataclasses.replace(interp, interpret=False)
