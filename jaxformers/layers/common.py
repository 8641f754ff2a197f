"""Small helpers shared by the layers."""
import jax
import jax.numpy as jnp
import flax.linen as nn

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name):
    """``"bfloat16"`` -> ``jnp.bfloat16`` (dtypes pass through); an unknown name is a ``ValueError``."""
    if not isinstance(name, str):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r} is not allowed; choose one of {list(_DTYPES)}")
    return _DTYPES[name]


def dropout(module, x, rate: float):
    """Inverted dropout of ``x`` at ``rate`` with ``module``'s ``dropout`` rng stream.

    Active only when the module was applied with a ``dropout`` rng (the trainer passes one
    to the training loss, ``jaxformers.training.losses.apply_model``); evaluation and
    generation pass none, so they are deterministic.  ``rate=0`` is the identity.
    """
    if not rate or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def normal(std):
    return nn.initializers.normal(stddev=std)


def output_std(config):
    """Std of residual-branch output projections (GPT-2 scaled init)."""
    if config.scale_residual_init:
        return config.init_std / (2 * config.n_layer) ** 0.5
    return config.init_std


def segment_index(segment_ids):
    """``[B, T]`` int32: number of segment starts up to ``t`` (a start is where the id changes),
    so two steps are in the same segment exactly when their indices are equal.

    The models' meaning of packed ``segment_ids``: a segment is a *run* of equal ids, so an
    id that comes back later in a row starts a new segment (positions restart there too).
    :class:`jaxformers.models.transformer.Transformer` maps its ``segment_ids`` through this
    once, so attention (whose ops join equal ids wherever they are), SSM layers and
    positions all agree."""
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], jnp.int32),
                            jnp.cumsum(starts.astype(jnp.int32), axis=1)], axis=1)
