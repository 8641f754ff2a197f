"""Mamba-1 (Gu & Dao, 2023): the selective-SSM mixer and its pre-norm residual block.

Mixer, with ``I = expand * d_model`` inner channels, state size ``N`` and
``R = dt_rank``::

    x, z   = in_proj(u)                       # [B, T, I] each
    x      = silu(causal_depthwise_conv(x))   # kernel d_conv, per channel
    dt_r, B, C = x_proj(x)                    # [B, T, R], [B, T, N], [B, T, N]
    dt     = softplus(dt_proj(dt_r) + dt_bias)  # [B, T, I]
    h_t    = exp(dt_t A) h_{t-1} + dt_t B_t x_t     (A = -exp(A_log) [I, N])
    y_t    = C_t h_t + D x_t
    out    = out_proj(y * silu(z))

Block: ``x + Mixer(RMSNorm(x))`` (no MLP).  Decoding keeps a per-layer cache of
constant size: the last ``d_conv - 1`` conv inputs ``[B, d_conv-1, I]`` and the
SSM state ``[B, I, N]`` (float32).  A one-token step uses the recurrent update; a
multi-token call with a cache (prefill, or a chunk after earlier tokens) runs the
parallel scan from the cached state (the scan's ``initial_state``).

Packed sequences (``segment_ids [B, T]``, training / scoring without a cache): a
new segment starts wherever the id changes; the conv taps that would reach into
an earlier segment read 0 and the scan's state restarts from zero, so each
segment is computed exactly as if it were alone.

Initialisation, where it differs from mamba_ssm (initialisation only, documented, not
matched): the conv bias starts at 0 (mamba_ssm keeps torch's ``Conv1d`` default, uniform in
+-1/sqrt(d_conv)); the output projection's std is ``init_std / sqrt(n_layer)``
(``scale_residual_init``) also in blocks that add an MLP (``ssm_mlp=True``), where mamba_ssm's
prenorm rescale counts two residual branches per layer (``1 / sqrt(2 n_layer)``).

The scan implementation comes from ``config.scan_impl``: ``"reference"`` (plain
JAX, any backend), ``"pallas"`` (``pallas_kernels``; interpret mode off GPU) or
``"auto"`` (pallas on GPU, and on TPU when the kernel package has a TPU variant, i.e.
exports ``tpu_vmem_bytes``; reference elsewhere, e.g. on CPU where the kernels would
only run in the slow Pallas interpreter).  The shared
pieces used by Mamba-2 too (causal conv, dt/A initialisers, impl dispatch) live here.
"""
from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..sharding import ACT_MLP, BATCH, EMBED, LENGTH, MLP, constrain, kernel_map, param_init
from .common import dtype_of, segment_index  # noqa: F401  (segment_index: re-exported)
from .block import Block
from .linear import Linear

SCAN_IMPLS = ("auto", "reference", "pallas")
_PACKAGES = {"selective_scan": "pallas_kernels.selective_scan", "ssd": "pallas_kernels.ssd"}


# ----------------------------------------------------------------- dispatch
def _kernel(family):
    """The Pallas entry point of ``family`` ("selective_scan" | "ssd"), or raise ImportError."""
    module = importlib.import_module(_PACKAGES[family] + ".kernel")
    return getattr(module, family)


def resolve_scan_impl(impl: str, family: str = "selective_scan") -> str:
    """``"auto"`` -> ``"pallas"`` on GPU (Triton) and on TPU (Mosaic, when the kernel package
    has a TPU variant) if the kernel imports, else ``"reference"``."""
    if impl not in SCAN_IMPLS:
        raise ValueError(f"scan_impl={impl!r} is not allowed; choose one of {list(SCAN_IMPLS)}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        return "reference"
    try:
        _kernel(family)
        package = importlib.import_module(_PACKAGES[family])
    except ImportError:
        return "reference"
    if backend == "tpu" and not hasattr(package, "tpu_vmem_bytes"):
        return "reference"
    return "pallas"


def scan_functions(family: str, impl: str):
    """(parallel scan over a sequence, one-token recurrent update) for ``family``."""
    package = importlib.import_module(_PACKAGES[family])
    step = package.selective_state_update if family == "selective_scan" else package.ssd_state_update
    impl = resolve_scan_impl(impl, family)
    if impl == "reference":
        return package.reference, step
    try:
        kernel = _kernel(family)
    except ImportError as e:
        raise ValueError(f"scan_impl='pallas' needs {_PACKAGES[family]}.kernel, which is not "
                         f"importable ({e}); use scan_impl='reference' or 'auto'") from None
    return kernel, step  # the kernels run in Pallas interpret mode off GPU/TPU (interpret=None)


# ----------------------------------------------------------------- initialisers
def dt_bias_init(config):
    """``softplus^-1(dt)`` with ``dt`` log-uniform in ``[dt_min, dt_max]``, floored (mamba_ssm)."""
    lo, hi, floor = math.log(config.dt_min), math.log(config.dt_max), config.dt_init_floor

    def init(key, shape, dtype=jnp.float32):
        dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32) * (hi - lo) + lo)
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def a_log_init(config):
    """``log(-A)``: ``"s4d_real"`` -> A_n = n + 1 along the last axis (S4D-real, Mamba-1);
    ``"uniform"`` -> -A ~ U(a_init_range) i.i.d. (Mamba-2's per-head default)."""
    lo, hi = config.a_init_range

    def init(key, shape, dtype=jnp.float32):
        if config.a_init == "s4d_real":
            a = jnp.broadcast_to(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32), shape)
        else:
            a = jax.random.uniform(key, shape, jnp.float32, lo, hi)
        return jnp.log(a).astype(dtype)

    return init


def _uniform(bound):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def mixer_out_std(config):
    """Output-projection std: one residual branch per Mamba layer (mamba_ssm's prenorm rescale)."""
    return config.init_std / math.sqrt(config.n_layer) if config.scale_residual_init else config.init_std


def dense(config, features, axes, std, use_bias, name, kernel_init=None):
    """Projection with logical axes ``axes`` on the kernel (bias: the output axes)."""
    return Linear(features, axes, std=std, use_bias=use_bias, dtype=config.dtype,
                  param_dtype=config.param_dtype, kernel_init=kernel_init, name=name)


# ----------------------------------------------------------------- packed segments
def check_segment_ids(segment_ids, x, cache):
    """``segment_ids`` must be ``[B, T]`` integers and cannot be combined with a decode cache."""
    if segment_ids is None:
        return
    if cache is not None:
        raise ValueError("segment_ids (packed sequences) are not supported together with a decode "
                         "cache: the cache carries one sequence's state; pass segment_ids=None")
    if tuple(segment_ids.shape) != tuple(x.shape[:2]) or not jnp.issubdtype(segment_ids.dtype,
                                                                             jnp.integer):
        raise ValueError(f"segment_ids must be an integer [B, T] = {tuple(x.shape[:2])} array, got "
                         f"shape {tuple(segment_ids.shape)} and dtype {segment_ids.dtype}")


def check_cache(cache, expected):
    """``cache`` must be a dict holding exactly ``expected`` (``{name: (shape, layout)}``) shaped
    arrays: the layer's ``init_cache`` for this batch; else a ``ValueError`` naming the entry."""
    if cache is None:
        return
    if not isinstance(cache, dict) or set(cache) != set(expected):
        got = sorted(cache) if isinstance(cache, dict) else type(cache).__name__
        raise ValueError(f"cache must be this layer's decoding cache, a dict with keys "
                         f"{sorted(expected)} (from init_cache), got {got}")
    for name, (shape, layout) in expected.items():
        if tuple(getattr(cache[name], "shape", ())) != tuple(shape):
            raise ValueError(f"cache[{name!r}] must have shape {layout} = {tuple(shape)} for this input "
                             f"of batch {shape[0]} (build it with init_cache(model, batch_size="
                             f"{shape[0]})), got {tuple(getattr(cache[name], 'shape', ()))}")


# segment_index: shared with the models (jaxformers.layers.common)


# ----------------------------------------------------------------- causal conv
class CausalConv1d(nn.Module):
    """Depthwise causal conv: ``y_t = bias + sum_k kernel[k] * x_{t - (K-1) + k}``.

    ``kernel [K, C]`` (``kernel[k, c]`` = torch ``conv1d.weight[c, 0, k]``).  ``state``
    ``[B, K-1, C]`` holds the inputs before ``x`` (zeros at the start); returns
    ``(y [B, T, C], new state = the last K-1 inputs)``.  Computed in float32.
    ``segment_ids [B, T]`` (packed sequences): a tap reading an input of an earlier segment
    contributes 0; a given ``state`` belongs to the first segment only, and the new state holds
    the last segment's inputs only (zeros before its start), as running each segment alone.
    """
    width: int
    use_bias: bool
    axis_name: object = MLP
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x, state=None, segment_ids=None):
        k, ch = self.width, x.shape[-1]
        kernel = self.param("kernel", param_init(_uniform(1.0 / math.sqrt(k)), (None, self.axis_name)),
                            (k, ch), dtype_of(self.param_dtype))
        if state is None:
            state = jnp.zeros((x.shape[0], k - 1, ch), x.dtype)
        xp = jnp.concatenate([state.astype(jnp.float32), x.astype(jnp.float32)], axis=1)
        t = x.shape[1]
        w = kernel.astype(jnp.float32)
        taps = [xp[:, i:i + t] for i in range(k)]  # tap i reads x_{t - lag}, lag = K-1-i
        seg_p = None
        if segment_ids is not None:  # ... only from the same segment
            # the state's K-1 inputs precede the first segment: they take its index
            seg_p = jnp.pad(segment_index(segment_ids), ((0, 0), (k - 1, 0)), mode="edge")
            seg = seg_p[:, k - 1:]
            for i in range(k - 1):
                taps[i] = jnp.where((seg_p[:, i:i + t] == seg)[..., None], taps[i], 0.0)  # seg of t - lag
        y = sum(tap * w[i] for i, tap in enumerate(taps))
        if self.use_bias:
            bias = self.param("bias", param_init(nn.initializers.zeros, (self.axis_name,)), (ch,),
                              dtype_of(self.param_dtype))
            y = y + bias.astype(jnp.float32)
        new_state = xp[:, xp.shape[1] - (k - 1):]
        if seg_p is not None:  # the last segment's inputs only
            last = seg_p[:, seg_p.shape[1] - (k - 1):] == seg_p[:, -1:]
            new_state = jnp.where(last[..., None], new_state, 0.0)
        new_state = new_state.astype(state.dtype)
        return y.astype(dtype_of(self.dtype)), new_state


def conv_module(config, name, axis_name=MLP):
    """The mixers' ``CausalConv1d``: call as ``(x, state=None, segment_ids=None)``."""
    return CausalConv1d(config.d_conv, config.conv_bias, axis_name, config.dtype, config.param_dtype,
                        name=name)


# ----------------------------------------------------------------- Mamba-1 mixer
def init_mamba_cache(config, batch_size, dtype=None):
    """Empty cache of one Mamba-1 layer: conv inputs ``[B, d_conv-1, I]`` + SSM state ``[B, I, N]`` f32."""
    dtype = dtype_of(dtype or config.dtype)
    return {"conv": jnp.zeros((batch_size, config.d_conv - 1, config.d_inner), dtype),
            "ssm": jnp.zeros((batch_size, config.d_inner, config.d_state), jnp.float32)}


class MambaMixer(nn.Module):
    """Mamba-1 mixer with the attention mixer's calling convention (and ``init_cache`` hook)."""
    applies_attn_dropout = None  # no attention probabilities (see models.transformer.check_attn_dropout)
    config: object

    @staticmethod
    def init_cache(config, batch_size, max_len=None, dtype=None):
        """Empty decoding cache of one layer (constant size: ``max_len`` is not needed)."""
        del max_len
        return init_mamba_cache(config, batch_size, dtype)

    @nn.compact
    def __call__(self, u, positions=None, segment_ids=None, cache=None, cache_index=None):
        """u ``[B, T, D]`` -> (y ``[B, T, D]``, new cache or None).

        ``segment_ids [B, T]``: packed sequences (no cache).  ``positions`` and
        ``cache_index`` are unused (recurrent: the cache carries the state).
        """
        del positions, cache_index
        check_segment_ids(segment_ids, u, cache)
        c = self.config
        i_dim, n, r = c.d_inner, c.d_state, c.resolved_dt_rank
        check_cache(cache, {"conv": ((u.shape[0], c.d_conv - 1, i_dim), "[B, d_conv-1, d_inner]"),
                            "ssm": ((u.shape[0], i_dim, n), "[B, d_inner, d_state]")})
        cdt = dtype_of(c.dtype)
        xz = dense(c, (2, i_dim), (EMBED, None, MLP), c.init_std, c.proj_bias, "in_proj")(u)
        x = constrain(xz[..., 0, :], (BATCH, LENGTH, ACT_MLP))
        z = constrain(xz[..., 1, :], (BATCH, LENGTH, ACT_MLP))
        x, conv_state = conv_module(c, "conv")(x, None if cache is None else cache["conv"], segment_ids)
        x = jax.nn.silu(x)
        dbc = dense(c, r + 2 * n, (MLP, None), c.init_std, False, "x_proj")(x)
        dt_low, b_mat, c_mat = jnp.split(dbc, [r, r + n], axis=-1)
        dt_std = r ** -0.5 * c.dt_scale
        dt_kernel_init = (_uniform(dt_std) if c.dt_init == "random" else nn.initializers.constant(dt_std))
        dt = dense(c, i_dim, (None, MLP), dt_std, False, "dt_proj", kernel_init=dt_kernel_init)(dt_low)
        dt = constrain(dt, (BATCH, LENGTH, ACT_MLP))
        dt_bias = self.param("dt_bias", param_init(dt_bias_init(c), (MLP,)), (i_dim,),
                             dtype_of(c.param_dtype))
        a_log = self.param("A_log", param_init(a_log_init(c), (MLP, None)), (i_dim, n),
                           dtype_of(c.param_dtype))
        d_skip = self.param("D", param_init(nn.initializers.ones, (MLP,)), (i_dim,), dtype_of(c.param_dtype))
        a = -jnp.exp(a_log.astype(jnp.float32))
        d_skip = d_skip.astype(jnp.float32)
        dt_bias = dt_bias.astype(jnp.float32)

        scan, step = scan_functions("selective_scan", c.scan_impl)
        # on a mesh the scan runs per device on its rows and channels (XLA cannot split a kernel)
        # (the sequence whole on every device: a scan runs along it, whatever the rules say)
        ch, bl, st = (BATCH, None, ACT_MLP), (BATCH, None, None), (BATCH, ACT_MLP, None)
        axes = (ch, ch, (ACT_MLP, None), bl, bl, (ACT_MLP,), ch, (ACT_MLP,))
        args = (x, dt, a, b_mat, c_mat, d_skip, z, dt_bias)

        def run(x, dt, a, b, cm, d, z, db, more=None):  # more: segment_ids, or the cached state
            kw = dict(D=d, z=z, dt_bias=db, dt_softplus=True)
            if cache is None:
                return scan(x, dt, a, b, cm, segment_ids=more, **kw)
            return scan(x, dt, a, b, cm, initial_state=more, return_final_state=True, **kw)
        new_cache = None
        if cache is None:
            if segment_ids is None:
                y = kernel_map(run, axes, ch)(*args)
            else:
                y = kernel_map(run, axes + ((BATCH, None),), ch)(*args, segment_ids)
        elif u.shape[1] == 1:  # one decoding step: the recurrence
            y, h = step(cache["ssm"], x[:, 0], dt[:, 0], a, b_mat[:, 0], c_mat[:, 0], D=d_skip,
                        z=z[:, 0], dt_bias=dt_bias, dt_softplus=True)
            y = y[:, None]
            new_cache = {"conv": conv_state, "ssm": h.astype(cache["ssm"].dtype)}
        else:  # several tokens with a cache: the parallel scan from the cached state
            y, h = kernel_map(run, axes + (st,), (ch, st))(*args, cache["ssm"])
            new_cache = {"conv": conv_state, "ssm": h.astype(cache["ssm"].dtype)}
        y = constrain(y.astype(cdt), (BATCH, LENGTH, ACT_MLP))
        out = dense(c, c.d_model, (MLP, EMBED), mixer_out_std(c), c.proj_bias, "out_proj")(y)
        return out, new_cache


# ----------------------------------------------------------------- block
class MambaBlock(Block):
    """Pre-norm residual block ``x + Mixer(Norm(x))``: the shared :class:`Block` with the
    Mamba mixer and no MLP sub-layer (parameters ``norm``/``mixer``, as mamba_ssm names them).

    ``segment_ids [B, T]``: packed sequences (exact: nothing crosses a boundary); not
    together with a cache.  ``positions`` / ``cache_index`` are passed on (the mixers ignore
    them: recurrent, the cache carries the state).
    """
    mixer_class = MambaMixer
    mlp_class = None
    mixer_name = "mixer"
    mixer_norm_name = "norm"
