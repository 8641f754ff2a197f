"""``quantize(config, params, spec) -> (config, qparams)``: QuaRot for ``llama`` models.

1. ``spec.rotate``: the offline rotations of :mod:`.rotation` (norms folded, random
   Hadamard ``Q`` on the residual stream, exact Hadamards fused into V/O and the
   down-projection); the returned config runs the online Hadamards.
2. Weights of every block linear (q, k, v, o, gate, up, down; not the embedding or the head,
   as in the authors' code): RTN or GPTQ to ``w_bits`` (per output channel, or per group of
   ``w_groupsize`` inputs), symmetric by default, clipping ratio searched per channel.  GPTQ
   calibrates on ``calibration`` tokens ``[N, T]`` layer by layer: layer ``i``'s Hessians
   ``X^T X`` come from the calibration hidden states after the already quantized layers
   ``< i`` (kept between blocks in the compute dtype and pushed through each block once it is
   quantized, as the authors' code; in float32 this equals a whole-model forward pass per
   layer, in bf16 it differs at rounding level).  Within a layer the linears go in the
   authors' groups, q/k/v, o, gate/up, down, and each group's Hessian comes from a forward
   pass of the block whose earlier groups are already quantized (``gptq_sequential``,
   default; ``False``: every Hessian from one pass of the unquantized block, 2 block
   passes a layer instead of 5).  The
   calibration activations are not activation-quantized (as in the authors' GPTQ pass).
   GPTQ runs as one jitted float32 XLA computation (:func:`.quantizers.gptq_weight`, on the
   accelerator when there is one) per calibration statistic: q/k/v and gate/up, which share
   their input and Hessian, are quantized as one ``[in, sum(out)]`` matrix (output channels
   are independent in GPTQ, so this is each one quantized alone, with one Hessian inversion).
3. Activations (``a_bits``, per token) and the KV cache (``kv_bits``, per head) are
   quantized on the fly by the ``quarot`` model the returned config builds.

Deviations from the authors' code (spcl/QuaRot, ``fake_quant/``), beyond those noted in
:mod:`.rotation` and :mod:`pallas_kernels.hadamard.reference`: the real low-bit
path (``storage="int"``) is XLA's int8 matmul with int4 weights unpacked to int8 (their
CUTLASS int4 x int4 kernels are not reproduced: Hopper has no int4 MMA).  As in their code:
the weights' clipping search tries their ratios ``1 - i / 100``, ``i < 80`` (``w_clip_grid``),
the LM head and embeddings stay in high precision, q/k/v and gate/up share one quantized input,
K is quantized after RoPE and the online Hadamard, V at the ``v`` output (per head), and the
activation quantizer of ``o`` / ``down`` sees the online Hadamard's output.

``qkv_bias`` / ``qk_norm`` models (Qwen2 / Qwen3 style) are supported: the q/k/v biases and the
q/k norm scales stay in high precision (not quantized; v's bias is rotated with ``W_v``, see
:mod:`.rotation`), and :class:`~jaxformers.quant.model.IntLinear` adds the bias after its integer
matmul.

``spec.storage="float"`` (default): the returned params hold fake-quantized float weights
(dequantized values, the original dtypes): evaluation everywhere with the normal model
code.  ``storage="int"``: every block linear holds ``{"qkernel", "scale"}`` (int8 weights, or
int4 packed two per byte along the last output axis as uint8, and per-output-channel
float32 scales), and the config sets ``int_linears``: the real low-bit path
(:class:`jaxformers.quant.model.IntLinear`, int8 x int8 -> int32 ``dot_general``), with the
same logits as the fake-quant model up to float32 rounding in float32 compute.  In bf16 they
differ more: the fake path rounds each dequantized ``s q`` to bf16 where the integer path
keeps it in float32, which flips 4-bit activation codes (measured on a tiny model: max
logit difference 3% of the logits' scale at W8A8, 34% at W4A4, 0 weight-only).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import TransformerConfig, _boolean, changed_from_default, plain_scalars
from ..convert.layers import check_layer_shapes, unstack_layers
from ..utils import check_token_ids
from .model import OnlineQuant, QuaRotConfig, check_divides_linear_inputs
from .quantizers import _check_percdamp, gptq_weight, pack_int4, rtn_weight
from .rotation import Rotation, float64_tree

W_METHODS = ("rtn", "gptq")
#: QuantSpec fields only GPTQ reads (a non-default value with w_method="rtn" is a ValueError)
_GPTQ_ONLY = ("gptq_sequential", "percdamp", "calib_batch")
STORAGES = ("float", "int")
#: the block linears and the calibration statistic (linear input) each one uses
LINEARS = {("attn", "q"): "attn_in", ("attn", "k"): "attn_in", ("attn", "v"): "attn_in",
           ("attn", "o"): "o_in", ("mlp", "gate"): "mlp_in", ("mlp", "up"): "mlp_in",
           ("mlp", "down"): "down_in"}
_N_IN = {"o": 2}  # input axes of each kernel (o: [H, Dh, D])
#: the linears of each calibration statistic (GPTQ quantizes q/k/v and gate/up together)
_BY_STAT = [[lin for lin, s in LINEARS.items() if s == stat] for stat in dict.fromkeys(LINEARS.values())]


@dataclasses.dataclass(frozen=True)
class QuantSpec(OnlineQuant):
    """What to quantize and how (bits 16 = leave in high precision).

    Defaults follow QuaRot's W4A4KV4 recipe except the bit widths: weights symmetric per
    channel with clipping search, activations symmetric per token (the paper clips at 0.9),
    KV asymmetric per head (the paper clips at 0.95).  ``storage``: ``"float"`` (fake-quant
    float weights) or ``"int"`` (integer weights + scales, the ``int_linears`` model; needs
    ``w_bits <= 8`` symmetric per channel and symmetric per-token ``a_bits <= 8`` or 16).
    ``w_act_order``: GPTQ quantizes each linear's inputs in order of decreasing Hessian
    diagonal (``act_order`` in the authors' scripts; default off, as theirs).
    ``w_clip_grid``: the clipping search tries ``1 - i / w_clip_grid`` for
    ``i < 0.8 w_clip_grid`` (the authors' 100; smaller is faster on a CPU).
    ``gptq_sequential``: GPTQ's groups of linears in a layer (q/k/v, o, gate/up, down) each
    get their Hessian from a block forward with the earlier groups quantized (the authors'
    ``sequential`` lists; default); ``False``: all from one forward of the unquantized block.
    ``gptq_sequential``, ``percdamp`` (GPTQ's damping), ``calib_batch`` (calibration sequences
    per forward pass) and ``w_act_order`` are GPTQ's: with ``w_method="rtn"`` a value other
    than the default is a ``ValueError`` naming it (RTN would ignore it).
    """
    rotate: bool = True
    seed: int = 0
    w_bits: int = 16
    w_method: str = "rtn"
    w_groupsize: Optional[int] = None
    w_sym: bool = True
    w_clip: bool = True
    w_clip_grid: int = 100
    w_act_order: bool = False
    gptq_sequential: bool = True
    percdamp: float = 0.01
    calib_batch: int = 16
    storage: str = "float"

    def __post_init__(self):
        plain_scalars(self)
        if self.w_method not in W_METHODS:
            raise ValueError(f"w_method={self.w_method!r} is not allowed; choose one of {list(W_METHODS)}")
        if self.storage not in STORAGES:
            raise ValueError(f"storage={self.storage!r} is not allowed; choose one of {list(STORAGES)}")
        if not isinstance(self.w_bits, int) or isinstance(self.w_bits, bool) or not 2 <= self.w_bits <= 16:
            raise ValueError(f"w_bits must be an int in [2, 16] (16 = no quantization), got {self.w_bits!r}")
        self.check_online_quant()
        for name in ("rotate", "w_sym", "w_clip", "w_act_order", "gptq_sequential"):
            _boolean(self, name)
        if self.w_act_order and self.w_method != "gptq":
            raise ValueError(f"w_act_order=True is GPTQ's column order; it needs w_method='gptq', "
                             f"not {self.w_method!r}")
        for name, lo in (("seed", 0), ("calib_batch", 1), ("w_clip_grid", 2)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.w_groupsize is not None and (not isinstance(self.w_groupsize, int)
                                             or isinstance(self.w_groupsize, bool) or self.w_groupsize < 1):
            raise ValueError(f"w_groupsize must be a positive int or None (per channel), got {self.w_groupsize!r}")
        _check_percdamp(self.percdamp)  # what gptq_weight takes: a finite number >= 0
        if self.w_method != "gptq":  # GPTQ's settings given to RTN: refused, not ignored
            changed = [f"{n}={getattr(self, n)!r}" for n in changed_from_default(self, _GPTQ_ONLY)]
            if changed:
                raise ValueError(f"{', '.join(changed)}: GPTQ-only settings ({', '.join(_GPTQ_ONLY)} "
                                 f"other than their defaults) need w_method='gptq', not {self.w_method!r}")
        if self.storage == "int":
            bad = []
            if self.w_bits > 8:
                bad.append(f"w_bits={self.w_bits} (need <= 8)")
            if self.w_groupsize is not None:
                bad.append(f"w_groupsize={self.w_groupsize} (need None: per channel)")
            if not self.w_sym:
                bad.append("w_sym=False (need symmetric weights)")
            if self.a_bits < 16 and (self.a_bits > 8 or not self.a_sym or self.a_groupsize is not None):
                bad.append(f"a_bits={self.a_bits}, a_sym={self.a_sym}, a_groupsize={self.a_groupsize} "
                           "(need symmetric per-token a_bits <= 8, or a_bits=16)")
            if bad:
                raise ValueError("storage='int' (integer weights, int8 matmul) does not support "
                                 + "; ".join(bad))


def quant_config(config, spec: QuantSpec) -> QuaRotConfig:
    """The ``quarot`` config running ``config``'s model with ``spec``'s online parts.

    ``config``: a ``llama`` config (``scan_layers`` allowed: the result is per layer), or a
    ``quarot`` config of unrotated float weights (``rotated=False, int_linears=False``; its
    ``hadamard_impl`` is kept).  A rotated or integer ``quarot`` model is refused: its params
    are already transformed (quantize the original ``llama`` params instead)."""
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(config, TransformerConfig) or config.model not in ("llama", "quarot"):
        raise ValueError(f"config must be a 'llama' (or 'quarot') TransformerConfig, got model="
                         f"{getattr(config, 'model', None)!r}")
    extra = {}
    if config.model == "quarot":
        if config.rotated or config.int_linears:
            raise ValueError(f"config is an already quantized quarot model (rotated={config.rotated}, "
                             f"int_linears={config.int_linears}); its params carry the rotations / integer "
                             "weights: quantize the original llama params instead")
        extra["hadamard_impl"] = config.hadamard_impl
    base = {f.name: getattr(config, f.name) for f in dataclasses.fields(TransformerConfig)}
    base.update(model="quarot", tie_embeddings=False if spec.rotate else config.tie_embeddings,
                scan_layers=False)
    return QuaRotConfig(**base, **spec.online_quant(), rotated=spec.rotate, int_linears=spec.storage == "int",
                        w_bits=spec.w_bits if spec.storage == "int" else 8, **extra)


def _cast_like(tree, ref, default=jnp.float32):
    """``tree`` (numpy) as jax arrays with the dtypes of the matching leaves of ``ref``
    (``default`` where ``ref`` has none, e.g. an untied head)."""
    if isinstance(tree, dict):
        return {k: _cast_like(v, ref.get(k) if isinstance(ref, dict) else None, default)
                for k, v in tree.items()}
    return jnp.asarray(tree, getattr(ref, "dtype", default))


@functools.lru_cache(maxsize=8)
def _stats_fn(config):
    from ..registry import build
    module = build(config)
    return jax.jit(lambda p, t: module.apply({"params": p}, t, mutable=["quant_stats"])[1])


def collect_stats(config, params, tokens, batch: int = 16):
    """Sum of the ``quant_stats`` of the model over ``tokens [N, T]`` (in batches):
    ``{layer: {stat name: {"xtx", "count", "absmax"}}}`` as numpy (xtx / count summed,
    absmax maxed).  ``config``: a ``quarot`` config (:func:`quant_config`; only its model
    records the statistics)."""
    if not isinstance(config, QuaRotConfig):
        raise ValueError(f"config must be a 'quarot' config (e.g. quant_config(llama_config, spec)): only "
                         f"its model records quant_stats, got model={getattr(config, 'model', None)!r}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    tokens = _check_tokens(tokens, config.vocab_size, "tokens", "tokens")
    fn = _stats_fn(config)
    total = None
    for i in range(0, len(tokens), batch):
        total = _add_stats(total, fn(params, jnp.asarray(tokens[i:i + batch]))["quant_stats"])
    return {layer: _by_stat_name(mods) for layer, mods in total.items()}


def _add_stats(total, stats):
    """``total`` (None or an earlier result) plus one batch's ``quant_stats`` tree, as numpy
    float64: ``xtx`` / ``count`` summed, ``absmax`` maxed."""
    stats = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), jax.device_get(stats))
    if total is None:
        return stats
    return jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.maximum(a, b) if str(path[-1].key) == "absmax" else a + b, total, stats)


def _by_stat_name(mods):
    """One layer's ``{module: {stat name: st}}`` -> ``{stat name: st}``."""
    return {name: st for mod in mods.values() for name, st in mod.items()}


def _kernel_2d(w, name):
    n_in = _N_IN.get(name, 1)
    shape = w.shape
    return w.reshape(int(np.prod(shape[:n_in])), -1), shape


def _check_quantize_inputs(config, spec: QuantSpec, calibration) -> None:
    """What ``quantize`` would otherwise find out deep inside (or never: out-of-vocabulary
    calibration ids give NaN Hessians and NaN weights)."""
    if spec.w_bits < 16 and spec.w_groupsize is not None:
        check_divides_linear_inputs(config, "w_groupsize", spec.w_groupsize)
    if spec.storage == "int" and spec.w_bits <= 4:  # int4 packs pairs along each output axis
        outs = {"head_dim": config.dim_head, "d_model": config.d_model, "d_ff": config.ff_dim}
        odd = {k: v for k, v in outs.items() if v % 2}
        if odd:
            raise ValueError(f"storage='int' with w_bits={spec.w_bits} packs two int4 per byte along each "
                             f"linear's output axis, which must be even, not {odd}")
    if calibration is not None:
        _check_tokens(calibration, config.vocab_size, "calibration", "calibration tokens")


def _check_tokens(tokens, vocab_size: int, name: str, ids: str) -> np.ndarray:
    """``tokens`` as numpy int ``[N, T]`` (N, T >= 1) of ids in ``[0, vocab_size)``, else a
    ``ValueError`` naming ``name`` / ``ids`` (the jitted passes would give NaN statistics for
    out-of-vocabulary ids)."""
    cal = np.asarray(tokens)
    if cal.ndim != 2 or cal.size == 0 or not np.issubdtype(cal.dtype, np.integer):
        raise ValueError(f"{name} must be int tokens [N, T] (N, T >= 1), got shape {cal.shape} "
                         f"dtype {cal.dtype}")
    check_token_ids(cal, vocab_size, f"{ids} must be ids")
    return cal


@functools.lru_cache(maxsize=8)
def _layer_fns(config):
    """Jitted ``embed(params, tokens) -> x`` and ``block(params, x) -> (y, quant_stats)`` of the
    model ``config`` builds (every layer has the same block: layer ``i``'s params are passed as
    ``blocks_0``)."""
    from ..registry import build
    module = build(config)

    def embed(p, tokens):
        return module.apply({"params": {"embed": p}}, tokens, method=lambda m, t: m.embed(t))

    def block(p, x):
        pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        (y, _), stats = module.apply({"params": {"blocks_0": p}}, x, pos, mutable=["quant_stats"],
                                     method=lambda m, x, pos: m.blocks[0](x, pos))
        return y, stats["quant_stats"]["blocks_0"]
    return jax.jit(embed), jax.jit(block)


def _block_stats(block_fn, p, xs):
    """Run one block over the calibration hidden states ``xs`` (a list of ``[b, T, D]``
    batches): (outputs, ``{stat name: {"xtx", "count", "absmax"}}`` as :func:`collect_stats`)."""
    ys, total = [], None
    for x in xs:
        y, stats = block_fn(p, x)
        ys.append(y)
        total = _add_stats(total, stats)
    return ys, _by_stat_name(total)


def quantize(config, params, spec: QuantSpec, calibration=None):
    """QuaRot a ``llama`` model: ``(quarot config, quantized params)`` (see module doc).

    ``calibration``: int tokens ``[N, T]`` (needed for ``w_method="gptq"``; QuaRot uses 128
    sequences of 2048 tokens of WikiText-2).

    Goes block by block, as the authors' code: each block is rotated (float64), quantized and
    cast back to its dtypes before the next one, so the peak memory is the input and output
    trees plus one block in float64.  GPTQ keeps the calibration hidden states ``[N, T, D]``
    (in the model's compute dtype) and pushes them through each block once quantized, so
    layer ``i``'s Hessians see layers ``< i`` quantized at the cost of one forward pass (and,
    with ``spec.gptq_sequential``, layer ``i``'s earlier groups of linears: one block pass per
    group)."""
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    qcfg = quant_config(config, spec)
    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:  # module.init's variables
        params = params["params"]
    params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
    if config.scan_layers:  # a scanned model: per-layer trees (the quarot model is not scanned)
        params = unstack_layers(params, "blocks", n_layer=config.n_layer)
        config = config.replace(scan_layers=False)
    check_layer_shapes(config, params)
    _check_quantize_inputs(config, spec, calibration)
    gptq = spec.w_bits < 16 and spec.w_method == "gptq"
    if gptq and calibration is None:
        raise ValueError("w_method='gptq' needs calibration tokens [N, T] (calibration=...)")
    if spec.rotate:
        rot = Rotation(config, spec.seed)   # checks the model
    else:
        rot = None
    dtype = params["embed"]["embedding"].dtype
    out = {k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in params.items()
           if not k.startswith("blocks_")}
    if rot is not None:
        out["embed"] = _cast_like(rot.embed(params), params["embed"])
        head = rot.head(params)
        out["lm_head"] = _cast_like(head["lm_head"], params.get("lm_head"), dtype)
        out["final_norm"] = _cast_like(head["final_norm"], params["final_norm"])
    fp_cfg = qcfg.replace(a_bits=16, kv_bits=16, int_linears=False)
    int_storage = spec.storage == "int"
    xs = None
    if gptq:  # the calibration hidden states entering block 0
        embed_fn, block_fn = _layer_fns(fp_cfg)
        cal = np.asarray(calibration)
        xs = [embed_fn(out["embed"], jnp.asarray(cal[i:i + spec.calib_batch]))
              for i in range(0, len(cal), spec.calib_batch)]
    for i in range(config.n_layer):
        ref = params[f"blocks_{i}"]
        if spec.w_bits >= 16:
            out[f"blocks_{i}"] = (_cast_like(rot.block(ref), ref) if rot is not None
                                  else jax.tree_util.tree_map(jnp.asarray, ref))
            continue
        blk = rot.block(ref) if rot is not None else float64_tree(ref)
        stats = None
        ints = {}
        # GPTQ: the linears sharing an input (and Hessian) as one matrix; RTN: one at a time
        for members in _BY_STAT if gptq else [[lin] for lin in LINEARS]:
            if gptq and (stats is None or spec.gptq_sequential):
                # Hessians of layer i: inputs from the quantized layers < i (and, sequential,
                # from this layer's groups quantized so far)
                _, stats = _block_stats(block_fn, _cast_like(blk, ref), xs)
            ws = [_kernel_2d(blk[sub][name]["kernel"], name) for sub, name in members]
            w2 = np.concatenate([w for w, _ in ws], axis=1) if len(ws) > 1 else ws[0][0]
            kw = dict(groupsize=spec.w_groupsize, sym=spec.w_sym, clip_search=spec.w_clip,
                      clip_grid=spec.w_clip_grid,
                      return_int=int_storage)
            if gptq:
                res = gptq_weight(w2, stats[LINEARS[members[0]]]["xtx"], spec.w_bits, percdamp=spec.percdamp,
                                  act_order=spec.w_act_order, **kw)
            else:
                res = rtn_weight(w2, spec.w_bits, **kw)
            q, qi, sc, _ = res if int_storage else (res, None, None, None)
            edges = [0, *np.cumsum([w.shape[1] for w, _ in ws])]
            for (sub, name), (_, shape), lo, hi in zip(members, ws, edges[:-1], edges[1:]):
                blk[sub][name] = {**blk[sub][name], "kernel": q[:, lo:hi].reshape(shape)}  # (+ bias)
                if int_storage:
                    ints[(sub, name)] = (qi[:, lo:hi], sc[0, lo:hi], shape)
        out[f"blocks_{i}"] = qblk = _cast_like(blk, ref)
        if gptq and i + 1 < config.n_layer:
            xs, _ = _block_stats(block_fn, qblk, xs)
        if int_storage:
            for (sub, name), (qi, sc, shape) in ints.items():
                n_in = _N_IN.get(name, 1)
                q = jnp.asarray(qi.reshape(shape), jnp.int8)
                qblk[sub][name] = {**{k: v for k, v in qblk[sub][name].items() if k != "kernel"},  # bias
                                   "qkernel": pack_int4(q) if spec.w_bits <= 4 else q,
                                   "scale": jnp.asarray(sc.reshape(shape[n_in:]), jnp.float32)}
    return qcfg, out
