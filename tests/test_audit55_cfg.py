"""Audit 55 (configs, registry, presets, shared blocks, logical-axis sharding): regression tests."""
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
