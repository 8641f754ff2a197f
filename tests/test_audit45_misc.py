"""Audit 45 (sharding tuples, tokenizer leftovers in a run directory, distillation config): tiny, CPU."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jaxformers as jf
from jaxformers.data import ByteTokenizer, load_tokenizer
from jaxformers.distill.convert import student_config
from jaxformers.sharding import DEFAULT_RULES, constrain
from jaxformers.training import rundir
from jaxformers.training.mesh import logical_to_sharding, make_mesh
from multidevice import run_on_devices


# ----------------------------------------------------------------------------- constrain with tuples
def test_constrain_accepts_a_tuple_of_mesh_axes_without_a_mesh():
    # rules active, no mesh: flax used to fail with a pytree structure error for the nested tuple
    x = jnp.ones((4, 3))
    with nn.logical_axis_rules(DEFAULT_RULES):
        y = jax.jit(lambda a: constrain(a, (("data", "fsdp"), None)) * 2)(x)
        z = jax.jit(lambda a: constrain(a, [["tensor"], "batch"]) * 2)(jnp.ones((2, 4)))
    assert float(y.sum()) == 24.0 and z.shape == (2, 4)
    assert constrain(x, (("data", "fsdp"), None)) is x  # no rules: a no-op


@pytest.mark.parametrize("axes,match", [
    ((("data", None), None), "mesh axis names"),
    ((("data",), ("data", "fsdp")), r"\['data'\] in more than one dimension"),
    ((("data", "batch"), None), r"\['batch'\] have no rule \(inside a tuple"),
])
def test_constrain_refuses_bad_tuple_dimensions(axes, match):
    with nn.logical_axis_rules(DEFAULT_RULES):
        with pytest.raises(ValueError, match=match):
            constrain(jnp.ones((4, 4)), axes)


CONSTRAIN_SCRIPT = '''
import json
import jax, jax.numpy as jnp
from jaxformers.sharding import constrain
from jaxformers.training.mesh import activate, make_mesh
mesh = make_mesh("data=2,fsdp=2,tensor=2")
x = jnp.arange(32.0).reshape(8, 4)
out = {}
for key, axes in [("df", (("data", "fsdp"), None)), ("df_mlp", (("data", "fsdp"), "act_mlp")),
                  ("one", (("data",), "act_mlp")), ("t_batch", (("tensor",), "batch")),
                  ("df_batch", (("data", "fsdp"), "batch"))]:
    with activate(mesh):
        y = jax.jit(lambda a: constrain(a, axes) * 2)(x)
    assert float(y.sum()) == float(x.sum()) * 2
    out[key] = list(y.sharding.shard_shape(y.shape))
print("RESULT" + json.dumps(out))
'''


def test_constrain_splits_a_tuple_dimension_over_its_mesh_axes():
    out = run_on_devices(CONSTRAIN_SCRIPT)
    assert out["df"] == [2, 4]           # 8 rows over data*fsdp = 4
    assert out["df_mlp"] == [2, 2]       # and act_mlp over tensor
    assert out["one"] == [4, 2]          # a 1-tuple is the mesh axis "data", not a logical name
    assert out["t_batch"] == [4, 1]      # batch takes data+fsdp, tensor splits rows
    assert out["df_batch"] == [2, 4]     # the tuple wins: batch's rule finds data/fsdp taken


def test_logical_to_sharding_says_what_constrain_says_for_a_tuple():
    with pytest.raises(ValueError, match=r"\['bogus'\] have no rule \(inside a tuple: are not mesh axes"):
        logical_to_sharding({"w": P(("data", "bogus"), "embed")}, make_mesh(None))


# ----------------------------------------------------------------------------- tokenizer leftovers
def _run_with_byte_tokenizer(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rundir.copy_tokenizer(run, None, ByteTokenizer())
    return run


def _bpe():
    from jaxformers.data import BPETokenizer
    return BPETokenizer(300).train(["some text to train on " * 20])


def test_copy_tokenizer_removes_stale_staging_and_old_folders(tmp_path):
    run = _run_with_byte_tokenizer(tmp_path)
    (run / ".tokenizer.tmp-abc").mkdir()
    (run / ".tokenizer.tmp-abc" / "tokenizer_config.json").write_text("{")  # half-written
    ByteTokenizer().save(run / ".tokenizer.old-xyz" / "tokenizer")  # killed before its rmtree
    rundir.copy_tokenizer(run, None, _bpe())
    assert sorted(p.name for p in run.iterdir()) == ["tokenizer"]
    assert load_tokenizer(run / "tokenizer").spec == "bpe:300"


def test_copy_tokenizer_restores_the_only_copy_then_replaces_it(tmp_path):
    run = _run_with_byte_tokenizer(tmp_path)
    # killed between moving tokenizer/ aside and putting the new one in place
    (run / ".tokenizer.old-xyz").mkdir()
    (run / "tokenizer").rename(run / ".tokenizer.old-xyz" / "tokenizer")
    (run / ".tokenizer.tmp-abc").mkdir()
    rundir.copy_tokenizer(run, None, None)  # nothing to copy: the previous one is put back
    assert sorted(p.name for p in run.iterdir()) == ["tokenizer"]
    assert load_tokenizer(run / "tokenizer").spec == "byte"
    (run / ".tokenizer.old-2").mkdir()
    (run / "tokenizer").rename(run / ".tokenizer.old-2" / "tokenizer")
    rundir.copy_tokenizer(run, None, _bpe())  # replaced by the new copy as usual
    assert sorted(p.name for p in run.iterdir()) == ["tokenizer"]
    assert load_tokenizer(run / "tokenizer").spec == "bpe:300"


def test_copy_tokenizer_keeps_ambiguous_previous_tokenizers(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in (".tokenizer.old-a", ".tokenizer.old-b"):
        ByteTokenizer().save(run / name / "tokenizer")
    rundir.copy_tokenizer(run, None, None)
    assert sorted(p.name for p in run.iterdir()) == [".tokenizer.old-a", ".tokenizer.old-b"]


# ----------------------------------------------------------------------------- distillation config
def test_student_keeps_its_own_weight_decay_groups():
    teacher = jf.get_config("llama", "tiny", weight_decay_groups="nanogpt")
    assert student_config(teacher).weight_decay_groups == "shape"  # a training choice, not copied
    assert student_config(teacher, weight_decay_groups="nanogpt").weight_decay_groups == "nanogpt"


@pytest.mark.parametrize("rules", [DEFAULT_RULES, ()])
def test_constrain_refuses_an_entry_that_is_not_a_name(rules):
    # an int (e.g. a size passed for a name) used to fail inside flax with a pytree structure error
    with nn.logical_axis_rules(rules):
        with pytest.raises(ValueError, match=r"axes=\('batch', 3\).*logical axis name"):
            constrain(jnp.ones((4, 4)), ("batch", 3))
    with nn.logical_axis_rules(DEFAULT_RULES):
        assert constrain(jnp.ones((4, 4)), ("batch", P.UNCONSTRAINED)).shape == (4, 4)
