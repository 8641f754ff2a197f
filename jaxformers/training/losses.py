"""Loss functions over batch dicts, a registry by name, and the auxiliary-loss channel.

Batch dict
----------
A batch is a ``dict`` of arrays that all share the leading batch axis ``B`` (the
trainer shards every array on it and splits it into micro-batches, whatever the key)::

    tokens       int32   [B, T+1]  windows: the model reads tokens[:, :-1] and predicts tokens[:, 1:];
                                   a negative id (-1, or Hugging Face's -100) is padding: it is
                                   read as id 0 and is never a target (its weight is 0)
    loss_mask    float32 [B, T+1]  optional, aligned with ``tokens``: loss_mask[:, t] is the weight of
                                   predicting tokens[:, t] (from tokens[:, :t]); column 0 is never a
                                   target and is ignored.  Absent = every target weighs 1.
    segment_ids  int32   [B, T+1]  optional, packed documents, aligned with ``tokens``: the model gets
                                   segment_ids[:, :-1] (attention stays inside a document, positions
                                   restart at each document), and the target tokens[:, t] is only
                                   counted if segment_ids[:, t] == segment_ids[:, t-1].
    positions    int32   [B, T+1]  optional, aligned with ``tokens``; the model gets positions[:, :-1].
    <anything>   [B, ...]          e.g. ``domain`` [B], teacher ``logits`` [B, T, V]: carried along
                                   untouched; a loss ignores the keys it does not use.

Every per-token key is aligned with ``tokens`` (``[B, T+1]``), so one rule slices
them all: the input side is ``[:, :-1]``, the target side ``[:, 1:]``.  Synthetic
tasks (:mod:`jaxformers.data.synthetic`) return ``(tokens, loss_mask)`` in exactly
this alignment.

Loss functions
--------------
``loss_fn(module, params, batch, rng) -> (loss, metrics)``: ``loss`` is the float32
scalar to minimise, ``metrics`` a dict of float32 scalars (logged under their
names).  ``rng`` is a PRNG key (``None`` in evaluation).  Two metric names are
reserved: ``loss`` (set by the step functions to the returned loss) and
``n_targets``, the total weight the loss averaged over (``sum(w)``): when present,
micro-batches of an accumulated step and evaluation batches are combined weighted
by it, so a step over 2 micro-batches equals one over the whole batch even when
the masks differ.  Register a function with :func:`register_loss` and pick it
with ``TrainConfig(loss=NAME)``, or pass it to ``train(..., loss_fn=fn)``.  A loss that
runs the model on more positions than a window's ``T`` (e.g. it inserts landmark tokens) says
so with an attribute ``loss_fn.model_positions(model_config, T) -> int``: the trainer's
FLOPs per token and MFU then count the work of those positions per token of the data.

Auxiliary losses
----------------
A module reports one with ``self.sow("losses", NAME, scalar)`` (every layer may
sow the same name; scanned layers too, see below).  :func:`apply_model` applies
the model with ``mutable=["losses"]`` and returns ``(logits, aux_losses)`` with
each name summed over every layer and every sow.  Loss functions that use it get
the auxiliary channel for free: the step functions (:mod:`.steps`) collect every
``aux_losses`` produced inside the loss function and add
``sum(weight[name] * aux_losses[name])`` to the loss that is differentiated --
so a loss function must *not* add them itself.  Weights come from
``TrainConfig.aux_loss_weights`` (``{name: weight}``); a name that is not listed
has weight 1.0 (a module scales what it sows; set 0.0 to only log it).  The logged
``loss`` is the loss function's own loss (comparable with ``val_loss``);
``aux/<name>`` is each unweighted sum and ``total_loss`` the optimised sum.
With ``grad_accum`` the auxiliary losses weigh the same in every micro-batch (not by its
``n_targets``): a per-token mean over the micro-batch's tokens then equals the whole batch's.
Evaluation reports the loss function's loss only.

With ``scan_layers=True`` the layers run inside ``nn.scan``, which silently drops
sown values unless the ``losses`` collection is listed in its ``variable_axes``: the
shared layer scan (:func:`jaxformers.models.transformer.scan_blocks`) lists it, so the
values come out stacked ``[n_layer]`` and :func:`apply_model` sums them; a model with
its own ``nn.scan`` must use ``variable_axes={"params": 0, "losses": 0}`` too.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from ..utils import check_token_ids

__all__ = [
    "AUX_COLLECTION", "LossFn", "apply_model", "collect_aux_losses", "cross_entropy", "get_loss",
    "list_losses", "model_inputs", "next_token_targets", "register_loss", "sum_sown", "weighted_mean",
]

AUX_COLLECTION = "losses"

LossFn = Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]

# ----------------------------------------------------------------------------- batch helpers


def model_inputs(batch: Mapping[str, jax.Array]) -> Tuple[jax.Array, dict]:
    """``(tokens [B, T], kwargs)`` for ``module.apply``: the input side of a batch dict
    (``segment_ids`` / ``positions`` keyword arguments only when the batch has them).  Negative
    ids (padding) are read as id 0: an embedding lookup would otherwise wrap (-1 is the last
    row) or give NaN (-100), which reaches the gradients even where no target is counted."""
    tokens = _tokens(batch)
    kwargs = {}
    for key in ("segment_ids", "positions"):
        if batch.get(key) is not None:
            kwargs[key] = _aligned(batch, key, rows=False)[:, :-1]
    return jnp.maximum(tokens[:, :-1], 0), kwargs


def _tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
    """``batch["tokens"]`` ``[B, T+1]`` (``ValueError`` when absent or not 2-D)."""
    if "tokens" not in batch:
        raise ValueError(f"a batch must have a 'tokens' array [B, T+1]; got keys {sorted(batch)}")
    tokens = batch["tokens"]
    if getattr(tokens, "ndim", None) != 2:
        raise ValueError(f"tokens must be [B, T+1], got shape {tuple(getattr(tokens, 'shape', ()))}")
    return tokens


def _aligned(batch: Mapping[str, jax.Array], key: str, rows: bool = True) -> jax.Array:
    """``batch[key]``, which must be aligned with ``tokens`` (the same ``[B, T+1]`` shape; with
    ``rows=False`` only the ``T+1`` axis: the model checks the rows of what it is given)."""
    value, shape = batch[key], tuple(batch["tokens"].shape)
    got = tuple(getattr(value, "shape", ()))
    if (got != shape) if rows else (len(got) != 2 or got[1] != shape[1]):
        raise ValueError(f"{key} must be aligned with tokens {shape} ([B, T+1]), got {got}")
    return value


def next_token_targets(batch: Mapping[str, jax.Array]) -> Tuple[jax.Array, jax.Array]:
    """``(targets [B, T] int, weights [B, T] float32)``: ``tokens[:, 1:]``, weighted by
    ``loss_mask[:, 1:]``, zero where a target's segment differs from its input's and zero for
    a negative target id (padding, e.g. -100)."""
    targets = _tokens(batch)[:, 1:]
    weights = (targets >= 0).astype(jnp.float32)
    if batch.get("loss_mask") is not None:
        weights = weights * _aligned(batch, "loss_mask")[:, 1:].astype(jnp.float32)
    if batch.get("segment_ids") is not None:
        seg = _aligned(batch, "segment_ids")
        weights = weights * (seg[:, 1:] == seg[:, :-1]).astype(jnp.float32)
    return targets, weights


def weighted_mean(values: jax.Array, weights: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """``(sum(w * v) / sum(w), sum(w))`` in float32; the mean is 0 where ``sum(w) == 0``.

    Entries with ``w == 0`` add exactly nothing, even where ``v`` is NaN or inf (e.g. the
    cross-entropy of a masked target id outside the vocabulary), and get a zero gradient."""
    values = values.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    weighted = jnp.where(weights != 0, values * weights, 0.0)
    mean = jnp.where(total > 0, jnp.sum(weighted) / jnp.where(total > 0, total, 1.0), 0.0)
    return mean, total


# ----------------------------------------------------------------------------- auxiliary losses
_AUX_SINK: contextvars.ContextVar = contextvars.ContextVar("jaxformers_aux_losses", default=None)


@contextlib.contextmanager
def collect_aux_losses():
    """Collect the ``aux_losses`` of every :func:`apply_model` call inside the block (a list of
    dicts, one per call); the step functions use it around the loss function."""
    sink: List[Dict[str, jax.Array]] = []
    token = _AUX_SINK.set(sink)
    try:
        yield sink
    finally:
        _AUX_SINK.reset(token)


def sum_sown(collection) -> Dict[str, jax.Array]:
    """``{name: float32 scalar}`` from a sown collection: ``sow`` appends to a tuple under
    ``.../<module path>/<name>``; every element of every module's tuple is summed (scanned
    layers contribute one stacked array, summed over its layer axis)."""
    out: Dict[str, jax.Array] = {}
    leaves = jax.tree_util.tree_flatten_with_path(collection)[0]
    for path, value in leaves:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = str(names[-1]) if names else "aux"
        value = jnp.sum(jnp.asarray(value, jnp.float32))
        out[name] = out[name] + value if name in out else value
    return out


def apply_model(module, params, batch: Mapping[str, jax.Array], rng=None, **kwargs):
    """``(logits [B, T, V] float32, aux_losses {name: float32 scalar})`` for a batch dict.

    Applies ``module`` to ``tokens[:, :-1]`` (with ``segment_ids`` / ``positions`` when the
    batch has them) with the ``losses`` collection mutable; ``rng`` (if given) is passed
    as the ``dropout`` rng.  ``aux_losses`` is reported to the step functions, which add
    it (weighted) to the loss -- see the module docstring.
    """
    tokens, inputs = model_inputs(batch)
    inputs.update(kwargs)
    if rng is not None:
        inputs["rngs"] = {"dropout": rng}
    logits, state = module.apply({"params": params}, tokens, mutable=[AUX_COLLECTION], **inputs)
    aux = sum_sown(state.get(AUX_COLLECTION, {}))
    sink = _AUX_SINK.get()
    if sink is not None:
        sink.append(aux)
    return logits.astype(jnp.float32), aux


def merge_aux(aux_list) -> Dict[str, jax.Array]:
    """Sum a list of ``aux_losses`` dicts name by name."""
    out: Dict[str, jax.Array] = {}
    for aux in aux_list:
        for name, value in aux.items():
            out[name] = out[name] + value if name in out else value
    return out


def aux_weight(weights: Optional[Mapping[str, float]], name: str):
    """The weight of auxiliary loss ``name`` in ``weights`` (a mapping or ``(name, weight)``
    pairs; values may be traced arrays); 1.0 when not listed."""
    if not weights:
        return 1.0
    return dict(weights).get(name, 1.0)


# ----------------------------------------------------------------------------- built-in losses
def cross_entropy(module, params, batch, rng=None):
    """Next-token cross-entropy (float32), mean over the weighted targets.

    ``sum(w * ce) / sum(w)`` with ``w`` from :func:`next_token_targets` (``loss_mask`` and
    segment boundaries); 0 when no target has weight.  Metrics: ``n_targets`` = ``sum(w)``.
    """
    logits, _ = apply_model(module, params, batch, rng)
    return logits_cross_entropy(logits, batch)


def logits_cross_entropy(logits, batch):
    """``cross_entropy``'s ``(loss, {"n_targets"})`` from the logits ``[B, T, V]`` of
    ``batch["tokens"][:, :-1]`` (for a loss that computes its logits another way).  A counted
    target id outside ``[0, V)`` is a ``ValueError`` when the values are known (eager calls; under
    ``jit`` its cross-entropy is NaN), like an input id in the model."""
    targets, weights = next_token_targets(batch)
    check_token_ids(jnp.where(weights > 0, targets, 0), logits.shape[-1],
                    "target ids (tokens[:, 1:], where counted) must be")
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    loss, n_targets = weighted_mean(per_token, weights)
    return loss, {"n_targets": n_targets}


# ----------------------------------------------------------------------------- registry
_LOSSES: Dict[str, LossFn] = {}
_LOSS_MODULES: Dict[str, Optional[str]] = {}  # name -> the module that registered it


def loss_module(name: str) -> Optional[str]:
    """``__name__`` of the module that registered loss ``name`` (None if unknown)."""
    return _LOSS_MODULES.get(name)


def register_loss(name: str, fn: Optional[LossFn] = None, *, override: bool = False):
    """Register ``fn`` under ``name`` (also usable as a decorator: ``@register_loss("mine")``).

    Registering another function under a taken name raises ``ValueError`` unless
    ``override=True``; registering the same function again is a no-op.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a loss name must be a non-empty string, got {name!r}")
    from ..registry import calling_module
    caller = calling_module()

    def deco(f):
        if not callable(f):
            raise ValueError(f"loss {name!r} must be callable, got {type(f).__name__}")
        if name in _LOSSES and _LOSSES[name] is not f and not override:
            raise ValueError(f"loss {name!r} is already registered; pass override=True to replace it")
        _LOSSES[name] = f
        _LOSS_MODULES[name] = caller
        return f

    return deco if fn is None else deco(fn)


def get_loss(name: str) -> LossFn:
    """The loss function registered as ``name`` (``ValueError`` naming the allowed ones)."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss={name!r}; choose one of {list_losses()} "
                         "(or register one with jaxformers.training.register_loss)")
    return _LOSSES[name]


def list_losses() -> List[str]:
    """Names of every registered loss, sorted."""
    return sorted(_LOSSES)


register_loss("cross_entropy", cross_entropy)
