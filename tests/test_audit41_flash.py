"""Audit 41 (flash attention kernel + attention dispatcher): regression tests.

Each test failed before its fix: a ``(None, kv_ids)`` segment pair silently dropped the
segment mask in the kernel; a window of ``2**31 - 1`` ("unbounded") overflowed the kernel's
int32 position arithmetic (non-causal: wrong output) and a wider one raised an
``OverflowError``; 64-bit segment ids (``jax_enable_x64``) wrapped to int32 and merged
documents; invalid Triton knobs in ``BlockSizes`` passed validation; the exported
``xla_attention`` read ``causal="no"`` as True and ``window=0`` as "mask everything".
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.ops import attention, xla_attention
from pallas_kernels.flash_attention import BlockSizes, flash_attention, reference

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BS = BlockSizes(16, 16)


def _qkv(t=16, hq=2, hkv=1, d=16):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(ks[0], (1, t, hq, d)), jax.random.normal(ks[1], (1, t, hkv, d)),
            jax.random.normal(ks[2], (1, t, hkv, d)))


def _dense(q, k, v, mask):
    """float64 masked softmax attention (GQA by repeat), 0 for rows without a visible key."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(mask[:, None], np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    p /= np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("missing", [0, 1])
def test_segment_pair_with_a_none_member_is_refused(missing):
    """``(None, kv_ids)`` ran the kernel without any segment mask (and ``(q_ids, None)`` was an
    AttributeError): every entry point now names the missing array."""
    q, k, v = (np.asarray(x) for x in _qkv())
    ids = np.asarray([[0] * 8 + [1] * 8], np.int32)
    pair = (None, ids) if missing == 0 else (ids, None)
    name = "q_ids" if missing == 0 else "kv_ids"
    for fn in (lambda s: flash_attention(q, k, v, causal=False, segment_ids=s, block_sizes=BS),
               lambda s: reference(q, k, v, causal=False, segment_ids=s),
               lambda s: attention(q, k, v, causal=False, segment_ids=s, implementation="xla"),
               lambda s: attention(q, k, v, causal=False, segment_ids=s, implementation="pallas")):
        with pytest.raises(ValueError, match=f"None for {name}"):
            fn(pair)


def test_window_wider_than_int32_positions_is_no_window(monkeypatch):
    """A window of ``2**31 - 1`` (a common "unbounded" value) or wider hides nothing.  The kernel
    computed ``pos + w`` in int32 (non-causal: overflow, rows lost their keys); wider windows
    raised ``OverflowError`` in the kernel, the reference and the XLA path, and went to cuDNN as
    a window length past int32."""
    q, k, v = _qkv()
    i, j = np.arange(16)[:, None], np.arange(16)[None]
    for causal in (False, True):
        want = _dense(q, k, v, (j <= i)[None] if causal else np.ones((1, 16, 16), bool))
        for w in (2**31 - 1, 2**40):
            outs = jax.jit(lambda q, k, v: (
                flash_attention(q, k, v, causal=causal, window=w, block_sizes=BS),
                reference(q, k, v, causal=causal, window=w),
                attention(q, k, v, causal=causal, window=w, implementation="xla"),
                attention(q, k, v, causal=causal, window=w, q_offset=0, implementation="xla")),
                compiler_options=FAST_COMPILE)(q, k, v)
            for name, o in zip(("flash", "reference", "xla", "xla q_offset"), outs):
                np.testing.assert_allclose(np.asarray(o), want, atol=2e-5,
                                           err_msg=f"{name} causal={causal} window={w}")
    # the cuDNN branch (emulated by JAX's XLA implementation) gets no window (it hides nothing)
    attn_mod = importlib.import_module("jaxformers.ops.attention")
    real, seen = jax.nn.dot_product_attention, {}

    def fake(*a, implementation=None, **kw):
        seen.update(kw)
        return real(*a, implementation="xla", **kw)
    monkeypatch.setattr(attn_mod, "select_implementation", lambda *a, **kw: "cudnn")
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    out = attention(q, k, v, causal=True, window=2**40)
    assert seen["local_window_size"] is None
    np.testing.assert_allclose(np.asarray(out), _dense(q, k, v, (j <= i)[None]), atol=2e-5)


def test_x64_segment_ids_wider_than_32_bits_stay_distinct():
    """Under ``jax_enable_x64`` ids are int64; the kernel cast them to int32, so documents ``0``
    and ``2**32`` became one.  Now they are ranked (equality and order kept) first."""
    q, k, v = _qkv()
    ct = jnp.ones_like(q)
    with jax.enable_x64(True):
        ids = jnp.asarray([[0] * 5 + [2**32] * 6 + [-2**40] * 5], jnp.int64)
        mask = np.asarray(ids[:, :, None] == ids[:, None, :]) & (np.arange(16)[:, None] >= np.arange(16))
        for seg in (ids, (ids, ids)):
            o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, block_sizes=BS),
                             q, k, v)
            grads = vjp(ct)
            np.testing.assert_allclose(np.asarray(o), _dense(q, k, v, mask), atol=2e-5)
            want = jax.vjp(lambda q, k, v: reference(q, k, v, segment_ids=seg), q, k, v)[1](ct)
            for g, w in zip(grads, want):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)


@pytest.mark.parametrize("field, value, match", [
    ("num_warps", 3, "block_sizes.num_warps must be None or a positive power of two"),
    ("num_warps_bwd", 6, "block_sizes.num_warps_bwd must be None or a positive power of two"),
    ("num_stages", 0, "block_sizes.num_stages must be a positive int"),
    ("num_stages_bwd", 1.5, "block_sizes.num_stages_bwd must be a positive int"),
    ("block_q_dq", 0, "block_sizes.block_q_dq must be None or a positive power of two"),
    ("block_q", True, "block_sizes.block_q must be a positive power of two"),
])
def test_block_sizes_knobs_are_validated(field, value, match):
    """``num_warps=3`` only failed when Triton compiled the kernel on a GPU (an AssertionError);
    ``block_q_dq=0`` silently meant the default; ``block_q=True`` a 1-row tile."""
    q = np.zeros((1, 32, 2, 16), np.float32)
    bs = BlockSizes(16, 16, **{field: value}) if field not in ("block_q",) else BlockSizes(value, 16)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, q, q, block_sizes=bs)


def test_block_sizes_accept_numpy_ints():
    """A numpy int block size was refused with the message "must be a power of two, got 16"."""
    q, k, v = _qkv(t=20, hkv=2)
    bs = BlockSizes(np.int64(16), np.int32(16), num_warps=np.int64(4))
    got = flash_attention(q, k, v, block_sizes=bs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(flash_attention(q, k, v, block_sizes=BS)))


@pytest.mark.parametrize("bad, match", [
    (dict(window=0), "window must be a positive int"),
    (dict(window=-3), "window must be a positive int"),
    (dict(causal="no"), "causal must be a bool"),
    (dict(q_offset=np.zeros((3,), np.int32)), "q_offset"),
])
def test_xla_attention_validates_like_attention(bad, match):
    """The exported ``xla_attention`` took ``window=0`` (all-zero output) and ``causal="no"``
    (read as causal) without a word; ``attention`` refused both."""
    q, k, v = _qkv(t=8)
    with pytest.raises(ValueError, match=match):
        xla_attention(q, k, v, **bad)
