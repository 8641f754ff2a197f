"""Regression tests of stop 52's mesh checks: activation constraints on dimensions a mesh axis
does not divide."""
import pytest

from multidevice import run_on_devices

UNEVEN_SCRIPT = '''
import json, re
import jax, jax.numpy as jnp
from jaxformers.sharding import constrain
from jaxformers.training.mesh import activate, make_mesh
out = {}
for spec, shape, axes, key in [
        ("tensor=4", (4, 2, 8), ("batch", "act_kv_heads", None), "kv2_t4"),
        ("tensor=4", (4, 8, 8), ("batch", "act_kv_heads", None), "kv8_t4"),
        ("data=2,tensor=2", (4, 1, 8), ("batch", "act_kv_heads", None), "mqa_d2t2"),
        ("tensor=4", (4, 6, 8), ("batch", "act_heads", None), "q6_t4")]:
    mesh = make_mesh(spec)
    x = jnp.ones(shape)
    with activate(mesh):
        f = jax.jit(lambda a: constrain(a * 2, axes) + 1)
        text = f.lower(x).as_text()
        assert float(f(x).sum()) == 3.0 * x.size
    # the constraint as lowered (Shardy: one {axes} group per dimension)
    line = next(l for l in text.splitlines() if "sharding_constraint" in l)
    groups = re.findall(r"\\{([^{}]*)\\}", line.split("<@mesh", 1)[1])
    out[key] = [sorted(re.findall(r'"(\\w+)"', g)) for g in groups]
print("RESULT" + json.dumps(out))
'''


def test_constrain_keeps_a_dimension_whole_where_the_mesh_axis_does_not_divide_it():
    """2 kv heads over tensor=4 were asked of XLA as an uneven (padded) split: decoding a GQA
    llama on tensor=4 logged "Involuntary full rematerialization" for every layer (the KV cache
    written in that layout, replicated whole to regroup the query heads by kv head); such a kv
    head dimension is now kept whole.  Query heads keep their uneven split (less compute)."""
    out = run_on_devices(UNEVEN_SCRIPT, n=4)
    batch = ["data", "expert", "fsdp"]
    assert out["kv2_t4"] == [batch, [], []]          # was [batch, ["tensor"], []]
    assert out["kv8_t4"] == [batch, ["tensor"], []]  # divisible: split as before
    assert out["mqa_d2t2"] == [batch, [], []]        # one kv head: whole, rows still split
    assert out["q6_t4"] == [batch, ["tensor"], []]   # query heads: flax's uneven split, unchanged


DECODE_SCRIPT = '''
import json, os, sys
import jax, numpy as np
import jaxformers as jf
cfg = jf.get_config("llama", "tiny", n_layer=2, n_head=4, n_kv_head=2, vocab_size=64, max_seq_len=32)
model = jf.build(cfg)
params = {"params": jf.init_params(model, jax.random.PRNGKey(0))}
prompt = np.tile(np.arange(1, 7, dtype=np.int32), (2, 1))
ref = jf.generate(model, params, prompt, 6, temperature=0.0)
got = jf.generate(model, params, prompt, 6, temperature=0.0, mesh="tensor=4")
print("RESULT" + json.dumps({"equal": bool((np.asarray(ref) == np.asarray(got)).all())}))
'''


def test_gqa_decoding_with_fewer_kv_heads_than_tensor_devices_replicates_nothing_whole():
    import os
    import subprocess
    import sys
    from multidevice import REPO
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO / "tests"),
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    res = subprocess.run([sys.executable, "-c", DECODE_SCRIPT], cwd=str(REPO), env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"equal": true' in res.stdout
    assert "Involuntary full rematerialization" not in res.stderr, res.stderr[-2000:]
