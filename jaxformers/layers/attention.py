"""Multi-head / grouped-query self-attention with RoPE and an optional KV cache.

q = x W_q, k = x W_k, v = x W_v   (W_q: [D, H, Dh], W_k/W_v: [D, Hkv, Dh])
y = attention(rope(q), rope(k), v) W_o   (W_o: [H, Dh, D])

Options of the config: ``qkv_bias`` adds ``+ b_q|b_k|b_v`` to the three projections (Qwen2),
``qk_norm`` replaces ``q``/``k`` by ``RMSNorm_head_dim(q)``/``RMSNorm_head_dim(k)`` before rope
(Qwen3; one ``[Dh]`` scale each, or one per head with ``qk_norm_per_head``): :func:`project_qkv`,
shared by every attention mixer built on it.

With a cache (decoding), the new keys/values are written at ``cache_index`` in
preallocated ``[B, S, Hkv, Dh]`` buffers and the queries attend to the whole
buffer with ``q_offset = cache_index`` (unwritten slots are in the causal future).
Decoding (and prefill through a cache) always runs the XLA path, whatever
``config.attention_impl`` says: the fused kernels need ``Tq == Tk`` and no ``q_offset``
(cuDNN) or a 128-row query tile (Pallas), and a decode step is one query per row.
Training with ``attn_dropout`` also runs XLA (the kernels have no dropout).
"""
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from ..ops.attention import attention
from ..sharding import (ACT_HEADS, ACT_KV_HEADS, BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LENGTH,
                        constrain)
from ..utils import concrete
from .common import dtype_of, output_std
from .linear import Linear
from .norms import RMSNorm
from .rotary import apply_rotary, rotary_angles


def init_attention_cache(config, batch_size, max_len, dtype=None):
    """Empty KV cache of one attention layer: {'k', 'v'} each ``[B, S, Hkv, Dh]``."""
    dtype = dtype_of(dtype or config.dtype)
    shape = (batch_size, max_len, config.kv_heads, config.dim_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def write_kv_cache(kv_cache, k, v, cache_index, segment_ids=None, capacity=None):
    """The decoding cache with ``k``/``v`` ``[B, T, Hkv, Dh]`` written at ``cache_index``:
    ``{"k", "v"}`` ``[B, S, Hkv, Dh]`` (every KV-cache mixer shares this; the caller attends to
    the returned buffers with ``q_offset = cache_index``).  Packed ``segment_ids`` raise.

    A chunk that does not fit (``cache_index + T > S``) would be clamped by XLA onto the last
    slots, and a negative ``cache_index`` wrapped around from the end: silently wrong answers.
    They raise a ``ValueError`` when the index is known (eager calls), and under ``jit``
    (traced index) the written keys/values become NaN, so every output
    that depends on them is NaN instead of wrong.  Size the cache with ``init_cache(..., max_len)``
    >= prompt + generated tokens.  ``capacity``: the positions a mixer may fill, if fewer than
    ``S`` (e.g. a landmark memory cache keeps one spare chunk to slice from)."""
    if segment_ids is not None:
        raise ValueError("segment_ids are not supported together with a KV cache")
    (b, s), (bn, t) = kv_cache["k"].shape[:2], k.shape[:2]
    if kv_cache["v"].shape != kv_cache["k"].shape:
        raise ValueError(f"the KV cache's 'k' and 'v' must have one shape [B, S, Hkv, Dh], got "
                         f"{kv_cache['k'].shape} and {kv_cache['v'].shape}")
    if v.shape != k.shape:  # a smaller v would be written partially, a longer one past k's slots
        raise ValueError(f"k and v must have the same shape [B, T, Hkv, Dh], got k {k.shape} and v {v.shape}")
    if capacity is not None:
        if not (isinstance(capacity, (int, np.integer)) and not isinstance(capacity, (bool, np.bool_))
                and 0 <= capacity <= s):
            # a larger one would let writes past S through the checks, then be clamped by XLA
            raise ValueError(f"capacity must be an int in [0, S={s}] (the cache's max_len), got {capacity!r}")
        s = capacity
    dtype = getattr(cache_index, "dtype", None)
    dtype = np.asarray(cache_index).dtype if dtype is None else dtype
    if np.ndim(cache_index) != 0 or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"cache_index must be an integer scalar (the number of positions already in "
                         f"the cache), got {type(cache_index).__name__} of dtype {dtype} and shape "
                         f"{np.shape(cache_index)}")
    if bn != b or kv_cache["k"].shape[2:] != k.shape[2:]:
        raise ValueError(f"the KV cache holds [B, S, Hkv, Dh] = {kv_cache['k'].shape}, the new keys are "
                         f"{k.shape}: build the cache with init_cache(module, batch_size={bn}, max_len)")
    if t > s:
        raise ValueError(f"{t} new tokens do not fit a KV cache of max_len={s}: build the cache with "
                         f"init_cache(module, batch_size, max_len >= {t})")
    index = concrete(cache_index)
    if index is not None and int(index) < 0:  # dynamic_update_slice would wrap it (-2: slot S-2)
        raise ValueError(f"cache_index must be >= 0 (the number of positions already in the cache), "
                         f"got {int(index)}")
    if index is not None and int(index) + t > s:
        raise ValueError(f"the KV cache is full: {t} new tokens at cache index {int(index)} exceed its "
                         f"max_len={s}: build the cache with init_cache(module, batch_size, max_len >= "
                         f"{int(index) + t})")
    fits = (cache_index >= 0) & (cache_index + t <= s)

    # dynamic_update_slice needs start indices of one dtype: under jax_enable_x64 a bare 0 is
    # int64 while the decoding cache's index is int32, so the zeros take the index's dtype.
    start = jnp.asarray(cache_index)
    zero = jnp.zeros((), start.dtype)

    def write(buf, new):
        new = new.astype(buf.dtype)
        if index is None and jnp.issubdtype(buf.dtype, jnp.floating):
            new = jnp.where(fits, new, jnp.nan)  # traced overflow: NaN, never a clamped overwrite
        return jax.lax.dynamic_update_slice(buf, new, (zero, start, zero, zero))

    return {"k": write(kv_cache["k"], k), "v": write(kv_cache["v"], v)}


def project_qkv(c, x, positions, linear=Linear):
    """The attention projections ``q``/``k``/``v`` of ``x [B, T, D]`` with rotary applied at
    ``positions [B, T]``: ``[B, T, H, Dh]``, ``[B, T, Hkv, Dh]`` x 2.  Called inside a mixer's
    ``nn.compact`` method, so the parameters ``q``/``k``/``v`` belong to that mixer (any mixer
    that only changes the attention op keeps the baseline's parameter tree).  ``linear``: the
    projection module class (``Linear``'s signature), e.g. an integer-weight one.

    ``config.qkv_bias``: each projection adds a bias (``q/bias [H, Dh]``, ``k|v/bias [Hkv, Dh]``,
    zero init; Qwen2).  ``config.qk_norm``: q and k are RMS-normalised over ``head_dim``, each
    head alone, with one learned ``[Dh]`` scale each (``q_norm/scale``, ``k_norm/scale``, eps
    ``norm_eps``), BEFORE rotary (Qwen3); with ``config.qk_norm_per_head`` each head has its
    own scale (``q_norm/scale [H, Dh]``, ``k_norm/scale [Hkv, Dh]``, axes ``heads|kv_heads,
    head_dim``: a layer-parallel fused pair, whose heads come from two layers).  All off (the
    default): the parameter tree and the outputs are exactly those of a config without the fields."""
    h, hkv, dh = c.n_head, c.kv_heads, c.dim_head
    bias = {"use_bias": True} if getattr(c, "qkv_bias", False) else {}

    def proj(heads, axes, name):
        return linear((heads, dh), axes, std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype,
                      name=name, **bias)(x)

    q = proj(h, (EMBED, HEADS, HEAD_DIM), "q")
    k = proj(hkv, (EMBED, KV_HEADS, HEAD_DIM), "k")
    v = proj(hkv, (EMBED, KV_HEADS, HEAD_DIM), "v")
    if getattr(c, "qk_norm", False):
        per_head = getattr(c, "qk_norm_per_head", False)

        def head_norm(name, heads_axis):
            return RMSNorm(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, axis_name=HEAD_DIM,
                           head_axis=heads_axis if per_head else None, name=name)
        q, k = head_norm("q_norm", HEADS)(q), head_norm("k_norm", KV_HEADS)(k)
    cos, sin = rotary_angles(positions, dh, c.rope_theta)
    q = constrain(apply_rotary(q, cos, sin), (BATCH, LENGTH, ACT_HEADS, None))
    k = constrain(apply_rotary(k, cos, sin), (BATCH, LENGTH, ACT_KV_HEADS, None))
    v = constrain(v, (BATCH, LENGTH, ACT_KV_HEADS, None))
    return q, k, v


class Attention(nn.Module):
    """The default token mixer of :class:`~jaxformers.layers.block.Block` (its mixer protocol)."""
    applies_attn_dropout = True  # see models.transformer.check_attn_dropout
    config: object

    init_cache = staticmethod(init_attention_cache)

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, kv_cache=None, cache_index=None):
        """x ``[B, T, D]``, positions ``[B, T]`` -> (y ``[B, T, D]``, new kv_cache or None)."""
        c = self.config

        q, k, v = project_qkv(c, x, positions)

        new_cache = None
        if kv_cache is None:
            rate = getattr(c, "attn_dropout", 0.0)
            if rate and self.has_rng("dropout"):  # training with attention dropout: the XLA path
                o = attention(q, k, v, causal=True, segment_ids=segment_ids, window=c.window,
                              implementation="xla", dropout_rate=rate, dropout_rng=self.make_rng("dropout"))
            else:
                o = attention(q, k, v, causal=True, segment_ids=segment_ids, window=c.window,
                              implementation=c.attention_impl)
        else:
            new_cache = write_kv_cache(kv_cache, k, v, cache_index, segment_ids)
            k_all, v_all = new_cache["k"], new_cache["v"]
            o = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), causal=True, window=c.window,
                          q_offset=cache_index, implementation="xla")
        # Named so that remat="save_attention_out" keeps it instead of recomputing attention.
        o = checkpoint_name(constrain(o, (BATCH, LENGTH, ACT_HEADS, None)), "attention_out")
        y = Linear(c.d_model, (HEADS, HEAD_DIM, EMBED), in_axes=2, std=output_std(c), dtype=c.dtype,
                   param_dtype=c.param_dtype, name="o")(o)
        return y, new_cache
