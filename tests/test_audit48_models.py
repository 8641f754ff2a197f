"""Audit 48 (models / layers): invariants that surviving mutants showed were untested.

Tiny shapes only (the whole file runs in seconds on one core)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.layers import LayerNorm, RMSNorm, apply_rotary, rotary_angles
from jaxformers.layers.attention import init_attention_cache, write_kv_cache
from jaxformers.layers.common import dropout, output_std
from jaxformers.layers.embeddings import Embed
from jaxformers.layers.linear import Linear
from jaxformers.layers.mlp import GeluMLP, SwiGLU
from jaxformers.models.cotformer import CoTFormerConfig
from jaxformers.models.denseformer import DenseFormerConfig, DWAPlan
from jaxformers.models.landmark import LandmarkConfig
from jaxformers.models.scfa import SCFAConfig, keep_bits

SM = dict(vocab_size=64, d_model=32, n_head=4, max_seq_len=32)


# ---------------------------------------------------------------------------- layers
class _Drop(nn.Module):
    rate: float

    def __call__(self, x):
        return dropout(self, x, self.rate)


def test_dropout_is_inverted_kept_entries_are_rescaled():
    x = jnp.arange(1.0, 257.0).reshape(16, 16)
    y = _Drop(0.25).apply({}, x, rngs={"dropout": jax.random.PRNGKey(0)})
    kept = np.asarray(y) != 0
    assert 0 < kept.sum() < x.size
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    # no dropout rng: the identity
    np.testing.assert_array_equal(_Drop(0.25).apply({}, x), x)


def test_output_std_is_gpt2_scaled_by_sqrt_two_n_layer():
    c = jf.get_config("gpt", "tiny", n_layer=8, init_std=0.02)
    assert output_std(c) == pytest.approx(0.02 / 4.0)
    assert output_std(c.replace(scale_residual_init=False)) == pytest.approx(0.02)


def test_rmsnorm_eps_is_inside_the_square_root():
    # at |x| ~ eps the placement matters: 1e-3 / sqrt(1e-6 + 1e-6) = 1/sqrt(2)
    x = jnp.full((1, 4), 1e-3, jnp.float32)
    m = RMSNorm(eps=1e-6)
    y = m.apply(m.init(jax.random.PRNGKey(0), x), x)
    np.testing.assert_allclose(y, np.full((1, 4), 2 ** -0.5), rtol=1e-5)
    x = jnp.array([[1e-3, -1e-3, 1e-3, -1e-3]], jnp.float32)   # mean 0, var 1e-6
    m = LayerNorm(eps=1e-6)
    y = m.apply(m.init(jax.random.PRNGKey(0), x), x)
    np.testing.assert_allclose(y, np.asarray(x) / np.sqrt(2e-6), rtol=1e-5)


def _mlp_params(module, c, x, seed=0):
    p = nn.unbox(module.init(jax.random.PRNGKey(seed), x))
    leaves, tree = jax.tree.flatten(p)   # a different draw per kernel (gate and up must differ)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, a.shape) * 0.5 for k, a in zip(keys, leaves)])


def test_gelu_mlp_is_the_tanh_approximation():
    c = jf.get_config("gpt", "tiny", **SM)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 3, c.d_model))
    m = GeluMLP(c)
    p = _mlp_params(m, c, x)
    w1, w2 = np.asarray(p["params"]["fc"]["kernel"]), np.asarray(p["params"]["proj"]["kernel"])
    h = np.asarray(x) @ w1
    g = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    np.testing.assert_allclose(m.apply(p, x), g @ w2, rtol=2e-5, atol=2e-5)


def test_swiglu_gates_the_up_projection_with_silu():
    c = jf.get_config("llama", "tiny", **SM, d_ff=48)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 3, c.d_model))
    m = SwiGLU(c)
    p = _mlp_params(m, c, x)
    pp = {k: np.asarray(v["kernel"]) for k, v in p["params"].items()}
    xn = np.asarray(x)
    gate, up = xn @ pp["gate"], xn @ pp["up"]
    ref = (gate / (1 + np.exp(-gate)) * up) @ pp["down"]
    np.testing.assert_allclose(m.apply(p, x), ref, rtol=2e-5, atol=2e-5)


def test_linear_bias_is_added():
    x = jnp.ones((2, 3))
    m = Linear(4, ("a", "b"), use_bias=True, bias_init=nn.initializers.ones)
    p = nn.unbox(m.init(jax.random.PRNGKey(0), x))
    np.testing.assert_allclose(m.apply(p, x), x @ p["params"]["kernel"] + 1.0, rtol=1e-6)


def test_embedding_keeps_a_float32_residual_stream_under_residual_fp32():
    c = jf.get_config("gpt", "tiny", **SM, dtype="bfloat16", residual_fp32=True)
    tok = jnp.array([[1, 2, 3]])
    e = Embed(c)
    p = nn.unbox(e.init(jax.random.PRNGKey(0), tok))
    x = e.apply(p, tok)
    assert x.dtype == jnp.float32
    np.testing.assert_array_equal(x[0], p["params"]["embedding"][jnp.array([1, 2, 3])])
    assert Embed(c.replace(residual_fp32=False)).apply(p, tok).dtype == jnp.bfloat16


def test_rotary_scores_depend_only_on_the_position_difference():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8))

    def score(pq, pk):
        cq, sq = rotary_angles(jnp.array([[pq]]), 8)
        ck, sk = rotary_angles(jnp.array([[pk]]), 8)
        return float(jnp.sum(apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)))

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_write_kv_cache_accepts_a_chunk_that_exactly_fills_the_cache():
    c = jf.get_config("gpt", "tiny", **SM)
    cache = init_attention_cache(c, 1, 4)
    k = jnp.ones((1, 2, c.kv_heads, c.dim_head))
    out = write_kv_cache(cache, k, 2 * k, 2)                     # slots 2, 3 of 4: exactly full
    np.testing.assert_array_equal(out["v"][0, 2:], 2 * k[0])
    with pytest.raises(ValueError, match="full"):
        write_kv_cache(cache, k, k, 3)
    # traced index: the exactly-full write is not NaN-poisoned, an overflowing one is
    f = jax.jit(lambda i: write_kv_cache(cache, k, k, i)["k"])
    assert bool(jnp.all(jnp.isfinite(f(jnp.int32(2)))))
    assert bool(jnp.any(jnp.isnan(f(jnp.int32(3)))))


# ---------------------------------------------------------------------------- models
def test_gqa_query_heads_share_their_groups_kv_head():
    """n_kv_head=2 of 4 query heads == MHA whose k/v heads repeat each kv head (h -> h // 2)."""
    cg = jf.get_config("llama", "tiny", **SM, n_layer=1, n_kv_head=2, d_ff=48)
    cm = cg.replace(n_kv_head=4)
    tok = jax.random.randint(jax.random.PRNGKey(0), (1, 6), 0, 64)
    mg, mm = jf.build(cg), jf.build(cm)
    pg = jf.init_params(mg, jax.random.PRNGKey(1), tok)
    attn = dict(pg["blocks_0"]["attn"])
    for n in ("k", "v"):
        attn[n] = {"kernel": jnp.repeat(attn[n]["kernel"], 2, axis=1)}
    pm = dict(pg, blocks_0=dict(pg["blocks_0"], attn=attn))
    np.testing.assert_allclose(mm.apply({"params": pm}, tok), mg.apply({"params": pg}, tok),
                               rtol=1e-5, atol=1e-5)


def test_dwa_plan_last_only_ignores_the_period():
    c = DenseFormerConfig.from_base("gpt", "tiny", n_layer=3, dwa_period=2, dwa_mode="last_only", **SM)
    assert DWAPlan.from_config(c).points == (3,)
    c = DenseFormerConfig.from_base("gpt", "tiny", n_layer=4, dwa_period=2, dwa_dilation=2, **SM)
    plan = DWAPlan.from_config(c)
    assert plan.points == (2, 4)
    np.testing.assert_array_equal(plan.mask(), [[1, 0, 1, 0, 0], [1, 0, 1, 0, 1]])


@pytest.mark.parametrize("field", ["dwa_dilation", "dwa_period"])
def test_dwa_fields_above_n_layer_are_rejected(field):
    with pytest.raises(ValueError, match=field):
        DenseFormerConfig.from_base("gpt", "tiny", n_layer=3, **{field: 4})


@pytest.mark.parametrize("kw, match", [
    (dict(n_repeat=0), "n_repeat"),
    (dict(model="adaptive_cotformer", n_repeat=3, length_factors=(0.5, 0.8)), "length_factors"),
])
def test_cotformer_config_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        CoTFormerConfig(**{**SM, "n_layer": 2, **kw})


def test_landmark_mem_chunk_len_zero_is_rejected():
    with pytest.raises(ValueError, match="mem_chunk_len"):
        LandmarkConfig(**SM, n_layer=1, landmark_block=4, mem_chunk_len=0)


def test_qk_drop_rate_one_is_rejected():
    with pytest.raises(ValueError, match="qk_drop_rate"):
        SCFAConfig(**SM, n_layer=1, model="qk_sparse", qk_drop_rate=1.0)


def test_keep_bits_index_the_table_by_position_modulo_max_len():
    key = jax.random.PRNGKey(3)
    pos = jnp.arange(8, dtype=jnp.int32)[None].repeat(2, 0)
    a = keep_bits(key, pos, 2, 8, 0.5)
    np.testing.assert_array_equal(keep_bits(key, pos + 8, 2, 8, 0.5), a)
    np.testing.assert_array_equal(keep_bits(key, pos[:, ::-1], 2, 8, 0.5), a[:, ::-1])


def test_dwa_weights_of_a_model_without_dwa():
    # dwa_mode="none" (the skip-gains ablation) has no dwa_alpha: this was a bare KeyError
    from jaxformers.models.denseformer import dwa_weights
    c = DenseFormerConfig.from_base("gpt", "tiny", n_layer=2, dwa_mode="none", skip_gains=True, **SM)
    params = jax.eval_shape(lambda r: jf.init_params(jf.build(c), r, jnp.zeros((1, 4), jnp.int32)),
                            jax.random.PRNGKey(0))
    assert "dwa_alpha" not in params
    alpha, points = dwa_weights(c, params)
    assert alpha.shape == (0, 3) and points == []
    c = c.replace(dwa_mode="all")
    alpha, points = dwa_weights(c, {"dwa_alpha": DWAPlan.from_config(c).init() + 0.5})
    np.testing.assert_array_equal(alpha, [[0.5, 1.5, 0.0], [0.5, 0.5, 1.5]])   # masked j <= m
    assert points == [1, 2]


@pytest.mark.parametrize("name, kw", [
    ("hash_sparse", dict(n_buckets=2)), ("qk_sparse", dict(qk_drop_rate=0.25)),
    ("landmark", dict(landmark_block=4)), ("cotformer", dict(n_repeat=3, n_kv_head=2)),
])
def test_a_future_token_never_changes_a_past_logit(name, kw):
    c = jf.get_config(name, "tiny", **SM, n_layer=1, **kw)
    m = jf.build(c)
    a = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 60)
    b = a.at[:, 5:].set((a[:, 5:] + 7) % 60)
    p = jf.init_params(m, jax.random.PRNGKey(1), a)
    la, lb = m.apply({"params": p}, a), m.apply({"params": p}, b)
    np.testing.assert_allclose(la[:, :5], lb[:, :5], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(la[:, 5:] - lb[:, 5:]))) > 1e-3


def test_hash_labels_of_a_gqa_query_head_use_its_kv_heads_projection():
    from jaxformers.models.scfa import SparseAttention, hash_buckets, hash_matrices
    c = SCFAConfig(**SM, n_layer=1, n_kv_head=2, n_buckets=4)
    key = jax.random.PRNGKey(5)
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 4, c.dim_head))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 2, c.dim_head))
    pos = jnp.arange(6)[None]
    q_lab, k_lab = SparseAttention(c).labels(key, q, k, pos, pos)
    r = hash_matrices(key, 2, c.dim_head, 4)
    for h in range(4):   # query head h belongs to kv head h // 2
        np.testing.assert_array_equal(q_lab[..., h], hash_buckets(q[:, :, h:h + 1], r[h // 2:h // 2 + 1])[..., 0])
    np.testing.assert_array_equal(k_lab, hash_buckets(k, r))


@pytest.mark.parametrize("shape", [(1, 0), (0, 3)])
def test_empty_token_arrays_are_a_value_error(shape):
    c = jf.get_config("gpt", "tiny", **SM, n_layer=1)
    m = jf.build(c)
    p = jax.eval_shape(lambda r: jf.init_params(m, r, jnp.zeros((1, 2), jnp.int32)), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="at least one position"):
        m.apply({"params": p}, jnp.zeros(shape, jnp.int32))


def test_a_one_row_positions_array_is_broadcast_over_the_batch():
    c = jf.get_config("llama", "tiny", **SM, n_layer=1, n_kv_head=2, d_ff=48)
    m = jf.build(c)
    tok = jax.random.randint(jax.random.PRNGKey(0), (2, 5), 0, 60)
    p = jf.init_params(m, jax.random.PRNGKey(1), tok)
    pos = jnp.array([[3, 4, 5, 6, 7]], jnp.int32)
    np.testing.assert_allclose(m.apply({"params": p}, tok, positions=pos),
                               m.apply({"params": p}, tok, positions=jnp.repeat(pos, 2, 0)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="positions"):
        m.apply({"params": p}, tok, positions=jnp.zeros((2, 4), jnp.int32))


def test_embedding_dropout_uses_embed_dropout_not_the_residual_rate():
    c = jf.get_config("gpt", "tiny", **SM, dropout=0.5, embed_dropout=0.0)
    tok = jnp.arange(16)[None]
    e = Embed(c)
    p = e.init(jax.random.PRNGKey(0), tok)
    rng = {"dropout": jax.random.PRNGKey(1)}
    np.testing.assert_array_equal(e.apply(p, tok, rngs=rng), e.apply(p, tok))
    y = Embed(c.replace(dropout=0.0, embed_dropout=0.5)).apply(p, tok, rngs=rng)
    assert 0 < int(jnp.sum(y == 0)) < y.size


@pytest.mark.parametrize("head_dim", [7, 0, True])
def test_rotary_angles_need_an_even_head_dim(head_dim):
    with pytest.raises(ValueError, match="head_dim"):
        rotary_angles(jnp.zeros((1, 2), jnp.int32), head_dim)


def test_from_base_keeps_the_denseformer_weight_decay_groups():
    assert DenseFormerConfig.from_base("gpt", "tiny").weight_decay_groups == "nanogpt"
    assert DenseFormerConfig.from_base("llama", "tiny", weight_decay_groups="shape").weight_decay_groups == "shape"


def test_qk_sparse_query_and_key_keep_masks_are_independent_draws():
    from jaxformers.models.scfa import SparseAttention
    c = SCFAConfig(**SM, n_layer=1, model="qk_sparse", qk_drop_rate=0.5)
    pos = jnp.arange(16)[None]
    x = jnp.zeros((1, 16, 4, c.dim_head))
    q_lab, k_lab = SparseAttention(c).labels(jax.random.PRNGKey(2), x, x, pos, pos)
    assert q_lab.shape == k_lab.shape == (1, 16, 4)
    assert bool(jnp.any(q_lab != k_lab))
    assert 0.25 < float(jnp.mean(q_lab)) < 0.75 and 0.25 < float(jnp.mean(k_lab)) < 0.75
