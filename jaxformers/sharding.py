"""Logical axis names and the rules that map them onto a device mesh.

Model code only names axes (``batch``, ``length``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``vocab``, ``layers``, ``expert``); the rules
below map them onto the mesh axes ``data``, ``fsdp``, ``expert`` and ``tensor``.
Activations use the ``act_*`` names so that parameters (sharded over ``fsdp`` on
``embed``) and activations (sharded over ``data``/``fsdp``/``expert`` on ``batch``)
never compete.  Pallas kernels, which XLA cannot split, run per device on their block of
rows and heads through :func:`kernel_map` (``shard_map`` with the same names).

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

import math
from typing import Sequence, Tuple

import jax
import flax.linen as nn
from jax.sharding import PartitionSpec as P

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
    dimensions unsharded without a word; replication is asked for with a ``(name, None)`` rule).

    A tuple of names in one dimension (``("data", "fsdp")``) is taken by flax as mesh axes as
    they stand (no rule applies to it): each of its names must be a mesh axis some rule maps
    to, and any other name in it (a typo, or a logical name such as ``batch``) is reported.

    ``ValueError`` (not a report) for an entry that is not a name, ``None`` or a tuple (e.g. the
    int in ``P("embed", 3)``), and for a bare name that no rule covers but that is a mesh axis of
    the rules (``"data"``): ``PartitionSpec`` stores a one-axis tuple ``("data",)`` as the bare
    name ``"data"``, which is then read as a logical name; flax would leave that dimension
    unsharded without a word."""
    known = {name for name, _ in rules}
    mesh_axes = set()
    for _, target in rules:
        mesh_axes.update((target,) if isinstance(target, str) else tuple(target or ()))
    out = []
    for n in axes:
        if isinstance(n, str):
            if n in known:
                continue
            if n in mesh_axes:
                raise ValueError(
                    f"axes {axes}: {n!r} is a mesh axis, not a logical axis name (no rule covers it). "
                    f"A PartitionSpec stores a one-axis tuple ({n!r},) as the bare name {n!r}, so one "
                    f"mesh axis cannot be named there directly: name a logical axis whose rule maps to "
                    f"it, or add a rule ('my_name', {n!r}) (constrain also takes a plain tuple "
                    f"(({n!r},), ...)); known logical names: {sorted(known)}")
            out.append(n)
        elif isinstance(n, (tuple, list)):
            out.extend(m for m in n if m is not None and m not in mesh_axes)
        elif n is not None and n is not P.UNCONSTRAINED:
            raise ValueError(f"axes {axes} holds {n!r} ({type(n).__name__}): each dimension takes a "
                             "logical axis name (str), None, or a tuple of mesh axis names")
    return tuple(out)


def constrain(x, axes: Sequence[str]):
    """Annotate activation ``x`` ``[d0, ..., dn]`` with one logical axis name (or ``None``) per
    dimension (no-op without rules/mesh).  ``ValueError`` if the number of names is not
    ``x.ndim``, for an entry that is not a name, ``None`` or a tuple (e.g. an int), or (while
    rules are active) for a name the rules do not cover.

    A dimension may also name mesh axes directly, as a tuple (``(("data", "fsdp"), None)``):
    that dimension is split over them as they stand, before any rule is applied (a rule asking
    for one of them then leaves its dimension whole); ``ValueError`` for a tuple holding
    anything but mesh axes of the rules, or for a mesh axis named in two dimensions.

    An ``act_kv_heads`` dimension that its mesh axes do not divide is kept whole (2 kv heads
    on ``tensor=4``), never split unevenly: see :func:`_whole_kv_heads`."""
    axes = tuple(tuple(a) if isinstance(a, list) else a for a in axes)
    if hasattr(x, "ndim") and len(axes) != x.ndim:
        raise ValueError(f"constrain: axes={axes} names {len(axes)} dimensions, the array has shape "
                         f"{tuple(x.shape)}")
    odd = [a for a in axes if not (a is None or isinstance(a, (str, tuple)) or a is P.UNCONSTRAINED)]
    if odd:  # flax: a pytree structure error
        raise ValueError(f"constrain: axes={axes} holds {odd}: each dimension takes a logical axis name "
                         "(str), None, or a tuple of mesh axis names")
    rules = nn.get_logical_axis_rules()
    if not rules:
        return x
    bad = [a for a in axes if isinstance(a, tuple) and not all(isinstance(m, str) for m in a)]
    if bad:
        raise ValueError(f"constrain: axes={axes}: a tuple in one dimension must hold mesh axis names "
                         f"(str), got {bad}; use None for a dimension left whole")
    unknown = unknown_names(axes, rules)
    if unknown:
        raise ValueError(f"constrain: logical axis name(s) {list(unknown)} have no rule (inside a tuple: "
                         f"are not mesh axes of the rules); known: {sorted({name for name, _ in rules})}")
    direct = [m for a in axes if isinstance(a, tuple) for m in a]
    twice = sorted({m for m in direct if direct.count(m) > 1})
    if twice:
        raise ValueError(f"constrain: axes={axes} names mesh axis/axes {twice} in more than one dimension "
                         "(a mesh axis can split only one dimension of an array)")
    # flax takes a nested tuple for a pytree of specs (a pytree error), so each tuple dimension
    # gets a name of its own, with a rule to its mesh axes placed first: flax's semantics of a
    # tuple dimension (assigned before any rule), its no-op without a mesh kept
    names, extra = [], []
    for i, a in enumerate(axes):
        if isinstance(a, tuple):
            name = f"__mesh_axes_{i}__"
            names.append(name)
            extra.append((name, a if a else None))
        else:
            names.append(a)
    all_rules, names = tuple(extra) + tuple(rules), tuple(names)
    fitted = _whole_kv_heads(x, names, all_rules)
    if fitted is not None:
        return jax.lax.with_sharding_constraint(x, fitted)
    if not extra:
        return nn.with_logical_constraint(x, axes)
    return nn.with_logical_constraint(x, names, rules=all_rules)


def dividing_prefix(axes, size: int, mesh_shape) -> tuple:
    """The longest prefix of the mesh ``axes`` (names) whose sizes' product divides ``size``: the
    axes a dimension of ``size`` can be split over (``mesh_shape``: name -> size).  Shared by
    :func:`constrain` (kv heads), :func:`kernel_map` and ``training.mesh.fit_sharding``."""
    axes = tuple(axes)
    split = next((i for i in range(len(axes)) if size % math.prod(mesh_shape[a] for a in axes[:i + 1])),
                 len(axes))
    return axes[:split]


def _whole_kv_heads(x, names, rules):
    """The ``PartitionSpec`` of ``x`` under ``rules`` on the ambient mesh with an ``act_kv_heads``
    dimension that its mesh axes do not divide kept whole (the longest dividing prefix of its
    axes kept), or ``None`` when there is no such dimension (or no mesh / shape).

    Grouped-query attention regroups the query heads by kv head; a padded, uneven split of
    the kv heads (2 over ``tensor=4``) cannot line up with the query heads' split, so XLA
    replicated the whole array to regroup ("involuntary full rematerialization", every layer of
    a KV-cache decode).  Other dimensions keep flax's uneven split (the query heads of a
    6-head model over ``tensor=4`` stay split, two padded heads a device: less compute than
    whole), as do parameters' dimensions, which are kept whole (``fit_sharding``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if ACT_KV_HEADS not in names or mesh.empty or not hasattr(x, "shape") \
            or any(n is P.UNCONSTRAINED for n in names):
        return None
    spec = [tuple(a for a in axes if a in mesh.axis_names) for axes in _mesh_axes(names, rules)]
    fitted = [dividing_prefix(axes, size, mesh.shape) if name == ACT_KV_HEADS else axes
              for name, axes, size in zip(names, spec, x.shape)]
    return None if fitted == spec else P(*[(a if len(a) > 1 else a[0]) if a else None for a in fitted])


def param_init(init, axes: Sequence[str]):
    """Wrap a parameter initialiser with its logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))


def _mesh_axes(names, rules) -> list:
    """Logical names of one array (one per dimension) -> the mesh axes of each dimension (tuples)."""
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    return [() if a is None else (tuple(a) if isinstance(a, (tuple, list)) else (a,)) for a in spec]


def kernel_map(fn, in_axes, out_axes):
    """``fn`` (a Pallas kernel call: arrays in, an array or a tuple of arrays out), run per
    device (``jax.shard_map``) over the ambient mesh while logical rules and a mesh of several
    devices are active (a :class:`~jaxformers.training.steps.Program` compiling, or under
    ``activate``); ``fn`` itself otherwise.  XLA cannot split a kernel over devices (Mosaic
    refuses: "Mosaic kernels cannot be automatically partitioned").

    ``in_axes``: per argument, its logical names (one per dimension; ``None`` = whole on every
    device), e.g. ``(BATCH, LENGTH, ACT_HEADS, None)``; ``out_axes``: the same per output (one
    tuple of names for one output, or a 1-tuple of it: what ``fn`` returns says how many).
    Each device gets its block of every argument and computes its block of every output, so
    ``fn`` must treat the split dimensions independently (rows, heads).  A mesh axis that does
    not divide every dimension it would split is not used (those dimensions stay whole; the
    devices along it compute the same).  Name ``None`` a dimension the kernel must see whole
    whatever the rules say (the sequence an attention or a scan runs along: rules may split
    ``length``)."""
    if not isinstance(out_axes, (tuple, list)):
        raise ValueError(f"kernel_map: out_axes must be a tuple of names (one output) or of such tuples, "
                         f"got {out_axes!r}")
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or mesh.size == 1:
        return fn

    def call(*args):
        outs = jax.eval_shape(fn, *args)
        single = not isinstance(outs, (tuple, list))  # what fn returns decides, not out_axes' nesting
        out_list = [outs] if single else list(outs)
        nested = bool(out_axes) and all(isinstance(n, (tuple, list)) for n in out_axes)
        if not single and not nested:  # several outputs: a tuple of names each ((names, None) too)
            raise ValueError(f"kernel_map: the kernel returns {len(out_list)} arrays, so out_axes must be a tuple "
                             f"of {len(out_list)} tuples of names (one per output), got {out_axes!r}")
        out_names = list(out_axes) if nested else [out_axes]  # one output: its names, or a 1-tuple of them
        if len(in_axes) != len(args) or len(out_names) != len(out_list):
            raise ValueError(f"kernel_map: in_axes / out_axes name {len(in_axes)} / {len(out_names)} arrays, "
                             f"the kernel takes {len(args)} and returns {len(out_list)}")
        named = list(zip(in_axes, args)) + list(zip(out_names, out_list))
        for i, (names, x) in enumerate(named):
            if len(names) != x.ndim:
                what = f"in_axes[{i}]" if i < len(args) else f"out_axes[{i - len(args)}]"
                raise ValueError(f"kernel_map: {what}={tuple(names)} names {len(names)} dimensions, the "
                                 f"array has shape {tuple(x.shape)}")
        specs = [_mesh_axes(names, rules) for names, _ in named]
        dropped = {a for spec in specs for axes in spec for a in axes if a not in mesh.axis_names}
        while True:  # drop the mesh axes past the longest prefix dividing a dimension, everywhere
            bad = set()
            for spec, (_, x) in zip(specs, named):
                for axes, size in zip(spec, x.shape):
                    kept = [a for a in axes if a not in dropped]
                    bad.update(kept[len(dividing_prefix(kept, size, mesh.shape)):])
            if not bad:
                break
            dropped |= bad
        specs = [P(*[tuple(a for a in axes if a not in dropped) or None for axes in spec]) for spec in specs]
        mapped = jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs[:len(args)]),
                               out_specs=specs[len(args)] if single else
                               (list if isinstance(outs, list) else tuple)(specs[len(args):]),
                               check_vma=False)
        return mapped(*args)

    return call


def attention_kernel_axes(n_kv_heads: int):
    """``(q_axes, kv_axes)``: the :func:`kernel_map` names of an attention kernel's ``q [B, T, H, D]``
    and ``k`` / ``v [B, S, Hkv, D]``: rows and heads split, the sequence whole whatever the rules
    say (attention reads all of it), one kv head (MQA) whole on every device."""
    return (BATCH, None, ACT_HEADS, None), (BATCH, None, ACT_KV_HEADS if n_kv_heads > 1 else None, None)
