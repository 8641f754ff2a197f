"""Audit 51: ``attn_dropout`` with a token mixer of your own.

Stop 50 made training with ``attn_dropout > 0`` raise on models whose attention cannot apply it
(``applies_attn_dropout = False``) or that have no attention layer, but a mixer plugged in through
the block hook (the README's ``CausalMean``) that declares nothing was still trained with
``attn_dropout`` silently ignored.  Now every mixer must declare ``applies_attn_dropout``.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jaxformers as jf
from jaxformers.layers import Block
from jaxformers.models import Transformer


class CausalMean(nn.Module):  # the README's example mixer: declares nothing
    config: object

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, cache=None, cache_index=None):
        v = nn.Dense(self.config.d_model, use_bias=False, name="v")(x)
        return jnp.cumsum(v, axis=1) / jnp.arange(1, x.shape[1] + 1)[:, None], None


class DroppingMean(CausalMean):  # says it applies attention dropout
    applies_attn_dropout = True


class NoProbsMean(CausalMean):  # says it has no attention probabilities (as an SSM mixer)
    applies_attn_dropout = None


def _model(*mixers):
    """A Transformer whose layer i uses ``mixers[i]`` (``None``: the built-in Attention)."""
    class Model(Transformer):
        def layer_classes(self):
            return [Block if m is None else Block.using(mixer=m) for m in mixers]
    return Model(jf.get_config("gpt", "tiny", n_layer=len(mixers), d_model=32, n_head=2,
                               attn_dropout=0.1))


def _train_apply(module):
    tokens = jnp.zeros((2, 8), jnp.int32)
    variables = module.init(jax.random.PRNGKey(0), tokens)
    module.apply(variables, tokens)  # evaluation / generation: never checked
    return module.apply(variables, tokens, rngs={"dropout": jax.random.PRNGKey(1)})


def test_an_undeclared_custom_mixer_refuses_attn_dropout_in_training():
    """Used to train with attn_dropout silently ignored."""
    with pytest.raises(ValueError, match=r"attn_dropout=0.1: mixer\(s\) CausalMean of model 'gpt' do not "
                                         r"declare .*applies_attn_dropout = True"):
        _train_apply(_model(CausalMean))
    # beside the built-in attention too (that one applies it, CausalMean would not)
    with pytest.raises(ValueError, match=r"CausalMean.*do not declare"):
        _train_apply(_model(None, CausalMean))


def test_declared_mixers():
    """``True`` trains; ``None`` (no attention probabilities) trains beside a mixer that applies
    it, and alone is refused (nothing would apply it); ``False`` is refused as before."""
    _train_apply(_model(DroppingMean))
    _train_apply(_model(None, NoProbsMean))
    with pytest.raises(ValueError, match=r"no mixer of model 'gpt' applies attention dropout "
                                         r"\(applies_attn_dropout: NoProbsMean=None\)"):
        _train_apply(_model(NoProbsMean))

    class Ignoring(CausalMean):
        applies_attn_dropout = False
    with pytest.raises(ValueError, match=r"\(Ignoring\) does not implement attention dropout"):
        _train_apply(_model(Ignoring))


def test_attn_dropout_zero_trains_any_mixer():
    module = _model(CausalMean)
    module = type(module)(module.config.replace(attn_dropout=0.0, dropout=0.1))
    _train_apply(module)


def test_every_built_in_mixer_declares_what_it_does():
    """Every built-in model's mixers declare ``applies_attn_dropout`` (True / False / None)."""
    from jaxformers.registry import get_spec

    missing = object()
    built_in = [n for n in jf.list_models() if get_spec(n).module_cls.__module__.startswith("jaxformers.")]
    assert len(built_in) >= 14
    for name in built_in:  # (other tests register models of their own in this process)
        for k in jf.build(jf.get_config(name, "tiny")).layer_classes():
            mixer = getattr(k, "mixer_class", k)
            value = getattr(mixer, "applies_attn_dropout", missing)
            assert value is True or value is False or value is None, (name, mixer.__name__)
