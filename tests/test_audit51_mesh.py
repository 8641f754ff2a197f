"""Stop 51 (mesh): evaluation and decoding on a mesh equal one device, for every family.

``tests/test_audit50_mesh.py`` compares the train step; this file compares the two other things a
user runs on a mesh:

* ``evaluate((config, params), data, mesh=SPEC)`` (the eval step under the trainer's shardings):
  the loss within 1e-5 relative of one device (measured: <= 1.2e-7);
* ``jf.generate(..., mesh=SPEC)`` (new in stop 51: params split by the logical rules, the prompt's
  rows over the batch axes, the sampler under the rules so the KV cache is split too): greedy and
  sampled tokens identical to one device, and ``experiments.generate --mesh`` prints the samples
  of one device.

The fast test runs llama (GQA) with the Pallas flash kernel on ``data=2,tensor=2`` and mamba2
with the SSD kernel on ``fsdp=2,tensor=2`` (greedy decoding only; 4 fake CPU devices); the slow
one every family (decoding: every family that generates) on three meshes (``tensor=4``: 2 kv heads do not divide it).
"""
import json
import textwrap

import jax
import numpy as np
import pytest

import jaxformers as jf
from multidevice import run_on_devices

SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    import jaxformers as jf
    from jaxformers.training import evaluate

    CASES = json.loads(__CASES__)
    SMALL = dict(vocab_size=64, d_model=32, n_layer=2, max_seq_len=64)
    PER_FAMILY = {
        "llama": dict(n_head=4, n_kv_head=2, d_ff=64), "quarot": dict(n_head=4, n_kv_head=2, d_ff=64),
        "hybrid": dict(n_head=4, n_kv_head=2, d_ff=64, headdim=16, chunk_size=16, d_state=8),
        "mamba": dict(d_state=8), "mamba2": dict(headdim=16, chunk_size=16, d_state=16),
        "landmark": dict(n_head=4, landmark_block=8, block_q=16),
        "hash_sparse": dict(n_head=4, n_kv_head=2, block_q=16, block_k=16),
        "qk_sparse": dict(n_head=4, n_kv_head=2, block_q=16, block_k=16),
        "cotformer": dict(n_head=4, n_layer=3), "adaptive_cotformer": dict(n_head=4, n_layer=3),
        "layer_parallel": dict(n_head=4, n_layer=3, pair_start=1, pair_end=3),
    }

    def check(name, kernel_kw, meshes, sampled=True):
        cfg = jf.get_config(name, "tiny", **{**SMALL, **PER_FAMILY.get(name, dict(n_head=4)), **kernel_kw})
        module = jf.build(cfg)
        params = jf.init_params(module, jax.random.PRNGKey(0))
        data = np.random.RandomState(0).randint(0, 64, 3000)
        ev = dict(batch_size=4, seq_len=32, max_batches=2)
        base = evaluate((cfg, params), data, **ev)["val_loss"]
        out = {}
        try:  # the hook of a model generate cannot serve (adaptive_cotformer)
            getattr(module, "check_generate", lambda: None)()
            can_generate = True
        except ValueError:
            can_generate = False
        prompt = jnp.asarray(np.random.RandomState(1).randint(0, 64, (4, 7)), jnp.int32)
        lengths = np.array([7, 3, 5, 7], np.int32)
        variables = {"params": params}
        if can_generate:
            greedy = np.asarray(jf.generate(module, variables, prompt, 9, temperature=0.0, prompt_lengths=lengths))
            if sampled:
                sampled = np.asarray(jf.generate(module, variables, prompt, 9, temperature=1.0, rng=5, num_samples=2))
        for spec in meshes:
            r = {"eval_rel": abs(evaluate((cfg, params), data, mesh=spec, **ev)["val_loss"] - base) / base}
            if can_generate:
                g = jf.generate(module, variables, prompt, 9, temperature=0.0, prompt_lengths=lengths, mesh=spec)
                r["greedy_equal"] = bool((np.asarray(g) == greedy).all())
                r["rows_split"] = g.sharding.spec != jax.sharding.PartitionSpec()
                if sampled is not False:
                    s = jf.generate(module, variables, prompt, 9, temperature=1.0, rng=5, num_samples=2, mesh=spec)
                    r["sampled_equal"] = bool((np.asarray(s) == sampled).all())
            out[spec] = r
        return out

    print("RESULT" + json.dumps({f"{c[0]}{c[1]}": check(c[0], *c[2:]) for c in CASES}))
''')


def _run(cases):
    """``[[family, label, config overrides, [mesh specs](, sampled=True)], ...]`` ->
    ``{family + label: {spec: ...}}`` (``sampled=False``: greedy decoding only)."""
    return run_on_devices(SCRIPT.replace("__CASES__", repr(json.dumps(cases))), n=4)


def _assert_same(result):
    for case, per_mesh in result.items():
        for spec, r in per_mesh.items():
            where = f"{case} on {spec}"
            assert r["eval_rel"] < 1e-5, (where, r)
            if "greedy_equal" in r:
                assert r["greedy_equal"] and r.get("sampled_equal", True), (where, r)
                batch_axes = any(f"{a}=" in spec for a in ("data", "fsdp", "expert"))
                assert r["rows_split"] == batch_axes, (where, "the result's rows are split iff the mesh has "
                                                       "batch axes")


def test_eval_and_generate_on_a_mesh_equal_one_device_fast():
    result = _run([["llama", "+flash", dict(attention_impl="pallas"), ["data=2,tensor=2"]],
                   ["mamba2", "+ssd", dict(scan_impl="pallas"), ["fsdp=2,tensor=2"], False]])
    assert set(result) == {"llama+flash", "mamba2+ssd"}
    _assert_same(result)


@pytest.mark.slow
def test_eval_and_generate_on_a_mesh_equal_one_device_every_family():
    names = [n for n in jf.list_models() if not n.startswith(("test-", "audit"))]
    result = _run([[n, "", {}, ["data=2,tensor=2", "fsdp=2,tensor=2", "tensor=4"]] for n in names])
    assert len(result) == len(names)
    _assert_same(result)


def test_generate_mesh_argument_errors(monkeypatch):
    cfg = jf.get_config("llama", "tiny", vocab_size=32, d_model=16, n_layer=1, n_head=2, max_seq_len=16)
    module = jf.build(cfg)
    variables = {"params": jf.init_params(module, jax.random.PRNGKey(0))}
    prompt = np.zeros((1, 3), np.int32)
    with pytest.raises(ValueError, match=r"mesh must be None, a jax.sharding.Mesh or a spec string"):
        jf.generate(module, variables, prompt, 2, mesh=4)
    other = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    with pytest.raises(ValueError, match=r"mesh must have the axes \('data', 'fsdp', 'expert', 'tensor'\)"):
        jf.generate(module, variables, prompt, 2, mesh=other)
    with pytest.raises(ValueError, match=r"params must be the variables dict module.apply takes"):
        jf.generate(module, variables["params"], prompt, 2, mesh="data=1")
    from jaxformers.training import make_mesh
    whole = make_mesh("data=1")
    monkeypatch.setattr(jax, "process_index", lambda *a: 1)  # as if the mesh's devices were another process's
    with pytest.raises(ValueError, match=r"mesh has devices of other processes \(\[0\]\): generate decodes in one"):
        jf.generate(module, variables, prompt, 2, mesh=whole)
    monkeypatch.undo()
    # one device as a mesh: the tokens of no mesh
    np.testing.assert_array_equal(jf.generate(module, variables, prompt, 4, temperature=0.0, mesh="data=1"),
                                  jf.generate(module, variables, prompt, 4, temperature=0.0))
