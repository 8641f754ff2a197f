"""Audit 50 (documentation vs code): regressions for the places where the code did not do what
its docstrings / README say (the attn_dropout refusal of models without attention:
tests/test_train_ux.py)."""
import jax
import jax.numpy as jnp

import jaxformers as jf


def test_attn_dropout_still_trains_a_hybrid_with_attention_layers():
    """The hybrid's attention layers apply attention dropout; its SSM layers have none to drop."""
    config = jf.get_config("hybrid", "tiny", attn_dropout=0.5, n_layer=2, d_model=32, attn_layers=(1,))
    module = jf.build(config)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 8), 0, config.vocab_size)
    variables = module.init(jax.random.PRNGKey(0), tokens)
    a = module.apply(variables, tokens, rngs={"dropout": jax.random.PRNGKey(1)})
    b = module.apply(variables, tokens, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not jnp.allclose(a, b)
