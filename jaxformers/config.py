"""Model configuration: one frozen dataclass shared by every architecture.

Architectures that change the model add their own fields by subclassing
:class:`ModelConfig` (e.g. ``DenseFormerConfig``); everything a shared block
needs lives here.  Validation errors are ``ValueError``s that name the field and
the allowed values.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Tuple

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigMixin:
    """``replace`` (field-checked), ``to_dict`` and ``to_json`` for frozen config dataclasses."""

    def replace(self, **overrides):
        check_fields(type(self), overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigMixin):
    """Decoder-only transformer hyper-parameters (GPT / Llama families).

    ``n_kv_head`` < ``n_head`` gives grouped-query attention; ``d_ff`` is the
    hidden width of the MLP (for SwiGLU, of each of the gate/up projections).
    """

    model: str = "gpt"
    vocab_size: int = 256
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None -> n_head (multi-head attention)
    head_dim: Optional[int] = None  # None -> d_model // n_head
    d_ff: Optional[int] = None  # None -> 4 * d_model (gelu) / 8/3 d_model rounded (swiglu)
    max_seq_len: int = 256
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    scale_residual_init: bool = True  # std / sqrt(2 * n_layer) on output projections
    attention_impl: str = "auto"
    window: Optional[int] = None  # sliding-window attention (all layers) when set
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"

    # ------------------------------------------------------------------ derived
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def dim_head(self) -> int:
        return self.d_model // self.n_head if self.head_dim is None else self.head_dim

    @property
    def n_attention_layers(self) -> int:
        """Layers with self-attention (for FLOP counts; SSM/hybrid configs override)."""
        return self.n_layer

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            hidden = int(8 * self.d_model / 3)
            return 64 * ((hidden + 63) // 64)  # round up to a multiple of 64
        return 4 * self.d_model

    # --------------------------------------------------------------- validation
    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_seq_len"):
            positive(name)
        for name in ("n_kv_head", "head_dim", "d_ff", "window"):
            if getattr(self, name) is not None:
                positive(name)
        _choice("norm", self.norm, NORMS)
        _choice("mlp", self.mlp, MLPS)
        _choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _choice("remat", self.remat, REMAT_POLICIES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("param_dtype", self.param_dtype, DTYPES)
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(
                f"n_head={self.n_head} must divide d_model={self.d_model} "
                f"(allowed n_head: {_divisors(self.d_model)}), or set head_dim explicitly"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                f"(allowed n_kv_head: {_divisors(self.n_head)})"
            )
        if self.dim_head % 2:
            raise ValueError(f"head_dim={self.dim_head} must be even for rotary embeddings")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")


def _choice(name: str, value: Any, allowed: Tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


def check_fields(cls, overrides: dict) -> None:
    """Raise a ValueError naming unknown fields (and listing the known ones)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown config field(s) {unknown} for {cls.__name__}; known fields: {sorted(known)}"
        )


def coerce_value(cls, name: str, text: str):
    """Parse ``text`` (from a ``--set field=value`` flag) into the type of field ``name``."""
    check_fields(cls, {name: None})
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = field.default
    if text.lower() in ("none", "null"):
        return None
    if isinstance(default, bool) or field.type in ("bool", bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"{name} expects a bool (true/false), got {text!r}")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
