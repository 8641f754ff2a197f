"""Sparse causal flash attention LMs (SCFA, Pagliardini et al. 2023): hash-sparse and QK-sparse.

The GPT baseline with the attention op of (some of) its layers replaced; projections,
rotary embeddings, the KV-cache layout and every parameter name stay the baseline's
(``q``/``k``/``v``/``o``), so baseline checkpoints load as is.

* ``hash_sparse``: per head, queries and keys (after rotary, L2-normalised) are hashed
  with random projections ``R [Dh, n_buckets / 2]`` (unit-norm columns):
  ``bucket(x) = argmax([x R, -x R])``.  Query ``i`` attends key ``j`` iff ``j <= i`` and
  ``bucket(q_i) == bucket(k_j)``.  ``n_buckets=1`` is exactly causal attention.
  Per-head hashes: one ``R`` per kv head (query heads of a GQA group share their kv
  head's ``R``).
* ``qk_sparse``: random keep masks, each (batch row, position, head) query and key kept
  independently with probability ``1 - qk_drop_rate`` (the paper's "sparsity" ``s`` =
  ``qk_drop_rate``; in evaluation and decoding one mask per (position, head), shared by every
  row: see below); query ``i`` attends key ``j`` iff ``j <= i`` and both are kept;
  dropped queries (and rows that see nothing) output 0.  ``qk_drop_rate=0`` is exactly
  causal attention.

``sparse_layers``: 0-based indices of the sparse layers (``None``: all, as in the paper);
the others keep dense causal attention.  ``sparse_impl``: ``"pallas"`` (the kernels of
:mod:`pallas_kernels.sparse_attention`), ``"reference"`` (their dense float32 oracles,
masked softmax over ``[T, T]``: for CPU training), ``"auto"`` = the kernel on GPU/TPU,
the reference elsewhere.  Both compute the same function.

Randomness (deterministic under a seed).  The hash matrices and keep masks are redrawn
at every training step from the trainer's per-step ``dropout`` rng
(``fold_in`` of the train seed and the step, split per micro-batch; Flax's ``make_rng``
makes them differ per layer).  Without a ``dropout`` rng (evaluation, ``init``, plain
``apply``), and always when decoding with a KV cache, they come from a fixed key,
``fold_in(PRNGKey(hash_seed), crc32(module path))``: evaluation is deterministic and the
same at every call.  Keep masks are tables ``uniform(., [max_seq_len, H]) >= qk_drop_rate``
indexed by the token *position* (mod ``max_seq_len``), so a token's keep bit never depends on
the sequence length of the call; that is what makes decoding equal the full forward.  In
training each batch row draws its own table (``fold_in(key, row)``, as the paper drops tokens
independently per sequence); the evaluation draw is one table for every row (``key`` itself),
so a window's loss does not depend on the batch size or on which row it lands in, and
``generate(num_samples=k)`` shares one prefill among a prompt's k rows.  (Deviation: the
authors' code redraws masks at every call, evaluation included.)  Under ``scan_layers`` training still draws per layer
(the layer scan splits the ``dropout`` rng), but the fixed evaluation key comes from the one
scanned module path, so in evaluation / decoding every scanned layer uses the same R / masks
(unrolled layers differ): a scanned and an unrolled model with the same params evaluate
differently.  The layer
scan also stacks the sown ``intermediates`` (the labels) on the layer axis, so
:func:`attention_labels` returns one entry per layer, in model order, with or without it.

Decoding (KV cache).  The cache is the baseline's ``{'k', 'v'}`` (post-rotary keys).
A decoding step uses the fixed eval randomness (even given a ``dropout`` rng): it hashes
the new queries and every cached key with the same ``R`` (a key's bucket is recomputed
from the cached key, so nothing extra is stored), or looks the keep bits of the query
positions and of the cached keys' positions up in the position-indexed table (the cache
stores no positions: cache slot ``s`` holds position ``s + offset``, the offset being the
call's ``positions - slots`` of each row: 0 by default, and exact for explicit ``positions``
that are the slots shifted by a per-row constant); causality is by cache slot, as in the
baseline's decoding.  Then one dense masked softmax over the cache (float32, as the
baseline decodes with the XLA path).  Prefill + decode equals the full forward (with such
explicit ``positions`` too).

Packed sequences (``segment_ids``, any integer ids; as in the baseline a segment is a *run* of
equal ids: the ``Transformer`` maps the ids through ``segment_index`` first, so an id that comes
back later in a row starts a new segment, and tokens see only keys of their own run): the
(run) ids are then mapped to dense per-row ranks in ``[0, T)``
(:func:`segment_ranks`), then hash labels become ``bucket + n_buckets * rank`` (needs
``n_buckets * T <= 2**31``) and QK-sparse with segments runs the hash op with labels
``rank`` (kept) / ``-1`` (dropped query) / ``-2`` (dropped key), the same visibility
(:func:`packed_labels`).  ``window`` is not supported.

FLOPs / MFU: ``attention_flops_per_token`` is the baseline's dense-causal count (as if no
tile were skipped), so the MFU of a sparse model is a dense-equivalent number;
``experiments.scfa_lm`` reports the attention tiles actually computed separately.  The
hash projection (``2 * T * Dh * n_buckets / 2`` per head) is not counted.

Deviations from the authors' code (``epfml/dynamic-sparse-flash-attention``,
``openwebtext2-experiments/src/models/{hashformer,dropformer}.py``):

* Their LMs (baseline included) use shared-QK attention: there is no key projection,
  ``k = normalize(q)``; hashing ``q`` and ``normalize(q)`` gives a token's query and key
  the same bucket.  Here the baseline's separate ``W_k`` stays and the normalised
  queries and keys are hashed separately (the paper's general formulation), so a query
  may not share its own key's bucket.
* Their hash kernel masks with strict ``j < i`` (no self-attention, Reformer-style, needed
  with shared QK); here ``j <= i`` (the kernel's and the baseline's causal mask), for both
  patterns (their QK-sparse kernel also uses ``j <= i``).
* They redraw R and the masks at every forward call, evaluation included (``torch.randn``
  / ``torch.rand`` inside ``attention_fn``); here training redraws per step and evaluation
  uses the fixed draw above.
* Their QK-sparse attention also L2-normalises the compacted keys; here keys are the
  baseline's (only the attention pattern changes).
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from ..config import TransformerConfig, _choice, changed_from_default
from ..layers import Block
from ..layers.attention import init_attention_cache, project_qkv, write_kv_cache
from ..layers.common import output_std
from ..layers.linear import Linear
from ..registry import register
from ..sharding import (ACT_HEADS, BATCH, EMBED, HEAD_DIM, HEADS, LENGTH, attention_kernel_axes,
                        constrain, kernel_map)
from .gpt import GPT_PRESETS, _GPT_STYLE
from .transformer import Transformer

SPARSE_IMPLS = ("auto", "reference", "pallas")
KINDS = {"hash_sparse": "hash", "qk_sparse": "qk"}
KIND_FIELDS = {"n_buckets": "hash_sparse", "qk_drop_rate": "qk_sparse"}  # field -> the model using it


@dataclasses.dataclass(frozen=True)
class SCFAConfig(TransformerConfig):
    """TransformerConfig + SCFA fields; ``model`` (``hash_sparse`` / ``qk_sparse``) picks the
    pattern (:attr:`kind`).  ``n_buckets`` is hash_sparse's, ``qk_drop_rate`` qk_sparse's: the
    other model must leave it at its default (``ValueError`` otherwise, not silently ignored)."""

    model: str = "hash_sparse"
    n_buckets: int = 16           # hash_sparse: buckets per head (1 or even)
    qk_drop_rate: float = 0.5     # qk_sparse: probability to drop each query / key (paper's s)
    sparse_layers: Optional[tuple] = None  # 0-based sparse layer indices; None = all
    sparse_impl: str = "auto"
    hash_seed: int = 0            # key of the fixed (evaluation / decoding) draw
    block_q: int = 64             # kernel tiles (GPU; the TPU variant uses 128)
    block_k: int = 64

    def __post_init__(self):
        if isinstance(self.sparse_layers, list):  # JSON round trip
            object.__setattr__(self, "sparse_layers", tuple(self.sparse_layers))
        super().__post_init__()

    @property
    def kind(self) -> str:
        return KINDS[self.model]

    def is_sparse_layer(self, i: int) -> bool:
        return self.sparse_layers is None or i in self.sparse_layers

    def validate(self) -> None:
        super().validate()  # model= was checked first (registry.check_config_class)
        _choice("sparse_impl", self.sparse_impl, SPARSE_IMPLS)
        nb = self.n_buckets
        if not isinstance(nb, int) or isinstance(nb, bool) or nb < 1 or (nb > 1 and nb % 2):
            raise ValueError(f"n_buckets must be 1 or an even int >= 2 (argmax over [xR, -xR]), "
                             f"got {nb!r}")
        hs = self.hash_seed
        if not isinstance(hs, int) or isinstance(hs, bool) or not 0 <= hs < 2 ** 32:
            raise ValueError(f"hash_seed must be an int in [0, 2**32) (the PRNGKey seed of the fixed "
                             f"evaluation / decoding draw), got {hs!r}")
        r = self.qk_drop_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise ValueError(f"qk_drop_rate must be in [0, 1), got {self.qk_drop_rate!r}")
        if self.sparse_layers is not None:
            if not isinstance(self.sparse_layers, tuple):
                raise ValueError(f"sparse_layers must be None or a list / tuple of 0-based layer indices "
                                 f"in [0, {self.n_layer}), got {self.sparse_layers!r}")
            bad = [i for i in self.sparse_layers
                   if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_layer]
            if bad:
                raise ValueError(f"sparse_layers must be 0-based layer indices in [0, {self.n_layer}), "
                                 f"got {self.sparse_layers!r}")
        if self.window is not None:
            raise ValueError("window (sliding-window attention) is not supported by hash_sparse / "
                             "qk_sparse; use window=None")
        for name in ("block_q", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v!r}")
        ignored = [name for name, model in KIND_FIELDS.items() if model != self.model]
        for name in changed_from_default(self, ignored):  # a field the other kind ignores: its default only
            model = KIND_FIELDS[name]
            raise ValueError(f"{name}={getattr(self, name)!r} is used by model={model!r} only: "
                             f"model={self.model!r} ignores it; leave it at its default "
                             f"{getattr(SCFAConfig, name)!r} (or use model={model!r})")


# ----------------------------------------------------------------------- randomness
def hash_matrices(key, n_heads: int, dim: int, n_buckets: int):
    """``[n_heads, dim, n_buckets // 2]`` float32 Gaussian, columns of unit L2 norm."""
    r = jax.random.normal(key, (n_heads, dim, n_buckets // 2), jnp.float32)
    return r / jnp.linalg.norm(r, axis=1, keepdims=True)


def hash_buckets(x, r):
    """Buckets ``[B, T, H]`` int32 of ``x [B, T, H, D]`` under ``r [H, D, nb/2]``:
    ``argmax([x̂ r, -x̂ r])`` with ``x̂ = x / |x|`` (all 0 when ``nb / 2 == 0``)."""
    if r.shape[-1] == 0:
        return jnp.zeros(x.shape[:3], jnp.int32)
    xf = x.astype(jnp.float32)
    xf = xf / jnp.maximum(jnp.linalg.norm(xf, axis=-1, keepdims=True), 1e-6)
    p = jnp.einsum("bthd,hdn->bthn", xf, r, precision=jax.lax.Precision.HIGHEST)
    return jnp.argmax(jnp.concatenate([p, -p], axis=-1), axis=-1).astype(jnp.int32)


def keep_bits(key, positions, n_heads: int, max_len: int, drop_rate: float, per_row: bool = True):
    """``[B, T, H]`` bool: token kept iff ``uniform(fold_in(key, row))[position % max_len, h]
    >= drop_rate`` (depends on row, position and head only); ``per_row=False``: one table
    ``uniform(key)`` for every row (depends on position and head only)."""
    b = positions.shape[0]
    if per_row:
        table = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (max_len, n_heads)))(
            jnp.arange(b, dtype=jnp.uint32))                              # [B, max_len, H]
    else:
        table = jnp.broadcast_to(jax.random.uniform(key, (max_len, n_heads)), (b, max_len, n_heads))
    idx = jnp.mod(positions, max_len).astype(jnp.int32)
    return jnp.take_along_axis(table, idx[:, :, None], axis=1) >= drop_rate


def segment_ranks(segment_ids):
    """``[B, T]`` segment ids (any values) -> ``[B, T]`` int32 dense ranks per row: the index of
    each id among its row's distinct ids in increasing order, so ranks are in ``[0, T)`` and
    equal exactly where the ids are equal (id equality: two runs of one id get one rank; the
    model passes the run indices of ``segment_index``, so there every run is its own segment)."""
    order = jnp.argsort(segment_ids, axis=1, stable=True)
    srt = jnp.take_along_axis(segment_ids, order, axis=1)
    new = jnp.concatenate([jnp.zeros_like(srt[:, :1], jnp.int32),
                           (srt[:, 1:] != srt[:, :-1]).astype(jnp.int32)], axis=1)
    ranks = jnp.cumsum(new, axis=1, dtype=jnp.int32)                  # ranks in sorted order
    rows = jnp.arange(segment_ids.shape[0])[:, None]
    return jnp.zeros_like(ranks).at[rows, order].set(ranks)            # back to token order


def packed_labels(kind: str, q_lab, k_lab, segment_ids, n_buckets: int):
    """Hash-op labels for packed sequences: query ``i`` sees key ``j`` (``j <= i``) iff the labels
    match, i.e. same segment and same bucket (``kind="hash"``) / same segment and both kept
    (``kind="qk"``).  Segment ids are first mapped to their dense per-row ranks
    (:func:`segment_ranks`), so any integer ids work (large, negative, non-contiguous):

    * hash: ``bucket + n_buckets * rank`` (needs ``n_buckets * T <= 2**31``: int32 labels;
      a ``ValueError`` otherwise);
    * qk: ``rank`` for kept tokens (``>= 0``), ``-1`` for dropped queries and ``-2`` for
      dropped keys (never equal to a rank or to each other).
    """
    t = segment_ids.shape[1]
    rank = segment_ranks(segment_ids)[:, :, None]
    if kind == "hash":
        if n_buckets * t > 2 ** 31:
            raise ValueError(f"packed segment_ids with n_buckets={n_buckets} need n_buckets * T <= 2**31 "
                             f"(int32 labels bucket + n_buckets * segment rank), got T={t}")
        return q_lab + n_buckets * rank, k_lab + n_buckets * rank
    return jnp.where(q_lab, rank, -1), jnp.where(k_lab, rank, -2)


def resolve_sparse_impl(impl: str) -> str:
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "reference"
    return impl


# ---------------------------------------------------------------------------- mixer
class SparseAttention(nn.Module):
    """The baseline Attention mixer (same params, rotary, cache) with a SCFA attention op."""
    applies_attn_dropout = False  # see models.transformer.check_attn_dropout
    config: object

    init_cache = staticmethod(init_attention_cache)

    def training_draw(self, decoding: bool = False) -> bool:
        """True when this call draws from the per-step ``dropout`` rng (training), False for the
        fixed evaluation draw (always when ``decoding``: the cached keys' buckets / keep bits must
        be the same at every step)."""
        return self.has_rng("dropout") and not decoding

    def draw_key(self, training: bool):
        """The per-step training key (the ``dropout`` rng) or the fixed evaluation key."""
        if training:
            return self.make_rng("dropout")
        path = "/".join(str(p) for p in self.scope.path)
        return jax.random.fold_in(jax.random.PRNGKey(self.config.hash_seed), zlib.crc32(path.encode()))

    def labels(self, key, q, k, q_pos, k_pos, per_row: bool = True):
        """Per-token labels of the queries ``[B, Tq, Hq]`` and keys ``[B, Tk, Hkv]``: buckets
        (hash) or keep bits (qk; ``per_row``: one keep table per batch row, else one for all)."""
        c = self.config
        hq, hkv, dh = c.n_head, c.kv_heads, c.dim_head
        if c.kind == "hash":
            r = hash_matrices(key, hkv, dh, c.n_buckets)
            return hash_buckets(q, jnp.repeat(r, hq // hkv, axis=0)), hash_buckets(k, r)
        kq, kk = jax.random.split(key)
        drop = float(c.qk_drop_rate)
        return (keep_bits(kq, q_pos, hq, c.max_seq_len, drop, per_row),
                keep_bits(kk, k_pos, hkv, c.max_seq_len, drop, per_row))

    def sparse_op(self, q, k, v, q_lab, k_lab, segment_ids):
        from pallas_kernels import sparse_attention as sa

        c = self.config
        kind = c.kind
        if segment_ids is not None:
            q_lab, k_lab = packed_labels(kind, q_lab, k_lab, segment_ids, c.n_buckets)
            kind = "hash"
        if resolve_sparse_impl(c.sparse_impl) == "reference":
            fn = sa.hash_reference if kind == "hash" else sa.qk_sparse_reference
            return fn(q, k, v, q_lab, k_lab)
        fn = functools.partial(sa.hash_attention if kind == "hash" else sa.qk_sparse_attention,
                               block_q=c.block_q, block_k=c.block_k)
        # on a mesh: per device (XLA cannot split a kernel)
        heads, kv_heads = attention_kernel_axes(k.shape[2])
        return kernel_map(fn, (heads, kv_heads, kv_heads, heads[:3], kv_heads[:3]), heads)(
            q, k, v, q_lab, k_lab)

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, kv_cache=None, cache_index=None):
        """x ``[B, T, D]``, positions ``[B, T]`` -> (y ``[B, T, D]``, new kv_cache or None)."""
        c = self.config
        h, hkv = c.n_head, c.kv_heads

        q, k, v = project_qkv(c, x, positions)
        training = self.training_draw(decoding=kv_cache is not None)
        key = self.draw_key(training)

        new_cache = None
        if kv_cache is None:
            q_lab, k_lab = self.labels(key, q, k, positions, positions, per_row=training)
            self.sow("intermediates", "q_labels", q_lab)
            self.sow("intermediates", "k_labels", k_lab)
            o = self.sparse_op(q, k, v, q_lab, k_lab, segment_ids)
        else:
            from pallas_kernels.sparse_attention import masked_attention
            new_cache = write_kv_cache(kv_cache, k, v, cache_index, segment_ids)
            k_all, v_all = new_cache["k"], new_cache["v"]
            b, t = q.shape[:2]
            s = k_all.shape[1]
            q_slot = cache_index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            k_slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            # keep bits by position, as in the forward: the queries' are the given positions; a
            # cached key's is its slot + the row's offset (positions - slots) of this call
            offset = jnp.asarray(positions, jnp.int32)[:, :1] - q_slot[:, :1]
            q_lab, k_lab = self.labels(key, q, k_all.astype(q.dtype), positions, k_slot + offset,
                                       per_row=False)
            g = h // hkv
            ql = jnp.swapaxes(q_lab, 1, 2)[..., :, None]                            # [B, Hq, T, 1]
            kl = jnp.repeat(jnp.swapaxes(k_lab, 1, 2), g, axis=1)[..., None, :]     # [B, Hq, 1, S]
            visible = (k_slot[:, None, None, :] <= q_slot[:, None, :, None])
            visible = visible & ((ql == kl) if c.kind == "hash" else (ql & kl))
            o = masked_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), visible)
        o = checkpoint_name(constrain(o, (BATCH, LENGTH, ACT_HEADS, None)), "attention_out")
        y = Linear(c.d_model, (HEADS, HEAD_DIM, EMBED), in_axes=2, std=output_std(c), dtype=c.dtype,
                   param_dtype=c.param_dtype, name="o")(o)
        return y, new_cache


SparseBlock = Block.using(mixer=SparseAttention, name="SparseBlock")


class SCFATransformer(Transformer):
    """The baseline with :class:`SparseAttention` in the layers of ``sparse_layers``."""

    def block_class(self):
        return SparseBlock

    def layer_classes(self):
        c = self.config
        return [SparseBlock if c.is_sparse_layer(i) else Block for i in range(c.n_layer)]

    #: the layer scan also stacks the sown labels (``intermediates``) per layer
    scanned_collections = ("intermediates",)


def attention_labels(module, params, tokens):
    """``[(q_labels, k_labels)]`` of every sparse layer for ``tokens`` (evaluation draw), in
    model order (layer 0 first; dense layers of ``sparse_layers`` skipped), as the forward pass
    computes them (for tile counts).  Works with ``scan_layers`` (the scanned labels are split
    per layer).  A ``ValueError`` if the count found differs from the model's sparse layers."""
    c = module.config
    _, state = _labels_fn(type(module), c)(params, tokens)
    inter = state.get("intermediates", {})

    def find(tree):  # the (q_labels, k_labels) sown somewhere inside one block, or None
        if not isinstance(tree, dict):
            return None
        if "q_labels" in tree and "k_labels" in tree:
            return tree["q_labels"][0], tree["k_labels"][0]
        hits = [h for h in (find(v) for v in tree.values()) if h is not None]
        return hits[0] if len(hits) == 1 else None

    if c.scan_layers:
        found = find(inter.get("blocks", {}))
        out = [] if found is None else [(q[i], k[i]) for q, k in [found] for i in range(q.shape[0])]
    else:
        out = [h for h in (find(inter.get(f"blocks_{i}", {})) for i in range(c.n_layer)) if h is not None]
    want = sum(c.is_sparse_layer(i) for i in range(c.n_layer))
    if len(out) != want:
        raise ValueError(f"attention_labels found the labels of {len(out)} layers, but model "
                         f"{c.model!r} has {want} sparse layers (n_layer={c.n_layer}, "
                         f"sparse_layers={c.sparse_layers}, scan_layers={c.scan_layers})")
    return out


@functools.lru_cache(maxsize=16)
def _labels_fn(module_cls, config):
    module = module_cls(config)
    return jax.jit(lambda p, t: module.apply({"params": p}, t, mutable=["intermediates"]))


_SCFA_PRESETS = {
    "tiny": {**_GPT_STYLE, **GPT_PRESETS["tiny"]},
    "small": {**_GPT_STYLE, **GPT_PRESETS["small"]},
    # the paper's LM setting on one device: 12 layers, d=768, 12 heads, up to T=16k
    "gpu": {**_GPT_STYLE, **GPT_PRESETS["small"], "max_seq_len": 16384},
}
register("hash_sparse", SCFAConfig, SCFATransformer,
         {n: {**v, "n_buckets": 4 if n == "tiny" else 16} for n, v in _SCFA_PRESETS.items()},
         description="SCFA hash-sparse attention: random-projection buckets, causal within bucket")
register("qk_sparse", SCFAConfig, SCFATransformer,
         {n: {**v, "qk_drop_rate": 0.5} for n, v in _SCFA_PRESETS.items()},
         description="SCFA QK-sparse attention: random query/key dropping (keep masks)")
