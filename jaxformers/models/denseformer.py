"""DenseFormer (Pagliardini et al., 2024): Depth-Weighted Averaging after blocks.

With ``X_0`` the embedding output and ``X_m = B_m(Y_{m-1})`` the output of block
``m`` (1-indexed), the input of the next block (or of the final norm) is

    Y_m = sum_{j <= m, j = m (mod k)} alpha[m, j] * X_j     if p | m      ("k x p" DenseFormer)
    Y_m = X_m                                               otherwise

with dilation ``k = dwa_dilation`` and period ``p = dwa_period``.  As in the paper
(Y_i = X_i if p does not divide i, output = Y_d) and its reference ``DWAModules``,
there is *no* forced DWA after the last block: when ``p`` does not divide
``n_layer`` the last DWA follows block ``p * floor(L / p)`` (e.g. the paper's 4x5
at depth 48).  The averages mix the raw block outputs ``X_j``, never earlier
averages.  ``alpha`` starts at 1 on ``j = m`` and 0 elsewhere: at init the model
computes exactly the baseline.

Other modes: ``dwa_mode="last_only"`` keeps a single DWA after the last block (the
paper's "connect to last" ablation; dilation applies, period is ignored);
``"none"`` has no DWA (for the skip-gains ablation alone).  ``skip_gains=True`` (a
field every config has; the shared ``Block`` implements it) adds learned scalar gains
(init 1) on both skip connections of every block:
``x = g_attn * x + Attn(Norm(x)); x = g_mlp * x + MLP(Norm(x))``.

Deviations from the authors' code (github.com/epfml/DenseFormer): with ``p > 1`` their
training script (``experiments/models/denseformer.py``, ``increase_T_every = p``, needs
``p | L``) mixes only ``X_0`` and the outputs of blocks ``p, 2p, ...`` with the dilation
counted in groups of ``p``; here (the paper's formula and their ``DWAModules`` package) every
``X_j`` of the dilation class is mixed (they agree for ``p = 1``).

Weight decay follows the authors' optimizer groups (``get_parameter_group_specs``, nanoGPT's:
``nn.Linear`` weights decayed; biases, norm weights and ``nn.Embedding`` tables not, the token
embedding tied with the head included): ``weight_decay_groups`` defaults to ``"nanogpt"``, so
the ``embedding`` table is not decayed (the untied head, their ``nn.Linear``, is), and
``nanogpt_weight_decay`` decays ``dwa_alpha`` (their DWA weights are ``nn.Linear``) and the skip
gains ``attn_skip_gain`` / ``mlp_skip_gain`` (``base_w_gains.py`` decays ``'gain' in pn``),
which the trainer's shape rule alone would not.  Block kernels are decayed, norm scales not, as
theirs.  ``weight_decay_groups="shape"`` gives the trainer's rule (a plain GPT's default; runs
saved before this field existed resume with it).
Their connect-to-last ``Mixer`` (``experiments/models/connect_to_last.py``) has no dilation
and starts the non-last weights at ``1e-4``; ``"last_only"`` starts them at 0 (init ==
baseline).

Parameters: ``dwa_alpha`` ``[R, n_layer + 1]`` (row r = the r-th DWA point, column
j = weight of ``X_j``; logical axes ``("layers", None)``: replicated under the
default rules; weight-decayed under ``nanogpt`` groups, the padding entries stay 0),
multiplied by a constant mask (dilation class and ``j <= m``) so unused entries
get no gradient.
Block parameters keep exactly the base model's layout (``blocks_i``, or scanned
``blocks`` with a leading ``layers`` axis), so baseline checkpoints load as is.

Memory (measured with ``compile().memory_analysis()`` on the gradient, temp bytes
in units of one ``[B, T, D]`` activation, toy blocks at L = 4 / 8 / 16):

* unrolled (default): each DWA *pulls* one fused weighted sum over references to
  the past outputs of its dilation class (the arrays the blocks already returned;
  nothing is copied or stacked), so the backward keeps only the ``X_j``: O(L)
  extra (13/25/49 vs baseline 10/18/34).  A preallocated stacked history updated
  with ``dynamic_update_slice`` measured *quadratic* here (39/122/378): XLA copies
  the buffer versions for the backward pass.
* ``scan_layers=True``: the carry holds one preallocated buffer
  ``A[k, Rc, B, T, D]``, the partial sums of the pending DWA outputs of each
  dilation class (``Rc`` = DWA points per class); each new ``X_m`` is *pushed*
  into its class slice, ``A[m % k] += alpha[:, m] * X_m`` (alpha indexed by the
  layer, dynamic class index).  That is linear in ``A``, so the scan saves only
  ``X_m`` per layer (27/51/99 vs baseline 17/29/53); carrying the history and
  pulling ``sum_j alpha[m, j] H[j]`` makes the scan save the whole history at every
  step (54/134/390).  ``remat`` wraps the block only, never the buffer.  The
  push touches every row of the class buffer at each layer (about 2x the DWA
  memory traffic of the unrolled pull) and rounds the partial sums to the compute
  dtype after each layer (the unrolled pull sums in float32 and rounds once).

DWA mixes over depth at each position only, so KV-cache decoding needs nothing
but the usual per-layer caches.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from ..config import TransformerConfig, _choice
from ..layers.common import dtype_of
from ..registry import register
from ..sharding import ACT_EMBED, BATCH, LAYERS, LENGTH, constrain, param_init
from .gpt import GPT_PRESETS, _GPT_STYLE
from .llama import LLAMA_PRESETS, _LLAMA_STYLE
from .transformer import Transformer, remat_block, scan_blocks

BASES = ("gpt", "llama")
DWA_MODES = ("all", "last_only", "none")


@dataclasses.dataclass(frozen=True)
class DenseFormerConfig(TransformerConfig):
    """TransformerConfig + DWA fields; ``base`` names the block style / presets it came from."""

    model: str = "denseformer"
    base: str = "gpt"
    dwa_dilation: int = 1  # k
    dwa_period: int = 1  # p
    dwa_mode: str = "all"
    weight_decay_groups: str = "nanogpt"  # the authors' groups (module docstring)

    #: the authors decay their DWA weights (``nn.Linear``) and skip gains (``'gain' in name``)
    nanogpt_weight_decay = ("dwa_alpha", "attn_skip_gain", "mlp_skip_gain")

    def validate(self) -> None:
        super().validate()  # model= was checked first (registry.check_config_class)
        _choice("base", self.base, BASES)
        # base is a label of where the block style came from, not a switch: base="llama" over a
        # GPT preset's fields would build GPT blocks labelled llama (refused when the norm and the
        # MLP are both the other base's)
        style = {"gpt": ("layernorm", "gelu"), "llama": ("rmsnorm", "swiglu")}
        other = "llama" if self.base == "gpt" else "gpt"
        if (self.norm, self.mlp) == style[other]:
            raise ValueError(f"base={self.base!r} labels a config whose blocks are {other}-style (norm="
                             f"{self.norm!r}, mlp={self.mlp!r}): base does not change the blocks; use the "
                             f"preset {'llama-' if self.base == 'llama' else ''}<name> (e.g. "
                             f"get_config('denseformer', '{'llama-' if self.base == 'llama' else ''}tiny')) or "
                             f"DenseFormerConfig.from_base({self.base!r}, preset)")
        _choice("dwa_mode", self.dwa_mode, DWA_MODES)
        # (a range test, not a list of [1, n_layer]: n_layer=10**29 was an OverflowError)
        allowed = f"[1, {self.n_layer}]"
        why = {"dwa_period": "a period > n_layer would add no DWA at all",
               "dwa_dilation": "a dilation > n_layer would only rescale X_m"}
        for name in ("dwa_dilation", "dwa_period"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.n_layer:
                raise ValueError(f"{name}={value!r} is not allowed for n_layer={self.n_layer}: choose "
                                 f"an int in [1, n_layer] = {allowed} ({why[name]})")

    @classmethod
    def from_base(cls, base: str = "gpt", preset: str = "tiny", **overrides) -> "DenseFormerConfig":
        """DenseFormer config with every field of ``base``'s registered ``preset``, plus overrides
        (``weight_decay_groups`` keeps the DenseFormer default, ``"nanogpt"``, unless overridden)."""
        from ..config import check_fields
        from ..registry import get_config
        _choice("base", base, BASES)
        check_fields(cls, overrides)
        if overrides.get("model", "denseformer") != "denseformer":
            raise ValueError(f"model={overrides['model']!r} is not allowed: from_base builds a DenseFormerConfig "
                             "(model='denseformer'); build another model with get_config(name, preset)")
        values = get_config(base, preset).to_dict()
        values.pop("weight_decay_groups", None)
        values.update(model="denseformer", base=base)
        values.update(overrides)
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class DWAPlan:
    """Static bookkeeping: where the DWAs are and how the scan buffer is laid out."""

    n_layer: int
    dilation: int
    points: tuple  # blocks m (1-indexed) followed by a DWA, increasing

    @staticmethod
    def from_config(c) -> "DWAPlan":
        if c.dwa_mode == "all":
            points = tuple(range(c.dwa_period, c.n_layer + 1, c.dwa_period))
        elif c.dwa_mode == "last_only":
            points = (c.n_layer,)
        else:
            points = ()
        return DWAPlan(c.n_layer, c.dwa_dilation, points)

    @property
    def n_rows(self) -> int:
        return len(self.points)

    def slots(self):
        """(class, position in class) of every DWA row (rows of a class in depth order), counts."""
        counts = [0] * self.dilation
        slots = []
        for m in self.points:
            slots.append((m % self.dilation, counts[m % self.dilation]))
            counts[m % self.dilation] += 1
        return slots, counts

    @property
    def class_rows(self) -> int:  # Rc
        return max(self.slots()[1]) if self.points else 0

    def mask(self) -> np.ndarray:
        """``[R, L+1]``: 1 where ``alpha[r, j]`` is used (j <= m_r and j = m_r mod k)."""
        j = np.arange(self.n_layer + 1)
        rows = [(j <= m) & (j % self.dilation == m % self.dilation) for m in self.points]
        return np.asarray(rows, np.float32).reshape(self.n_rows, self.n_layer + 1)

    def init(self) -> np.ndarray:
        out = np.zeros((self.n_rows, self.n_layer + 1), np.float32)
        out[np.arange(self.n_rows), list(self.points)] = 1.0
        return out

    def gather(self):
        """Row index ``[k, Rc]`` of each buffer slot (padding -> 0) and the slot validity."""
        slots, _ = self.slots()
        idx = np.zeros((self.dilation, self.class_rows), np.int32)
        valid = np.zeros((self.dilation, self.class_rows), np.float32)
        for r, (cls, pos) in enumerate(slots):
            idx[cls, pos], valid[cls, pos] = r, 1.0
        return idx, valid


_BUFFER_AXES = (None, None, BATCH, LENGTH, ACT_EMBED)


def _push(rows, a, x):
    """``rows[R', B, T, D] + a[R'] * x[B, T, D]``, accumulated in float32."""
    upd = a.astype(jnp.float32)[:, None, None, None] * x.astype(jnp.float32)[None]
    return (rows.astype(jnp.float32) + upd).astype(rows.dtype)


def _scan_body(block, carry, positions, segment_ids, layer_cache, cache_index, m, alpha_kc,
               is_point, point_pos):
    """One scanned layer: run block m, push X_m into its class buffer, emit Y_m."""
    x, buf = carry
    x, new_cache = block(x, positions, segment_ids, layer_cache, cache_index)
    cls = m % buf.shape[0]
    a = jax.lax.dynamic_index_in_dim(jax.lax.dynamic_index_in_dim(alpha_kc, cls, 0, False), m, 1, False)
    rows = _push(jax.lax.dynamic_index_in_dim(buf, cls, 0, False), a, x)
    buf = constrain(jax.lax.dynamic_update_index_in_dim(buf, rows, cls, 0), _BUFFER_AXES)
    y = jax.lax.dynamic_index_in_dim(rows, point_pos[m], 0, False)
    x = jnp.where(is_point[m], y, x)
    return (constrain(x, (BATCH, LENGTH, ACT_EMBED)), buf), new_cache


class DenseFormer(Transformer):
    """Transformer whose blocks are chained through depth-weighted averages."""

    def setup(self):
        super().setup()
        self.plan = DWAPlan.from_config(self.config)
        if self.plan.n_rows:
            init = self.plan.init()
            self.dwa_alpha = self.param(
                "dwa_alpha", param_init(lambda key, shape, dtype: jnp.asarray(init, dtype), (LAYERS, None)),
                init.shape, dtype_of(self.config.param_dtype))

    def make_blocks(self):
        c = self.config
        if not c.scan_layers or not DWAPlan.from_config(c).n_rows:
            return super().make_blocks()
        # remat the block only: the DWA buffer must not be saved per layer
        return remat_block(self.scanned_block_class(), c, scanned=True)(c)  # scanned in _run_scanned (function-form nn.scan keeps the base param layout)

    def masked_alpha(self):
        """``alpha * mask`` ``[R, L+1]`` float32."""
        return self.dwa_alpha.astype(jnp.float32) * jnp.asarray(self.plan.mask())

    def run_blocks(self, x, positions, segment_ids, layer_caches, cache_index):
        if not self.plan.n_rows:
            return super().run_blocks(x, positions, segment_ids, layer_caches, cache_index)
        if self.config.scan_layers:
            return self._run_scanned(x, positions, segment_ids, layer_caches, cache_index)
        return self._run_unrolled(x, positions, segment_ids, layer_caches, cache_index)

    def _run_unrolled(self, x, positions, segment_ids, layer_caches, cache_index):
        """Pull: one fused weighted sum per DWA over references to its class's past outputs."""
        plan = self.plan
        alpha = self.masked_alpha()
        outputs = [x]  # X_0 .. X_m: the arrays the blocks returned (references, never copied)
        new_caches = []
        for i, block in enumerate(self.blocks):
            m = i + 1
            layer_cache = None if layer_caches is None else layer_caches[i]
            x, new_cache = block(x, positions, segment_ids, layer_cache, cache_index)
            new_caches.append(new_cache)
            outputs.append(x)
            if m in plan.points:
                r = plan.points.index(m)
                acc = None
                for j in range(m % plan.dilation, m + 1, plan.dilation):  # its dilation class only
                    term = alpha[r, j] * outputs[j].astype(jnp.float32)
                    acc = term if acc is None else acc + term
                x = constrain(acc.astype(x.dtype), (BATCH, LENGTH, ACT_EMBED))
        return x, (None if layer_caches is None else new_caches)

    def _run_scanned(self, x, positions, segment_ids, layer_caches, cache_index):
        """Push: the carry's buffer ``A[k, Rc, B, T, D]`` accumulates the pending DWA outputs."""
        c, plan = self.config, self.plan
        idx, valid = plan.gather()
        alpha_kc = self.masked_alpha()[jnp.asarray(idx)] * jnp.asarray(valid)[..., None]  # [k, Rc, L+1]
        buf = jnp.zeros((plan.dilation, plan.class_rows) + x.shape, x.dtype)
        buf = constrain(buf.at[0].set(_push(buf[0], alpha_kc[0, :, 0], x)), _BUFFER_AXES)  # X_0: class 0
        is_point = np.zeros(c.n_layer + 1, bool)
        point_pos = np.zeros(c.n_layer + 1, np.int32)
        slots, _ = plan.slots()
        for m, (_, pos) in zip(plan.points, slots):
            is_point[m], point_pos[m] = True, pos
        scanned = scan_blocks(_scan_body, c, (nn.broadcast, nn.broadcast, 0, nn.broadcast, 0, nn.broadcast,
                                              nn.broadcast, nn.broadcast))
        ms = jnp.arange(1, c.n_layer + 1, dtype=jnp.int32)
        (x, _), new_caches = scanned(self.blocks, (x, buf), positions, segment_ids, layer_caches,
                                     cache_index, ms, alpha_kc, jnp.asarray(is_point),
                                     jnp.asarray(point_pos))
        return x, new_caches


def dwa_weights(config, params):
    """Learned masked ``alpha`` ``[R, L+1]`` (numpy) and the block m after which each row acts
    (``dwa_mode="none"``: no DWA, ``[0, L+1]`` and ``[]``).  ``params``: the model's params tree,
    boxed as ``module.init`` returns them or not; ``ValueError`` when it has no ``dwa_alpha`` of
    the config's shape."""
    plan = DWAPlan.from_config(config)
    if not plan.n_rows:  # no DWA point: the model has no dwa_alpha parameter
        return np.zeros((0, config.n_layer + 1), np.float32), []
    alpha = nn.unbox(params.get("dwa_alpha") if hasattr(params, "get") else None)
    if alpha is None or tuple(np.shape(alpha)) != (plan.n_rows, config.n_layer + 1):
        raise ValueError(f"params must be the DenseFormer's params tree, with dwa_alpha "
                         f"[{plan.n_rows}, {config.n_layer + 1}] for this config, got "
                         f"{None if alpha is None else tuple(np.shape(alpha))} (keys: "
                         f"{sorted(params)[:8] if hasattr(params, 'keys') else type(params).__name__})")
    alpha = np.asarray(alpha, np.float32) * plan.mask()
    return alpha, list(plan.points)


_DWA_DEFAULTS = dict(dwa_dilation=1, dwa_period=1, dwa_mode="all", skip_gains=False)
DENSEFORMER_PRESETS = {}
for _name, _values in GPT_PRESETS.items():
    DENSEFORMER_PRESETS[_name] = {**_GPT_STYLE, **_values, "base": "gpt", **_DWA_DEFAULTS}
for _name, _values in LLAMA_PRESETS.items():
    DENSEFORMER_PRESETS[f"llama-{_name}"] = {**_LLAMA_STYLE, **_values, "base": "llama", **_DWA_DEFAULTS}

register("denseformer", DenseFormerConfig, DenseFormer, DENSEFORMER_PRESETS,
         description="DenseFormer: depth-weighted averages of past block outputs (k x p DWA)")
