"""Audit 41, decoding: regression tests of the KV-cache / generate audit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.registry import build, get_config


@pytest.fixture(scope="module")
def gpt():
    module = build(get_config("gpt", "tiny", d_model=32, n_head=2, n_layer=1))
    return module, {"params": jf.init_params(module, jax.random.PRNGKey(0))}


@pytest.mark.parametrize("dtype", [jnp.int8, "int8", "bf16", jnp.bool_, 3])
def test_init_cache_refuses_a_dtype_that_is_not_a_float(gpt, dtype):
    """Before: an integer dtype made an integer cache that silently truncated every key / value
    (logits off by ~0.1, no error); a misspelt name was a bare KeyError."""
    module, _ = gpt
    with pytest.raises(ValueError, match=r"dtype must be None \(the config's dtype\), one of \['float32'"):
        jf.init_cache(module, 1, 8, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", jnp.bfloat16, np.dtype("float16"), None])
def test_init_cache_float_dtypes(gpt, dtype):
    module, params = gpt
    tok = jax.random.randint(jax.random.PRNGKey(1), (1, 6), 0, 200)
    logits, cache = module.apply(params, tok, cache=jf.init_cache(module, 1, 8, dtype))
    want = jnp.float32 if dtype is None else jnp.dtype(dtype)
    assert cache["layers"][0]["k"].dtype == want
    np.testing.assert_allclose(logits, module.apply(params, tok), atol=2e-3)
