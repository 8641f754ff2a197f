"""Audit 56 (shard): meshes, the logical axis rules and the multi-host launch variables.

* The launch variables (``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``SLURM_NTASKS``,
  ``JAXFORMERS_INIT_TIMEOUT``, ...) were read with ``int()``, which also takes ``"1_6"`` (16),
  ``"+2"`` and non-ASCII digits; plain ASCII digits only now, as ``--mesh`` sizes.
* ``make_mesh(None, devices=[])`` (or ``"data=-1"``) returned a mesh of size 0 (``data=0``): an
  ``IndexError: index 0 is out of bounds`` once an array was put on it; a ``ValueError`` naming
  ``devices`` now.  A ``mesh`` of separators only (``","``) names the allowed axes.
"""
import pytest

from jaxformers.training import TrainConfig
from jaxformers.training.mesh import distributed_settings, make_mesh, mesh_shape, parse_mesh


@pytest.mark.parametrize("value", ["1_6", "+2", "\u0662", "2.0", "-1", "0x2"])
def test_launch_variables_take_plain_decimal_digits_only(value):
    env = {"JAX_COORDINATOR_ADDRESS": "host:1234", "JAX_NUM_PROCESSES": value, "JAX_PROCESS_ID": "0"}
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES=.* must be an integer >= 1"):
        distributed_settings(env)
    env = {"JAX_COORDINATOR_ADDRESS": "host:1234", "JAX_NUM_PROCESSES": "32", "JAX_PROCESS_ID": value}
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=.* must be an integer >= 0"):
        distributed_settings(env)
    with pytest.raises(ValueError, match=r"JAXFORMERS_INIT_TIMEOUT=.* must be an integer >= 1"):
        distributed_settings({"JAXFORMERS_INIT_TIMEOUT": value, "JAXFORMERS_DISTRIBUTED": "1"})


def test_launch_variables_still_read_plain_digits():
    env = {"JAX_COORDINATOR_ADDRESS": "host:1234", "JAX_NUM_PROCESSES": " 16 ", "JAX_PROCESS_ID": "07",
           "JAXFORMERS_HEARTBEAT_TIMEOUT": "30"}
    reason, kwargs = distributed_settings(env)
    assert reason == "JAX_COORDINATOR_ADDRESS"
    assert kwargs == {"coordinator_address": "host:1234", "num_processes": 16, "process_id": 7,
                      "heartbeat_timeout_seconds": 30}


@pytest.mark.parametrize("spec", [",", " , ", ",,"])
def test_a_mesh_of_separators_names_the_axes(spec):
    for call in (lambda: parse_mesh(spec), lambda: mesh_shape(spec, 8), lambda: TrainConfig(mesh=spec)):
        with pytest.raises(ValueError, match=r"mesh=.* names no axis; expected AXIS=SIZE entries with AXIS one of "
                                             r"\['data', 'fsdp', 'expert', 'tensor'\]"):
            call()


@pytest.mark.parametrize("spec", [None, "data=-1", "data=1"])
def test_make_mesh_of_no_device_is_a_value_error(spec):
    with pytest.raises(ValueError, match="make_mesh: devices is empty"):
        make_mesh(spec, devices=[])
