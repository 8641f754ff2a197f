"""Audit 41 regressions: SCFA models (hash_sparse / qk_sparse)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf

SMALL = dict(vocab_size=64, d_model=32, n_head=4, n_kv_head=2, n_layer=2, max_seq_len=32,
             sparse_impl="reference")
OWN = {"hash_sparse": dict(n_buckets=4), "qk_sparse": dict(qk_drop_rate=0.5)}  # each kind's field


@pytest.mark.parametrize("name", ["hash_sparse", "qk_sparse"])
def test_decoding_with_a_dropout_rng_uses_the_fixed_draw(name):
    """Decoding uses the fixed evaluation draw (module docstring) even when a ``dropout`` rng is
    given: a per-step draw re-hashed / re-masked the cached keys with new R / masks at every step,
    so prefill + decode matched no forward at all."""
    cfg = jf.get_config(name, "tiny", **SMALL, **OWN[name])
    m = jf.build(cfg)
    tok = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 64)
    p = jax.tree_util.tree_map(lambda x: 3 * x if x.ndim > 1 else x,
                               jf.init_params(m, jax.random.PRNGKey(0), tok))
    full = m.apply({"params": p}, tok)
    step = jax.jit(lambda c, t, r: m.apply({"params": p}, t, cache=c, rngs={"dropout": r}))
    logits, cache = step(jf.decoding.init_cache(m, 2, 12), tok[:, :4], jax.random.PRNGKey(7))
    outs = [logits]
    for i in range(4, 12):
        logits, cache = step(cache, tok[:, i:i + 1], jax.random.PRNGKey(100 + i))
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)
