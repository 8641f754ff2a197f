"""``generate``'s rng: an int seed is that seed's key; anything else but a PRNG key is a ValueError
naming rng (an int was a TypeError from inside jax.random.split)."""
import jax
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.registry import build, get_config


@pytest.fixture(scope="module")
def gpt():
    module = build(get_config("gpt", "tiny", d_model=32, n_head=2, n_layer=1))
    return module, {"params": jf.init_params(module, jax.random.PRNGKey(0))}


def _gen(gpt, rng):
    module, params = gpt
    return jf.generate(module, params, np.ones((2, 3), np.int32), 4, rng=rng)


def test_an_int_seed_is_its_key_and_none_is_seed_0(gpt):
    np.testing.assert_array_equal(_gen(gpt, 7), _gen(gpt, jax.random.PRNGKey(7)))
    np.testing.assert_array_equal(_gen(gpt, np.int64(7)), _gen(gpt, jax.random.PRNGKey(7)))
    np.testing.assert_array_equal(_gen(gpt, None), _gen(gpt, jax.random.PRNGKey(0)))
    assert _gen(gpt, jax.random.key(3)).shape == (2, 7)  # a typed key


@pytest.mark.parametrize("rng", [2**63, 1.5, "0", jax.random.split(jax.random.PRNGKey(0), 2),
                                 np.zeros(2, np.int32), jax.random.split(jax.random.key(0), 2)])
def test_what_is_not_a_seed_or_one_key_is_refused_by_name(gpt, rng):
    with pytest.raises(ValueError, match="rng "):
        _gen(gpt, rng)
