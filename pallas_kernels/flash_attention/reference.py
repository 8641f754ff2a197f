"""Plain-JAX float32 attention: the oracle for the Pallas kernel.

Shapes: q ``[B, Tq, Hq, D]``, k/v ``[B, Tk, Hkv, D]`` with ``Hq % Hkv == 0``
(query head ``h`` reads kv head ``h // (Hq // Hkv)``).  Query ``i`` sits at
absolute position ``Tk - Tq + i``.  Rows that see no key return zeros.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .._common import check_flag, check_int, check_qkv, concrete_real, shape_of


def attention_mask(tq: int, tk: int, causal: bool = True, window: int | None = None,
                   q_ids: jax.Array | None = None, kv_ids: jax.Array | None = None) -> jax.Array:
    """Boolean visibility mask ``[B or 1, Tq, Tk]`` (True = key visible).

    Query ``i`` is at position ``Tk - Tq + i``.  causal: ``j <= pos``; with
    ``window`` w: ``pos - w < j`` (non-causal: ``|pos - j| < w``); with segment
    ids ``q_ids [B, Tq]`` / ``kv_ids [B, Tk]``: ``q_ids[i] == kv_ids[j]`` (``kv_ids`` None:
    ``q_ids``, which needs ``Tq == Tk``).  ``window``: as for the kernel (:func:`static_window`: a
    window <= 0 hid every key, silently).  ``tq`` / ``tk``: ints >= 0 (numpy ints too), ``causal``
    a bool; each bad argument is a ``ValueError`` naming it.
    """
    tq, tk = check_int("tq", tq, minimum=0), check_int("tk", tk, minimum=0)
    causal = check_flag("causal", causal)
    window = static_window(window)
    if q_ids is not None:
        kv_ids = q_ids if kv_ids is None else kv_ids
        check_ids(q_ids, kv_ids, (shape_of(q_ids) or (None,))[0], tq, tk)
    pos = (tk - tq) + jnp.arange(tq, dtype=jnp.int32)[:, None]
    j = jnp.arange(tk, dtype=jnp.int32)[None, :]
    mask = jnp.ones((tq, tk), dtype=bool)
    if causal:
        mask &= j <= pos
    if window is not None:
        mask &= j > pos - window
        if not causal:
            mask &= j < pos + window
    mask = mask[None]
    if q_ids is not None:
        mask = mask & (q_ids[:, :, None] == kv_ids[:, None, :])
    return mask


def split_segment_ids(segment_ids, tq: int, tk: int):
    """``None | [B, T] | (q_ids [B, Tq], kv_ids [B, Tk])`` -> ``(q_ids, kv_ids)`` or ``(None, None)``."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be a [B, T] array or a (q_ids, kv_ids) pair, "
                             f"got a sequence of length {len(segment_ids)}")
        if segment_ids[0] is None or segment_ids[1] is None:
            raise ValueError("segment_ids as a (q_ids, kv_ids) pair needs both arrays, got None for "
                             f"{'q_ids' if segment_ids[0] is None else 'kv_ids'}")
        return segment_ids[0], segment_ids[1]
    if tq != tk:
        raise ValueError(f"segment_ids given as one [B, T] array needs Tq == Tk (got Tq={tq}, "
                         f"Tk={tk}); pass a (q_ids, kv_ids) pair instead")
    return segment_ids, segment_ids


def check_ids(q_ids, kv_ids, b: int, tq: int, tk: int) -> None:
    """``ValueError`` unless ``q_ids`` / ``kv_ids`` (from :func:`split_segment_ids`) are None or
    integer arrays ``[B, Tq]`` / ``[B, Tk]``."""
    if q_ids is None:
        return
    for name, ids, t in (("q", q_ids, tq), ("kv", kv_ids, tk)):
        if not (hasattr(ids, "ndim") and hasattr(ids, "dtype")):  # e.g. a (nested) list
            raise ValueError(f"segment_ids ({name} ids) must be an integer array of shape [B, T] = "
                             f"{(b, t)} (or a (q_ids, kv_ids) pair of arrays), got {type(ids).__name__}")
        if ids.ndim != 2 or ids.shape != (b, t):
            raise ValueError(f"segment_ids ({name} ids) must have shape [B, T] = {(b, t)}, got {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers, got {ids.dtype}")


def static_window(window):
    """``window`` as a Python int (it is static: the kernels' masks and block ranges derive from
    it), or None.  Concrete integer scalars (``4``, ``np.int64(4)``, ``jnp.int32(4)``) are
    converted; a traced one, a non-integer or a value <= 0 raises a ``ValueError``."""
    if window is None:
        return None
    if isinstance(window, int) and not isinstance(window, bool):  # any size (2**70: no window)
        if window <= 0:
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        return window
    try:
        value = np.asarray(window)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        raise ValueError("window must be a concrete positive int (a static argument of the kernels), "
                         "got a traced value") from None
    if value.shape != () or value.dtype == bool or not np.issubdtype(value.dtype, np.integer) or value <= 0:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    return int(value)


def static_sm_scale(sm_scale):
    """``sm_scale`` as a Python float (it is static: baked into the kernels), or None.

    Concrete scalars of any kind (``0.1``, ``np.float32(0.1)``, ``jnp.float32(0.1)``)
    are converted; a traced value (computed inside ``jit``), or a value that is not a finite
    number > 0 (NaN, inf, 0 or negative: NaN / uniform / inverted attention), raises ``ValueError``.
    """
    if sm_scale is None:
        return None
    return _positive_scale(concrete_real("sm_scale", sm_scale, "a static argument of the kernels"))


def _positive_scale(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"sm_scale must be a finite number > 0 (None: 1/sqrt(head_dim)), got {value!r}")
    return value


def reference_sm_scale(sm_scale, d: int):
    """The oracles' logit scale: ``d ** -0.5`` for None; a concrete value must pass the kernels'
    rule (:func:`static_sm_scale`: a finite real scalar > 0, else ``ValueError``); a traced one
    (the oracles are plain JAX, e.g. differentiated in the scale) is used as it is, unchecked."""
    if sm_scale is None:
        return d ** -0.5
    if isinstance(sm_scale, jax.core.Tracer):
        return sm_scale
    return static_sm_scale(sm_scale)


def effective_window(window, tq: int, tk: int):
    """``window``, or None when it hides nothing: ``|pos - j| <= max(Tq, Tk) - 1`` for every
    query / key pair, so a wider window (e.g. ``2**31 - 1`` as "unbounded") is no window, and
    never reaches int32 position arithmetic, where ``pos + w`` would overflow."""
    return None if window is None or window >= max(tq, tk) else window


def reference(q, k, v, *, causal=True, segment_ids=None, window=None, sm_scale=None,
              block_sizes=None, interpret=None):
    """``softmax(q k^T * sm_scale + mask) v`` in float32; returns ``[B, Tq, Hq, D]`` in q.dtype.

    ``sm_scale``: a concrete value must be a finite number > 0 as for the kernel (else
    ``ValueError``); a traced one is used unchecked (the kernels bake the scale in as a static
    Python float and refuse a traced one; the oracle is plain JAX, so it can be jitted and
    differentiated in the scale, which callers rely on).  Float64 inputs (``jax_enable_x64``) are computed in float32 too (float64 result at
    float32 precision, like the kernel).  ``block_sizes`` and ``interpret`` are accepted
    (and ignored) so the oracle
    is call-compatible with :func:`flash_attention`.
    """
    del block_sizes, interpret
    # the kernel's argument checks: a window <= 0 used to mask every key (zeros out), Hq % Hkv
    # != 0 to fail deep in a reshape, a string causal to be read by truthiness
    check_qkv(q, k, v, self_attention=False)
    causal = check_flag("causal", causal)
    window = static_window(window)
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = reference_sm_scale(sm_scale, d)
    q_ids, kv_ids = split_segment_ids(segment_ids, tq, tk)
    check_ids(q_ids, kv_ids, b, tq, tk)
    window = effective_window(window, tq, tk)
    qf = q.astype(jnp.float32).reshape(b, tq, hkv, g, d)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf, precision=hi) * scale
    mask = attention_mask(tq, tk, causal, window, q_ids, kv_ids)[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, vf, precision=hi)
    return o.reshape(b, tq, hq, d).astype(q.dtype)
