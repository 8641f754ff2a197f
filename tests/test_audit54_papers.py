"""Audit 54 (papers: DenseFormer, CoTFormer, landmark attention): regression tests."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.models.landmark import insert_landmarks, with_landmarks


# ------------------------------------------------------------------ landmark data
@pytest.mark.parametrize("xp", [np, jnp])
def test_insert_landmarks_refuses_an_id_the_tokens_dtype_cannot_hold(xp):
    """A jax uint8 array wrapped landmark 257 to 1 silently (numpy raised an OverflowError)."""
    raw = xp.asarray(np.arange(10, dtype=np.uint8)[None])
    with pytest.raises(ValueError, match="landmark_id=257 does not fit.*uint8"):
        insert_landmarks(raw, 4, 257)
    with pytest.raises(ValueError, match="landmark_id=257 does not fit.*uint8"):
        with_landmarks({"tokens": raw}, 4, 257)
    seq, _ = insert_landmarks(raw, 4, 255)                     # in range: unchanged behaviour
    assert np.asarray(seq).tolist() == [[0, 1, 2, 255, 3, 4, 5, 255, 6, 7, 8, 255, 9]]
    seq, _ = insert_landmarks(raw.astype(xp.int32), 4, 257)
    assert np.asarray(seq)[0, 3] == 257
    for bad in (2.0, True, None):
        with pytest.raises(ValueError, match="landmark_id must be an int"):
            insert_landmarks(raw.astype(xp.int32), 4, bad)


# ------------------------------------------------------------------ cotformer config
@pytest.mark.parametrize("name", ["cotformer", "but"])
@pytest.mark.parametrize("field", ["router_mix", "random_capacity"])
def test_router_options_on_a_model_without_routers_are_refused(name, field):
    """router_mix=False / random_capacity=False on a cotformer or but were silently ignored (it
    has no routers), while length_factors there is refused."""
    import jaxformers as jf

    with pytest.raises(ValueError, match=f"{field}=False applies to model='adaptive_cotformer' only"):
        jf.get_config(name, "tiny", **{field: False})
    assert getattr(jf.get_config("adaptive_cotformer", "tiny", **{field: False}), field) is False
    assert getattr(jf.get_config(name, "tiny"), field) is True  # the default stays valid


@pytest.mark.parametrize("raw_len, block_size, match", [
    (10, 1, "block_size"), (10, True, "block_size"), (10, 2.0, "block_size"),  # was ZeroDivisionError
    (-5, 4, "raw_len"), (0, 4, "raw_len"), (3.0, 4, "raw_len"),               # was -7 / 0 / 3.0
])
def test_landmark_seq_len_checks_its_arguments(raw_len, block_size, match):
    from jaxformers.models.landmark import landmark_seq_len

    with pytest.raises(ValueError, match=match):
        landmark_seq_len(raw_len, block_size)


def test_landmark_seq_len_is_the_inserted_length():
    from jaxformers.models.landmark import landmark_seq_len

    for raw_len in (1, 14, 15, 16, 89, 100):
        seq, _ = with_landmarks({"tokens": np.zeros((1, raw_len + 1), np.int32)}, 16, 99).values()
        assert landmark_seq_len(raw_len, 16) == seq.shape[1] - 1 == landmark_seq_len(np.int64(raw_len), 16)


@pytest.mark.parametrize("args, match", [
    (((0.5,), 3, 16), "length_factors"),          # one factor short: was [16, 8]
    (((1.5, 0.2), 3, 16), "length_factors"),      # above 1: was [16, 24, 3]
    (((0.2, 0.5), 3, 16), "length_factors"),      # increasing
    ((("a", 0.1), 3, 16), "length_factors"),
    (((0.5, 0.2), 3, -16), "seq_len"),            # was [-16, -8, -3]
    (((0.5, 0.2), 3, 16.0), "seq_len"),
    ((None, 0, 16), "n_repeat"),
])
def test_routed_counts_checks_its_arguments(args, match):
    from jaxformers.models.cotformer import routed_counts

    with pytest.raises(ValueError, match=match):
        routed_counts(*args)


def test_routed_counts_valid_inputs_unchanged():
    from jaxformers.models.cotformer import routed_counts

    assert routed_counts((0.5, 0.25), 3, 256) == [256, 128, 64]
    assert routed_counts(None, 3, 10) == [10, 10, 10]
    assert routed_counts((np.float64(1.0), 0), 3, np.int64(10)) == [10, 10, 0]
    assert routed_counts((), 1, 7) == [7]


# ------------------------------------------------------------------ experiments
def test_landmark_lm_cost_counts_the_memory_of_each_length(tmp_path, monkeypatch):
    """The cost at every length used the capacity of the largest factor: at 1x (of 1x, 2x) the
    landmark memory_bytes were the 2x memory's (twice what the input stores), also the host
    transfer (landmark keys of empty slots) and the time (scoring them).  Training, the
    perplexities, the baseline and decoding are stubbed: only the memory's cost runs."""
    import json
    import jax
    import jaxformers as jf
    from experiments import landmark_lm

    def fake_train(name, cfg, out, reusable, **kw):
        params = jax.jit(lambda r: jf.init_params(jf.build(cfg), r))(jax.random.PRNGKey(0))
        return {}, params, "float32", None
    monkeypatch.setattr(landmark_lm, "reuse_or_train", fake_train)
    for fn in ("eval_baseline", "eval_landmark"):
        monkeypatch.setattr(landmark_lm, fn, lambda *a, **k: 1.0)
    monkeypatch.setattr(landmark_lm, "cost_baseline", lambda *a, **k: (1.0, 1))
    monkeypatch.setattr(landmark_lm, "cost_decode", lambda *a, **k: 1.0)
    monkeypatch.setattr(landmark_lm, "plot", lambda *a, **k: None)
    out = tmp_path / "lm"
    landmark_lm.main(["--preset", "tiny", "--out", str(out), "--factors", "1,2", "--top-k", "1",
                      "--eval-windows", "1", "--d-model", "32", "--n-layer", "1", "--no-compile-cache"])
    cost = json.loads((out / "results.json").read_text())["cost"]
    # 1 layer, K and V, 6 blocks per 1x chunk of 16 positions, 4 heads of 8 float32 values
    one = 2 * 6 * 16 * 4 * 8 * 4
    for f in (1, 2):
        assert cost[str(f)]["landmark_top1"]["memory_bytes"] == f * one
        assert cost[str(f)]["landmark_top1_host"]["memory_bytes"] == f * one
    assert cost["1"]["landmark_top1_host"]["device_transfer_bytes"] < \
        cost["2"]["landmark_top1_host"]["device_transfer_bytes"]


# ------------------------------------------------------------------ denseformer
def test_dwa_weights_reads_boxed_params_and_refuses_others():
    """dwa_weights on the params ``module.init`` returns (boxed) was a TypeError from float()."""
    import jax
    import jaxformers as jf
    from jaxformers.models.denseformer import DenseFormerConfig, dwa_weights

    c = DenseFormerConfig.from_base("gpt", "tiny", n_layer=3, d_model=32, n_head=2, dwa_dilation=2)
    boxed = jf.build(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    alpha, points = dwa_weights(c, boxed)
    assert points == [1, 2, 3] and alpha.shape == (3, 4)
    np.testing.assert_array_equal(alpha, np.eye(4)[1:])  # init: 1 on j = m
    import flax.linen as nn
    np.testing.assert_array_equal(dwa_weights(c, nn.unbox(boxed))[0], alpha)
    with pytest.raises(ValueError, match=r"dwa_alpha \[3, 4\]"):
        dwa_weights(c, {"params": boxed})               # the variables dict, not the params
    with pytest.raises(ValueError, match=r"dwa_alpha \[4, 5\].*got \(3, 4\)"):
        dwa_weights(c.replace(n_layer=4), boxed)        # another config's params


def test_landmark_loss_through_the_memory_refuses_dropout_in_training():
    """With mem_chunk_len the loss ran the memory path without the rng: dropout=0.1 in a training
    step was silently off (the loss equal for any rng)."""
    import jax
    import jaxformers as jf
    from jaxformers.models.landmark import landmark_cross_entropy

    cfg = jf.get_config("landmark", "tiny", d_model=32, n_head=2, n_layer=1, landmark_block=4,
                        vocab_size=16, mem_chunk_len=8, dropout=0.1, landmark_impl="reference")
    model = jf.build(cfg)
    params = jf.init_params(model, jax.random.PRNGKey(0))
    batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 15, (2, 13)), jnp.int32)}
    with pytest.raises(ValueError, match="applies no dropout.*dropout=0.1"):
        landmark_cross_entropy(model, params, batch, jax.random.PRNGKey(1))
    loss, _ = landmark_cross_entropy(model, params, batch)              # evaluation: no rng
    plain, _ = landmark_cross_entropy(jf.build(cfg.replace(dropout=0.0)), params, batch,
                                      jax.random.PRNGKey(1))           # no dropout: trains
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(float(plain), abs=1e-6)


@pytest.mark.parametrize("flag", ["no", 0, None])
def test_memory_forward_return_stats_must_be_a_bool(flag):
    """return_stats="no" was read by truthiness: (logits, stats) came back instead of logits."""
    import jax
    import jaxformers as jf
    from jaxformers.models.landmark import memory_forward

    cfg = jf.get_config("landmark", "tiny", d_model=32, n_head=2, n_layer=1, landmark_block=4,
                        vocab_size=16, landmark_impl="reference")
    params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
    tok, _ = insert_landmarks(np.zeros((1, 6), np.int32), 4, 15)
    with pytest.raises(ValueError, match="return_stats must be a bool"):
        memory_forward(cfg, params, tok, chunk_len=4, return_stats=flag)
    assert memory_forward(cfg, params, tok, chunk_len=4, return_stats=np.bool_(False)).shape == (1, 8, 16)


@pytest.mark.parametrize("axis", [2, -3, 1.0, True])
def test_remove_landmarks_checks_the_axis(axis):
    """axis=2 of a [B, N] array was an IndexError ('tuple index out of range'), 1.0 a TypeError."""
    from jaxformers.models.landmark import remove_landmarks

    x = np.arange(16).reshape(2, 8)
    with pytest.raises(ValueError, match="axis must be an int"):
        remove_landmarks(x, 4, axis=axis)
    np.testing.assert_array_equal(remove_landmarks(x, 4, axis=-1), remove_landmarks(x, 4))
    assert remove_landmarks(jnp.asarray(x), 4, axis=np.int64(1)).tolist() == [[0, 1, 2, 4, 5, 6],
                                                                              [8, 9, 10, 12, 13, 14]]
