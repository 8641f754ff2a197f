"""Mutation audit of the shared layers and paper modules: tests that kill mutants the existing
tests let through (each against an independent oracle: numpy formulas, the library's plain
blocks composed by hand, or a full forward over an explicit token sequence).

Tolerances: everything runs in float32 on the CPU; oracles of a few fused ops agree to ~1e-6,
whole (1-2 layer) tiny models to ~1e-5 of logits of magnitude ~1.  Every mutant these tests
target moves the compared values by >= 1e-2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.layers import Block
from jaxformers.layers.norms import LayerNorm, RMSNorm
from jaxformers.models.landmark import gather_blocks, insert_landmarks, memory_forward, select_blocks
from jaxformers.transforms import pair_layers


def _randomize(params, seed=0):
    """Weights ~N(0, 0.1), norm scales / skip gains ~U(0.5, 1.5) (so folding/scaling is exercised)."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        key = jax.tree_util.keystr(path)
        if key.endswith("['scale']") or "skip_gain" in key:
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        return jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
    return jax.tree_util.tree_map_with_path(fill, params)


def _init(cfg, seed=0, t=8):
    from flax import linen as nn
    m = jf.build(cfg)
    p = nn.unbox(jax.jit(m.init)(jax.random.PRNGKey(seed), jnp.zeros((1, t), jnp.int32))["params"])
    return m, _randomize(p, seed)


# ------------------------------------------------------------------------------------ norms
def test_norms_match_their_formulas():
    """LayerNorm centres (y = (x - mean) / sqrt(var + eps) * s), RMSNorm does not; numpy float64
    oracle, inputs with a large mean so that a missing centring is a O(1) error."""
    rng = np.random.default_rng(0)
    x = (3.0 + rng.standard_normal((2, 5, 16))).astype(np.float32)
    s = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    xd = x.astype(np.float64)
    mu = xd.mean(-1, keepdims=True)
    ln = (xd - mu) / np.sqrt(((xd - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * s
    rms = xd / np.sqrt((xd ** 2).mean(-1, keepdims=True) + 1e-6) * s
    got_ln = LayerNorm(eps=1e-5).apply({"params": {"scale": jnp.asarray(s)}}, jnp.asarray(x))
    got_rms = RMSNorm(eps=1e-6).apply({"params": {"scale": jnp.asarray(s)}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got_ln), ln, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_rms), rms, atol=1e-5, rtol=1e-5)


def test_block_skip_gains_scale_the_residual_not_the_branch():
    """skip_gains: x = g_attn * x + Attn(Norm(x)); x = g_mlp * x + MLP(Norm(x)) (the documented
    formula), composed by hand from the block's own sub-modules with gains 0.7 / 1.3."""
    from jaxformers.layers import Attention, make_mlp, make_norm
    cfg = jf.get_config("llama", "tiny", d_model=32, n_head=4, n_kv_head=2, n_layer=1, skip_gains=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 32))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    from flax import linen as nn
    p = _randomize(nn.unbox(jax.jit(Block(cfg).init)(jax.random.PRNGKey(1), x, pos)["params"]))
    p = dict(p, attn_skip_gain=jnp.float32(0.7), mlp_skip_gain=jnp.float32(1.3))
    norm, mlp = make_norm(cfg), make_mlp(cfg)

    @jax.jit
    def both(p, x):
        got, _ = Block(cfg).apply({"params": p}, x, pos)
        a = Attention(cfg).apply({"params": p["attn"]}, norm.apply({"params": p["attn_norm"]}, x), pos)[0]
        h = 0.7 * x + a
        return got, 1.3 * h + mlp.apply({"params": p["mlp"]}, norm.apply({"params": p["mlp_norm"]}, h))
    got, want = both(p, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- layer parallel
def test_mean_mlp_norm_is_the_mean_of_both_layers_scales():
    """mlp_norm="mean" (the authors' shared post-attention norm): BOTH branches of a pair use
    (s_i + s_{i+1}) / 2 (checked on the unfused params, exact float32 arithmetic)."""
    cfg = jf.get_config("llama", "tiny", n_layer=4, d_model=32, n_head=4, vocab_size=64, max_seq_len=16)
    shapes = jax.eval_shape(lambda r: jf.init_params(jf.build(cfg), r), jax.random.PRNGKey(0))
    params = _randomize(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
    _, up = pair_layers(cfg, params, 0, 4, fused=False, mlp_norm="mean")
    for unit, (i, j) in enumerate([(0, 1), (2, 3)]):
        want = (np.asarray(params[f"blocks_{i}"]["mlp_norm"]["scale"])
                + np.asarray(params[f"blocks_{j}"]["mlp_norm"]["scale"])) / 2
        for k in (0, 1):
            np.testing.assert_allclose(np.asarray(up[f"blocks_{unit}"][f"mlp_norm_{k}"]["scale"]), want,
                                       rtol=1e-6)
            # the attention norms stay each layer's own
            np.testing.assert_array_equal(np.asarray(up[f"blocks_{unit}"][f"attn_norm_{k}"]["scale"]),
                                          np.asarray(params[f"blocks_{(i, j)[k]}"]["attn_norm"]["scale"]))


# ------------------------------------------------------------------------------- CoTFormer
@pytest.mark.parametrize("kind", ["learned", "linear_learned"])
def test_but_depth_embedding_follows_the_repeat_index(kind):
    """BUT (no cross-repeat keys) with one mid block run R = 3 times == the plain Block applied
    3 times with the depth embedding added before repeat r: E[R - r] ("learned") or
    e * (R - r) ("linear_learned", zero at the last repeat)."""
    R = 3
    cfg = jf.get_config("but", "tiny", n_layer=1, n_repeat=R, d_model=32, n_head=2, max_seq_len=16,
                        depth_embedding=kind)
    m, p = _init(cfg)
    tok = jax.random.randint(jax.random.PRNGKey(2), (2, 7), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))

    @jax.jit
    def both(p, tok):
        x = m.apply({"params": p}, tok, method=lambda mod, t: mod.embed(t))
        e = p["depth_embedding"]
        for r in range(1, R + 1):
            x = x + (e[R - r] if kind == "learned" else e[0] * (R - r))
            x = Block(cfg).apply({"params": p["blocks_0"]}, x, pos)[0]
        return m.apply({"params": p}, tok), m.apply({"params": p}, x, method=lambda mod, h: mod.logits(mod.final_norm(h)))
    got, want = both(p, tok)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_adaptive_router_mix_weights_the_new_repeat_by_sigmoid_score():
    """Mixture of Repeats: after repeat 2 the state is x_in * (1 - s) + x_repeat * s with
    s = sigmoid(router(x_in)); full capacity (every token continues, gathered by score order).
    h1 / h2 (the two ln_mid outputs) and the router scores are read from the same forward."""
    cfg = jf.get_config("adaptive_cotformer", "tiny", n_layer=1, n_layer_begin=0, n_layer_end=0,
                        n_repeat=2, d_model=32, n_head=2, max_seq_len=16, ln_mid=True,
                        depth_embedding=None, length_factors=(1.0,))
    m, p = _init(cfg)
    tok = jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, cfg.vocab_size)
    logits, inter = jax.jit(lambda p, t: m.apply({"params": p}, t, capture_intermediates=True,
                                                 mutable=["intermediates"]))(p, tok)
    inter = inter["intermediates"]
    h1, h2g = inter["mid_norm"]["__call__"]
    score = inter["routers_0"]["__call__"][0][..., 0]               # [B, T], on h1
    _, sel = jax.lax.top_k(score, score.shape[1])                      # gathered order of repeat 2
    h2 = jnp.zeros_like(h1).at[jnp.arange(2)[:, None], sel].set(h2g)
    s = jax.nn.sigmoid(score)[..., None]
    assert float(jnp.max(jnp.abs(s - 0.5))) > 1e-2                     # the weights are not all 1/2
    want = jax.jit(lambda p, h: m.apply({"params": p}, h, method=lambda mod, h: mod.logits(mod.final_norm(h))))(
        p, h1 * (1 - s) + h2 * s)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------- landmark memory pieces
def _np_scores(q, lm, n_mem):
    b, c, hq, d = q.shape
    g = hq // lm.shape[2]
    kx = lm[:, :, np.arange(hq) // g]                                   # query head h -> kv head h // g
    s = np.einsum("bchd,bmhd->bhcm", q, kx) / np.sqrt(d)
    s[..., n_mem:] = -np.inf
    return s


@pytest.mark.parametrize("selection", ["per_head", "shared"])
def test_select_blocks_matches_numpy_with_gqa(selection):
    """Top-k blocks (chronological order) per (token, head), or shared per token by the max over
    heads of each head's softmax over the stored blocks; GQA 4 query heads / 2 kv heads, some
    empty slots.  Random Gaussian scores: no ties."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
    lm = rng.standard_normal((2, 7, 2, 8)).astype(np.float32)
    n_mem, k = 6, 3
    s = _np_scores(q.astype(np.float64), lm.astype(np.float64), n_mem)
    if selection == "shared":
        p = np.exp(s - s[..., :n_mem].max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        s = np.broadcast_to(p.max(axis=1, keepdims=True), s.shape)
    want = np.sort(np.argsort(-s, axis=-1, kind="stable")[..., :k], axis=-1)
    got = select_blocks(jnp.asarray(q), jnp.asarray(lm), jnp.int32(n_mem), k, selection)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_gather_blocks_maps_query_heads_to_their_kv_head():
    rng = np.random.default_rng(1)
    mem = rng.standard_normal((2, 6, 4, 2, 3)).astype(np.float32)       # [B, M, L, Hkv, D]
    idx = rng.integers(0, 6, (2, 4, 5, 2)).astype(np.int32)             # [B, Hq=4, C, k]
    got = gather_blocks(mem, idx, 4)
    want = np.empty((2, 4, 5, 2, 4, 3), np.float32)
    for b, h, c, r in np.ndindex(*idx.shape):
        want[b, h, c, r] = mem[b, idx[b, h, c, r], :, h // 2]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(gather_blocks(jnp.asarray(mem), jnp.asarray(idx), 4)), want)


def test_memory_forward_places_the_retrieved_block_just_before_the_chunk():
    """Real retrieval (top_k=1 of up to 3 stored blocks), one layer, GQA, shared selection: each
    token of a chunk must see its retrieved block at positions [0, L) and the chunk at [L, 2L),
    i.e. its logits equal the full forward of [that block; the chunk] at its position, for one
    of the stored blocks.  (One layer: a stored block's keys/values depend on its tokens only.)"""
    L = 4
    cfg = jf.get_config("landmark", "tiny", d_model=32, n_head=2, n_kv_head=1, n_layer=1,
                        landmark_block=L, vocab_size=64, max_seq_len=64, landmark_impl="reference")
    m, p = _init(cfg, t=2 * L)
    raw = np.random.default_rng(4).integers(0, 63, (1, 12)).astype(np.int32)
    seq, _ = insert_landmarks(raw, L, 63)                                # 16 tokens, 4 blocks
    got = np.asarray(memory_forward(cfg, p, seq, chunk_len=L, top_k=1, selection="shared"))
    full = jax.jit(lambda t: m.apply({"params": p}, t))
    for c in range(1, 4):                                                # chunk c: c stored blocks
        chunk = seq[:, c * L:(c + 1) * L]
        cands = np.stack([np.asarray(full(jnp.asarray(np.concatenate([seq[:, r * L:(r + 1) * L], chunk], 1))))
                          [:, L:] for r in range(c)])                    # [c, B, L, V]
        err = np.abs(cands - got[None, :, c * L:(c + 1) * L]).max(axis=-1).min(axis=0)
        assert err.max() < 2e-5, (c, err)
