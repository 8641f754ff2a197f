"""Stop 46: a config must be of exactly the class registered for its ``model`` (registry.check_config_class)."""
import dataclasses

import pytest

import jaxformers as jf
from jaxformers.config import TransformerConfig
from jaxformers.models.landmark import LandmarkConfig
from jaxformers.models.mamba import HybridConfig, MambaConfig
from jaxformers.models.scfa import SCFAConfig
from jaxformers.quant.model import QuaRotConfig
from jaxformers.transforms.layer_parallel import LayerParallelConfig


@pytest.mark.parametrize("make", [
    lambda: LandmarkConfig(model="gpt"),          # was a plain GPT at build(), landmark fields ignored
    lambda: QuaRotConfig(model="llama"),           # was a float llama, the quantizers ignored
    lambda: LayerParallelConfig(model="gpt"),      # was an unpaired GPT
    lambda: SCFAConfig(model="llama"),
    lambda: HybridConfig(model="mamba2"),          # was a pure Mamba2, the attention layers ignored
    lambda: TransformerConfig(model="landmark"),   # a parent class for a child's name
    lambda: MambaConfig(model="hybrid"),
])
def test_a_config_of_another_class_than_its_model_is_refused(make):
    with pytest.raises(ValueError, match=r"model='\w+' needs a \w+Config, this config is a \w+Config.*get_config"):
        make()


def test_build_refuses_a_config_of_another_class_made_around_validation():
    config = LandmarkConfig(model="landmark")
    object.__setattr__(config, "model", "gpt")  # e.g. a subclass that skips __post_init__
    with pytest.raises(ValueError, match="needs a TransformerConfig"):
        jf.build(config)


def test_an_unregistered_name_is_refused_for_a_registered_class():
    with pytest.raises(ValueError, match=r"model='nope' is not allowed for a SCFAConfig: choose one of "
                                         r"\['hash_sparse', 'qk_sparse'\]"):
        SCFAConfig(model="nope")
    with pytest.raises(ValueError, match=r"choose one of \['gpt', 'llama'"):
        TransformerConfig(model="nope")


def test_registered_names_of_the_same_class_still_swap():
    gpt = jf.get_config("gpt", "tiny")
    assert gpt.replace(model="llama").model == "llama"
    cot = jf.get_config("cotformer", "tiny")
    assert cot.replace(model="but").model == "but"
    assert dataclasses.replace(jf.get_config("mamba", "tiny"), model="mamba2").model == "mamba2"
    for name in jf.list_models():  # every preset of every registration still builds its own class
        for preset in jf.list_presets(name):
            assert jf.get_config(name, preset).model == name


def test_logical_to_sharding_names_the_leaf_of_a_bad_entry():
    import jax
    from jax.sharding import PartitionSpec as P

    from jaxformers.training.mesh import logical_to_sharding

    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    with pytest.raises(ValueError, match=r"\['w'\]: axes .*'data' is a mesh axis"):
        logical_to_sharding({"w": P(("data",), "embed")}, mesh)
    with pytest.raises(ValueError, match=r"\['v'\]: axes P\('embed', 3\) holds 3 \(int\)"):
        logical_to_sharding({"v": P("embed", 3)}, mesh)


@pytest.mark.parametrize("values", [{}, {"d_model": 64}, ["gpt"], None])
def test_config_from_dict_never_guesses_the_architecture(values):
    # {} was a default GPT: a saved config without "model" passed check_resume against gpt-tiny
    with pytest.raises(ValueError, match=r"naming its architecture \('model'\)"):
        jf.config_from_dict(values)
