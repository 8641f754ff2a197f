"""Audit 57: mutation pass over sharding, training.mesh, DoGE and distillation: tests that kill
mutants the existing suites let through (each docstring names its mutant).  All run in-process
on one CPU device (an ``AbstractMesh`` stands in for a mesh where only its shape matters)."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

import flax.linen as nn
import jaxformers as jf
from jaxformers import sharding as sh
from jaxformers.training.mesh import distributed_settings, fit_sharding, unfit_report

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def _abstract_mesh(data=1, fsdp=1, expert=1, tensor=1):
    return AbstractMesh((data, fsdp, expert, tensor), MESH_AXES)


# ----------------------------------------------------------------------------- sharding
def test_mqa_kernel_splits_the_query_heads_and_keeps_the_kv_head_whole():
    """Kills: ``n_kv_heads >= 1`` in :func:`attention_kernel_axes`: the one kv head named
    ``act_kv_heads``, which ``tensor`` cannot divide, so kernel_map dropped ``tensor`` for every
    argument: each device computed all the query heads (the same result)."""
    q_axes, kv_axes = sh.attention_kernel_axes(1)
    assert kv_axes == (sh.BATCH, None, None, None)
    blocks = []

    def kernel(q, k):
        blocks.append((q.shape, k.shape))
        return q

    mesh = _abstract_mesh(data=2, tensor=2)
    with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(sh.DEFAULT_RULES):
        mapped = sh.kernel_map(kernel, (q_axes, kv_axes), q_axes)
        jax.eval_shape(mapped, jax.ShapeDtypeStruct((4, 8, 4, 16), jnp.float32),
                       jax.ShapeDtypeStruct((4, 8, 1, 16), jnp.float32))
    assert blocks[-1] == ((2, 8, 2, 16), (2, 8, 1, 16))  # per device: half the rows and query heads


def test_constrain_refuses_a_mesh_axis_named_in_two_dimensions():
    """Kills: ``direct.count(m) > 2``: a mesh axis named in two dimensions let through (no error
    at all while no mesh is active)."""
    x = jnp.zeros((2, 4))
    with nn.logical_axis_rules(sh.DEFAULT_RULES):
        with pytest.raises(ValueError, match="more than one dimension"):
            sh.constrain(x, (("data",), ("data", "tensor")))


# ----------------------------------------------------------------------------- training.mesh
def test_fit_sharding_keeps_the_dividing_prefix_of_a_dimensions_axes():
    """Kills: a dimension that one of its axes does not divide made whole (the prefix that
    divides it dropped too)."""
    mesh = _abstract_mesh(fsdp=2, tensor=4)
    got = fit_sharding(NamedSharding(mesh, P(("fsdp", "tensor"), "data")), (6, 8))
    assert got.spec == P("fsdp", "data")
    same = NamedSharding(mesh, P(("fsdp", "tensor"), None))
    assert fit_sharding(same, (8, 3)) is same


def test_unfit_report_share_is_of_all_the_parameter_bytes():
    """Kills: the share divided by the bytes that fit (not by all the bytes)."""
    mesh = _abstract_mesh(tensor=2)
    shardings = {"e": NamedSharding(mesh, P("tensor", None)), "w": NamedSharding(mesh, P(None, "tensor"))}
    abstract = {"e": jax.ShapeDtypeStruct((3, 4), jnp.float32),
                "w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
    line, share = unfit_report(shardings, abstract)
    assert share == pytest.approx(48 / 112) and "e dim 0 (3) over tensor=2" in line
    assert unfit_report({"w": shardings["w"]}, {"w": abstract["w"]}) is None


def test_jax_launch_variables_win_over_the_projects_names():
    """Kills: ``COORDINATOR_ADDRESS`` looked up before ``JAX_COORDINATOR_ADDRESS`` (the
    documented precedence reversed: the other address used)."""
    env = {"JAX_COORDINATOR_ADDRESS": "a:1", "COORDINATOR_ADDRESS": "b:2", "JAX_NUM_PROCESSES": "2",
           "NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1", "PROCESS_ID": "3"}
    assert distributed_settings(env) == ("JAX_COORDINATOR_ADDRESS", {"coordinator_address": "a:1",
                                                                     "num_processes": 2, "process_id": 1})


# ----------------------------------------------------------------------------- distillation
def test_distill_step_refuses_a_negative_loss_weight():
    """Kills: the ``kl_weight < 0 or ce_weight < 0`` check dropped (a positive sum let through)."""
    from jaxformers.distill import DistillStep

    cfg = jf.get_config("llama", "tiny", vocab_size=32, d_model=32, n_layer=1, n_head=4, max_seq_len=16)
    for kw in (dict(kl_weight=-1.0, ce_weight=2.0), dict(kl_weight=1.0, ce_weight=-0.5)):
        with pytest.raises(ValueError, match="kl_weight and ce_weight must be >= 0"):
            DistillStep(cfg, None, **kw)


def test_student_config_keeps_the_authors_ssm_settings():
    """Kills: another ``a_init_range`` (the authors' A init range for the converted heads)."""
    from jaxformers.distill import student_config

    cfg = jf.get_config("llama", "tiny", vocab_size=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                        max_seq_len=16)
    s = student_config(cfg)
    assert (s.a_init, tuple(s.a_init_range), s.attn_every, s.ssm_mlp) == ("uniform", (1.0, 16.0), None, True)
    assert (s.expand, s.headdim, s.d_state, s.n_groups) == (1, 8, 8, 4)
