"""Token embedding and the language-model head (tied or untied)."""
import jax.numpy as jnp
import flax.linen as nn

from ..sharding import ACT_EMBED, ACT_VOCAB, BATCH, EMBED, LENGTH, VOCAB, constrain, param_init
from .common import dropout, dtype_of, normal


class Embed(nn.Module):
    """tokens ``[B, T]`` int -> ``[B, T, D]``; ``attend`` gives tied logits."""
    config: object

    def setup(self):
        c = self.config
        self.embedding = self.param("embedding", param_init(normal(c.init_std), (VOCAB, EMBED)),
                                    (c.vocab_size, c.d_model), dtype_of(c.param_dtype))

    def __call__(self, tokens):
        """The residual stream's start: ``dtype``, or float32 under ``residual_fp32``."""
        c = self.config
        x = jnp.take(self.embedding, tokens, axis=0).astype(
            jnp.float32 if getattr(c, "residual_fp32", False) else dtype_of(c.dtype))
        x = dropout(self, x, getattr(self.config, "embed_dropout", 0.0))
        return constrain(x, (BATCH, LENGTH, ACT_EMBED))

    def attend(self, x):  # [B, T, D] -> [B, T, V] float32
        logits = jnp.einsum("btd,vd->btv", x, self.embedding.astype(x.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, (BATCH, LENGTH, ACT_VOCAB))


class LMHead(nn.Module):
    """Untied output projection ``[B, T, D] -> [B, T, V]`` float32."""
    config: object

    @nn.compact
    def __call__(self, x):
        c = self.config
        kernel = self.param("kernel", param_init(normal(c.init_std), (EMBED, VOCAB)),
                            (c.d_model, c.vocab_size), dtype_of(c.param_dtype))
        logits = jnp.einsum("btd,dv->btv", x, kernel.astype(x.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, (BATCH, LENGTH, ACT_VOCAB))
