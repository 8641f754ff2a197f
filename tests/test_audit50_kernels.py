"""Audit 50, the Pallas kernels' public arguments: integer knobs (block / chunk sizes, warps,
stages, the VMEM estimators' shapes) go through one shared check, ``_common.check_int``, which
takes numpy integers (``np.int64(64)`` from a sweep's ``np.arange``) as Python ints and refuses
bools, floats, strings and arrays with a ``ValueError`` naming the argument; the sparse and
landmark kernels check their Triton knobs as the flash kernel does; ``hadamard_transform``
refuses a string / bool / NaN ``scale``; the TPU VMEM estimators check ``segments`` and
``block_sizes``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import check_int
from pallas_kernels.flash_attention import BlockSizes
from pallas_kernels.flash_attention import tpu_vmem_bytes as flash_vmem
from pallas_kernels.hadamard import hadamard_transform
from pallas_kernels.landmark_attention import landmark_attention
from pallas_kernels.selective_scan import reference as scan_reference
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.selective_scan import tpu_vmem_bytes as scan_vmem
from pallas_kernels.sparse_attention import hash_attention
from pallas_kernels.ssd import reference as ssd_reference
from pallas_kernels.ssd import ssd
from pallas_kernels.ssd import tpu_vmem_bytes as ssd_vmem

I64 = np.int64
BAD_INTS = [True, np.bool_(True), 16.0, np.float32(16), "16", np.array(16), jnp.int32(16), None]


def _scan_inputs(l=12, d=8, n=4):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, l, d), dtype=np.float32))
    dt = jnp.abs(x) * 0.5
    A = -jnp.asarray(rng.random((d, n), dtype=np.float32)) - 0.1
    B = jnp.asarray(rng.standard_normal((1, l, n), dtype=np.float32))
    return x, dt, A, B, B


def _ssd_inputs(l=12, h=2, p=16, n=4):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, l, h, p), dtype=np.float32))
    dt = jnp.abs(x[..., 0]) * 0.5
    A = -jnp.asarray(rng.random(h, dtype=np.float32)) - 0.1
    B = jnp.asarray(rng.standard_normal((1, l, 1, n), dtype=np.float32))
    return x, dt, A, B, B


def _qkv(t=16, h=2, d=16):
    rng = np.random.default_rng(2)
    return tuple(jnp.asarray(rng.standard_normal((1, t, h, d), dtype=np.float32)) for _ in range(3))


# ---------------------------------------------------------------------- the shared helper
def test_check_int_converts_numpy_ints_and_names_the_argument():
    """The shared check returns a Python int (plans and jit static args hold no numpy scalar) and
    its message names the argument and the allowed values."""
    for v in (I64(64), np.int32(64), np.uint8(64), 64):
        out = check_int("block", v, pow2=True)
        assert out == 64 and type(out) is int
    assert check_int("g", None, none_ok=True) is None
    for bad in BAD_INTS:
        with pytest.raises(ValueError, match=r"block must be a power of two >= 16 .*got"):
            check_int("block", bad, minimum=16, pow2=True)
    with pytest.raises(ValueError, match=r"n must be a positive int"):
        check_int("n", I64(0))
    with pytest.raises(ValueError, match=r"w must be None or a positive power of two"):
        check_int("w", I64(3), pow2=True, none_ok=True)


# ------------------------------------------------------------- numpy ints in the scans
def test_selective_scan_accepts_numpy_int_sizes():
    """``chunk_size=np.int64(8)`` / ``block_d=np.int64(8)`` were refused ("chunk_size must be a
    positive int, got np.int64(8)"); the result equals the Python-int call."""
    args = _scan_inputs()
    want = selective_scan(*args, chunk_size=8, block_d=8, interpret=True)
    got = selective_scan(*args, chunk_size=I64(8), block_d=np.int32(8), interpret=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, scan_reference(*args), rtol=1e-4, atol=1e-4)


def test_ssd_accepts_numpy_int_sizes():
    """``chunk_size=np.int64(16)`` / ``block_p=np.int64(16)`` were refused."""
    args = _ssd_inputs()
    want = ssd(*args, chunk_size=16, block_p=16, interpret=True)
    got = ssd(*args, chunk_size=I64(16), block_p=I64(16), interpret=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, ssd_reference(*args), rtol=1e-4, atol=1e-4)


def test_scan_vmem_estimators_accept_numpy_ints():
    """The TPU VMEM estimators refused numpy shapes and sizes (e.g. from ``np.arange`` sweeps)."""
    assert scan_vmem(I64(1), I64(64), I64(128), I64(16), groups=I64(2), chunk_size=I64(64),
                     block_d=I64(128)) == scan_vmem(1, 64, 128, 16, groups=2, chunk_size=64, block_d=128)
    shape = tuple(I64(s) for s in (1, 64, 2, 64))
    assert ssd_vmem(shape, (1, 64, 1, I64(16)), chunk_size=I64(64)) == ssd_vmem(
        (1, 64, 2, 64), (1, 64, 1, 16), chunk_size=64)


@pytest.mark.parametrize("bad", [True, 8.0, "8", np.array(8)])
def test_scan_sizes_still_refuse_non_ints(bad):
    """Bools, floats, strings and arrays stay refused, with the argument named (an array used to
    reach the jit as a static argument: "Non-hashable static arguments are not supported")."""
    with pytest.raises(ValueError, match=r"chunk_size must be None or a positive int"):
        selective_scan(*_scan_inputs(), chunk_size=bad, interpret=True)
    with pytest.raises(ValueError, match=r"block_d must be None or a positive power of two"):
        selective_scan(*_scan_inputs(), block_d=bad, interpret=True)
    with pytest.raises(ValueError, match=r"chunk_size must be a power of two >= 16"):
        ssd(*_ssd_inputs(), chunk_size=bad, interpret=True)
    with pytest.raises(ValueError, match=r"block_p must be a power of two >= 16"):
        ssd(*_ssd_inputs(), block_p=bad, interpret=True)
    with pytest.raises(ValueError, match=r"batch must be a positive int"):
        scan_vmem(bad, 64, 128, 16)
    with pytest.raises(ValueError, match=r"x_shape must be 4 positive ints"):
        ssd_vmem((1, 64, 2, bad), (1, 64, 1, 16))


# ------------------------------------------------ Triton knobs of the sparse / landmark kernels
@pytest.mark.parametrize("kw, match", [
    (dict(num_warps=3), r"num_warps must be None or a positive power of two"),
    (dict(num_warps="4"), r"num_warps must be None or a positive power of two"),
    (dict(num_warps=True), r"num_warps must be None or a positive power of two"),
    (dict(num_stages=0), r"num_stages must be a positive int"),
    (dict(num_stages=2.5), r"num_stages must be a positive int"),
])
def test_sparse_and_landmark_knobs_are_checked(kw, match):
    """hash / qk-sparse / landmark attention passed ``num_warps`` / ``num_stages`` to Triton
    unchecked: ignored in interpret mode and on TPU (any value "worked"), a failure inside
    Triton's compiler on a GPU.  The flash kernel already checked its BlockSizes knobs."""
    q, k, v = _qkv()
    buckets = jnp.zeros(q.shape[:3], jnp.int32)
    with pytest.raises(ValueError, match=match):
        hash_attention(q, k, v, buckets, buckets, interpret=True, **kw)
    with pytest.raises(ValueError, match=match):
        landmark_attention(q, k, v, block_size=4, interpret=True, **kw)


def test_sparse_and_landmark_accept_numpy_int_knobs():
    """numpy ints for every static knob give the Python-int result."""
    q, k, v = _qkv()
    buckets = jnp.asarray(np.arange(16).reshape(1, 16, 1) % 3 * np.ones((1, 1, 2), int))
    want = hash_attention(q, k, v, buckets, buckets, block_q=16, block_k=16, num_warps=4,
                          num_stages=2, interpret=True)
    got = hash_attention(q, k, v, buckets, buckets, block_q=I64(16), block_k=I64(16),
                         num_warps=I64(4), num_stages=I64(2), interpret=True)
    np.testing.assert_array_equal(got, want)
    want = landmark_attention(q, k, v, block_size=4, block_q=16, num_warps=4, interpret=True)
    got = landmark_attention(q, k, v, block_size=I64(4), block_q=I64(16), num_warps=I64(4),
                             num_stages=I64(2), interpret=True)
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------- VMEM estimator flags
def test_vmem_estimators_check_segments_and_block_sizes():
    """``segments="no"`` was read by truthiness (counted the segment blocks) in the flash and ssd
    estimators, and flash's took a BlockSizes of non-powers of two (an estimate for tiles the
    kernel refuses)."""
    with pytest.raises(ValueError, match=r"segments must be a bool"):
        flash_vmem((1, 256, 2, 64), (1, 256, 2, 64), jnp.bfloat16, segments="no")
    with pytest.raises(ValueError, match=r"segments must be a bool"):
        ssd_vmem((1, 64, 2, 64), (1, 64, 1, 16), segments="no")
    with pytest.raises(ValueError, match=r"block_sizes.block_q must be a positive power of two"):
        flash_vmem((1, 256, 2, 64), (1, 256, 2, 64), jnp.bfloat16, block_sizes=BlockSizes(96, 128))
    assert flash_vmem((1, 256, 2, 64), (1, 256, 2, 64), jnp.bfloat16,
                      block_sizes=BlockSizes(I64(128), I64(128)))


# ----------------------------------------------------------------------- hadamard's scale
@pytest.mark.parametrize("scale", ["0.5", True, float("nan"), float("inf"), np.array([0.5]), 1j])
def test_hadamard_scale_must_be_a_finite_real_number(scale):
    """``float(scale)`` read the string "0.5" as 0.5 and True as 1.0, and NaN / inf gave an
    all-NaN / inf output silently; each is now a ValueError naming ``scale``."""
    with pytest.raises(ValueError, match=r"scale must be a finite real number"):
        hadamard_transform(jnp.ones((2, 16)), scale=scale, interpret=True)


def test_hadamard_scale_numpy_and_traced():
    """numpy / 0-d jax scales still work; a traced one is named as such."""
    x = jnp.ones((2, 16))
    want = hadamard_transform(x, scale=0.25, interpret=True)
    for s in (np.float32(0.25), I64(1) / 4, jnp.float32(0.25)):
        np.testing.assert_array_equal(hadamard_transform(x, scale=s, interpret=True), want)
    with pytest.raises(ValueError, match=r"scale must be a concrete number"):
        jax.jit(lambda s: hadamard_transform(x, scale=s, interpret=True))(0.25)


# ------------------------------------------------------------------- the attention dispatcher
def test_attention_refuses_zero_kv_heads_and_integer_inputs():
    """``k`` with 0 heads was a ZeroDivisionError ("integer modulo by zero") from the GQA check;
    integer q / k / v ran on the XLA path and returned an integer "attention" (the Pallas kernel
    refused them): both are ValueErrors naming the argument now."""
    from jaxformers.ops.attention import attention, xla_attention

    q = jnp.ones((1, 4, 2, 8))
    for fn in (attention, xla_attention):
        with pytest.raises(ValueError, match=r"multiple of kv heads \(0, >= 1\)"):
            fn(q, q[:, :, :0], q[:, :, :0])
        with pytest.raises(ValueError, match=r"k must be floating point, got int32"):
            fn(q, q.astype(jnp.int32), q)


def test_xla_attention_with_no_keys_outputs_zeros():
    """``Tk = 0`` (and ``T = 0``) failed in ``jnp.max`` ("zero-size array to reduction operation
    max"); rows that see no key output zeros, as the module docstring says."""
    from jaxformers.ops.attention import attention

    q, k, v = _qkv(t=4)
    out = attention(q, k[:, :0], v[:, :0], causal=False, implementation="xla")
    assert out.shape == q.shape and not np.asarray(out).any()
    assert attention(q[:, :0], k[:, :0], v[:, :0], implementation="xla").shape == (1, 0, 2, 16)
    g = jax.grad(lambda q: attention(q, k[:, :0], v[:, :0], causal=False, implementation="xla").sum())(q)
    assert not np.asarray(g).any()
