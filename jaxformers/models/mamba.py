"""Mamba family: pure Mamba-1 / Mamba-2 language models and attention hybrids.

``mamba``  : Embed -> N x (x + Mamba(RMSNorm(x)))  -> RMSNorm -> logits   (mamba_ssm MambaLMHeadModel)
``mamba2`` : the same with Mamba-2 (SSD) mixers
``hybrid`` : any interleaving of the shared attention ``Block`` (attention + MLP)
             and Mamba/Mamba2 blocks (``mixer``), attention at ``attn_layers`` (explicit
             indices) or every ``attn_every``-th layer (indices ``k-1, 2k-1, ...``).

Decoding caches are per layer: SSM layers keep constant-size conv + SSM states,
attention layers their KV buffers.  All models here share the parameter layout
``blocks_{i}/{norm, mixer}`` for SSM layers, so a hybrid with ``attn_layers=()`` is
exactly a pure model with the same params.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple, Union

from ..config import ModelConfig, TransformerConfig, _choice, _finite, _positive
from ..layers import Block
from ..layers.block import DEFAULT_MLP
from ..layers.mamba import SCAN_IMPLS, MambaBlock
from ..layers.mamba2 import Mamba2Block
from ..registry import register
from .transformer import Transformer

MIXERS = ("mamba", "mamba2")
A_INITS = ("s4d_real", "uniform")
DT_INITS = ("random", "constant")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class MambaConfig(ModelConfig):
    """ModelConfig (no attention fields) + selective-SSM fields (``mamba`` uses the Mamba-1 ones, ``mamba2`` the Mamba-2 ones).

    Both: ``d_state`` (N), ``d_conv`` (causal conv width), ``expand`` (I = expand * d_model),
    ``conv_bias``, ``proj_bias`` (in/out projections), ``scan_impl``, dt init
    (``dt_min``, ``dt_max``, ``dt_init_floor``: dt_bias = softplus^-1(log-uniform dt)),
    A init (``a_init``: "s4d_real" A_n = n+1, or "uniform" in ``a_init_range``).
    Mamba-1: ``dt_rank`` ("auto" -> ceil(d_model / 16)), ``dt_init``/``dt_scale``
    (dt_proj kernel ~ U(+-dt_scale / sqrt(dt_rank)) or constant).
    Mamba-2: ``headdim`` (P; heads = I / P), ``n_groups`` (B/C groups), ``chunk_size`` (SSD chunk:
    a kernel tile, the model's function does not depend on it: ``scan_impl="pallas"`` needs a
    power of two >= 16, ``"auto"`` running the kernel on GPU / TPU takes the next one for any
    other value (:func:`~jaxformers.layers.mamba2.kernel_chunk_size`); 64 is what the Pallas kernels
    compile to for sm_90 without register spills, 256 spills and overflows shared memory in
    the backward, see ``python -m experiments.kernel_report``).

    Family defaults: ``d_state`` and ``a_init`` left unset (``None``) take the mixer's
    reference default (mamba_ssm's ``Mamba`` / ``Mamba2`` modules) when the config is built:
    Mamba-1 ``d_state=16``, ``a_init="s4d_real"``; Mamba-2 ``d_state=128``, ``a_init="uniform"``
    (-A ~ U(1, 16) per head).  The mixer is ``model`` here and ``mixer`` in a ``HybridConfig``.
    The config then holds (and ``to_dict`` saves) the resolved values, so a saved config or a
    ``replace`` keeps them whatever the family; the registry presets set them explicitly.
    """

    #: mamba_ssm's ``_no_weight_decay`` parameters: never decayed (Mamba-1's ``A_log`` is 2-D)
    no_weight_decay = ("A_log", "D", "dt_bias")

    model: str = "mamba"
    norm: str = "rmsnorm"
    d_state: Optional[int] = None  # None: 16 (Mamba-1) / 128 (Mamba-2), see the docstring
    d_conv: int = 4
    expand: int = 2
    dt_rank: Union[str, int] = "auto"
    headdim: int = 64
    n_groups: int = 1
    chunk_size: int = 64
    scan_impl: str = "auto"
    conv_bias: bool = True
    proj_bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_init: str = "random"
    dt_scale: float = 1.0
    a_init: Optional[str] = None  # None: "s4d_real" (Mamba-1) / "uniform" (Mamba-2)
    a_init_range: Tuple[float, float] = (1.0, 16.0)

    def __post_init__(self):
        if isinstance(self.a_init_range, list):  # from JSON
            object.__setattr__(self, "a_init_range", tuple(self.a_init_range))
        m2 = self.mixer_kind == "mamba2"
        for name, value in (("d_state", 128 if m2 else 16), ("a_init", "uniform" if m2 else "s4d_real")):
            if getattr(self, name) is None:  # the family default (see the class docstring)
                object.__setattr__(self, name, value)
        super().__post_init__()

    # ------------------------------------------------------------ derived
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank

    @property
    def ssm_heads(self) -> int:  # Mamba-2 heads
        return self.d_inner // self.headdim

    @property
    def mixer_kind(self) -> str:
        return "mamba2" if self.model == "mamba2" else "mamba"

    @property
    def n_attention_layers(self) -> int:
        return 0

    # --------------------------------------------------------- validation
    def validate(self) -> None:
        super().validate()
        for name in ("d_state", "d_conv", "expand", "headdim", "n_groups", "chunk_size"):
            _positive(self, name)
        if self.dt_rank != "auto" and (not _is_int(self.dt_rank) or self.dt_rank <= 0):
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        _choice("scan_impl", self.scan_impl, SCAN_IMPLS)
        _choice("a_init", self.a_init, A_INITS)
        _choice("dt_init", self.dt_init, DT_INITS)
        for name in ("conv_bias", "proj_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool (true/false), got {getattr(self, name)!r}")
        # finite real numbers: a NaN / inf / string here would give NaN parameters (or a TypeError)
        for name in ("dt_min", "dt_max", "dt_scale"):
            _finite(self, name, 0.0, lo_open=True)
        _finite(self, "dt_init_floor", 0.0)
        if not self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min={self.dt_min} and dt_max={self.dt_max} must satisfy "
                             "0 < dt_min <= dt_max")
        r = self.a_init_range
        if not (isinstance(r, tuple) and len(r) == 2 and all(_is_real(v) for v in r) and 0 < r[0] <= r[1]):
            raise ValueError(f"a_init_range must be a pair (lo, hi) of finite numbers with "
                             f"0 < lo <= hi, got {r!r}")
        if self.uses_mixer("mamba2"):
            if self.d_inner % self.headdim:
                raise ValueError(f"headdim={self.headdim} must divide d_inner = expand * d_model = "
                                 f"{self.d_inner} (allowed headdim: {_divisors(self.d_inner)})")
            if self.ssm_heads % self.n_groups:
                raise ValueError(f"n_groups={self.n_groups} must divide the number of Mamba-2 heads "
                                 f"d_inner / headdim = {self.ssm_heads} "
                                 f"(allowed n_groups: {_divisors(self.ssm_heads)})")
            q = self.chunk_size
            if self.scan_impl == "pallas" and (q < 16 or q & (q - 1)):
                raise ValueError(f"chunk_size={q} must be a power of two >= 16 with scan_impl='pallas' "
                                 "(the SSD kernel's tile size)")

    def uses_mixer(self, kind: str) -> bool:
        return self.mixer_kind == kind


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class HybridConfig(MambaConfig, TransformerConfig):
    """MambaConfig + TransformerConfig (attention and MLP fields) + the layer pattern: ``mixer`` for the SSM layers; attention (shared
    ``Block``: attention + MLP) at ``attn_layers`` if given, else every ``attn_every``-th
    layer (i % attn_every == attn_every - 1), else nowhere.  ``attn_layers`` wins when both are set.
    ``ssm_mlp``: the SSM blocks also get the MLP sub-layer (``x + Mixer(norm(x))``, then
    ``x + MLP(mlp_norm(x))``), the layout of students distilled from a transformer
    (:mod:`jaxformers.distill`: the attention mixer replaced, the MLP kept)."""

    model: str = "hybrid"
    mixer: str = "mamba"
    attn_layers: Optional[Tuple[int, ...]] = None
    attn_every: Optional[int] = None
    ssm_mlp: bool = False

    def __post_init__(self):
        if isinstance(self.attn_layers, list):  # from JSON / --set
            object.__setattr__(self, "attn_layers", tuple(self.attn_layers))
        super().__post_init__()

    @property
    def mixer_kind(self) -> str:
        return self.mixer

    @property
    def n_attention_layers(self) -> int:
        return len(self.attention_layers)

    @property
    def attention_layers(self) -> Tuple[int, ...]:
        if self.attn_layers is not None:
            return tuple(sorted(self.attn_layers))
        if self.attn_every is not None:
            return tuple(i for i in range(self.n_layer) if i % self.attn_every == self.attn_every - 1)
        return ()

    def validate(self) -> None:
        _choice("mixer", self.mixer, MIXERS)
        super().validate()
        if self.attn_layers is not None:
            if not isinstance(self.attn_layers, tuple):
                raise ValueError(f"attn_layers must be a tuple of layer indices, got {self.attn_layers!r}")
            bad = [i for i in self.attn_layers if not _is_int(i)]
            if bad:
                raise ValueError(f"attn_layers={self.attn_layers!r} must hold int layer indices in "
                                 f"[0, n_layer={self.n_layer}), got {bad} (not ints)")
            bad = [i for i in self.attn_layers if not 0 <= i < self.n_layer]
            if bad:
                raise ValueError(f"attn_layers={self.attn_layers!r} has indices {bad} outside "
                                 f"[0, n_layer={self.n_layer})")
            if len(set(self.attn_layers)) != len(self.attn_layers):
                raise ValueError(f"attn_layers={self.attn_layers!r} has duplicate indices")
        if self.attn_every is not None and (not _is_int(self.attn_every)
                                            or not 1 <= self.attn_every <= self.n_layer):
            raise ValueError(f"attn_every={self.attn_every!r} must be an int in [1, n_layer={self.n_layer}]")
        if not isinstance(self.ssm_mlp, bool):
            raise ValueError(f"ssm_mlp must be a bool (true/false), got {self.ssm_mlp!r}")
        if self.scan_layers:
            raise ValueError("scan_layers=True is not supported for model='hybrid' (its layers differ); "
                             "use scan_layers=False")


# --------------------------------------------------------------------- modules
class MambaLM(Transformer):
    """Pure Mamba-1 / Mamba-2 language model (``config.model`` picks the mixer).  Decoding
    caches come from the mixers' ``init_cache``: constant-size conv + SSM states."""

    def block_class(self):
        return Mamba2Block if self.config.mixer_kind == "mamba2" else MambaBlock


class HybridLM(MambaLM):
    """Attention ``Block`` at ``config.attention_layers``, Mamba/Mamba2 blocks elsewhere
    (per-layer caches: KV buffers for attention layers, recurrent states for SSM layers).

    Packed ``segment_ids``: a new segment starts wherever the id changes, for the SSM layers,
    the attention layers and the positions alike (the model maps ids to runs before any
    block, see :mod:`jaxformers.models.transformer`), so ``[1, 1, 2, 1]`` is three sequences."""

    def layer_classes(self):
        attn = set(self.config.attention_layers)
        ssm = super().block_class()
        if self.config.ssm_mlp:
            ssm = with_mlp(ssm)
        return [Block if i in attn else ssm for i in range(self.config.n_layer)]


@functools.lru_cache(maxsize=None)
def with_mlp(block_cls):
    """``block_cls`` (an SSM block without MLP) with the config's MLP sub-layer added."""
    return type(f"{block_cls.__name__}WithMLP", (block_cls,),
                {"mlp_class": DEFAULT_MLP, "__module__": block_cls.__module__})


# --------------------------------------------------------------------- presets
_STYLE = dict(norm="rmsnorm", norm_eps=1e-5, tie_embeddings=True, scale_residual_init=True)
MAMBA_PRESETS = {
    "tiny": dict(vocab_size=256, d_model=128, n_layer=2, max_seq_len=256, d_state=16, d_conv=4, expand=2),
    # mamba-130m: d_model 768, 24 layers, N 16, dt_rank 48 (~129M with the 50280 vocab padded to 50304)
    "small": dict(vocab_size=50304, d_model=768, n_layer=24, max_seq_len=2048, d_state=16, d_conv=4,
                  expand=2),
    # mamba-370m
    "medium": dict(vocab_size=50304, d_model=1024, n_layer=48, max_seq_len=2048, d_state=16, d_conv=4,
                   expand=2),
}
_MAMBA2_STYLE = dict(a_init="uniform", a_init_range=(1.0, 16.0))
MAMBA2_PRESETS = {
    "tiny": dict(vocab_size=256, d_model=128, n_layer=2, max_seq_len=256, d_state=32, d_conv=4, expand=2,
                 headdim=32, n_groups=1, chunk_size=32),
    # mamba2-130m: d_model 768, 24 layers, N 128, headdim 64 (24 heads)
    "small": dict(vocab_size=50304, d_model=768, n_layer=24, max_seq_len=2048, d_state=128, d_conv=4,
                  expand=2, headdim=64, n_groups=1, chunk_size=64),
}
HYBRID_PRESETS = {
    # 4 layers: mamba, attn, mamba, attn (attention + SwiGLU MLP in the attention blocks)
    "tiny": dict(MAMBA_PRESETS["tiny"], n_layer=4, n_head=4, n_kv_head=2, mlp="swiglu", d_ff=352,
                 mixer="mamba", attn_every=2),
    "tiny-m2": dict(MAMBA2_PRESETS["tiny"], **_MAMBA2_STYLE, n_layer=4, n_head=4, n_kv_head=2,
                        mlp="swiglu", d_ff=352, mixer="mamba2", attn_every=2),
    # Jamba-like 1:7 attention:Mamba ratio at ~130M scale (attention at layers 7, 15, 23)
    "small": dict(MAMBA_PRESETS["small"], n_head=12, n_kv_head=4, mlp="swiglu", d_ff=2048, mixer="mamba",
                  attn_every=8),
}

register("mamba", MambaConfig, MambaLM, {k: {**_STYLE, **v} for k, v in MAMBA_PRESETS.items()},
         description="Mamba: selective state-space (S6) blocks, no attention")
register("mamba2", MambaConfig, MambaLM,
         {k: {**_STYLE, **_MAMBA2_STYLE, **v} for k, v in MAMBA2_PRESETS.items()},
         description="Mamba-2: state-space duality (SSD) blocks with gated RMSNorm")
register("hybrid", HybridConfig, HybridLM, {k: {**_STYLE, **v} for k, v in HYBRID_PRESETS.items()},
         description="Hybrid: attention blocks interleaved with Mamba/Mamba2 blocks")
