"""Audit 55 (configs, registry, presets, shared blocks, logical-axis sharding): regression tests."""
import jax
import pytest

import jaxformers as jf
from jaxformers import registry
from jaxformers.config import TransformerConfig
from jaxformers.models import Transformer


@pytest.mark.parametrize("config_cls, module_cls, presets, match", [
    (TransformerConfig, Transformer, {"tiny": dict(d_model=64, n_heads=2)}, r"preset 'tiny'.*\['n_heads'\]"),
    (TransformerConfig, Transformer, {"tiny": None}, "dicts of config fields"),
    (TransformerConfig, Transformer, "tiny", "presets must be a dict"),
    (dict, Transformer, {"tiny": {}}, "ModelConfig subclass"),
    (TransformerConfig, None, {"tiny": {}}, "module_cls"),
])
def test_register_checks_the_spec_before_registering(config_cls, module_cls, presets, match):
    """``register`` took a preset with a misspelt field (or a non-dict preset, a config class that is
    not a ModelConfig): the name was registered and the first ``get_config`` raised a ``TypeError``
    from the dataclass (``unexpected keyword argument 'n_heads'``).  Now a ``ValueError`` naming the
    model and preset, and nothing is registered."""
    with pytest.raises(ValueError, match=match):
        registry.register("audit55-bad", config_cls, module_cls, presets)
    assert "audit55-bad" not in jf.list_models()


@pytest.mark.parametrize("name, field", [("gpt", "norm_eps"), ("llama", "init_std"), ("llama", "rope_theta"),
                                         ("mamba", "dt_min"), ("mamba", "dt_scale")])
def test_an_int_beyond_float_range_is_a_value_error(name, field):
    """``_finite`` called ``math.isfinite(10**400)``, which raises ``OverflowError`` (int too large to
    convert to float) instead of the field's ``ValueError``."""
    with pytest.raises(ValueError, match=field):
        jf.get_config(name, "tiny", **{field: 10**400})


class _ShortConfigs(Transformer):
    def layer_configs(self):  # one config for three block classes: a broken hook
        return [self.config]


@pytest.mark.parametrize("scan", [False, True])
def test_layer_hooks_of_different_lengths_are_a_value_error(scan):
    """``make_blocks`` zipped ``layer_classes()`` with ``layer_configs()``: a hook giving fewer configs
    than block classes built a model with fewer layers than ``n_layer`` without a word (3 layers asked
    for, ``blocks_0`` only); ``init_layer_caches`` did the same.  Now a ``ValueError`` naming both."""
    registry.register("audit55-short", TransformerConfig, _ShortConfigs,
                      {"tiny": dict(d_model=32, n_layer=3, n_head=2, vocab_size=16)})
    try:
        module = jf.build(jf.get_config("audit55-short", scan_layers=scan))
        with pytest.raises(ValueError, match=r"layer_classes\(\) gives 3 layers but layer_configs\(\) 1"):
            jf.init_params(module, jax.random.PRNGKey(0))
        with pytest.raises(ValueError, match=r"layer_configs\(\) 1"):
            module.init_layer_caches(1, 8)
    finally:
        registry.unregister("audit55-short")
