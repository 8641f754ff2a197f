"""CoTFormer (Mohtashami, Pagliardini & Jaggi, 2023/2024): repeated blocks whose repeats
attend to the tokens of all earlier repeats, and its budget-adaptive version.

Semantics follow the authors' code (github.com/epfml/CoTFormer, ``models/
cotformer_full_depth*.py``, ``but_full_depth.py`` and ``adaptive_cotformer_mod_efficient_
sigmoid_crw_lnmid_de_random_factor_single_final.py``):

* Layers are split into ``n_layer_begin`` / mid / ``n_layer_end`` blocks.  The mid group
  (shared weights) runs ``n_repeat`` times; the end group and the final norm read the
  output of the last repeat; the loss is on that output.
* ``cotformer``: every mid block keeps the keys/values of all earlier repeats (per block,
  as the authors' in-place ``all_keys`` buffers).  At repeat ``r`` token ``i`` attends to
  tokens ``j <= i`` of repeats ``1..r`` (its own repeat included; causal by token index, as
  the authors' mask and every repeat-1 / baseline attention, whatever ``positions`` are
  given); earlier repeats are never recomputed.  Rotary positions are the token positions
  in every repeat.
  Equivalently: each token repeated ``r`` times and causal attention over that interleaved
  sequence (``tests/test_cotformer.py`` checks both views).
* ``but`` (block universal transformer): the same repeats, each attending to its own
  repeat only (the paper's baseline).
* LN-CoTFormer (``ln_mid``): a norm after the mid group at every repeat; optional depth
  embedding added to the mid group's input at repeat ``r`` (1-based):
  ``"linear_learned"``: ``e * (n_repeat - r)`` (one learned vector; zero at the last
  repeat), ``"learned"``: ``E[n_repeat - r]``; the authors' best variant reserves
  ``n_layer_begin=2, n_layer_end=1``.
* ``adaptive_cotformer`` (Mixture of Repeats; LN-CoTFormer + routers): after repeat
  ``r < n_repeat`` a router ``w_r: d -> 1`` (no bias) scores the tokens still active,
  the top ``int(c_r * n_active)`` continue, with weight ``s = sigmoid(score)``; their next
  repeat's output (after ``ln_mid``) is mixed ``x = x_in * (1 - s) + x_repeat * s``
  (``x_in``: before the depth embedding).  Tokens that stop keep their last output.  The
  keys of a token exist only for the repeats it ran; attention in a repeat covers the
  active tokens and every cached key of a token ``<=`` the query's.  Capacities come
  from cumulative *length factors* ``f_2 >= ... >= f_R`` (fraction of the sequence that
  gets repeat ``r``; ``c_r = f_r / f_{r-1}``): in training (a ``dropout`` rng present,
  ``random_capacity``) sampled per step as ``sort_desc(min(1, 1.05 * U[0,1)^{R-1}))``
  (the authors' default ``depth_random_method``); at inference ``length_factors`` (the
  budget; ``None`` = all tokens, every repeat).

Deviations (documented, deliberate):

* Training with sampled capacities keeps static shapes: every token runs every repeat and
  inactive ones are masked out (their keys are invisible, their state is kept).  The
  results equal the authors' token-gathering forward; the compute is not saved in training.
  Inference with a fixed budget gathers the active tokens (the compute really shrinks).
* The router's top-k runs over the whole sequence (as the authors'), so it is not causal:
  the adaptive model has no KV-cache decoding (``cotformer`` and ``but`` do).
* The mid group's attention goes through
  :func:`jaxformers.ops.attention.position_causal_attention`: the ``[T, r*T]`` mask is only
  built on the ``xla`` path; the kernel paths sort the keys by position and run a plain
  causal kernel (see its docstring for the extra query rows this costs).
* Block style is the project's GPT block (pre-LN, GELU 4x MLP, no bias, RoPE, tied
  embeddings) -- the authors' ``base`` model; the authors' BUT uses a separate ``q``
  projection, which is the same parametrisation as ours.
* The adaptive model has ``n_repeat - 1`` routers; the authors allocate ``n_repeat``
  (``transformer.mod``, the last one never used), so their parameter count is ``d`` higher.
* Weight decay follows the authors' optimizer groups (``get_parameter_group_specs``,
  nanoGPT's: ``nn.Linear`` weights decayed; biases, norm weights and ``nn.Embedding`` tables
  not): ``weight_decay_groups`` defaults to ``"nanogpt"``, so the token ``embedding`` (tied with the head)
  and the ``depth_embedding`` table (their ``nn.Embedding``) are not decayed; block kernels and
  routers (``nn.Linear``) are, norm scales (``ln_mid`` included) are not.
  ``weight_decay_groups="shape"`` gives the trainer's shape rule (:mod:`jaxformers.training.optim`;
  runs saved before this field existed resume with it).

FLOPs: a mid block's weights count once per repeat a token runs (``param_uses``); the
attention term counts, per mid block and repeat, the keys of all earlier repeats
(``sum_r r`` for ``cotformer``, ``n_repeat`` for ``but``, the routed fractions for the
adaptive model; :func:`repeat_fractions`).  ``flops_per_token / 6`` is the forward MACs
per token.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name
import numpy as np

from ..config import TransformerConfig, _boolean, _choice
from ..layers import Block, make_norm
from ..layers.attention import init_attention_cache, project_qkv, write_kv_cache
from ..layers.common import dtype_of, output_std
from ..layers.linear import Linear
from ..ops.attention import attention, position_causal_attention
from ..registry import register
from ..utils import is_int
from ..sharding import (ACT_HEADS, BATCH, EMBED, HEAD_DIM, HEADS, LENGTH,
                        constrain, param_init)
from .gpt import GPT_PRESETS, _GPT_STYLE
from .transformer import Transformer

DEPTH_EMBEDDINGS = (None, "linear_learned", "learned")
NEVER = 2 ** 30  # key position of a key no query may see (inactive tokens)


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class CoTFormerConfig(TransformerConfig):
    """TransformerConfig + repeats.  ``model`` picks the variant: ``cotformer`` (keys of all
    earlier repeats), ``but`` (none), ``adaptive_cotformer`` (routers between repeats)."""

    model: str = "cotformer"
    n_repeat: int = 2
    n_layer_begin: int = 0
    n_layer_end: int = 0
    ln_mid: bool = False
    depth_embedding: Optional[str] = None
    # adaptive only
    length_factors: Optional[Tuple[float, ...]] = None  # inference budget: f_2..f_R
    random_capacity: bool = True  # sample the length factors per training step
    router_mix: bool = True  # x_in * (1 - s) + x_repeat * s (False: no mixing)
    weight_decay_groups: str = "nanogpt"  # the authors' groups (module docstring)

    #: the tables the authors build as ``nn.Embedding`` (not decayed under ``nanogpt`` groups):
    #: the tied token embedding and the depth embedding
    nanogpt_no_weight_decay = ("embedding", "depth_embedding")

    @property
    def n_mid(self) -> int:
        return self.n_layer - self.n_layer_begin - self.n_layer_end

    @property
    def cross_repeat(self) -> bool:
        return self.model != "but"

    @property
    def adaptive(self) -> bool:
        return self.model == "adaptive_cotformer"

    def is_mid(self, layer: int) -> bool:
        return self.n_layer_begin <= layer < self.n_layer - self.n_layer_end

    def validate(self) -> None:
        super().validate()  # model= was checked first (registry.check_config_class)
        for name in ("n_repeat",):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("n_layer_begin", "n_layer_end"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.n_mid < 1:
            raise ValueError(f"n_layer_begin + n_layer_end ({self.n_layer_begin} + {self.n_layer_end}) "
                             f"must leave at least one mid layer of n_layer={self.n_layer}")
        _choice("depth_embedding", self.depth_embedding, DEPTH_EMBEDDINGS)
        for name in ("ln_mid", "random_capacity", "router_mix"):
            _boolean(self, name)
        if self.length_factors is not None and not self.adaptive:
            raise ValueError(f"length_factors (the inference compute budget) applies to "
                             f"model='adaptive_cotformer' only, got model={self.model!r}: leave it None")
        for name in ("random_capacity", "router_mix"):  # the routers' options: not silently ignored
            if not getattr(self, name) and not self.adaptive:
                raise ValueError(f"{name}=False applies to model='adaptive_cotformer' only (its routers), "
                                 f"got model={self.model!r}: leave it True")
        if self.scan_layers:
            raise ValueError("scan_layers=True is not supported by the CoTFormer family (the mid "
                             "group is applied several times): use scan_layers=False")
        if self.window is not None:
            raise ValueError("window is not supported by the CoTFormer family")
        if self.length_factors is not None:
            lf = self.length_factors
            if isinstance(lf, (str, bytes)) or not hasattr(lf, "__iter__") or any(
                    isinstance(x, (bool, str, bytes)) or not isinstance(x, (int, float, np.integer, np.floating))
                    for x in lf):
                raise ValueError(f"length_factors must be n_repeat - 1 = {self.n_repeat - 1} numbers in [0, 1] "
                                 f"(a list or tuple), got {lf!r}")
            f = tuple(float(x) for x in lf)
            object.__setattr__(self, "length_factors", f)
            if len(f) != self.n_repeat - 1 or any(not 0.0 <= x <= 1.0 for x in f) or \
                    any(b > a for a, b in zip(f, f[1:])):
                raise ValueError(f"length_factors must be n_repeat - 1 = {self.n_repeat - 1} non-increasing "
                                 f"fractions in [0, 1], got {self.length_factors!r}")

    # ------------------------------------------------------------------ FLOPs
    def param_uses(self, path):
        top = path[0]
        if top.startswith("blocks_") and self.is_mid(int(top.split("_")[1])):
            return _fraction_stats(self.model, self.n_repeat, self.length_factors, self._seq)[0]
        if top.startswith("routers_"):
            return _fraction_stats(self.model, self.n_repeat, self.length_factors,
                                   self._seq)[2][int(top.split("_")[1])]
        if top == "depth_embedding":
            return 0.0
        return super().param_uses(path)

    @property
    def _seq(self):
        return self.max_seq_len

    def attention_flops_per_token(self, seq_len: int) -> float:
        per_layer = 12.0 * self.n_head * self.dim_head * seq_len
        mid = _fraction_stats(self.model, self.n_repeat, self.length_factors, seq_len)[1]
        return per_layer * (self.n_layer_begin + self.n_layer_end + self.n_mid * mid)

    def flops_per_token(self, seq_len: int, params=None) -> float:
        # routed fractions depend on the sequence length (int(c * n_active)): count at seq_len
        return super(CoTFormerConfig, dataclasses.replace(self, max_seq_len=seq_len)
                     if seq_len != self.max_seq_len else self).flops_per_token(seq_len, params)

    @property
    def n_attention_layers(self) -> int:
        return self.n_layer_begin + self.n_layer_end + self.n_mid * self.n_repeat

    def average_depth(self, seq_len: Optional[int] = None) -> float:
        """Blocks a token passes through (the authors' ``average_depth``)."""
        uses = _fraction_stats(self.model, self.n_repeat, self.length_factors, seq_len or self.max_seq_len)[0]
        return self.n_layer_begin + self.n_layer_end + self.n_mid * uses


def routed_counts(length_factors, n_repeat: int, seq_len: int):
    """Tokens that run each repeat (``[T, n_2, ..., n_R]``) for a budget, with the authors'
    rounding: ``c_r = f_r / f_{r-1}`` (0 after a 0), ``n_r = int(c_r * n_{r-1})``.
    ``ValueError`` unless ``n_repeat`` / ``seq_len`` are ints >= 1 and ``length_factors`` is None
    or ``n_repeat - 1`` non-increasing fractions in [0, 1] (the config's rule)."""
    for name, v in (("n_repeat", n_repeat), ("seq_len", seq_len)):
        if not is_int(v) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if length_factors is not None:
        lf = length_factors
        if isinstance(lf, (str, bytes)) or not hasattr(lf, "__iter__") or any(
                isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating))
                for x in lf) or len(lf) != n_repeat - 1 or any(not 0.0 <= x <= 1.0 for x in lf) or \
                any(b > a for a, b in zip(lf, lf[1:])):
            raise ValueError(f"length_factors must be None or n_repeat - 1 = {n_repeat - 1} non-increasing "
                             f"fractions in [0, 1], got {length_factors!r}")
    counts, prev, n = [int(seq_len)], 1.0, int(seq_len)
    for f in (length_factors if length_factors is not None else (1.0,) * (n_repeat - 1)):
        cap = f / prev if prev != 0 else 0.0
        prev = f
        n = int(cap * n)
        counts.append(n)
    return counts


def sample_length_factors(rng, n_repeat: int):
    """The authors' training sampler: ``sort_desc(min(1, 1.05 * U))`` for repeats 2..R."""
    u = jax.random.uniform(rng, (n_repeat - 1,))
    return -jnp.sort(-jnp.minimum(u * 1.05, 1.0))


@functools.lru_cache(maxsize=256)
def _fraction_stats(model, n_repeat, length_factors, seq_len):
    """(mid-block uses per token, mid attention factor, router uses) for FLOP counts."""
    def stats(fr):
        cum = np.cumsum(fr)
        attn = float(np.sum(fr * cum)) if model != "but" else float(np.sum(fr))
        return float(np.sum(fr)), attn, [float(x) for x in fr[:-1]]
    if model != "adaptive_cotformer" or length_factors is not None:
        counts = routed_counts(length_factors if model == "adaptive_cotformer" else None, n_repeat, seq_len)
        return stats(np.asarray(counts, np.float64) / seq_len)
    # adaptive without a budget: the expectation under the training sampler (fixed Monte Carlo)
    u = np.random.default_rng(0).random((4096, n_repeat - 1))
    f = -np.sort(-np.minimum(u * 1.05, 1.0), axis=1)
    rows = [stats(np.asarray(routed_counts(tuple(fi), n_repeat, seq_len), np.float64) / seq_len) for fi in f]
    return (float(np.mean([r[0] for r in rows])), float(np.mean([r[1] for r in rows])),
            [float(x) for x in np.mean([r[2] for r in rows], axis=0)] if n_repeat > 1 else [])


# ----------------------------------------------------------------------------- mixer
class RepeatAttention(nn.Module):
    """The mid blocks' attention (parameters laid out as the baseline's ``Attention``).

    ``cache`` carries the repeat context:

    * full forward (``cache_index is None``): ``None`` -> plain causal attention; else
      ``{"k", "v", "pos", "seg"}`` of earlier repeats (or None values: none yet; ``"pos"``:
      the keys' token indices), ``"index"`` (``[B, T]`` token index of each query, the causal
      order; None: ``positions``) and ``"valid"`` (``[B, T]`` bool, or None: all tokens
      active).  Returns the context with this repeat's keys appended.
    * decoding: ``{"k", "v"}`` (``[B, S, Hkv, Dh]``, this repeat's cache) and ``"k_prev"``,
      ``"v_prev"``, ``"pos_prev"`` (earlier repeats' caches, flattened: the cache slot of each
      key).  Causal by cache slot (the query at ``cache_index + t``), as the baseline's
      ``q_offset``: ``positions`` only set the rotary angles.  Returns ``{"k", "v"}``.
    """
    applies_attn_dropout = False  # see models.transformer.check_attn_dropout
    config: object

    @staticmethod
    def init_cache(config, batch_size, max_len, dtype=None):
        one = init_attention_cache(config, batch_size, max_len, dtype)
        return {name: jnp.stack([x] * config.n_repeat, axis=1) for name, x in one.items()}

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, cache=None, cache_index=None):
        c = self.config

        q, k, v = project_qkv(c, x, positions)
        b, t = x.shape[:2]
        new = None
        if cache is None:
            o = attention(q, k, v, causal=True, segment_ids=segment_ids, implementation=c.attention_impl)
        elif cache_index is not None:  # decoding: write this repeat's keys, read repeats 1..r
            new = write_kv_cache(cache, k, v, cache_index, segment_ids)
            k_cur, v_cur = new["k"], new["v"]
            s = k_cur.shape[1]
            k_all = jnp.concatenate([cache["k_prev"], k_cur], axis=1).astype(q.dtype)
            v_all = jnp.concatenate([cache["v_prev"], v_cur], axis=1).astype(q.dtype)
            pos_all = jnp.concatenate([cache["pos_prev"], jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32),
                                                                            (b, s))], axis=1)
            # causal by cache slot, as the baseline's q_offset: keys sit at their slots, whatever
            # ``positions`` (the rotary angles) the caller gave
            q_slot = cache_index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            o = position_causal_attention(q, k_all, v_all, q_pos=q_slot, kv_pos=pos_all,
                                          implementation="xla")
        else:  # full forward with the keys of earlier repeats
            valid = cache.get("valid")
            order = positions if cache.get("index") is None else cache["index"]  # causal order
            kpos = order if valid is None else jnp.where(valid, order, NEVER)
            seg = None if segment_ids is None else segment_ids
            if cache.get("k") is None:
                k_all, v_all, pos_all, seg_all, n_prev = k, v, kpos, seg, 0
            else:
                n_prev = cache["k"].shape[1]
                k_all = jnp.concatenate([cache["k"], k], axis=1)
                v_all = jnp.concatenate([cache["v"], v], axis=1)
                pos_all = jnp.concatenate([cache["pos"], kpos], axis=1)
                seg_all = None if seg is None else jnp.concatenate([cache["seg"], seg], axis=1)
            if n_prev == 0 and valid is None:
                o = attention(q, k, v, causal=True, segment_ids=seg, implementation=c.attention_impl)
            else:
                key_index = jnp.broadcast_to(n_prev + jnp.arange(t, dtype=jnp.int32), (b, t))
                o = position_causal_attention(
                    q, k_all, v_all, q_pos=order, kv_pos=pos_all, q_key_index=key_index,
                    segment_ids=None if seg is None else (seg, seg_all), implementation=c.attention_impl)
            new = {"k": k_all, "v": v_all, "pos": pos_all, "seg": seg_all}
        # named like the baseline's, for remat="save_attention_out"
        o = checkpoint_name(constrain(o, (BATCH, LENGTH, ACT_HEADS, None)), "attention_out")
        y = Linear(c.d_model, (HEADS, HEAD_DIM, EMBED), in_axes=2, std=output_std(c), dtype=c.dtype,
                   param_dtype=c.param_dtype, name="o")(o)
        return y, new


MidBlock = Block.using(mixer=RepeatAttention, name="CoTMidBlock")


# ----------------------------------------------------------------------------- model
def _take(x, idx):
    """``x[b, idx[b]]`` for x ``[B, T, ...]`` and idx ``[B, n]``."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


class CoTFormer(Transformer):
    """begin blocks -> mid blocks x ``n_repeat`` (repeat context per mid block) -> end blocks."""

    def layer_classes(self):
        c = self.config
        return [MidBlock if c.is_mid(i) else Block for i in range(c.n_layer)]

    def check_generate(self):
        """Hook of :func:`jaxformers.generate`: refuse, before anything is traced, a model that
        has no KV-cache decoding (the adaptive router ranks the tokens of the whole sequence)."""
        if self.config.adaptive:
            raise ValueError(f"model {self.config.model!r} cannot generate: it has no KV-cache decoding "
                             "(its router picks the top tokens of the whole sequence, which is not causal); "
                             "evaluate it instead, or generate with a 'cotformer' model")

    def setup(self):
        super().setup()
        c = self.config
        if c.ln_mid:
            self.mid_norm = make_norm(c)
        if c.depth_embedding is not None:
            rows = 1 if c.depth_embedding == "linear_learned" else c.n_repeat
            self.depth_embedding = self.param(
                "depth_embedding", param_init(nn.initializers.normal(c.init_std), (None, EMBED)),
                (rows, c.d_model), dtype_of(c.param_dtype))
        if c.adaptive:
            self.routers = [Linear(1, (EMBED, None), std=c.init_std, dtype="float32",
                                   param_dtype=c.param_dtype) for _ in range(c.n_repeat - 1)]

    # ------------------------------------------------------------------ pieces
    def _depth(self, x, r):
        c = self.config
        if c.depth_embedding is None:
            return x
        if c.depth_embedding == "linear_learned":
            e = self.depth_embedding[0] * (c.n_repeat - r)
        else:
            e = self.depth_embedding[c.n_repeat - r]
        return x + e.astype(x.dtype)

    def _length_factors(self):
        """Python floats (static budget: tokens gathered) or a traced array (training)."""
        c = self.config
        if c.adaptive and c.random_capacity and self.has_rng("dropout") and c.n_repeat > 1:
            return sample_length_factors(self.make_rng("dropout"), c.n_repeat)
        if c.length_factors is not None:
            return tuple(float(f) for f in c.length_factors)
        return (1.0,) * (c.n_repeat - 1)

    # ------------------------------------------------------------------ forward
    def run_blocks(self, x, positions, segment_ids, layer_caches, cache_index):
        c = self.config
        new_caches = [None] * c.n_layer
        begin = range(c.n_layer_begin)
        mid = list(range(c.n_layer_begin, c.n_layer - c.n_layer_end))
        end = range(c.n_layer - c.n_layer_end, c.n_layer)
        for i in begin:
            x, new_caches[i] = self.blocks[i](x, positions, segment_ids,
                                              None if layer_caches is None else layer_caches[i], cache_index)
        if layer_caches is None:
            x = self._mid_forward(x, positions, segment_ids, mid)
        else:
            x = self._mid_decode(x, positions, segment_ids, layer_caches, cache_index, mid, new_caches)
        for i in end:
            x, new_caches[i] = self.blocks[i](x, positions, segment_ids,
                                              None if layer_caches is None else layer_caches[i], cache_index)
        return x, (None if layer_caches is None else new_caches)

    def _mid_decode(self, x, positions, segment_ids, layer_caches, cache_index, mid, new_caches):
        c = self.config
        if segment_ids is not None:  # as every KV-cache mixer (write_kv_cache): never silently dropped
            raise ValueError("segment_ids are not supported together with a KV cache")
        if c.adaptive:
            raise NotImplementedError("adaptive_cotformer has no KV-cache decoding: its router picks the "
                                      "top tokens of the whole sequence (not causal)")
        caches = {i: layer_caches[i] for i in mid}
        b = x.shape[0]
        for r in range(1, c.n_repeat + 1):
            x = self._depth(x, r)
            for i in mid:
                full = caches[i]
                s = full["k"].shape[2]
                n_prev = r - 1 if c.cross_repeat else 0
                prev = lambda a: a[:, r - 1 - n_prev:r - 1].reshape((b, n_prev * s) + a.shape[3:])  # noqa: E731
                ctx = {"k": full["k"][:, r - 1], "v": full["v"][:, r - 1], "k_prev": prev(full["k"]),
                       "v_prev": prev(full["v"]),
                       "pos_prev": jnp.broadcast_to(jnp.tile(jnp.arange(s, dtype=jnp.int32), n_prev),
                                                    (b, n_prev * s))}
                x, upd = self.blocks[i](x, positions, None, ctx, cache_index)
                caches[i] = {n: full[n].at[:, r - 1].set(upd[n]) for n in ("k", "v")}
            if c.ln_mid:
                x = self.mid_norm(x).astype(x.dtype)  # the stream keeps its dtype
        for i in mid:
            new_caches[i] = caches[i]
        return x

    def _mid_forward(self, x, positions, segment_ids, mid):
        c = self.config
        b, t = x.shape[:2]
        factors = self._length_factors()
        static = isinstance(factors, tuple)
        if c.adaptive and self.is_initializing():  # every router exists whatever the budget
            for router in self.routers:
                router(x.astype(jnp.float32))
        ctx = {i: ({"k": None, "v": None, "pos": None, "seg": None} if c.cross_repeat else None)
               for i in mid}
        state = x                                   # every token's current output [B, T, D]
        idx = None                                  # gathered active tokens [B, n] (static budget)
        valid = None                                # active mask [B, T] (sampled budget)
        xw, pos, seg, weight = x, positions, segment_ids, None
        tok = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # token index
        prev_f = 1.0
        for r in range(1, c.n_repeat + 1):
            x_in = xw
            h = self._depth(xw, r)
            for i in mid:
                cache = ctx[i]
                if cache is not None:  # causal by token index (as repeat 1); ``pos`` only rotates
                    cache = dict(cache, index=tok if idx is None else idx, valid=valid)
                h, new = self.blocks[i](h, pos, seg, cache, None)
                if c.cross_repeat:
                    ctx[i] = new
            if c.ln_mid:
                h = self.mid_norm(h).astype(h.dtype)  # the stream keeps its dtype (residual_fp32)
            if weight is not None and c.router_mix:
                h = (x_in.astype(jnp.float32) * (1 - weight) + h.astype(jnp.float32) * weight).astype(h.dtype)
            if valid is not None:
                h = jnp.where(valid[..., None], h, x_in)
            state = h if idx is None else state.at[jnp.arange(b)[:, None], idx].set(h)
            if r == c.n_repeat or not c.adaptive:
                xw = h
                continue
            # ---- route: which tokens run repeat r + 1
            f = factors[r - 1]
            scores = self.routers[r - 1](h.astype(jnp.float32))[..., 0]       # [B, n]
            if static:
                cap = f / prev_f if prev_f != 0 else 0.0
                prev_f = f
                n_next = int(cap * h.shape[1])
                if n_next == 0:
                    break
                top, sel = jax.lax.top_k(scores, n_next)
                weight = jax.nn.sigmoid(top)[..., None]
                idx = sel if idx is None else jnp.take_along_axis(idx, sel, axis=1)
                xw, pos = _take(h, sel), jnp.take_along_axis(pos, sel, axis=1)
                seg = None if seg is None else jnp.take_along_axis(seg, sel, axis=1)
            else:
                cap = jnp.where(prev_f != 0, f / jnp.where(prev_f == 0, 1.0, prev_f), 0.0)
                prev_f = f
                active = jnp.ones((b, t), bool) if valid is None else valid
                n_act = jnp.sum(active, axis=1, keepdims=True).astype(jnp.float32)
                n_next = jnp.floor(cap * n_act).astype(jnp.int32)
                masked = jnp.where(active, scores, -jnp.inf)
                order = jnp.argsort(-masked, axis=1, stable=True)
                rank = jnp.argsort(order, axis=1)
                valid = active & (rank < n_next)
                weight = jax.nn.sigmoid(scores)[..., None]
                xw = h
        return state


# ----------------------------------------------------------------------------- registry
def _presets(**extra):
    tiny = dict(GPT_PRESETS["tiny"], n_layer=2, n_repeat=2)
    gpu = dict(vocab_size=50304, d_model=768, n_layer=12, n_head=12, max_seq_len=256, n_repeat=2)
    out = {"tiny": {**_GPT_STYLE, **tiny, **extra}, "gpu": {**_GPT_STYLE, **gpu, **extra}}
    return out


register("cotformer", CoTFormerConfig, CoTFormer,
         {**_presets(), "tiny-ln": {**_presets()["tiny"], "n_layer": 4, "n_layer_begin": 1, "n_layer_end": 1,
                                    "ln_mid": True, "depth_embedding": "linear_learned"},
          "gpu-ln": {**_presets()["gpu"], "n_layer": 24, "n_repeat": 5, "n_layer_begin": 2,
                     "n_layer_end": 1, "ln_mid": True}},
         description="CoTFormer: repeated mid blocks attending to the keys of all earlier repeats")
register("but", CoTFormerConfig, CoTFormer, _presets(),
         description="block universal transformer: repeated mid blocks (CoTFormer's baseline)")
register("adaptive_cotformer", CoTFormerConfig, CoTFormer,
         {"tiny": {**_presets()["tiny"], "n_layer": 4, "n_repeat": 3, "n_layer_begin": 1, "n_layer_end": 1,
                   "ln_mid": True, "depth_embedding": "linear_learned"},
          "gpu": {**_presets()["gpu"], "n_layer": 24, "n_repeat": 5, "n_layer_begin": 2, "n_layer_end": 1,
                  "ln_mid": True, "depth_embedding": "linear_learned"}},
         description="adaptive LN-CoTFormer (Mixture of Repeats): routers pick the tokens of each repeat")
