"""Layer parallelism: pairs of consecutive layers evaluated from the same input, no retraining
("Leveraging the true depth of LLMs", Sanchez Carmona et al., 2025).

A pair of pre-norm layers ``(i, i+1)`` normally runs one after the other.  Paired, both read
the same residual stream and their outputs are summed:

    h = x + Attn_i(norm^a_i(x)) + Attn_{i+1}(norm^a_{i+1}(x))
    y = h + MLP_i(norm^m_i(h)) + MLP_{i+1}(norm^m_{i+1}(h))

(``mlp_norm="own"``, the default: every layer keeps its own two norms).  The model's depth
drops by one per pair; no weight is retrained.

Which norm feeds which branch, in the authors' code (noctrog/effective-depth,
``TPParallelLlamaDecoderLayer``): each attention branch uses its own layer's
``input_layernorm`` (on the devices holding that layer), but the two MLP branches share ONE
``post_attention_layernorm`` whose weight is the mean of the two layers' weights (``eps``: the
smaller of the two).  ``mlp_norm="mean"`` reproduces that choice (both ``norm^m`` scales
replaced by their mean; here every layer has the config's one ``norm_eps``); ``"own"`` (default,
a deviation from their code) keeps each layer's MLP norm, as the issue's equations state.
Both are offered; the experiment reports both (at tiny scale "mean" is 0.03-0.04% worse).

Two forms of the same model (:func:`pair_layers` ``fused=``):

* ``fused=True`` (default): one :class:`~jaxformers.layers.block.Block` per pair with a config
  of ``2H`` query heads, ``2Hkv`` kv heads and ``2F`` MLP width: ``W_q = [s_i W_q,i | s_{i+1}
  W_q,i+1]`` (heads concatenated), likewise ``W_k``/``W_v``/MLP-in, ``W_o`` and MLP-out
  stacked on their input axis, so both layers' heads run in ONE attention call and the output
  projection sums the two branches.  The norm scales ``s`` (RMSNorm / bias-free LayerNorm:
  ``norm_i(x) = n(x) * s_i``) are folded into the rows of the next projection and the pair's
  norms keep scale 1: exact up to rounding.  GQA stays correct: query head ``H + h`` reads kv
  head ``Hkv + h // (H / Hkv)``, the second layer's.  The KV cache of a pair is the two
  layers' caches side by side on the kv-heads axis ``[B, S, 2 Hkv, Dh]``.
* ``fused=False``: :class:`ParallelPairBlock`, the two layers' own modules (``attn_0``,
  ``attn_1``, ...) run side by side; caches ``[cache_i, cache_{i+1}]``.  The reference the
  fused form is tested against.

Multi-device: the fused pair's heads axis ``[2H]`` and MLP axis ``[2F]`` carry the logical
names ``heads`` / ``mlp``, which ``jaxformers.sharding`` maps onto the ``tensor`` mesh axis.
With ``tensor=2`` device 0 holds layer ``i`` (its heads, q/k norm scales, MLP columns and folded
norm scales) and device 1 layer ``i+1``: the paper's placement, with no device logic in the model.  The
partial sums meet in one all-reduce after ``W_o`` and one after MLP-out, as in the authors' code:
a pair costs the all-reduces of ONE layer (2), two sequential tensor-parallel layers cost 4
(compiled on 8 CPU devices, ``data=4,tensor=2``, 6-layer Llama: 13 all-reduces unpaired, 7
with three pairs, 11 with one; the extra one is the vocab-sharded logits).  With
``tensor=2k`` each layer spans ``k`` devices (the authors' ``gpus_per_block``).

``qkv_bias`` (Qwen2-style q/k/v biases) fuses: the pair's biases sit side by side on the heads
axis, as the kernels.  ``qk_norm`` (Qwen3) fuses too: the pair's block has per-head q/k norm
scales (``qk_norm_per_head``, ``q_norm/scale [2H, Dh]``, ``k_norm/scale [2Hkv, Dh]``), layer
``i``'s ``[Dh]`` scale on its heads, layer ``i+1``'s on the others (a scale acts after the
per-head RMS and before RoPE, so it cannot be folded into ``W_q``/``W_k``).

Deviations from the authors' code: RoPE/attention are this library's (same math); pairs are
any ``range(start, end, 2)`` span of a ``gpt``/``llama`` model (theirs: Llama, HF);
``mlp_norm`` defaults to the per-layer norms (see above).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Iterable, List, Optional, Sequence, Tuple

import flax.linen as nn
from flax import traverse_util
import jax.numpy as jnp
import numpy as np

from ..config import TransformerConfig, _choice
from ..convert.layers import stack_layers, unstack_layers
from ..layers import Block, make_norm
from ..layers.attention import Attention, init_attention_cache
from ..layers.common import dropout
from ..layers.mlp import make_mlp
from ..registry import get_spec, register
from ..sharding import ACT_EMBED, BATCH, LENGTH, constrain
from ..utils import is_int as _is_int
from ..models.transformer import Transformer

MLP_NORMS = ("own", "mean")
#: the parameter names of a standard pre-norm block (``Block`` without skip gains)
BLOCK_KEYS = ("attn_norm", "attn", "mlp_norm", "mlp")


# ============================================================================ config
@dataclasses.dataclass(frozen=True)
class LayerParallelConfig(TransformerConfig):
    """A ``gpt``/``llama`` config whose layers ``(i, i+1)``, ``i in range(pair_start, pair_end,
    2)``, run as parallel pairs.  ``n_layer`` stays the number of original layers;
    :attr:`effective_depth` is what runs sequentially.  ``base_model``: the registry name of
    the model the pairs were taken from (its blocks are the standard ``Block``)."""

    model: str = "layer_parallel"
    base_model: str = "gpt"
    pair_start: int = 0
    pair_end: int = 0
    fused: bool = True

    def validate(self) -> None:
        super().validate()
        _choice("base_model", self.base_model, tuple(base_models()))
        for name in ("pair_start", "pair_end"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not self.pair_start <= self.pair_end <= self.n_layer or (self.pair_end - self.pair_start) % 2:
            raise ValueError(f"pair_start={self.pair_start}, pair_end={self.pair_end}: need 0 <= start <= "
                             f"end <= n_layer={self.n_layer} and an even span (end - start)")
        if self.scan_layers:
            raise ValueError("scan_layers must be False for a layer-parallel model (its blocks differ)")
        if self.skip_gains:
            raise ValueError("skip_gains must be False for a layer-parallel model")
        if not isinstance(self.fused, bool):
            raise ValueError(f"fused must be a bool, got {self.fused!r}")

    @property
    def pairs(self) -> Tuple[int, ...]:
        """First layer of every pair."""
        return tuple(range(self.pair_start, self.pair_end, 2))

    @property
    def effective_depth(self) -> int:
        return self.n_layer - len(self.pairs)

    def units(self) -> List[Tuple[int, ...]]:
        """The sequential blocks: ``(i,)`` a single layer, ``(i, i+1)`` a pair."""
        out, i = [], 0
        while i < self.n_layer:
            if self.pair_start <= i < self.pair_end:
                out.append((i, i + 1))
                i += 2
            else:
                out.append((i,))
                i += 1
        return out

    def base_config(self) -> TransformerConfig:
        """The unpaired model's config."""
        extra = {f.name for f in dataclasses.fields(LayerParallelConfig)} - {
            f.name for f in dataclasses.fields(TransformerConfig)}
        values = {k: v for k, v in self.to_dict().items() if k not in extra}
        return get_spec(self.base_model).config_cls(**dict(values, model=self.base_model))

    def pair_config(self) -> TransformerConfig:
        """Config of a fused pair's ``Block``: both layers' heads and MLP units side by side (with
        ``qk_norm``, per-head q/k norm scales: ``qk_norm_per_head``)."""
        c = self.base_config()
        return c.replace(n_head=2 * c.n_head, n_kv_head=2 * c.kv_heads, head_dim=c.dim_head, d_ff=2 * c.ff_dim,
                         qk_norm_per_head=c.qk_norm)


def base_models() -> List[str]:
    """Registered models :func:`pair_layers` accepts: plain ``Transformer`` with
    ``TransformerConfig`` (``gpt``, ``llama``; HF-imported Llama / Mistral / Qwen2 / Qwen3 checkpoints are
    ``llama``)."""
    from ..registry import list_models
    return [n for n in list_models() if get_spec(n).module_cls is Transformer
            and get_spec(n).config_cls is TransformerConfig]


# ============================================================================ modules
class _AttentionPairCache:
    """``init_cache`` of :class:`ParallelPairBlock`: the two layers' own KV caches."""
    applies_attn_dropout = True  # ParallelPairBlock's Attention layers apply it

    @staticmethod
    def init_cache(config, batch_size, max_len, dtype=None):
        return [init_attention_cache(config, batch_size, max_len, dtype) for _ in range(2)]


class ParallelPairBlock(nn.Module):
    """Two pre-norm layers run from the same input, each with its own modules (unfused form):
    ``h = x + sum_j Attn_j(norm^a_j(x))``, ``y = h + sum_j MLP_j(norm^m_j(h))``, j in {0, 1}.
    x ``[B, T, D]``; cache ``[cache_0, cache_1]`` (each ``{'k','v'}: [B, S, Hkv, Dh]``) or None.
    Residual dropout (``config.dropout``, training only) on each summed branch, as the fused
    ``Block`` applies it to its one (summed) attention and MLP output."""

    config: object
    mixer_class = _AttentionPairCache

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, cache=None, cache_index=None):
        c = self.config
        caches = [None, None] if cache is None else cache
        a, new = 0, []
        for j in (0, 1):
            aj, nc = Attention(c, name=f"attn_{j}")(make_norm(c, f"attn_norm_{j}")(x), positions,
                                                    segment_ids, caches[j], cache_index)
            a = a + aj
            new.append(nc)
        h = x + dropout(self, a, c.dropout)
        m = sum(make_mlp(c, f"mlp_{j}")(make_norm(c, f"mlp_norm_{j}")(h)) for j in (0, 1))
        y = h + dropout(self, m, c.dropout)
        return constrain(y, (BATCH, LENGTH, ACT_EMBED)), (None if cache is None else new)


class LayerParallelTransformer(Transformer):
    """The base ``Transformer`` with one block per :meth:`LayerParallelConfig.units` entry: a
    ``Block`` for a single layer, a ``Block`` of :meth:`~LayerParallelConfig.pair_config`
    (fused) or a :class:`ParallelPairBlock` (unfused) for a pair.  Params ``blocks_k`` are
    numbered by unit."""

    def _pair_class(self):
        return Block if self.config.fused else ParallelPairBlock

    def layer_classes(self):
        return [Block if len(u) == 1 else self._pair_class() for u in self.config.units()]

    def layer_configs(self):
        c = self.config
        base, pair = c.base_config(), (c.pair_config() if c.fused else c.base_config())
        return [base if len(u) == 1 else pair for u in c.units()]


register("layer_parallel", LayerParallelConfig, LayerParallelTransformer, {
    # gpt tiny with 4 layers, the middle two paired
    "tiny": dict(vocab_size=256, d_model=128, n_layer=4, n_head=4, max_seq_len=256, norm="layernorm",
                 mlp="gelu", tie_embeddings=True, base_model="gpt", pair_start=1, pair_end=3),
}, description="layer-parallel pairs of a gpt/llama model (jaxformers.transforms.pair_layers)")


# ============================================================================ params
def _layers(config, params) -> Tuple[dict, List[dict]]:
    """``(rest, [block_0 .. block_{L-1}])`` of a plain model's params (scanned or not)."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be the model's params tree (a mapping), got {type(params).__name__}")
    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:  # module.init's variables (FrozenDict too)
        params = params["params"]
    params = dict(params)
    if "blocks" in params:
        params = unstack_layers(params, "blocks", n_layer=config.n_layer)
    names = [f"blocks_{i}" for i in range(config.n_layer)]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"params do not match config (n_layer={config.n_layer}): missing {missing}")
    extra = [k for k in params if k.startswith("blocks_") and k not in names]
    if extra:
        raise ValueError(f"params do not match config (n_layer={config.n_layer}): unexpected {extra}")
    want = ["k_norm", "q_norm"] if getattr(config, "qk_norm", False) else []
    for i, n in enumerate(names):  # flax ignores params a module does not ask for: not silently
        attn = params[n].get("attn") if isinstance(params[n], Mapping) else None
        has = sorted(k for k in ("k_norm", "q_norm") if isinstance(attn, Mapping) and k in attn)
        if isinstance(attn, Mapping) and has != want:
            raise ValueError(f"layer {i}: params attn has q/k norm scales {has} but config.qk_norm="
                             f"{bool(want)} (needs {want}): the model would "
                             f"{'ignore them' if has else 'miss them'}; pass the config the params were "
                             "trained with")
    rest = {k: v for k, v in params.items() if k not in names}
    return rest, [params[n] for n in names]


def _assemble(config, rest, blocks, scan: bool) -> dict:
    out = dict(rest)
    for k, b in enumerate(blocks):
        out[f"blocks_{k}"] = b
    return stack_layers(out, "blocks", n_layer=len(blocks)) if scan else out


def _check_base(config) -> None:
    if not isinstance(config, TransformerConfig) or isinstance(config, LayerParallelConfig) \
            or config.model not in base_models():
        name = getattr(config, "model", type(config).__name__)
        raise ValueError(f"config must be the config of one of {base_models()} (a plain transformer), "
                         f"got model {name!r}")


def _int(name: str, v) -> int:
    """``v`` as an int; ``ValueError`` naming ``name`` unless it is an int (numpy ints too, not bool)."""
    if not _is_int(v):
        raise ValueError(f"{name} must be an int, got {v!r}")
    return int(v)


def _layer_index(name: str, v, n_layer: int) -> int:
    """``v`` as a layer index; ``ValueError`` unless it is an int in ``[0, n_layer)``."""
    if not _is_int(v) or not 0 <= v < n_layer:
        raise ValueError(f"{name} must be a layer index (an int in [0, {n_layer})), got {v!r}")
    return int(v)


def _layer_indices(name: str, values, n_layer: int) -> List[int]:
    """``values`` as a list of layer indices (ints in ``[0, n_layer)``); ``ValueError`` otherwise."""
    try:
        items = None if isinstance(values, (str, bytes, dict)) else list(values)
    except TypeError:
        items = None
    if items is None:
        raise ValueError(f"{name} must be a sequence of layer indices (ints in [0, {n_layer})), got {values!r}")
    return [_layer_index(f"{name}[{k}]", v, n_layer) for k, v in enumerate(items)]


def _check_block(i: int, block: dict) -> None:
    if sorted(block) != sorted(BLOCK_KEYS):
        raise ValueError(f"layer {i}: expected a standard block with {list(BLOCK_KEYS)}, got {sorted(block)} "
                         "(skip gains / other blocks are not supported)")
    for name in ("attn_norm", "mlp_norm"):  # both forms build the config's bias-free norms
        if sorted(block[name]) != ["scale"]:
            raise ValueError(f"layer {i}: {name} must hold only a scale (no bias) to be paired (fused or "
                             f"not: the pair's norms have no bias), got {sorted(block[name])}")


def _fold(scale, kernel, axis_in: int = 0):
    """``diag(scale) @ kernel`` along the kernel's input axis (float32 math, kernel dtype)."""
    shape = [1] * kernel.ndim
    shape[axis_in] = -1
    folded = jnp.asarray(kernel, jnp.float32) * jnp.asarray(scale, jnp.float32).reshape(shape)
    return folded.astype(kernel.dtype)


def _per_head(scale, kernel):
    """A q/k norm scale as one row per head of ``kernel [D, H, Dh]``: ``[H, Dh]`` (a shared
    ``[Dh]`` scale repeated, a per-head one as it is)."""
    scale = jnp.asarray(scale)
    heads, dh = kernel.shape[1:]
    if scale.shape not in ((dh,), (heads, dh)):
        raise ValueError(f"a q/k norm scale must be [head_dim={dh}] or [heads={heads}, head_dim={dh}], "
                         f"got {scale.shape}")
    return jnp.broadcast_to(scale, (heads, dh))


def fuse_pair(p0: dict, p1: dict) -> dict:
    """Params of a fused pair ``Block`` from the two layers' block params (see the module
    docstring): ``q/k/v [D, 2H|2Hkv, Dh]``, ``o [2H, Dh, D]``, MLP in ``[D, 2F]`` and out
    ``[2F, D]``, norm scales folded in (the pair's norms get scale 1); ``qk_norm``'s
    ``q_norm|k_norm/scale`` per head, ``[2H|2Hkv, Dh]`` (``qk_norm_per_head``).  ``ValueError``
    unless both are standard pre-norm blocks (no skip gains, bias-free norms) with the same
    parameters (names and shapes; ``qkv_bias`` in both or neither).  Boxed params (what
    ``module.init`` returns) are unboxed."""
    p0, p1 = nn.unbox(p0), nn.unbox(p1)
    _check_block(0, p0)
    _check_block(1, p1)
    shapes = [{"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(dict(p)).items()
               if k[:2] not in (("attn", "q_norm"), ("attn", "k_norm"))} for p in (p0, p1)]  # checked below
    if shapes[0] != shapes[1]:
        diff = sorted(f"{k}: {shapes[0].get(k, 'absent')} vs {shapes[1].get(k, 'absent')}"
                      for k in set(shapes[0]) | set(shapes[1]) if shapes[0].get(k) != shapes[1].get(k))
        raise ValueError("the two layers of a pair must have the same parameters (names and shapes) to be "
                         f"fused; layer 0 vs layer 1 differ in {diff}")
    sa = (p0["attn_norm"]["scale"], p1["attn_norm"]["scale"])
    sm = (p0["mlp_norm"]["scale"], p1["mlp_norm"]["scale"])
    ps = (p0, p1)
    attn = {}
    for name in ("q", "k", "v"):
        attn[name] = {"kernel": jnp.concatenate(
            [_fold(s, p["attn"][name]["kernel"]) for s, p in zip(sa, ps)], axis=1)}
        if "bias" in p0["attn"][name]:  # qkv_bias: [H|Hkv, Dh] per layer, side by side on the heads axis
            attn[name]["bias"] = jnp.concatenate([p["attn"][name]["bias"] for p in ps], axis=0)
    for name, proj in (("q_norm", "q"), ("k_norm", "k")):  # qk_norm: per-head scales [2H|2Hkv, Dh]
        has = [name in p["attn"] for p in ps]
        if any(has) != all(has):
            raise ValueError(f"attn/{name} (qk_norm) is in layer {has.index(True)} of the pair only: both "
                             "layers must have it or neither")
        if all(has):
            attn[name] = {"scale": jnp.concatenate([_per_head(p["attn"][name]["scale"], p["attn"][proj]["kernel"])
                                                    for p in ps], axis=0)}
    attn["o"] = {"kernel": jnp.concatenate([p["attn"]["o"]["kernel"] for p in ps], axis=0)}
    mlp = {}
    for name in p0["mlp"]:
        k0 = p0["mlp"][name]["kernel"]
        if name in ("fc", "gate", "up"):  # [D, F]: input side, folded; concatenated on F
            mlp[name] = {"kernel": jnp.concatenate([_fold(s, p["mlp"][name]["kernel"]) for s, p in zip(sm, ps)],
                                                   axis=1)}
        elif name in ("proj", "down"):  # [F, D]: stacked on F (the matmul sums the branches)
            mlp[name] = {"kernel": jnp.concatenate([p["mlp"][name]["kernel"] for p in ps], axis=0)}
        else:
            raise ValueError(f"unknown MLP parameter {name!r} (shape {k0.shape}); cannot fuse")
    return {"attn_norm": {"scale": jnp.ones_like(sa[0])}, "attn": attn, "mlp_norm": {"scale": jnp.ones_like(sm[0])}, "mlp": mlp}


def pair_layers(config, params, start: int, end: int, *, fused: bool = True, mlp_norm: str = "own"):
    """Layers ``(i, i+1)`` for ``i in range(start, end, 2)`` of a trained ``gpt``/``llama``
    model run in parallel (module docstring).  Returns ``(LayerParallelConfig, params)`` for
    ``jaxformers.build`` / ``decoding.generate``; no weight is retrained.

    ``params``: the model's params (per-layer or scanned).  ``fused``: one wide block per pair
    (fast) or the two layers side by side (reference).  ``mlp_norm``: ``"own"`` (each MLP
    branch its layer's norm) or ``"mean"`` (the authors' code: one norm, mean weight).
    ``start == end`` pairs nothing (the same function as the original model).
    """
    _check_base(config)
    _choice("mlp_norm", mlp_norm, MLP_NORMS)
    if not isinstance(fused, bool):
        raise ValueError(f"fused must be a bool, got {fused!r}")
    start, end = _int("start", start), _int("end", end)
    if not 0 <= start <= end <= config.n_layer or (end - start) % 2:
        raise ValueError(f"start={start}, end={end}: need 0 <= start <= end <= n_layer={config.n_layer} "
                         "and an even end - start (layers pair as (i, i+1) for i in range(start, end, 2))")
    rest, layers = _layers(config, params)
    new = LayerParallelConfig(**dict({k: v for k, v in config.to_dict().items() if k != "model"},
                                     scan_layers=False, base_model=config.model, pair_start=start,
                                     pair_end=end, fused=fused))
    blocks = []
    for unit in new.units():
        if len(unit) == 1:
            blocks.append(layers[unit[0]])
            continue
        i, j = unit
        p0, p1 = dict(layers[i]), dict(layers[j])
        _check_block(i, p0)
        _check_block(j, p1)
        if mlp_norm == "mean":
            mean = (jnp.asarray(p0["mlp_norm"]["scale"], jnp.float32)
                    + jnp.asarray(p1["mlp_norm"]["scale"], jnp.float32)) / 2
            mean = mean.astype(p0["mlp_norm"]["scale"].dtype)
            p0["mlp_norm"] = p1["mlp_norm"] = {"scale": mean}
        if fused:
            blocks.append(fuse_pair(p0, p1))
        else:
            blocks.append({f"{name}_{k}": p[name] for k, p in enumerate((p0, p1)) for name in BLOCK_KEYS})
    return new, _assemble(new, rest, blocks, scan=False)


# ============================================================================ preliminary study
def reorder_layers(config, params, order: Sequence[int]):
    """A model running the original layers in ``order`` (indices into ``0..L-1``, each at most
    once; omitted layers are deleted).  Returns ``(config with n_layer=len(order), params)``
    in the input's layout (scanned or not)."""
    _check_base(config)
    order = _layer_indices("order", order, config.n_layer)
    if not order:
        raise ValueError("order must keep at least one layer")
    if len(set(order)) != len(order):
        raise ValueError(f"order must hold distinct layer indices in [0, {config.n_layer}), got {order}")
    rest, layers = _layers(config, params)
    new = config.replace(n_layer=len(order))
    return new, _assemble(new, rest, [layers[i] for i in order], scan=config.scan_layers)


def delete_layers(config, params, layers: Iterable[int]):
    """The model without ``layers`` (the paper's "delete" intervention)."""
    _check_base(config)
    drop = set(_layer_indices("layers", layers, config.n_layer))
    if len(drop) == config.n_layer:
        raise ValueError(f"layers must leave at least one of the {config.n_layer} layers, got {sorted(drop)}")
    return reorder_layers(config, params, [i for i in range(config.n_layer) if i not in drop])


def swap_layers(config, params, i: int, j: Optional[int] = None):
    """Layers ``i`` and ``j`` (default ``i + 1``) exchanged ("swap"); ``ValueError`` unless they
    are two different layer indices (``j == i`` would be a no-op "swap")."""
    _check_base(config)
    i = _layer_index("i", i, config.n_layer)
    j = _layer_index("j" if j is not None else "j (default i + 1)", i + 1 if j is None else j, config.n_layer)
    if i == j:
        raise ValueError(f"i={i}, j={j}: a swap needs two different layers")
    order = list(range(config.n_layer))
    order[i], order[j] = order[j], order[i]
    return reorder_layers(config, params, order)


def shuffle_layers(config, params, start: int, end: int, seed: int = 0):
    """Layers ``start .. end-1`` in a random order other than the original one ("shuffle"),
    drawn from ``numpy.random.default_rng((seed, start, end))``: each window of a study gets
    its own draw.  Returns ``(config, params, order)``."""
    _check_base(config)
    start, end = _int("start", start), _int("end", end)
    if not 0 <= start < end <= config.n_layer:
        raise ValueError(f"start={start}, end={end}: need 0 <= start < end <= n_layer={config.n_layer}")
    seed = _int("seed", seed)
    if seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed}")
    if end - start < 2:
        raise ValueError(f"start={start}, end={end}: a shuffle needs at least 2 layers")
    rng = np.random.default_rng((seed, start, end))
    span = list(range(start, end))
    while span == list(range(start, end)):  # never the identity (a no-op "shuffle")
        span = [int(i) for i in rng.permutation(np.arange(start, end))]
    order = list(range(start)) + span + list(range(end, config.n_layer))
    new, p = reorder_layers(config, params, order)
    return new, p, order
