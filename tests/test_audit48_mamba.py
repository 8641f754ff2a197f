"""Audit 48 (mamba): the Mamba-1 / Mamba-2 mixers against a plain numpy transcription of
their docstring formulas, cache edge cases, the distillation losses, the loss masking,
init_from's shape check and the logical sharding rules."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.layers.mamba import MambaMixer
from jaxformers.layers.mamba2 import Mamba2Mixer


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), nn.unbox(tree))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softplus(x):
    return np.log1p(np.exp(x))


def _conv(x, kernel, bias):
    """Causal depthwise conv as the CausalConv1d docstring states: y_t = b + sum_k w[k] x_{t-(K-1)+k}."""
    k = kernel.shape[0]
    xp = np.concatenate([np.zeros((x.shape[0], k - 1, x.shape[2])), x], axis=1)
    return bias + sum(kernel[i] * xp[:, i:i + x.shape[1]] for i in range(k))


def _randomise(params, seed):
    """Every leaf replaced by random values (so D, dt_bias, biases... all matter)."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [np.asarray(rng.normal(0, 0.5, x.shape), np.float32) for x in leaves])


M1 = dict(vocab_size=32, d_model=8, n_layer=1, d_state=3, d_conv=3, expand=2, dt_rank=2, conv_bias=True,
          proj_bias=True, scan_impl="reference")


def test_mamba1_mixer_matches_the_docstring_formula():
    c = jf.get_config("mamba", "tiny", **M1)
    u = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    mixer = MambaMixer(c)
    p = _randomise(mixer.init(jax.random.PRNGKey(0), u)["params"], 1)
    y, cache = mixer.apply({"params": p}, u)
    assert cache is None
    q = _np(p)
    xz = np.einsum("btd,dki->btki", u, q["in_proj"]["kernel"]) + q["in_proj"]["bias"]
    x, z = xz[..., 0, :], xz[..., 1, :]
    x = _silu(_conv(x, q["conv"]["kernel"], q["conv"]["bias"]))
    dbc = x @ q["x_proj"]["kernel"]
    r, n = 2, 3
    dt_low, b, cm = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:]
    dt = _softplus(dt_low @ q["dt_proj"]["kernel"] + q["dt_bias"])  # [B, T, I]
    a = -np.exp(q["A_log"])  # [I, N]
    h = np.zeros((2, 16, n))
    ys = []
    for t in range(5):
        h = np.exp(dt[:, t, :, None] * a) * h + dt[:, t, :, None] * b[:, t, None, :] * x[:, t, :, None]
        ys.append(np.einsum("bin,bn->bi", h, cm[:, t]) + q["D"] * x[:, t])
    yy = np.stack(ys, 1) * _silu(z)
    want = yy @ q["out_proj"]["kernel"] + q["out_proj"]["bias"]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)


M2 = dict(vocab_size=32, d_model=8, n_layer=1, d_state=3, d_conv=3, expand=2, headdim=4, n_groups=2,
          chunk_size=2, conv_bias=True, proj_bias=True, scan_impl="reference", norm_eps=1e-5)


def _mamba2_reference(q, u, g, p_dim, n, eps=1e-5):
    bsz, t_len, _ = u.shape
    z = u @ q["in_z"]["kernel"] + q["in_z"]["bias"]
    x = u @ q["in_x"]["kernel"] + q["in_x"]["bias"]
    bc = u @ q["in_bc"]["kernel"] + q["in_bc"]["bias"]
    dt = u @ q["in_dt"]["kernel"] + q["in_dt"]["bias"]
    x = _silu(_conv(x, q["conv_x"]["kernel"], q["conv_x"]["bias"]))
    bc = _silu(_conv(bc, q["conv_bc"]["kernel"], q["conv_bc"]["bias"]))
    i_dim = x.shape[-1]
    h_n = i_dim // p_dim
    b = bc[..., :g * n].reshape(bsz, t_len, g, n)
    cm = bc[..., g * n:].reshape(bsz, t_len, g, n)
    x = x.reshape(bsz, t_len, h_n, p_dim)
    dt = _softplus(dt + q["dt_bias"])  # [B, T, H]
    a = -np.exp(q["A_log"])  # [H]
    grp = np.arange(h_n) // (h_n // g)  # head -> its group
    state = np.zeros((bsz, h_n, p_dim, n))
    ys = []
    for t in range(t_len):
        bt, ct = b[:, t][:, grp], cm[:, t][:, grp]  # [B, H, N]
        state = np.exp(dt[:, t] * a)[..., None, None] * state + \
            dt[:, t][..., None, None] * x[:, t][..., None] * bt[:, :, None, :]
        ys.append(np.einsum("bhpn,bhn->bhp", state, ct) + q["D"][:, None] * x[:, t])
    y = np.stack(ys, 1).reshape(bsz, t_len, i_dim)
    hh = (y * _silu(z)).reshape(bsz, t_len, g, i_dim // g)
    hh = hh / np.sqrt(np.mean(hh ** 2, axis=-1, keepdims=True) + eps)
    y = hh.reshape(bsz, t_len, i_dim) * q["norm"]["scale"]
    return y @ q["out_proj"]["kernel"] + q["out_proj"]["bias"]


def test_mamba2_mixer_matches_the_docstring_formula_with_groups():
    c = jf.get_config("mamba2", "tiny", **M2)
    assert (c.ssm_heads, c.n_groups) == (4, 2)
    u = np.random.default_rng(2).normal(size=(2, 5, 8)).astype(np.float32)
    mixer = Mamba2Mixer(c)
    p = _randomise(mixer.init(jax.random.PRNGKey(0), u)["params"], 3)
    y, _ = mixer.apply({"params": p}, u)
    want = _mamba2_reference(_np(p), u.astype(np.float64), 2, 4, 3)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("d_conv", [1, 2])
def test_decode_equals_forward_with_narrow_convs(kind, d_conv):
    """d_conv=1 (an empty conv state) and 2, prefill of 1 token then a chunk then steps."""
    c = jf.get_config(kind, "tiny", **dict(M2 if kind == "mamba2" else M1, d_conv=d_conv))
    mixer = MambaMixer(c) if kind == "mamba" else Mamba2Mixer(c)
    u = np.random.default_rng(4).normal(size=(1, 6, 8)).astype(np.float32)
    p = _randomise(mixer.init(jax.random.PRNGKey(0), u)["params"], 5)
    full, _ = mixer.apply({"params": p}, u)
    cache = mixer.init_cache(c, 1)
    outs = []
    for lo, hi in ((0, 1), (1, 4), (4, 5), (5, 6)):
        y, cache = mixer.apply({"params": p}, u[:, lo:hi], cache=cache)
        outs.append(y)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_packed_segments_equal_separate_calls_at_the_mixer(kind):
    c = jf.get_config(kind, "tiny", **(M2 if kind == "mamba2" else M1))
    mixer = MambaMixer(c) if kind == "mamba" else Mamba2Mixer(c)
    u = np.random.default_rng(6).normal(size=(1, 7, 8)).astype(np.float32)
    p = _randomise(mixer.init(jax.random.PRNGKey(0), u)["params"], 7)
    seg = jnp.asarray([[3, 3, 3, 1, 1, 5, 5]], jnp.int32)
    packed, _ = mixer.apply({"params": p}, u, segment_ids=seg)
    parts = [mixer.apply({"params": p}, u[:, lo:hi])[0] for lo, hi in ((0, 3), (3, 5), (5, 7))]
    np.testing.assert_allclose(packed, np.concatenate(parts, 1), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- distillation losses
def test_kl_per_token_direction_and_temperature():
    from jaxformers.distill import kl_per_token

    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))

    def lsm(v):
        v = v - v.max(-1, keepdims=True)
        return v - np.log(np.exp(v).sum(-1, keepdims=True))
    for tau in (1.0, 2.0):
        lt, ls = lsm(t / tau), lsm(s / tau)
        want = tau ** 2 * np.sum(np.exp(lt) * (lt - ls), -1)  # KL(teacher || student)
        got = kl_per_token(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32), tau)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class _Fixed(nn.Module):
    """A 'model' returning fixed logits (whatever the tokens): isolates the loss arithmetic."""
    logits: np.ndarray

    @nn.compact
    def __call__(self, tokens, **kw):
        return jnp.asarray(self.logits) + 0.0 * self.param("w", nn.initializers.zeros, ())


def test_kd_loss_mixes_weights_and_masks_targets():
    from jaxformers.distill import kd_loss, kl_per_token

    rng = np.random.default_rng(1)
    s = rng.normal(size=(2, 4, 6)).astype(np.float32)
    t = rng.normal(size=(2, 4, 6)).astype(np.float32)
    tokens = np.asarray([[1, 2, 3, 4, 5], [0, 5, -100, 2, 1]], np.int32)
    mask = np.asarray([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]], np.float32)
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask), "teacher_logits": jnp.asarray(t)}
    m = _Fixed(s)
    p = {"w": jnp.zeros(())}
    loss, met = kd_loss(m, p, batch, temperature=2.0, kl_weight=0.3, ce_weight=0.7)
    w = mask[:, 1:] * (tokens[:, 1:] >= 0)
    kl = np.asarray(kl_per_token(t, s, 2.0))
    lsm = s - np.log(np.exp(s).sum(-1, keepdims=True))
    ce = -np.take_along_axis(lsm, np.maximum(tokens[:, 1:], 0)[..., None], -1)[..., 0]
    want_kl, want_ce = (kl * w).sum() / w.sum(), (ce * w).sum() / w.sum()
    assert float(met["n_targets"]) == w.sum() == 5
    np.testing.assert_allclose(float(met["kl"]), want_kl, rtol=1e-5)
    np.testing.assert_allclose(float(met["ce"]), want_ce, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.3 * want_kl + 0.7 * want_ce, rtol=1e-5)


def test_init_student_maps_query_heads_without_repeat_and_keeps_random_ssm_parts():
    """GQA teacher with 2 query heads per kv head: C <- W_q as is, B/x <- the kv head h // 2,
    z/dt/A/D keep the student's own initialisation (the same as init='random')."""
    from jaxformers.distill import init_student, student_config

    cfg = jf.get_config("llama", "tiny", vocab_size=32, d_model=16, n_layer=1, n_head=4, n_kv_head=2,
                        d_ff=32, max_seq_len=16)
    tp = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
    s = student_config(cfg, "mamba2")
    sp = init_student(cfg, tp, s, jax.random.PRNGKey(1))
    rp = init_student(cfg, tp, s, jax.random.PRNGKey(1), init="random")
    a, m = tp["blocks_0"]["attn"], sp["blocks_0"]["mixer"]
    hd = cfg.dim_head
    for head in range(4):
        kv = head // 2
        cols = slice(head * hd, (head + 1) * hd)
        np.testing.assert_array_equal(m["in_x"]["kernel"][:, cols], a["v"]["kernel"][:, kv])
        np.testing.assert_array_equal(m["in_bc"]["kernel"][:, cols], a["k"]["kernel"][:, kv])
        np.testing.assert_array_equal(m["in_bc"]["kernel"][:, 4 * hd:][:, cols], a["q"]["kernel"][:, head])
        np.testing.assert_array_equal(m["out_proj"]["kernel"][cols], a["o"]["kernel"][head])
    for name in ("in_z", "in_dt", "A_log", "D", "dt_bias", "conv_x", "conv_bc", "norm"):
        for x, y in zip(jax.tree.leaves(m[name]), jax.tree.leaves(rp["blocks_0"]["mixer"][name])):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="init must be"):
        init_student(cfg, tp, s, jax.random.PRNGKey(1), init="attn")


# ----------------------------------------------------------------------------- losses
def test_cross_entropy_is_a_mean_over_the_unmasked_targets():
    from jaxformers.training.losses import cross_entropy

    rng = np.random.default_rng(3)
    s = rng.normal(size=(2, 4, 6)).astype(np.float32)
    tokens = np.asarray([[1, 2, 3, 4, 5], [0, 5, 1, 2, 1]], np.int32)
    seg = np.asarray([[1, 1, 1, 2, 2], [4, 4, 4, 4, 4]], np.int32)
    mask = np.asarray([[9, 1, 2, 1, 1], [1, 1, 1, 0.5, 0]], np.float32)  # column 0 ignored
    loss, met = cross_entropy(_Fixed(s), {"w": jnp.zeros(())},
                              {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask),
                               "segment_ids": jnp.asarray(seg)})
    w = mask[:, 1:] * (seg[:, 1:] == seg[:, :-1])
    lsm = s - np.log(np.exp(s).sum(-1, keepdims=True))
    ce = -np.take_along_axis(lsm, tokens[:, 1:, None], -1)[..., 0]
    assert float(met["n_targets"]) == pytest.approx(w.sum()) and w.sum() == 6.5
    np.testing.assert_allclose(float(loss), (ce * w).sum() / w.sum(), rtol=1e-6)


def test_weighted_mean_of_nothing_is_zero_and_ignores_nan_where_masked():
    from jaxformers.training.losses import weighted_mean

    mean, total = weighted_mean(jnp.asarray([1.0, jnp.nan, 3.0]), jnp.asarray([1.0, 0.0, 3.0]))
    assert float(mean) == pytest.approx(2.5) and float(total) == 4.0
    mean, total = weighted_mean(jnp.asarray([1.0, 2.0]), jnp.zeros(2))
    assert float(mean) == 0.0 and float(total) == 0.0


# ----------------------------------------------------------------------------- init_from
def test_init_from_refuses_a_parameter_of_another_shape(tmp_path, monkeypatch):
    from jaxformers.training import rundir
    from jaxformers.training.init_from import load_params

    (tmp_path / "config.json").write_text(json.dumps({"model": {"model": "gpt"}, "train": {}}))
    src = {"a": {"kernel": np.ones((2, 3), np.float16)}, "b": np.zeros((4,), np.float32)}
    monkeypatch.setattr(rundir, "load_run", lambda path: (None, None, src))
    ok = {"a": {"kernel": jax.ShapeDtypeStruct((2, 3), jnp.float32)}, "b": jax.ShapeDtypeStruct((4,), jnp.float32)}
    out = load_params(tmp_path, ok)
    assert out["a"]["kernel"].dtype == np.float32 and out["a"]["kernel"].shape == (2, 3)
    bad = {"a": {"kernel": jax.ShapeDtypeStruct((2, 3), jnp.float32)}, "b": jax.ShapeDtypeStruct((5,), jnp.float32)}
    with pytest.raises(ValueError, match=r"parameter \['b'\] has shape \(4,\), the model expects \(5,\)"):
        load_params(tmp_path, bad)
    with pytest.raises(ValueError, match="does not match the model's"):
        load_params(tmp_path, {"a": ok["a"]})


# ----------------------------------------------------------------------------- sharding rules
def test_default_rules_map_each_logical_axis_as_documented():
    from jaxformers.sharding import DEFAULT_RULES

    expect = {"batch": ("data", "fsdp", "expert"), "length": None, "act_embed": None, "act_heads": "tensor",
              "act_kv_heads": "tensor", "act_mlp": "tensor", "act_vocab": "tensor", "embed": "fsdp",
              "heads": "tensor", "kv_heads": "tensor", "head_dim": None, "mlp": "tensor", "vocab": "tensor",
              "layers": None, "expert": "expert", "act_expert": "expert", "batch_no_expert": ("data", "fsdp")}
    assert dict(DEFAULT_RULES) == expect
    spec = nn.logical_to_mesh_axes(("batch", "length", "act_mlp"), DEFAULT_RULES)
    assert tuple(spec) == (("data", "fsdp", "expert"), None, "tensor")
    spec = nn.logical_to_mesh_axes(("act_expert", "batch_no_expert", "act_embed"), DEFAULT_RULES)
    assert tuple(spec) == ("expert", ("data", "fsdp"), None)


def test_logical_to_sharding_refuses_unknown_axes_and_maps_known_ones():
    from jax.sharding import PartitionSpec as P
    from jaxformers.training.mesh import logical_to_sharding, make_mesh

    mesh = make_mesh(None, devices=jax.devices()[:1])
    out = logical_to_sharding({"w": P("embed", "mlp"), "n": None}, mesh)
    assert out["w"].spec == P("fsdp", "tensor")
    with pytest.raises(ValueError, match=r"\['w'\].*\['emb'\] have no rule"):
        logical_to_sharding({"w": P("emb", "mlp")}, mesh)
    with pytest.raises(ValueError, match="mesh axis, not a logical axis"):
        logical_to_sharding({"w": P("data", None)}, mesh)


def test_float_segment_ids_are_a_value_error():
    c = jf.get_config("mamba", "tiny", **M1)
    mixer = MambaMixer(c)
    u = jnp.zeros((1, 4, 8))
    p = mixer.init(jax.random.PRNGKey(0), u)["params"]
    with pytest.raises(ValueError, match="segment_ids must be an integer"):
        mixer.apply({"params": p}, u, segment_ids=jnp.zeros((1, 4), jnp.float32))


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_out_proj_std_is_scaled_by_one_over_sqrt_n_layer(kind):
    """mamba_ssm's prenorm rescale: one residual branch per layer -> init_std / sqrt(n_layer)."""
    c = jf.get_config(kind, "tiny", vocab_size=32, d_model=64, n_layer=4, d_state=4, headdim=16,
                      init_std=0.02, scale_residual_init=True)
    mixer = MambaMixer(c) if kind == "mamba" else Mamba2Mixer(c)
    p = mixer.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, 64)))["params"]
    std = float(np.std(np.asarray(nn.unbox(p["out_proj"]["kernel"]))))
    assert std == pytest.approx(0.02 / 2, rel=0.05), std


def test_kd_loss_refuses_a_counted_target_outside_the_vocabulary():
    """kd_loss's cross-entropy took the target's log-prob with take_along_axis: an id >= V gave a
    NaN loss (even with ce_weight=0: 0 * NaN) where cross_entropy raises a ValueError."""
    from jaxformers.distill import kd_loss

    s = np.zeros((1, 3, 6), np.float32)
    batch = {"tokens": jnp.asarray([[1, 2, 6, 3]], jnp.int32), "teacher_logits": jnp.asarray(s)}
    with pytest.raises(ValueError, match="target ids"):
        kd_loss(_Fixed(s), {"w": jnp.zeros(())}, batch)
    batch["loss_mask"] = jnp.asarray([[1, 1, 0, 1]], jnp.float32)  # not counted: fine
    loss, met = kd_loss(_Fixed(s), {"w": jnp.zeros(())}, batch, ce_weight=1.0)
    assert np.isfinite(float(loss)) and float(met["ce"]) == pytest.approx(np.log(6))


def test_auto_dt_rank_rounds_up():
    """(the presets' d_model are multiples of 16: floor and ceil agree there)"""
    c = jf.get_config("mamba", "tiny", d_model=40)
    assert c.resolved_dt_rank == 3  # ceil(40 / 16), mamba_ssm's math.ceil
