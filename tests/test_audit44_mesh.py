"""Audit 44 (mesh): sharding checks across the registered architectures, not only GPT.

* Every registered model's parameters carry one logical axis name (or ``None``) per dimension,
  every name has a rule in :data:`jaxformers.sharding.DEFAULT_RULES` (no typo silently
  replicating a weight), and on a ``data=2,fsdp=2,tensor=2`` mesh the big matrices are split.
* On 8 fake CPU devices, a llama with dimensions the mesh does not divide (one kv head, a vocab
  of 63 over ``tensor=2``) trains, evaluates and decodes like one device: those dimensions are
  kept whole (and reported) instead of an XLA error.
"""
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

import jaxformers as jf
from jaxformers.sharding import DEFAULT_RULES
from jaxformers.training.steps import abstract_params
from multidevice import REPO, run_on_devices

SMALL = dict(vocab_size=64, d_model=32, max_seq_len=32)
PER_MODEL = {"mamba": dict(headdim=16), "mamba2": dict(headdim=16, chunk_size=16),
             "hybrid": dict(n_head=4, n_kv_head=2, d_ff=64, headdim=16, chunk_size=16),
             "llama": dict(n_head=4, n_kv_head=2, d_ff=64), "quarot": dict(n_head=4, n_kv_head=2, d_ff=64),
             "landmark": dict(n_head=4, landmark_block=8, block_q=16)}


def _small(name):
    kw = dict(SMALL, **PER_MODEL.get(name, {"n_head": 4}))
    try:
        return jf.get_config(name, "tiny", **kw)
    except ValueError:  # a family without the mamba fields
        kw.pop("headdim", None), kw.pop("chunk_size", None)
        return jf.get_config(name, "tiny", **kw)


def _leaves(name):
    abstract, logical = abstract_params(jf.build(_small(name)), 1)
    specs = jax.tree.leaves(logical, is_leaf=lambda x: x is None or isinstance(x, P))
    return [(jax.tree_util.keystr(k), a, s) for (k, a), s in
            zip(jax.tree_util.tree_leaves_with_path(abstract), specs)]


@pytest.mark.parametrize("name", [n for n in jf.list_models() if not n.startswith("test-")])  # not tests' toys
def test_every_parameter_names_each_dimension_with_a_known_axis(name):
    known = {n for n, _ in DEFAULT_RULES}
    sharded = 0
    for path, a, spec in _leaves(name):
        assert spec is not None and len(spec) == a.ndim, (name, path, a.shape, spec)  # no silent replication
        assert all(n is None or n in known for n in spec), (name, path, spec)  # no typo
        sharded += any(n is not None for n in spec)
    assert sharded > 0, name


SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    assert jax.device_count() == 8, jax.devices()
    import jaxformers as jf
    from jaxformers.decoding import generate
    from jaxformers.training import Program, TrainConfig, make_mesh
    from jaxformers.training.mesh import activate
    from jaxformers.training.optim import make_optimizer

    c = jf.get_config("llama", "tiny", vocab_size=63, d_model=32, n_head=4, n_kv_head=1, d_ff=64,
                      n_layer=1, max_seq_len=32)
    tokens = np.random.default_rng(0).integers(0, 63, (8, 17)).astype(np.int32)
    tc = TrainConfig(steps=10, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=0, eps=1e-6)

    def run(mesh, p0=None):
        tx, sched = make_optimizer(tc)
        prog = Program(jf.build(c), mesh, tx=tx, schedule=sched)
        params, opt = prog.init(0) if p0 is None else prog.init_from(p0)
        start = jax.tree.map(np.asarray, params)
        b = prog.put_batch({{"tokens": tokens}}, 8)
        ev = float(prog.eval_step(params, b)[0])
        with activate(mesh):
            gen = np.asarray(generate(prog.module, {{"params": params}}, tokens[:, :4], 4, temperature=0.0))
        params, opt, m = prog.train_step(params, opt, b, 0, jax.random.PRNGKey(3))
        specs = {{jax.tree_util.keystr(k): [None if s is None else str(s) for s in v.sharding.spec]
                 for k, v in jax.tree_util.tree_leaves_with_path(params)}}
        return start, float(m["loss"]), ev, gen, jax.tree.map(np.asarray, params), specs, prog.unfit_params

    p0, l0, e0, g0, q0, _, _ = run(make_mesh("data=1", devices=jax.devices()[:1]))
    _, l1, e1, g1, q1, specs, unfit = run(make_mesh("fsdp=4,tensor=2"), p0)
    out = dict(dloss=abs(l0 - l1), deval=abs(e0 - e1) / abs(e0), same_tokens=bool((g0 == g1).all()),
               dparam=max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(q0), jax.tree.leaves(q1))),
               specs=specs, unfit=unfit[0])
    print("RESULT" + json.dumps(out))
''')


def test_llama_with_indivisible_dims_matches_one_device_on_a_mesh():
    out = run_on_devices(SCRIPT.format(repo=str(REPO)))
    assert out["dloss"] < 1e-5 and out["deval"] < 1e-6 and out["dparam"] < 1e-5, out
    assert out["same_tokens"], out
    specs = out["specs"]
    assert specs["['blocks_0']['attn']['q']['kernel']"] == ["fsdp", "tensor", None]
    assert specs["['blocks_0']['attn']['k']['kernel']"][:2] == ["fsdp", None]  # one kv head: whole
    assert specs["['blocks_0']['mlp']['gate']['kernel']"] == ["fsdp", "tensor"]
    assert specs["['embed']['embedding']"] == [None, "fsdp"]  # vocab 63 over tensor=2: whole
    assert "embed/embedding dim 0 (63) over tensor=2" in out["unfit"], out["unfit"]


@pytest.mark.parametrize("spec", ["data=1_6", "data=+2", "data=\u0662", "data=2.0"])
def test_mesh_sizes_must_be_plain_decimal_ints(spec):
    from jaxformers.training.mesh import parse_mesh
    with pytest.raises(ValueError, match="must be a positive int"):
        parse_mesh(spec)  # int() took "1_6" as 16 and "+2" / Arabic-Indic digits as 2
    assert parse_mesh("data= 16 ") == {"data": 16, "fsdp": 1, "expert": 1, "tensor": 1}
