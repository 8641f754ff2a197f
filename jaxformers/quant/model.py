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
:func:`jaxformers.quant.quantize`, which also bakes the offline rotations into them.  The LM
head stays in high precision (as in the authors' code).  ``H`` are orthonormal Hadamard
transforms (:func:`pallas_kernels.hadamard.hadamard_transform` on GPU/TPU, a dense matmul
by the same matrix on CPU: ``hadamard_impl``).

Under ``mutable=["quant_stats"]`` each layer also records, per linear input (``attn_in``,
``o_in``, ``mlp_in``, ``down_in``), ``X^T X`` (GPTQ's Hessian), the token count and the
per-channel max |x| (outlier statistics), all before activation quantization.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..config import TransformerConfig, _choice
from ..layers import Block
from ..layers.attention import init_attention_cache, project_qkv
from ..layers.common import output_std
from ..layers.linear import Linear
from ..models.llama import LLAMA_PRESETS, _LLAMA_STYLE
from ..models.transformer import Transformer
from ..ops.attention import attention
from ..registry import register
from ..sharding import EMBED, HEAD_DIM, HEADS, MLP
from .quantizers import fake_quant

HADAMARD_IMPLS = ("auto", "pallas", "dense")


@dataclasses.dataclass(frozen=True)
class QuaRotConfig(TransformerConfig):
    """Llama + QuaRot quantization settings (see module docstring).

    ``rotated``: the params carry QuaRot's offline rotations, so the online Hadamards run.
    ``a_*``: per-token activation quantization before every linear (not the head);
    ``kv_*``: K/V quantization per head (``kv_groupsize`` None = the head dim).
    """
    model: str = "quarot"
    rotated: bool = False
    a_bits: int = 16
    a_groupsize: Optional[int] = None
    a_sym: bool = True
    a_clip: float = 1.0
    kv_bits: int = 16
    kv_groupsize: Optional[int] = None
    kv_sym: bool = False
    kv_clip: float = 1.0
    hadamard_impl: str = "auto"

    def validate(self) -> None:
        super().validate()
        _choice("norm", self.norm, ("rmsnorm",))
        _choice("mlp", self.mlp, ("swiglu",))
        _choice("hadamard_impl", self.hadamard_impl, HADAMARD_IMPLS)
        _choice("scan_layers", self.scan_layers, (False,))
        _choice("skip_gains", self.skip_gains, (False,))
        for name in ("a_bits", "kv_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 16:
                raise ValueError(f"{name} must be an int in [2, 16] (16 = off), got {v!r}")
        for name in ("a_clip", "kv_clip"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        for name in ("a_groupsize", "kv_groupsize"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")


def hadamard(c, x):
    """Orthonormal Hadamard transform of the last axis (kernel on GPU/TPU, dense on CPU)."""
    impl = c.hadamard_impl
    if impl == "auto":
        impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "dense"
    if impl == "pallas":
        from pallas_kernels.hadamard import hadamard_transform
        return hadamard_transform(x)
    from pallas_kernels.hadamard import hadamard_matrix
    n = x.shape[-1]
    h = jnp.asarray(hadamard_matrix(n) * n ** -0.5, jnp.float32)
    y = jnp.matmul(x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def act_quant(c, x):
    return fake_quant(x, c.a_bits, groupsize=c.a_groupsize, sym=c.a_sym, clip=c.a_clip)


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
    config: object
    init_cache = staticmethod(init_attention_cache)

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, kv_cache=None, cache_index=None):
        """x ``[B, T, D]`` -> (y ``[B, T, D]``, new kv_cache or None)."""
        c = self.config
        record(self, "attn_in", x)
        q, k, v = project_qkv(c, act_quant(c, x), positions)
        if c.rotated:
            q, k = hadamard(c, q), hadamard(c, k)
        k, v = kv_quant(c, k), kv_quant(c, v)
        new_cache = None
        if kv_cache is None:
            o = attention(q, k, v, causal=True, segment_ids=segment_ids, window=c.window,
                          implementation=c.attention_impl)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported together with a KV cache")
            start = (0, cache_index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(kv_cache["k"], k.astype(kv_cache["k"].dtype), start)
            v_all = jax.lax.dynamic_update_slice(kv_cache["v"], v.astype(kv_cache["v"].dtype), start)
            new_cache = {"k": k_all, "v": v_all}
            o = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), causal=True,
                          window=c.window, q_offset=cache_index, implementation="xla")
        b, t, h, dh = o.shape
        if c.rotated:  # across heads: [B, T, H, Dh] -> transform the H axis
            o = jnp.swapaxes(hadamard(c, jnp.swapaxes(o, 2, 3)), 2, 3)
        flat = o.reshape(b, t, h * dh)
        record(self, "o_in", flat)
        o = act_quant(c, flat).reshape(b, t, h, dh)
        y = Linear(c.d_model, (HEADS, HEAD_DIM, EMBED), in_axes=2, std=output_std(c), dtype=c.dtype,
                   param_dtype=c.param_dtype, name="o")(o)
        return y, new_cache


class QuantSwiGLU(nn.Module):
    """SwiGLU with the online Hadamard before the down-projection and fake quantization."""
    config: object

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        c = self.config

        def dense(features, std, axes, name):
            return Linear(features, axes, std=std, dtype=c.dtype, param_dtype=c.param_dtype,
                          name=name)
        record(self, "mlp_in", x)
        xq = act_quant(c, x)
        h = jax.nn.silu(dense(c.ff_dim, c.init_std, (EMBED, MLP), "gate")(xq)) * \
            dense(c.ff_dim, c.init_std, (EMBED, MLP), "up")(xq)
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
