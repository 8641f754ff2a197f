"""The quantized (and optionally rotated) Llama: registry name ``quarot``.

Same parameter tree as ``llama``; only the token mixer and the MLP differ (the
:class:`~jaxformers.layers.block.Block` hooks), in the QuaRot layout (spcl/QuaRot)::

    attention:  x^ = Qa(x);  q, k, v = rope(x^ W_q), rope(x^ W_k), x^ W_v
                q, k = q H_dh, k H_dh          (online, after RoPE; rotated models only)
                k, v = Qkv(k), Qkv(v)          (per head, group = head dim by default)
                o = attention(q, k, v);  o = H_heads o  (online, across heads; rotated only)
                y = Qa(o) W_o
    MLP:        x^ = Qa(x);  h = silu(x^ W_gate) * x^ W_up
                h = h H_ff                     (online; rotated models only)
                y = Qa(h) W_down

``Qa``: per-token activation fake quantization (``a_bits``), ``Qkv``: KV-cache fake
quantization (``kv_bits``); the weights arrive already quantized (fake-quant values) from
:func:`jaxformers.quant.quantize`, which also bakes the offline rotations into them.

With ``int_linears`` (params from ``quantize(..., QuantSpec(storage="int"))``) every block
linear is an :class:`IntLinear`: integer weights (int8, or int4 packed two per byte) with
per-output-channel float32 scales; ``Qa`` then quantizes to int8 storage and the matmul is
int8 x int8 -> int32 (``a_bits == 16``: the weights are dequantized, weight-only).  Same
values as the fake-quant model up to float32 rounding in float32 compute (in bf16 the fake
path rounds ``s q`` to bf16 and 4-bit activation codes flip: :mod:`.api`).  The LM
head stays in high precision (as in the authors' code).  ``H`` are orthonormal Hadamard
transforms (:func:`pallas_kernels.hadamard.hadamard_transform` on GPU/TPU, on CPU the product
by the same matrix in plain XLA, factored as ``H_m (x) H_2^k`` without forming ``H_n``:
``hadamard_impl="dense"``, :func:`pallas_kernels.hadamard.hadamard_factored`).

Under ``mutable=["quant_stats"]`` each layer also records, per linear input (``attn_in``,
``o_in``, ``mlp_in``, ``down_in``), ``X^T X`` (GPTQ's Hessian), the token count and the
per-channel max |x| (outlier statistics), all before activation quantization.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from ..config import TransformerConfig, _boolean, _choice
from ..layers import Block
from ..layers.attention import init_attention_cache, project_qkv, write_kv_cache
from ..layers.common import dtype_of, output_std
from ..layers.linear import Linear
from ..models.llama import LLAMA_PRESETS, _LLAMA_STYLE
from ..models.transformer import Transformer
from ..ops.attention import attention
from ..registry import register
from ..sharding import (ACT_HEADS, ACT_KV_HEADS, ACT_MLP, BATCH, EMBED, HEAD_DIM, HEADS, LENGTH, MLP,
                        constrain, kernel_map, param_init)
from .quantizers import fake_quant, int_matmul, unpack_int4

HADAMARD_IMPLS = ("auto", "pallas", "dense")


@dataclasses.dataclass(frozen=True)
class OnlineQuant:
    """The quantizers that run with the model, shared by :class:`QuaRotConfig` and
    :class:`~jaxformers.quant.api.QuantSpec` (bits 16 = off): ``a_*`` per-token activation
    quantization before every linear (not the head); ``kv_*`` K/V quantization per head
    (``kv_groupsize`` None = the head dim)."""
    a_bits: int = 16
    a_groupsize: Optional[int] = None
    a_sym: bool = True
    a_clip: float = 1.0
    kv_bits: int = 16
    kv_groupsize: Optional[int] = None
    kv_sym: bool = False
    kv_clip: float = 1.0

    def check_online_quant(self) -> None:
        for name in ("a_bits", "kv_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 16:
                raise ValueError(f"{name} must be an int in [2, 16] (16 = off), got {v!r}")
        for name in ("a_clip", "kv_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        for name in ("a_sym", "kv_sym"):
            _boolean(self, name)
        for name in ("a_groupsize", "kv_groupsize"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")

    def online_quant(self) -> dict:
        """This object's :class:`OnlineQuant` fields by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(OnlineQuant)}


def check_divides_linear_inputs(config, name: str, groupsize: int) -> None:
    """``ValueError`` naming ``name`` unless ``groupsize`` divides the input size of every block
    linear of ``config`` (``d_model``, ``n_head * head_dim``, ``d_ff``)."""
    sizes = {"d_model": config.d_model, "n_head * head_dim": config.n_head * config.dim_head,
             "d_ff": config.ff_dim}
    bad = {k: v for k, v in sizes.items() if v % groupsize}
    if bad:
        raise ValueError(f"{name}={groupsize} must divide every linear's input size, not {bad}")


def check_hadamard_sizes(config) -> None:
    """``ValueError`` naming the setting unless ``head_dim``, ``n_head`` and ``d_ff`` of
    ``config`` all have an exact Hadamard matrix (the online transforms of a rotated model)."""
    from pallas_kernels.hadamard import split_size
    for name, n in (("head_dim", config.dim_head), ("n_head", config.n_head), ("d_ff", config.ff_dim)):
        try:
            split_size(n)
        except ValueError as e:
            raise ValueError(f"{name}={n}: QuaRot's exact Hadamard on it does not exist here ({e})") from None


@dataclasses.dataclass(frozen=True)
class QuaRotConfig(TransformerConfig, OnlineQuant):
    """Llama + QuaRot quantization settings (see module docstring).

    ``rotated``: the params carry QuaRot's offline rotations, so the online Hadamards run.
    ``a_*`` / ``kv_*``: the online quantizers (:class:`OnlineQuant`).
    ``int_linears``: the block linears hold integer weights (:class:`IntLinear`) of
    ``w_bits`` bits (<= 4: packed two per byte in uint8, else int8); needs symmetric
    per-token activations of ``a_bits <= 8`` (or 16: weight-only).
    """
    model: str = "quarot"
    rotated: bool = False
    hadamard_impl: str = "auto"
    int_linears: bool = False
    w_bits: int = 8

    def param_uses(self, path):
        """As the float model: a packed int4 ``qkernel`` stores two weights per byte, so each
        stored element counts twice (FLOPs count weights, not bytes)."""
        if self.int_linears and self.w_bits <= 4 and path and path[-1] == "qkernel":
            return 2.0 * super().param_uses(path)
        return super().param_uses(path)

    def validate(self) -> None:
        super().validate()
        _choice("norm", self.norm, ("rmsnorm",))
        _choice("mlp", self.mlp, ("swiglu",))
        _choice("hadamard_impl", self.hadamard_impl, HADAMARD_IMPLS)
        _choice("scan_layers", self.scan_layers, (False,))
        _choice("skip_gains", self.skip_gains, (False,))
        self.check_online_quant()
        for name in ("rotated", "int_linears"):
            _boolean(self, name)
        if self.rotated:  # the online Hadamards: exact, of these sizes (else: an error at the first forward)
            check_hadamard_sizes(self)
        if self.a_bits < 16 and self.a_groupsize is not None:  # every linear's input is split
            check_divides_linear_inputs(self, "a_groupsize", self.a_groupsize)
        if self.kv_bits < 16 and self.kv_groupsize is not None and self.dim_head % self.kv_groupsize:
            raise ValueError(f"kv_groupsize={self.kv_groupsize} must divide head_dim={self.dim_head}")
        if isinstance(self.w_bits, bool) or not isinstance(self.w_bits, int) or not 2 <= self.w_bits <= 8:
            raise ValueError(f"w_bits must be an int in [2, 8] (the integer weights of int_linears), "
                             f"got {self.w_bits!r}")
        if self.int_linears:
            if self.a_bits < 16 and (self.a_bits > 8 or not self.a_sym or self.a_groupsize is not None):
                raise ValueError("int_linears=True needs symmetric per-token activations with "
                                 f"a_bits <= 8 or a_bits=16, got a_bits={self.a_bits}, "
                                 f"a_sym={self.a_sym}, a_groupsize={self.a_groupsize}")


def hadamard(c, x, axes=None):
    """Orthonormal Hadamard transform of the last axis (kernel on GPU/TPU; on CPU, ``"dense"``:
    the same ``x @ H_n`` in plain XLA, factored:
    :func:`pallas_kernels.hadamard.hadamard_factored`).
    ``axes``: the logical names of ``x``'s dimensions (default ``batch, length``, the rest
    whole): on a mesh, the kernel runs per device on its block of them (:func:`kernel_map`)."""
    impl = c.hadamard_impl
    if impl == "auto":
        impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "dense"
    if impl == "pallas":
        from pallas_kernels.hadamard import hadamard_transform
        axes = (BATCH, LENGTH) + (None,) * (x.ndim - 2) if axes is None else tuple(axes)
        return kernel_map(hadamard_transform, (axes,), axes)(x)
    from pallas_kernels.hadamard import hadamard_factored
    return hadamard_factored(x)


def act_quant(c, x):
    """``Qa``: fake quantization; identity with ``int_linears`` (:class:`IntLinear` quantizes)."""
    if c.int_linears:
        return x
    return fake_quant(x, c.a_bits, groupsize=c.a_groupsize, sym=c.a_sym, clip=c.a_clip)


class IntLinear(nn.Module):
    """:class:`~jaxformers.layers.linear.Linear` with integer weights: params ``qkernel``
    ``[*in, *out]`` int8 (``w_bits > 4``) or ``[*in, *out[:-1], out[-1] / 2]`` uint8 (two
    int4 per byte along the last output axis, :func:`pack_int4`), and ``scale [*out]``
    float32, with ``Linear``'s logical axis names.  ``x [..., *in]`` is quantized per token
    (over all ``in`` axes) to ``a_bits`` symmetric integers in int8 and multiplied in int32
    (:func:`int_matmul`); ``a_bits == 16``: ``x @ (scale * q)`` in ``dtype`` (weight-only).
    int4 weights are unpacked to int8 for the matmul (Hopper has int8 but no int4 MMA)."""
    features: Union[int, Tuple[int, ...]]
    kernel_axes: Sequence[str]
    in_axes: int = 1
    w_bits: int = 8
    a_bits: int = 8
    a_clip: float = 1.0
    dtype: str = "float32"
    std: float = 0.02               # unused (Linear's signature)
    param_dtype: str = "float32"    # the bias's dtype (the integer weights' storage is fixed)
    use_bias: bool = False          # a float ``bias [*out]`` added after the integer matmul

    @nn.compact
    def __call__(self, x):
        out_shape = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        n = self.in_axes
        in_shape = tuple(x.shape[-n:])
        packed = self.w_bits <= 4
        store = in_shape + out_shape
        if packed:
            if out_shape[-1] % 2:
                raise ValueError(f"int4 packing needs an even last output axis, got {out_shape}")
            store = store[:-1] + (out_shape[-1] // 2,)
        qkernel = self.param("qkernel", param_init(nn.initializers.zeros, self.kernel_axes), store,
                             jnp.uint8 if packed else jnp.int8)
        scale = self.param("scale", param_init(nn.initializers.ones, self.kernel_axes[n:]),
                           out_shape, jnp.float32)
        q = unpack_int4(qkernel) if packed else qkernel
        dtype = jnp.dtype(self.dtype)
        if self.a_bits >= 16:
            w = (q.astype(jnp.float32) * scale).astype(dtype)
            contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
            y = jax.lax.dot_general(x.astype(dtype), w, (contract, ((), ())))
        else:
            lead = x.shape[:-n]
            k = math.prod(in_shape)
            y = int_matmul(x.reshape(lead + (k,)), q.reshape((k,) + out_shape), scale,
                           a_bits=self.a_bits, clip=self.a_clip, out_dtype=dtype)
        if self.use_bias:  # (qkv_bias) kept in high precision, as Linear adds it
            bias = self.param("bias", param_init(nn.initializers.zeros, self.kernel_axes[n:]), out_shape,
                              dtype_of(self.param_dtype))
            y = y + bias.astype(dtype)
        return y


def linear_class(c):
    """The block linears' module: ``Linear``, or :class:`IntLinear` with ``int_linears``."""
    if not c.int_linears:
        return Linear
    return functools.partial(IntLinear, w_bits=c.w_bits, a_bits=c.a_bits, a_clip=c.a_clip)


def kv_quant(c, x):
    return fake_quant(x, c.kv_bits, groupsize=c.kv_groupsize, sym=c.kv_sym, clip=c.kv_clip)


def record(module, name, x):
    """Sow calibration statistics of a linear's input ``x [..., n]`` (only when the
    ``quant_stats`` collection is mutable)."""
    if not module.is_mutable_collection("quant_stats"):
        return
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    stats = {"xtx": jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST),
             "count": jnp.asarray(x2.shape[0], jnp.float32),
             "absmax": jnp.max(jnp.abs(x2), axis=0)}
    module.sow("quant_stats", name, stats, reduce_fn=lambda _, new: new,
               init_fn=lambda: None)


class QuantAttention(nn.Module):
    """Grouped-query attention with QuaRot's online Hadamards and fake quantization."""
    applies_attn_dropout = False  # see models.transformer.check_attn_dropout
    config: object
    init_cache = staticmethod(init_attention_cache)

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, kv_cache=None, cache_index=None):
        """x ``[B, T, D]`` -> (y ``[B, T, D]``, new kv_cache or None)."""
        c = self.config
        record(self, "attn_in", x)
        q, k, v = project_qkv(c, act_quant(c, x), positions, linear=linear_class(c))
        if c.rotated:
            q = hadamard(c, q, (BATCH, LENGTH, ACT_HEADS, None))
            k = hadamard(c, k, (BATCH, LENGTH, ACT_KV_HEADS, None))
        k, v = kv_quant(c, k), kv_quant(c, v)
        new_cache = None
        if kv_cache is None:
            o = attention(q, k, v, causal=True, segment_ids=segment_ids, window=c.window,
                          implementation=c.attention_impl)
        else:
            new_cache = write_kv_cache(kv_cache, k, v, cache_index, segment_ids)
            k_all, v_all = new_cache["k"], new_cache["v"]
            o = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), causal=True,
                          window=c.window, q_offset=cache_index, implementation="xla")
        b, t, h, dh = o.shape
        if c.rotated:  # across heads: [B, T, H, Dh] -> transform the H axis
            o = jnp.swapaxes(hadamard(c, jnp.swapaxes(o, 2, 3)), 2, 3)
        flat = o.reshape(b, t, h * dh)
        record(self, "o_in", flat)
        o = act_quant(c, flat).reshape(b, t, h, dh)
        # as the baseline: named for remat="save_attention_out"
        o = checkpoint_name(constrain(o, (BATCH, LENGTH, ACT_HEADS, None)), "attention_out")
        y = linear_class(c)(c.d_model, (HEADS, HEAD_DIM, EMBED), in_axes=2, std=output_std(c), dtype=c.dtype,
                   param_dtype=c.param_dtype, name="o")(o)
        return y, new_cache


class QuantSwiGLU(nn.Module):
    """SwiGLU with the online Hadamard before the down-projection and fake quantization."""
    config: object

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        c = self.config

        def dense(features, std, axes, name):
            return linear_class(c)(features, axes, std=std, dtype=c.dtype,
                                   param_dtype=c.param_dtype, name=name)
        record(self, "mlp_in", x)
        xq = act_quant(c, x)
        h = jax.nn.silu(dense(c.ff_dim, c.init_std, (EMBED, MLP), "gate")(xq)) * \
            dense(c.ff_dim, c.init_std, (EMBED, MLP), "up")(xq)
        h = constrain(h, (BATCH, LENGTH, ACT_MLP))
        if c.rotated:
            h = hadamard(c, h)
        record(self, "down_in", h)
        return dense(c.d_model, output_std(c), (MLP, EMBED), "down")(act_quant(c, h))


class QuaRotTransformer(Transformer):
    """``Transformer`` whose blocks use :class:`QuantAttention` and :class:`QuantSwiGLU`."""

    def block_class(self):
        return Block.using(mixer=QuantAttention, mlp=QuantSwiGLU, name="QuaRotBlock")


register("quarot", QuaRotConfig, QuaRotTransformer,
         {name: {**_LLAMA_STYLE, **values} for name, values in LLAMA_PRESETS.items()},
         description="Llama with QuaRot rotations and W/A/KV fake quantization (jaxformers.quant)")
