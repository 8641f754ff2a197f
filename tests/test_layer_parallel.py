"""Layer-parallel pairs (jaxformers.transforms): the pair equation, fused == unfused, pairing
nothing == the original, decoding == the full forward, 8-device ``tensor`` placement == one
device, and the delete / swap / shuffle interventions."""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.layers import Attention, Block, make_mlp, make_norm
from jaxformers.transforms import (LayerParallelConfig, delete_layers, pair_layers, reorder_layers,
                                   shuffle_layers, swap_layers)
from multidevice import REPO, run_on_devices

L, V = 5, 64


def _model(name, **kw):
    """A random tiny model whose norm scales are not 1 (so that folding them is exercised)."""
    cfg = jf.get_config(name, "tiny", n_layer=L, d_model=32, n_head=4, vocab_size=V, max_seq_len=32, **kw)
    params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(0)
    new = [x * jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
           if "norm" in jax.tree_util.keystr(p) else x for p, x in leaves]
    return cfg, jax.tree_util.tree_unflatten(tree, new)


@pytest.fixture(scope="module")
def models():
    return {"llama": _model("llama"), "gpt": _model("gpt")}


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, V)


def _logits(cfg, params, tokens):
    return jf.build(cfg).apply({"params": params}, tokens)


def _reference(cfg, params, tokens, start, end):
    """The pair equation written out with the library's own modules, layer by layer."""
    x = jf.build(cfg).apply({"params": params}, tokens, method=lambda m, t: m.embed(t))
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    norm, mlp, attn = make_norm(cfg), make_mlp(cfg), Attention(cfg)

    def a(p, y):
        return attn.apply({"params": p["attn"]}, norm.apply({"params": p["attn_norm"]}, y), pos)[0]

    def m(p, y):
        return mlp.apply({"params": p["mlp"]}, norm.apply({"params": p["mlp_norm"]}, y))

    i = 0
    while i < cfg.n_layer:
        p0 = params[f"blocks_{i}"]
        if start <= i < end:
            p1 = params[f"blocks_{i + 1}"]
            h = x + a(p0, x) + a(p1, x)
            x = h + m(p0, h) + m(p1, h)
            i += 2
        else:
            x = Block(cfg).apply({"params": p0}, x, pos)[0]
            i += 1
    return jf.build(cfg).apply({"params": params}, x, method=lambda mod, y: mod.logits(mod.final_norm(y)))


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_pairs_follow_the_equation_fused_equals_unfused_and_no_pairs_is_the_original(models, tokens, name):
    cfg, params = models[name]
    ref = _logits(cfg, params, tokens)
    nc, npar = pair_layers(cfg, params, 2, 2)
    assert nc.effective_depth == L and isinstance(nc, LayerParallelConfig)
    np.testing.assert_array_equal(_logits(nc, npar, tokens), ref)  # pairing nothing

    want = _reference(cfg, params, tokens, 1, 5)  # layers (1,2), (3,4) paired; layer 0 alone
    fc, fp = pair_layers(cfg, params, 1, 5)
    uc, up = pair_layers(cfg, params, 1, 5, fused=False)
    assert fc.effective_depth == 3 and fc.units() == [(0,), (1, 2), (3, 4)]
    fused, unfused = _logits(fc, fp, tokens), _logits(uc, up, tokens)
    np.testing.assert_allclose(unfused, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(fused, unfused, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(fused - ref))) > 1e-3  # pairing changes the function
    # the fused pair is one block: both layers' heads, 2x the MLP width
    q = fp["blocks_1"]["attn"]["q"]["kernel"]
    assert q.shape == (32, 8, 8) and fp["blocks_1"]["attn"]["k"]["kernel"].shape[1] == 2 * cfg.kv_heads
    # the authors' shared MLP norm (mean weight) is a different, still fused-consistent, model
    mc, mp = pair_layers(cfg, params, 1, 5, mlp_norm="mean")
    mu = _logits(*pair_layers(cfg, params, 1, 5, mlp_norm="mean", fused=False), tokens)
    np.testing.assert_allclose(_logits(mc, mp, tokens), mu, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(mu - unfused))) > 1e-4


def test_decode_with_cache_equals_full_forward(models, tokens):
    cfg, params = models["llama"]
    for fused in (True, False):
        pc, pp = pair_layers(cfg, params, 0, 4, fused=fused)
        module = jf.build(pc)
        full = module.apply({"params": pp}, tokens)
        cache = jf.init_cache(module, tokens.shape[0], 16)
        step = jax.jit(lambda p, t, c: module.apply({"params": p}, t, cache=c))
        got, cache = step(pp, tokens[:, :6], cache)  # prefill
        outs = [got]
        for t in range(6, tokens.shape[1]):
            got, cache = step(pp, tokens[:, t:t + 1], cache)
            outs.append(got)
        np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)
    # generate runs on a paired model
    out = jf.generate(module, {"params": pp}, tokens[:, :3], 4, temperature=0.0)
    assert out.shape == (2, 7)


def test_scanned_params_and_hf_llama_are_accepted(models, tokens, tmp_path):
    pytest.importorskip("safetensors")
    from jaxformers.convert import from_hf, to_hf
    from jaxformers.convert.layers import stack_layers

    cfg, params = models["llama"]
    want = _logits(*pair_layers(cfg, params, 1, 3), tokens)
    scfg = cfg.replace(scan_layers=True)
    got = _logits(*pair_layers(scfg, stack_layers(params, "blocks"), 1, 3), tokens)
    np.testing.assert_allclose(got, want, atol=1e-6)
    hcfg, hparams = from_hf(to_hf(cfg, params, str(tmp_path / "hf")))
    assert hcfg.model == "llama"
    np.testing.assert_allclose(_logits(*pair_layers(hcfg, hparams, 1, 3), tokens), want, atol=1e-5)


def test_bad_arguments_name_the_argument(models):
    cfg, params = models["gpt"]
    for kw, msg in [(dict(start=1, end=4), "even"), (dict(start=0, end=6), "n_layer"),
                    (dict(start=-1, end=1), "start"), (dict(start=0, end=2, mlp_norm="x"), "mlp_norm")]:
        with pytest.raises(ValueError, match=msg):
            pair_layers(cfg, params, **kw)
    with pytest.raises(ValueError, match="config must be"):
        pair_layers(jf.get_config("mamba", "tiny"), params, 0, 2)
    with pytest.raises(ValueError, match="skip_gains"):
        sc = cfg.replace(skip_gains=True)
        pair_layers(sc, jf.init_params(jf.build(sc), jax.random.PRNGKey(0)), 0, 2)
    for bad in ([0, 0], [7], []):
        with pytest.raises(ValueError, match="order"):
            reorder_layers(cfg, params, bad)


def test_delete_swap_shuffle(models, tokens):
    cfg, params = models["gpt"]
    ref = _logits(cfg, params, tokens)
    dc, dp = delete_layers(cfg, params, [1, 3])
    assert dc.n_layer == 3 and sorted(dp) == sorted(["embed", "final_norm", "blocks_0", "blocks_1", "blocks_2"])
    np.testing.assert_array_equal(dp["blocks_1"]["attn"]["q"]["kernel"], params["blocks_2"]["attn"]["q"]["kernel"])
    sc, sp = swap_layers(cfg, params, 2)
    assert sc == cfg
    np.testing.assert_array_equal(sp["blocks_3"]["mlp"]["fc"]["kernel"], params["blocks_2"]["mlp"]["fc"]["kernel"])
    swapped = _logits(sc, sp, tokens)
    assert float(jnp.max(jnp.abs(swapped - ref))) > 1e-4
    np.testing.assert_array_equal(_logits(*swap_layers(sc, sp, 2), tokens), ref)  # swap twice: identity
    shc, shp, order = shuffle_layers(cfg, params, 1, 4, seed=3)
    assert order[0] == 0 and order[4] == 4 and sorted(order[1:4]) == [1, 2, 3]
    assert shuffle_layers(cfg, params, 1, 4, seed=3)[2] == order
    for k, i in enumerate(order):
        np.testing.assert_array_equal(shp[f"blocks_{k}"]["attn"]["o"]["kernel"],
                                      params[f"blocks_{i}"]["attn"]["o"]["kernel"])
    # the order is what runs: reorder_layers(order) == the blocks applied in that order
    np.testing.assert_allclose(_logits(shc, shp, tokens), _reference_order(cfg, params, tokens, order), atol=1e-5)


def test_shuffle_is_never_the_identity_and_differs_per_window(models):
    # every window drew from default_rng(seed): the same relative order in each window, and
    # the identity (a no-op "shuffle") for seeds 1, 4, 6, ...
    cfg, params = models["gpt"]
    for seed in range(8):
        orders = [shuffle_layers(cfg, params, s, s + 3, seed=seed)[2][s:s + 3] for s in range(L - 2)]
        assert all(o != list(range(s, s + 3)) for s, o in enumerate(orders)), (seed, orders)
    rel = {tuple(np.argsort(shuffle_layers(cfg, params, s, s + 3, seed=0)[2][s:s + 3])) for s in range(L - 2)}
    assert len(rel) > 1                                   # not the same permutation in every window
    assert shuffle_layers(cfg, params, 0, 2, seed=5)[2][:2] == [1, 0]
    for bad, msg in ((dict(start=1, end=2), "at least 2 layers"), (dict(start=0, end=3, seed=-1), "seed"),
                     (dict(start=0, end=3, seed=1.5), "seed")):
        with pytest.raises(ValueError, match=msg):
            shuffle_layers(cfg, params, **bad)


def test_unfused_pair_applies_residual_dropout_as_the_fused_one(tokens):
    # the unfused ParallelPairBlock added its branches without config.dropout: in training it
    # was another model than the fused form
    cfg, params = _model("llama", dropout=0.5)
    rngs = {"dropout": jax.random.PRNGKey(7)}
    for fused in (True, False):
        pc, pp = pair_layers(cfg, params, 1, 3, fused=fused)
        model = jf.build(pc)
        ev = model.apply({"params": pp}, tokens)
        tr = model.apply({"params": pp}, tokens, rngs=rngs)
        assert float(jnp.max(jnp.abs(tr - ev))) > 1e-2, fused
    # the pair alone (layers 1 and 2 through it) differs from evaluation only through dropout
    pc, pp = pair_layers(cfg.replace(n_layer=L), params, 1, 3, fused=False)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 11, 32))
    from jaxformers.transforms.layer_parallel import ParallelPairBlock
    blk = ParallelPairBlock(pc.base_config())
    pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
    y_ev = blk.apply({"params": pp["blocks_1"]}, x, pos)[0]
    y_tr = blk.apply({"params": pp["blocks_1"]}, x, pos, rngs=rngs)[0]
    assert float(jnp.max(jnp.abs(y_tr - y_ev))) > 1e-2
    np.testing.assert_allclose(blk.apply({"params": pp["blocks_1"]}, x, pos)[0], y_ev)  # eval: deterministic


def test_fuse_pair_refuses_blocks_it_cannot_fuse():
    from jaxformers.transforms.layer_parallel import fuse_pair
    sc = jf.get_config("gpt", "tiny", n_layer=2, d_model=32, n_head=4, vocab_size=V, skip_gains=True)
    p = jf.init_params(jf.build(sc), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="skip gains"):
        fuse_pair(p["blocks_0"], p["blocks_1"])


def test_layer_indices_must_be_ints_in_range(models):
    # floats were truncated (delete [1.7] deleted layer 1); non-sequences gave bare TypeErrors
    cfg, params = models["gpt"]
    for call, msg in [
        (lambda: reorder_layers(cfg, params, [0.9, 1.2]),
         r"order\[0\] must be a layer index \(an int in \[0, 5\)\), got 0.9"),
        (lambda: reorder_layers(cfg, params, [0, True]), r"order\[1\] .* got True"),
        (lambda: reorder_layers(cfg, params, 3), r"order must be a sequence of layer indices"),
        (lambda: delete_layers(cfg, params, [1.7]),
         r"layers\[0\] must be a layer index \(an int in \[0, 5\)\), got 1.7"),
        (lambda: delete_layers(cfg, params, [5]), r"layers\[0\] .* got 5"),
        (lambda: delete_layers(cfg, params, 1),
         r"layers must be a sequence of layer indices \(ints in \[0, 5\)\), got 1"),
        (lambda: delete_layers(cfg, params, "01"), r"layers must be a sequence"),
        (lambda: delete_layers(cfg, params, range(L)), r"layers must leave at least one"),
        (lambda: swap_layers(cfg, params, 1, 1.5), r"j must be a layer index \(an int in \[0, 5\)\), got 1.5"),
        (lambda: swap_layers(cfg, params, 2.0), r"i must be a layer index .* got 2.0"),
        (lambda: swap_layers(cfg, params, -1, 0), r"i must be .* got -1"),
        (lambda: swap_layers(cfg, params, L - 1), r"j \(default i \+ 1\) must be .* got 5"),
        (lambda: shuffle_layers(cfg, params, 0.5, 3), r"start must be an int, got 0.5"),
        (lambda: shuffle_layers(cfg, params, 0, np.float32(3)), r"end must be an int"),
        (lambda: shuffle_layers(cfg, params, 2, 2), r"start=2, end=2"),
        (lambda: pair_layers(cfg, params, 0, 2.0), r"end must be an int"),
    ]:
        with pytest.raises(ValueError, match=msg):
            call()
    # numpy integers are ints
    assert delete_layers(cfg, params, np.array([1, 3]))[0].n_layer == 3
    assert swap_layers(cfg, params, np.int64(2), np.int32(3))[0] == cfg
    order = shuffle_layers(cfg, params, np.int64(1), np.int64(4), seed=3)[2]
    assert order == shuffle_layers(cfg, params, 1, 4, seed=3)[2]


def _reference_order(cfg, params, tokens, order):
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = jf.build(cfg).apply({"params": params}, tokens, method=lambda m, t: m.embed(t))
    for i in order:
        x = Block(cfg).apply({"params": params[f"blocks_{i}"]}, x, pos)[0]
    return jf.build(cfg).apply({"params": params}, x, method=lambda mod, y: mod.logits(mod.final_norm(y)))


SCRIPT = textwrap.dedent('''
    import json, re, sys
    sys.path.insert(0, {repo!r})
    import jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == 8, jax.devices()
    import jaxformers as jf
    from jaxformers.training.mesh import activate, fit_shardings, logical_to_sharding, make_mesh
    from jaxformers.transforms import pair_layers
    from tests.test_layer_parallel import _model

    cfg, params = _model("llama", **{kw})
    pc, pp = pair_layers(cfg, params, 1, 5)
    module = jf.build(pc)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 11), 0, 64)

    def run(p, t):
        logits = module.apply({{"params": p}}, t)
        cache = jf.init_cache(module, t.shape[0], 16)
        _, cache = module.apply({{"params": p}}, t[:, :10], cache=cache)
        last, _ = module.apply({{"params": p}}, t[:, 10:], cache=cache)
        return logits, last

    want = jax.jit(run)(pp, tokens)
    mesh = make_mesh("data=4,tensor=2")
    shardings = fit_shardings(logical_to_sharding(jf.logical_axes(module), mesh), pp)
    with activate(mesh):
        sp = jax.device_put(pp, shardings)
        got = jax.jit(run)(sp, tokens)
        hlo = jax.jit(run).lower(sp, tokens).compile().as_text()
    q = sp["blocks_1"]["attn"]["q"]["kernel"]  # [D, 2H, Dh]: device (tensor=t) holds layer 1 + t
    halves = {{}}
    for shard in q.addressable_shards:
        t = mesh.devices.flatten().tolist().index(shard.device) % 2
        halves[t] = np.asarray(shard.data)
    full = np.asarray(pp["blocks_1"]["attn"]["q"]["kernel"])
    norms = {{}}  # qk_norm: each device's rows of the pair's per-head scales are its layer's
    for name, heads in (("q_norm", 4), ("k_norm", cfg.kv_heads)):
        if name in sp["blocks_1"]["attn"]:
            own = []
            for shard in sp["blocks_1"]["attn"][name]["scale"].addressable_shards:
                t = mesh.devices.flatten().tolist().index(shard.device) % 2
                mine = np.asarray(params[f"blocks_{{1 + t}}"]["attn"][name]["scale"])
                own.append(bool(np.array_equal(np.asarray(shard.data), np.broadcast_to(mine, (heads, 8)))))
            norms[name] = all(own)
    print("RESULT" + json.dumps({{
        "logits": float(jnp.max(jnp.abs(got[0] - want[0]))), "decode": float(jnp.max(jnp.abs(got[1] - want[1]))),
        "decode_vs_full": float(jnp.max(jnp.abs(want[1][:, 0] - want[0][:, 10]))),
        "shard_shape": list(halves[0].shape),
        "layer_on_device": [bool(np.array_equal(halves[t], full[:, 4 * t:4 * t + 4])) for t in (0, 1)],
        "norms_on_device": norms,
        "all_reduce": len(re.findall(r"= [^=]*all-reduce(?:-start)?\\(", hlo))}}))
''')


def test_tensor_axis_places_each_layer_of_a_pair_on_its_own_device():
    out = run_on_devices(SCRIPT.format(repo=str(REPO), kw="{}"), timeout=300)
    assert out["logits"] < 1e-5 and out["decode"] < 1e-5 and out["decode_vs_full"] < 1e-5, out
    assert out["shard_shape"] == [32, 4, 8] and out["layer_on_device"] == [True, True], out
    # per apply: 3 blocks (layer 0, pairs (1,2), (3,4)) x (attention + MLP) + the vocab-sharded
    # logits; 3 applies (forward, prefill, decode step). Unpaired layers would need 2 x 5 + 1 each.
    assert 0 < out["all_reduce"] <= 3 * (2 * 3 + 1), out
