"""Mutation-audit tests (landmark attention, Hadamard, quantizers): each pins a behaviour the
existing tests left open, found by injecting a realistic bug that they did not catch.

* landmark attention with an explicit ``sm_scale`` (every other test used the default
  ``D ** -0.5``, so a kernel or reference that ignored the argument passed);
* the Hadamard kernel's float32 accumulation of bf16 inputs (the bf16 tolerance 2e-2 let
  butterflies / dots in bf16 through);
* :func:`fake_quant` against the module doc's formulas written out in numpy, with a clipping
  ratio (the existing tests only bounded the error or compared two implementations sharing
  ``quant_params``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.quant import fake_quant
from pallas_kernels.hadamard import hadamard_reference, hadamard_transform
from pallas_kernels.landmark_attention import (
    landmark_attention,
    landmark_attention_reference,
)

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --------------------------------------------------------------------------- landmark sm_scale
def _landmark_grads(fn, q, k, v, ct, **kw):
    def f(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
        return (o,) + vjp(ct)
    return jax.jit(f, compiler_options=FAST_COMPILE)(q, k, v)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_landmark_sm_scale_is_used(impl):
    """``sm_scale = c``: logits ``c q.k`` == the default scale ``D^-1/2`` on ``q * c D^1/2``
    (an independent oracle: the default-scale reference on rescaled queries; ``dq`` by the
    chain rule).  GQA 4:2, L = 5, T = 23 (a partial last block), fp32: the existing 1e-5
    tolerance of this kernel vs the reference (sums of O(1) terms in float32)."""
    rng = np.random.default_rng(3)
    b, t, hq, hkv, d, L, c = 1, 23, 4, 2, 8, 5, 0.9   # c ~ 2.5x the default 8**-0.5 = 0.354
    mk = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))
    q, k, v, ct = mk(b, t, hq, d), mk(b, t, hkv, d), mk(b, t, hkv, d), mk(b, t, hq, d)
    r = c * d ** 0.5
    want = _landmark_grads(landmark_attention_reference, q * r, k, v, ct, block_size=L)
    want = (want[0], want[1] * r, want[2], want[3])
    if impl == "kernel":
        got = _landmark_grads(landmark_attention, q, k, v, ct, block_size=L, sm_scale=c, block_q=16)
    else:
        got = _landmark_grads(landmark_attention_reference, q, k, v, ct, block_size=L, sm_scale=c)
    for what, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        g, w = np.asarray(g), np.asarray(w)
        err = np.max(np.abs(g - w)) / max(1.0, float(np.max(np.abs(w))))
        assert err <= 1e-5, f"{impl} {what}: scaled max error {err:.3g}"
    # and the scale matters here (the check above is not vacuous)
    default = landmark_attention_reference(q, k, v, block_size=L)
    assert np.max(np.abs(np.asarray(default) - np.asarray(want[0]))) > 1e-2


# --------------------------------------------------------------------------- Hadamard bf16
@pytest.mark.parametrize("n", [8, 256, 2048])
def test_hadamard_bf16_is_accumulated_in_float32(n):
    """bf16 in: the dots and butterflies run in float32 and only the output is rounded (the
    kernel doc), so every output is within one bf16 ulp of the float32 reference rounded to
    bf16 (the float32 sum of +-1-weighted bf16 values is exact to ~n 2^-24 relative, far below
    a bf16 ulp 2^-8; two roundings of nearly the same value differ by at most one ulp).
    Accumulating in bf16 (at n = 2048: 16 chunks of 128, 4 butterfly stages) is off by
    several ulps.  Forward and gradient (the same kernel on the cotangent); powers of two
    (for ``m 2^k`` the kernel's part is rounded before the ``H_m`` matmul, documented)."""
    kx, kg = jax.random.split(jax.random.PRNGKey(n))
    x = jax.random.normal(kx, (16, n), jnp.float32).astype(jnp.bfloat16)
    ct = jax.random.normal(kg, (16, n), jnp.float32).astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda x: hadamard_transform(x), x)
    (dx,) = vjp(ct)
    for what, got, a in (("y", y, x), ("dx", dx, ct)):     # H_n symmetric: dx = ct H / sqrt(n)
        want = hadamard_reference(a.astype(jnp.float32))
        want_bf = np.asarray(want.astype(jnp.bfloat16), np.float32)
        ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want_bf), 1e-30))) - 7)  # 8-bit mantissa
        err = np.abs(np.asarray(got, np.float32) - want_bf) / ulp
        assert got.dtype == jnp.bfloat16 and err.max() <= 1.0, f"n={n} {what}: {err.max():.2f} ulp"


# --------------------------------------------------------------------------- fake_quant formulas
def _fake_quant_numpy(x, bits, g, sym, c):
    """The module doc's formulas, one group per row of ``x [rows, g]``, in float64."""
    x = np.asarray(x, np.float64).reshape(-1, g)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        s = c * np.abs(x).max(1, keepdims=True) / qmax
        q = np.clip(np.round(x / s), -qmax - 1, qmax)
        return s * q
    qmax = 2 ** bits - 1
    hi, lo = c * np.maximum(x.max(1, keepdims=True), 0), c * np.minimum(x.min(1, keepdims=True), 0)
    s = (hi - lo) / qmax
    z = np.round(-lo / s)
    q = np.clip(np.round(x / s) + z, 0, qmax)
    return s * (q - z)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_fake_quant_equals_the_documented_formulas(sym, clip):
    """``fake_quant`` (per group of 8, 4 bits, QuaRot's activation / KV clipping ratios) ==
    the doc's formulas in numpy float64: the clipping ratio applied once, the symmetric range
    ``[-2^(b-1), 2^(b-1) - 1]`` (with ``c < 1`` the clipped minimum lands on ``-8``),
    round-to-nearest, the zero point ``round(-c min / s)``.  Tolerance: float32 vs float64
    values agree to ~1e-6 relative except where ``x / s`` is within float32 rounding of a
    half-integer (a one-step flip); those are at most a handful of 768 entries."""
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (12, 64))) * np.arange(1, 65)
    got = np.asarray(fake_quant(jnp.asarray(x), 4, groupsize=8, sym=sym, clip=clip), np.float64)
    want = _fake_quant_numpy(x.astype(np.float32), 4, 8, sym, clip).reshape(x.shape)
    close = np.abs(got - want) <= 1e-5 * np.abs(x).max()
    assert close.mean() > 0.99, f"{(~close).sum()} of {close.size} entries differ"
    if sym and clip < 1:   # the clipped extreme goes to the end of the range: -8 s or 7 s
        g = x.reshape(-1, 8)
        s = clip * np.abs(g).max(1) / 7
        neg = g[np.arange(len(g)), np.abs(g).argmax(1)] < 0
        ext = got.reshape(-1, 8)[np.arange(len(g)), np.abs(g).argmax(1)]
        np.testing.assert_allclose(ext, np.where(neg, -8, 7) * s, rtol=1e-5)
