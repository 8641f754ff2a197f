"""Foundation III: block hooks (mixer / MLP swaps), remat in one place, per-family configs,
FLOPs of shared weights, and sampling."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.config import ModelConfig, TransformerConfig
from jaxformers.layers import Block
from jaxformers.models.transformer import Transformer
from jaxformers.registry import config_from_dict, register
from toy_models import SowMLP


# --------------------------------------------------------------- toy hooks
class CumMeanMixer(nn.Module):
    """Toy token mixer: y_t = W_o mean_{s <= t} W_v x_s, with a running-sum decoding cache."""
    config: object

    @staticmethod
    def init_cache(config, batch_size, max_len, dtype=None):
        return {"sum": jnp.zeros((batch_size, config.d_model), jnp.float32)}

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, cache=None, cache_index=None):
        d, t = self.config.d_model, x.shape[1]
        v = nn.Dense(d, use_bias=False, name="v")(x).astype(jnp.float32)
        csum = jnp.cumsum(v, axis=1)
        start = 0
        if cache is not None:
            csum = csum + cache["sum"][:, None]
            start = cache_index
        count = (start + jnp.arange(1, t + 1)).astype(jnp.float32)
        y = csum / count[None, :, None]
        new_cache = None if cache is None else {"sum": csum[:, -1]}
        return nn.Dense(d, use_bias=False, name="o")(y.astype(x.dtype)), new_cache


class ToyLM(Transformer):
    def block_class(self):
        return Block.using(mixer=CumMeanMixer, mlp=SowMLP)


register("test-toy-hooks", TransformerConfig, ToyLM,
         {"tiny": dict(vocab_size=64, d_model=32, n_layer=3, n_head=2, max_seq_len=32)})


def _tokens(b=2, t=11, vocab=64, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, vocab)


def _decode_matches_forward(module, params, tok, atol=2e-5):
    full = module.apply({"params": params}, tok)
    cache = jf.init_cache(module, tok.shape[0], 16)
    step = jax.jit(lambda p, t, cache: module.apply({"params": p}, t, cache=cache))
    logits, cache = step(params, tok[:, :4], cache)
    outs = [logits]
    for i in range(4, tok.shape[1]):
        logits, cache = step(params, tok[:, i:i + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=atol, rtol=1e-5)
    return full


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": True, "remat": "full"},
                                       {"remat": "dots"}, {"skip_gains": True, "scan_layers": True}])
def test_swapped_mixer_and_mlp(overrides):
    c = jf.get_config("test-toy-hooks", "tiny", **overrides)
    m = jf.build(c)
    tok = _tokens()
    params = jf.init_params(m, jax.random.PRNGKey(1))
    blocks = params["blocks"] if c.scan_layers else params["blocks_0"]
    assert set(blocks["attn"]) == {"v", "o"} and set(blocks["mlp"]) == {"fc", "proj"}
    assert ("attn_skip_gain" in blocks) == c.skip_gains
    full = _decode_matches_forward(m, params, tok)
    # the toy mixer is causal: changing the last token leaves earlier logits alone
    moved = m.apply({"params": params}, tok.at[:, -1].set((tok[:, -1] + 1) % 64))
    np.testing.assert_allclose(moved[:, :-1], full[:, :-1], atol=1e-6)
    # the MLP's sown loss comes out of the `losses` collection, once per layer
    _, aux = m.apply({"params": params}, tok, mutable=["losses"])
    leaves = jax.tree.leaves(aux["losses"])
    total = sum(float(jnp.sum(x)) for x in leaves)
    n = sum(int(np.size(x)) for x in leaves)
    assert n == c.n_layer and total > 0


def test_using_is_cached_and_keeps_defaults():
    assert Block.using() is Block
    assert Block.using(mixer=CumMeanMixer) is Block.using(mixer=CumMeanMixer)
    no_mlp = Block.using(mlp=None)
    assert no_mlp.mlp_class is None and no_mlp.mixer_class is Block.mixer_class
    c = jf.get_config("gpt", "tiny")
    x = jnp.ones((1, 4, c.d_model))
    params = no_mlp(c).init(jax.random.PRNGKey(0), x, jnp.zeros((1, 4), jnp.int32))["params"]
    assert set(params) == {"attn", "attn_norm"}


class _WiderLastLayer(Transformer):
    """A model whose last layer is built with another config (the ``layer_configs`` hook)."""

    def layer_configs(self):
        c = self.config
        return [c] * (c.n_layer - 1) + [dataclasses.replace(c, d_ff=2 * c.ff_dim)]


def test_scan_layers_refuses_per_layer_configs():
    """The layer scan builds every layer from the model's config: a model that gives a layer another
    config works unrolled, and is refused (not silently built with the wrong config) when scanned."""
    c = jf.get_config("gpt", "tiny")
    params = jf.init_params(_WiderLastLayer(c), jax.random.PRNGKey(0))
    widths = [params[f"blocks_{i}"]["mlp"]["fc"]["kernel"].shape[-1] for i in range(c.n_layer)]
    assert widths == [c.ff_dim] * (c.n_layer - 1) + [2 * c.ff_dim]
    with pytest.raises(ValueError, match="layer_configs"):
        jf.init_params(_WiderLastLayer(dataclasses.replace(c, scan_layers=True)), jax.random.PRNGKey(0))


@pytest.mark.parametrize("name", ["gpt", "llama", "mamba"])
def test_skip_gains_at_init_equal_baseline(name):
    base = jf.get_config(name, "tiny")
    gained = base.replace(skip_gains=True)
    tok = _tokens(vocab=256)
    params = jf.init_params(jf.build(gained), jax.random.PRNGKey(0))
    plain = {k: ({kk: vv for kk, vv in v.items() if not kk.endswith("skip_gain")} if k.startswith("blocks")
                 else v) for k, v in params.items()}
    a = jf.build(gained).apply({"params": params}, tok)
    b = jf.build(base).apply({"params": plain}, tok)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_attention_out_policy_names_the_attention_output():
    c = jf.get_config("gpt", "tiny", remat="save_attention_out", n_layer=2)
    m = jf.build(c)
    tok = _tokens(vocab=256)
    params = jf.init_params(m, jax.random.PRNGKey(0))
    loss = lambda p, mm: jnp.mean(mm.apply({"params": p}, tok) ** 2)  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, m))
    assert "attention_out" in jaxpr
    g_remat = jax.grad(loss)(params, m)
    g_plain = jax.grad(loss)(params, jf.build(c.replace(remat="none")))
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------- configs per family
def test_ssm_config_has_no_attention_fields():
    c = jf.get_config("mamba", "tiny", d_model=100)  # no rotary head_dim check on a model without heads
    assert not hasattr(c, "n_head") and c.n_attention_layers == 0
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['n_head'\]"):
        jf.get_config("mamba", "tiny", n_head=4)
    with pytest.raises(ValueError, match="n_head"):  # hybrids keep the attention family's checks
        jf.get_config("hybrid", "tiny", n_head=3)
    with pytest.raises(ValueError, match="skip_gains"):
        jf.get_config("mamba", "tiny", skip_gains="yes")


def test_old_saved_ssm_config_still_loads():
    c = jf.get_config("mamba2", "tiny")
    old = dict(c.to_dict(), n_head=4, n_kv_head=None, head_dim=None, d_ff=None, mlp="gelu",
               rope_theta=10000.0, attention_impl="auto", window=None)  # as saved before the split
    assert config_from_dict(old) == c
    with pytest.raises(ValueError, match="unknown config field"):
        config_from_dict(dict(c.to_dict(), not_a_field=1))


def test_family_classes():
    assert isinstance(jf.get_config("gpt"), TransformerConfig)
    assert isinstance(jf.get_config("denseformer"), TransformerConfig)
    mamba = jf.get_config("mamba")
    assert isinstance(mamba, ModelConfig) and not isinstance(mamba, TransformerConfig)
    assert isinstance(jf.get_config("hybrid"), TransformerConfig)


# --------------------------------------------------------------- FLOPs
@dataclasses.dataclass(frozen=True)
class RepeatConfig(TransformerConfig):
    """Every block applied ``repeats`` times in a row (weight sharing across depth)."""
    model: str = "test-toy-repeat"
    repeats: int = 2

    def param_uses(self, path):
        return float(self.repeats) if path[0].startswith("blocks") else super().param_uses(path)

    @property
    def n_attention_layers(self):
        return self.repeats * self.n_layer


class RepeatLM(Transformer):
    def run_blocks(self, x, positions, segment_ids, layer_caches, cache_index):
        for block in self.blocks:
            for _ in range(self.config.repeats):
                x, _ = block(x, positions, segment_ids)
        return x, None


register("test-toy-repeat", RepeatConfig, RepeatLM, {"tiny": dict(jf.get_config("gpt", "tiny").to_dict(),
                                                                  model="test-toy-repeat")})


def test_flops_count_a_block_applied_twice_twice():
    rep = jf.get_config("test-toy-repeat", "tiny", n_layer=2, repeats=2)
    deep = jf.get_config("gpt", "tiny", n_layer=4)
    shallow = jf.get_config("gpt", "tiny", n_layer=2)
    # 2 blocks applied twice do the work of 4 distinct blocks (same widths): same FLOPs
    assert jf.count_params(jf.init_params(jf.build(rep), jax.random.PRNGKey(0))) < \
        jf.count_params(jf.init_params(jf.build(deep), jax.random.PRNGKey(0)))
    assert rep.flops_per_token(128) == pytest.approx(deep.flops_per_token(128), rel=1e-12)
    assert rep.flops_per_token(128) > shallow.flops_per_token(128)
    # the free function and an explicit params tree agree with the method
    params = jf.init_params(jf.build(rep), jax.random.PRNGKey(0))
    assert jf.flops_per_token(rep, 128, params) == rep.flops_per_token(128)


def test_flops_embedding_lookup_is_free_unless_tied():
    tied = jf.get_config("gpt", "tiny")
    untied = tied.replace(tie_embeddings=False)
    n_tied = jf.count_params(jf.init_params(jf.build(tied), jax.random.PRNGKey(0)))
    n_untied = jf.count_params(jf.init_params(jf.build(untied), jax.random.PRNGKey(0)))
    attn = 12 * tied.n_layer * tied.n_head * tied.dim_head * 64
    assert tied.flops_per_token(64) == 6 * n_tied + attn  # tied: the table is the head matmul
    assert untied.flops_per_token(64) == 6 * (n_untied - tied.vocab_size * tied.d_model) + attn


# --------------------------------------------------------------- sampling
def test_sampling_follows_the_distribution():
    """An argmax-only (or top-1) sampler fails this: every kept token must be drawn, at its rate."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None]
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: jf.sample_logits(logits, k)[0])(keys))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.03)
    top2 = np.asarray(jax.vmap(lambda k: jf.sample_logits(logits, k, top_k=2)[0])(keys))
    np.testing.assert_allclose(np.bincount(top2, minlength=4) / len(top2), [0.625, 0.375, 0, 0], atol=0.03)
    hot = np.asarray(jax.vmap(lambda k: jf.sample_logits(logits, k, temperature=0.5)[0])(keys))
    sharp = probs ** 2 / np.sum(probs ** 2)  # temperature 0.5 squares the probabilities
    np.testing.assert_allclose(np.bincount(hot, minlength=4) / len(hot), sharp, atol=0.03)


class RowShiftMixer(CumMeanMixer):
    """The toy mixer plus the batch row index: its output depends on the row."""

    def __call__(self, x, positions=None, segment_ids=None, cache=None, cache_index=None):
        rows = jnp.arange(x.shape[0], dtype=x.dtype)[:, None, None]
        return super().__call__(x + 3.0 * rows, positions, segment_ids, cache, cache_index)


class RowDependentLM(Transformer):
    rows_share_prefill = False

    def block_class(self):
        return Block.using(mixer=RowShiftMixer)


def test_rows_share_prefill_false_prefills_every_sample_row():
    """``generate(num_samples=k)`` of a model whose output depends on the batch row
    (``rows_share_prefill = False``) == generating from the repeated prompts; sharing one
    prefill (the default) would give other tokens."""
    c = jf.get_config("test-toy-hooks", "tiny")
    own, shared = RowDependentLM(c), type("Shared", (RowDependentLM,), {"rows_share_prefill": True})(c)
    p = {"params": jax.tree.map(lambda x: 4 * x, jf.init_params(own, jax.random.PRNGKey(2)))}
    prompt = _tokens(b=1, t=6)
    want = jf.generate(own, p, jnp.repeat(prompt, 3, axis=0), 5, temperature=0.0)
    np.testing.assert_array_equal(jf.generate(own, p, prompt, 5, temperature=0.0, num_samples=3), want)
    assert (jf.generate(shared, p, prompt, 5, temperature=0.0, num_samples=3) != want).any()
