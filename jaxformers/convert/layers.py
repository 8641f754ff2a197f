"""Convert between per-layer params (``blocks_0 ... blocks_{L-1}``) and the scanned layout.

With ``scan_layers=True`` a model keeps one ``blocks`` subtree whose every leaf has
a leading ``[L]`` axis; without it each layer is its own ``blocks_{i}`` subtree.
These helpers only look at the keys of the mapping they are given (its top level),
so any converter (Llama, Mamba, ...) can build per-layer trees and stack them;
:func:`check_layer_shapes` (exporters, QuaRot) checks per-layer params against a config.
They take plain (unboxed) arrays: numpy leaves stay numpy, anything else goes
through ``jax.numpy``.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _layer_indices(params: Mapping, prefix: str):
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)$")
    found = {}
    for key in params:
        m = pattern.match(str(key))
        if m:
            found[int(m.group(1))] = key
    return found


def _xp(leaves):
    return np if all(isinstance(x, np.ndarray) for x in leaves) else jnp


def stack_layers(params: Mapping, prefix: str = "blocks", n_layer: Optional[int] = None) -> dict:
    """``{prefix_0: t0, ..., prefix_{L-1}: t_{L-1}, **rest}`` -> ``{prefix: stacked, **rest}``.

    Every layer subtree must have the same structure and leaf shapes; the layers
    must be numbered ``0 .. L-1`` (``L == n_layer`` when given). The stacked
    subtree takes the place of ``prefix_0`` in the key order.
    """
    if prefix in params:
        raise ValueError(f"params already hold a stacked {prefix!r} subtree")
    found = _layer_indices(params, prefix)
    if not found:
        raise ValueError(f"no '{prefix}_<i>' layers to stack (keys: {sorted(map(str, params))})")
    count = max(found) + 1
    if sorted(found) != list(range(count)):
        missing = sorted(set(range(count)) - set(found))
        raise ValueError(f"layers '{prefix}_<i>' are not numbered 0..{count - 1}: missing {missing}")
    if n_layer is not None and count != n_layer:
        raise ValueError(f"expected n_layer={n_layer} layers '{prefix}_<i>', found {count}")
    layers = [params[found[i]] for i in range(count)]
    structure = jax.tree.structure(layers[0])
    for i, layer in enumerate(layers[1:], start=1):
        if jax.tree.structure(layer) != structure:
            raise ValueError(f"{prefix}_{i} has a different structure from {prefix}_0")
        for a, b in zip(jax.tree.leaves(layers[0]), jax.tree.leaves(layer)):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"{prefix}_{i} has a leaf {b.shape}/{b.dtype} where {prefix}_0 "
                                 f"has {a.shape}/{a.dtype}")

    def stack(*xs):
        return _xp(xs).stack(xs, axis=0)

    stacked = jax.tree.map(stack, *layers)
    out = {}
    for key, value in params.items():
        if key == found[0]:
            out[prefix] = stacked
        elif key not in found.values():
            out[key] = value
    return out


def unstack_layers(params: Mapping, prefix: str = "blocks", n_layer: Optional[int] = None) -> dict:
    """Inverse of :func:`stack_layers`: split the leading ``[L]`` axis of ``params[prefix]``."""
    if prefix not in params:
        raise ValueError(f"params hold no stacked {prefix!r} subtree (keys: {sorted(map(str, params))})")
    if _layer_indices(params, prefix):
        raise ValueError(f"params hold both {prefix!r} and '{prefix}_<i>' subtrees")
    leaves = jax.tree.leaves(params[prefix])
    if not leaves:
        raise ValueError(f"stacked {prefix!r} subtree has no arrays")
    lengths = {x.shape[0] if x.ndim else None for x in leaves}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(f"leaves of {prefix!r} disagree on the leading layer axis: {sorted(map(str, lengths))}")
    count = lengths.pop()
    if n_layer is not None and count != n_layer:
        raise ValueError(f"expected n_layer={n_layer}, the stacked {prefix!r} subtree has {count}")
    out = {}
    for key, value in params.items():
        if key == prefix:
            for i in range(count):
                out[f"{prefix}_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
        else:
            out[key] = value
    return out


def per_layer_params(config, params) -> dict:
    """``params`` of ``config``'s model as an exporter reads them: unboxed, without a
    ``{"params": ...}`` wrapper, per layer (``blocks_{i}``; a scanned ``blocks`` is unstacked),
    with exactly the top-level keys the config implies (``embed``, ``blocks_0..L-1``,
    ``final_norm``, ``lm_head`` when untied) and the shapes it implies; ``ValueError`` naming the
    missing / unexpected ones and a parameter of another shape (:func:`check_layer_shapes`)."""
    import flax.linen as nn
    from flax.core import unfreeze

    params = unfreeze(nn.unbox(params))
    if set(params) == {"params"}:
        params = params["params"]
    if "blocks" in params:
        params = unstack_layers(params, "blocks", n_layer=config.n_layer)
    expected = {"embed", "final_norm", *(f"blocks_{i}" for i in range(config.n_layer))}
    if not config.tie_embeddings:
        expected.add("lm_head")
    if set(params) != expected:
        raise ValueError(f"params do not match config: missing {sorted(expected - set(params))}, "
                         f"unexpected {sorted(set(params) - expected)}")
    check_layer_shapes(config, params)
    return params


def check_layer_shapes(config, params) -> None:
    """``ValueError`` naming the first parameter of per-layer ``params`` (``blocks_{i}``) that
    ``config``'s model does not have, or has with another shape: a missing block was a
    ``KeyError`` deep in a converter, another width a numpy reshape or broadcasting error, and
    another head split of the same width (8 heads of 4 under a config of 4 heads of 8) reshaped
    silently into a different model.  Every block is checked against a one-layer model's
    ``blocks_0`` (tracing the whole model would cost memory that grows with depth), so the
    model's blocks must all have one shape (llama, mamba, mamba2: what exporters and QuaRot take)."""
    from ..registry import build
    from ..utils import abstract_params

    one = abstract_params(build(config.replace(n_layer=1, scan_layers=False)))
    for top, want in one.items():
        for name in ([f"blocks_{i}" for i in range(config.n_layer)] if top == "blocks_0" else [top]):
            have = params.get(name) if isinstance(params, Mapping) else None
            have = {} if have is None else {jax.tree_util.keystr(p): np.shape(x)
                                            for p, x in jax.tree_util.tree_leaves_with_path(have)}
            bad = []  # every parameter of this subtree with another shape
            for path, x in jax.tree_util.tree_leaves_with_path(want):
                key = jax.tree_util.keystr(path)
                if key not in have:
                    raise ValueError(f"params do not match config: no [{name!r}]{key} (config: "
                                     f"{config.model}, n_layer={config.n_layer}, "
                                     f"tie_embeddings={config.tie_embeddings})")
                if have[key] != x.shape:
                    where = "/".join([name, *(str(getattr(k, "key", k)) for k in path)])
                    bad.append(f"{where} has shape {have[key]}, config implies {x.shape}")
            if bad:
                raise ValueError(f"params do not match config: {'; '.join(bad)} (config: {config.model})")
