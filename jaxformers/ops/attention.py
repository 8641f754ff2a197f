"""One attention entry point for every model, dispatching to an implementation.

    attention(q, k, v, *, causal, segment_ids, window, q_offset, sm_scale, implementation)

q ``[B, Tq, Hq, D]``, k/v ``[B, Tk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA: query
head h reads kv head ``h // (Hq // Hkv)``), all three of one floating dtype on every
implementation (``ValueError`` otherwise: cast e.g. a KV cache to ``q.dtype`` first).
Query i sits at absolute position ``q_offset + i`` (default ``Tk - Tq``: queries aligned
with the last keys) and sees key j when

    causal:      j <= q_offset + i
    window w:    j >  q_offset + i - w        (|q_offset + i - j| < w when not causal)
    segments:    q_ids[i] == kv_ids[j]

o = softmax(q k^T * sm_scale + mask) v, float32 accumulation; rows that see no
key output zeros.

Implementations: ``"xla"`` (the reference, any backend), ``"cudnn"``
(``jax.nn.dot_product_attention`` on GPU), ``"pallas"``
(``pallas_kernels.flash_attention``), ``"auto"`` (fastest eligible one).

``"auto"`` by backend:

* GPU: cuDNN for what it expresses (dense / causal / causal window: cuDNN has no
  right-hand window, so a non-causal window is not its), else the Pallas (Triton)
  kernel for ``Tq >= 128``, else XLA.
* TPU: the Pallas kernel (its Mosaic variant) for ``Tq >= 128`` when the VMEM
  its block specs imply fits :data:`TPU_VMEM_BUDGET`; XLA for short decode
  queries (the TPU variant pads Tq to a 128-row tile) and for sequences too
  long for that budget.
* CPU: XLA.

On paper, against JAX's shipped TPU *splash attention*
(``jax.experimental.pallas.ops.tpu.splash_attention``): both run causal,
sliding-window and segment-id masks with block skipping and avoid repeating
K/V for GQA (splash through its MQA kernel per kv head; ours reads kv head
``h // group`` directly and sums dK/dV over the group in-kernel).  Splash
takes arbitrary block-sparse masks (precomputed mask info, scalar-prefetched)
and extras such as logit soft-capping; ours supports only the masks above
plus decode alignment (queries aligned with the last keys).  Memory: splash
streams K/V blocks through the grid with VMEM scratch accumulators, so its
VMEM per step is independent of the sequence length; ours keeps one head's
whole (padded) K/V sequence in VMEM in the forward and dQ kernels (and one GQA
group's whole Q/dO in dK/dV), so its VMEM grows with T and it stops fitting at
long sequences, where ``auto`` falls back to XLA.  HBM is O(T) for both (no
T x T matrix).  ``auto`` picks ours, not splash, because it is the kernel this
project tests against its reference on every mask and shape (TPU interpret
mode, ``tests/test_tpu_lowering.py``) with the same semantics as the GPU path;
it has not been timed on a TPU, and splash is very likely faster and scales
to longer sequences.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
TPU_VMEM_BUDGET = 16 * 2**20  # the default scoped VMEM limit of the smallest current TPU (v5e)
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def _split_segments(segment_ids, tq, tk, batch=None):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be a [B, T] array or a (q_ids, kv_ids) pair")
        q_ids, kv_ids = segment_ids
        if q_ids is None or kv_ids is None:
            raise ValueError("segment_ids as a (q_ids, kv_ids) pair needs both arrays, got None for "
                             f"{'q_ids' if q_ids is None else 'kv_ids'}")
    else:
        if tq != tk:
            raise ValueError(
                f"segment_ids as one array needs Tq == Tk (got {tq} and {tk}); pass a (q_ids, kv_ids) pair")
        q_ids = kv_ids = segment_ids
    for ids in (q_ids, kv_ids):
        if not (hasattr(ids, "ndim") and hasattr(ids, "shape") and hasattr(ids, "dtype")):  # e.g. a list
            raise ValueError(f"segment_ids must be an integer array [B, T] or a (q_ids, kv_ids) pair of "
                             f"arrays, got {type(ids).__name__}")
    b = q_ids.shape[0] if batch is None and q_ids.ndim == 2 else batch
    if q_ids.ndim != 2 or q_ids.shape != (b, tq) or kv_ids.ndim != 2 or kv_ids.shape != (b, tk):
        raise ValueError(f"segment_ids must have shapes [B, Tq] = {(b, tq)} and [B, Tk] = {(b, tk)}, "
                         f"got {q_ids.shape} and {kv_ids.shape}")
    for ids in (q_ids, kv_ids):
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers, got {ids.dtype}")
    return q_ids, kv_ids


def attention_mask(tq, tk, *, causal=True, window=None, q_offset=None, q_ids=None, kv_ids=None):
    """Boolean visibility mask ``[B or 1, Tq, Tk]`` (True = key visible)."""
    from pallas_kernels.flash_attention.reference import static_window

    window = static_window(window)  # (0 or a negative one hid every key, silently)
    if q_offset is None:
        q_offset = tk - tq
    if window is not None:  # positions are int32; any window >= 2**31 - 1 hides the same keys
        window = min(int(window), np.iinfo(np.int32).max)
    q_offset = jnp.asarray(q_offset, jnp.int32).reshape(-1, 1, 1)  # [B or 1, 1, 1]
    qpos = q_offset + jnp.arange(tq, dtype=jnp.int32)[None, :, None]
    kpos = jnp.arange(tk, dtype=jnp.int32)[None, None, :]
    mask = jnp.ones((1, tq, tk), bool)
    if causal:
        mask = mask & (kpos <= qpos)
        if window is not None:
            mask = mask & (kpos > qpos - window)
    elif window is not None:
        mask = mask & (jnp.abs(qpos - kpos) < window)
    if q_ids is not None:
        mask = mask & (q_ids[:, :, None] == kv_ids[:, None, :])
    return mask


def xla_attention(q, k, v, *, causal=True, segment_ids=None, window=None, q_offset=None, sm_scale=None,
                  dropout_rate: float = 0.0, dropout_rng=None):
    """Reference attention in plain XLA (float32 softmax). Shapes as :func:`attention`.
    ``dropout_rate`` > 0 with a ``dropout_rng``: inverted dropout on the probabilities.
    ``sm_scale`` as for :func:`attention`: a concrete one must be a finite number > 0
    (``ValueError``: 0, negative or NaN gave uniform, inverted or NaN attention), a traced one
    is used unchecked."""
    window = _check_shapes(q, k, v, window)
    _check_args(q, causal, q_offset)
    _check_dropout(dropout_rate)
    from pallas_kernels.flash_attention.reference import reference_sm_scale

    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = reference_sm_scale(sm_scale, d)  # the oracles' rule: d**-0.5, checked, or traced as is
    q_ids, kv_ids = _split_segments(segment_ids, tq, tk, b)
    qg = q.reshape(b, tq, hkv, g, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(tq, tk, causal=causal, window=window, q_offset=q_offset,
                          q_ids=q_ids, kv_ids=kv_ids)[:, None, None]  # [B|1, 1, 1, Tq, Tk]
    s = jnp.where(mask, s, _NEG)
    m = jnp.max(s, axis=-1, keepdims=True, initial=_NEG)  # (Tk = 0: no keys, zeros out)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    if dropout_rate and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, p.shape)
        p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, tq, hq, d).astype(q.dtype)


def _cudnn_reason(q, k, segment_ids, window, q_offset, causal=True):
    """Why cuDNN cannot run this call (None when it can)."""
    if jax.default_backend() != "gpu":
        return f"cudnn needs a GPU backend (default backend is {jax.default_backend()!r})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cudnn needs bfloat16/float16 inputs, got {q.dtype}"
    if k.dtype != q.dtype:
        return f"cudnn needs q and k/v of one dtype, got q {q.dtype} and k {k.dtype}"
    if segment_ids is not None:
        return "cudnn path does not take segment_ids"
    if q_offset is not None or q.shape[1] != k.shape[1]:
        return "cudnn path needs Tq == Tk and no q_offset"
    if q.shape[-1] > 128 or q.shape[-1] % 8:
        return f"cudnn path needs head_dim <= 128 and a multiple of 8, got {q.shape[-1]}"
    if window is not None and not causal:
        return "cudnn has no right-hand window: a sliding window needs causal=True there"
    return None


def _pallas_reason(q, k, q_offset):
    if q_offset is not None:
        return "pallas kernel aligns queries with the last keys; q_offset is not supported"
    try:
        import pallas_kernels.flash_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the checkout
        return f"pallas_kernels.flash_attention is not importable ({e})"
    return None


def select_implementation(q, k, *, segment_ids=None, window=None, q_offset=None, implementation="auto",
                          causal=True):
    """Resolve ``implementation`` ("auto" -> the fastest eligible) for these inputs."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not allowed; choose one of {list(IMPLEMENTATIONS)}")
    if implementation == "xla":
        return "xla"
    if implementation == "cudnn":
        reason = _cudnn_reason(q, k, segment_ids, window, q_offset, causal)
        if reason:
            raise ValueError(f"implementation='cudnn' cannot run here: {reason}")
        return "cudnn"
    if implementation == "pallas":
        reason = _pallas_reason(q, k, q_offset)
        if reason:
            raise ValueError(f"implementation='pallas' cannot run here: {reason}")
        return "pallas"
    # auto: dense causal -> cuDNN on GPU; masks cuDNN cannot express -> Pallas on GPU;
    # TPU -> Pallas (Mosaic) when it fits VMEM; everything else (CPU, short decode queries) -> XLA.
    backend = jax.default_backend()
    if backend == "gpu":
        if _cudnn_reason(q, k, segment_ids, window, q_offset, causal) is None:
            return "cudnn"
        if q.shape[1] >= 128 and _pallas_reason(q, k, q_offset) is None:
            return "pallas"
    if backend == "tpu" and q.shape[1] >= 128 and _pallas_reason(q, k, q_offset) is None:
        from pallas_kernels.flash_attention import tpu_vmem_bytes
        vmem = tpu_vmem_bytes(q.shape, k.shape, q.dtype, segments=segment_ids is not None)
        if max(vmem.values()) <= TPU_VMEM_BUDGET:
            return "pallas"
    return "xla"


def _check_dropout(dropout_rate):
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float, np.integer, np.floating)) \
            or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be a number in [0, 1), got {dropout_rate!r}")


def _check_args(q, causal, q_offset):
    """``causal`` a bool (a string such as ``"no"`` must not be read by truthiness) and
    ``q_offset`` None, an integer scalar or ``[B]`` integer array."""
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool (True/False), got {causal!r}")
    if q_offset is not None and jnp.shape(q_offset) not in ((), (1,), (q.shape[0],)):
        raise ValueError(f"q_offset must be None, a scalar or a [B] = [{q.shape[0]}] array, "
                         f"got shape {jnp.shape(q_offset)}")
    if q_offset is not None:  # (a float was truncated to int32 silently: 2.7 -> 2; True -> 1)
        dtype = getattr(q_offset, "dtype", None)
        dtype = np.asarray(q_offset).dtype if dtype is None else dtype
        if dtype == bool or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"q_offset must be an integer (scalar or [B] array), got dtype {dtype}")


def _check_shapes(q, k, v, window):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head_dim")
    if q.shape[-1] < 1:  # (was a ZeroDivisionError in the d ** -0.5 scale)
        raise ValueError(f"head_dim (the last axis of q, k, v) must be >= 1, got shapes {q.shape}, {k.shape}")
    # (0 kv heads: was a ZeroDivisionError; 0 query heads an empty output)
    if k.shape[2] < 1 or q.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a positive multiple of kv heads "
                         f"({k.shape[2]}, >= 1)")
    for name, x in (("q", q), ("k", k), ("v", v)):  # (integer inputs: an integer "attention" out)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    # one dtype on every path, as the kernels require (XLA promoted mixed ones, Pallas refused
    # them): no caller mixes them -- the decoding paths cast their caches to q.dtype themselves
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype} "
                         f"(cast them first, e.g. k.astype(q.dtype))")
    # the kernels' rule, shared (a concrete positive integer scalar, 0-d jax / numpy ones
    # included; traced, bool, float or <= 0: ValueError): returns it as a Python int or None
    from pallas_kernels.flash_attention.reference import static_window

    return static_window(window)


def _static_scale(sm_scale):
    """``sm_scale`` as a Python float for the kernels that bake it in (cuDNN, Pallas); the
    kernels' own rule (:func:`pallas_kernels.flash_attention.kernel.static_sm_scale`: a finite
    number > 0), with this dispatcher's hint for a traced value."""
    from pallas_kernels.flash_attention.kernel import static_sm_scale

    try:
        return static_sm_scale(sm_scale)
    except ValueError as e:
        if "traced" not in str(e):
            raise
        raise ValueError("sm_scale must be a concrete number for the cudnn / pallas attention "
                         "implementations, got a traced value: pass a Python float (or use "
                         "implementation='xla')") from None


def attention(q, k, v, *, causal: bool = True, segment_ids=None, window: Optional[int] = None,
              q_offset=None, sm_scale: Optional[float] = None, implementation: str = "auto",
              dropout_rate: float = 0.0, dropout_rng=None):
    """Scaled dot-product attention ``[B, Tq, Hq, D]`` (see module docstring).

    ``dropout_rate`` > 0 with a ``dropout_rng`` drops attention probabilities (training);
    only the XLA implementation has it (``ValueError`` for another explicit one).

    ``sm_scale``: a finite number > 0 (``ValueError`` otherwise), or a traced scalar on the XLA
    path; the cuDNN and Pallas paths need a concrete one (converted to a Python float; traced ->
    ``ValueError``).
    """
    window = _check_shapes(q, k, v, window)
    _check_args(q, causal, q_offset)
    _check_dropout(dropout_rate)
    _split_segments(segment_ids, q.shape[1], k.shape[1], q.shape[0])  # ValueError on bad ids, any impl
    if window is not None and q_offset is None and window >= max(q.shape[1], k.shape[1]):
        window = None  # hides nothing (|pos - j| < max(Tq, Tk)); keeps e.g. 2**40 out of cuDNN's int32
    if dropout_rate and dropout_rng is not None:
        if implementation not in ("auto", "xla"):
            raise ValueError(f"attention dropout runs on implementation='xla' only, got {implementation!r}")
        implementation = "xla"
    impl = select_implementation(q, k, segment_ids=segment_ids, window=window, q_offset=q_offset,
                                 implementation=implementation, causal=causal)
    if impl == "xla":  # checks a concrete sm_scale itself (the kernels' rule: > 0)
        return xla_attention(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                             q_offset=q_offset, sm_scale=sm_scale, dropout_rate=dropout_rate,
                             dropout_rng=dropout_rng)
    sm_scale = _static_scale(sm_scale)
    if impl == "cudnn":
        local = None if window is None else (window - 1, 0 if causal else window - 1)
        return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal,
                                            local_window_size=local, implementation="cudnn")
    from pallas_kernels.flash_attention import flash_attention
    from ..sharding import BATCH, attention_kernel_axes, kernel_map

    # segment ids as arrays: [B, T], or the pair (q_ids [B, Tq], kv_ids [B, Tk])
    seg = () if segment_ids is None else tuple(segment_ids) if isinstance(segment_ids, (tuple, list)) \
        else (segment_ids,)

    def kernel(q, k, v, *seg):
        ids = None if not seg else seg[0] if len(seg) == 1 else seg
        return flash_attention(q, k, v, causal=causal, segment_ids=ids, window=window, sm_scale=sm_scale)

    qa, ka = attention_kernel_axes(k.shape[2])  # on a mesh: per device (XLA cannot split a kernel)
    return kernel_map(kernel, (qa, ka, ka) + ((BATCH, None),) * len(seg), qa)(q, k, v, *seg)


def _check_index(name, x, shape):
    """An integer array of exactly ``shape`` (positions, key indices, segment ids)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an integer array of shape {shape}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers, got {x.dtype}")


def position_causal_attention(q, k, v, *, q_pos, kv_pos, q_key_index=None, segment_ids=None,
                              sm_scale: Optional[float] = None, implementation: str = "auto"):
    """Attention where query ``i`` sees key ``j`` iff ``kv_pos[j] <= q_pos[i]`` (and equal
    segment ids): causality by *position*, for key sets that hold several keys per position
    (CoTFormer's keys of earlier repeats) in any order.

    q ``[B, Tq, Hq, D]``, k/v ``[B, Tk, Hkv, D]``, q_pos ``[B, Tq]``, kv_pos ``[B, Tk]`` int;
    ``segment_ids``: ``(q_ids [B, Tq], kv_ids [B, Tk])`` or None.  Keys that no query may
    see get a position larger than every query's (e.g. ``2**30``).

    ``"xla"`` builds the ``[Tq, Tk]`` mask from the positions (fine for short sequences and
    decoding).  Every other implementation goes through :func:`attention` with a plain
    causal mask and no dense mask: keys are stably sorted by position, and each query is
    placed at the sorted row of *its own key* -- ``q_key_index[b, i]`` is the index in
    ``k`` of the key that query ``i``'s token wrote (it must have the query's position and
    segment id -- the kernel path reads a query's id from its key, ``q_ids`` only on ``"xla"``
    -- and come after every other key of that position; index, position and id are checked
    when known, a ``ValueError``) -- in a ``[B, Tk, Hq, D]`` query buffer
    (zeros elsewhere, their outputs are dropped).  Causal by sorted index then equals
    causal by position.  The kernel computes ``Tk`` query rows, ``Tk / Tq`` times what the
    real queries need (the price of not changing the kernel's mask).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not allowed; choose one of {list(IMPLEMENTATIONS)}")
    _check_shapes(q, k, v, None)
    b, tq = q.shape[:2]
    tk = k.shape[1]
    _check_index("q_pos", q_pos, (b, tq))
    _check_index("kv_pos", kv_pos, (b, tk))
    if q_key_index is not None:
        _check_index("q_key_index", q_key_index, (b, tq))
    q_ids = kv_ids = None
    if segment_ids is not None:
        if not isinstance(segment_ids, (tuple, list)) or len(segment_ids) != 2:
            raise ValueError("segment_ids must be a (q_ids [B, Tq], kv_ids [B, Tk]) pair or None")
        q_ids, kv_ids = segment_ids
        _check_index("segment_ids[0] (q_ids)", q_ids, (b, tq))
        _check_index("segment_ids[1] (kv_ids)", kv_ids, (b, tk))
    impl = implementation
    if impl == "auto" and jax.default_backend() == "cpu":
        impl = "xla"
    if impl == "xla":
        hkv = k.shape[2]
        g = q.shape[2] // hkv
        d = q.shape[-1]
        from pallas_kernels.flash_attention.reference import reference_sm_scale
        scale = reference_sm_scale(sm_scale, d)  # attention()'s rule: finite > 0, ValueError otherwise
        qg = q.reshape(b, tq, hkv, g, d)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
        mask = kv_pos[:, None, :] <= q_pos[:, :, None]
        if q_ids is not None:
            mask = mask & (q_ids[:, :, None] == kv_ids[:, None, :])
        mask = mask[:, None, None]
        s = jnp.where(mask, s, _NEG)
        m = jnp.max(s, axis=-1, keepdims=True, initial=_NEG)  # (Tk = 0: no keys, zeros out)
        p = jnp.where(mask, jnp.exp(s - m), 0.0)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        p = p / jnp.where(denom == 0.0, 1.0, denom)
        o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o.reshape(q.shape).astype(q.dtype)
    if q_key_index is None:
        raise ValueError("position_causal_attention needs q_key_index for the kernel path")
    # an index outside [0, Tk) was wrapped (-1: the last key's row, another query's output) or
    # filled silently: ValueError when known now, NaN outputs for those queries under jit
    from ..utils import concrete
    known = concrete(q_key_index)
    if known is not None and known.size and not (known.min() >= 0 and known.max() < tk):
        raise ValueError(f"q_key_index must index keys in [0, Tk={tk}), got values in "
                         f"[{int(known.min())}, {int(known.max())}]")
    # the kernel path reads each query's position and segment id from its key: a key of another
    # position or id gave another answer than "xla", silently (ValueError when known now)
    for what, q_side, kv_side in (("position", q_pos, kv_pos), ("segment id", q_ids, kv_ids)):
        qv, kvv = (None, None) if q_side is None else (concrete(q_side), concrete(kv_side))
        if known is not None and qv is not None and kvv is not None and known.size \
                and not np.array_equal(np.take_along_axis(kvv, known, axis=1), qv):
            raise ValueError(f"q_key_index must point at each query's own key, of the query's {what}: "
                             f"kv_{'pos' if what == 'position' else 'ids'}[q_key_index] != "
                             f"{'q_pos' if what == 'position' else 'q_ids'}")
    q_key_index = jnp.where((q_key_index >= 0) & (q_key_index < tk), q_key_index, tk)
    order = jnp.argsort(kv_pos, axis=1, stable=True)                      # [B, Tk]
    rank = jnp.argsort(order, axis=1)                                     # key index -> sorted row
    take = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    ks, vs = take(k, order), take(v, order)
    rows = jnp.take_along_axis(rank, q_key_index, axis=1)                 # [B, Tq]
    qbuf = jnp.zeros((b, tk) + q.shape[2:], q.dtype)
    qbuf = qbuf.at[jnp.arange(b)[:, None], rows].set(q)
    seg = None
    if q_ids is not None:
        sorted_ids = jnp.take_along_axis(kv_ids, order, axis=1)
        seg = sorted_ids
    o = attention(qbuf, ks, vs, causal=True, segment_ids=seg, sm_scale=sm_scale, implementation=impl)
    return take(o, rows)
