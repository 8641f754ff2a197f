"""Audit regression tests of the mesh / logical-rule helpers and the run directory: logical axis
names without a rule are refused (flax would leave those dimensions unsharded without a word),
``constrain`` checks its names against the array, a mesh spec naming no axis is refused, and a
corrupt ``config.json`` is named instead of surfacing as a bare JSON error."""
import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jaxformers as jf
from jaxformers.sharding import DEFAULT_RULES, constrain
from jaxformers.training.mesh import activate, logical_to_sharding, make_mesh, parse_mesh
from jaxformers.training.rundir import CONFIG_FILE, check_resume, load_run, read_config


def test_logical_to_sharding_refuses_names_without_a_rule():
    mesh = make_mesh(None)
    specs = {"ok": P("embed", "mlp"), "w": P("embd", "mlp")}  # a typo: used to be replicated silently
    with pytest.raises(ValueError, match=r"\['w'\].*'embd'.*no rule.*'embed'"):
        logical_to_sharding(specs, mesh)
    # a rule with a typo leaves the real name without a rule
    rules = tuple(r for r in DEFAULT_RULES if r[0] != "embed") + (("embd", "fsdp"),)
    with pytest.raises(ValueError, match=r"\['embed'\] have no rule"):
        logical_to_sharding({"ok": specs["ok"]}, mesh, rules)
    # None entries, None leaves and replicating (name, None) rules stay valid
    out = logical_to_sharding({"a": P("length", None), "b": None, "c": specs["ok"]}, mesh)
    assert out["a"].spec == P(None, None) and out["b"].spec == P() and out["c"].spec == P("fsdp", "tensor")


def test_constrain_checks_the_number_of_names_and_unknown_names():
    x = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"names 2 dimensions.*\(2, 3, 4\)"):
        constrain(x, ("batch", "length"))  # without rules too: a model bug whatever the mesh
    with activate(make_mesh(None)):
        with pytest.raises(ValueError, match=r"'lenght'.*no rule"):
            jax.jit(lambda y: constrain(y, ("batch", "lenght", "act_embed")))(x)
        y = jax.jit(lambda y: constrain(y, ("batch", "length", "act_embed")) * 2)(x)
    assert float(y.sum()) == 48.0
    # outside rules, names are not checked (custom rule sets may use other names)
    assert constrain(x, ("batch", "anything", None)) is x


@pytest.mark.parametrize("spec", [",", " , "])
def test_a_mesh_spec_naming_no_axis_is_refused(spec):
    with pytest.raises(ValueError, match="names no axis"):
        parse_mesh(spec)
    assert parse_mesh("data=1,") == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}


@pytest.mark.parametrize("text,match", [('{"model": {"model": "gpt", "d_mo', "is unreadable"),
                                        ('[1, 2]', "must hold a JSON object")])
def test_a_corrupt_config_json_is_named(tmp_path, text, match):
    (tmp_path / CONFIG_FILE).write_text(text)
    path = str(tmp_path / CONFIG_FILE)
    for call in (lambda: read_config(tmp_path), lambda: check_resume(tmp_path, jf.get_config("gpt", "tiny")),
                 lambda: load_run(tmp_path)):
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert path in str(err.value)


def test_load_run_names_a_config_without_its_sections(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model": jf.get_config("gpt", "tiny").to_dict()}))
    with pytest.raises(ValueError, match=r"not a run config: no train section"):
        load_run(tmp_path)


def test_init_from_names_architecture_fields_that_differ_from_the_source(tmp_path, caplog):
    """A model config that keeps the source's parameter tree but not its architecture (rope_theta,
    window, norm_eps) used to load without a word; runtime fields (dropout, layout) are not reported."""
    from jaxformers.training import TrainConfig
    from jaxformers.training.checkpoint import CheckpointError
    from jaxformers.training.init_from import config_changes, load_params

    source = jf.get_config("gpt", "tiny")
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model": source.to_dict(),
                                                    "train": TrainConfig().to_dict()}))
    other = source.replace(rope_theta=500.0, window=4)
    assert config_changes(tmp_path, other) == ["rope_theta: 10000.0 -> 500.0", "window: None -> 4"]
    assert config_changes(tmp_path, source.replace(dropout=0.1, scan_layers=True, remat="full")) == []
    with caplog.at_level("WARNING"), pytest.raises(CheckpointError):  # no checkpoint
        load_params(tmp_path, {}, model_config=other)
    # nothing loaded, nothing computed: the warning comes once the parameters fit (stop 52,
    # tests/test_audit52_lead.py), so a tree that does not fit gets the error alone
    assert "rope_theta" not in caplog.text


@pytest.mark.parametrize("var", ["SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"])
def test_a_non_integer_launcher_size_names_the_variable(var):
    from jaxformers.training.mesh import distributed_settings
    env = {"SLURM_JOB_ID": "7", var: "2(x3)"}
    with pytest.raises(ValueError, match=f"{var}='2\\(x3\\)' must be an integer >= 1"):
        distributed_settings(env)
