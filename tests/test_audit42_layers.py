"""Audit 42 (layers / config / registry): regression tests and numerical invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.layers import Attention, LayerNorm, RMSNorm, apply_rotary, rotary_angles
from jaxformers.layers.common import dtype_of
from jaxformers.layers.linear import Linear
from jaxformers.registry import get_config


def test_derived_odd_head_dim_names_d_model_and_n_head():
    with pytest.raises(ValueError, match=r"d_model // n_head = 12 // 4"):
        get_config("gpt", d_model=12, n_head=4)
    with pytest.raises(ValueError, match=r"^head_dim=7 must be even"):
        get_config("gpt", head_dim=7)


def test_dtype_of_unknown_name_is_a_value_error():
    assert dtype_of("bfloat16") == jnp.bfloat16 and dtype_of(jnp.float16) == jnp.float16
    with pytest.raises(ValueError, match=r"dtype='bf16'.*float32"):
        dtype_of("bf16")
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="dtype='bf16'"):
        RMSNorm(dtype="bf16").init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("in_axes", [0, 4, -1])
def test_linear_refuses_in_axes_outside_x(in_axes):
    # in_axes=0 used to contract every axis of x (batch included) into a [5] output
    x = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="in_axes"):
        Linear(5, ("a", "b", "c", "d"), in_axes=in_axes).init(jax.random.PRNGKey(0), x)


def test_rotary_matches_reference_and_is_identity_at_zero():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 2, 8))
    cos, sin = rotary_angles(jnp.zeros((1, 3), jnp.int32), 8)
    np.testing.assert_array_equal(apply_rotary(x, cos, sin), x)
    pos = [0, 1, 5]
    cos, sin = rotary_angles(jnp.array([pos]), 8, 10000.0)
    xn, ref = np.asarray(x), np.zeros((1, 3, 2, 8), np.float32)
    for t, p in enumerate(pos):
        for i in range(4):
            a = p * 10000.0 ** (-2 * i / 8)
            ref[0, t, :, i] = xn[0, t, :, i] * np.cos(a) - xn[0, t, :, i + 4] * np.sin(a)
            ref[0, t, :, i + 4] = xn[0, t, :, i + 4] * np.cos(a) + xn[0, t, :, i] * np.sin(a)
    np.testing.assert_allclose(apply_rotary(x, cos, sin), ref, atol=1e-6)


def test_norms_match_their_formulas():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    xn, scale = np.asarray(x), np.arange(8.0) + 1
    m = RMSNorm(eps=1e-6)
    p = jax.tree.map(lambda a: a * 0 + scale, m.init(jax.random.PRNGKey(0), x))
    ref = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(m.apply(p, x), ref, rtol=1e-5, atol=1e-5)
    m = LayerNorm(eps=1e-5)
    ref = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(m.apply(m.init(jax.random.PRNGKey(0), x), x), ref, rtol=1e-5, atol=1e-5)


def _reference_attention(x, p, c, pos):
    q, k, v = (np.einsum("btd,dhk->bthk", x, p[n]["kernel"]) for n in "qkv")
    cos, sin = rotary_angles(pos, c.dim_head, c.rope_theta)
    q, k = (np.asarray(apply_rotary(jnp.asarray(a), cos, sin)) for a in (q, k))
    g = c.n_head // c.kv_heads  # query head h reads kv head h // g (HF repeat_kv)
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c.dim_head)
    t = x.shape[1]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bqhd,hdD->bqD", np.einsum("bhqk,bkhd->bqhd", w, v), p["o"]["kernel"])


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2}, {"n_kv_head": 1},
                                       {"d_model": 24, "head_dim": 10, "n_kv_head": 2}])
def test_attention_layer_matches_reference_mha_and_gqa(overrides):
    c = get_config("gpt", **{"d_model": 32, "n_head": 4, **overrides})
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, c.d_model))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    m = Attention(c)
    p = m.init(jax.random.PRNGKey(0), x, pos)["params"]
    p = jax.tree.map(lambda a: a * 20, jax.tree.map(lambda a: getattr(a, "value", a), p,
                                                    is_leaf=lambda a: hasattr(a, "value")))
    y, _ = m.apply({"params": p}, x, pos)
    ref = _reference_attention(np.asarray(x), jax.tree.map(np.asarray, p), c, pos)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
