"""Layer-parallel fused pairs of ``qk_norm`` (Qwen3-style) models: per-head q/k norm scales
(``qk_norm_per_head``), fused == unfused == the pair equation, decoding == the forward, the
``tensor=2`` placement, and the norm-bias refusal's message."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.transforms import pair_layers
from multidevice import REPO, run_on_devices
from test_extension_points import _decode_matches_forward
from test_layer_parallel import SCRIPT, _logits, _model, _reference

QK = dict(qk_norm=True, n_kv_head=2)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, 64)


@pytest.mark.parametrize("kw", [QK, dict(QK, qkv_bias=True)], ids=["qk_norm", "qk_norm+qkv_bias"])
def test_fused_qk_norm_pairs_follow_the_equation_and_equal_unfused(tokens, kw):
    # fused pairs refused qk_norm (ValueError): their heads shared one q_norm / k_norm scale
    cfg, params = _model("llama", **kw)
    want = _reference(cfg, params, tokens, 1, 5)
    fc, fp = pair_layers(cfg, params, 1, 5)
    uc, up = pair_layers(cfg, params, 1, 5, fused=False)
    fused, unfused = _logits(fc, fp, tokens), _logits(uc, up, tokens)
    np.testing.assert_allclose(unfused, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(fused, unfused, atol=1e-5, rtol=1e-5)
    assert fc.pair_config().qk_norm_per_head and not fc.base_config().qk_norm_per_head
    # per-head scales: layer 1's [Dh] on heads 0..H-1 (kv 0..Hkv-1), layer 2's on the others
    attn = fp["blocks_1"]["attn"]
    for name, heads in (("q_norm", 4), ("k_norm", 2)):
        s0, s1 = (params[f"blocks_{i}"]["attn"][name]["scale"] for i in (1, 2))
        assert attn[name]["scale"].shape == (2 * heads, 8)
        np.testing.assert_array_equal(attn[name]["scale"], jnp.concatenate(
            [jnp.broadcast_to(s0, (heads, 8)), jnp.broadcast_to(s1, (heads, 8))]))
    assert float(jnp.max(jnp.abs(params["blocks_1"]["attn"]["q_norm"]["scale"]
                                 - params["blocks_2"]["attn"]["q_norm"]["scale"]))) > 0.1  # the layers differ


def test_fused_qk_norm_pair_decodes_as_the_forward(tokens):
    cfg, params = _model("llama", **QK)
    pc, pp = pair_layers(cfg, params, 0, 4)
    _decode_matches_forward(jf.build(pc), pp, tokens, atol=1e-5)


def test_qk_norm_per_head_is_off_by_default_checked_and_not_exported(tmp_path):
    cfg = jf.get_config("llama", "tiny", n_layer=1, d_model=32, n_head=4, n_kv_head=2, vocab_size=64, qk_norm=True)
    p = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))["blocks_0"]["attn"]
    assert p["q_norm"]["scale"].shape == (8,) and p["k_norm"]["scale"].shape == (8,)  # unchanged tree
    ph = cfg.replace(qk_norm_per_head=True)
    p = jf.init_params(jf.build(ph), jax.random.PRNGKey(0))["blocks_0"]["attn"]
    assert p["q_norm"]["scale"].shape == (4, 8) and p["k_norm"]["scale"].shape == (2, 8)
    # a shared scale repeated on every head computes the shared-scale model; another row for one head does not
    cfg, params = _model("llama", **QK)
    per_head = dict(params)
    for b in [k for k in params if k.startswith("blocks_")]:
        attn = params[b]["attn"]
        per_head[b] = dict(params[b], attn=dict(attn, **{n: {"scale": jnp.broadcast_to(attn[n]["scale"], (h, 8))}
                                                        for n, h in (("q_norm", 4), ("k_norm", 2))}))
    toks = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, 64)
    ph = cfg.replace(qk_norm_per_head=True)
    np.testing.assert_allclose(_logits(ph, per_head, toks), _logits(cfg, params, toks), atol=1e-6)
    q_norm = per_head["blocks_0"]["attn"]["q_norm"]
    q_norm["scale"] = q_norm["scale"].at[3].multiply(2.0)
    assert float(jnp.max(jnp.abs(_logits(ph, per_head, toks) - _logits(cfg, params, toks)))) > 1e-3
    with pytest.raises(ValueError, match="qk_norm_per_head=True needs qk_norm=True"):
        cfg.replace(qk_norm=False, qk_norm_per_head=True)
    with pytest.raises(ValueError, match="qk_norm_per_head must be a bool"):
        cfg.replace(qk_norm_per_head=1)
    from jaxformers.convert import to_hf
    with pytest.raises(ValueError, match="qk_norm_per_head=True is not llama-compatible"):
        to_hf(ph, jf.init_params(jf.build(ph), jax.random.PRNGKey(0)), str(tmp_path / "hf"))


def test_norm_bias_refusal_says_paired_for_both_forms():
    # the message said "to be fused" although unfused pairs refuse it too (their norms have no bias)
    cfg, params = _model("llama")
    params = dict(params, blocks_1=dict(params["blocks_1"], attn_norm=dict(params["blocks_1"]["attn_norm"],
                                                                           bias=jnp.zeros(32))))
    for fused in (True, False):
        with pytest.raises(ValueError, match=r"layer 1: attn_norm must hold only a scale \(no bias\) to be "
                                             r"paired \(fused or not"):
            pair_layers(cfg, params, 1, 3, fused=fused)


def test_tensor_axis_places_each_layer_of_a_qk_norm_pair_on_its_own_device():
    out = run_on_devices(SCRIPT.format(repo=str(REPO), kw=repr(QK)), timeout=300)
    assert out["logits"] < 1e-5 and out["decode"] < 1e-5 and out["decode_vs_full"] < 1e-5, out
    assert out["shard_shape"] == [32, 4, 8] and out["layer_on_device"] == [True, True], out
    assert out["norms_on_device"] == {"q_norm": True, "k_norm": True}, out
