"""The decoder-only transformer that every architecture starts from.

tokens [B, T] -> Embed -> N x Block -> final Norm -> logits [B, T, V] (float32)

Subclasses change only what their paper changes, through these hooks:

* ``block_class()``: the block of every layer (``Block.using(mixer=..., mlp=...)``
  swaps the token mixer or the MLP without forking ``Block``);
  ``layer_classes()``: one block class per layer (hybrids);
  ``layer_configs()``: the config each of those blocks is built with (default: the model's;
  layer-parallel pairs run as one block with a wider config, ``jaxformers.transforms``; one per
  block class, else a ``ValueError``: :meth:`Transformer.layer_specs`);
* ``run_blocks(x, positions, segment_ids, layer_caches, cache_index)``: how blocks are
  chained (DenseFormer's depth-weighted averages, repeated blocks, ...);
* extra ``setup`` parameters.

Remat (:func:`remat_block`) and the layer scan (:func:`scan_blocks`) are applied here,
in one place, for every architecture.  Auxiliary losses that blocks ``sow`` into the
``losses`` collection are stacked over layers under ``scan_layers`` like the params.

Calling conventions
-------------------
``apply(params, tokens)`` -> logits.
``apply(params, tokens, cache=cache)`` -> (logits, new_cache) for decoding, with
``cache`` from :func:`jaxformers.decoding.init_cache`.
``apply(params, tokens, segment_ids=ids)`` ([B, T] integers, packed documents): a segment
is a *run* of equal ids -- an id that comes back later in a row starts a new segment --
and positions restart at each one.  The model maps the ids to run indices once
(:func:`jaxformers.layers.common.segment_index`) before any block sees them, so every
mixer (attention, which joins equal ids wherever they are, SSM layers, sparse variants)
agrees on where a document starts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..layers import Block, Embed, LMHead, make_norm
from ..layers.common import segment_index
from ..sharding import LAYERS
from ..utils import check_token_ids

_REMAT_POLICIES = {
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # the attention output before W_o (``checkpoint_name(..., "attention_out")`` in Attention)
    "save_attention_out": lambda: jax.checkpoint_policies.save_only_these_names("attention_out"),
}

#: Collections stacked on a leading ``[L]`` axis by the layer scan (params and sown aux losses).
SCANNED_COLLECTIONS = ("params", "losses")


def remat_block(cls, config, scanned: bool):
    """``cls`` under ``config.remat`` (unchanged for ``"none"``).  CSE prevention is only
    needed outside a scan (inside, the scan already stops XLA from merging recomputation)."""
    if config.remat == "none":
        return cls
    return nn.remat(cls, policy=_REMAT_POLICIES[config.remat](), prevent_cse=not scanned)


def scan_blocks(target, config, in_axes, extra_collections=()):
    """``nn.scan`` of a block class (or of a function taking a block first) over
    ``config.n_layer`` layers: params (and sown losses, and any ``extra_collections``, e.g. a
    model's sown ``intermediates``) stacked on the ``layers`` axis."""
    return nn.scan(target, variable_axes={name: 0 for name in SCANNED_COLLECTIONS + tuple(extra_collections)},
                   split_rngs={"params": True, "dropout": True}, in_axes=in_axes, length=config.n_layer,
                   metadata_params={nn.PARTITION_NAME: LAYERS})


def positions_from_segments(segment_ids):
    """Position of each token inside its packed segment: ``[B, T]`` int32."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_pos = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    return t - start_pos


def block_inputs(shape, positions=None, segment_ids=None, cache_index=None):
    """``(segment_ids, positions)`` as every block sees them, for tokens of ``shape`` [B, T]:
    ``segment_ids`` (checked [B, T] integers) mapped to runs of equal ids
    (:func:`jaxformers.layers.common.segment_index`); ``positions`` as given (checked [B, T]
    integers, a [1, T] row broadcast), else
    ``cache_index + t`` when decoding, the position inside each segment with packed ids, or
    ``t``."""
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        if segment_ids.shape != tuple(shape) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be [B, T] = {tuple(shape)} integers, got "
                             f"{segment_ids.dtype} {tuple(segment_ids.shape)}")
        segment_ids = segment_index(segment_ids)  # runs of equal ids (module docstring)
    if positions is not None:
        positions = jnp.asarray(positions)
        if positions.shape not in (tuple(shape), (1, shape[1])) \
                or not jnp.issubdtype(positions.dtype, jnp.integer):
            raise ValueError(f"positions must be [B, T] = {tuple(shape)} integers (or [1, T]), got "
                             f"{positions.dtype} {tuple(positions.shape)}")
        positions = jnp.broadcast_to(positions, tuple(shape))
    else:
        positions = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), tuple(shape))
        if cache_index is not None:
            positions = cache_index + positions
        elif segment_ids is not None:
            positions = positions_from_segments(segment_ids)
    return segment_ids, positions


def check_tokens(tokens, vocab_size=None):
    """``tokens`` must be ``[B, T]`` integers (``B, T >= 1``); with ``vocab_size``, ids in
    ``[0, vocab_size)`` when their values are known (eager calls; under ``jit`` an out-of-range id
    gives NaN logits, and a negative one would index from the end)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T] integers, got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")
    if 0 in tokens.shape:  # else a zero-size reduction error deep inside attention / the scans
        raise ValueError(f"tokens must hold at least one position and one row ([B, T] with B, T >= 1), "
                         f"got shape {tuple(tokens.shape)}: no new tokens")
    if vocab_size is not None:
        check_token_ids(tokens, vocab_size)


def check_attn_dropout(config, classes) -> None:
    """Training (a ``dropout`` rng) with ``attn_dropout > 0`` is an error, not a silent no-op,
    unless the model's token mixers apply it.  Each mixer class (a layer class's ``mixer_class``,
    else the layer class itself) declares what it does with a class attribute
    ``applies_attn_dropout``: ``True`` (it drops its attention probabilities at
    ``config.attn_dropout``, as :class:`~jaxformers.layers.attention.Attention` does), ``False``
    (attention that does not implement it: SCFA, landmark, CoTFormer's repeat attention) or
    ``None`` (no attention probabilities to drop: the SSM mixers of a hybrid).  Refused: a model
    without attention layers (``config.n_attention_layers == 0``: a pure ``mamba`` / ``mamba2``, a
    hybrid with no attention layer), any mixer declaring ``False``, any mixer that declares
    nothing (e.g. a token mixer of your own plugged in through ``Block.using``: it may well
    ignore ``attn_dropout``), and a model none of whose mixers declares ``True``.  The SSM layers
    of a hybrid with attention layers are fine (``None`` beside ``True``).  Evaluation and
    decoding never drop, so they are not checked."""
    rate = getattr(config, "attn_dropout", 0.0)
    if not rate:
        return
    if getattr(config, "n_attention_layers", None) == 0:
        raise ValueError(f"attn_dropout={rate}: model {config.model!r} has no attention layers, so "
                         "attention dropout would do nothing; set attn_dropout=0 (dropout / embed_dropout "
                         "still apply)")
    missing = object()
    declared = {}
    for k in classes:
        mixer = getattr(k, "mixer_class", k)
        declared[mixer.__name__] = getattr(mixer, "applies_attn_dropout", missing)
    ignoring = sorted(name for name, v in declared.items() if v is False)
    if ignoring:
        raise ValueError(f"attn_dropout={rate}: the attention of model {config.model!r} "
                         f"({', '.join(ignoring)}) does not implement attention dropout; set "
                         "attn_dropout=0 (dropout / embed_dropout still apply)")
    undeclared = sorted(name for name, v in declared.items() if not (v is True or v is None))
    if undeclared or not any(v is True for v in declared.values()):
        what = (f"mixer(s) {', '.join(undeclared)} of model {config.model!r} do not declare whether they "
                "apply attention dropout" if undeclared else
                f"no mixer of model {config.model!r} applies attention dropout (applies_attn_dropout: "
                f"{', '.join(f'{n}={v!r}' for n, v in sorted(declared.items()))})")
        raise ValueError(f"attn_dropout={rate}: {what}, so it would be silently ignored; a mixer that drops "
                         "its attention probabilities at config.attn_dropout when a 'dropout' rng is given "
                         "says so with the class attribute applies_attn_dropout = True (None: it has no "
                         "attention probabilities, e.g. an SSM beside attention layers that apply it); "
                         "else set attn_dropout=0 (dropout / embed_dropout still apply)")


class Transformer(nn.Module):
    config: object

    # ------------------------------------------------------------- structure
    def block_class(self):
        """The block of every layer (override, e.g. ``return Block.using(mixer=MyAttention)``)."""
        return Block

    def layer_classes(self):
        """One block class per layer (``[block_class()] * n_layer``; hybrids override)."""
        return [self.block_class()] * self.config.n_layer

    def layer_configs(self):
        """The config of each block of :meth:`layer_classes` (default: the model's for all)."""
        return [self.config] * len(self.layer_classes())

    def layer_specs(self):
        """``[(block class, config)]``, one per layer: :meth:`layer_classes` beside
        :meth:`layer_configs`; ``ValueError`` naming both hooks when they give different numbers
        of layers (zipped as they are, the extra layers would be dropped without a word)."""
        classes, configs = list(self.layer_classes()), list(self.layer_configs())
        if len(classes) != len(configs):
            raise ValueError(f"{type(self).__name__}: layer_classes() gives {len(classes)} layers but "
                             f"layer_configs() {len(configs)} configs: one config per block class (n_layer="
                             f"{self.config.n_layer})")
        return list(zip(classes, configs))

    def setup(self):
        c = self.config
        self.embed = Embed(c)
        self.blocks = self.make_blocks()
        self.final_norm = make_norm(c)
        if not c.tie_embeddings:
            self.lm_head = LMHead(c)

    def scanned_block_class(self):
        """The one block class a layer scan repeats (``scan_layers=True``): every layer must have
        the same class and the model's own config (the scan builds one block from it)."""
        c = self.config
        classes = [cls for cls, _ in self.layer_specs()]
        if len(set(classes)) != 1:
            raise ValueError(f"scan_layers=True needs the same block in every layer; model "
                             f"{c.model!r} has {sorted({k.__name__ for k in classes})}: use "
                             "scan_layers=False")
        if any(cfg != c for cfg in self.layer_configs()):
            raise ValueError(f"scan_layers=True builds every layer from the model's config, but model "
                             f"{c.model!r} gives some layers another config (layer_configs): use "
                             "scan_layers=False")
        return classes[0]

    #: collections besides params and losses that the layer scan stacks per layer (hook)
    scanned_collections = ()

    def make_blocks(self):
        c = self.config
        if c.scan_layers:
            cls = remat_block(self.scanned_block_class(), c, scanned=True)
            return scan_blocks(cls, c, (nn.broadcast, nn.broadcast, 0, nn.broadcast),
                               self.scanned_collections)(c)
        return [remat_block(cls, c, scanned=False)(cfg) for cls, cfg in self.layer_specs()]

    # --------------------------------------------------------------- forward
    def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None):
        tokens = jnp.asarray(tokens)
        check_tokens(tokens, self.config.vocab_size)
        if self.has_rng("dropout"):
            check_attn_dropout(self.config, self.layer_classes())
        t = tokens.shape[1]
        index = None if cache is None else cache["index"]
        segment_ids, positions = block_inputs(tokens.shape, positions, segment_ids, index)
        x = self.embed(tokens)
        layer_caches = None if cache is None else cache["layers"]
        x, new_layer_caches = self.run_blocks(x, positions, segment_ids, layer_caches, index)
        if layer_caches is not None and new_layer_caches is None:  # the next step would forget the past
            raise ValueError(f"{type(self).__name__}.run_blocks returned no layer caches for a decoding call "
                             "(cache given): pass each block its layer cache and return the new ones, or "
                             "refuse decoding with a check_generate() hook")
        logits = self.logits(self.final_norm(x))
        if cache is None:
            return logits
        return logits, {"index": index + t, "layers": new_layer_caches}

    def run_blocks(self, x, positions, segment_ids, layer_caches, cache_index):
        """Chain the blocks: x ``[B, T, D]`` -> (x, new per-layer caches or None)."""
        if self.config.scan_layers:
            return self.blocks(x, positions, segment_ids, layer_caches, cache_index)
        new_caches = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if layer_caches is None else layer_caches[i]
            x, new_cache = block(x, positions, segment_ids, layer_cache, cache_index)
            new_caches.append(new_cache)
        return x, (None if layer_caches is None else new_caches)

    def logits(self, x):
        if self.config.tie_embeddings:
            return self.embed.attend(x)
        return self.lm_head(x)

    # ---------------------------------------------------------------- caches
    def init_layer_caches(self, batch_size, max_len, dtype=None):
        """One empty decoding cache per layer, from each layer's ``mixer_class.init_cache``: a list,
        or with ``scan_layers`` one pytree stacked on a leading ``[L]`` axis (what the scanned
        :meth:`run_blocks` reads).  A model with a :meth:`run_blocks` of its own that keeps other
        caches (e.g. one set per pass) overrides this, building on ``super()``'s layout;
        :func:`jaxformers.decoding.init_cache` takes the result as it is."""
        missing = sorted({cls.mixer_class.__name__ for cls in self.layer_classes()
                          if not callable(getattr(cls.mixer_class, "init_cache", None))})
        if missing:
            raise ValueError(f"model {self.config.model!r} cannot decode: mixer(s) {missing} have no static "
                             "init_cache(config, batch_size, max_len, dtype) (the cache path enables "
                             "decoding; see Block.mixer_class)")
        layers = [cls.mixer_class.init_cache(cfg, batch_size, max_len, dtype)
                  for cls, cfg in self.layer_specs()]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *layers) if self.config.scan_layers else layers
