"""Mamba-2 (Dao & Gu, 2024): the SSD mixer and its pre-norm residual block.

With ``I = expand * d_model`` inner channels in ``H = I / headdim`` heads of size
``P = headdim``, ``G = n_groups`` groups of ``B``/``C`` (state size ``N``)::

    z, x, BC, dt = in_proj(u)          # all projections in parallel, at the start
    x, BC   = silu(causal_conv(x)), silu(causal_conv(BC))     # depthwise, kernel d_conv
    h_t     = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T          # per head, scalar A_h = -exp(A_log_h)
    y_t     = h_t C_t + D_h x_t                               # computed chunk-wise (SSD)
    out     = out_proj(RMSNorm_grouped(y * silu(z)))          # gated norm, per group of I / G channels

``dt = softplus(dt + dt_bias)``.  The fused ``in_proj`` of mamba_ssm (rows
``[z | x | B | C | dt]``) is kept as separate projections ``in_z``, ``in_x``,
``in_bc`` and ``in_dt`` (and the xBC conv as ``conv_x`` + ``conv_bc``, exact
since the conv is depthwise) so that the inner dim carries the ``mlp`` logical axis
and heads the ``heads`` axis (tensor-parallel friendly, as the paper intends).
Decoding cache per layer: ``conv_x [B, d_conv-1, I]``, ``conv_bc [B, d_conv-1, 2GN]``
and the SSM state ``[B, H, P, N]`` float32; multi-token calls pass it to the SSD as
``initial_state`` and keep the final state.  Packed sequences (``segment_ids``, no
cache) are exact as in Mamba-1: masked conv taps, the SSD state restarts per segment.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..sharding import ACT_HEADS, ACT_MLP, BATCH, EMBED, HEADS, LENGTH, MLP, constrain, kernel_map, param_init
from .common import dtype_of
from .norms import _check_eps
from .mamba import (MambaBlock, a_log_init, check_cache, check_segment_ids, conv_module, dense,
                    dt_bias_init, mixer_out_std, resolve_scan_impl, scan_functions)


def kernel_chunk_size(chunk_size: int) -> int:
    """The SSD kernel's tile for a config's ``chunk_size``: itself when a power of two >= 16,
    else the next such power.  SSD's output does not depend on the chunk (it only tiles the
    scan), so ``scan_impl="auto"`` running the kernel on GPU / TPU takes any ``chunk_size``
    (e.g. a Hugging Face checkpoint's 8 or 100); ``"pallas"`` refuses one it cannot tile
    (:class:`~jaxformers.models.mamba.MambaConfig`), ``"reference"`` ignores it."""
    return max(16, 1 << (int(chunk_size) - 1).bit_length())


def init_mamba2_cache(config, batch_size, dtype=None):
    """Empty cache of one Mamba-2 layer (conv inputs in ``dtype``, SSM state float32)."""
    dtype = dtype_of(dtype or config.dtype)
    k, gn = config.d_conv - 1, config.n_groups * config.d_state
    return {"conv_x": jnp.zeros((batch_size, k, config.d_inner), dtype),
            "conv_bc": jnp.zeros((batch_size, k, 2 * gn), dtype),
            "ssm": jnp.zeros((batch_size, config.ssm_heads, config.headdim, config.d_state), jnp.float32)}


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y * silu(z))`` over groups of ``group_size`` channels (float32 math)."""
    group_size: int
    eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, y, z):
        _check_eps(self)  # RMSNorm's rule: eps <= 0 gave NaN for an all-zero y * silu(z) group
        ch = y.shape[-1]
        scale = self.param("scale", param_init(nn.initializers.ones, (MLP,)), (ch,),
                           dtype_of(self.param_dtype))
        h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        g = h.reshape(h.shape[:-1] + (ch // self.group_size, self.group_size))
        g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + self.eps)
        return (g.reshape(h.shape) * scale.astype(jnp.float32)).astype(dtype_of(self.dtype))


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer with the attention mixer's calling convention (and ``init_cache`` hook)."""
    applies_attn_dropout = None  # no attention probabilities (see models.transformer.check_attn_dropout)
    config: object

    @staticmethod
    def init_cache(config, batch_size, max_len=None, dtype=None):
        """Empty decoding cache of one layer (constant size: ``max_len`` is not needed)."""
        del max_len
        return init_mamba2_cache(config, batch_size, dtype)

    @nn.compact
    def __call__(self, u, positions=None, segment_ids=None, cache=None, cache_index=None):
        """u ``[B, T, D]`` -> (y ``[B, T, D]``, new cache or None).

        ``segment_ids [B, T]``: packed sequences (no cache).  ``positions`` and
        ``cache_index`` are unused (recurrent: the cache carries the state).
        """
        del positions, cache_index
        check_segment_ids(segment_ids, u, cache)
        c = self.config
        bsz, t = u.shape[:2]
        i_dim, n, g, h, p = c.d_inner, c.d_state, c.n_groups, c.ssm_heads, c.headdim
        cdt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        k = c.d_conv - 1
        check_cache(cache, {"conv_x": ((bsz, k, i_dim), "[B, d_conv-1, d_inner]"),
                            "conv_bc": ((bsz, k, 2 * g * n), "[B, d_conv-1, 2 n_groups d_state]"),
                            "ssm": ((bsz, h, p, n), "[B, heads, headdim, d_state]")})
        z = constrain(dense(c, i_dim, (EMBED, MLP), c.init_std, c.proj_bias, "in_z")(u),
                      (BATCH, LENGTH, ACT_MLP))
        x = constrain(dense(c, i_dim, (EMBED, MLP), c.init_std, c.proj_bias, "in_x")(u),
                      (BATCH, LENGTH, ACT_MLP))
        bc = dense(c, 2 * g * n, (EMBED, None), c.init_std, c.proj_bias, "in_bc")(u)
        dt = dense(c, h, (EMBED, HEADS), c.init_std, c.proj_bias, "in_dt")(u)
        x, conv_x = conv_module(c, "conv_x")(x, None if cache is None else cache["conv_x"], segment_ids)
        bc, conv_bc = conv_module(c, "conv_bc", axis_name=None)(
            bc, None if cache is None else cache["conv_bc"], segment_ids)
        x, bc = jax.nn.silu(x), jax.nn.silu(bc)
        b_mat, c_mat = (m.reshape(bsz, t, g, n) for m in jnp.split(bc, 2, axis=-1))
        x = constrain(x.reshape(bsz, t, h, p), (BATCH, LENGTH, ACT_HEADS, None))

        dt_bias = self.param("dt_bias", param_init(dt_bias_init(c), (HEADS,)), (h,), pdt)
        a_log = self.param("A_log", param_init(a_log_init(c), (HEADS,)), (h,), pdt)
        d_skip = self.param("D", param_init(nn.initializers.ones, (HEADS,)), (h,), pdt)
        a = -jnp.exp(a_log.astype(jnp.float32))
        kwargs = dict(D=d_skip.astype(jnp.float32), dt_bias=dt_bias.astype(jnp.float32), dt_softplus=True)

        ssd, step = scan_functions("ssd", c.scan_impl)
        chunk = c.chunk_size
        if c.scan_impl == "auto" and resolve_scan_impl("auto", "ssd") == "pallas":  # the kernel on GPU / TPU
            chunk = kernel_chunk_size(chunk)  # e.g. a HF checkpoint's chunk_size the kernel cannot tile
        # on a mesh SSD runs per device on its rows and heads (XLA cannot split a kernel); B/C's
        # groups go with their heads (one group: whole on every device)
        # (the sequence whole on every device: a scan runs along it, whatever the rules say)
        hd, gr = (BATCH, None, ACT_HEADS), (BATCH, None, ACT_HEADS if g > 1 else None, None)
        axes = (hd + (None,), hd, (ACT_HEADS,), gr, gr, (ACT_HEADS,), (ACT_HEADS,))
        args = (x, dt, a, b_mat, c_mat, kwargs["D"], kwargs["dt_bias"])
        st = (BATCH, ACT_HEADS, None, None)

        def run(x, dt, a, b, cm, d, db, more=None):  # more: segment_ids, or the cached state
            kw = dict(chunk_size=chunk, D=d, dt_bias=db, dt_softplus=True)
            if cache is None:
                return ssd(x, dt, a, b, cm, segment_ids=more, **kw)
            return ssd(x, dt, a, b, cm, initial_state=more, return_final_state=True, **kw)
        new_cache = None
        if cache is None:
            if segment_ids is None:
                y = kernel_map(run, axes, hd + (None,))(*args)
            else:
                y = kernel_map(run, axes + ((BATCH, None),), hd + (None,))(*args, segment_ids)
        elif t == 1:  # one decoding step: the recurrence
            y, state = step(cache["ssm"], x[:, 0], dt[:, 0], a, b_mat[:, 0], c_mat[:, 0], **kwargs)
            y = y[:, None]
            new_cache = {"conv_x": conv_x, "conv_bc": conv_bc, "ssm": state.astype(cache["ssm"].dtype)}
        else:  # several tokens with a cache: chunked SSD from the cached state
            y, state = kernel_map(run, axes + (st,), (hd + (None,), st))(*args, cache["ssm"])
            new_cache = {"conv_x": conv_x, "conv_bc": conv_bc, "ssm": state.astype(cache["ssm"].dtype)}
        y = constrain(y.reshape(bsz, t, i_dim).astype(cdt), (BATCH, LENGTH, ACT_MLP))
        y = GatedRMSNorm(i_dim // g, c.norm_eps, c.dtype, c.param_dtype, name="norm")(y, z)
        out = dense(c, c.d_model, (MLP, EMBED), mixer_out_std(c), c.proj_bias, "out_proj")(y)
        return out, new_cache


class Mamba2Block(MambaBlock):
    """``x + Mamba2Mixer(Norm(x))``."""
    mixer_class = Mamba2Mixer
