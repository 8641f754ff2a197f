"""The Pallas kernels under ``jax_enable_x64`` (interpret mode): the same outputs and gradients
as without it.  With x64 a bare Python int in an index map is int64 while grid indices are
int32, and ``lax.div`` of the two raised a ``TypeError`` in every GQA / grouped kernel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.hadamard import hadamard_transform
from pallas_kernels.landmark_attention import landmark_attention
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.sparse_attention import hash_attention
from pallas_kernels.ssd import ssd


def _r(rng, *shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape, dtype=np.float32))


def _cases():
    rng = np.random.default_rng(0)
    q, k, v = _r(rng, 1, 40, 4, 16), _r(rng, 1, 40, 2, 16), _r(rng, 1, 40, 2, 16)   # GQA 4:2
    buckets = jnp.asarray(rng.integers(0, 3, (1, 40, 4)), jnp.int32)
    kb = jnp.asarray(rng.integers(0, 3, (1, 40, 2)), jnp.int32)
    x, dt = _r(rng, 1, 24, 8), _r(rng, 1, 24, 8, scale=0.5)
    a_s, bs, cs = -jnp.exp(_r(rng, 8, 4, scale=0.5)), _r(rng, 1, 24, 2, 4), _r(rng, 1, 24, 2, 4)
    xh, dth = _r(rng, 1, 24, 4, 8), _r(rng, 1, 24, 4, scale=0.5)
    a_h, bh, ch = -jnp.exp(_r(rng, 4, scale=0.5)), _r(rng, 1, 24, 2, 8), _r(rng, 1, 24, 2, 8)
    return {
        "flash": (lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=True), (q, k, v)),
        "hash": (lambda q, k, v: hash_attention(q, k, v, buckets, kb, interpret=True, block_q=16,
                                                block_k=16), (q, k, v)),
        "selective_scan": (lambda x, dt, B, C: selective_scan(x, dt, a_s, B, C, dt_softplus=True,
                                                              chunk_size=8, interpret=True),
                           (x, dt, bs, cs)),
        "ssd": (lambda x, dt, B, C: ssd(x, dt, a_h, B, C, dt_softplus=True, chunk_size=16, interpret=True),
                (xh, dth, bh, ch)),
        "hadamard": (lambda x: hadamard_transform(x, interpret=True), (_r(rng, 6, 48),)),
        "landmark": (lambda q, k, v: landmark_attention(q, k, v, block_size=8, interpret=True, block_q=16),
                     (q, k, v)),
    }


@pytest.mark.parametrize("name", ["flash", "hash", "selective_scan", "ssd", "hadamard", "landmark"])
def test_kernels_under_x64_equal_the_default(name):
    fn, args = _cases()[name]

    def run():
        out = fn(*args)
        grads = jax.grad(lambda *a: sum(jnp.sum(o.astype(jnp.float32) ** 2)
                                        for o in jax.tree_util.tree_leaves(fn(*a))),
                         argnums=tuple(range(len(args))))(*args)
        return out, grads
    want = run()
    with jax.enable_x64(True):
        got = run()
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
