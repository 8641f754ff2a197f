"""Perplexity of a landmark model through its retrieval memory: ``landmark_cross_entropy`` with
``mem_chunk_len`` reads the logits of ``memory_forward`` (windows longer than ``max_seq_len``
allowed), and ``experiments.evaluate --memory-chunk`` measures it on a trained run."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.models.landmark import insert_landmarks, landmark_cross_entropy, memory_forward

L = 4
V = 50


def _model(**kw):
    fields = dict(d_model=32, n_head=4, n_kv_head=2, n_layer=2, landmark_block=L, vocab_size=V,
                  max_seq_len=32, landmark_impl="reference")
    cfg = jf.get_config("landmark", "tiny", **{**fields, **kw})
    model = jf.build(cfg)
    return model, jax.jit(lambda r: jf.init_params(model, r))(jax.random.PRNGKey(0))


def _memory_forward_loss(cfg, params, raw, chunk):
    """Mean cross-entropy of every raw target, each read at the with-landmark position before it."""
    seq, is_lm = insert_landmarks(raw, L, cfg.landmark_token)
    logits = memory_forward(cfg, params, jnp.asarray(seq[:, :-1]), chunk_len=chunk)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(seq[:, 1:]))
    w = ~np.asarray(is_lm[:, 1:])
    return float(jnp.sum(jnp.where(w, ce, 0.0)) / w.sum())


@pytest.mark.parametrize("chunk,top_k,selection,raw_len", [
    (8, 2, "per_head", 97),     # windows 4x max_seq_len (with landmarks), ends inside a block
    (12, 1, "shared", 60),
])
def test_memory_loss_is_memory_forwards(chunk, top_k, selection, raw_len):
    model, params = _model(mem_chunk_len=chunk, mem_top_k=top_k, mem_selection=selection)
    raw = np.random.default_rng(0).integers(0, V - 1, (2, raw_len + 1)).astype(np.int32)
    loss, metrics = jax.jit(lambda p, b: landmark_cross_entropy(model, p, b))(
        params, {"tokens": jnp.asarray(raw)})
    want = _memory_forward_loss(model.config, params, raw, chunk)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert int(metrics["n_targets"]) == 2 * raw_len
    # the memory matters: the full forward (same windows, positions past max_seq_len) differs,
    # by far more than the tolerance above (at init the predictions are near uniform)
    full, _ = landmark_cross_entropy(jf.build(model.config.replace(mem_chunk_len=None)), params,
                                     {"tokens": jnp.asarray(raw)})
    assert abs(float(full) - want) > 4e-4


def test_memory_loss_with_every_block_retrieved_is_the_plain_loss():
    model, params = _model(mem_chunk_len=8, mem_top_k=6)
    raw = np.random.default_rng(1).integers(0, V - 1, (2, 24)).astype(np.int32)
    mask = np.ones(raw.shape, np.float32)
    mask[0, 5:9] = 0                                       # a loss_mask is carried as before
    batch = {"tokens": jnp.asarray(raw), "loss_mask": jnp.asarray(mask)}
    got, gm = landmark_cross_entropy(model, params, batch)
    want, wm = landmark_cross_entropy(jf.build(model.config.replace(mem_chunk_len=None)), params, batch)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert float(gm["n_targets"]) == float(wm["n_targets"]) == 2 * 23 - 4
