"""Small helpers shared by the layers."""
import jax.numpy as jnp
import flax.linen as nn

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name):
    """``"bfloat16"`` -> ``jnp.bfloat16`` (dtypes pass through)."""
    return _DTYPES[name] if isinstance(name, str) else name


def normal(std):
    return nn.initializers.normal(stddev=std)


def output_std(config):
    """Std of residual-branch output projections (GPT-2 scaled init)."""
    if config.scale_residual_init:
        return config.init_std / (2 * config.n_layer) ** 0.5
    return config.init_std
