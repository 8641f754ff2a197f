"""The decoder-only transformer that every architecture starts from.

tokens [B, T] -> Embed -> N x Block -> final Norm -> logits [B, T, V] (float32)

Subclasses change only what their paper changes: ``block_class`` (the block),
``run_blocks`` (how blocks are chained, e.g. DenseFormer's depth-weighted
averages) and extra ``setup`` parameters.

Calling conventions
-------------------
``apply(params, tokens)`` -> logits.
``apply(params, tokens, cache=cache)`` -> (logits, new_cache) for decoding, with
``cache`` from :func:`jaxformers.decoding.init_cache`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..layers import Block, Embed, LMHead, make_norm
from ..layers.attention import init_attention_cache
from ..sharding import LAYERS

_REMAT_POLICIES = {
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": lambda: jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def positions_from_segments(segment_ids):
    """Position of each token inside its packed segment: ``[B, T]`` int32."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_pos = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    return t - start_pos


def check_tokens(tokens, vocab_size=None):
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T] integers, got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")


class Transformer(nn.Module):
    config: object

    # ------------------------------------------------------------- structure
    def block_class(self):
        return Block

    def setup(self):
        c = self.config
        self.embed = Embed(c)
        self.blocks = self.make_blocks()
        self.final_norm = make_norm(c)
        if not c.tie_embeddings:
            self.lm_head = LMHead(c)

    def make_blocks(self):
        c = self.config
        cls = self.block_class()
        if c.remat != "none":
            cls = nn.remat(cls, policy=_REMAT_POLICIES[c.remat](), prevent_cse=not c.scan_layers)
        if c.scan_layers:
            scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                              length=c.n_layer, metadata_params={nn.PARTITION_NAME: LAYERS})
            return scanned(c)
        return [cls(c) for _ in range(c.n_layer)]

    # --------------------------------------------------------------- forward
    def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None):
        check_tokens(tokens)
        t = tokens.shape[1]
        index = None if cache is None else cache["index"]
        if positions is None:
            if cache is not None:
                positions = index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
            elif segment_ids is not None:
                positions = positions_from_segments(segment_ids)
            else:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
        x = self.embed(tokens)
        layer_caches = None if cache is None else cache["layers"]
        x, new_layer_caches = self.run_blocks(x, positions, segment_ids, layer_caches, index)
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
    def init_layer_cache(self, batch_size, max_len, dtype=None):
        """Cache of one layer (subclasses with other mixers override this)."""
        return init_attention_cache(self.config, batch_size, max_len, dtype)

    def init_layer_caches(self, batch_size, max_len, dtype=None):
        """One cache per layer (stacks whose layers differ, e.g. hybrids, override this)."""
        return [self.init_layer_cache(batch_size, max_len, dtype) for _ in range(self.config.n_layer)]
