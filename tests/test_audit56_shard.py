"""Audit 56 (shard): meshes, the logical axis rules and the multi-host launch variables.

* The launch variables (``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``SLURM_NTASKS``,
  ``JAXFORMERS_INIT_TIMEOUT``, ...) were read with ``int()``, which also takes ``"1_6"`` (16),
  ``"+2"`` and non-ASCII digits; plain ASCII digits only now, as ``--mesh`` sizes.
* ``make_mesh(None, devices=[])`` (or ``"data=-1"``) returned a mesh of size 0 (``data=0``): an
  ``IndexError: index 0 is out of bounds`` once an array was put on it; a ``ValueError`` naming
  ``devices`` now.  A ``mesh`` of separators only (``","``) names the allowed axes.
* ``JAX_COORDINATOR_ADDRESS=host:`` / ``host:abc`` / ``host:99999`` passed the ``host:port``
  check (a ``:`` somewhere): ``jax.distributed.initialize`` then aborted every process (SIGABRT,
  "another task died") after the init timeout (300 s by default).  The port must be 1..65535.
* ``maybe_initialize_distributed(force="no")`` forced a multi-process start (truthiness): jax's
  ``ValueError: coordinator_address should be defined``; a ``ValueError`` naming ``force`` now.
* ``evaluate(..., batch_size=3, max_batches=3, mesh=...)`` read 3 batches of the rows the mesh
  rounds a batch up to: on 8 devices 24 windows on ``data=8`` (and without a mesh), 12 on
  ``data=2,fsdp=2,tensor=2``, 9 on ``tensor=8``, so the loss depended on the mesh (4.1998 /
  4.1884 / 4.1902).  The first ``max_batches * batch_size`` windows on every mesh now.
"""
import pytest

from multidevice import run_on_devices

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
        with pytest.raises(ValueError, match=r"mesh=.* names no axis; expected AXIS=SIZE entries with AXIS "
                                             r"one of \['data', 'fsdp', 'expert', 'tensor'\]"):
            call()


@pytest.mark.parametrize("spec", [None, "data=-1", "data=1"])
def test_make_mesh_of_no_device_is_a_value_error(spec):
    with pytest.raises(ValueError, match="make_mesh: devices is empty"):
        make_mesh(spec, devices=[])


@pytest.mark.parametrize("address", ["host:", "host:abc", "host:99999", "host:0", ":1234", "host:+12",
                                     "host: 12"])
def test_a_coordinator_address_needs_a_port_number(address):
    env = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    with pytest.raises(ValueError, match=r"JAX_COORDINATOR_ADDRESS=.* must be host:port \(port 1..65535"):
        distributed_settings(env)
    for ok in ("10.0.0.1:1234", "[::1]:65535", "node-7.cluster:1"):
        assert distributed_settings(dict(env, JAX_COORDINATOR_ADDRESS=ok))[1]["coordinator_address"] == ok


@pytest.mark.parametrize("force", ["no", "0", 1, 0.0])
def test_maybe_initialize_distributed_takes_a_bool_force(force, monkeypatch):
    import jax
    from jaxformers.training import mesh as mesh_lib

    monkeypatch.setattr(mesh_lib, "_INITIALIZED", False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.delenv("JAXFORMERS_DISTRIBUTED", raising=False)
    want = r"maybe_initialize_distributed: force \(None: JAXFORMERS_DISTRIBUTED decides\) must be a bool"
    with pytest.raises(ValueError, match=want + r" \(True/False\), got"):
        mesh_lib.maybe_initialize_distributed(force=force)
    assert calls == []  # was: initialize() forced ("no", "0", 1) without a coordinator
    assert mesh_lib.maybe_initialize_distributed(force=False) is False


EVAL_SCRIPT = """
import json
import jax, numpy as np
import jaxformers as jf
from jaxformers.training import evaluate
cfg = jf.get_config("gpt", "tiny", vocab_size=65, d_model=16, n_head=2, n_layer=1, max_seq_len=16)
params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
data = np.random.RandomState(0).randint(0, 65, 600)
out = {str(m): evaluate((cfg, params), data, batch_size=3, seq_len=8, max_batches=2, mesh=m)
       for m in (None, "data=2", "tensor=2")}
out["whole"] = evaluate((cfg, params), data, batch_size=3, seq_len=8, max_batches=None, mesh="data=2")
out.update({f"strided {m}": evaluate((cfg, params), data, batch_size=3, seq_len=8, max_batches=2, stride=4,
                                     mesh=m) for m in (None, "data=2", "tensor=2")})
print("RESULT" + json.dumps(out))
"""


def test_evaluate_scores_max_batches_of_batch_size_windows_on_every_mesh():
    out = run_on_devices(EVAL_SCRIPT, n=2)
    ref = out["tensor=2"]  # no batch axis: batches of 3 rows, as on one device
    assert ref["val_tokens"] == 2 * 3 * 8
    for m in ("None", "data=2"):  # batches of 4 rows: was 2 * 4 * 8 tokens, another loss
        assert out[m]["val_tokens"] == ref["val_tokens"], (m, out[m])
        assert out[m]["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6), m
    assert out["whole"]["val_tokens"] > ref["val_tokens"]  # the whole split is still read whole
    ref = out["strided tensor=2"]  # strided: 2 batches of 3 windows (8 targets, then 4 each) on every mesh
    assert ref["val_tokens"] == 8 + 5 * 4
    for m in ("None", "data=2"):  # were batches of 4 strided windows: 8 + 7 * 4 targets
        assert out[f"strided {m}"]["val_tokens"] == ref["val_tokens"], (m, out[f"strided {m}"])
        assert out[f"strided {m}"]["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6), m
