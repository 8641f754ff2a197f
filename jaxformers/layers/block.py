"""The pre-norm transformer block shared by GPT and Llama.

x = x + Attn(Norm(x));  x = x + MLP(Norm(x))
"""
import flax.linen as nn

from ..sharding import ACT_EMBED, BATCH, LENGTH, constrain
from .attention import Attention
from .mlp import make_mlp
from .norms import make_norm


class Block(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, kv_cache=None, cache_index=None):
        """x ``[B, T, D]`` -> (x ``[B, T, D]``, new kv_cache or None)."""
        c = self.config
        h, new_cache = Attention(c, name="attn")(make_norm(c, "attn_norm")(x), positions, segment_ids,
                                                 kv_cache, cache_index)
        x = x + h
        x = x + make_mlp(c, "mlp")(make_norm(c, "mlp_norm")(x))
        return constrain(x, (BATCH, LENGTH, ACT_EMBED)), new_cache
