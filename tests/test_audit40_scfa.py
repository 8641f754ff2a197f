"""Regression tests of the SCFA audit (pallas_kernels.sparse_attention, experiments.scfa_lm,
experiments.scfa_speed)."""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_attention import (causal_tile_count, hash_attention, hash_reference,
                                             hash_tile_count, qk_sparse_tile_count)


# ----------------------------------------------------------------- 64-bit bucket ids (x64)
def test_hash_attention_64bit_bucket_ids_are_not_merged():
    """Under ``jax_enable_x64`` int64 / uint64 buckets were cast to int32, so 0 and 2**32 (and any
    ids equal mod 2**32) became one bucket: wrong outputs and tile counts for "any values"."""
    rng = np.random.default_rng(0)
    b, t, h, d = 1, 24, 2, 8
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
        small = jnp.asarray(rng.integers(0, 2, (2, b, t, h)))
        for dtype in (jnp.int64, jnp.uint64):
            qb, kb = (x.astype(dtype) * 2 ** 32 for x in small)  # ids 0 and 2**32
            got = hash_attention(q, k, v, qb, kb, interpret=True, block_q=16, block_k=16)
            np.testing.assert_allclose(got, hash_reference(q, k, v, qb, kb), atol=1e-5)
            # the same tiles as the int32 ids 0 / 1 of the same pattern
            np.testing.assert_array_equal(hash_tile_count(qb, kb, block_q=16, block_k=16),
                                          hash_tile_count(small[0].astype(jnp.int32),
                                                          small[1].astype(jnp.int32), block_q=16,
                                                          block_k=16))
        # mixed uint32 / int32: 2**32 - 1 and -1 are different ids
        qb = jnp.full((b, t, h), 2 ** 32 - 1, jnp.uint32)
        kb = jnp.where(small[1] > 0, -1, 2 ** 31 - 1).astype(jnp.int32)
        got = hash_attention(q, k, v, qb, kb, interpret=True, block_q=16, block_k=16)
        np.testing.assert_array_equal(np.asarray(got), 0.0)
        np.testing.assert_array_equal(np.asarray(hash_reference(q, k, v, qb, kb)), 0.0)


# ----------------------------------------------------------------- scfa_lm: what is counted
def test_scfa_lm_counts_the_tiles_of_the_model_it_trained(tmp_path, monkeypatch):
    """The tiles were counted with the config's float32 model while the trainer ran (and
    evaluated) the model in its compute dtype (bfloat16 on a GPU / TPU): hash buckets of other
    q / k values than the trained model's."""
    import jaxformers as jf
    from experiments import scfa_lm

    seen = []
    real = scfa_lm.tile_counts

    def spy(cfg, params, batch, seq_len, seed, tile, tokens=None):
        seen.append(cfg.dtype)
        return real(cfg, params, batch, seq_len, seed, tile, tokens=tokens)

    def fake_train(name, cfg, out, reusable, **kw):
        params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
        summary = dict(tokens_per_s=1.0, val_loss=1.0, val_ppl=2.7, train_loss=1.0, n_params=1, wall_s=1.0)
        return summary, params, "bfloat16", types.SimpleNamespace(batch_size=2, steps=1, tokens_per_step=256)

    monkeypatch.setattr(scfa_lm, "tile_counts", spy)
    monkeypatch.setattr(scfa_lm, "reuse_or_train", fake_train)
    monkeypatch.setattr(scfa_lm, "plot", lambda *a: None)
    scfa_lm.main(["--out", str(tmp_path), "--only", "hash_nb4", "--no-kernel-check", "--no-compile-cache"])
    assert seen == ["bfloat16"]
    row = json.loads((tmp_path / "results.json").read_text())["models"]["hash_nb4_T128"]
    assert 0 < row["tile_fraction"] < 1


def test_scfa_lm_tile_counts_use_the_tpu_variants_tiles_on_a_tpu(monkeypatch):
    """On a TPU the kernels run 128-row tiles whatever the preset's ``tile``; the counts were of
    ``tile`` x ``tile`` tiles (GPU layout)."""
    import jaxformers as jf
    from experiments import scfa_lm
    from jaxformers.models.scfa import attention_labels

    cfg = jf.get_config("qk_sparse", "tiny", vocab_size=64, d_model=16, n_head=2, n_layer=1,
                        max_seq_len=256, sparse_impl="reference", block_q=16, block_k=16)
    tok = jax.random.randint(jax.random.PRNGKey(0), (1, 256), 0, 64)
    params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(1), tok)
    (ql, kl), = attention_labels(jf.build(cfg), params, tok)
    want = int(qk_sparse_tile_count(ql, kl, block_q=16, block_k=16, platform="tpu").sum())
    gpu = scfa_lm.tile_counts(cfg, params, 1, 256, 0, 16, tokens=tok)
    assert gpu[1] == causal_tile_count(256, block_q=16, block_k=16) * 2
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    tiles, dense, per_layer = scfa_lm.tile_counts(cfg, params, 1, 256, 0, 16, tokens=tok)
    assert dense == 3 * 2 and per_layer == [want] and tiles == want  # 2 x 2 causal 128-tiles: 3


def test_scfa_speed_tile_fraction_of_the_variant_that_ran(tmp_path, monkeypatch):
    """scfa_speed's ``tile_fraction`` counted GPU ``--block`` tiles on a TPU too."""
    from experiments import scfa_speed

    monkeypatch.setattr(scfa_speed, "bench", lambda *a, **kw: {"fwd": 1.0, "fwd+bwd": 2.0})
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    scfa_speed.main(["--quick", "--seq-lens", "256", "--buckets", "4", "--keep", "none",
                     "--out", str(tmp_path)])
    (row,) = [r for r in json.loads((tmp_path / "results.json").read_text())["rows"]
              if r["impl"] == "hash_nb4"]
    assert row["tile_fraction"] == scfa_speed.tile_fraction("hash", 4, row["batch"], 256, row["heads"], 16,
                                                            platform="tpu")
    assert row["tile_fraction"] != scfa_speed.tile_fraction("hash", 4, row["batch"], 256, row["heads"], 16)
