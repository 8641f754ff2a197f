"""Landmark attention (grouped softmax) vs the float32 reference, and the reference vs the
definition written as loops.

Interpret mode on the CPU (the GPU-layout kernels; the TPU variant is checked in
``tests/test_landmark_attention_lowering.py``).  Shapes are small but awkward: T not a multiple
of the block or of the query tile, block sizes that are not powers of two, several query
tiles, GQA, batch 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.landmark_attention import landmark_attention, landmark_attention_reference

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(seed, b, t, hq, hkv, d, dtype=jnp.float32, scale=1.0):
    rng = np.random.default_rng(seed)
    mk = lambda s: jnp.asarray(scale * rng.standard_normal(s, np.float32)).astype(dtype)  # noqa: E731
    return mk((b, t, hq, d)), mk((b, t, hkv, d)), mk((b, t, hkv, d)), mk((b, t, hq, d))


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


# (B, T, Hq, Hkv, D, block_size, block_q, dtype, input scale)
CASES = {
    # GQA 2:1, L=5 (padded to 16 rows), T=37: 7 full blocks + a partial one, 4 query tiles
    "gqa_L5_partial_block": (1, 37, 4, 2, 8, 5, 32, jnp.float32, 1.0),
    # B=2, L=16 (no padding), T a multiple of L, large logits (scale 3: peaked softmaxes)
    "b2_L16_peaked": (2, 48, 2, 2, 16, 16, 16, jnp.float32, 3.0),
    # bf16, MQA, L=20 padded to 32, D=24 padded to 32
    "bf16_mqa_L20": (1, 70, 2, 1, 24, 20, 64, jnp.bfloat16, 1.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case):
    b, t, hq, hkv, d, L, bq, dtype, scale = CASES[case]
    q, k, v, ct = _inputs(0, b, t, hq, hkv, d, dtype, scale)
    got = _fwd_bwd(landmark_attention, q, k, v, ct, block_size=L, block_q=bq)
    want = _fwd_bwd(landmark_attention_reference, q.astype(jnp.float32), k.astype(jnp.float32),
                    v.astype(jnp.float32), ct.astype(jnp.float32), block_size=L)
    for what, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, TOL[dtype], f"{case} {what}")


@pytest.mark.parametrize("case", ["gqa_L5_partial_block", "b2_L16_peaked"])
def test_return_lse_and_its_gradient(case):
    """``return_lse``: the outer normaliser equals the reference's, and a loss through both ``o``
    and ``lse`` differentiates like the reference (the lse cotangent enters the backward)."""
    b, t, hq, hkv, d, L, bq, dtype, scale = CASES[case]
    q, k, v, ct = _inputs(1, b, t, hq, hkv, d, dtype, scale)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((b, hq, t), np.float32))

    def loss(fn, **kw):
        def f(q, k, v):
            o, lse = fn(q, k, v, block_size=L, return_lse=True, **kw)
            return jnp.sum(o * ct) + jnp.sum(lse * w), lse
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True),
                       compiler_options=FAST_COMPILE)(q, k, v)

    (val, lse), grads = loss(landmark_attention, block_q=bq)
    (val_ref, lse_ref), grads_ref = loss(landmark_attention_reference)
    assert lse.shape == (b, hq, t) and lse.dtype == jnp.float32
    _assert_close(lse, lse_ref, 1e-5, f"{case} lse")
    _assert_close(val, val_ref, 1e-5, f"{case} loss")
    for what, g, r in zip(("dq", "dk", "dv"), grads, grads_ref):
        _assert_close(g, r, 1e-5, f"{case} {what} (o and lse)")


def _literal(q, k, v, L):
    """The issue's definition, one query at a time in float64 numpy (one head)."""
    t, d = q.shape
    out = np.zeros_like(q)
    for i in range(t):
        b = i // L
        s = q[i] @ k.T / np.sqrt(d)
        logits, values = [], []
        for c in range(b):  # earlier blocks: landmark logit, inner-softmax-weighted value
            keys = [j for j in range(c * L, c * L + L - 1)]
            w = np.exp(s[keys] - s[keys].max())
            w /= w.sum()
            logits.append(s[c * L + L - 1])
            values.append(w @ v[keys])
        for j in range(b * L, i + 1):  # current block, landmark keys excluded
            if j % L != L - 1:
                logits.append(s[j])
                values.append(v[j])
        p = np.exp(np.array(logits) - max(logits))
        out[i] = (p / p.sum()) @ np.array(values)
    return out


def test_reference_is_the_definition():
    q, k, v, _ = (np.asarray(x, np.float64) for x in _inputs(1, 1, 23, 1, 1, 4))
    want = _literal(q[0, :, 0], k[0, :, 0], v[0, :, 0], 4)
    got = landmark_attention_reference(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                       jnp.asarray(v, jnp.float32), block_size=4)
    np.testing.assert_allclose(np.asarray(got)[0, :, 0], want, rtol=1e-5, atol=1e-5)


def test_landmark_values_carry_no_mass():
    """Changing the landmark tokens' values changes nothing; changing their keys does."""
    L = 4
    q, k, v, _ = _inputs(2, 1, 16, 1, 1, 8)
    lm = (jnp.arange(16) % L == L - 1)[None, :, None, None]
    base = landmark_attention(q, k, v, block_size=L, block_q=16)
    v2 = jnp.where(lm, 100.0, v)
    np.testing.assert_allclose(landmark_attention(q, k, v2, block_size=L, block_q=16), base,
                               atol=1e-6)
    k2 = jnp.where(lm, k + 1.0, k)
    assert np.max(np.abs(landmark_attention(q, k2, v, block_size=L, block_q=16) - base)) > 1e-3


@pytest.mark.parametrize("kw, match", [
    (dict(block_size=1), "block_size"),
    (dict(block_size=4, block_q=24), "block_q"),
])
def test_bad_arguments(kw, match):
    q = jnp.zeros((1, 8, 1, 8))
    with pytest.raises(ValueError, match=match):
        landmark_attention(q, q, q, **kw)
    with pytest.raises(ValueError, match="rank 4"):
        landmark_attention(q[0], q, q, block_size=4)


@pytest.mark.parametrize("shapes, kw, match", [
    ((1, 1), dict(block_size=1), "block_size"),               # used to return NaN
    ((1, 1), dict(block_size=0), "block_size"),               # used to divide by zero
    ((1, 1), dict(block_size=4.0), "block_size"),
    ((1, 1), dict(block_size=True), "block_size"),
    ((3, 2), dict(block_size=4), r"Hq % Hkv"),                # used to fail inside einsum
])
def test_reference_bad_arguments(shapes, kw, match):
    hq, hkv = shapes
    q, k = jnp.zeros((1, 8, hq, 8)), jnp.zeros((1, 8, hkv, 8))
    with pytest.raises(ValueError, match=match):
        landmark_attention_reference(q, k, k, **kw)
    with pytest.raises(ValueError, match="rank 4"):
        landmark_attention_reference(q[0], k, k, block_size=4)
