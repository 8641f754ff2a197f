"""The ``landmark`` model: landmark insertion + loss mask, training, decoding, and inference
with a retrieval memory (its defining invariant: with top-k >= the stored blocks the chunked
memory forward equals the full forward)."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.models.landmark import (insert_landmarks, landmark_cross_entropy, memory_forward,
                                        remove_landmarks, with_landmarks)

L = 4


@pytest.fixture(scope="module")
def tiny():
    cfg = jf.get_config("landmark", "tiny", d_model=32, n_head=2, n_layer=2, landmark_block=L,
                        vocab_size=64, max_seq_len=512)
    model = jf.build(cfg)
    params = jax.jit(lambda r: jf.init_params(model, r))(jax.random.PRNGKey(0))
    raw = np.random.default_rng(0).integers(0, 63, (1, 36)).astype(np.int32)
    seq, _ = insert_landmarks(raw, L, 63)                     # 48 tokens, 12 blocks
    full = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, jnp.asarray(seq))
    return cfg, model, params, seq, full


def test_insert_landmarks_and_loss_mask():
    raw = np.arange(1, 12, dtype=np.int32)[None]              # 11 tokens -> 3 landmarks
    seq, is_lm = insert_landmarks(raw, L, 99)
    assert seq.tolist() == [[1, 2, 3, 99, 4, 5, 6, 99, 7, 8, 9, 99, 10, 11]]
    assert np.array_equal(is_lm[0], np.arange(14) % L == L - 1)
    seq_j, _ = insert_landmarks(jnp.asarray(raw), L, 99)
    assert np.array_equal(np.asarray(seq_j), seq)
    assert np.array_equal(remove_landmarks(seq, L), raw)
    b = with_landmarks({"tokens": jnp.asarray(raw), "loss_mask": jnp.ones(raw.shape).at[0, 4].set(0)},
                       L, 99)
    mask = np.asarray(b["loss_mask"][0])
    assert mask[[3, 7, 11]].tolist() == [0, 0, 0]              # landmark targets ignored
    assert mask[5] == 0 and mask.sum() == 14 - 3 - 1           # raw token 5's own weight kept
    with pytest.raises(ValueError, match="segment_ids"):
        with_landmarks({"tokens": jnp.asarray(raw), "segment_ids": jnp.asarray(raw)}, L, 99)


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_memory_forward_equals_full_forward(tiny, impl):
    """top_k >= stored blocks: every block retrieved, in order, at its true position (the chunk's
    own attention by the float32 reference, or by the kernel's ``return_lse``, interpret mode)."""
    cfg, _, params, seq, full = tiny
    got = memory_forward(cfg.replace(landmark_impl=impl), params, seq, chunk_len=16, top_k=12)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=2e-5)


def test_host_offload_matches_device(tiny):
    """Host memory (numpy, per-layer retrieval) computes what the on-device memory does, with
    real retrieval (top_k=1 of up to 8 blocks, shared selection), and keeps nothing on device."""
    cfg, _, params, seq, full = tiny
    dev = memory_forward(cfg, params, seq, chunk_len=16, top_k=1, selection="shared")
    host, stats = memory_forward(cfg, params, seq, chunk_len=16, top_k=1, selection="shared",
                                 offload="host", return_stats=True)
    np.testing.assert_allclose(np.asarray(host), np.asarray(dev), atol=2e-5)
    assert stats["device_memory_bytes"] == 0 and stats["memory_bytes"] > 0
    # ... but each layer sends the landmark keys and the gathered blocks [B, Hq, C, k, L, Dh]
    # (keys and values) to the device: reported as the peak per-layer transfer
    item, mcap = jnp.dtype(cfg.dtype).itemsize, 12
    gathered = 1 * cfg.n_head * 16 * 1 * L * cfg.dim_head * item
    lm_keys = 1 * mcap * cfg.kv_heads * cfg.dim_head * item
    assert stats["device_transfer_bytes"] == 2 * gathered + lm_keys
    _, dev_stats = memory_forward(cfg, params, seq, chunk_len=16, top_k=1, return_stats=True)
    assert dev_stats["device_transfer_bytes"] == 0
    assert dev_stats["device_memory_bytes"] == dev_stats["memory_bytes"] == stats["memory_bytes"]
    assert float(jnp.max(jnp.abs(dev - full))) > 1e-4        # retrieval did drop blocks


def test_decoding_matches_full_forward(tiny):
    cfg, model, params, seq, full = tiny
    from jaxformers.decoding import init_cache
    cache = init_cache(model, 1, 48)
    tok = jnp.asarray(seq)
    fwd = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    logits, cache = fwd(params, tok[:, :40], cache)
    step, cache = fwd(params, tok[:, 40:41], cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :40]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, 40]), atol=2e-5)


def test_training_reduces_loss(tiny):
    """A few Adam steps on raw windows through ``landmark_cross_entropy``."""
    cfg, model, params, _, _ = tiny
    raw = jnp.asarray(np.tile(np.arange(12, dtype=np.int32), (4, 3))[:, :25])
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        (loss, _), g = jax.value_and_grad(landmark_cross_entropy, argnums=1, has_aux=True)(
            model, p, {"tokens": raw})
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    p, s = params, tx.init(params)
    losses = []
    for _ in range(15):
        p, s, loss = step(p, s)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kw, field", [
    (dict(landmark_block=1), "landmark_block"),
    (dict(landmark_impl="flash"), "landmark_impl"),
    (dict(mem_selection="all"), "mem_selection"),
    (dict(window=8), "window"),
    (dict(mem_top_k=True), "mem_top_k"),
    (dict(mem_top_k=0), "mem_top_k"),
])
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        jf.get_config("landmark", "tiny", **kw)


def test_memory_forward_arguments(tiny):
    cfg, _, params, seq, _ = tiny
    with pytest.raises(ValueError, match="chunk_len"):
        memory_forward(cfg, params, seq, chunk_len=6)
    with pytest.raises(ValueError, match="offload"):
        memory_forward(cfg, params, seq, chunk_len=8, offload="disk")
    with pytest.raises(ValueError, match="landmark_cross_entropy|landmark model"):
        landmark_cross_entropy(jf.build(jf.get_config("gpt", "tiny")), None, {"tokens": seq})


@pytest.mark.parametrize("block_size", [1, 0, 2.0, True])
def test_insert_landmarks_checks_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        insert_landmarks(np.zeros((1, 6), np.int32), block_size, 9)


def test_memory_forward_max_blocks(tiny):
    """max_blocks must hold every appended block (n // L, the last chunk's included): smaller
    values used to be accepted and then crash in numpy / XLA or silently overwrite slots."""
    cfg, _, params, seq, full = tiny                          # 48 tokens = 12 blocks
    for bad in (8, 11, 0, -1, 2.5, True, "12"):
        with pytest.raises(ValueError, match=r"max_blocks must be a positive int >= 12.*got"):
            memory_forward(cfg, params, seq, chunk_len=16, top_k=12, max_blocks=bad)
    with pytest.raises(ValueError, match="max_blocks"):      # one chunk holding 4 blocks
        memory_forward(cfg, params, seq[:, :16], chunk_len=16, max_blocks=2, offload="host")
    got = memory_forward(cfg, params, seq, chunk_len=16, top_k=12, max_blocks=np.int64(12),
                         offload="host")
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=2e-5)


def test_memory_forward_checks_tokens(tiny):
    """The token checks of ``model.apply`` (out-of-range ids gave NaN, -1 wrapped to the
    landmark id, floats were truncated, 1-D input crashed) and the landmark layout."""
    cfg, _, params, seq, _ = tiny
    run = lambda t: memory_forward(cfg, params, t, chunk_len=16)  # noqa: E731
    for bad in (np.where(seq == 5, 64, seq), np.where(seq == 5, -1, seq)):
        with pytest.raises(ValueError, match="vocab_size=64"):
            run(bad)
    with pytest.raises(ValueError, match="integer dtype"):
        run(seq.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        run(seq[0])
    with pytest.raises(ValueError, match="landmark_token=63.*position 7"):
        run(np.where(np.arange(48) == 7, 1, seq))            # a landmark position without one
    with pytest.raises(ValueError, match="landmark_token=63"):
        run(remove_landmarks(seq, L)[:, :12])                 # raw tokens, no landmarks


def test_memory_forward_top_k_is_int(tiny):
    cfg, _, params, seq, _ = tiny
    for bad in (True, 0, 1.0):
        with pytest.raises(ValueError, match="top_k"):
            memory_forward(cfg, params, seq, chunk_len=16, top_k=bad)

