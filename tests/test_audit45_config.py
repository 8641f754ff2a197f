"""Audit 45 (configs, weight-decay masks, sharding helpers): regression tests, tiny shapes, CPU."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxformers as jf
from jaxformers.models.cotformer import CoTFormerConfig
from jaxformers.models.denseformer import DenseFormerConfig
from jaxformers.registry import config_from_dict
from jaxformers.sharding import DEFAULT_RULES, constrain, unknown_names
from jaxformers.training.mesh import batch_sharding, logical_to_sharding, make_mesh
from jaxformers.training.optim import decay_mask
from jaxformers.training.steps import abstract_params


# ----------------------------------------------------------------------------- batch_sharding
@pytest.mark.parametrize("ndim", [0, -1, True, 1.5, "2"])
def test_batch_sharding_refuses_an_ndim_without_a_batch_axis(ndim):
    # ndim=0 used to give P() (a replicated "batch"); negative / non-int ranks made odd specs
    with pytest.raises(ValueError, match="ndim"):
        batch_sharding(make_mesh(None), ndim)


def test_batch_sharding_valid_ranks():
    mesh = make_mesh(None)
    assert len(batch_sharding(mesh, 1).spec) == 1
    assert len(batch_sharding(mesh, np.int64(3)).spec) == 3
    assert len(batch_sharding(mesh, None).spec) == 1


# ----------------------------------------------------------------------------- unknown_names
def test_unknown_names_looks_inside_tuples():
    # flax takes a tuple in one dimension as mesh axes as they stand: a typo there was not reported
    assert unknown_names(P(("data", "bogus"), "embed"), DEFAULT_RULES) == ("bogus",)
    assert unknown_names(P(("batch", "length"), None), DEFAULT_RULES) == ("batch", "length")  # logical, not mesh
    assert unknown_names(P(("data", "fsdp"), "embed"), DEFAULT_RULES) == ()
    assert unknown_names(("nope", ("tensor",), None), DEFAULT_RULES) == ("nope",)


def test_logical_to_sharding_and_constrain_name_an_unknown_axis_in_a_tuple():
    with pytest.raises(ValueError, match=r"\['bogus'\] have no rule"):
        logical_to_sharding({"w": P(("data", "bogus"), "embed")}, make_mesh(None))
    with nn.logical_axis_rules(DEFAULT_RULES):  # rules active, no mesh: flax would ignore it silently
        with pytest.raises(ValueError, match="bogus"):
            constrain(jnp.zeros((2, 3)), (("data", "bogus"), None))


# ----------------------------------------------------------------------------- dtype objects
@pytest.mark.parametrize("value,name", [(jnp.float32, "float32"), (jnp.bfloat16, "bfloat16"),
                                        (np.dtype("float16"), "float16"), (jnp.dtype("bfloat16"), "bfloat16"),
                                        (np.float32, "float32"), ("bfloat16", "bfloat16")])
def test_dtype_fields_accept_dtype_objects_and_store_names(value, name):
    c = jf.get_config("gpt", "tiny", dtype=value, param_dtype=value)
    assert c.dtype == name and c.param_dtype == name
    assert json.loads(c.to_json())["param_dtype"] == name
    assert c == jf.get_config("gpt", "tiny", dtype=name, param_dtype=name)
    assert jf.get_config("gpt", "tiny").replace(param_dtype=value).param_dtype == name


def test_param_dtype_object_builds_the_model_in_that_dtype():
    c = jf.get_config("gpt", "tiny", n_layer=1, d_model=32, n_head=2, vocab_size=16, param_dtype=jnp.bfloat16)
    a, _ = abstract_params(jf.build(c))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(a)} == {jnp.dtype("bfloat16")}


@pytest.mark.parametrize("value", [np.int32, jnp.dtype("float64"), "bf16", object(), 3, None])
def test_unknown_dtypes_name_the_field_and_the_allowed_names(value):
    with pytest.raises(ValueError, match=r"param_dtype=.*float32.*bfloat16.*float16"):
        jf.get_config("gpt", "tiny", param_dtype=value)


# ----------------------------------------------------------------------------- weight decay
def _mask(config):
    a, specs = abstract_params(jf.build(config))
    return decay_mask(specs, a, *config.weight_decay_names())


SMALL = dict(n_layer=2, d_model=32, n_head=2, vocab_size=64)


def test_gpt_and_llama_keep_the_shape_rule_by_default():
    for model in ("gpt", "llama"):
        c = jf.get_config(model, "tiny", **SMALL)
        assert c.weight_decay_groups == "shape" and c.weight_decay_names() == ((), ())
        m = _mask(c)
        assert m["embed"]["embedding"] and not m["final_norm"]["scale"]
    # the experiments' baseline arm: the authors' groups, the embedding (tied head) not decayed
    m = _mask(jf.get_config("gpt", "tiny", weight_decay_groups="nanogpt", **SMALL))
    assert not m["embed"]["embedding"] and m["blocks_0"]["mlp"]["fc"]["kernel"]
    untied = _mask(jf.get_config("gpt", "tiny", weight_decay_groups="nanogpt", tie_embeddings=False, **SMALL))
    assert not untied["embed"]["embedding"] and untied["lm_head"]["kernel"]  # their lm_head is nn.Linear


@pytest.mark.parametrize("scan", [False, True])
def test_denseformer_follows_the_authors_parameter_groups(scan):
    # epfml/DenseFormer get_parameter_group_specs: nn.Linear weights (blocks, the DWA weights) and
    # the skip gains decayed; norm weights and nn.Embedding (the tied wte / lm_head) not
    c = DenseFormerConfig.from_base("gpt", "tiny", skip_gains=True, scan_layers=scan, **SMALL)
    assert c.weight_decay_groups == "nanogpt"
    m = _mask(c)
    blocks = m["blocks"] if scan else m["blocks_0"]
    assert m["dwa_alpha"] and blocks["attn_skip_gain"] and blocks["mlp_skip_gain"]
    assert blocks["attn"]["q"]["kernel"] and blocks["mlp"]["proj"]["kernel"]
    assert not m["embed"]["embedding"] and not m["final_norm"]["scale"] and not blocks["attn_norm"]["scale"]
    # weight_decay_groups="shape" restores the shape rule; the override is kept by from_base
    shape = _mask(DenseFormerConfig.from_base("gpt", "tiny", weight_decay_groups="shape", **SMALL))
    assert shape["embed"]["embedding"] and not shape["dwa_alpha"]


@pytest.mark.parametrize("model", ["cotformer", "but", "adaptive_cotformer"])
def test_cotformer_follows_the_authors_parameter_groups(model):
    c = jf.get_config(model, "tiny", ln_mid=True, depth_embedding="learned", n_layer_begin=0, n_layer_end=0, **SMALL)
    assert isinstance(c, CoTFormerConfig) and c.weight_decay_groups == "nanogpt"
    m = _mask(c)
    assert not m["embed"]["embedding"] and not m["depth_embedding"]  # nn.Embedding in theirs
    assert not m["mid_norm"]["scale"] and m["blocks_0"]["mlp"]["fc"]["kernel"]
    if model == "adaptive_cotformer":
        assert all(m[k]["kernel"] for k in m if k.startswith("routers_"))  # nn.Linear: decayed


def test_weight_decay_groups_round_trip_and_parse():
    c = jf.get_config("cotformer", "tiny")
    assert config_from_dict(json.loads(c.to_json())) == c
    g = config_from_dict(jf.get_config("gpt", "tiny", weight_decay_groups="nanogpt").to_dict())
    assert g.weight_decay_names() == (("embedding",), ())
    with pytest.raises(ValueError, match="weight_decay_groups='no'.*shape.*nanogpt"):
        jf.get_config("gpt", "tiny", weight_decay_groups="no")


def test_a_config_saved_before_the_field_keeps_the_shape_rule():
    # a DenseFormer run saved before weight_decay_groups existed trained with the shape rule: a
    # resume / evaluation of it must not switch to the new default silently
    saved = DenseFormerConfig.from_base("gpt", "tiny", **SMALL).to_dict()
    del saved["weight_decay_groups"]
    old = config_from_dict(saved)
    assert old.weight_decay_groups == "shape" and old.weight_decay_names() == ((), ())


def test_mamba_family_names_still_work_with_nanogpt_groups():
    c = jf.get_config("mamba", "tiny")
    assert set(c.weight_decay_names()[0]) == {"A_log", "D", "dt_bias"}
    assert set(c.replace(weight_decay_groups="nanogpt").weight_decay_names()[0]) == {"A_log", "D", "dt_bias", "embedding"}


def test_trainer_mask_follows_the_denseformer_groups(monkeypatch):
    import jaxformers.training.trainer as trainer
    from jaxformers.training import TrainConfig

    seen = {}
    real = trainer.make_optimizer
    monkeypatch.setattr(trainer, "make_optimizer", lambda tc, mask=None: seen.setdefault("m", mask) and real(tc, mask))
    c = DenseFormerConfig.from_base("gpt", "tiny", **SMALL)
    trainer.train_program(c, TrainConfig(steps=2, batch_size=2, seq_len=8), make_mesh(), "float32",
                          trainer.get_loss("cross_entropy"))
    assert seen["m"]["embed"]["embedding"] is False and seen["m"]["dwa_alpha"] is True


def test_experiment_arms_all_use_the_authors_grouping():
    from experiments import cotformer as cot_exp
    from experiments import denseformer as dense_exp

    grid = dense_exp.model_grid(dense_exp.PRESETS["tiny"], "gpt", 64)
    assert grid and all(c.weight_decay_groups == "nanogpt" for _, c in grid)
    specs = cot_exp.model_specs(cot_exp.PRESETS["tiny"])
    assert specs and all(fields["weight_decay_groups"] == "nanogpt" for _, _, fields in specs)


def test_decay_mask_refuses_a_bare_string_and_contradictions():
    params = {"A_log": jnp.zeros((4, 2)), "w": jnp.zeros((4, 4))}
    specs = {"A_log": None, "w": None}
    # a string was iterated character by character: "A_log" exempted nothing
    with pytest.raises(ValueError, match="no_decay"):
        decay_mask(specs, params, "A_log")
    with pytest.raises(ValueError, match="both"):
        decay_mask(specs, params, ("w",), ("w",))
    assert decay_mask(specs, params, ("A_log",)) == {"A_log": False, "w": True}
    assert decay_mask({"v": None}, {"v": jnp.zeros(3)}, (), ("v",)) == {"v": True}


# ----------------------------------------------------------------------------- new bugs
@pytest.mark.parametrize("make", [lambda: DenseFormerConfig(model="gpt"), lambda: CoTFormerConfig(model="gpt"),
                                  lambda: DenseFormerConfig.from_base("gpt", "tiny", model="gpt")])
def test_family_configs_refuse_another_model_name(make):
    # DenseFormerConfig(model="gpt") passed validation and build() made a plain GPT from it (the DWA
    # fields silently ignored): build accepts any TransformerConfig subclass for "gpt"
    with pytest.raises(ValueError, match="model='gpt'"):
        make()


def test_from_base_names_an_unknown_field():
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['bogus'\]"):  # was a TypeError
        DenseFormerConfig.from_base("gpt", "tiny", bogus=1)


@pytest.mark.parametrize("params", [np.int64(10), 10.0, True])
def test_flops_refuse_a_scalar_parameter_count(params):
    # np.int64(10) was counted as one scalar parameter (6 FLOPs), 10.0 raised an AttributeError
    with pytest.raises(ValueError, match="params"):
        jf.get_config("gpt", "tiny").flops_per_token(64, params)
