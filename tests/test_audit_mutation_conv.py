"""Mutation-audit tests for layer-parallel pairing, the QuaRot model/rotation and the HF
converters: each pins a behaviour a realistic implementation slip would break while the
existing tests still passed (see the audit report mut_conv).

Oracles are independent of the code under test: explicit numpy formulas, or the HF
(torch) reference model built locally from a tiny random config (never downloaded)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf


# ============================================================================ layer-parallel
def _lp_model(n_layer=4, **kw):
    """A tiny llama (GQA 4/2) with random numpy params (no init compile) and random, non-unit
    norm scales (folding them must matter)."""
    from jaxformers.utils import abstract_params
    cfg = jf.get_config("llama", "tiny", n_layer=n_layer, d_model=32, n_head=4, vocab_size=64,
                        max_seq_len=32, **kw)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape) if "norm" in jax.tree_util.keystr(path)
                                    else 0.1 * rng.standard_normal(x.shape), jnp.float32),
        abstract_params(jf.build(cfg)))
    return cfg, params


def _lp_logits(cfg, params, toks):
    return jax.jit(jf.build(cfg).apply)({"params": params}, toks)


LP_TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 64)


def test_mlp_norm_mean_is_the_elementwise_mean_of_both_layers_mlp_norms():
    """``mlp_norm="mean"``: both MLP branches of a pair read ONE norm whose scale is
    ``(s^m_i + s^m_{i+1}) / 2``.  Oracle: the "own" pairing of a copy of the params whose two
    MLP norms were replaced by that mean by hand (numpy); fused and unfused must both equal it.
    float32 end to end; 1e-5 is ~100x the rounding of a 2-layer tiny model (the test below the
    mean-vs-own gap, ~1e-3, by two orders)."""
    from jaxformers.transforms import pair_layers
    cfg, params = _lp_model(n_layer=2)
    s1 = np.asarray(params["blocks_0"]["mlp_norm"]["scale"], np.float64)
    s2 = np.asarray(params["blocks_1"]["mlp_norm"]["scale"], np.float64)
    mean = ((s1 + s2) / 2).astype(np.float32)
    uc, up = pair_layers(cfg, params, 0, 2, fused=False, mlp_norm="mean")
    for j in (0, 1):
        np.testing.assert_allclose(up["blocks_0"][f"mlp_norm_{j}"]["scale"], mean, rtol=1e-7)
        # the attention norms stay each layer's own
        np.testing.assert_array_equal(up["blocks_0"][f"attn_norm_{j}"]["scale"],
                                      params[f"blocks_{j}"]["attn_norm"]["scale"])
    manual = jax.tree_util.tree_map(lambda x: x, params)
    manual = {k: dict(v) if k.startswith("blocks_") else v for k, v in manual.items()}
    for i in (0, 1):
        manual[f"blocks_{i}"]["mlp_norm"] = {"scale": jnp.asarray(mean)}
    oc, op = pair_layers(cfg, manual, 0, 2, fused=False, mlp_norm="own")
    want = _lp_logits(oc, op, LP_TOKENS)
    np.testing.assert_allclose(_lp_logits(uc, up, LP_TOKENS), want, atol=1e-5, rtol=1e-5)
    fc, fp = pair_layers(cfg, params, 0, 2, fused=True, mlp_norm="mean")
    np.testing.assert_allclose(_lp_logits(fc, fp, LP_TOKENS), want, atol=1e-5, rtol=1e-5)
    own = _lp_logits(oc, pair_layers(cfg, params, 0, 2, fused=False)[1], LP_TOKENS)
    assert float(jnp.max(jnp.abs(own - want))) > 1e-3   # the two choices are different models


def test_reorder_swap_delete_keep_a_scanned_models_layout():
    """On a ``scan_layers=True`` model the interventions return params in the scanned
    layout (the config keeps ``scan_layers``), so the result builds and runs; it equals the
    same intervention on the per-layer model (exact: same blocks, same order; 1e-6 covers a
    scan-vs-loop XLA difference)."""
    from jaxformers.convert.layers import stack_layers
    from jaxformers.transforms import delete_layers, swap_layers
    cfg, params = _lp_model(n_layer=3)
    scfg, sparams = cfg.replace(scan_layers=True), stack_layers(params, "blocks")
    for fn, args in ((swap_layers, (1,)), (delete_layers, ([1],))):
        nc, npar = fn(scfg, sparams, *args)
        assert nc.scan_layers and "blocks" in npar and not any(k.startswith("blocks_") for k in npar)
        want = _lp_logits(*fn(cfg, params, *args), LP_TOKENS)
        np.testing.assert_allclose(_lp_logits(nc, npar, LP_TOKENS), want, atol=1e-6, rtol=1e-6)


# ============================================================================ QuaRot model
def _nhad(n):
    from pallas_kernels.hadamard import hadamard_matrix
    return np.asarray(hadamard_matrix(n), np.float64) / np.sqrt(n)


def _rope_np(x, pos, theta):
    """Half-split RoPE (the library's / HF Llama's convention), numpy float64."""
    dh = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
    ang = pos[..., None] * inv                              # [B, T, dh/2]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, :, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, :, None, :]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin


def test_quant_attention_equals_the_quarot_formulas_and_records_the_o_input():
    """QuantAttention of a rotated model with 3-bit K/V quantization against the module doc's
    formulas in numpy: ``q, k = rope(x W_q) H_dh, rope(x W_k) H_dh``; ``k, v = Qkv(k), Qkv(v)``;
    causal GQA softmax attention; ``o = H_heads o`` across heads; ``y = o W_o``; and the
    ``o_in`` statistics are ``X^T X`` of exactly that (post-Hadamard) ``o``.  Qkv is the
    library's ``fake_quant`` (its own tests pin it) applied to the oracle's float32 k / v.
    Tolerance 2e-4 relative to max|y|: float32 matmuls against float64 (~1e-6); a missing
    K quantization or a wrong Hadamard axis changes y by >1e-2 of its scale."""
    from jaxformers.quant.model import QuantAttention
    from jaxformers.quant.quantizers import fake_quant
    cfg = jf.get_config("quarot", "tiny", rotated=True, kv_bits=3, a_bits=16, d_model=64, n_head=4,
                        n_kv_head=2, head_dim=16, d_ff=128)
    b, t, d, h, hkv, dh = 2, 7, 64, 4, 2, 16
    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, d), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mod = QuantAttention(cfg)
    variables = mod.init(jax.random.PRNGKey(1), x, pos)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn_unbox(variables["params"]))
    (y, _), state = mod.apply(variables, x, pos, mutable=["quant_stats"])

    xn = np.asarray(x, np.float64)
    q = _rope_np(np.einsum("btd,dhk->bthk", xn, p["q"]["kernel"]), np.asarray(pos), cfg.rope_theta)
    k = _rope_np(np.einsum("btd,dhk->bthk", xn, p["k"]["kernel"]), np.asarray(pos), cfg.rope_theta)
    v = np.einsum("btd,dhk->bthk", xn, p["v"]["kernel"])
    hd = _nhad(dh)
    q, k = q @ hd, k @ hd

    def qkv(a):
        return np.asarray(fake_quant(jnp.asarray(a, jnp.float32), 3, sym=cfg.kv_sym), np.float64)
    k, v = qkv(k), qkv(v)
    kk, vv = np.repeat(k, h // hkv, axis=2), np.repeat(v, h // hkv, axis=2)   # query head j -> kv j // g
    s = np.einsum("bqhk,bshk->bhqs", q, kk) / np.sqrt(dh)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqs,bshk->bqhk", w, vv)
    o = np.einsum("bthk,hg->btgk", o, _nhad(h))                 # H_heads across the heads axis
    flat = o.reshape(b, t, h * dh)
    want = flat @ p["o"]["kernel"].reshape(h * dh, d)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=2e-4 * scale, rtol=0)
    stats = state["quant_stats"]["o_in"]
    f2 = flat.reshape(-1, h * dh)
    np.testing.assert_allclose(np.asarray(stats["xtx"]), f2.T @ f2, atol=1e-4 * np.abs(f2.T @ f2).max())
    assert float(stats["count"]) == b * t


def nn_unbox(tree):
    import flax.linen as nn
    return nn.unbox(tree)


def test_quant_swiglu_records_the_down_input_after_its_online_hadamard():
    """GPTQ calibrates ``W_down`` with ``down_in``'s ``X^T X``: it must be the input ``W_down``
    actually sees, ``h H_ff`` with ``h = silu(x W_gate) * x W_up`` (rotated model), and the
    output ``(h H_ff) W_down``.  numpy float64 oracle; 1e-5 relative: float32 rounding."""
    from jaxformers.quant.model import QuantSwiGLU
    cfg = jf.get_config("quarot", "tiny", rotated=True, a_bits=16, kv_bits=16, d_model=64, n_head=4,
                        n_kv_head=2, head_dim=16, d_ff=128)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 64), jnp.float32)
    mod = QuantSwiGLU(cfg)
    variables = mod.init(jax.random.PRNGKey(1), x)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn_unbox(variables["params"]))
    y, state = mod.apply(variables, x, mutable=["quant_stats"])
    xn = np.asarray(x, np.float64).reshape(-1, 64)
    g = xn @ p["gate"]["kernel"]
    hh = (g / (1 + np.exp(-g))) * (xn @ p["up"]["kernel"]) @ _nhad(128)
    want = hh @ p["down"]["kernel"]
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, 64), want,
                               atol=1e-5 * np.abs(want).max(), rtol=0)
    xtx = hh.T @ hh
    np.testing.assert_allclose(np.asarray(state["quant_stats"]["down_in"]["xtx"]), xtx,
                               atol=1e-5 * np.abs(xtx).max(), rtol=0)
    xm = xn.T @ xn
    np.testing.assert_allclose(np.asarray(state["quant_stats"]["mlp_in"]["xtx"]), xm,
                               atol=1e-5 * np.abs(xm).max(), rtol=0)


# ============================================================================ convert: layers
def test_stack_layers_orders_by_layer_index_not_by_key_order():
    """Checkpoint restorers often hand back keys sorted as strings (``blocks_10`` before
    ``blocks_2``); the stacked axis must still be the layer index."""
    from jaxformers.convert.layers import stack_layers, unstack_layers
    n = 12
    names = sorted(f"blocks_{i}" for i in range(n))          # lexicographic: 0, 1, 10, 11, 2, ...
    params = {"embed": np.zeros(2, np.float32),
              **{k: {"w": np.full((3,), int(k.split("_")[1]), np.float32)} for k in names}}
    stacked = stack_layers(params, n_layer=n)
    np.testing.assert_array_equal(stacked["blocks"]["w"][:, 0], np.arange(n))
    back = unstack_layers(stacked, n_layer=n)
    for i in range(n):
        np.testing.assert_array_equal(back[f"blocks_{i}"]["w"], np.full((3,), i))


# ============================================================================ convert: HF Llama
try:
    import torch
    import transformers
except ImportError:  # the converters' HF interop tests need the torch reference
    torch = transformers = None
hf = pytest.mark.skipif(torch is None, reason="needs torch + transformers")

HF_TOL = 1e-4   # float32 torch eager vs XLA (the existing interop tests' tolerance)


def _hf_llama(tmp_path, seed=0, **over):
    from test_convert_hf import hf_model  # imported here: that module skips itself without torch
    model = hf_model(seed, **{**dict(vocab_size=96, intermediate_size=96, rope_theta=1e4), **over})
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    return model


def _toks(vocab=96, shape=(2, 13), seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def _hf_logits(model, toks, **kw):
    from test_convert_hf import hf_logits
    return hf_logits(model, toks, **kw)


def _jf_logits(config, params, toks):
    return np.asarray(jax.jit(jf.build(config).apply)({"params": params}, jnp.asarray(toks)))


@hf
def test_llama_rms_norm_eps_is_carried_both_ways(tmp_path):
    """A large ``rms_norm_eps`` (0.05, comparable to the hidden states' mean square at init
    0.1) changes the logits by far more than HF_TOL, so it must be read from and written to
    ``config.json``."""
    from jaxformers.convert import from_hf, to_hf
    model = _hf_llama(tmp_path / "in", rms_norm_eps=0.05)
    config, params = from_hf(str(tmp_path / "in"))
    assert config.norm_eps == 0.05
    toks = _toks()
    np.testing.assert_allclose(_jf_logits(config, params, toks), _hf_logits(model, toks), atol=HF_TOL, rtol=0)
    out = to_hf(config, params, str(tmp_path / "out"))
    assert json.load(open(f"{out}/config.json"))["rms_norm_eps"] == 0.05
    back = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                         dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(back, toks), _hf_logits(model, toks), atol=HF_TOL, rtol=0)


@hf
def test_llama_explicit_head_dim_is_carried(tmp_path):
    """``head_dim`` other than ``hidden_size / heads`` (32 vs 16 here): from_hf logits match
    HF and the export round-trips it."""
    from jaxformers.convert import from_hf, to_hf
    model = _hf_llama(tmp_path / "in", head_dim=32)
    config, params = from_hf(str(tmp_path / "in"))
    assert config.dim_head == 32 and params["blocks_0"]["attn"]["q"]["kernel"].shape == (64, 4, 32)
    toks = _toks(seed=1)
    np.testing.assert_allclose(_jf_logits(config, params, toks), _hf_logits(model, toks), atol=HF_TOL, rtol=0)
    out = to_hf(config, params, str(tmp_path / "out"))
    back = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                         dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(back, toks), _hf_logits(model, toks), atol=HF_TOL, rtol=0)


# ============================================================================ convert: HF Mamba
def _randomise_mamba(model):
    from test_convert_hf_mamba import _randomise
    return _randomise(model)


@hf
def test_mamba2_projection_biases_match_hf(tmp_path):
    """Mamba-2 with ``use_bias=True``: the fused ``in_proj.bias`` is split (import) and
    concatenated (export) exactly as its weight (z, x, B|C, dt).  Logits vs the transformers
    torch path, HF_TOL."""
    from jaxformers.convert import from_hf
    torch.manual_seed(0)
    conf = transformers.Mamba2Config(vocab_size=96, hidden_size=32, state_size=16, num_hidden_layers=2,
                                     expand=2, head_dim=16, num_heads=4, n_groups=2, conv_kernel=4,
                                     chunk_size=8, use_bias=True, layer_norm_epsilon=1e-5)
    model = _randomise_mamba(transformers.Mamba2ForCausalLM(conf).to(torch.float32).eval())
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = from_hf(str(tmp_path))
    assert config.proj_bias
    toks = _toks(seed=2)
    want = _hf_logits(model, toks, use_cache=False)
    np.testing.assert_allclose(_jf_logits(config, params, toks), want, atol=HF_TOL, rtol=0)
    # and the export writes the bias back in the same (z, x, B|C, dt) order
    from jaxformers.convert import to_hf
    out = to_hf(config, params, str(tmp_path / "export"))
    back = transformers.Mamba2ForCausalLM.from_pretrained(out).to(torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(back, toks, use_cache=False), want, atol=HF_TOL, rtol=0)


@hf
@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_mamba_norm_eps_and_residual_fp32_are_carried(tmp_path, residual_in_fp32):
    """``layer_norm_epsilon`` (0.05: large enough to move the logits well past HF_TOL) and
    ``residual_in_fp32`` are read from config.json."""
    from jaxformers.convert import from_hf
    torch.manual_seed(0)
    conf = transformers.MambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                    conv_kernel=4, layer_norm_epsilon=0.05, residual_in_fp32=residual_in_fp32)
    model = _randomise_mamba(transformers.MambaForCausalLM(conf).to(torch.float32).eval())
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = from_hf(str(tmp_path))
    assert config.norm_eps == 0.05 and config.residual_fp32 is residual_in_fp32
    if residual_in_fp32:
        toks = _toks(seed=3)
        np.testing.assert_allclose(_jf_logits(config, params, toks),
                                   _hf_logits(model, toks, use_cache=False), atol=HF_TOL, rtol=0)
