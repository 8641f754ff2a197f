"""Regression tests from the QuaRot (jaxformers.quant) / layer-parallel (jaxformers.transforms)
audit 40."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.quant import QuantSpec, collect_stats, quant_config
from jaxformers.transforms import delete_layers, pair_layers


def _llama(**over):
    from jaxformers.utils import abstract_params
    cfg = jf.get_config("llama", "tiny", **{"d_model": 32, "n_head": 4, "n_kv_head": 2, "d_ff": 64,
                                            "n_layer": 2, "max_seq_len": 32, "vocab_size": 64, **over})
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), jnp.float32),
                                    abstract_params(jf.build(cfg)))
    return cfg, params


def test_collect_stats_checks_its_config_and_tokens():
    """A llama config was a bare ``KeyError: 'quant_stats'``, no tokens an ``AttributeError``,
    and out-of-vocabulary ids silently gave NaN statistics (quantize's calibration is checked,
    collect_stats' tokens were not)."""
    cfg, params = _llama()
    qcfg = quant_config(cfg, QuantSpec(rotate=False))
    tokens = np.random.default_rng(1).integers(0, 64, (3, 8))
    with pytest.raises(ValueError, match="config must be a 'quarot' config"):
        collect_stats(cfg, params, tokens)
    with pytest.raises(ValueError, match=r"tokens must be int tokens \[N, T\]"):
        collect_stats(qcfg, params, np.zeros((0, 8), np.int32))
    with pytest.raises(ValueError, match=r"tokens must be ids in \[0, vocab_size=64\), got ids from \d+ to 70"):
        collect_stats(qcfg, params, np.concatenate([tokens, [[70] * 8]]))
    stats = collect_stats(qcfg, params, tokens, batch=2)
    st = stats["blocks_1"]["down_in"]
    assert st["count"] == 24 and np.isfinite(st["xtx"]).all() and st["xtx"].shape == (64, 64)


def test_layer_transforms_take_frozen_init_variables():
    """``{"params": ...}`` as a FrozenDict (flax's frozen ``init`` variables, which
    ``quantize`` accepts) was reported as params missing every block."""
    cfg, params = _llama(n_layer=3)
    frozen = flax.core.freeze({"params": params})
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 64)
    for fn in (lambda p: pair_layers(cfg, p, 0, 2), lambda p: pair_layers(cfg, p, 1, 3, fused=False),
               lambda p: delete_layers(cfg, p, [1])):
        want_cfg, want = fn(params)
        got_cfg, got = fn(frozen)
        assert got_cfg == want_cfg
        np.testing.assert_array_equal(jf.build(got_cfg).apply({"params": got}, tokens),
                                      jf.build(want_cfg).apply({"params": want}, tokens))
