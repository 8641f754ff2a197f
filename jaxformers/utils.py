"""Parameter counting, FLOP estimates and param-tree helpers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np


def init_params(module, rng, tokens=None, **kwargs):
    """``module.init`` then unbox: a plain pytree of arrays (no partitioning boxes)."""
    if tokens is None:
        tokens = jnp.zeros((1, min(8, module.config.max_seq_len)), jnp.int32)
    return nn.unbox(module.init(rng, tokens, **kwargs)["params"])


def logical_axes(module, tokens=None):
    """Pytree of logical ``PartitionSpec``s matching the params (from eval_shape: no FLOPs)."""
    if tokens is None:
        tokens = jnp.zeros((1, min(8, module.config.max_seq_len)), jnp.int32)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens)
    return nn.get_partition_spec(abstract)["params"]


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def abstract_param_count(module) -> int:
    tokens = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda r: nn.unbox(module.init(r, tokens)["params"]), jax.random.PRNGKey(0))
    return count_params(shapes)


def flops_per_token(config, seq_len: int, n_params: int = None) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 N' + 12 L H Dh T.

    N' counts every matmul weight: all params minus the embedding lookup table,
    plus the output head (which is the same table when embeddings are tied).
    Only attention layers add the attention term (``config.n_attention_layers``);
    the SSM scan of Mamba layers (O(d_inner * d_state) per token) is not counted.
    Causal attention is counted in full (as PaLM/MaxText do) so MFU is comparable.
    """
    if n_params is None:
        from .registry import build
        n_params = abstract_param_count(build(config))
    matmul_params = n_params - config.vocab_size * config.d_model  # no FLOPs in the lookup
    if config.tie_embeddings:
        matmul_params += config.vocab_size * config.d_model  # ...but the tied head is a matmul
    attn = 12 * config.n_attention_layers * config.n_head * config.dim_head * seq_len
    return 6.0 * matmul_params + attn
