"""Toy modules shared by the tests of the extension points (hooks, auxiliary losses)."""
import flax.linen as nn
import jax.numpy as jnp


class SowMLP(nn.Module):
    """GELU MLP that also reports an auxiliary loss ``toy`` (mean squared hidden activation)."""
    config: object

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(4 * self.config.d_model, use_bias=False, name="fc")(x))
        self.sow("losses", "toy", jnp.mean(h.astype(jnp.float32) ** 2))
        return nn.Dense(self.config.d_model, use_bias=False, name="proj")(h)
