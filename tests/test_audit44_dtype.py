"""Audit 44 (dtype policy): the quantizers' narrow-float / integer inputs, and the in-scope
kernels' cotangent dtypes with a float32 side output (landmark ``lse``) under bf16 inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.quant import gptq_hinv, int8_linear, int_matmul, quantize_rows_int8


def _hessian():
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    return x.T @ x


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gptq_hinv_takes_a_bf16_or_f16_hessian_in_float32(dtype):
    """A bf16 / f16 Hessian was an XLA ``NotImplementedError: Unsupported dtype bfloat16`` from
    the Cholesky; it is now factored in float32 (close to the float32 Hessian's factor)."""
    h = _hessian()
    want = np.asarray(gptq_hinv(jnp.asarray(h))[0])
    u, dead = gptq_hinv(jnp.asarray(h, dtype))
    assert u.dtype == jnp.float32 and not bool(dead.any())
    assert np.abs(np.asarray(u) - want).max() < 1e-2 * np.abs(want).max()


def test_int_matmul_refuses_integer_activations():
    """An int32 ``x`` used to come back as int32: the float result silently truncated."""
    w = jnp.asarray(np.random.default_rng(1).integers(-127, 128, (8, 4)), jnp.int8)
    x = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    with pytest.raises(ValueError, match="x must be a floating-point"):
        int_matmul(x, w, jnp.ones(4))
    with pytest.raises(ValueError, match="x must be a floating-point"):
        int8_linear(x, w, jnp.ones(4))
    with pytest.raises(ValueError, match="x must be a floating-point"):
        quantize_rows_int8(x)


def test_int_matmul_refuses_float_weights():
    """``w_int8`` float weights were multiplied as if they were integer codes (no error)."""
    x = jnp.ones((2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="w_int8 must be an int8"):
        int_matmul(x, jnp.ones((8, 4), jnp.float32), jnp.ones(4))
    y = int_matmul(x, jnp.ones((8, 4), jnp.int8), jnp.ones(4))  # the documented call still works
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 4)
    np.testing.assert_allclose(np.asarray(y, np.float32), 8.0, rtol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_landmark_bf16_lse_output_and_cotangents(dtype):
    """bf16 / f16 q, k, v: ``o`` in the input dtype, ``lse`` float32 (documented), and the
    gradients through both outputs exactly the inputs' dtype and shape, near float32's."""
    from pallas_kernels.landmark_attention import landmark_attention, landmark_attention_reference
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in
               ((1, 16, 2, 8), (1, 16, 1, 8), (1, 16, 1, 8)))

    def loss(fn):
        def f(q, k, v):
            o, lse = fn(q, k, v)
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(jnp.sin(lse))
        return f
    kern = lambda q, k, v: landmark_attention(q, k, v, block_size=4, interpret=True, block_q=16,
                                              return_lse=True)
    ref = lambda q, k, v: landmark_attention_reference(q, k, v, block_size=4, return_lse=True)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    args = [x.astype(dtype) for x in (q, k, v)]
    o, lse = kern(*args)
    assert o.dtype == dtype and lse.dtype == jnp.float32
    got = jax.grad(loss(kern), argnums=(0, 1, 2))(*args)
    for g, a, w in zip(got, args, want):
        assert g.dtype == a.dtype and g.shape == a.shape
        assert np.abs(np.asarray(g, np.float32) - np.asarray(w)).max() < 3e-2 * np.abs(np.asarray(w)).max()
