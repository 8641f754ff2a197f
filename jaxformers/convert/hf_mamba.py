"""Hugging Face ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` <-> jaxformers ``mamba`` / ``mamba2``.

``from_hf_mamba(dir) -> (config, params)``; ``to_hf_mamba(config, params, dir)`` writes the
inverse (``config.json`` + safetensors weights: float32 by default, ``dtype="bfloat16"`` /
``"float16"`` for every tensor, ``A_log`` / ``D`` / ``dt_bias`` included, as transformers'
``save_pretrained`` does -- its Mamba models keep no module in float32; one file or shards,
:mod:`~jaxformers.convert.hf_write`) for a model HF can express.

Loading needs numpy + safetensors only (the safetensors reader is shared with the
Llama converter).  Weight layout (torch ``nn.Linear.weight`` is ``[out, in]``;
``p = backbone.layers.i.mixer.``, jaxformers ``m = blocks_i/mixer/``)::

    backbone.embeddings.weight [V, D]          -> embed/embedding
    backbone.layers.i.norm.weight [D]          -> blocks_i/norm/scale
    backbone.norm_f.weight [D]                 -> final_norm/scale
    lm_head.weight [V, D] (untied only)        -> lm_head/kernel [D, V]
  Mamba-1 (I inner channels, N state, R dt rank):
    p.in_proj.weight [2I, D] (+ bias [2I])     -> m.in_proj/kernel [D, 2, I] (x, z)
    p.conv1d.weight [I, 1, K] (+ bias [I])     -> m.conv/kernel [K, I]
    p.x_proj.weight [R + 2N, I]                -> m.x_proj/kernel [I, R + 2N]
    p.dt_proj.weight [I, R], p.dt_proj.bias    -> m.dt_proj/kernel [R, I], m.dt_bias [I]
    p.A_log [I, N], p.D [I]                    -> m.A_log, m.D
    p.out_proj.weight [D, I] (+ bias [D])      -> m.out_proj/kernel [I, D]
  Mamba-2 (H heads of P, G groups): in_proj rows are [z (I) | x (I) | B (GN) | C (GN) | dt (H)]
    p.in_proj.weight (+ bias)                  -> m.in_z, m.in_x, m.in_bc, m.in_dt kernels (+ biases)
    p.conv1d.weight [I + 2GN, 1, K]            -> m.conv_x/kernel [K, I], m.conv_bc/kernel [K, 2GN]
    p.dt_bias, p.A_log, p.D [H]; p.norm.weight [I] -> m.dt_bias, m.A_log, m.D, m.norm/scale
    p.out_proj.weight [D, I]                   -> m.out_proj/kernel [I, D]
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import numpy as np

from ..config import DTYPES
from ..models.mamba import MambaConfig
from .hf_io import (NO_SPECIAL_TOKENS, hf_bool, hf_float, hf_int, read_checkpoint, read_hf_config,
                    weight_files)
from .hf_write import DEFAULT_MAX_SHARD_SIZE, check_dtype, parse_size, write_checkpoint
from .layers import per_layer_params, stack_layers

MODEL_TYPES = ("mamba", "mamba2")
_PREFIX = "backbone."
# transformers' MambaConfig / Mamba2Config defaults: what HF reads for a key a config.json omits
_COMMON_DEFAULTS = dict(expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True, hidden_act="silu",
                        layer_norm_epsilon=1e-5, initializer_range=0.1, time_step_min=0.001,
                        time_step_max=0.1, time_step_floor=1e-4, residual_in_fp32=True)
HF_DEFAULTS = {
    "mamba": dict(_COMMON_DEFAULTS, vocab_size=50280, hidden_size=768, num_hidden_layers=32, state_size=16,
                  tie_word_embeddings=True, time_step_rank="auto", time_step_scale=1.0,
                  time_step_init_scheme="random"),
    "mamba2": dict(_COMMON_DEFAULTS, vocab_size=32768, hidden_size=4096, num_hidden_layers=64,
                   state_size=128, num_heads=128, head_dim=64, n_groups=8, tie_word_embeddings=False,
                   time_step_limit=(0.0, float("inf"))),
}


def _as_float(value) -> float:
    """A config.json number; transformers writes inf as ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def config_from_hf_mamba(hf: dict, *, dtype: str = "float32", scan_layers: bool = False,
                         scan_impl: str = "auto", chunk_size: Optional[int] = None):
    """jaxformers ``mamba`` / ``mamba2`` config from a HF ``MambaConfig`` / ``Mamba2Config`` dict.

    A key the dict omits (or sets to null) takes transformers' default (:data:`HF_DEFAULTS`),
    as ``from_pretrained`` would read it (e.g. Mamba-2 ``state_size=128``, ``n_groups=8``).

    ``chunk_size`` (Mamba-2): the SSD kernel tile, ``None`` = ``MambaConfig``'s default.
    ``residual_in_fp32`` (HF default True) becomes ``residual_fp32``: under a bfloat16
    ``dtype`` the residual stream stays float32, as in transformers and mamba_ssm (our norms
    read it in float32; transformers casts it to the norm weight's dtype first).
    HF's own ``chunk_size`` is its kernels' tile, not part of the model's function
    (outputs agree up to float rounding for any tile), so it is not carried over.
    """
    from ..registry import get_config

    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; expected one of {list(MODEL_TYPES)}")
    hf = {**HF_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    act = hf["hidden_act"]
    if act not in ("silu", "swish"):  # transformers' "swish" is SiLU too
        raise ValueError(f"hidden_act={act!r} is not supported; expected 'silu' or 'swish'")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; choose one of {list(DTYPES)}")
    d_model = hf_int(hf, "hidden_size")
    expand = hf_int(hf, "expand")  # (int() read "2" and true; [2] was a TypeError)
    inner = hf_int(hf, "intermediate_size", expand * d_model)
    if inner != expand * d_model:
        raise ValueError(f"intermediate_size={inner} must equal an integer expand={expand} * "
                         f"hidden_size={d_model}")
    fields = dict(
        vocab_size=hf_int(hf, "vocab_size"), d_model=d_model, n_layer=hf_int(hf, "num_hidden_layers"),
        d_state=hf_int(hf, "state_size"), d_conv=hf_int(hf, "conv_kernel"), expand=expand,
        conv_bias=hf_bool(hf, "use_conv_bias"), proj_bias=hf_bool(hf, "use_bias"),
        norm="rmsnorm", norm_eps=hf_float(hf, "layer_norm_epsilon"),
        tie_embeddings=hf_bool(hf, "tie_word_embeddings"),
        init_std=hf_float(hf, "initializer_range"),
        dt_min=hf_float(hf, "time_step_min"), dt_max=hf_float(hf, "time_step_max"),
        dt_init_floor=hf_float(hf, "time_step_floor"),
        dtype=dtype, param_dtype=dtype, scan_layers=scan_layers, scan_impl=scan_impl,
        residual_fp32=hf_bool(hf, "residual_in_fp32"),  # a float32 residual stream under bfloat16
    )
    if model_type == "mamba":
        rank = hf["time_step_rank"]
        fields.update(dt_rank="auto" if rank == "auto" else hf_int(hf, "time_step_rank"),
                      dt_scale=hf_float(hf, "time_step_scale"),
                      dt_init="constant" if hf.get("time_step_init_scheme") == "constant" else "random")
    else:
        try:
            limit = tuple(_as_float(v) for v in hf["time_step_limit"])
        except (TypeError, ValueError):
            raise ValueError(f"time_step_limit={hf['time_step_limit']!r} is not supported; expected "
                             "[0.0, Infinity] (dt is not clamped)") from None
        if limit != (0.0, float("inf")):
            raise ValueError(f"time_step_limit={limit} is not supported (dt is not clamped); "
                             "expected (0.0, inf)")
        heads, headdim = hf_int(hf, "num_heads"), hf_int(hf, "head_dim")
        if heads * headdim != fields["expand"] * d_model:
            raise ValueError(f"num_heads={heads} * head_dim={headdim} must equal expand * hidden_size = "
                             f"{fields['expand'] * d_model}")
        fields.update(headdim=headdim, n_groups=hf_int(hf, "n_groups"), a_init="uniform")
        # as given: MambaConfig names a bad one (int() read 16.7 as 16 and True as 1)
        fields.update(chunk_size=chunk_size if chunk_size is not None else MambaConfig.chunk_size)
    return get_config(model_type, "tiny", **fields)


def _expected_shapes(c) -> Dict[str, tuple]:
    d, v, i_dim, n, k = c.d_model, c.vocab_size, c.d_inner, c.d_state, c.d_conv
    shapes = {f"{_PREFIX}embeddings.weight": (v, d), f"{_PREFIX}norm_f.weight": (d,)}
    if c.model == "mamba":
        r = c.resolved_dt_rank
        layer = {"in_proj.weight": (2 * i_dim, d), "conv1d.weight": (i_dim, 1, k),
                 "x_proj.weight": (r + 2 * n, i_dim), "dt_proj.weight": (i_dim, r), "dt_proj.bias": (i_dim,),
                 "A_log": (i_dim, n), "D": (i_dim,), "out_proj.weight": (d, i_dim)}
        if c.conv_bias:
            layer["conv1d.bias"] = (i_dim,)
        if c.proj_bias:
            layer.update({"in_proj.bias": (2 * i_dim,), "out_proj.bias": (d,)})
    else:
        h, gn = c.ssm_heads, c.n_groups * n
        proj = 2 * i_dim + 2 * gn + h
        layer = {"in_proj.weight": (proj, d), "conv1d.weight": (i_dim + 2 * gn, 1, k), "dt_bias": (h,),
                 "A_log": (h,), "D": (h,), "norm.weight": (i_dim,), "out_proj.weight": (d, i_dim)}
        if c.conv_bias:
            layer["conv1d.bias"] = (i_dim + 2 * gn,)
        if c.proj_bias:
            layer.update({"in_proj.bias": (proj,), "out_proj.bias": (d,)})
    for li in range(c.n_layer):
        shapes[f"{_PREFIX}layers.{li}.norm.weight"] = (d,)
        for name, shape in layer.items():
            shapes[f"{_PREFIX}layers.{li}.mixer.{name}"] = shape
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _mixer_params(c, t: Dict[str, np.ndarray]) -> dict:
    """One layer's mixer params (numpy, jaxformers layout) from its HF tensors ``t`` (short names)."""
    i_dim = c.d_inner
    out = {}
    conv_w = t["conv1d.weight"][:, 0, :].T  # [K, channels]
    conv_b = t.get("conv1d.bias")
    if c.model == "mamba":
        in_proj = {"kernel": t["in_proj.weight"].T.reshape(c.d_model, 2, i_dim)}
        if c.proj_bias:
            in_proj["bias"] = t["in_proj.bias"].reshape(2, i_dim)
        out.update(in_proj=in_proj, conv={"kernel": conv_w}, x_proj={"kernel": t["x_proj.weight"].T},
                   dt_proj={"kernel": t["dt_proj.weight"].T}, dt_bias=t["dt_proj.bias"],
                   A_log=t["A_log"], D=t["D"])
        if c.conv_bias:
            out["conv"]["bias"] = conv_b
    else:
        gn = c.n_groups * c.d_state
        cuts = np.cumsum([i_dim, i_dim, 2 * gn])
        w = np.split(t["in_proj.weight"], cuts, axis=0)
        b = np.split(t["in_proj.bias"], cuts) if c.proj_bias else [None] * 4
        for name, wi, bi in zip(("in_z", "in_x", "in_bc", "in_dt"), w, b):
            out[name] = {"kernel": wi.T} if bi is None else {"kernel": wi.T, "bias": bi}
        out["conv_x"] = {"kernel": conv_w[:, :i_dim]}
        out["conv_bc"] = {"kernel": conv_w[:, i_dim:]}
        if c.conv_bias:
            out["conv_x"]["bias"], out["conv_bc"]["bias"] = conv_b[:i_dim], conv_b[i_dim:]
        out.update(dt_bias=t["dt_bias"], A_log=t["A_log"], D=t["D"], norm={"scale": t["norm.weight"]})
    out["out_proj"] = {"kernel": t["out_proj.weight"].T}
    if c.proj_bias:
        out["out_proj"]["bias"] = t["out_proj.bias"]
    return out


def from_hf_mamba(path_or_dir: str, *, dtype: str = "float32", scan_layers: bool = False,
                  scan_impl: str = "auto", chunk_size: Optional[int] = None):
    """Load a HF ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` checkpoint -> (config, params).

    ``path_or_dir``: the model directory (or a file in it) with ``config.json`` and
    safetensors weights.  ``dtype`` is the param and compute dtype of the returned
    config; ``scan_layers=True`` returns the stacked ``blocks`` layout; ``chunk_size``:
    see :func:`config_from_hf_mamba`.
    """
    config = config_from_hf_mamba(read_hf_config(weight_files(path_or_dir)[0]), dtype=dtype,
                                  scan_layers=scan_layers, scan_impl=scan_impl, chunk_size=chunk_size)

    def rename(name):
        if name.startswith("backbone.embedding."):  # very old checkpoints (HF's load_hook renames it)
            name = name.replace("backbone.embedding.", "backbone.embeddings.")
        if not name.startswith(_PREFIX) and name != "lm_head.weight":
            name = _PREFIX + name  # a bare MambaModel checkpoint
        return name

    tensors = read_checkpoint(path_or_dir, _expected_shapes(config), rename=rename,
                              drop=("lm_head.weight",) if config.tie_embeddings else ())

    import jax
    import jax.numpy as jnp
    from ..layers.common import dtype_of

    target = dtype_of(dtype)
    params = {"embed": {"embedding": tensors[f"{_PREFIX}embeddings.weight"]}}
    for li in range(config.n_layer):
        p = f"{_PREFIX}layers.{li}."
        short = {k[len(p + "mixer."):]: v for k, v in tensors.items() if k.startswith(p + "mixer.")}
        params[f"blocks_{li}"] = {"norm": {"scale": tensors[p + "norm.weight"]},
                                  "mixer": _mixer_params(config, short)}
    params["final_norm"] = {"scale": tensors[f"{_PREFIX}norm_f.weight"]}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": tensors["lm_head.weight"].T}
    params = jax.tree.map(lambda x: np.ascontiguousarray(np.asarray(x, np.float32)), params)
    if scan_layers:
        params = stack_layers(params, "blocks", n_layer=config.n_layer)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=target), params)
    return config, params


# ----------------------------------------------------------------------------- export
# Fields that do not change what a trained model computes (compute / storage dtypes, layer scan,
# kernels and their tiles, rematerialisation, training-only dropout, the weight-decay groups,
# initialisation) or that HF has no field for but nothing depends on (max_seq_len: no position
# embedding).
_NOT_FUNCTIONAL = frozenset({
    "dtype", "param_dtype", "scan_layers", "scan_impl", "chunk_size", "remat", "max_seq_len",
    "dropout", "attn_dropout", "embed_dropout", "weight_decay_groups", "init_std",
    "scale_residual_init", "dt_min", "dt_max", "dt_init_floor", "dt_init", "dt_scale", "a_init",
    "a_init_range", "dt_rank"})
# Mamba-2 fields a Mamba-1 model never reads (its layer has no heads or B/C groups)
_MAMBA2_ONLY = frozenset({"headdim", "n_groups"})


def config_to_hf_mamba(config) -> dict:
    """The HF ``MambaConfig`` / ``Mamba2Config`` dict of a ``mamba`` / ``mamba2`` config; a
    ``ValueError`` naming every field whose value HF cannot express (the config read back from
    the dict, :func:`config_from_hf_mamba`, must compute the same function)."""
    if getattr(config, "model", None) not in MODEL_TYPES:
        raise ValueError(f"config.model must be one of {list(MODEL_TYPES)} to export as HF Mamba, "
                         f"got {getattr(config, 'model', None)!r}")
    c = config
    hf = dict(model_type=c.model, vocab_size=c.vocab_size, hidden_size=c.d_model,
              num_hidden_layers=c.n_layer, state_size=c.d_state, expand=c.expand,
              intermediate_size=c.d_inner, conv_kernel=c.d_conv, use_bias=c.proj_bias,
              use_conv_bias=c.conv_bias, hidden_act="silu", layer_norm_epsilon=c.norm_eps,
              initializer_range=c.init_std, residual_in_fp32=c.residual_fp32,
              time_step_min=c.dt_min, time_step_max=c.dt_max, time_step_floor=c.dt_init_floor,
              tie_word_embeddings=c.tie_embeddings, rescale_prenorm_residual=False, use_cache=True,
              **NO_SPECIAL_TOKENS)  # not transformers' default ids (ordinary tokens here)
    if c.model == "mamba":
        hf.update(architectures=["MambaForCausalLM"], time_step_rank=c.resolved_dt_rank,
                  time_step_scale=c.dt_scale,
                  time_step_init_scheme="constant" if c.dt_init == "constant" else "random")
    else:
        hf.update(architectures=["Mamba2ForCausalLM"], num_heads=c.ssm_heads, head_dim=c.headdim,
                  n_groups=c.n_groups, chunk_size=c.chunk_size)  # time_step_limit: HF's (0, inf)
    back = config_from_hf_mamba(hf)
    names = [f.name for f in dataclasses.fields(c)]
    ignored = _NOT_FUNCTIONAL | (_MAMBA2_ONLY if c.model == "mamba" else frozenset())
    bad = [f"{n}={getattr(c, n)!r} (HF Mamba: {getattr(back, n)!r})" for n in names
           if n not in ignored and getattr(c, n) != getattr(back, n)]
    if c.model == "mamba" and c.resolved_dt_rank != back.resolved_dt_rank:
        bad.append(f"dt_rank={c.dt_rank!r}")
    if bad:
        raise ValueError("this config cannot be exported as HF " + c.model + ": " + "; ".join(bad))
    return hf


def _mixer_tensors(c, m: dict) -> Dict[str, np.ndarray]:
    """Inverse of :func:`_mixer_params`: one layer's HF tensors (short names) from its mixer params."""
    def a(x):
        return np.asarray(x, np.float32)

    t = {}
    if c.model == "mamba":
        t["in_proj.weight"] = a(m["in_proj"]["kernel"]).reshape(c.d_model, 2 * c.d_inner).T
        if c.proj_bias:
            t["in_proj.bias"] = a(m["in_proj"]["bias"]).reshape(2 * c.d_inner)
        conv_w = a(m["conv"]["kernel"])
        conv_b = a(m["conv"]["bias"]) if c.conv_bias else None
        t.update({"x_proj.weight": a(m["x_proj"]["kernel"]).T, "dt_proj.weight": a(m["dt_proj"]["kernel"]).T,
                  "dt_proj.bias": a(m["dt_bias"]), "A_log": a(m["A_log"]), "D": a(m["D"])})
    else:
        names = ("in_z", "in_x", "in_bc", "in_dt")
        t["in_proj.weight"] = np.concatenate([a(m[n]["kernel"]).T for n in names], axis=0)
        if c.proj_bias:
            t["in_proj.bias"] = np.concatenate([a(m[n]["bias"]) for n in names])
        conv_w = np.concatenate([a(m["conv_x"]["kernel"]), a(m["conv_bc"]["kernel"])], axis=1)
        conv_b = np.concatenate([a(m["conv_x"]["bias"]), a(m["conv_bc"]["bias"])]) if c.conv_bias else None
        t.update({"dt_bias": a(m["dt_bias"]), "A_log": a(m["A_log"]), "D": a(m["D"]),
                  "norm.weight": a(m["norm"]["scale"])})
    t["conv1d.weight"] = conv_w.T[:, None, :]  # [K, channels] -> [channels, 1, K]
    if conv_b is not None:
        t["conv1d.bias"] = conv_b
    t["out_proj.weight"] = a(m["out_proj"]["kernel"]).T
    if c.proj_bias:
        t["out_proj.bias"] = a(m["out_proj"]["bias"])
    return t


def to_hf_mamba(config, params, out_dir: str, *, dtype: str = "float32",
                max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> str:
    """Write ``config.json`` + ``model.safetensors`` loadable by transformers'
    ``MambaForCausalLM`` (``mamba``) / ``Mamba2ForCausalLM`` (``mamba2``); the inverse of
    :func:`from_hf_mamba`.  ``params``: plain or boxed, ``{"params": ...}`` accepted, scanned
    (``blocks``) or per-layer (``blocks_{i}``).  A config HF cannot express (e.g. ``skip_gains``,
    a LayerNorm) is a ``ValueError`` naming the fields (:func:`config_to_hf_mamba`).
    ``dtype`` / ``max_shard_size``: the storage dtype and the shard size, as for
    :func:`~jaxformers.convert.hf_llama.to_hf`.  Every tensor is stored in ``dtype``, ``A_log``,
    ``D`` and ``dt_bias`` too: transformers' Mamba / Mamba-2 keep no module in float32
    (no ``_keep_in_fp32_modules``), so ``save_pretrained`` of a bfloat16 model writes them in
    bfloat16 as well (they are upcast to float32 inside the scan, in HF and here).
    Returns ``out_dir``."""
    check_dtype(dtype)
    parse_size(max_shard_size)
    hf = config_to_hf_mamba(config)
    params = per_layer_params(config, params)
    tensors = {f"{_PREFIX}embeddings.weight": np.asarray(params["embed"]["embedding"], np.float32),
               f"{_PREFIX}norm_f.weight": np.asarray(params["final_norm"]["scale"], np.float32)}
    for li in range(config.n_layer):
        block, p = params[f"blocks_{li}"], f"{_PREFIX}layers.{li}."  # shapes checked: per_layer_params
        tensors[p + "norm.weight"] = np.asarray(block["norm"]["scale"], np.float32)
        for name, value in _mixer_tensors(config, block["mixer"]).items():
            tensors[p + "mixer." + name] = value
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"], np.float32).T
    shapes = _expected_shapes(config)
    for name, shape in shapes.items():
        if tensors[name].shape != shape:
            raise ValueError(f"{name}: params give shape {tensors[name].shape}, config implies {shape}")
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items() if k in shapes}
    return write_checkpoint(out_dir, hf, tensors, dtype=dtype, max_shard_size=max_shard_size)


__all__ = ["config_from_hf_mamba", "config_to_hf_mamba", "from_hf_mamba", "to_hf_mamba"]
