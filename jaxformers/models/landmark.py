"""Landmark attention LM (Mohtashami & Jaggi 2023, arXiv:2305.16300) and inference with a memory.

The GPT baseline with the attention op swapped for landmark attention
(:mod:`pallas_kernels.landmark_attention`: blocks of ``L = landmark_block`` tokens whose last
token is a *landmark*; a grouped softmax makes each landmark's key stand for its block).
Projections, rotary, parameter names (``q``/``k``/``v``/``o``) stay the baseline's.

Data and loss.  :func:`insert_landmarks` inserts the landmark token (``landmark_id``, default
``vocab_size - 1``; it must not occur in the data) after every ``L - 1`` tokens, so landmarks
sit at positions ``t % L == L - 1`` of each training window (the kernel's rule).  The loss
``landmark_cross_entropy`` (registered; ``TrainConfig(loss="landmark_cross_entropy")``) does
this to every raw ``[B, T+1]`` window inside the step and gives landmark *targets* weight 0
through the batch's ``loss_mask``: every real token of the window is predicted exactly once,
the ones that follow a landmark from the landmark's position.  Deviation from the authors
(``epfml/landmark-attention``): they insert landmarks into the token file and, at inference
(``MemLMCache.get_final_logits``), read the prediction of the token after a landmark from the
token *before* the landmark; here it is read at the landmark (no target re-wiring is needed,
the existing ``loss_mask`` does it).  Their training loss (``lm_benchmark``: cross-entropy over the
token file) also counts the landmark targets, which are trivially predictable; here they weigh 0,
so losses and perplexities are over the real tokens only (theirs, averaging in the near-zero
landmark losses, read lower at equal quality).  Training positions are the with-landmark
positions ``0..T'-1`` (as theirs); a run's FLOPs per token and MFU count those ``T'``
positions per ``T`` raw tokens (the loss's ``model_positions``).

Decoding with the baseline KV cache (``model.apply(..., cache=...)``) runs the float32
reference with ``q_offset = cache_index``.  Landmarks are placed by *position*: the model needs
``landmark_token`` at every position ``t % L == L - 1`` (teacher-forced landmarks), never an
ordinary token there.  :func:`jaxformers.generate` (and ``experiments.generate``) does this
through the model's hook :meth:`LandmarkTransformer.forced_tokens`, transparently: the caller
gives raw prompts (``[B, P]``, optional ``prompt_lengths``) and gets raw tokens back, same shape
and contract as for every model (``[B * num_samples, P + max_new_tokens]``).  ``generate``
inserts the landmarks (as :func:`insert_landmarks`: a prompt whose length is a multiple of
``L - 1`` ends with its landmark), sizes the KV cache for the with-landmark length, feeds the
landmark at each landmark position instead of a sampled token (not counted as a new token) and
samples the token after it from the logits *at* the landmark (as trained, above), never samples
the landmark id anywhere (its logit is masked, whatever ``vocab_limit``; ``eos_id`` equal to it
is refused), and removes the landmarks from its result.  A landmark id inside a raw prompt is
fed as given (an ordinary token at a non-landmark position; the data should not hold it).  By
default this decoding attends over the full KV cache: exact (greedy tokens are the full
forward's argmax, tested), with the baseline's cost growing with the context.

Decoding through the memory (``mem_chunk_len = C``, e.g. ``config.replace(mem_chunk_len=C)``
or ``experiments.generate --memory-chunk C``): every KV-cache call (prefill and each new
token, so :func:`jaxformers.generate` too) computes exactly what :func:`memory_forward` with
``chunk_len=C``, ``top_k=mem_top_k``, ``selection=mem_selection`` computes for those
positions (tested: logits equal for any split into prefill and steps): a token in chunk
``[s, s + C)`` retrieves the top-k of the ``s / L`` blocks before its chunk and attends to
them and to its chunk up to itself, at positions below ``top_k L + C``.  Per new token, the
attention covers ``C + top_k L`` keys (the cache slice holding its chunk, and the retrieved
blocks; ``2 C`` slices for a group of prompt queries, which can span two chunks) plus one
landmark score per stored block, instead of the whole context; the
positions never exceed ``top_k L + C``, so generation can run past the training length.  The
cache keeps every position's unrotated keys and values (the memory; no host offload here),
rounded up to whole chunks plus one; the prompt is processed in groups of ``C`` queries; the
chunk's landmark attention runs the float32 reference, as the full-cache decoding.
``landmark_cross_entropy`` of a config with ``mem_chunk_len`` reads its logits the same way
(one prefill of each window), so the library's ``evaluate`` (``experiments.evaluate
--memory-chunk C``) measures perplexity through the memory on windows of any length.

Inference with a memory (:func:`memory_forward`).  A long with-landmark input is processed
in chunks of ``chunk_len`` tokens (a multiple of ``L``).  Each layer keeps a memory of the
complete blocks of earlier chunks: unrotated keys and values ``[B, M, L, Hkv, Dh]`` (the
landmark key is row ``L - 1`` of its block).  For each chunk and layer:

1. retrieval: every query scores the landmark keys of all ``M`` stored blocks
   (``q . k_lm``, both with rotary; every landmark key rotated at the same position, just
   before the chunk, so the ranking is position-fair) and keeps the ``top_k`` best blocks:
   ``selection="per_head"`` per (token, query head), or ``"shared"`` per token across heads
   (max over heads of the per-head softmax over blocks: the authors' ``max_over_heads``);
   scores within ``TIE_TOLERANCE`` (1e-4) of their bound of the k-th best (``shared``: of the
   k-th best probability) count as tied and the earliest blocks win (in the first layer every
   landmark key is the same vector, so every score ties, and float rounding must not decide);
2. positions: the retrieved blocks, in chronological order, are placed at positions
   ``[0, k L)`` (slot ``r`` at ``r L .. r L + L - 1``) and the chunk right after them at
   ``k L + t`` with ``k = min(M, top_k)`` (the paper's "retrieved blocks just before the
   current chunk");
3. attention: the grouped softmax over the retrieved blocks *and* the chunk: the outer
   softmax runs over the retrieved landmarks, the chunk's own earlier landmarks and the
   current block; computed as the chunk's landmark attention (with its outer log-normaliser:
   the kernel's ``return_lse``, or the reference's) merged with the retrieved blocks'
   contribution by log-sum-exp;
4. the chunk's complete blocks (unrotated keys, values) are appended to the memory.

Per-token attention work is ``chunk_len + top_k * L`` keys whatever the context length;
only the landmark scoring grows with it (one dot product per stored block and head, ``1/L``
of full attention's, plus a top-k).  Invariant (tested): with ``top_k >=`` the number of
stored blocks, every block is retrieved, in order, at its true position, so
:func:`memory_forward` equals the full forward of the whole input (logits), for any
``chunk_len``.

Deviations from the authors' memory (``models/caches/mem_cache.py``,
``llama/llama_mem.py``): they carry the chunk's trailing incomplete block into the next chunk
and, when scoring, rotate the ``top_k`` most recent landmark keys at their slot positions and
all older ones at one fixed position; here chunks are block-aligned and all landmark keys
share one scoring position.  ``offload="host"``: the memory lives in host memory
between layers and chunks (numpy), only the landmark keys are sent to the device for scoring
and only the retrieved blocks are gathered on the host and sent back, so the stored memory
never stays on the device; each layer's transfer holds ``B * Hq * chunk_len * top_k * L``
keys and as many values (one gathered copy per query token and head: more than the whole
memory when that is small) plus the landmark keys, whatever the context; it costs one extra
forward of the block per layer (the first pass only computes the selection) and host round
trips.
With ``return_stats``, ``device_memory_bytes`` counts only the stored memory
(``mem_k``/``mem_v`` of all layers) kept on the device between chunks (0 with
``offload="host"``); ``device_transfer_bytes`` is the peak size of one layer's host-to-device
transfer (landmark keys plus the gathered keys and values ``[B, Hq, C, k, L, Dh]``, one
entry per query token and head), which can exceed the whole memory.
``jax.device_put`` to a ``pinned_host`` memory kind was not used: the CPU backend (where this
is tested) has no separate host memory space.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from ..config import TransformerConfig, _choice
from ..layers import Block
from ..layers.attention import init_attention_cache, project_qkv, write_kv_cache
from ..layers.common import output_std
from ..layers.linear import Linear
from ..layers.rotary import apply_rotary, rotary_angles
from ..registry import register
from ..sharding import (ACT_HEADS, BATCH, EMBED, HEAD_DIM, HEADS, LENGTH, attention_kernel_axes, constrain,
                        kernel_map)
from ..training.losses import cross_entropy, logits_cross_entropy, model_inputs, register_loss
from .gpt import GPT_PRESETS, _GPT_STYLE
from .transformer import Transformer, check_tokens
from ..utils import is_int as _is_int
from pallas_kernels._common import check_flag
from pallas_kernels.landmark_attention.reference import check_block_size

LANDMARK_IMPLS = ("auto", "reference", "pallas")
SELECTIONS = ("per_head", "shared")


@dataclasses.dataclass(frozen=True)
class LandmarkConfig(TransformerConfig):
    """TransformerConfig + landmark fields.

    ``landmark_block``: ``L``, tokens per block including the landmark (paper: 50 + 1).
    ``landmark_id``: the landmark token (``None``: ``vocab_size - 1``).
    ``landmark_impl``: ``"pallas"`` kernel, ``"reference"`` (float32 dense oracle, CPU
    training), ``"auto"`` = the kernel on GPU/TPU (``attention_impl`` is unused: only ``"auto"``).  ``mem_top_k`` / ``mem_selection``: the
    defaults of :func:`memory_forward`.  ``mem_chunk_len``: ``None`` (KV-cache decoding attends
    over the whole cache) or a positive multiple of ``landmark_block``: KV-cache decoding (and
    :func:`jaxformers.generate`) runs through the retrieval memory, as
    ``memory_forward(chunk_len=mem_chunk_len, top_k=mem_top_k, selection=mem_selection)``
    (module docstring, "Decoding through the memory"), and so does ``landmark_cross_entropy``
    (long-context evaluation: ``experiments.evaluate --memory-chunk``).
    ``block_q``: the Pallas kernel's query tile in rows, a power of two >= 16 (the kernel raises
    it to at least one padded block, and to 128 on TPU).
    """

    default_loss = "landmark_cross_entropy"  # not a field: the loss experiments.train defaults to

    model: str = "landmark"
    landmark_block: int = 16
    landmark_id: Optional[int] = None
    landmark_impl: str = "auto"
    block_q: int = 64
    mem_top_k: int = 2
    mem_selection: str = "per_head"
    mem_chunk_len: Optional[int] = None

    @classmethod
    def vocab_size_for_data(cls, data_vocab_size: int, fields: dict) -> int:
        """One id more than the data's for the landmark (unless ``landmark_id`` is given): the
        default landmark ``vocab_size - 1`` then is no data token (with the byte tokenizer's 257
        ids it would otherwise be the end-of-text id 256)."""
        return int(data_vocab_size) + (1 if fields.get("landmark_id") is None else 0)

    @property
    def landmark_token(self) -> int:
        return self.vocab_size - 1 if self.landmark_id is None else self.landmark_id

    def validate(self) -> None:
        super().validate()
        L = self.landmark_block
        if not isinstance(L, int) or isinstance(L, bool) or L < 2:
            raise ValueError(f"landmark_block must be an int >= 2 (tokens per block incl. the "
                             f"landmark), got {L!r}")
        if self.landmark_id is not None and (not _is_int(self.landmark_id)
                                             or not 0 <= self.landmark_id < self.vocab_size):
            raise ValueError(f"landmark_id must be an int in [0, vocab_size={self.vocab_size}) or None, "
                             f"got {self.landmark_id!r}")
        _choice("landmark_impl", self.landmark_impl, LANDMARK_IMPLS)
        if self.attention_impl != "auto":  # (every layer runs the landmark attention)
            raise ValueError(f"attention_impl={self.attention_impl!r} is not used by landmark models: their "
                             f"attention is landmark_impl's ({', '.join(LANDMARK_IMPLS)}); leave attention_impl='auto'")
        _choice("mem_selection", self.mem_selection, SELECTIONS)
        if not _is_int(self.mem_top_k) or self.mem_top_k < 1:
            raise ValueError(f"mem_top_k must be a positive int (not a bool), got "
                             f"{self.mem_top_k!r}")
        m = self.mem_chunk_len
        if m is not None and (not _is_int(m) or m < L or m % L):
            raise ValueError(f"mem_chunk_len must be None or a positive multiple of landmark_block={L} "
                             f"(not a bool), got {m!r}")
        if self.window is not None:
            raise ValueError("window (sliding-window attention) is not supported by landmark "
                             "attention; use window=None")
        v = self.block_q
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"block_q must be a power of two >= 16, got {v!r}")


# ------------------------------------------------------------------------- data + loss
def insert_landmarks(tokens, block_size: int, landmark_id: int):
    """Insert ``landmark_id`` after every ``block_size - 1`` tokens.

    tokens ``[B, N]`` (numpy or jax) -> ``(with_landmarks [B, N'], is_landmark [B, N'])`` with
    ``N' = N + N // (block_size - 1)``; landmarks at positions ``t % block_size ==
    block_size - 1``.  ``ValueError`` unless ``block_size`` is an int >= 2, tokens is 2-D and
    ``landmark_id`` an int that tokens' dtype holds (a jax ``uint8`` / ``uint16`` array would
    otherwise wrap an id past its range silently, e.g. 257 -> 1).
    """
    check_block_size(block_size)
    if getattr(tokens, "ndim", None) != 2:
        raise ValueError(f"tokens must be [B, N], got shape {getattr(tokens, 'shape', None)}")
    if not _is_int(landmark_id):
        raise ValueError(f"landmark_id must be an int (not a bool), got {landmark_id!r}")
    dtype = np.dtype(tokens.dtype)
    if np.issubdtype(dtype, np.integer) and not np.iinfo(dtype).min <= int(landmark_id) <= np.iinfo(dtype).max:
        raise ValueError(f"landmark_id={int(landmark_id)} does not fit the tokens' dtype {dtype} (ids in "
                         f"[{np.iinfo(dtype).min}, {np.iinfo(dtype).max}]): cast tokens to int32 first")
    block_size = int(block_size)
    xp = jnp if isinstance(tokens, jax.Array) else np
    b, n = tokens.shape
    per = block_size - 1
    nb = -(-n // per)
    padded = xp.zeros((b, nb * per), tokens.dtype)
    padded = padded.at[:, :n].set(tokens) if xp is jnp else _np_set(padded, tokens)
    lm = xp.full((b, nb, 1), landmark_id, tokens.dtype)
    seq = xp.concatenate([padded.reshape(b, nb, per), lm], axis=2).reshape(b, nb * block_size)
    n_out = n + n // per
    is_lm = (np.arange(n_out) % block_size == block_size - 1)
    return seq[:, :n_out], xp.broadcast_to(xp.asarray(is_lm), (b, n_out))


def _np_set(padded, tokens):
    padded[:, :tokens.shape[1]] = tokens
    return padded


def remove_landmarks(x, block_size: int, axis: int = 1):
    """The entries of ``x`` at non-landmark positions along ``axis`` (inverse of the insertion).
    ``ValueError`` unless ``block_size`` is an int >= 2 and ``axis`` an axis of ``x``."""
    check_block_size(block_size)
    ndim = np.ndim(x)
    if not _is_int(axis) or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be an int in [{-ndim}, {ndim}) (an axis of x, shape {np.shape(x)}), "
                         f"got {axis!r}")
    n = x.shape[axis]
    keep = np.nonzero(np.arange(n) % block_size != block_size - 1)[0]
    return jnp.take(x, keep, axis=axis) if isinstance(x, jax.Array) else np.take(x, keep, axis=axis)


def with_landmarks(batch, block_size: int, landmark_id: int):
    """A batch dict of raw windows ``tokens [B, T+1]`` -> ``{"tokens": [B, T'+1],
    "loss_mask": [B, T'+1]}`` with landmarks inserted and weight 0 on landmark targets
    (an existing ``loss_mask`` is carried to the real tokens).  Packed ``segment_ids`` /
    ``positions`` are not supported (``ValueError``)."""
    for key in ("segment_ids", "positions"):
        if batch.get(key) is not None:
            raise ValueError(f"landmark batches do not support {key!r} (landmarks are placed by "
                             "position in each window)")
    seq, is_lm = insert_landmarks(batch["tokens"], block_size, landmark_id)
    mask = (~is_lm).astype(jnp.float32)
    if batch.get("loss_mask") is not None:
        if batch["loss_mask"].shape != batch["tokens"].shape:
            raise ValueError(f"loss_mask must be aligned with tokens {tuple(batch['tokens'].shape)} "
                             f"([B, T+1]), got {tuple(batch['loss_mask'].shape)}")
        inner, _ = insert_landmarks(batch["loss_mask"].astype(jnp.float32), block_size, 0)
        mask = mask * inner
    return {"tokens": seq, "loss_mask": mask}


@register_loss("landmark_cross_entropy")
def landmark_cross_entropy(module, params, batch, rng=None):
    """Next-token cross-entropy of a ``landmark`` model on raw windows: landmarks inserted
    (:func:`with_landmarks`), landmark targets weigh 0.  Metrics as ``cross_entropy``.

    With ``mem_chunk_len`` set, the logits are read through the retrieval memory: one KV-cache
    prefill of each window (module docstring, "Decoding through the memory"; the logits of
    :func:`memory_forward` with ``chunk_len=mem_chunk_len``), so windows may be longer than
    ``max_seq_len`` (``experiments.evaluate --memory-chunk``).  That path applies no dropout
    (``ValueError`` for a dropout rng with ``dropout`` / ``embed_dropout`` > 0: a training step);
    it is differentiable, but the paper trains without the memory (``mem_chunk_len=None``)."""
    c = module.config
    if not isinstance(c, LandmarkConfig):
        raise ValueError(f"loss 'landmark_cross_entropy' needs a landmark model, got model "
                         f"{c.model!r}; use loss='cross_entropy'")
    batch = with_landmarks(batch, c.landmark_block, c.landmark_token)
    if c.mem_chunk_len is None:
        return cross_entropy(module, params, batch, rng)
    if rng is not None and (c.dropout > 0 or c.embed_dropout > 0):  # a training step: not silently off
        raise ValueError(f"landmark_cross_entropy through the memory (mem_chunk_len={c.mem_chunk_len}) applies "
                         f"no dropout, but dropout={c.dropout} / embed_dropout={c.embed_dropout} and a "
                         "dropout rng were given: set them to 0, or train with mem_chunk_len=None")
    from ..decoding import init_cache
    tokens, _ = model_inputs(batch)
    logits, _ = module.apply({"params": params}, tokens,
                             cache=init_cache(module, tokens.shape[0], tokens.shape[1]))
    return logits_cross_entropy(logits, batch)


def landmark_seq_len(raw_len: int, block_size: int) -> int:
    """Model sequence length for raw windows of ``raw_len + 1`` tokens (``max_seq_len`` needed).
    ``ValueError`` unless ``raw_len`` is an int >= 1 and ``block_size`` an int >= 2."""
    check_block_size(block_size)
    if not _is_int(raw_len) or raw_len < 1:
        raise ValueError(f"raw_len must be an int >= 1 (raw targets per window), got {raw_len!r}")
    return int(raw_len) + 1 + (int(raw_len) + 1) // (int(block_size) - 1) - 1


# the model runs a window of T raw targets at T' positions (landmarks inserted): the trainer's
# FLOPs per token and MFU count them (jaxformers.training.losses, "Loss functions")
landmark_cross_entropy.model_positions = lambda config, seq_len: (
    landmark_seq_len(seq_len, config.landmark_block) if isinstance(config, LandmarkConfig) else seq_len)


# -------------------------------------------------------------------------- attention op
def resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "reference"
    return impl


def landmark_op(c, q, k, v, return_lse=False):
    """Training/prefill landmark attention ``[B, T, H, Dh]`` (kernel or reference); with
    ``return_lse`` also the outer natural-log normaliser ``[B, H, T]`` (memory chunks)."""
    from pallas_kernels import landmark_attention as la

    if resolve_impl(c.landmark_impl) == "reference":
        return la.landmark_attention_reference(q, k, v, block_size=c.landmark_block, return_lse=return_lse)
    qa, ka = attention_kernel_axes(k.shape[2])  # on a mesh: per device (XLA cannot split a kernel)
    fn = functools.partial(la.landmark_attention, block_size=c.landmark_block, block_q=c.block_q,
                           return_lse=return_lse)
    return kernel_map(fn, (qa, ka, ka), (qa, (BATCH, ACT_HEADS, None)) if return_lse else qa)(q, k, v)


def _rope(x, positions, c):
    cos, sin = rotary_angles(positions, c.dim_head, c.rope_theta)
    return apply_rotary(x, cos, sin)


def select_blocks(q, lm_keys, n_mem, top_k: int, selection: str):
    """Top-k memory blocks per query.

    q ``[B, C, Hq, Dh]`` (rotary applied); lm_keys ``[B, Mcap, Hkv, Dh]`` (rotary applied);
    ``n_mem`` stored blocks (slots ``>= n_mem`` are empty): a scalar, or ``[C]`` one per query.
    Returns block indices ``[B, Hq, C, k]`` in increasing (chronological) order; empty slots
    sort last.
    """
    b, cl, hq, d = q.shape
    mcap, hkv = lm_keys.shape[1], lm_keys.shape[2]
    kx = jnp.repeat(lm_keys, hq // hkv, axis=2).astype(jnp.float32)
    s = jnp.einsum("bchd,bmhd->bhcm", q.astype(jnp.float32), kx) * d ** -0.5
    stored = jnp.arange(mcap) < jnp.asarray(n_mem)[..., None]             # [M] or [C, M]
    s = jnp.where(stored, s, -jnp.inf)
    k = min(top_k, mcap)
    if selection == "shared":
        p = jax.nn.softmax(jnp.where(jnp.isfinite(s), s, -1e30), axis=-1)
        p = jnp.where(stored, p, -1.0)
        s = jnp.broadcast_to(jnp.max(p, axis=1, keepdims=True), s.shape)
    vals, cand = jax.lax.top_k(s, k)                                       # [B, Hq, C, k]
    if selection == "shared":  # probabilities: relative to the k-th best (each is ~1 / M)
        scale = jnp.abs(jnp.min(vals, axis=-1, keepdims=True))
    else:  # |q| . |k| / sqrt(d) of the candidates: a bound of their scores' float32 rounding / 1e-7
        kc = kx[jnp.arange(b)[:, None, None, None], cand, jnp.arange(hq)[None, :, None, None]]
        bound = jnp.einsum("bchd,bhckd->bhck", jnp.abs(q.astype(jnp.float32)), jnp.abs(kc))
        scale = jnp.max(bound, axis=-1, keepdims=True) * d ** -0.5
    # the k-th largest as the min of the top k (slicing the last one makes XLA:CPU sort all of s)
    return _earliest_on_ties(s, jnp.min(vals, axis=-1, keepdims=True), k, TIE_TOLERANCE * scale)


#: landmark scores within this fraction of their bound (``|q| . |k| / sqrt(d)`` with absolute
#: values, the largest among the top k; for the ``shared`` probabilities the k-th best itself,
#: as they shrink like 1 / M with M stored blocks) of the k-th best count as tied
TIE_TOLERANCE = 1e-4


def _earliest_on_ties(s, kth, k: int, tol):
    """Indices ``[..., k]`` (increasing) of the ``k`` largest scores of ``s [..., M]`` (``-inf``:
    empty slots, taken last) with the ``k``-th largest ``kth [..., 1]``, where scores within
    ``tol`` of it count as tied and the earliest blocks win.  Exact ties are common (in the
    first layer every landmark key is the same vector), and float32 rounding, which depends on
    how the scores were batched, would otherwise pick among them: decoding and
    :func:`memory_forward` retrieved different blocks at batch size 3."""
    m = s.shape[-1]
    tier = jnp.where(s > kth + tol, 2, jnp.where(s >= kth - tol, 1, 0))      # in / tied / out
    rank = (tier * m + (m - 1 - jnp.arange(m))).astype(jnp.float32)         # exact: 3 m < 2^24
    _, idx = jax.lax.top_k(rank, k)                                           # then earliest first
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def gather_blocks(mem, idx, hq: int):
    """mem ``[B, Mcap, L, Hkv, Dh]``, idx ``[B, Hq, C, k]`` -> ``[B, Hq, C, k, L, Dh]``
    (numpy in, numpy out: the host-offload path)."""
    b, hkv = mem.shape[0], mem.shape[3]
    rows = np.arange(b)[:, None, None, None]
    heads = (np.arange(hq) // (hq // hkv))[None, :, None, None]           # query head -> KV head
    return mem[rows, idx, :, heads]      # only the retrieved blocks: [B, Hq, C, k] + [L, D]


def memory_attention(c, q, o_loc, lse_loc, mk, mv, idx, n_mem):
    """Merge the retrieved blocks into the chunk's landmark attention.

    q ``[B, C, Hq, Dh]`` (rotary at the chunk positions); o_loc ``[B, C, Hq, Dh]`` and
    lse_loc ``[B, Hq, C]`` (natural log) from the chunk's own landmark attention; mk/mv
    ``[B, Hq, C, k, L, Dh]`` gathered unrotated keys / values; idx ``[B, Hq, C, k]``;
    ``n_mem`` a scalar or ``[C]`` (as :func:`select_blocks`).
    Slot ``r`` keys get positions ``r L + l``.  Returns ``[B, C, Hq, Dh]``.
    """
    b, cl, hq, d = q.shape
    k, L = mk.shape[3], mk.shape[4]
    pos = jnp.arange(k * L, dtype=jnp.int32)[None, :]
    kr = _rope(mk.reshape(b * hq * cl, k * L, 1, d), pos, c).reshape(mk.shape)
    s = jnp.einsum("bchd,bhcrld->bhcrl", q.astype(jnp.float32), kr.astype(jnp.float32)) * d ** -0.5
    valid = idx < jnp.asarray(n_mem)[..., None]                          # [B, Hq, C, k]
    a = jnp.where(valid, s[..., L - 1], -jnp.inf)                        # landmark logits
    inner = jax.nn.softmax(s[..., :L - 1], axis=-1)                      # within each block
    u = jnp.einsum("bhcrl,bhcrld->bhcrd", inner, mv[..., :L - 1, :].astype(jnp.float32))
    lse_mem = jax.nn.logsumexp(a, axis=-1)                                # [B, Hq, C]
    w = jnp.exp(a - jnp.where(jnp.isfinite(lse_mem), lse_mem, 0.0)[..., None])
    o_mem = jnp.einsum("bhcr,bhcrd->bchd", jnp.where(valid, w, 0.0), u)
    lse = jnp.logaddexp(lse_loc, lse_mem)
    f_loc = jnp.swapaxes(jnp.exp(lse_loc - lse), 1, 2)[..., None]
    f_mem = jnp.swapaxes(jnp.exp(lse_mem - lse), 1, 2)[..., None]
    return (f_loc * o_loc.astype(jnp.float32) + f_mem * o_mem).astype(q.dtype)


def init_landmark_cache(config, batch_size, max_len, dtype=None):
    """The baseline's KV cache ``{'k', 'v'}`` ``[B, S, Hkv, Dh]``.  With ``mem_chunk_len = C``
    (decoding through the memory) it holds unrotated keys and ``S`` is ``max_len`` rounded up to
    a multiple of ``C``, plus one chunk: the two chunks a group of queries can span are always
    one slice of it."""
    C = config.mem_chunk_len
    if C is not None:
        max_len = -(-max_len // C) * C + C
    return init_attention_cache(config, batch_size, max_len, dtype)


def memory_decode_attention(c, q, t, ck, cv):
    """Attention of consecutive queries through the retrieval memory, from a KV cache.

    q ``[B, G, Hq, Dh]`` unrotated, at positions t ``[G]`` (consecutive, ``G <= C =
    mem_chunk_len``); ck / cv ``[B, S, Hkv, Dh]`` the unrotated keys / values of every position
    up to ``t[-1]`` (``S`` a multiple of ``C``, ``t[0] // C * C + 2 C <= S``; one query reads a
    slice of ``C`` keys, a group ``2 C``).  Each query at
    ``t`` in chunk ``[s, s + C)`` (``s = t // C * C``) is computed as :func:`memory_forward`
    computes it: the ``n = s / L`` blocks before its chunk are its memory, it retrieves the
    ``mem_top_k`` best of them (``mem_selection``) and attends to them at positions ``[0, k L)``
    and to its chunk's keys up to itself at ``k L + (j - s)`` (``k = min(n, mem_top_k)``).
    Rotary depends only on position differences, so the landmark scores rotate the query at
    ``t - s + 1`` (memory_forward: query at ``k L + t - s``, landmark keys at ``k L - 1``) and the
    local part uses positions relative to the slice.  Returns ``[B, G, Hq, Dh]``.
    """
    from pallas_kernels.landmark_attention import landmark_attention_reference

    L, C, top_k = c.landmark_block, c.mem_chunk_len, c.mem_top_k
    b, g, hq, d = q.shape
    s, hkv = ck.shape[1], ck.shape[2]

    def at(p):  # positions [G] -> [B, G]
        return jnp.broadcast_to(p, (b, p.shape[-1]))

    start = t // C * C                                  # each query's chunk
    n_mem = start // L                                  # blocks stored before it
    idx = select_blocks(_rope(q, at(t - start + 1), c), ck[:, L - 1::L], n_mem, top_k,
                        c.mem_selection)
    mk = gather_blocks(ck.reshape(b, s // L, L, hkv, d), idx, hq)
    mv = gather_blocks(cv.reshape(b, s // L, L, hkv, d), idx, hq)
    lo = start[0]                       # the queries' chunks: [lo, lo + 2C), one chunk for one query
    width = C if g == 1 else 2 * C
    ks, vs = (jax.lax.dynamic_slice_in_dim(a, lo, width, axis=1) for a in (ck, cv))
    o_loc, lse_loc = landmark_attention_reference(
        _rope(q, at(t - lo), c), _rope(ks, at(jnp.arange(width)), c), vs, block_size=L,
        q_offset=t[0] - lo, return_lse=True, chunk_len=C)
    qr = _rope(q, at(jnp.minimum(n_mem, top_k) * L + t - start), c)
    return memory_attention(c, qr, o_loc.astype(q.dtype), lse_loc, mk, mv, idx, n_mem)


# ----------------------------------------------------------------------------- mixer
class LandmarkAttention(nn.Module):
    """The baseline Attention mixer (same params, rotary) with landmark attention.

    ``kv_cache``: None (training / prefill), the baseline's ``{'k', 'v'}`` decoding cache, or
    a memory ``{'mem_k', 'mem_v' [B, Mcap, L, Hkv, Dh], 'n_mem' int32, 'top_k', 'selection'
    (static), optionally 'retrieved': (mk, mv, idx) gathered on the host, or
    'select_only'}`` (:func:`memory_forward`).
    """
    applies_attn_dropout = False  # see models.transformer.check_attn_dropout
    config: object

    init_cache = staticmethod(init_landmark_cache)

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, kv_cache=None, cache_index=None):
        c = self.config
        if segment_ids is not None:
            raise ValueError("landmark attention does not support segment_ids (packed "
                             "sequences): landmarks are placed by position")
        if kv_cache is not None and "mem_k" in kv_cache:
            return self._with_memory(x, positions, kv_cache)
        if kv_cache is not None and c.mem_chunk_len is not None:
            return self._decode_with_memory(x, kv_cache, cache_index)
        q, k, v = project_qkv(c, x, positions)
        new_cache = None
        if kv_cache is None:
            o = landmark_op(c, q, k, v)
        else:
            from pallas_kernels.landmark_attention import landmark_attention_reference
            new_cache = write_kv_cache(kv_cache, k, v, cache_index)
            k_all, v_all = new_cache["k"], new_cache["v"]
            o = landmark_attention_reference(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                                             block_size=c.landmark_block, q_offset=cache_index)
        return self._out(o), new_cache

    def _out(self, o):
        c = self.config
        o = checkpoint_name(constrain(o, (BATCH, LENGTH, ACT_HEADS, None)), "attention_out")
        return Linear(c.d_model, (HEADS, HEAD_DIM, EMBED), in_axes=2, std=output_std(c),
                      dtype=c.dtype, param_dtype=c.param_dtype, name="o")(o)

    def _with_memory(self, x, positions, mem):
        c = self.config
        L, hq = c.landmark_block, c.n_head
        b, cl = x.shape[:2]
        q, k, v = project_qkv(c, x, jnp.zeros_like(positions))  # rotary at 0 = unrotated
        qr, kr = _rope(q, positions, c), _rope(k, positions, c)
        n_mem = mem["n_mem"]
        lm = mem["lm_k"] if "lm_k" in mem else mem["mem_k"][:, :, L - 1]
        p0 = positions[:, :1]
        lm_r = _rope(lm, jnp.broadcast_to(p0 - 1, lm.shape[:2]), c)
        if "retrieved" in mem:
            mk, mv, idx = mem["retrieved"]
        else:
            idx = select_blocks(qr, lm_r, n_mem, mem["top_k"], mem["selection"])
            if mem.get("select_only"):
                return jnp.zeros_like(x), {"idx": idx, "k": k, "v": v}
            mk, mv = gather_blocks(mem["mem_k"], idx, hq), gather_blocks(mem["mem_v"], idx, hq)
        o_loc, lse_loc = landmark_op(c, qr, kr, v, return_lse=True)
        o = memory_attention(c, qr, o_loc, lse_loc, mk, mv, idx, n_mem)
        new = {"k": k, "v": v}                    # the chunk's unrotated keys / values
        return self._out(o), new

    def _decode_with_memory(self, x, kv_cache, cache_index):
        """KV-cache decoding through the retrieval memory (``mem_chunk_len``): the new tokens'
        unrotated keys / values are written to the cache, then the queries attend in groups of
        at most ``mem_chunk_len`` (:func:`memory_decode_attention`)."""
        c = self.config
        C = c.mem_chunk_len
        b, tq = x.shape[:2]
        size = kv_cache["k"].shape[1]
        if size % C or size < 2 * C:
            raise ValueError(f"a landmark model with mem_chunk_len={C} decodes with the cache of "
                             f"init_cache(module, ...): a multiple of {C}, at least {2 * C} long; "
                             f"got a cache of length {size}")
        if tq == 0:
            raise ValueError("no new tokens: the input has 0 positions")
        q, k, v = project_qkv(c, x, jnp.zeros((b, tq), jnp.int32))      # rotary at 0 = unrotated
        # the last chunk of the buffer is spare (a group of queries slices 2 C keys from its chunk)
        new_cache = write_kv_cache(kv_cache, k, v, cache_index, capacity=size - C)
        ck, cv = new_cache["k"], new_cache["v"]
        hq, d = q.shape[2:]
        g = min(tq, C)
        ng = -(-tq // g)
        qg = jnp.pad(q, ((0, 0), (0, ng * g - tq), (0, 0), (0, 0)))
        qg = jnp.swapaxes(qg.reshape(b, ng, g, hq, d), 0, 1)               # [ng, B, g, Hq, Dh]
        tg = (cache_index + jnp.arange(ng * g, dtype=jnp.int32)).reshape(ng, g)
        if ng == 1:  # a step, or a prefill of at most one chunk
            o = memory_decode_attention(c, qg[0], tg[0], ck, cv)[None]
        else:
            o = jax.lax.map(lambda a: memory_decode_attention(c, a[0], a[1], ck, cv), (qg, tg))
        o = jnp.swapaxes(o, 0, 1).reshape(b, ng * g, hq, d)[:, :tq]
        return self._out(o), new_cache


LandmarkBlock = Block.using(mixer=LandmarkAttention, name="LandmarkBlock")


class LandmarkTransformer(Transformer):
    """The baseline with :class:`LandmarkAttention` in every layer."""

    def block_class(self):
        return LandmarkBlock

    def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None):
        """The baseline's call; ``positions`` with a KV cache through the memory (``mem_chunk_len``)
        are a ``ValueError``: the memory places the retrieved blocks and the chunk itself (module
        docstring), so given positions would be ignored."""
        if positions is not None and cache is not None and self.config.mem_chunk_len is not None:
            raise ValueError(f"positions are not supported when decoding through the memory (mem_chunk_len="
                             f"{self.config.mem_chunk_len}): it places the retrieved blocks at [0, k L) and the "
                             "chunk after them, whatever positions say; pass positions=None (or decode with "
                             "mem_chunk_len=None)")
        return super().__call__(tokens, positions=positions, segment_ids=segment_ids, cache=cache)

    def forced_tokens(self):
        """Hook of :func:`jaxformers.generate`: ``(L, landmark_token)``, the landmark the model
        needs at every position ``t % L == L - 1``.  ``generate`` takes and returns raw tokens:
        it inserts the landmarks, feeds them there (never samples them, nor the landmark id
        anywhere) and removes them from its result (module docstring)."""
        c = self.config
        return c.landmark_block, c.landmark_token


# ------------------------------------------------------------------ memory inference
def _append_blocks(mem_k, mem_v, n_mem, k, v, L):
    """Write the chunk's complete blocks (``[B, C, Hkv, Dh]``) at block slot ``n_mem``."""
    b, cl, hkv, d = k.shape
    nb = cl // L
    if nb == 0:
        return mem_k, mem_v
    kb = k[:, :nb * L].reshape(b, nb, L, hkv, d)
    vb = v[:, :nb * L].reshape(b, nb, L, hkv, d)
    if isinstance(mem_k, np.ndarray):
        mem_k[:, n_mem:n_mem + nb] = np.asarray(kb, mem_k.dtype)
        mem_v[:, n_mem:n_mem + nb] = np.asarray(vb, mem_v.dtype)
        return mem_k, mem_v
    start = (0, n_mem, 0, 0, 0)
    return (jax.lax.dynamic_update_slice(mem_k, kb.astype(mem_k.dtype), start),
            jax.lax.dynamic_update_slice(mem_v, vb.astype(mem_v.dtype), start))


@functools.lru_cache(maxsize=8)
def _chunk_fns(config, top_k: int, selection: str):
    """Jitted per-chunk functions of one config: the whole model on device, and the per-layer
    pieces of the host-offload path."""
    model = LandmarkTransformer(config)
    block = LandmarkBlock(config)
    L = config.landmark_block

    @jax.jit
    def device_chunk(params, tokens, positions, mems, n_mem):
        x = model.apply({"params": params}, tokens, method=lambda m, t: m.embed(t))
        new_mems = []
        for i in range(config.n_layer):
            mk, mv = mems[i]
            cache = {"mem_k": mk, "mem_v": mv, "n_mem": n_mem, "top_k": top_k,
                     "selection": selection}
            x, new = block.apply({"params": params[f"blocks_{i}"]}, x, positions, None, cache, None)
            new_mems.append(_append_blocks(mk, mv, n_mem, new["k"], new["v"], L))
        logits = model.apply({"params": params}, x,
                             method=lambda m, h: m.logits(m.final_norm(h)))
        return logits, new_mems

    @jax.jit
    def select(layer_params, x, positions, lm_k, n_mem):
        cache = {"mem_k": None, "lm_k": lm_k, "n_mem": n_mem, "top_k": top_k,
                 "selection": selection, "select_only": True}
        _, out = block.apply({"params": layer_params}, x, positions, None, cache, None)
        return out["idx"]

    @jax.jit
    def layer(layer_params, x, positions, lm_k, n_mem, mk, mv, idx):
        cache = {"mem_k": None, "lm_k": lm_k, "n_mem": n_mem, "retrieved": (mk, mv, idx)}
        return block.apply({"params": layer_params}, x, positions, None, cache, None)

    embed = jax.jit(lambda p, t: model.apply({"params": p}, t, method=lambda m, t: m.embed(t)))
    head = jax.jit(lambda p, h: model.apply({"params": p}, h,
                                           method=lambda m, h: m.logits(m.final_norm(h))))
    return device_chunk, select, layer, embed, head


def memory_forward(config, params, tokens, *, chunk_len: int, top_k: Optional[int] = None,
                   selection: Optional[str] = None, offload: Optional[str] = None,
                   max_blocks: Optional[int] = None, return_stats: bool = False):
    """Logits ``[B, N, V]`` of a with-landmark input ``tokens [B, N]`` processed chunk by chunk
    with a retrieval memory (module docstring).

    ``tokens``: integer ids in ``[0, vocab_size)``, shape ``[B, N]``, with ``landmark_token``
    at every position ``t % L == L - 1`` (:func:`insert_landmarks`); otherwise ``ValueError``.
    ``chunk_len``: a positive multiple of ``landmark_block``.  ``top_k`` (a positive int) /
    ``selection``: default the config's ``mem_top_k`` / ``mem_selection``.  ``offload``: None
    (memory on the device) or ``"host"`` (numpy memory on the host, per-layer retrieval).
    ``max_blocks``: memory capacity in blocks, a positive int ``>= N // L`` (every complete
    block of the input is appended, the last chunk's included; default ``max(1, N // L)``).
    ``return_stats``: also return a dict with ``"chunks"``; ``"memory_bytes"``: the stored
    memory (keys and values of all layers); ``"device_memory_bytes"``: the part of the stored
    memory resident on the device between chunks (``memory_bytes``, or 0 with
    ``offload="host"``: transient per-layer copies are not counted here);
    ``"device_transfer_bytes"``: with ``offload="host"``, the peak bytes sent to the device for
    one layer of one chunk (the landmark keys ``[B, M, Hkv, Dh]`` plus the gathered keys and
    values ``[B, Hq, C, k, L, Dh]`` each; this can exceed ``memory_bytes``), 0 without offload.
    """
    c = config
    if not isinstance(c, LandmarkConfig):
        raise ValueError(f"memory_forward needs a landmark config, got {type(c).__name__}")
    L = c.landmark_block
    if not _is_int(chunk_len) or chunk_len < L or chunk_len % L:
        raise ValueError(f"chunk_len must be a positive multiple of landmark_block={L}, got "
                         f"{chunk_len!r}")
    if c.scan_layers:
        raise ValueError("memory_forward needs scan_layers=False (per-layer memories)")
    return_stats = check_flag("return_stats", return_stats)  # a string "no" is not read by truthiness
    top_k = c.mem_top_k if top_k is None else top_k
    selection = c.mem_selection if selection is None else selection
    _choice("selection", selection, SELECTIONS)
    _choice("offload", offload, (None, "host"))
    if not _is_int(top_k) or top_k < 1:
        raise ValueError(f"top_k must be a positive int (not a bool), got {top_k!r}")
    top_k, chunk_len = int(top_k), int(chunk_len)
    tokens = jnp.asarray(tokens)
    check_tokens(tokens, c.vocab_size)                     # [B, N >= 1] integers in range
    lm_pos = np.asarray(tokens[:, L - 1::L])
    if lm_pos.size and not np.all(lm_pos == c.landmark_token):
        bad = int(np.nonzero(np.any(lm_pos != c.landmark_token, axis=0))[0][0]) * L + L - 1
        raise ValueError(f"tokens must hold landmark_token={c.landmark_token} at every position "
                         f"t % {L} == {L - 1} (a with-landmark input, see insert_landmarks); "
                         f"position {bad} does not")
    tokens = tokens.astype(jnp.int32)
    b, n = tokens.shape
    need = n // L                                          # blocks appended, last chunk included
    if max_blocks is None:
        mcap = max(1, need)
    elif not _is_int(max_blocks) or max_blocks < max(1, need):
        raise ValueError(f"max_blocks must be a positive int >= {max(1, need)} (this input of "
                         f"{n} tokens appends {need} blocks of landmark_block={L}), got "
                         f"{max_blocks!r}")
    else:
        mcap = int(max_blocks)
    dt = jnp.dtype(c.dtype)
    shape = (b, mcap, L, c.kv_heads, c.dim_head)
    device_chunk, select, layer, embed, head = _chunk_fns(c, top_k, selection)
    if offload is None:
        mems = [(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(c.n_layer)]
    else:
        mems = [(np.zeros(shape, dt), np.zeros(shape, dt)) for _ in range(c.n_layer)]
    out, n_mem, transfer = [], 0, 0
    for start in range(0, n, chunk_len):
        chunk = tokens[:, start:start + chunk_len]
        cl = chunk.shape[1]
        p0 = min(n_mem, top_k) * L
        positions = jnp.broadcast_to(p0 + jnp.arange(cl, dtype=jnp.int32), (b, cl))
        nm = jnp.asarray(n_mem, jnp.int32)
        if offload is None:
            logits, mems = device_chunk(params, chunk, positions, mems, nm)
        else:
            x = embed(params, chunk)
            for i in range(c.n_layer):
                mk, mv = mems[i]
                lp = params[f"blocks_{i}"]
                lm_k = jnp.asarray(mk[:, :, L - 1])                      # landmark keys only
                idx = select(lp, x, positions, lm_k, nm)
                idx_h = np.asarray(idx)
                gk = jnp.asarray(gather_blocks(mk, idx_h, c.n_head))
                gv = jnp.asarray(gather_blocks(mv, idx_h, c.n_head))
                transfer = max(transfer, int(lm_k.nbytes) + int(gk.nbytes) + int(gv.nbytes))
                x, new = layer(lp, x, positions, lm_k, nm, gk, gv, idx)
                mems[i] = _append_blocks(mk, mv, n_mem, np.asarray(new["k"]),
                                         np.asarray(new["v"]), L)
            logits = head(params, x)
        out.append(logits)
        n_mem += cl // L
    logits = jnp.concatenate(out, axis=1)
    if not return_stats:
        return logits
    mem_bytes = sum(int(a.nbytes) + int(bb.nbytes) for a, bb in mems)
    return logits, {"chunks": len(out), "memory_bytes": mem_bytes,
                    "device_memory_bytes": 0 if offload else mem_bytes,
                    "device_transfer_bytes": transfer}


_LANDMARK_PRESETS = {
    "tiny": {**_GPT_STYLE, **GPT_PRESETS["tiny"], "landmark_block": 16},
    "small": {**_GPT_STYLE, **GPT_PRESETS["small"], "landmark_block": 51},
    # the paper's block (50 tokens + landmark) at GPT-small width, T=512 with landmarks
    "gpu": {**_GPT_STYLE, **GPT_PRESETS["small"], "landmark_block": 51, "max_seq_len": 1024},
}
register("landmark", LandmarkConfig, LandmarkTransformer, _LANDMARK_PRESETS,
         description="Landmark attention: grouped softmax over per-block landmark tokens, "
                     "top-k block retrieval for long inputs")
