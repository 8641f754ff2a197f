"""Audit 50 (documentation vs code): regressions for the places where the code did not do what
its docstrings / README say."""
import jax
import jax.numpy as jnp
import pytest

import jaxformers as jf


@pytest.mark.parametrize("model, overrides", [("mamba", {}), ("mamba2", {}), ("hybrid", {"attn_every": None})])
def test_attn_dropout_on_a_model_without_attention_is_an_error_in_training(model, overrides):
    """ModelConfig: training with ``attn_dropout`` that the model cannot apply is a ValueError, not a
    silent no-op; a pure Mamba / Mamba-2 model (or a hybrid without attention layers) trained
    with it silently ignored it.  Evaluation runs; residual dropout still trains."""
    config = jf.get_config(model, "tiny", attn_dropout=0.1, n_layer=1, d_model=32, **overrides)
    assert config.n_attention_layers == 0
    module = jf.build(config)
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = module.init(jax.random.PRNGKey(0), tokens)
    module.apply(variables, tokens)  # no dropout rng: evaluation / generation
    with pytest.raises(ValueError, match=r"attn_dropout=0.1: model .* has no attention layers"):
        module.apply(variables, tokens, rngs={"dropout": jax.random.PRNGKey(1)})
    module = jf.build(config.replace(attn_dropout=0.0, dropout=0.1))
    module.apply(variables, tokens, rngs={"dropout": jax.random.PRNGKey(1)})


def test_attn_dropout_still_trains_a_hybrid_with_attention_layers():
    """The hybrid's attention layers apply attention dropout; its SSM layers have none to drop."""
    config = jf.get_config("hybrid", "tiny", attn_dropout=0.5, n_layer=2, d_model=32, attn_layers=(1,))
    module = jf.build(config)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 8), 0, config.vocab_size)
    variables = module.init(jax.random.PRNGKey(0), tokens)
    a = module.apply(variables, tokens, rngs={"dropout": jax.random.PRNGKey(1)})
    b = module.apply(variables, tokens, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not jnp.allclose(a, b)
