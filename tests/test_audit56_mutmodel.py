"""Audit 56 (mutation pass over the model core): invariants that surviving hand-made mutants of
``jaxformers/{layers,models/transformer,ops/attention}.py`` showed were untested.

Each test checks behaviour against an independent computation (a float32 formula written here,
counting, or an invariant); tiny shapes, float32 on the CPU."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.layers.common import dropout
from jaxformers.ops.attention import xla_attention


class _Drop(nn.Module):
    rate: float

    def __call__(self, x):
        return dropout(self, x, self.rate)


def test_dropout_keeps_a_one_minus_rate_fraction():
    """rate=0.2 keeps ~80% of the entries (a mask drawn with keep probability ``rate`` kept 20%;
    at rate 0.5 the two are the same, so the rescale test alone cannot tell)."""
    x = jnp.ones((100, 100))
    y = np.asarray(_Drop(0.2).apply({}, x, rngs={"dropout": jax.random.PRNGKey(0)}))
    assert abs((y != 0).mean() - 0.8) < 0.02
    np.testing.assert_allclose(y[y != 0], 1 / 0.8, rtol=1e-6)


def test_attention_dropout_keeps_a_one_minus_rate_fraction_of_the_probabilities():
    """With v = identity the output rows are the (dropped) probabilities: ~80% of the nonzero
    ones kept at rate 0.2, each rescaled by 1/0.8."""
    tk = 64
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, tk, 2, tk)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, tk, 2, tk)), jnp.float32)
    v = jnp.broadcast_to(jnp.eye(tk)[None, :, None, :], (2, tk, 2, tk))
    p = np.asarray(xla_attention(q, k, v, causal=False))
    pd = np.asarray(xla_attention(q, k, v, causal=False, dropout_rate=0.2, dropout_rng=jax.random.PRNGKey(1)))
    kept = pd != 0
    assert abs(kept.mean() - 0.8) < 0.02
    np.testing.assert_allclose(pd[kept], p[kept] / 0.8, rtol=1e-5)


def test_the_layer_scan_gives_every_layer_its_own_dropout_rng():
    """Under ``scan_layers`` each layer draws its own dropout masks (one shared key made every
    layer drop the same entries)."""
    from jaxformers.models.transformer import scan_blocks

    class Draw(nn.Module):
        config: object

        def __call__(self, x, positions, segment_ids, cache, cache_index):
            return x, jax.random.uniform(self.make_rng("dropout"), (4,))

    cfg = jf.get_config("gpt", "tiny", n_layer=3)

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return scan_blocks(Draw, cfg, (nn.broadcast, nn.broadcast, 0, nn.broadcast))(cfg)(
                x, None, None, jnp.zeros((3,)), None)

    _, draws = Outer().apply({}, jnp.zeros((1, 2, 4)), rngs={"dropout": jax.random.PRNGKey(0)})
    draws = np.asarray(draws)
    assert draws.shape == (3, 4)
    assert len({tuple(r) for r in draws}) == 3


def test_rotary_angles_default_theta_is_10000():
    """``rotary_angles(positions, D)`` uses theta = 10000 (RoFormer / Llama 2): w_i = 10000^(-2i/D)."""
    from jaxformers.layers.rotary import rotary_angles
    pos = jnp.arange(5, dtype=jnp.int32)[None]
    cos, sin = rotary_angles(pos, 8)
    ang = np.arange(5)[:, None] * 10000.0 ** (-np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(np.asarray(cos)[0, :, 0], np.cos(ang), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin)[0, :, 0], np.sin(ang), atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, -1e-6])
def test_norms_refuse_an_eps_that_is_not_positive(eps):
    """eps = 0 gives NaN for an all-zero input (0 / sqrt(0)): a ValueError naming eps."""
    from jaxformers.layers.norms import LayerNorm, RMSNorm
    x = jnp.zeros((1, 4))
    for cls in (RMSNorm, LayerNorm):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            cls(eps=eps).init(jax.random.PRNGKey(0), x)


def test_skip_gains_start_at_one():
    """A freshly initialised ``skip_gains`` model is the plain residual model (gains init 1)."""
    from jaxformers.layers import Block
    cfg = jf.get_config("gpt", "tiny", n_layer=1, d_model=16, n_head=2, skip_gains=True)
    x = jnp.ones((1, 3, 16))
    params = nn.unbox(Block(cfg).init(jax.random.PRNGKey(0), x, jnp.arange(3)[None])["params"])
    assert float(params["attn_skip_gain"]) == 1.0 and float(params["mlp_skip_gain"]) == 1.0


def test_the_attention_dropout_path_keeps_the_window_and_the_segments():
    """Training with ``attn_dropout`` runs its own attention call (XLA with dropout): at a rate so
    small that nothing is dropped it equals evaluation, sliding window and packed segments included."""
    cfg = jf.get_config("llama", "tiny", n_layer=1, window=3, attn_dropout=1e-9, dropout=0.0,
                        embed_dropout=0.0)
    m = jf.build(cfg)
    tokens = (jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 7) % cfg.vocab_size
    seg = jnp.asarray([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]], jnp.int32)
    params = m.init(jax.random.PRNGKey(0), tokens)
    evl = m.apply(params, tokens, segment_ids=seg)
    train = m.apply(params, tokens, segment_ids=seg, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_allclose(train, evl, rtol=1e-5, atol=1e-5)
    # (and the window and the segments do change the output, so the check has teeth)
    assert not np.allclose(m.apply(params, tokens), evl, atol=1e-3)
    assert not np.allclose(jf.build(cfg.replace(window=None)).apply(params, tokens, segment_ids=seg), evl,
                           atol=1e-3)


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_residual_output_projections_are_initialised_with_the_scaled_std(model):
    """GPT-2 scaled init: attention ``o`` and the MLP's output projection (``proj`` / ``down``)
    ~ N(0, init_std / sqrt(2 L)); the input projections keep init_std."""
    cfg = jf.get_config(model, "tiny", n_layer=2, d_model=64, n_head=4, init_std=0.02)
    params = jax.jit(jf.build(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(nn.unbox(params))}
    out = 0.02 / 2.0
    for name, want in (("['attn']['o']", out), ("['mlp']['proj']" if model == "gpt" else "['mlp']['down']", out),
                       ("['attn']['q']", 0.02), ("['mlp']['fc']" if model == "gpt" else "['mlp']['up']", 0.02)):
        std = np.std(np.concatenate([x.ravel() for k, x in flat.items() if name in k and k.endswith("['kernel']")]))
        assert std == pytest.approx(want, rel=0.05), name


@pytest.mark.parametrize("shape", [(2, 1), (1, 1), (2, 3)])
def test_positions_of_another_shape_are_refused_not_broadcast(shape):
    """Only [B, T] and [1, T] positions are taken: a [B, 1] column would broadcast to one position
    for every token, silently."""
    from jaxformers.models.transformer import block_inputs
    with pytest.raises(ValueError, match=r"positions must be \[B, T\]"):
        block_inputs((2, 5), positions=jnp.zeros(shape, jnp.int32))
    _, pos = block_inputs((2, 5), positions=jnp.arange(5, dtype=jnp.int32)[None])
    np.testing.assert_array_equal(pos, np.tile(np.arange(5), (2, 1)))


def test_write_kv_cache_takes_a_capacity_of_the_whole_cache():
    """``capacity`` may be anything in [0, S]: capacity=S is the same as none; one more is refused,
    and a write past the capacity is refused like one past S."""
    from jaxformers.layers.attention import init_attention_cache, write_kv_cache
    cfg = jf.get_config("gpt", "tiny", n_layer=1)
    cache = init_attention_cache(cfg, 1, 4)
    k = jnp.ones((1, 2, cfg.kv_heads, cfg.dim_head))
    full = write_kv_cache(cache, k, 2 * k, 2, capacity=4)
    np.testing.assert_array_equal(full["v"], write_kv_cache(cache, k, 2 * k, 2)["v"])
    with pytest.raises(ValueError, match=r"capacity must be an int in \[0, S=4\]"):
        write_kv_cache(cache, k, k, 0, capacity=5)
    with pytest.raises(ValueError, match="full"):
        write_kv_cache(cache, k, k, 2, capacity=3)


def test_residual_dropout_uses_the_dropout_rate():
    """``dropout`` (the branch outputs' rate) drops in training even with attn_dropout = 0, and
    an attn_dropout alone leaves the residual branches whole (the test above)."""
    cfg = jf.get_config("gpt", "tiny", n_layer=1, dropout=0.3, attn_dropout=0.0, embed_dropout=0.0)
    m = jf.build(cfg)
    tokens = jnp.arange(8, dtype=jnp.int32)[None] % cfg.vocab_size
    params = m.init(jax.random.PRNGKey(0), tokens)
    train = m.apply(params, tokens, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(train, m.apply(params, tokens), atol=1e-3)


def test_packed_positions_restart_at_zero_in_every_segment():
    """Position inside each run of equal ids, from 0 (as an unpacked sequence's), also through
    the model's ``block_inputs`` (a uniform +1 shift is invisible to RoPE's scores, so only this
    direct check sees it)."""
    from jaxformers.models.transformer import block_inputs, positions_from_segments
    ids = jnp.asarray([[5, 5, 7, 7, 7, 5], [1, 1, 1, 1, 1, 1]], jnp.int32)
    want = [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    np.testing.assert_array_equal(positions_from_segments(ids), want)
    np.testing.assert_array_equal(block_inputs(ids.shape, segment_ids=ids)[1], want)


@pytest.mark.parametrize("causal", [True, False])
def test_a_window_past_int32_hides_nothing(causal):
    """A window >= 2**31 (int32 positions) is the same as no window, also with a q_offset
    (decoding), where ``attention`` keeps the window: it must not overflow the position math."""
    from jaxformers.ops.attention import attention
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 2, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 6, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 6, 2, 8)), jnp.float32)
    want = attention(q, k, v, causal=causal, q_offset=3, implementation="xla")
    got = attention(q, k, v, causal=causal, q_offset=3, window=2**40, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["pallas", "cudnn"])
def test_attention_dropout_with_a_kernel_implementation_is_refused(impl):
    """Only XLA has attention dropout: an explicit kernel is a ValueError, never silently XLA."""
    from jaxformers.ops.attention import attention
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="attention dropout runs on implementation='xla' only"):
        attention(q, q, q, dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0), implementation=impl)


def test_the_models_norms_use_norm_eps():
    """Every norm of the model (the blocks' and the final one) takes ``config.norm_eps``: a huge eps
    shrinks the normalised activations, so it changes the logits (a fixed 1e-6 ignored it, and
    1e-6 is what the HF checkpoints of the other tests use)."""
    from jaxformers.layers.norms import make_norm
    cfg = jf.get_config("llama", "tiny", n_layer=1, norm_eps=0.25)
    assert make_norm(cfg).eps == 0.25
    m = jf.build(cfg)
    tokens = jnp.arange(6, dtype=jnp.int32)[None]
    params = m.init(jax.random.PRNGKey(0), tokens)
    assert not np.allclose(m.apply(params, tokens), jf.build(cfg.replace(norm_eps=1e-6)).apply(params, tokens),
                           atol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_a_bfloat16_model_returns_float32_logits(tied):
    """Logits are float32 (float32 accumulation) whatever the compute dtype, tied head or not."""
    cfg = jf.get_config("gpt", "tiny", n_layer=1, d_model=16, n_head=2, dtype="bfloat16", tie_embeddings=tied)
    m = jf.build(cfg)
    tokens = jnp.arange(4, dtype=jnp.int32)[None]
    assert m.apply(m.init(jax.random.PRNGKey(0), tokens), tokens).dtype == jnp.float32
