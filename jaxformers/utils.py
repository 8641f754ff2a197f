"""Parameter counting, FLOP estimates and param-tree helpers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np


def concrete(x):
    """``x`` as a numpy array when its value is known now (a Python / numpy value or a committed
    jax array), ``None`` when it is traced (inside ``jit`` / ``grad``): value checks that can
    only run outside a trace use this."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def file_in_the_way(path):
    """The first of ``path`` and its parents that exists and is not a folder (a file that keeps
    ``path`` from being a directory), or ``None``; a path that cannot be examined (a name too
    long to stat) is skipped: the caller's own ``mkdir`` / write reports it."""
    from pathlib import Path

    path = Path(path).expanduser()
    for p in (path, *path.parents):
        try:
            if p.exists() and not p.is_dir():
                return p
        except OSError:
            continue
    return None


def is_int(v) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def read_json_object(path, hint: str = "") -> dict:
    """The JSON object in the file ``path``; ``ValueError`` naming ``path`` when it is unreadable,
    not JSON (a Git LFS pointer, a truncated write) or another JSON value; ``hint``: what to do,
    appended to the message."""
    import json

    suffix = f": {hint}" if hint else ""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path} is unreadable ({e}){suffix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}{suffix}")
    return data


def plain_int(text: str):
    """``text`` as an int when it is plain ASCII digits, else ``None`` (``int()`` also reads
    ``"1_6"`` as 16, ``"+2"``, ``" 2"`` and non-ASCII digits)."""
    return int(text) if text.isascii() and text.isdigit() else None


def int_arg(name: str, value, lo=None, *, where: str = "") -> int:
    """``value`` as a Python int; ``ValueError`` naming ``name`` (after ``where: ``, if given) for
    a bool, a float or a string (never truncated: ``2.5`` is refused, not read as 2) or a value
    below ``lo``."""
    prefix = f"{where}: " if where else ""
    if not is_int(value):
        raise ValueError(f"{prefix}{name} must be an int, got {value!r}")
    if lo is not None and int(value) < lo:
        raise ValueError(f"{prefix}{name} must be >= {lo}, got {value}")
    return int(value)


def check_token_ids(tokens, vocab_size: int, subject: str = "token ids must be") -> None:
    """``ValueError`` ("<subject> in [0, vocab_size=V), got ids from a to b") unless every id of
    ``tokens`` is in ``[0, vocab_size)``; checked when the values are known (:func:`concrete`),
    skipped under a trace (there an out-of-range id gives NaN logits)."""
    values = concrete(tokens)
    if values is not None and values.size and (values.min() < 0 or values.max() >= vocab_size):
        raise ValueError(f"{subject} in [0, vocab_size={vocab_size}), got ids from {values.min()} to "
                         f"{values.max()}")


def _as_module(module):
    """``module``, or the model a config describes (``jf.build(config)``); ``ValueError`` otherwise."""
    if isinstance(module, nn.Module):
        return module
    if hasattr(module, "model") and hasattr(module, "replace"):  # a model config
        from .registry import build
        return build(module)
    raise ValueError(f"module must be a flax model (jf.build(config)) or a model config, got "
                     f"{type(module).__name__}")


def init_params(module, rng, tokens=None, **kwargs):
    """``module.init`` then unbox: a plain pytree of arrays (no partitioning boxes).  ``module``: a
    model, or its config (built with ``jf.build``)."""
    module = _as_module(module)
    if tokens is None:
        tokens = jnp.zeros((1, min(8, module.config.max_seq_len)), jnp.int32)
    return nn.unbox(module.init(rng, tokens, **kwargs)["params"])


def logical_axes(module, tokens=None):
    """Pytree of logical ``PartitionSpec``s matching the params (from eval_shape: no FLOPs);
    ``module``: a model or its config."""
    module = _as_module(module)
    if tokens is None:
        tokens = jnp.zeros((1, min(8, module.config.max_seq_len)), jnp.int32)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens)
    return nn.get_partition_spec(abstract)["params"]


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def abstract_params(module):
    """The params tree of ``module`` as ``ShapeDtypeStruct``s (``jax.eval_shape``: no FLOPs)."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda r: nn.unbox(module.init(r, tokens)["params"]), jax.random.PRNGKey(0))


def abstract_param_count(module) -> int:
    return count_params(abstract_params(module))


def flops_per_token(config, seq_len: int, params=None) -> float:
    """Training FLOPs per token of ``config`` at context ``seq_len``: ``config.flops_per_token``.

    ``6 * sum_w uses(w) * size(w) + 12 * L_attn * H * Dh * K`` (PaLM appendix B; ``K = T``, or
    ``min(window, T)`` with sliding-window attention): every
    matmul weight counted as often as one token uses it (repeated blocks count per
    application, sparsely activated experts by their active fraction, the embedding
    lookup not at all unless it is the tied head); only attention layers add the attention
    term, the SSM scans of Mamba layers (O(d_inner * d_state) per token) are not counted.
    ``params`` (a params tree, abstract or not) saves building the model.
    """
    return config.flops_per_token(seq_len, params)
