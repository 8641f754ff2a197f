"""Logical axis names and the rules that map them onto a device mesh.

Model code only names axes (``batch``, ``length``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``vocab``, ``layers``, ``expert``); the rules
below map them onto the mesh axes ``data``, ``fsdp``, ``expert`` and ``tensor``.
Activations use the ``act_*`` names so that parameters (sharded over ``fsdp`` on
``embed``) and activations (sharded over ``data``/``fsdp``/``expert`` on ``batch``)
never compete.

The ``expert`` mesh axis is for mixture-of-experts layers: parameters stacked
over experts name the logical axis ``expert`` (e.g. ``[expert, embed, mlp]``)
and are split over it.  Everything else treats ``expert`` as one more
data-parallel axis: ``batch`` is sharded over ``("data", "fsdp", "expert")`` (as
in MaxText), so dense compute is not replicated across the expert groups, and
parameters without an ``expert`` axis are replicated over it (their gradients
are reduced over it like over ``data``).  Inside an MoE layer, activations
dispatched to experts should be named ``(act_expert, batch_no_expert, ...)``:
``act_expert`` takes the ``expert`` mesh axis and ``batch_no_expert`` the rest
of the batch axes (a mesh axis can shard only one dimension of an array).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import flax.linen as nn

# Order = device-grid order: the last axis varies fastest (neighbouring devices), so
# ``tensor`` (the most communication per step) is innermost, then ``expert``.
MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Mesh axes the batch (leading axis of every batch array) is split over.
BATCH_MESH_AXES = ("data", "fsdp", "expert")

# Parameters.
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
LAYERS = "layers"
EXPERT = "expert"
# Activations.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"
ACT_EXPERT = "act_expert"
BATCH_NO_EXPERT = "batch_no_expert"

# Priority-ordered: flax assigns a mesh axis to the first logical axis that asks
# for it, so ``batch`` (first in every activation) claims data+fsdp+expert;
# ``act_expert`` comes first so that expert-dispatched activations keep ``expert``.
DEFAULT_RULES: Tuple[Tuple[str, object], ...] = (
    (ACT_EXPERT, "expert"),
    (BATCH_NO_EXPERT, ("data", "fsdp")),
    (BATCH, BATCH_MESH_AXES),
    (LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (LAYERS, None),
    (EXPERT, "expert"),
)


def unknown_names(axes, rules) -> Tuple[str, ...]:
    """The logical names in ``axes`` that no rule of ``rules`` covers (flax would leave those
    dimensions unsharded without a word; replication is asked for with a ``(name, None)`` rule)."""
    known = {name for name, _ in rules}
    return tuple(n for n in axes if isinstance(n, str) and n not in known)


def constrain(x, axes: Sequence[str]):
    """Annotate activation ``x`` ``[d0, ..., dn]`` with one logical axis name (or ``None``) per
    dimension (no-op without rules/mesh).  ``ValueError`` if the number of names is not
    ``x.ndim``, or (while rules are active) for a name the rules do not cover."""
    axes = tuple(axes)
    if hasattr(x, "ndim") and len(axes) != x.ndim:
        raise ValueError(f"constrain: axes={axes} names {len(axes)} dimensions, the array has shape "
                         f"{tuple(x.shape)}")
    rules = nn.get_logical_axis_rules()
    if rules:
        unknown = unknown_names(axes, rules)
        if unknown:
            raise ValueError(f"constrain: logical axis name(s) {list(unknown)} have no rule; known: "
                             f"{sorted({name for name, _ in rules})}")
    return nn.with_logical_constraint(x, axes)


def param_init(init, axes: Sequence[str]):
    """Wrap a parameter initialiser with its logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))
