"""Audit 54: layer-parallel pairs and sparse causal flash attention (SCFA) regressions."""
import jax
import jax.numpy as jnp
import pytest

from jaxformers import build, get_config, init_cache


def _decode(module, params, tokens, positions, prompt):
    cache = init_cache(module, tokens.shape[0], tokens.shape[1] + 2)
    out, cache = module.apply({"params": params}, tokens[:, :prompt], positions=positions[:, :prompt], cache=cache)
    outs = [out]
    for i in range(prompt, tokens.shape[1]):
        o, cache = module.apply({"params": params}, tokens[:, i:i + 1], positions=positions[:, i:i + 1],
                                cache=cache)
        outs.append(o)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("name", ["qk_sparse", "hash_sparse"])
def test_scfa_decoding_with_explicit_shifted_positions_equals_the_forward(name):
    # keep bits are indexed by position: the decode step used the cache slots instead of the
    # given positions (qk_sparse: |decode - forward| 0.58 with positions = slots + 5)
    cfg = get_config(name, "tiny", n_layer=2, max_seq_len=64, sparse_impl="reference")
    module = build(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
    params = module.init(jax.random.PRNGKey(0), tokens)["params"]
    positions = jnp.arange(12)[None] + jnp.array([[5], [9]])   # a per-row shift
    full = module.apply({"params": params}, tokens, positions=positions)
    dec = _decode(module, params, tokens, positions, prompt=7)
    assert float(jnp.abs(dec - full).max()) < 1e-4
    # the default positions are unchanged
    default = jnp.broadcast_to(jnp.arange(12)[None], (2, 12))
    full0 = module.apply({"params": params}, tokens)
    assert float(jnp.abs(_decode(module, params, tokens, default, prompt=5) - full0).max()) < 1e-4


def _block_params(**kw):
    cfg = get_config("llama", "tiny", n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32, **kw)
    return build(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]  # boxed


def test_fuse_pair_takes_boxed_params_and_refuses_a_bias_in_one_layer_only():
    import flax.linen as nn
    from jaxformers.transforms.layer_parallel import fuse_pair

    boxed = _block_params(qkv_bias=True)
    plain = nn.unbox(boxed)
    # module.init's boxed params were an AttributeError ('LogicallyPartitioned' ... 'ndim')
    got = fuse_pair(boxed["blocks_0"], boxed["blocks_1"])
    want = fuse_pair(plain["blocks_0"], plain["blocks_1"])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got, want))
    assert got["attn"]["q"]["bias"].shape == (8, 8)
    # a qkv_bias in layer 1 only was silently dropped (in layer 0 only: KeyError 'bias')
    nobias = nn.unbox(_block_params())
    for p0, p1 in ((nobias["blocks_0"], plain["blocks_1"]), (plain["blocks_0"], nobias["blocks_1"])):
        with pytest.raises(ValueError, match=r"same parameters .*'attn/k/bias: "):
            fuse_pair(p0, p1)
