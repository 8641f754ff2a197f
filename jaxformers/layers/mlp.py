"""Feed-forward blocks.

GeluMLP:  y = W_proj gelu(W_fc x)                  (GPT, 4x expansion; the tanh approximation
          of GELU, as GPT-2 -- llm-baselines / nanoGPT use the exact erf form, ``nn.GELU()``;
          the two differ by < 5e-4 per activation, and every recorded result uses tanh)
SwiGLU:   y = W_down (silu(W_gate x) * W_up x)      (Llama)
"""
import flax.linen as nn
import jax

from ..sharding import ACT_MLP, BATCH, EMBED, LENGTH, MLP, constrain
from .common import output_std
from .linear import Linear


def _dense(features, std, axes, config, name):
    return Linear(features, axes, std=std, dtype=config.dtype, param_dtype=config.param_dtype, name=name)


class GeluMLP(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        c = self.config
        h = _dense(c.ff_dim, c.init_std, (EMBED, MLP), c, "fc")(x)
        h = constrain(jax.nn.gelu(h, approximate=True), (BATCH, LENGTH, ACT_MLP))
        return _dense(c.d_model, output_std(c), (MLP, EMBED), c, "proj")(h)


class SwiGLU(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        c = self.config
        gate = _dense(c.ff_dim, c.init_std, (EMBED, MLP), c, "gate")(x)
        up = _dense(c.ff_dim, c.init_std, (EMBED, MLP), c, "up")(x)
        h = constrain(jax.nn.silu(gate) * up, (BATCH, LENGTH, ACT_MLP))
        return _dense(c.d_model, output_std(c), (MLP, EMBED), c, "down")(h)


def make_mlp(config, name=None):
    return (SwiGLU if config.mlp == "swiglu" else GeluMLP)(config, name=name)
