"""Audit 41 (baseline): GPT / Llama and the shared layers, config and registry."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.layers.rotary import rotary_angles


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_flops_per_token_of_boxed_params_equal_unboxed(name):
    # module.init returns partitioning boxes; their ".value" key must not hide the path
    # ("embed", "embedding"), or an untied model's embedding lookup is counted as a matmul
    c = jf.get_config(name, "tiny")
    m = jf.build(c)
    boxed = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert c.flops_per_token(64, boxed) == c.flops_per_token(64) == \
        c.flops_per_token(64, jf.init_params(m, jax.random.PRNGKey(0)))


def test_integer_rope_theta_above_int32_range():
    # a Python int theta (e.g. `--set rope_theta=5000000000`, valid for the config) overflowed
    # as a jnp int32 inside rotary_angles
    pos = jnp.arange(6, dtype=jnp.int32)[None]
    for got, want in zip(rotary_angles(pos, 8, 5_000_000_000), rotary_angles(pos, 8, 5e9)):
        np.testing.assert_array_equal(got, want)
    c = jf.get_config("llama", "tiny", rope_theta=5_000_000_000)
    m = jf.build(c)
    logits = m.apply({"params": jf.init_params(m, jax.random.PRNGKey(0))}, jnp.zeros((1, 4), jnp.int32))
    assert logits.shape == (1, 4, c.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("args", [(["gpt"],), ("gpt", ["tiny"]), ("gpt", {"tiny": 1})])
def test_unhashable_model_name_or_preset_is_a_value_error(args):
    with pytest.raises(ValueError, match="unknown (model name|preset)"):
        jf.get_config(*args)
