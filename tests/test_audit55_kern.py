"""Audit 55 (kernels fuzzed against their references): regression tests."""
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.landmark_attention import (landmark_attention, landmark_attention_reference,
                                               tpu_vmem_bytes as landmark_vmem)


def _qkv(shape=(1, 4, 2, 8), kv_heads=1, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    kv = shape[:2] + (kv_heads, shape[3])
    return (jax.random.normal(ks[0], shape), jax.random.normal(ks[1], kv),
            jax.random.normal(ks[2], kv))


def test_landmark_block_longer_than_sequence_is_plain_causal_block():
    # block_size > T: no complete block, no landmark -- the same attention as block_size = T + 1.
    # The kernel padded each block to next_pow2(block_size) rows (4096 rows for 4 tokens) and
    # both kernel and oracle raised an OverflowError deep in jit for block_size = 2**40.
    q, k, v = _qkv()
    t = q.shape[1]
    want = landmark_attention_reference(q, k, v, block_size=t + 1)
    for big in (2**12, 2**40):
        got = landmark_attention(q, k, v, block_size=big, interpret=True)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(landmark_attention_reference(q, k, v, block_size=big), want,
                                   rtol=1e-6, atol=1e-7)
    g_big = jax.grad(lambda q: jnp.sum(jnp.sin(landmark_attention(q, k, v, block_size=2**40,
                                                                  interpret=True))))(q)
    g_ref = jax.grad(lambda q: jnp.sum(jnp.sin(landmark_attention_reference(q, k, v,
                                                                            block_size=t + 1))))(q)
    np.testing.assert_allclose(g_big, g_ref, rtol=1e-5, atol=1e-6)
    # the padding follows the sequence, not the (irrelevant) block size
    shp = (1, t, 2, 8)
    assert landmark_vmem(shp, (1, t, 1, 8), jnp.float32, block_size=2**12) == \
        landmark_vmem(shp, (1, t, 1, 8), jnp.float32, block_size=t + 1)
