"""Audit 50 (numerics): valid but extreme inputs that gave NaN / inf or a wrong number silently."""
import jax
import jax.numpy as jnp
import numpy as np


def test_kl_per_token_teacher_zero_probability_class_is_not_nan():
    """A ``-inf`` teacher logit (a class the teacher rules out, e.g. a masked vocabulary entry)
    made ``exp(t) * (t - s) = 0 * -inf = NaN``: the whole token's KL (and the loss) was NaN.
    ``0 log 0 = 0``: the KL equals the one over the other classes, its gradient finite."""
    from jaxformers.distill import kl_per_token
    s = jnp.asarray([[[0.3, 1.0, -2.0], [0.5, -1.0, 2.0]]], jnp.float32)
    t = jnp.asarray([[[0.0, 1.0, -jnp.inf], [1.0, -jnp.inf, 0.0]]], jnp.float32)
    for tau in (1.0, 2.0):
        got = np.asarray(kl_per_token(t, s, tau))
        pt = np.asarray(jax.nn.softmax(t / tau), np.float64)
        ls = np.asarray(jax.nn.log_softmax(s / tau), np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            want = tau ** 2 * np.sum(np.where(pt > 0, pt * (np.log(pt) - ls), 0.0), axis=-1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        g = jax.grad(lambda s: kl_per_token(t, s, tau).sum())(s)
        assert np.isfinite(np.asarray(g)).all()
        # student gradient: tau * (softmax(s / tau) - softmax(t / tau))
        want_g = tau * (np.asarray(jax.nn.softmax(s / tau)) - pt)
        np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-5, atol=1e-6)
    # the student ruling out a class the teacher allows is an infinite KL, not NaN
    assert np.isposinf(np.asarray(kl_per_token(s, t)[0, 0]))


def test_gated_rmsnorm_checks_eps_like_rmsnorm():
    """Mamba-2's ``GatedRMSNorm`` took any ``eps``: with ``eps=0`` an all-zero group of
    ``y * silu(z)`` gave ``0 * rsqrt(0) = NaN`` silently.  It now applies RMSNorm's rule (a
    finite number > 0, else ``ValueError``); with a valid eps a zero group is 0, gradient finite."""
    import pytest
    from jaxformers.layers.mamba2 import GatedRMSNorm
    y, z = jnp.zeros((1, 2, 8)), jnp.ones((1, 2, 8))
    for eps in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            GatedRMSNorm(4, eps).init(jax.random.PRNGKey(0), y, z)
    norm = GatedRMSNorm(4, 1e-5)
    params = norm.init(jax.random.PRNGKey(0), y, z)
    assert np.array_equal(np.asarray(norm.apply(params, y, z)), np.zeros((1, 2, 8)))
    g = jax.grad(lambda y: norm.apply(params, y, z).sum())(y)
    assert np.isfinite(np.asarray(g)).all()
