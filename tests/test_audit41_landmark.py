"""Regression tests of the landmark-attention audit (stop 41): retrieval with ``shared`` selection
over many stored blocks, and clear errors on bad inputs of the reference and the model helpers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.models.landmark import insert_landmarks, memory_forward, remove_landmarks, select_blocks, \
    with_landmarks
from pallas_kernels.landmark_attention import landmark_attention_reference, landmark_masks, tpu_vmem_bytes


@pytest.mark.parametrize("m, gap", [(200, 0.01), (2000, 0.1), (20000, 1.0)])
def test_shared_selection_ranks_many_blocks_by_their_scores(m, gap):
    """``shared`` scores are probabilities (~1 / M each); the tie tolerance was an absolute 1e-4,
    so with M = 20000 stored blocks even an e-fold better block tied with all others and the
    earliest block was retrieved instead (per-head selection picked the right one)."""
    d, best = 8, 3 * m // 4
    q = jnp.zeros((1, 1, 1, d)).at[..., 0].set(1.0)
    lm = np.zeros((1, m, 1, d), np.float32)
    lm[0, best, 0, 0] = gap * np.sqrt(d)                      # score `gap` above every other block
    for selection in ("per_head", "shared"):
        idx = select_blocks(q, jnp.asarray(lm), m, 1, selection)
        assert int(idx[0, 0, 0, 0]) == best, selection
    idx = select_blocks(q, jnp.asarray(lm), m, 3, "shared")   # then exact ties: the earliest
    np.testing.assert_array_equal(idx[0, 0, 0], [0, 1, best])


def test_shared_selection_keeps_exact_ties_and_empty_slots_last():
    q = jnp.ones((1, 1, 2, 4))
    lm = jnp.ones((1, 6, 2, 4))                                 # every block ties
    np.testing.assert_array_equal(select_blocks(q, lm, 6, 2, "shared")[0, 0, 0], [0, 1])
    np.testing.assert_array_equal(select_blocks(q, lm, 1, 3, "shared")[0, 0, 0], [0, 1, 2])


@pytest.mark.parametrize("tq, t, kw, match", [
    (8, 4, {}, "Tq=8 > T=4"),                                  # rows 0..3 were NaN
    (2, 8, dict(q_offset=-1), "q_offset must be in"),          # row 0 was NaN
    (2, 8, dict(q_offset=7), "q_offset must be in"),           # a query past the keys: silent values
])
def test_reference_refuses_queries_outside_the_keys(tq, t, kw, match):
    q, k = jnp.ones((1, tq, 1, 4)), jnp.ones((1, t, 1, 4))
    with pytest.raises(ValueError, match=match):
        landmark_attention_reference(q, k, k, block_size=4, **kw)


def test_reference_q_offset_in_range_and_traced_still_work():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, 1, 4)), jnp.float32) for n in (2, 8, 8))
    full = landmark_attention_reference(jnp.zeros((1, 8, 1, 4)).at[:, 6:].set(q), k, v, block_size=4)
    got = landmark_attention_reference(q, k, v, block_size=4, q_offset=6)
    np.testing.assert_allclose(got, full[:, 6:], atol=1e-6)
    traced = jax.jit(lambda o: landmark_attention_reference(q, k, v, block_size=4, q_offset=o))(6)
    np.testing.assert_allclose(traced, got, atol=1e-6)


@pytest.mark.parametrize("block_size", [0, 1, 2.5])
def test_landmark_masks_and_remove_landmarks_check_block_size(block_size):
    """block_size 0 / 1 / 2.5 used to give silent nonsense (no landmark / all landmarks / an
    empty result; tpu_vmem_bytes: ZeroDivisionError or a number)."""
    with pytest.raises(ValueError, match="block_size must be an int >= 2"):
        landmark_masks(8, block_size)
    with pytest.raises(ValueError, match="block_size must be an int >= 2"):
        tpu_vmem_bytes((1, 8, 1, 8), (1, 8, 1, 8), jnp.float32, block_size=block_size)
    with pytest.raises(ValueError, match="block_size must be an int >= 2"):
        remove_landmarks(np.arange(8)[None], block_size)


def test_with_landmarks_refuses_a_misaligned_loss_mask():
    """Used to fail inside jnp's broadcasting (TypeError: incompatible shapes (1, 10), (1, 9))."""
    with pytest.raises(ValueError, match=r"loss_mask must be aligned with tokens \(1, 8\)"):
        with_landmarks({"tokens": jnp.arange(8)[None], "loss_mask": np.ones((1, 7))}, 4, 63)


def test_memory_forward_accepts_a_numpy_int_chunk_len():
    """``chunk_len=np.int64(8)`` was refused as 'must be a positive multiple of 4, got 8'
    (top_k / max_blocks accepted numpy ints)."""
    cfg = jf.get_config("landmark", "tiny", d_model=32, n_head=2, n_layer=1, landmark_block=4,
                        vocab_size=64, max_seq_len=64, landmark_impl="reference")
    params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
    seq, _ = insert_landmarks(np.arange(1, 13, dtype=np.int32)[None], 4, 63)
    want = memory_forward(cfg, params, seq, chunk_len=8)
    np.testing.assert_array_equal(memory_forward(cfg, params, seq, chunk_len=np.int64(8)), want)
    with pytest.raises(ValueError, match="chunk_len must be a positive multiple"):
        memory_forward(cfg, params, seq, chunk_len=np.int64(6))
