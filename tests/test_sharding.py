"""Mesh parsing, logical->mesh shardings, and loss equality across device meshes.

The multi-device checks run in a subprocess with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax
starts); the 1x1x1 reference runs in this process.
"""
import textwrap
from pathlib import Path

import numpy as np
import pytest

import jaxformers as jf
from jaxformers.training import TrainConfig, read_metrics, train
from jaxformers.training.mesh import make_mesh, mesh_shape, parse_mesh
from multidevice import REPO, run_on_devices

STEPS = 6
# expert=8: the batch split over the expert axis (no MoE params: pure data parallelism there);
# data=2,expert=2,tensor=2: expert as a batch axis next to data, with tensor parallelism.
MESHES = ["expert=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4", "data=2,expert=2,tensor=2"]


def test_parse_mesh():
    assert parse_mesh(None) == {} and parse_mesh(" ") == {}
    assert parse_mesh("data=2,fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert parse_mesh("tensor=4, data=2") == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4}
    assert parse_mesh("data=2,expert=2,tensor=2") == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}
    for bad, msg in [("model=2", "AXIS one of"), ("data=0", "positive int"), ("data=x", "positive int"),
                     ("data", "AXIS=SIZE"), ("data=2,data=2", "given twice")]:
        with pytest.raises(ValueError, match=msg):
            parse_mesh(bad)
    assert mesh_shape(None, 8) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    with pytest.raises(ValueError, match=r"has 4 devices .* but 8 are available"):
        mesh_shape("data=2,tensor=2", 8)
    with pytest.raises(ValueError, match="must equal the device count"):
        make_mesh("data=2")  # this process has one CPU device
    mesh = make_mesh("data=1")
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor") and mesh.devices.size == 1


def test_expert_axis_rules():
    """``expert`` shards expert-stacked params and (with data and fsdp) the batch; activations
    dispatched to experts keep it on their expert dimension."""
    from jax.sharding import PartitionSpec as P
    import flax.linen as nn
    from jaxformers.sharding import DEFAULT_RULES

    def spec(*names):
        return tuple(nn.logical_to_mesh_axes(names, DEFAULT_RULES))

    assert spec("batch", "length", "act_embed") == (("data", "fsdp", "expert"), None, None)
    assert spec("expert", "embed", "mlp") == ("expert", "fsdp", "tensor")  # MoE weights
    assert spec("embed", "mlp") == ("fsdp", "tensor")  # dense weights: replicated over expert
    assert spec("act_expert", "batch_no_expert", "act_embed") == ("expert", ("data", "fsdp"), None)
    from jaxformers.training.mesh import BATCH_AXES, batch_sharding
    assert BATCH_AXES == ("data", "fsdp", "expert")
    assert batch_sharding(make_mesh(None), None).spec == P(BATCH_AXES)


def _corpus(root: Path) -> str:
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, size=1500)) + ".\n")
    return str(corpus)


def _configs(corpus, out, mesh=None):
    """Tiny model; on the 1x2x4 mesh also 2 gradient-accumulation micro-batches of 4
    (one compiled program less than testing accumulation separately)."""
    model = jf.get_config("gpt", "tiny", vocab_size=257, d_model=32, n_layer=1, n_head=4, max_seq_len=32)
    tc = TrainConfig(steps=STEPS, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, data=corpus,
                     out_dir=str(out), log_every=1, eval_every=0, eval_batches=0, checkpoint_every=3,
                     keep_checkpoints=3, mesh=mesh, grad_accum=2 if mesh == "fsdp=2,tensor=4" else 1)
    return model, tc


SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, {repo!r})
    import jax
    assert jax.device_count() == 8, jax.devices()
    from jax.sharding import PartitionSpec as P
    from jaxformers.training import load_run, make_mesh, read_metrics, train
    from tests.test_sharding import MESHES, _configs

    corpus, root = {corpus!r}, {root!r}
    out = {{"losses": {{}}}}

    def rows(run_dir):
        return [[r["step"], r["loss"], r["grad_norm"], r["lr"]] for r in read_metrics(run_dir) if "loss" in r]

    for mesh in MESHES:
        run = os.path.join(root, mesh.replace(",", "_").replace("=", ""))
        train(*_configs(corpus, run, mesh), progress=False)
        out["losses"][mesh] = rows(run)

    # stop on 2x2x2 after step 3, resume on 1x2x4 (orbax reshards on restore)
    run = os.path.join(root, "switch")
    train(*_configs(corpus, run, MESHES[1]), progress=False, stop_after=3)
    summary = train(*_configs(corpus, run, MESHES[2]), resume=True, progress=False)
    assert summary["resumed_from"] == 3, summary
    out["losses"]["switch"] = rows(run)

    # params of the 2x2x2 run, restored onto that mesh: really sharded
    mesh = make_mesh(MESHES[1])
    _, _, params = load_run(os.path.join(root, "data2_fsdp2_tensor2"), mesh=mesh)
    specs = {{}}
    for name, arr in [("fc", params["blocks_0"]["mlp"]["fc"]["kernel"]),
                      ("q", params["blocks_0"]["attn"]["q"]["kernel"]),
                      ("embedding", params["embed"]["embedding"]),
                      ("scale", params["final_norm"]["scale"])]:
        specs[name] = {{"spec": [None if a is None else (list(a) if isinstance(a, tuple) else a)
                                for a in arr.sharding.spec],
                       "shard_shape": list(arr.addressable_shards[0].data.shape),
                       "shape": list(arr.shape)}}
    out["specs"] = specs

    # the dimensions the rules would split but the mesh does not divide are named (the trainer
    # reports this line when it starts)
    from jaxformers import build
    from jaxformers.training.mesh import logical_to_sharding, unfit_report
    from jaxformers.training.steps import abstract_params
    abstract, logical = abstract_params(build(_configs(corpus, root, MESHES[2])[0]), 2)
    out["unfit"] = unfit_report(logical_to_sharding(logical, make_mesh(MESHES[2])), abstract)

    # data=2,expert=2,tensor=2: every (data, expert) pair holds its own quarter of the batch
    from jaxformers.training.mesh import batch_sharding
    mesh = make_mesh(MESHES[3])
    out["batch_shard"] = list(batch_sharding(mesh, 2).shard_shape((8, 33)))
    print("RESULT" + json.dumps(out))
''')


def test_losses_match_across_meshes_and_params_are_sharded(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    corpus = _corpus(tmp_path)
    # 1x1x1 reference in this process (one CPU device)
    ref_dir = tmp_path / "single"
    train(*_configs(corpus, ref_dir, "data=1,fsdp=1,tensor=1"), progress=False)
    ref = [[r["step"], r["loss"], r["grad_norm"], r["lr"]] for r in read_metrics(ref_dir) if "loss" in r]
    assert [r[0] for r in ref] == list(range(1, STEPS + 1))

    script = SCRIPT.format(repo=str(REPO), corpus=corpus, root=str(tmp_path / "multi"))
    out = run_on_devices(script, JAXFORMERS_CACHE=str(tmp_path / "cache"))

    ref = np.asarray(ref)
    for name, rows in out["losses"].items():
        rows = np.asarray(rows)
        assert rows.shape == ref.shape, name
        np.testing.assert_array_equal(rows[:, 0], ref[:, 0])
        np.testing.assert_allclose(rows[:, 1], ref[:, 1], rtol=1e-4, err_msg=f"loss {name}")
        np.testing.assert_allclose(rows[:, 2], ref[:, 2], rtol=1e-3, err_msg=f"grad_norm {name}")
        np.testing.assert_allclose(rows[:, 3], ref[:, 3], rtol=1e-6, err_msg=f"lr {name}")

    specs = out["specs"]
    # mlp kernel [embed, mlp] -> (fsdp, tensor): each of 8 devices holds a [16, 64] block
    assert specs["fc"]["spec"] == ["fsdp", "tensor"] and specs["fc"]["shard_shape"] == [16, 64]
    # q kernel [embed, heads, head_dim] -> (fsdp, tensor, None)
    assert specs["q"]["spec"][:2] == ["fsdp", "tensor"] and specs["q"]["shard_shape"] == [16, 2, 8]
    # vocab 257 is not divisible by tensor=2: that dimension stays whole, embed is still split
    assert specs["embedding"]["spec"][0] is None and specs["embedding"]["shard_shape"] == [257, 16]
    assert specs["scale"]["shard_shape"] == [16]
    assert out["batch_shard"] == [2, 33]
    line, share = out["unfit"]
    assert line.startswith("1 dimension(s) not split") and "embed/embedding dim 0 (257) over tensor=4" in line, line
    assert 0.05 < share < 0.9


def test_one_mesh_axis_may_take_the_devices_the_others_leave():
    assert parse_mesh("data=-1,tensor=2") == {"data": -1, "fsdp": 1, "expert": 1, "tensor": 2}
    assert mesh_shape("data=-1,tensor=2", 8) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}
    assert mesh_shape("tensor=-1", 8) == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 8}
    assert mesh_shape("fsdp=-1,data=2,tensor=2", 4) == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 2}
    with pytest.raises(ValueError, match="only one axis may be -1"):
        parse_mesh("data=-1,tensor=-1")
    with pytest.raises(ValueError, match=r"take 3 devices, which does not divide the 8 available"):
        mesh_shape("data=-1,tensor=3", 8)
    for bad in ("data=-2", "data=- 1", "data=-0"):
        with pytest.raises(ValueError, match="positive int"):
            parse_mesh(bad)
    import jax
    n = len(jax.devices())
    assert dict(make_mesh("tensor=-1").shape) == {"data": 1, "fsdp": 1, "expert": 1, "tensor": n}
    with pytest.raises(ValueError, match="tensor=-1 has no size"):
        make_mesh(f"data={n + 1},tensor=-1")
    TrainConfig(mesh="data=-1,tensor=2")  # the config's syntax check accepts it
