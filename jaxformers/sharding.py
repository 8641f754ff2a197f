"""Logical axis names and the rules that map them onto a device mesh.

Model code only names axes (``batch``, ``length``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``vocab``, ``layers``); the rules below map
them onto the mesh axes ``data``, ``fsdp`` and ``tensor``.  Activations use the
``act_*`` names so that parameters (sharded over ``fsdp`` on ``embed``) and
activations (sharded over ``data``/``fsdp`` on ``batch``) never compete.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import flax.linen as nn

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters.
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
LAYERS = "layers"
# Activations.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

# Priority-ordered: flax assigns a mesh axis to the first logical axis that asks
# for it, so ``batch`` (first in every activation) claims data+fsdp.
DEFAULT_RULES: Tuple[Tuple[str, object], ...] = (
    (BATCH, ("data", "fsdp")),
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
)


def constrain(x, axes: Sequence[str]):
    """Annotate activation ``x`` with logical axes (no-op without rules/mesh)."""
    return nn.with_logical_constraint(x, tuple(axes))


def param_init(init, axes: Sequence[str]):
    """Wrap a parameter initialiser with its logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))
