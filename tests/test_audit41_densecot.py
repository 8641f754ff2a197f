"""Audit 41 (DenseFormer / CoTFormer): regression tests."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf

SMALL = dict(d_model=32, n_head=2, max_seq_len=32)


@pytest.mark.parametrize("name", ["cotformer", "but"])
def test_repeat_decoding_with_explicit_positions_equals_the_full_forward(name):
    """Decoding masks by cache slot (as the baseline's ``q_offset``), not by the caller's
    ``positions``: with positions shifted by a constant the queries used to see the unwritten
    (zero) slots of earlier repeats' caches."""
    cfg = jf.get_config(name, "tiny", n_repeat=3, **SMALL)
    m = jf.build(cfg)
    p = {"params": jf.init_params(m, jax.random.PRNGKey(0))}
    tok = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, 256)
    pos = jnp.broadcast_to(jnp.arange(7) + 5, (2, 7))
    full = m.apply(p, tok, positions=pos)
    np.testing.assert_allclose(full, m.apply(p, tok), atol=1e-5)  # RoPE is relative
    step = jax.jit(lambda p, t, q, c: m.apply(p, t, positions=q, cache=c))
    cache, outs = jf.init_cache(m, 2, 12), []
    for a, b in [(0, 3), (3, 4), (4, 7)]:
        logits, cache = step(p, tok[:, a:b], pos[:, a:b], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=1e-5)


def test_repeats_are_causal_by_token_index_whatever_the_positions():
    """Repeats >= 2 masked by ``positions`` let a token see a later token of the same position
    (explicit non-increasing positions); repeat 1, the baseline and the authors' mask are causal
    by token index.  The full forward now also equals decoding with the same positions."""
    cfg = jf.get_config("cotformer", "tiny", n_repeat=2, **SMALL)
    m = jf.build(cfg)
    p = {"params": jf.init_params(m, jax.random.PRNGKey(0))}
    tok = jax.random.randint(jax.random.PRNGKey(1), (1, 6), 0, 256)
    pos = jnp.asarray([[0, 0, 1, 2, 3, 3]])
    out = m.apply(p, tok, positions=pos)
    changed = m.apply(p, tok.at[0, 1].set((tok[0, 1] + 7) % 256), positions=pos)
    np.testing.assert_array_equal(np.asarray(changed[0, 0]), np.asarray(out[0, 0]))
    cache, outs = jf.init_cache(m, 1, 8), []
    for i in range(6):
        logits, cache = m.apply(p, tok[:, i:i + 1], positions=pos[:, i:i + 1], cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), out, atol=2e-5, rtol=1e-5)
