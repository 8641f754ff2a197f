"""Audit 41 (rotation): QuaRot's offline rotation refuses configs it cannot rotate, and the
rotated model (non-power-of-two head dim, GQA, tied embeddings) decodes as its full forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.quant import QuantSpec, quantize, rotate_params
from jaxformers.quant.rotation import Rotation

from test_quarot import _apply, _model

TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 256)


def test_rotation_refuses_a_rotated_quarot_config_and_other_families():
    """A rotated quarot config was rotated a second time without a word (logits then off by
    ~190%), other model families failed with a KeyError deep in the rotation."""
    cfg, params = _model()
    rcfg, rparams = quantize(cfg, params, QuantSpec(rotate=True))
    with pytest.raises(ValueError, match="already quantized quarot model"):
        rotate_params(rcfg, rparams)
    for name in ("hybrid", "layer_parallel", "gpt"):
        with pytest.raises(ValueError, match=f"'llama'.*model='{name}'"):
            Rotation(jf.get_config(name, "tiny", norm="rmsnorm", mlp="swiglu"))
    # an unrotated float quarot config is still accepted
    assert Rotation(jf.get_config("quarot", "tiny")).config.model == "quarot"


def test_rotated_non_power_of_two_head_dim_decodes_as_the_full_forward():
    """Head dim 20 (= H_20), GQA 4/1, d_ff 240 (= H_60 (x) H_4), tied embeddings: the rotated
    float32 model equals the original, and KV-4-bit decoding equals its full forward."""
    from jaxformers.decoding import init_cache
    cfg, params = _model(d_model=80, n_head=4, n_kv_head=1, head_dim=20, d_ff=240,
                         tie_embeddings=True, n_layer=1)
    ref = _apply(cfg, params, TOKENS)
    qcfg, qparams = quantize(cfg, params, QuantSpec(rotate=True, seed=2))
    np.testing.assert_allclose(_apply(qcfg, qparams, TOKENS), ref, atol=1e-5 * float(jnp.abs(ref).max()))
    kcfg = qcfg.replace(kv_bits=4)
    full = _apply(kcfg, qparams, TOKENS)
    model = jf.build(kcfg)
    fn = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    logits, cache = fn(qparams, TOKENS[:, :6], init_cache(model, 2, 10))
    outs = [logits]
    for i in range(6, 10):
        logits, cache = fn(qparams, TOKENS[:, i:i + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5 * float(jnp.abs(full).max()))


def test_rotate_params_takes_boxed_params_and_variables():
    """``module.init``'s boxed params (or its variables) failed with a TypeError deep in the
    rotation; ``quantize`` takes both."""
    import flax.linen as nn
    cfg = jf.get_config("llama", "tiny", n_layer=1)
    variables = jf.build(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    want, _ = rotate_params(cfg, nn.unbox(variables["params"]))
    for arg in (variables["params"], variables):
        got, _ = rotate_params(cfg, arg)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(a, b)
