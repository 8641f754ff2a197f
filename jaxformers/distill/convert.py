"""Transformer -> Mamba-2 student: the student's config and its attention-initialised weights.

MambaInLlama (Wang et al., "The Mamba in the Llama", and the distilled reasoners of
"Thinking Slow, Fast") reads a Mamba-2 SSM as linear attention without the softmax,
``y_t = C_t^T h_t``, ``h_t = a_t h_{t-1} + B_t x_t^T`` per head, and initialises it from
the attention layer it replaces:

    x  <- V   (in_x  = W_v)         B <- K   (in_bc[:, :G N] = W_k)
    C  <- Q   (in_bc[:, G N:] = W_q)  out_proj <- W_o

with one SSM head per attention head (``headdim = d_state = head_dim``, ``n_groups =
n_head``: each head its own B and C), ``d_inner = n_head * head_dim``; ``z`` (the gate),
``dt``, ``A``, ``D``, the causal convolutions and the gated norm keep their random
initialisation, as the authors do.  The layer's norms and MLP, the embeddings, the final
norm and the head are copied; layers listed in ``attn_layers`` stay attention blocks with
the teacher's weights (bit-identical).

The student is the ``hybrid`` model with ``mixer="mamba2"``, ``ssm_mlp=True`` (the SSM
blocks keep the transformer's MLP sub-layer) and ``attn_layers`` (``()``: pure Mamba-2); it
keeps the teacher's numerics (``dtype``, ``param_dtype``, ``residual_fp32``).

Deviation: for a grouped-query teacher (``n_kv_head < n_head``) the authors keep ``x`` and
``B`` at the K/V width and repeat them across the heads of a group after the convolution;
here ``in_x`` / the B rows of ``in_bc`` are full width with the K/V rows repeated per
head (the same function at initialisation; the repeated copies then train independently,
and the convolutions act on the repeated channels).

A teacher with ``skip_gains`` gives a student with ``skip_gains`` (the SSM blocks take the
attention skip gain as their mixer skip gain); a teacher trained with ``scan_layers=True``
(stacked ``blocks``) is unstacked first (the hybrid student is never scanned).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import TransformerConfig
from ..registry import build, get_config

__all__ = ["STUDENTS", "check_params_tree", "init_student", "student_config"]

STUDENTS = ("mamba2", "hybrid")
_COPIED = ("vocab_size", "d_model", "n_layer", "max_seq_len", "norm", "norm_eps", "tie_embeddings", "init_std",
           "scale_residual_init", "dtype", "param_dtype", "residual_fp32", "n_head", "n_kv_head", "head_dim", "d_ff",
           "mlp", "rope_theta", "attention_impl", "window", "skip_gains")
# What the copied weights need to compute as in the teacher (shapes, norms, numerics, the kept
# attention layers).  Not ``weight_decay_groups``: it says how the teacher was optimised, not
# what its weights compute, and the student trains under its own recipe (its SSM parameters
# and its family's ``no_weight_decay`` names are new): it keeps the hybrid default ("shape")
# whatever the teacher's, and ``student_config(teacher, weight_decay_groups="nanogpt")`` asks
# for the other groups.


def student_config(teacher, student: str = "mamba2", attn_layers: Sequence[int] = (), **overrides):
    """The ``hybrid`` config of a Mamba-2 student of ``teacher`` (a ``TransformerConfig``:
    ``llama``, ``gpt``).  ``student="mamba2"``: every layer an SSM (``attn_layers`` must be
    empty); ``"hybrid"``: attention kept at ``attn_layers``.  ``overrides``: other hybrid
    fields (``chunk_size``, ``d_conv``, ``scan_impl``, ...)."""
    if not isinstance(teacher, TransformerConfig) or teacher.model not in ("llama", "gpt"):
        raise ValueError(f"teacher must be a 'llama' or 'gpt' config, got "
                         f"{getattr(teacher, 'model', type(teacher).__name__)!r}")
    for name in ("qkv_bias", "qk_norm"):  # the attention initialisation maps bare q/k/v kernels only
        if getattr(teacher, name, False):
            raise ValueError(f"teacher {name}=True is not supported: the MambaInLlama initialisation maps "
                             "bias-free, unnormalised q/k/v projections onto the SSM")
    if student not in STUDENTS:
        raise ValueError(f"student must be one of {STUDENTS}, got {student!r}")
    if isinstance(attn_layers, (str, bytes)) or not hasattr(attn_layers, "__iter__"):
        raise ValueError(f"attn_layers must be a sequence of layer indices, got {attn_layers!r}")
    attn_layers = tuple(attn_layers)
    bad = [i for i in attn_layers if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad:
        raise ValueError(f"attn_layers must hold int layer indices in [0, n_layer={teacher.n_layer}), "
                         f"got {attn_layers!r}")
    attn_layers = tuple(int(i) for i in attn_layers)
    if student == "mamba2" and attn_layers:
        raise ValueError(f"student='mamba2' has no attention layers; got attn_layers={attn_layers} "
                         "(use student='hybrid')")
    if student == "hybrid" and not attn_layers:
        raise ValueError("student='hybrid' needs attn_layers (the teacher layers that stay attention)")
    width = teacher.n_head * teacher.dim_head
    if width % teacher.d_model:
        raise ValueError(f"n_head * head_dim = {width} must be a multiple of d_model={teacher.d_model} "
                         "(the student's d_inner = expand * d_model)")
    fields = {name: getattr(teacher, name) for name in _COPIED}
    fields.update(mixer="mamba2", attn_layers=attn_layers, attn_every=None, ssm_mlp=True,
                  expand=width // teacher.d_model, headdim=teacher.dim_head, d_state=teacher.dim_head,
                  n_groups=teacher.n_head, a_init="uniform", a_init_range=(1.0, 16.0),
                  # a power of two >= 16 (the SSD kernel's tiles: scan_impl='auto' picks it on a GPU)
                  chunk_size=min(64, max(16, 1 << (teacher.max_seq_len - 1).bit_length())))
    fields.update(overrides)
    return get_config("hybrid", "tiny-m2", **fields)  # (every preset field is overridden or a default)


def _heads_repeated(kernel, n_head: int) -> jax.Array:
    """``[D, KV, hd]`` -> ``[D, H * hd]`` with kv head ``h // (H / KV)`` in head ``h``'s slot."""
    rep = n_head // kernel.shape[1]
    return jnp.repeat(kernel, rep, axis=1).reshape(kernel.shape[0], -1)


def init_student(teacher_config, teacher_params, config, rng, *, init: str = "attention"):
    """Student parameters for ``config`` (:func:`student_config`) from the teacher's
    (``teacher_params``: the parameter tree, or the ``{"params": ...}`` variables dict).

    ``init="attention"``: the MambaInLlama initialisation (module docstring);
    ``init="random"``: the student's own random initialisation for the SSM mixers (norms,
    MLPs, embeddings and attention layers still copied) -- the baseline the attention
    initialisation is compared with.
    """
    if init not in ("attention", "random"):
        raise ValueError(f"init must be 'attention' or 'random', got {init!r}")
    if not isinstance(teacher_config, TransformerConfig) or teacher_config.model not in ("llama", "gpt"):
        raise ValueError(f"teacher_config must be a 'llama' or 'gpt' config, got "
                         f"{getattr(teacher_config, 'model', type(teacher_config).__name__)!r}")
    if not hasattr(teacher_params, "keys"):
        raise ValueError(f"teacher_params must be the teacher's parameter tree (a dict) or its "
                         f"{{'params': ...}} variables dict, got {type(teacher_params).__name__}")
    if getattr(config, "model", None) != "hybrid" or getattr(config, "mixer", None) != "mamba2":
        raise ValueError(f"config must be a hybrid Mamba-2 student from student_config(teacher_config, ...), "
                         f"got model={getattr(config, 'model', type(config).__name__)!r}")
    if config.n_layer != teacher_config.n_layer or config.d_model != teacher_config.d_model:
        raise ValueError("config must come from student_config(teacher_config, ...) "
                         f"(n_layer/d_model {config.n_layer}/{config.d_model} vs "
                         f"{teacher_config.n_layer}/{teacher_config.d_model})")
    params = _numpy_tree(build(config).init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
    expected = jax.tree.map(lambda x: x.shape, params)
    teacher = _numpy_tree(teacher_params)
    if set(teacher) == {"params"}:  # a variables dict, as module.init returns it
        teacher = teacher["params"]
    if getattr(teacher_config, "scan_layers", False) and "blocks" in teacher:
        from ..convert.layers import unstack_layers
        teacher = unstack_layers(teacher, n_layer=teacher_config.n_layer)
    # (a tree of another teacher: a ValueError here, not a KeyError in the mapping below)
    check_params_tree("teacher_params", teacher_config.replace(scan_layers=False), teacher, "teacher_config")
    for name in teacher:
        if not name.startswith("blocks_"):
            params[name] = teacher[name]  # embed, final_norm, lm_head
    attn = set(config.attention_layers)
    h = teacher_config.n_head
    for i in range(config.n_layer):
        t, s = teacher[f"blocks_{i}"], params[f"blocks_{i}"]
        if i in attn:
            params[f"blocks_{i}"] = t
            continue
        s["norm"] = t["attn_norm"]
        s["mlp_norm"], s["mlp"] = t["mlp_norm"], t["mlp"]
        if config.skip_gains:
            s["mixer_skip_gain"], s["mlp_skip_gain"] = t["attn_skip_gain"], t["mlp_skip_gain"]
        if init == "attention":
            a, m = t["attn"], s["mixer"]
            m["in_x"]["kernel"] = np.asarray(_heads_repeated(a["v"]["kernel"], h))
            b = np.asarray(_heads_repeated(a["k"]["kernel"], h))
            c = np.asarray(a["q"]["kernel"]).reshape(a["q"]["kernel"].shape[0], -1)
            m["in_bc"]["kernel"] = np.concatenate([b, c], axis=1)
            m["out_proj"]["kernel"] = np.asarray(a["o"]["kernel"]).reshape(-1, a["o"]["kernel"].shape[-1])
            for proj in ("q", "k", "v", "o"):
                if "bias" in a[proj]:
                    raise ValueError("attention projections with biases are not supported by the "
                                     "attention initialisation (llama / gpt have none)")
    mismatch = _mismatch(expected, params)
    if mismatch:
        raise ValueError("teacher_params do not fit teacher_config / config (the student built from "
                         f"student_config(teacher_config, ...) vs the mapped teacher: {mismatch})")
    return params


def check_params_tree(what: str, config, tree, config_name: str = "config") -> None:
    """``ValueError`` naming ``what`` unless ``tree`` has the parameter paths and shapes of the
    model ``config`` builds (missing / unexpected paths and shape differences listed)."""
    from ..training.steps import abstract_params

    want, _ = abstract_params(build(config))
    mismatch = _mismatch(want, tree)
    if mismatch:
        raise ValueError(f"{what} do not fit {config_name}'s parameter tree (model {config.model!r}, "
                         f"scan_layers={config.scan_layers}): {mismatch}")


def _mismatch(expected, got) -> str:
    """How two parameter trees (arrays, or shape tuples as leaves) differ: ``"missing [...],
    unexpected [...], shapes (expected vs given) [...]"`` (3 of each); ``""`` if they do not."""
    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
        return {jax.tree_util.keystr(p): tuple(x) if isinstance(x, tuple) else tuple(np.shape(x))
                for p, x in leaves}

    flat_e, flat_g = shapes(expected), shapes(got)
    if flat_e == flat_g:
        return ""
    missing = sorted(set(flat_e) - set(flat_g))
    extra = sorted(set(flat_g) - set(flat_e))
    differ = [f"{k}: {flat_e[k]} vs {flat_g[k]}" for k in sorted(set(flat_e) & set(flat_g)) if flat_e[k] != flat_g[k]]
    return f"missing {missing[:3]}, unexpected {extra[:3]}, shapes (expected vs given) {differ[:3]}"


def _numpy_tree(tree) -> dict:
    """A mutable nested dict of numpy arrays (boxed / frozen / device trees accepted)."""
    import flax.linen as nn
    from flax.core import unfreeze

    return jax.tree.map(np.asarray, unfreeze(jax.device_get(nn.unbox(tree))))
