"""Model configuration: frozen dataclasses, one base and one per family.

:class:`ModelConfig` holds what every language model has; :class:`TransformerConfig`
adds the attention/MLP fields (GPT, Llama, DenseFormer); the SSM family
(``jaxformers.models.mamba.MambaConfig``) adds its own and has no attention fields.
Architectures that change a model add their fields by subclassing their family's
config (e.g. ``DenseFormerConfig``).  Validation errors are ``ValueError``s that name
the field and the allowed values.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar, Optional, Tuple

import numpy as np

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")
DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_DECAY_GROUPS = ("shape", "nanogpt")  # ModelConfig.weight_decay_groups


def _plain(value):
    """``value`` with numpy scalars (``np.int64(4)``, ``np.float32(0.1)``, ``np.bool_(True)``)
    turned into the Python values they hold, also inside tuples, lists and dicts."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuple
    if isinstance(value, dict):
        items = {k: _plain(v) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else items
    return value


def plain_scalars(config) -> None:
    """Replace numpy scalars in the fields of the frozen dataclass ``config`` (a sweep's
    ``np.arange`` grid, a value read from an array) by plain Python values, in place: the checks
    then treat ``np.int64(4)`` like ``4``, and run files stay JSON.  Called first thing in
    ``__post_init__`` (0-d arrays are left alone, and refused by the checks)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        plain = _plain(value)
        if plain is not value:
            object.__setattr__(config, field.name, plain)


class ConfigMixin:
    """``replace`` (field-checked), ``to_dict`` and ``to_json`` for frozen config dataclasses."""

    def replace(self, **overrides):
        """A copy with ``overrides`` (field-checked).  ``model`` may only name an architecture
        with this config's class (e.g. ``gpt`` <-> ``llama``): another family's fields would be
        dropped or ignored, so ``ValueError`` -- build that one with ``get_config(name, ...)``."""
        check_fields(type(self), overrides)
        if "model" in overrides and overrides["model"] != getattr(self, "model", None):
            from .registry import get_spec
            get_spec(overrides["model"])  # an unknown name -> ValueError naming the registered ones
        return dataclasses.replace(self, **overrides)  # another family's name: __post_init__ refuses it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigMixin):
    """What every language model has: vocabulary, width, depth, norms, dtypes, layer scan/remat.

    Families add their own fields by subclassing: :class:`TransformerConfig` (attention +
    MLP blocks: GPT, Llama, DenseFormer), ``MambaConfig`` (SSM blocks, no attention fields),
    ``HybridConfig`` (both).  ``skip_gains=True`` gives every block learned scalar gains
    (init 1) on its skip connections (DenseFormer's ablation; any block supports it).
    ``residual_fp32=True`` keeps the residual stream in float32 when ``dtype`` is lower
    (bfloat16): the embedding output and every block's ``x + branch`` are float32, the norms
    read it in float32 and hand the branches ``dtype`` (mamba_ssm's ``residual_in_fp32``).

    Dropout (off by default; active only in training, where the trainer passes a
    ``dropout`` rng -- evaluation and generation are deterministic): ``embed_dropout`` on
    the token embeddings, ``dropout`` on every residual branch (mixer and MLP outputs,
    before the skip add), ``attn_dropout`` on the attention probabilities (the baseline
    attention mixer; it runs on the XLA path while active; training a model whose attention
    cannot apply it -- SCFA, landmark, CoTFormer, QuaRot -- or that has no attention layer --
    ``mamba``, ``mamba2`` -- or a token mixer of your own that does not declare
    ``applies_attn_dropout = True`` raises a ``ValueError``:
    :func:`jaxformers.models.transformer.check_attn_dropout`).

    FLOPs: :meth:`flops_per_token` counts every matmul weight by how many times one token
    uses it (:meth:`param_uses`: 0 for the embedding lookup unless the head is tied, the
    repeat count for weights applied several times, the active fraction for sparsely
    activated weights) plus the attention term (:meth:`attention_flops_per_token`).
    """

    model: str = ""
    vocab_size: int = 256
    d_model: int = 128
    n_layer: int = 2
    # the training context length: the trainer refuses a longer ``seq_len``, but the models do
    # not check it (RoPE has no position table): a longer input runs, its positions extrapolated
    max_seq_len: int = 256
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    scale_residual_init: bool = True  # std / sqrt(2 * n_layer) on output projections
    skip_gains: bool = False
    # compute / parameter dtypes: a name of DTYPES; a dtype object (jnp.bfloat16) is stored as its name
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # keep the residual stream (embedding output, every block's output) in float32 under a
    # lower compute dtype; the branches (norm -> mixer / MLP) still compute in ``dtype``
    # (mamba_ssm's / HF Mamba's ``residual_in_fp32``)
    residual_fp32: bool = False
    scan_layers: bool = False
    remat: str = "none"
    dropout: float = 0.0  # residual branches
    attn_dropout: float = 0.0  # attention probabilities
    embed_dropout: float = 0.0  # token embeddings
    # which parameters get weight decay (:meth:`weight_decay_names`): "shape" (the trainer's rule)
    # or "nanogpt" (nanoGPT's / epfml llm-baselines' groups, the DenseFormer and CoTFormer
    # authors' code: embedding tables not decayed, linear weights decayed whatever their shape)
    weight_decay_groups: str = "shape"

    #: The registered loss a model of this family trains with when none is named (class
    #: attribute, not a field; ``experiments.train`` uses it when neither ``--loss``, the
    #: ``--config`` file nor an ``--init-from`` run gives one): e.g. ``landmark_cross_entropy``,
    #: which inserts the landmarks a landmark model is built around.
    default_loss = "cross_entropy"

    #: Parameter names (the last key of a parameter's path) this family never weight-decays,
    #: whatever their shape (class attribute, not a field): the trainer's decay rule
    #: (:func:`jaxformers.training.optim.decay_mask`) otherwise decays a parameter iff it has two
    #: or more non-layer axes (a ``heads, head_dim`` pair counting as one).  e.g. ``MambaConfig``: mamba_ssm's ``_no_weight_decay`` parameters.
    no_weight_decay: ClassVar[Tuple[str, ...]] = ()
    #: Under ``weight_decay_groups="nanogpt"``, the names also never decayed: nanoGPT's
    #: ``nn.Embedding`` tables (the token embedding, tied with the head when tied).
    nanogpt_no_weight_decay: ClassVar[Tuple[str, ...]] = ("embedding",)
    #: Under ``weight_decay_groups="nanogpt"``, the names decayed whatever their shape: what the
    #: family's authors build as ``nn.Linear`` (or decay by name) but the shape rule would not
    #: decay, e.g. DenseFormer's DWA weights.
    nanogpt_weight_decay: ClassVar[Tuple[str, ...]] = ()

    def weight_decay_names(self) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        """``(never decayed, always decayed)`` parameter names for
        :func:`jaxformers.training.optim.decay_mask` under ``weight_decay_groups``."""
        if self.weight_decay_groups == "nanogpt":
            never = tuple(dict.fromkeys(self.no_weight_decay + self.nanogpt_no_weight_decay))
            return never, tuple(n for n in self.nanogpt_weight_decay if n not in never)
        return tuple(self.no_weight_decay), ()

    # ------------------------------------------------------------------ derived
    @classmethod
    def vocab_size_for_data(cls, data_vocab_size: int, fields: dict) -> int:
        """The ``vocab_size`` a model built from ``fields`` (the config overrides) needs for
        data with ``data_vocab_size`` token ids: that number, plus any ids the model adds
        itself (a landmark model's landmark token).  Used by ``experiments.train``."""
        return int(data_vocab_size)

    @property
    def n_attention_layers(self) -> int:
        """Attention layers applied per token (for the FLOP count); 0 without attention."""
        return 0

    # --------------------------------------------------------------- validation
    def __post_init__(self):
        plain_scalars(self)
        for name in ("dtype", "param_dtype"):  # a dtype object -> its name (JSON / run files hold names)
            object.__setattr__(self, name, dtype_name(name, getattr(self, name)))
        from .registry import check_config_class
        check_config_class(self)  # model= names an architecture built from exactly this class
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "max_seq_len"):
            _positive(self, name, bounded=name != "max_seq_len")  # a limit, no array of that size
        _choice("norm", self.norm, NORMS)
        _choice("remat", self.remat, REMAT_POLICIES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("param_dtype", self.param_dtype, DTYPES)
        for name in ("tie_embeddings", "scale_residual_init", "skip_gains", "scan_layers", "residual_fp32"):
            _boolean(self, name)
        _choice("weight_decay_groups", self.weight_decay_groups, WEIGHT_DECAY_GROUPS)
        _finite(self, "norm_eps", lo=0.0, lo_open=True)
        # 0 would make every weight zero: every gradient is then exactly 0 and the model never trains
        # (no layer zero-inits from init_std on purpose; scale_residual_init only divides it)
        _finite(self, "init_std", lo=0.0, lo_open=True)
        for name in ("dropout", "attn_dropout", "embed_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")

    # -------------------------------------------------------------------- FLOPs
    def param_uses(self, path: Tuple[str, ...]) -> float:
        """How many times one token's forward pass multiplies by the parameter at ``path``
        (a tuple of keys into the params tree, e.g. ``("blocks_0", "attn", "q", "kernel")``).

        Default: 1, except the embedding table, which is a lookup (0) unless it is also the
        tied output head (1).  Models that apply a weight several times per token (repeated
        or recursive blocks) return the repeat count; sparsely activated weights (MoE
        experts) return the fraction of tokens routed to them (top_k / n_experts).
        """
        if path[-2:] == ("embed", "embedding"):
            return 1.0 if self.tie_embeddings else 0.0
        return 1.0

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the attention scores and values (0 without attention)."""
        return 0.0

    def flops_per_token(self, seq_len: int, params=None) -> float:
        """Training FLOPs per token (PaLM appendix B): ``6 * sum_w uses(w) * size(w) + attention``.

        Every parameter counts (norm scales and SSM vectors too: they are tiny); the element-wise
        work of the SSM scans (``O(d_inner * d_state)`` per token and layer) is not counted.
        ``params``: the params tree (arrays or ``ShapeDtypeStruct``s, boxed as ``module.init``
        returns them or not); ``None`` builds the model abstractly (``jax.eval_shape``, no FLOPs
        spent).
        """
        import jax

        if isinstance(seq_len, (bool, np.bool_)) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int (the context length), got {seq_len!r}")
        if isinstance(params, (int, float, np.number)):
            raise ValueError("params must be a params tree (or None), not a parameter count: the "
                             "FLOP count needs each weight's path to know how often it is used")
        if params is None:
            from .registry import build
            from .utils import abstract_params
            params = abstract_params(build(self))
        matmul = 0.0
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            # a partitioning box (``module.init``'s params) adds an attribute key (``.value``)
            path = tuple(str(getattr(k, "key", k)) for k in keypath
                         if not isinstance(k, jax.tree_util.GetAttrKey))
            size = 1
            for dim in leaf.shape:
                size *= int(dim)
            matmul += self.param_uses(path) * size
        return 6.0 * matmul + self.attention_flops_per_token(seq_len)


@dataclasses.dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    """Attention family: decoder-only transformer hyper-parameters (GPT / Llama / DenseFormer).

    ``n_kv_head`` < ``n_head`` gives grouped-query attention; ``d_ff`` is the
    hidden width of the MLP (for SwiGLU, of each of the gate/up projections).
    """

    model: str = "gpt"
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None -> n_head (multi-head attention)
    head_dim: Optional[int] = None  # None -> d_model // n_head
    d_ff: Optional[int] = None  # None -> 4 * d_model (gelu) / 8/3 d_model rounded (swiglu)
    mlp: str = "gelu"
    rope_theta: float = 10000.0
    attention_impl: str = "auto"
    window: Optional[int] = None  # sliding-window attention (all layers) when set
    #: biases on the q, k, v projections (Qwen2); zero init, axes ``(heads|kv_heads, head_dim)``
    qkv_bias: bool = False
    #: RMSNorm over ``head_dim`` of each query and key head before RoPE (Qwen3; one ``[head_dim]``
    #: scale for q and one for k, shared by all heads; eps ``norm_eps``)
    qk_norm: bool = False
    #: with ``qk_norm``: a ``[head_dim]`` scale per head, ``q_norm [n_head, head_dim]`` /
    #: ``k_norm [kv_heads, head_dim]`` (a layer-parallel fused pair sets it: its heads come from
    #: two layers, each with its own scales); no Hugging Face equivalent
    qk_norm_per_head: bool = False

    # ------------------------------------------------------------------ derived
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def dim_head(self) -> int:
        return self.d_model // self.n_head if self.head_dim is None else self.head_dim

    @property
    def n_attention_layers(self) -> int:
        """Attention layers applied per token (hybrids and repeated-block models override)."""
        return self.n_layer

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            hidden = int(8 * self.d_model / 3)
            return 64 * ((hidden + 63) // 64)  # round up to a multiple of 64
        return 4 * self.d_model

    def attention_flops_per_token(self, seq_len: int) -> float:
        """``12 * L_attn * H * Dh * K``: QK^T and AV, forward + backward, over the ``K`` key
        positions a query's mask spans: ``K = T`` for causal attention, counted in full (PaLM
        appendix B, nanoGPT's ``estimate_mfu``; MaxText / Megatron halve it for the causal
        mask), ``K = min(window, T)`` with a sliding ``window`` (the keys it can reach)."""
        keys = seq_len if self.window is None else min(int(self.window), seq_len)
        return 12.0 * self.n_attention_layers * self.n_head * self.dim_head * keys

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        super().validate()
        _positive(self, "n_head")
        for name in ("n_kv_head", "head_dim", "d_ff", "window"):
            if getattr(self, name) is not None:
                _positive(self, name, bounded=name != "window")  # a window of any size is no window
        _choice("mlp", self.mlp, MLPS)
        for name in ("qkv_bias", "qk_norm", "qk_norm_per_head"):
            _boolean(self, name)
        if self.qk_norm_per_head and not self.qk_norm:
            raise ValueError("qk_norm_per_head=True needs qk_norm=True (it shapes the q/k norm scales)")
        _choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
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
            derived = "" if self.head_dim is not None else \
                f" (d_model // n_head = {self.d_model} // {self.n_head}: change them or set head_dim)"
            raise ValueError(f"head_dim={self.dim_head}{derived} must be even for rotary embeddings")
        _finite(self, "rope_theta", lo=0.0, lo_open=True)


#: Fields of :class:`TransformerConfig` that configs saved before the per-family split
#: carried for every model (``config_from_dict`` drops them where the family has none).
ATTENTION_FIELDS = tuple(f.name for f in dataclasses.fields(TransformerConfig)
                         if f.name not in {g.name for g in dataclasses.fields(ModelConfig)})


#: sizes (vocab_size, widths, depths) must be below this: token ids and array dimensions are
#: int32, a larger size cannot be represented (it failed only at init, obscurely)
SIZE_LIMIT = 2 ** 31


def _positive(config, name: str, bounded: bool = True) -> None:
    """``ValueError`` unless field ``name`` is a positive int, below :data:`SIZE_LIMIT` when
    ``bounded`` (an array size; a limit such as ``window`` / ``max_seq_len`` may be any size)."""
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if bounded and value >= SIZE_LIMIT:
        raise ValueError(f"{name}={value} cannot be represented: it must be a positive int below 2**31 = "
                         f"{SIZE_LIMIT} (token ids, positions and array dimensions are int32)")


def _finite(config, name: str, lo: float, lo_open: bool = False) -> None:
    """``ValueError`` unless field ``name`` is a finite real number ``> lo`` (``lo_open``) or ``>= lo``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _float_finite(value) \
            or (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be a finite number {'>' if lo_open else '>='} {lo}, got {value!r}")


def _float_finite(value) -> bool:
    """``math.isfinite`` that is ``False`` (not an ``OverflowError``) for an int beyond float range."""
    try:
        return math.isfinite(value)
    except OverflowError:  # e.g. 10**400: no float holds it
        return False


def _boolean(config, name: str) -> None:
    if not isinstance(getattr(config, name), bool):
        raise ValueError(f"{name} must be a bool (true/false), got {getattr(config, name)!r}")


def dtype_name(name: str, value: Any) -> Any:
    """The :data:`DTYPES` name of a dtype field's value: a name stays as given, a dtype object
    (``jnp.float32``, ``jnp.bfloat16``, ``np.dtype("float16")``) becomes its name; anything else
    is returned unchanged for the field's check (``ValueError`` naming ``name`` and the allowed
    names)."""
    if isinstance(value, str) or value is None or isinstance(value, (bool, int, float)):
        return value
    try:
        canonical = np.dtype(value).name
    except TypeError:
        return value
    if canonical in DTYPES:
        return canonical
    raise ValueError(f"{name}={value!r} (dtype {canonical}) is not allowed; choose one of {list(DTYPES)} "
                     "(a name or the dtype object)")


def _choice(name: str, value: Any, allowed: Tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


def changed_from_default(config, names) -> list:
    """The fields among ``names`` whose value differs from their dataclass default: settings
    that only another mode reads are refused only when given (a saved config records every
    field, at its default when unused)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    return [name for name in names if getattr(config, name) != defaults[name]]


def check_fields(cls, overrides: dict) -> None:
    """Raise a ValueError naming unknown fields (and listing the known ones)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown config field(s) {unknown} for {cls.__name__}; known fields: {sorted(known)}"
        )


def coerce_value(cls, name: str, text: str):
    """Parse ``text`` (from a ``--set field=value`` flag) into the type of field ``name``.

    ``none`` / ``null``: ``None``, except in a plain ``str`` field.  Bool fields:
    ``true/false/yes/no/1/0``.  String fields: the text as given (``data=2024`` stays a string,
    ``remat=none`` is the string ``"none"``; an ``Optional[str]`` field reads ``none`` as ``None``).
    Int fields: a JSON number, where an integral float (``1.0``, ``1e3``) becomes an int.  Tuples
    of numbers: a JSON list, ``(1, 3)`` or ``1,3``.  Other fields: JSON, else the text (the
    config's validation names a bad value).
    """
    check_fields(cls, {name: None})
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = field.default
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    kind = kind.replace("typing.", "").replace(" ", "")
    optional = kind.startswith("Optional[")
    inner = kind[len("Optional["):-1] if optional else kind
    if inner == "str" and not optional:  # a plain string field: remat=none, dwa_mode=none are values
        return text
    if text.strip().lower() in ("none", "null"):
        return None
    if isinstance(default, bool) or inner == "bool":
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"{name} expects a bool (true/false), got {text!r}")
    if inner == "str":
        return text
    if inner == "tuple" or inner.startswith(("Tuple[int", "Tuple[float", "tuple[int", "tuple[float")):
        body = text.strip()
        if body[:1] in "([" and body[-1:] in ")]":
            body = body[1:-1]
        body = body.strip().rstrip(",")
        try:
            value = json.loads(f"[{body}]")
        except json.JSONDecodeError:
            raise ValueError(f"{name} expects a tuple of numbers such as [1, 3], (1, 3) or 1,3; "
                             f"got {text!r}") from None
        return tuple(value)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    if inner == "int" and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value
