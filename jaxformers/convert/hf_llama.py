"""Hugging Face ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` /
``Qwen3ForCausalLM`` <-> jaxformers ``llama`` params.

A Llama checkpoint's ``attention_bias: true`` (``LlamaForCausalLM`` then biases q/k/v AND o)
imports as ``qkv_bias=True`` when every ``o_proj.bias`` is zero (jaxformers has no o bias: a
non-zero one is a ``ValueError`` naming the tensor and its layer); ``mlp_bias`` is refused.  Such a
model exports as ``Qwen2ForCausalLM`` (below), not back as a biased Llama: Qwen2 is exactly
"Llama + q/k/v biases" (no o bias to write, sliding windows expressible), which
``LlamaForCausalLM`` can only mimic with zero o biases.

A Mistral checkpoint is a Llama with sliding-window attention in every layer (same tensor names
and shapes, no biases, SwiGLU, RMSNorm, RoPE, optional ``head_dim``; ``MistralForCausalLM`` reads
no ``attention_bias``, so a mistral config that sets it is refused as ambiguous): ``model_type='mistral'``
imports as a ``llama`` config whose ``window`` is the checkpoint's ``sliding_window`` (null: no
window), and a llama-compatible config with ``window`` set exports as ``MistralForCausalLM``
(without ``window``: ``LlamaForCausalLM``).  The two windows mean the same thing, so the number
is carried unchanged: transformers' sliding-window causal mask lets query ``i`` see key ``j``
when ``i - sliding_window < j <= i`` (``masking_utils.sliding_window_overlay``:
``kv_idx > q_idx - sliding_window``; its sliding-window caches keep the last
``sliding_window - 1`` keys plus the new one), and jaxformers' ``window`` w when
``i - w < j <= i`` (:func:`jaxformers.ops.attention.attention_mask`, the Pallas kernels' masks):
each query sees ``min(i + 1, w)`` keys, itself included, in both.

Qwen2 / Qwen2.5 (``model_type='qwen2'``) is a Llama with biases on q/k/v (not o, not the MLP):
it imports as a ``llama`` config with ``qkv_bias=True``.  Qwen3 (``'qwen3'``) is a Llama with an
RMSNorm over ``head_dim`` on every query and key head (one ``[head_dim]`` weight each, shared by
the heads, eps ``rms_norm_eps``) applied before RoPE: ``qk_norm=True`` (its ``attention_bias``,
default false, biases q/k/v and o: ``qkv_bias``, and every ``o_proj.bias`` must be zero; its
``head_dim`` omitted is 128, null is refused: transformers 5's ``Qwen3Config`` refuses it, and its
Qwen2 crashes on it, so a Qwen2 null ``head_dim`` is refused too).  Both
take their window from ``use_sliding_window`` + ``sliding_window`` when every layer slides (the
same mask as Mistral's); a per-layer pattern (``max_window_layers``, ``layer_types``) is refused.
Export: ``qk_norm`` -> ``Qwen3ForCausalLM`` (``attention_bias=qkv_bias``; with it, zero
``o_proj.bias`` tensors are written), else ``qkv_bias`` -> ``Qwen2ForCausalLM``, else Mistral /
Llama as above.

Loading needs numpy + safetensors only (no torch). ``safetensors.numpy`` cannot
return bfloat16 tensors, so bf16 tensors are read straight from the file: the
safetensors header (8-byte little-endian length + JSON) gives each tensor's byte
range, and the raw uint16 words are widened to float32 exactly (``bits << 16``).
Export (:func:`to_hf`): float32 by default, ``dtype="bfloat16"`` / ``"float16"`` (rounded to
nearest even; ``config.json``'s ``dtype`` / ``torch_dtype`` say which), one ``model.safetensors``
or ``max_shard_size`` shards + ``model.safetensors.index.json``, written atomically
(:mod:`~jaxformers.convert.hf_write`).

Weight layout (torch ``nn.Linear.weight`` is ``[out, in]``)::

    model.embed_tokens.weight            [V, D]      -> embed/embedding             [V, D]
    layers.i.self_attn.q_proj.weight     [H*Dh, D]   -> blocks_i/attn/q/kernel      [D, H, Dh]
    layers.i.self_attn.k_proj/v_proj     [Hkv*Dh, D] -> blocks_i/attn/k|v/kernel    [D, Hkv, Dh]
    layers.i.self_attn.o_proj.weight     [D, H*Dh]   -> blocks_i/attn/o/kernel      [H, Dh, D]
    layers.i.self_attn.q_proj.bias       [H*Dh]      -> blocks_i/attn/q/bias        [H, Dh]    (qkv_bias)
    layers.i.self_attn.k_proj/v_proj.bias [Hkv*Dh]   -> blocks_i/attn/k|v/bias      [Hkv, Dh]  (qkv_bias)
    layers.i.self_attn.q_norm/k_norm.weight [Dh]     -> blocks_i/attn/q_norm|k_norm/scale [Dh] (qk_norm)
    layers.i.self_attn.o_proj.bias       [D]         -> (Llama / Qwen3 attention_bias: must be zero; none)
    layers.i.mlp.gate_proj/up_proj       [F, D]      -> blocks_i/mlp/gate|up/kernel [D, F]
    layers.i.mlp.down_proj.weight        [D, F]      -> blocks_i/mlp/down/kernel    [F, D]
    layers.i.input_layernorm.weight      [D]         -> blocks_i/attn_norm/scale
    layers.i.post_attention_layernorm    [D]         -> blocks_i/mlp_norm/scale
    model.norm.weight                    [D]         -> final_norm/scale
    lm_head.weight (untied only)         [V, D]      -> lm_head/kernel              [D, V]
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import numpy as np

from ..config import DTYPES, TransformerConfig
from .hf_io import (NO_SPECIAL_TOKENS, hf_bool, hf_float, hf_int, read_checkpoint, read_hf_config,
                    weight_files)
from .hf_write import DEFAULT_MAX_SHARD_SIZE, check_dtype, parse_size, write_checkpoint
from .layers import per_layer_params, stack_layers

_PREFIX = "model."
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
#: transformers' ``LlamaConfig`` defaults of the sizes: what HF reads for a key a config.json
#: omits (or sets to null); the other keys' defaults are in :func:`config_from_hf`.
HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32)
#: transformers' ``MistralConfig`` defaults of the sizes (``intermediate_size`` differs from Llama's).
MISTRAL_DEFAULTS = {**HF_DEFAULTS, "intermediate_size": 14336}
#: ``MistralConfig``'s defaults of the keys a config.json omits that differ from Llama's: an
#: omitted ``sliding_window`` is a 4096-token window (null: none), an omitted
#: ``num_key_value_heads`` 8 kv heads (null: ``num_attention_heads``, as transformers 4.x reads it).
MISTRAL_OMITTED = dict(sliding_window=4096, num_key_value_heads=8, max_position_embeddings=131072)
#: transformers' ``Qwen2Config`` / ``Qwen3Config`` defaults of the sizes.
QWEN_DEFAULTS = {**HF_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016}
#: ``Qwen2Config`` / ``Qwen3Config`` defaults of the other keys a config.json omits that differ from
#: Llama's (``head_dim``: Qwen3 only; Qwen2 reads ``hidden_size // num_attention_heads``).
QWEN_OMITTED = dict(num_key_value_heads=32, max_position_embeddings=32768, use_sliding_window=False,
                    sliding_window=4096, max_window_layers=28)
QWEN3_HEAD_DIM = 128
#: The HF architectures :func:`from_hf` reads (``model_type`` of config.json); Mamba ones: hf_mamba.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# --------------------------------------------------------------------------- config mapping
def _rope_theta(hf: dict) -> float:
    """RoPE base of a HF config; refuses a non-default rope type in ``rope_parameters``
    (transformers >= 5) or ``rope_scaling`` (older), both checked when both are present.
    As in transformers, a non-empty ``rope_scaling`` takes the place of ``rope_parameters``
    (>= 5; older versions ignore ``rope_parameters``), and the base missing from that dict is
    the top-level ``rope_theta``, else 10000."""
    ropes = {}
    for key in ("rope_parameters", "rope_scaling"):
        rope = hf.get(key)
        if rope is None or rope == {}:
            continue
        if not isinstance(rope, dict):
            raise ValueError(f"{key}={rope!r} is not supported; expected a dict or null")
        if all(isinstance(v, dict) for v in rope.values()):
            raise ValueError(f"{key} nested per layer type ({sorted(rope)}) are not supported")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{key} rope_type={rope_type!r} is not supported (only 'default' RoPE)")
        ropes[key] = rope
    for name in ("partial_rotary_factor",):
        for where, src in (*ropes.items(), ("config", hf)):
            value = src.get(name)
            if value not in (None, 1, 1.0):
                raise ValueError(f"{name}={value!r} (in {where}) is not supported (full rotary only)")
    rope = ropes.get("rope_scaling", ropes.get("rope_parameters", {}))
    return hf_float(rope, "rope_theta", hf_float(hf, "rope_theta", 10000.0))


def _sliding_window(hf: dict):
    """jaxformers ``window`` of a HF ``MistralConfig`` dict: its ``sliding_window`` unchanged (the
    same mask, see the module docstring); omitted: 4096 (``MistralConfig``'s default), null: None.
    ``ValueError`` for a window that is not a positive integer, or a ``layer_types`` list other
    than every layer ``'sliding_attention'`` with a window / ``'full_attention'`` without one:
    jaxformers' window applies to every layer, and transformers reads such a config two ways
    (``AutoConfig`` as Ministral, each layer's type honoured; ``MistralForCausalLM`` ignores
    ``layer_types`` and slides every layer)."""
    window = hf.get("sliding_window", MISTRAL_OMITTED["sliding_window"])
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window={window!r} is not supported; expected a positive integer (the keys "
                         "a query sees, itself included) or null (no window)")
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        want = "full_attention" if window is None else "sliding_attention"
        if not isinstance(layer_types, list) or any(t != want for t in layer_types):
            found = sorted(set(map(str, layer_types))) if isinstance(layer_types, list) else layer_types
            raise ValueError(f"layer_types={found!r} is not supported with sliding_window={window!r}: "
                             "jaxformers' window is the same in every layer, so every entry must be "
                             f"{want!r}")
    return window


def _qwen_window(hf: dict, n_layer: int):
    """jaxformers ``window`` of a HF ``Qwen2Config`` / ``Qwen3Config`` dict.  transformers slides
    layer ``i`` when ``use_sliding_window`` (default false) and ``layer_types[i]`` is
    ``'sliding_attention'``, with ``sliding_window`` keys (omitted: 4096, null: none);
    ``layer_types`` omitted: layers ``i >= max_window_layers`` (default 28) slide.  jaxformers'
    window is the same in every layer, so a config whose layers differ is a ``ValueError``
    naming the key that makes them differ (``max_window_layers`` or ``layer_types``).  So is a
    ``'sliding_attention'`` layer without a window (``use_sliding_window`` false or a null
    ``sliding_window``): refused, not read as full attention, since transformers 5 does not run
    such a model (its sliding mask / cache raise on the null window)."""
    use = hf.get("use_sliding_window", QWEN_OMITTED["use_sliding_window"])
    if not isinstance(use, bool):
        raise ValueError(f"use_sliding_window={use!r} is not supported; expected true or false")
    window = hf.get("sliding_window", QWEN_OMITTED["sliding_window"]) if use else None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window={window!r} is not supported; expected a positive integer (the keys "
                         "a query sees, itself included) or null (no window)")
    layer_types, key = hf.get("layer_types"), "layer_types"
    if layer_types is None:
        first = hf.get("max_window_layers", QWEN_OMITTED["max_window_layers"])
        if isinstance(first, bool) or not isinstance(first, int):
            raise ValueError(f"max_window_layers={first!r} is not supported; expected an integer")
        layer_types, key = ["sliding_attention" if window is not None and i >= first else "full_attention"
                            for i in range(n_layer)], "max_window_layers"
    if not isinstance(layer_types, list) or len(layer_types) != n_layer or \
            any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        raise ValueError(f"layer_types={layer_types!r} is not supported: expected a list of "
                         f"num_hidden_layers={n_layer} entries 'full_attention' / 'sliding_attention'")
    if window is None and "sliding_attention" in layer_types:
        raise ValueError(f"layer_types has 'sliding_attention' layers but no window (use_sliding_window={use}, "
                         f"sliding_window={hf.get('sliding_window')!r}): not supported (transformers cannot run "
                         "it either: its sliding-window mask needs a window)")
    if len(set(layer_types)) > 1:
        raise ValueError(f"{key}={hf.get(key, QWEN_OMITTED.get(key))!r} gives sliding-window attention in "
                         f"{layer_types.count('sliding_attention')} of {n_layer} layers only (sliding_window="
                         f"{window}): jaxformers' window is the same in every layer, so this per-layer "
                         "pattern is not supported")
    return window if layer_types and layer_types[0] == "sliding_attention" else None


def _attention_bias(hf: dict) -> bool:
    """``qkv_bias`` of a ``LlamaConfig`` / ``Qwen3Config`` dict: its ``attention_bias`` (default
    false), which biases q/k/v AND o (:func:`from_hf` then needs every ``o_proj.bias`` zero);
    ``ValueError`` unless a bool (:func:`~jaxformers.convert.hf_io.hf_bool`)."""
    return hf_bool(hf, "attention_bias", False)


def config_from_hf(hf: dict, *, dtype: str = "float32", scan_layers: bool = False) -> TransformerConfig:
    """jaxformers ``llama`` config from a HF ``LlamaConfig``, ``MistralConfig``, ``Qwen2Config`` or
    ``Qwen3Config`` dict (``config.json``).

    A key the dict omits takes transformers' default, as ``from_pretrained`` reads it
    (:data:`HF_DEFAULTS`, for Mistral :data:`MISTRAL_DEFAULTS` and :data:`MISTRAL_OMITTED`;
    ``num_key_value_heads`` -> ``num_attention_heads`` (Mistral: 8), ``rms_norm_eps`` 1e-6,
    ``rope_theta`` 10000, ...), and so does any other key set to null except Mistral's
    ``sliding_window`` (null: no window); a size of :data:`HF_DEFAULTS` set to null is a
    ``ValueError`` (transformers refuses it too).  ``model_type='mistral'``: ``window`` is the
    ``sliding_window`` unchanged (the two masks agree, see the module docstring); a per-layer
    ``layer_types`` pattern, as any other setting jaxformers cannot compute (biases, a
    non-default RoPE, an activation other than SiLU), is a ``ValueError`` naming the key.

    ``model_type='qwen2'``: ``qkv_bias=True`` (transformers' Qwen2 always biases q/k/v, never o;
    it reads no ``attention_bias`` key, nor do we); ``'qwen3'``: ``qk_norm=True``, ``head_dim``
    omitted = 128 (null: ``ValueError``, as for Qwen2), and for ``'qwen3'`` and ``'llama'``
    ``attention_bias`` -> ``qkv_bias`` (they then also bias ``o_proj``, which jaxformers has not:
    :func:`from_hf` accepts it only when every ``o_proj.bias`` is zero, as :func:`to_hf` writes it
    for Qwen3).  Both take their own config classes' defaults
    (:data:`QWEN_DEFAULTS`, :data:`QWEN_OMITTED`) and window keys (:func:`_qwen_window`)."""
    from ..registry import get_config

    model_type = hf.get("model_type") or "llama"
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; expected one of {list(MODEL_TYPES)} "
                         "(or 'mamba' / 'mamba2' through from_hf / config_from_hf_mamba)")
    qwen = model_type in ("qwen2", "qwen3")
    sizes = MISTRAL_DEFAULTS if model_type == "mistral" else QWEN_DEFAULTS if qwen else HF_DEFAULTS
    nulls = [k for k in sizes if k in hf and hf[k] is None]
    if nulls:
        raise ValueError(f"config.json sets {nulls} to null: a model size must be a number (transformers "
                         "refuses null there too); give the size or leave the key out for its default")
    window, max_len = None, 2048
    if model_type == "mistral":
        window, max_len = _sliding_window(hf), MISTRAL_OMITTED["max_position_embeddings"]
        if "num_key_value_heads" not in hf:
            hf = {**hf, "num_key_value_heads": MISTRAL_OMITTED["num_key_value_heads"]}
    qkv_bias = qk_norm = False
    if qwen:
        n_layer = hf_int(hf, "num_hidden_layers", QWEN_DEFAULTS["num_hidden_layers"])
        window, max_len = _qwen_window(hf, n_layer), QWEN_OMITTED["max_position_embeddings"]
        omitted = {"num_key_value_heads": QWEN_OMITTED["num_key_value_heads"]}
        if "head_dim" in hf and hf["head_dim"] is None:  # transformers 5: Qwen3 refuses it, Qwen2 crashes
            raise ValueError(f"head_dim=null is not supported for model_type={model_type!r} (transformers "
                             "refuses or crashes on it); give the head size or leave head_dim out "
                             f"({'128' if model_type == 'qwen3' else 'hidden_size // num_attention_heads'})")
        if model_type == "qwen3":
            omitted["head_dim"] = QWEN3_HEAD_DIM
        hf = {**hf, **{k: v for k, v in omitted.items() if k not in hf}}
        if model_type == "qwen2":
            qkv_bias = True
            hf = {k: v for k, v in hf.items() if k != "attention_bias"}  # (not read by transformers' Qwen2)
        else:
            qk_norm = True
            qkv_bias = _attention_bias(hf)
            hf = {k: v for k, v in hf.items() if k != "attention_bias"}
    hf = {**sizes, **{k: v for k, v in hf.items() if v is not None}}
    if model_type == "llama":  # LlamaForCausalLM's attention_bias biases q/k/v and o, as Qwen3's
        qkv_bias = _attention_bias(hf)
        hf.pop("attention_bias", None)
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name, False):
            raise ValueError(f"{name}={hf[name]!r} is not supported (jaxformers llama has no MLP biases)"
                             if name == "mlp_bias" else
                             f"{name}={hf[name]!r} is not supported for model_type={model_type!r} "
                             "(MistralForCausalLM has no attention biases and ignores the key: ambiguous)")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' "swish" is SiLU too
        raise ValueError(f"hidden_act={act!r} is not supported; expected 'silu' or 'swish' (SwiGLU)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; choose one of {list(DTYPES)}")
    d_model, n_head = hf_int(hf, "hidden_size"), hf_int(hf, "num_attention_heads")
    fields = dict(
        vocab_size=hf_int(hf, "vocab_size"),
        d_model=d_model,
        n_layer=hf_int(hf, "num_hidden_layers"),
        n_head=n_head,
        n_kv_head=hf_int(hf, "num_key_value_heads", n_head),
        d_ff=hf_int(hf, "intermediate_size"),
        norm_eps=hf_float(hf, "rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(hf),
        tie_embeddings=hf_bool(hf, "tie_word_embeddings", False),
        max_seq_len=hf_int(hf, "max_position_embeddings", max_len),
        init_std=hf_float(hf, "initializer_range", 0.02),
        norm="rmsnorm", mlp="swiglu", window=window, qkv_bias=qkv_bias, qk_norm=qk_norm,
        dtype=dtype, param_dtype=dtype, scan_layers=scan_layers,
    )
    head_dim = None if hf.get("head_dim") is None else hf_int(hf, "head_dim")
    if head_dim is not None and (d_model % n_head or head_dim != d_model // n_head):
        fields["head_dim"] = head_dim
    return get_config("llama", "tiny", **fields)


def hf_architecture(config: TransformerConfig) -> str:
    """The HF class :func:`to_hf` writes ``config`` as: ``Qwen3ForCausalLM`` with ``qk_norm``,
    else ``Qwen2ForCausalLM`` with ``qkv_bias`` (also for a Llama ``attention_bias`` import: Qwen2
    is Llama + q/k/v biases, no o bias), else ``MistralForCausalLM`` with a ``window``, else
    ``LlamaForCausalLM``."""
    if config.qk_norm:
        return "Qwen3ForCausalLM"
    if config.qkv_bias:
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if config.window is not None else "LlamaForCausalLM"


def _o_bias(config: TransformerConfig) -> bool:
    """Whether the export has (zero) ``o_proj.bias`` tensors: Qwen3's ``attention_bias`` biases
    q/k/v AND o, so a ``qkv_bias`` + ``qk_norm`` model is written with a zero o bias."""
    return bool(config.qk_norm and config.qkv_bias)


def config_to_hf(config: TransformerConfig) -> dict:
    """HF config dict (for ``config.json``) of a llama-compatible config: a ``LlamaConfig``
    without ``window``, a ``MistralConfig`` with ``sliding_window=window`` (the same mask, see
    the module docstring) when ``window`` is set; with ``qkv_bias`` a ``Qwen2Config``, with
    ``qk_norm`` a ``Qwen3Config`` (``attention_bias=qkv_bias``), each with
    ``use_sliding_window`` / ``sliding_window`` and every layer sliding when ``window`` is set
    (``max_window_layers=0``, ``layer_types`` written out)."""
    check_llama_compatible(config)
    shared = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ff_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.dim_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": float(config.rope_theta),  # transformers < 5 reads this ...
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_theta)},  # ... >= 5 this
        "attention_dropout": 0.0,
        "tie_word_embeddings": bool(config.tie_embeddings),
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
        **NO_SPECIAL_TOKENS,
    }
    arch = hf_architecture(config)
    if arch.startswith("Qwen"):
        windowed = config.window is not None
        qwen = {"architectures": [arch], "model_type": arch[:5].lower(), **shared,
                "use_sliding_window": windowed, "sliding_window": int(config.window) if windowed else None,
                "max_window_layers": 0 if windowed else config.n_layer,
                "layer_types": [("sliding" if windowed else "full") + "_attention"] * config.n_layer}
        if arch == "Qwen3ForCausalLM":  # (Qwen2 biases q/k/v always and reads no attention_bias key)
            qwen["attention_bias"] = bool(config.qkv_bias)
        return qwen
    if config.window is not None:  # MistralConfig has no bias / pretraining_tp keys (never biased)
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **shared,
                "sliding_window": int(config.window)}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shared,
            "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


#: What :func:`to_hf` (and ``experiments.export``) can write, named in its refusals.
EXPORTABLE = ("Hugging Face export supports model='llama' (or 'gpt' configured llama-style: "
              "norm='rmsnorm', mlp='swiglu'; as MistralForCausalLM with a sliding window, "
              "Qwen2ForCausalLM with qkv_bias, Qwen3ForCausalLM with qk_norm), 'mamba' and 'mamba2'")


def check_llama_compatible(config: TransformerConfig) -> None:
    """``ValueError`` naming the field unless ``config`` is a plain transformer HF Llama / Mistral
    can compute (``window`` is allowed: it exports as Mistral)."""
    from ..models.transformer import Transformer
    from ..registry import get_spec

    if not isinstance(config, TransformerConfig):
        raise ValueError(f"config must be a TransformerConfig, got {type(config).__name__}; "
                         f"{EXPORTABLE}")
    spec = get_spec(config.model)
    if spec.module_cls is not Transformer or type(config) is not TransformerConfig:
        raise ValueError(f"model={config.model!r} changes the transformer ({spec.module_cls.__name__}) and "
                         f"has no Hugging Face equivalent; {EXPORTABLE}")
    if config.skip_gains:
        raise ValueError("skip_gains=True is not llama-compatible; HF Llama has no skip-connection gains")
    if config.qk_norm_per_head:
        raise ValueError("qk_norm_per_head=True is not llama-compatible; HF Qwen3 has one q_norm / k_norm "
                         "scale [head_dim] per layer, shared by the heads")
    if config.norm != "rmsnorm":
        raise ValueError(f"norm={config.norm!r} is not llama-compatible; HF Llama needs norm='rmsnorm'")
    if config.mlp != "swiglu":
        raise ValueError(f"mlp={config.mlp!r} is not llama-compatible; HF Llama needs mlp='swiglu'")


# --------------------------------------------------------------------------- params mapping
def _layer_names(i: int, c: TransformerConfig = None) -> Dict[str, Tuple[str, ...]]:
    """HF tensor name -> jaxformers path (in ``blocks_i``) of layer ``i``; ``c``'s ``qkv_bias`` /
    ``qk_norm`` add the bias / q_norm / k_norm tensors."""
    p = f"{_PREFIX}layers.{i}."
    extra = {}
    if c is not None and c.qkv_bias:
        extra.update({p + f"self_attn.{n}_proj.bias": ("attn", n, "bias") for n in "qkv"})
    if c is not None and c.qk_norm:
        extra.update({p + f"self_attn.{n}_norm.weight": ("attn", f"{n}_norm", "scale") for n in "qk"})
    return {
        **extra,
        p + "self_attn.q_proj.weight": ("attn", "q", "kernel"),
        p + "self_attn.k_proj.weight": ("attn", "k", "kernel"),
        p + "self_attn.v_proj.weight": ("attn", "v", "kernel"),
        p + "self_attn.o_proj.weight": ("attn", "o", "kernel"),
        p + "mlp.gate_proj.weight": ("mlp", "gate", "kernel"),
        p + "mlp.up_proj.weight": ("mlp", "up", "kernel"),
        p + "mlp.down_proj.weight": ("mlp", "down", "kernel"),
        p + "input_layernorm.weight": ("attn_norm", "scale"),
        p + "post_attention_layernorm.weight": ("mlp_norm", "scale"),
    }


def _to_jax_layout(path: Tuple[str, ...], w: np.ndarray, c: TransformerConfig) -> np.ndarray:
    d, h, hkv, dh = c.d_model, c.n_head, c.kv_heads, c.dim_head
    if path[-1] == "bias":  # q/k/v [heads * Dh] -> [heads, Dh]
        return w.reshape(-1, dh)
    leaf = path[-2] if path[-1] == "kernel" else None
    if leaf == "q":
        return w.T.reshape(d, h, dh)
    if leaf in ("k", "v"):
        return w.T.reshape(d, hkv, dh)
    if leaf == "o":
        return w.T.reshape(h, dh, d)
    if leaf in ("gate", "up", "down"):
        return w.T
    return w


def _to_hf_layout(path: Tuple[str, ...], w: np.ndarray, c: TransformerConfig) -> np.ndarray:
    d, h, hkv, dh = c.d_model, c.n_head, c.kv_heads, c.dim_head
    if path[-1] == "bias":
        return w.reshape(-1)
    leaf = path[-2] if path[-1] == "kernel" else None
    if leaf == "q":
        return w.reshape(d, h * dh).T
    if leaf in ("k", "v"):
        return w.reshape(d, hkv * dh).T
    if leaf == "o":
        return w.reshape(h * dh, d).T
    if leaf in ("gate", "up", "down"):
        return w.T
    return w


def _expected_shapes(c: TransformerConfig, o_bias: bool = False) -> Dict[str, Tuple[int, ...]]:
    """HF tensor name -> HF shape (``o_bias``: Llama's / Qwen3's ``attention_bias`` ``o_proj.bias`` too)."""
    d, f, v = c.d_model, c.ff_dim, c.vocab_size
    q, kv = c.n_head * c.dim_head, c.kv_heads * c.dim_head
    shapes = {f"{_PREFIX}embed_tokens.weight": (v, d), f"{_PREFIX}norm.weight": (d,)}
    per_layer = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                 "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
                 "input_layernorm": (d,), "post_attention_layernorm": (d,),
                 "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,),
                 "q_norm": (c.dim_head,), "k_norm": (c.dim_head,)}
    for i in range(c.n_layer):
        for name in _layer_names(i, c):
            parts = name.split(".")
            shapes[name] = per_layer[".".join(parts[-2:]) if parts[-1] == "bias" else parts[-2]]
        if o_bias:
            shapes[f"{_PREFIX}layers.{i}.self_attn.o_proj.bias"] = (d,)
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _set(tree: dict, path: Iterable[str], value) -> None:
    *parents, last = path
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def _get(tree, path: Iterable[str]):
    for p in path:
        tree = tree[p]
    return tree


def from_hf(path_or_dir: str, *, dtype: str = "float32", scan_layers: bool = False):
    """Load a HF ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` /
    ``Qwen3ForCausalLM`` checkpoint (``config.json`` + safetensors) -> (config, params); a
    Mistral one gives ``window=sliding_window``, a Qwen2 one ``qkv_bias``, a Qwen3 one
    ``qk_norm``, a Llama / Qwen3 one with ``attention_bias`` ``qkv_bias`` (every ``o_proj.bias``
    must be zero) (:func:`config_from_hf`).

    ``path_or_dir``: the model directory (single ``model.safetensors``, a sharded
    ``model.safetensors.index.json`` or any ``*.safetensors``), or a file inside it.
    ``dtype`` is both the param and the compute dtype of the returned config; the
    params are cast to it. ``scan_layers=True`` returns the stacked ``blocks`` layout.
    """
    hf = read_hf_config(weight_files(path_or_dir)[0])
    if hf.get("model_type") in ("mamba", "mamba2"):  # dispatch: Mamba checkpoints have their own converter
        from .hf_mamba import from_hf_mamba
        return from_hf_mamba(path_or_dir, dtype=dtype, scan_layers=scan_layers)
    config = config_from_hf(hf, dtype=dtype, scan_layers=scan_layers)

    def rename(name):  # a bare LlamaModel / MistralModel checkpoint has no "model." prefix
        return name if name.startswith(_PREFIX) or name == "lm_head.weight" else _PREFIX + name

    # Llama's / Qwen3's attention_bias biases o_proj too (Qwen2's q/k/v biases never do)
    o_bias = config.qkv_bias and (hf.get("model_type") or "llama") in ("llama", "qwen3")
    tensors = read_checkpoint(path_or_dir, _expected_shapes(config, o_bias), rename=rename,
                              drop=("lm_head.weight",) if config.tie_embeddings else (),
                              ignored_suffixes=_IGNORED_SUFFIXES)
    if o_bias:  # jaxformers has no o bias: only an all-zero one (what to_hf writes) computes the same
        for i in range(config.n_layer):
            name = f"{_PREFIX}layers.{i}.self_attn.o_proj.bias"
            peak = float(np.max(np.abs(np.asarray(tensors[name], np.float32))))
            if peak != 0:
                raise ValueError(f"attention_bias=True with a non-zero {name} (layer {i}, max |value| "
                                 f"{peak:.6g}) is not supported: jaxformers' attention has q/k/v biases "
                                 "(qkv_bias) but no output-projection bias")

    import jax.numpy as jnp
    from ..layers.common import dtype_of

    target = dtype_of(dtype)

    def cast(x):
        return jnp.asarray(np.asarray(x, np.float32), dtype=target)

    params = {"embed": {"embedding": cast(tensors[f"{_PREFIX}embed_tokens.weight"])}}
    for i in range(config.n_layer):
        block = {}
        for name, path in _layer_names(i, config).items():
            _set(block, path, cast(_to_jax_layout(path, tensors[name], config)))
        params[f"blocks_{i}"] = block
    params["final_norm"] = {"scale": cast(tensors[f"{_PREFIX}norm.weight"])}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": cast(tensors["lm_head.weight"].T)}
    if scan_layers:
        params = stack_layers(params, "blocks", n_layer=config.n_layer)
    return config, params


def to_hf(config: TransformerConfig, params, out_dir: str, *, dtype: str = "float32",
          max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> str:
    """Write ``config.json`` + ``model.safetensors`` loadable by ``LlamaForCausalLM``, or
    by ``MistralForCausalLM`` when ``config.window`` is set (``sliding_window=window``), by
    ``Qwen2ForCausalLM`` with ``qkv_bias``, by ``Qwen3ForCausalLM`` with ``qk_norm``
    (:func:`hf_architecture`).

    ``params``: plain or boxed (from ``module.init``; a ``{"params": ...}`` variables
    dict is accepted too), scanned (``blocks``) or per-layer (``blocks_{i}``).
    Returns ``out_dir``.  A ``mamba`` / ``mamba2`` config dispatches to
    :func:`~jaxformers.convert.hf_mamba.to_hf_mamba` (``MambaForCausalLM`` / ``Mamba2ForCausalLM``).

    ``dtype``: the storage dtype of every tensor, ``"float32"`` (default), ``"bfloat16"`` or
    ``"float16"`` (``config.json``'s ``dtype`` / ``torch_dtype`` say which).  ``max_shard_size``
    (bytes or ``"5GB"``-style): more tensor bytes than that are split into
    ``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``, as
    ``save_pretrained`` does.  The files are written into a temporary folder beside ``out_dir`` and
    moved in when complete; weight files of an earlier checkpoint in ``out_dir`` that the new one
    does not overwrite are removed (:mod:`~jaxformers.convert.hf_write`).
    """
    check_dtype(dtype)
    parse_size(max_shard_size)
    if getattr(config, "model", None) in ("mamba", "mamba2"):  # as from_hf dispatches on model_type
        from .hf_mamba import to_hf_mamba
        return to_hf_mamba(config, params, out_dir, dtype=dtype, max_shard_size=max_shard_size)
    check_llama_compatible(config)
    params = per_layer_params(config, params)

    def f32(x):
        return np.ascontiguousarray(np.asarray(x).astype(np.float32))

    tensors = {f"{_PREFIX}embed_tokens.weight": f32(params["embed"]["embedding"]),
               f"{_PREFIX}norm.weight": f32(params["final_norm"]["scale"])}
    for i in range(config.n_layer):
        block = params[f"blocks_{i}"]
        for name, path in _layer_names(i, config).items():  # every path present: per_layer_params checked
            tensors[name] = f32(_to_hf_layout(path, np.asarray(_get(block, path)), config))
        if _o_bias(config):  # Qwen3's attention_bias also biases o_proj: zero, the same function
            tensors[f"{_PREFIX}layers.{i}.self_attn.o_proj.bias"] = np.zeros((config.d_model,), np.float32)
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = f32(np.asarray(params["lm_head"]["kernel"]).T)
    for name, shape in _expected_shapes(config, _o_bias(config)).items():
        if tensors[name].shape != shape:
            raise ValueError(f"{name}: params give shape {tensors[name].shape}, config implies {shape}")

    return write_checkpoint(out_dir, config_to_hf(config), tensors, dtype=dtype, max_shard_size=max_shard_size)
