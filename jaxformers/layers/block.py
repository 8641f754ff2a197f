"""The pre-norm residual block every architecture shares, with its extension points.

    x = g_mix * x + Mixer(Norm(x))          (Mixer: attention, an SSM, any token mixer)
    x = g_mlp * x + MLP(Norm(x))            (skipped when ``mlp_class`` is None)

(each branch output goes through residual dropout ``config.dropout`` in training)

``g_mix``/``g_mlp`` are learned scalars (init 1) when ``config.skip_gains`` is set,
else 1.  Hooks (class attributes, swapped by subclassing or with :meth:`Block.using`):

* ``mixer_class``: a module ``Mixer(config, name=...)`` called as
  ``mixer(x, positions, segment_ids, cache, cache_index) -> (y, new_cache)`` with
  ``x``/``y`` ``[B, T, D]``; ``new_cache`` is None when ``cache`` is None.  Its
  ``init_cache(config, batch_size, max_len, dtype)`` (static) makes an empty decoding cache.
  Its class attribute ``applies_attn_dropout`` says what it does with ``config.attn_dropout``
  (``True``: drops its attention probabilities in training; ``False``: ignores it; ``None``: has
  no attention probabilities, e.g. an SSM); training with ``attn_dropout > 0`` is refused unless
  it is ``True`` (``None`` only beside mixers that apply it:
  :func:`jaxformers.models.transformer.check_attn_dropout`).
* ``mlp_class``: a module ``MLP(config, name=...)`` called as ``mlp(x) -> y``, or
  None (no MLP sub-layer, as in Mamba blocks); default: the config's ``mlp``
  (GELU or SwiGLU).  A module may ``self.sow("losses", name, scalar)`` an
  auxiliary loss; the trainer adds it.
* ``mixer_name`` / ``mixer_norm_name`` / ``mlp_norm_name``: parameter names, so that
  checkpoints keep their layout (``attn``/``attn_norm``/``mlp_norm`` here).
"""
from __future__ import annotations

import functools

import flax.linen as nn

from ..sharding import ACT_EMBED, BATCH, LENGTH, constrain, param_init
from .attention import Attention
from .common import dropout, dtype_of
from .mlp import make_mlp
from .norms import make_norm

DEFAULT_MLP = "config"  # mlp_class sentinel: the config's ``mlp`` field picks GELU or SwiGLU


class Block(nn.Module):
    config: object

    mixer_class = Attention
    mlp_class = DEFAULT_MLP
    mixer_name = "attn"
    mixer_norm_name = "attn_norm"
    mlp_norm_name = "mlp_norm"

    @classmethod
    def using(cls, *, mixer=None, mlp=DEFAULT_MLP, name=None):
        """A subclass of ``cls`` with ``mixer_class``/``mlp_class`` swapped (None mixer keeps
        ``cls``'s; ``mlp=None`` removes the MLP sub-layer).  Same arguments -> same class."""
        return _derive(cls, mixer or cls.mixer_class, mlp if mlp != DEFAULT_MLP else cls.mlp_class, name)

    def _skip(self, name, x, h):
        """``x + h``, or ``g * x + h`` with a learned scalar ``g`` (init 1) under ``skip_gains``;
        ``h`` goes through residual dropout (``config.dropout``, training only)."""
        h = dropout(self, h, getattr(self.config, "dropout", 0.0))
        if not self.config.skip_gains:
            return x + h
        g = self.param(name, param_init(nn.initializers.ones, ()), (), dtype_of(self.config.param_dtype))
        return g.astype(x.dtype) * x + h

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, cache=None, cache_index=None):
        """x ``[B, T, D]`` -> (x ``[B, T, D]``, new layer cache or None)."""
        c = self.config
        out = self.mixer_class(c, name=self.mixer_name)(
            make_norm(c, self.mixer_norm_name)(x), positions, segment_ids, cache, cache_index)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):  # an array would unpack over its rows
            raise ValueError(f"mixer {self.mixer_class.__name__} must return (y [B, T, D], new_cache or "
                             f"None), got {_describe(out)}")
        h, new_cache = out
        _check_branch("mixer", self.mixer_class, h, x)
        if cache is not None and new_cache is None:  # decoding would go on without the past
            raise ValueError(f"mixer {self.mixer_class.__name__} returned no cache for a decoding call "
                             "(cache given): its cache path must return the updated cache")
        x = self._skip(f"{self.mixer_name}_skip_gain", x, h)
        if self.mlp_class is not None:
            mlp = make_mlp(c, "mlp") if self.mlp_class == DEFAULT_MLP else self.mlp_class(c, name="mlp")
            h = mlp(make_norm(c, self.mlp_norm_name)(x))
            _check_branch("mlp", self.mlp_class, h, x)
            x = self._skip("mlp_skip_gain", x, h)
        return constrain(x, (BATCH, LENGTH, ACT_EMBED)), new_cache


def _describe(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: ({', '.join(_describe(v) for v in value)})"
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} {tuple(shape)}" if shape is not None else type(value).__name__


def _check_branch(hook, cls, h, x) -> None:
    """``ValueError`` naming the hook unless its output ``h`` is an array shaped like its input ``x``."""
    if getattr(h, "shape", None) is None or tuple(h.shape) != tuple(x.shape):
        name = cls if isinstance(cls, str) else cls.__name__
        want = "(y, new_cache) with y" if hook == "mixer" else "y"
        raise ValueError(f"{hook} {name} must return {want} shaped like its input {tuple(x.shape)} "
                         f"([B, T, D]), got {_describe(h)}")


@functools.lru_cache(maxsize=None)
def _derive(base, mixer, mlp, name):
    if mixer is base.mixer_class and mlp is base.mlp_class and name is None:
        return base
    mlp_label = "NoMLP" if mlp is None else ("" if mlp == DEFAULT_MLP else mlp.__name__)
    name = name or f"{base.__name__}_{mixer.__name__}{mlp_label}"
    return type(name, (base,), {"mixer_class": mixer, "mlp_class": mlp, "__module__": base.__module__})
