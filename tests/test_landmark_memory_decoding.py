"""KV-cache decoding of a landmark model through its retrieval memory (``mem_chunk_len``): every
cache call computes what ``memory_forward`` computes for those positions, for any split of the
input into prefill and steps; ``jf.generate`` then samples from those logits, past the
training length."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.decoding import init_cache
from jaxformers.layers.attention import init_attention_cache
from jaxformers.models.landmark import insert_landmarks, memory_forward
from pallas_kernels.landmark_attention import landmark_attention_reference

L = 4
V = 50


def _model(**kw):
    fields = dict(d_model=32, n_head=4, n_layer=2, landmark_block=L, vocab_size=V, max_seq_len=64,
                  landmark_impl="reference")
    cfg = jf.get_config("landmark", "tiny", **{**fields, **kw})
    model = jf.build(cfg)
    return model, {"params": jax.jit(lambda r: jf.init_params(model, r))(jax.random.PRNGKey(0))}


def _with_landmarks(b, n, seed=0):
    raw = np.random.default_rng(seed).integers(0, V - 1, (b, n))
    seq, _ = insert_landmarks(raw, L, V - 1)
    return jnp.asarray(seq, jnp.int32)


def _decode(model, params, seq, splits):
    """Logits of ``seq`` fed through the cache in pieces ending at ``splits``."""
    cache = init_cache(model, seq.shape[0], seq.shape[1])
    apply = jax.jit(lambda p, x, c: model.apply(p, x, cache=c))
    out, lo = [], 0
    for hi in [*splits, seq.shape[1]]:
        logits, cache = apply(params, seq[:, lo:hi], cache)
        out.append(logits)
        lo = hi
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("chunk,top_k,selection,kv_heads,splits", [
    (8, 1, "per_head", 4, []),                        # the whole input in one prefill
    (8, 2, "shared", 2, list(range(5, 53))),          # prefill 5, then one token per call
    (12, 3, "per_head", 1, [13, 14]),                 # MQA, pieces across chunk boundaries
    (4, 2, "shared", 4, [1, 2, 9]),                   # chunk == one block
])
def test_cache_decoding_equals_memory_forward(chunk, top_k, selection, kv_heads, splits):
    model, params = _model(n_kv_head=kv_heads, mem_chunk_len=chunk, mem_top_k=top_k,
                           mem_selection=selection)
    seq = _with_landmarks(2, 40)[:, :53]                                  # ends inside a block
    want = memory_forward(model.config, params["params"], seq, chunk_len=chunk)
    got = _decode(model, params, seq, splits)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # retrieval matters here: the full forward differs
    assert float(jnp.abs(jax.jit(model.apply)(params, seq) - want).max()) > 1e-2


def test_every_block_retrieved_is_the_full_forward():
    model, params = _model(mem_chunk_len=8, mem_top_k=16)
    seq = _with_landmarks(2, 45)
    np.testing.assert_allclose(_decode(model, params, seq, [7, 8, 33]), jax.jit(model.apply)(params, seq),
                               atol=2e-5, rtol=0)


def test_generate_past_the_training_length_is_memory_forwards_argmax():
    """Greedy tokens are the argmax of memory_forward over the generated sequence (ragged
    prompts, each row as alone), for sequences of 2.7-3.3x max_seq_len: positions stay below
    top_k * L + chunk = 32 <= max_seq_len."""
    model, params = _model(mem_chunk_len=16, mem_top_k=4, max_seq_len=32)
    prompts = np.random.default_rng(1).integers(0, V - 1, (3, 20)).astype(np.int32)
    lengths, new = np.array([20, 7, 13], np.int32), 60
    out = np.asarray(jf.generate(model, params, prompts, new, temperature=0.0, prompt_lengths=lengths))
    assert out.shape == (3, 80) and not (out == V - 1).any()
    for b, n in enumerate(lengths):
        seq, is_lm = insert_landmarks(out[b:b + 1, :n + new], L, V - 1)
        assert seq.shape[1] > 2 * 32
        logits = np.asarray(memory_forward(model.config, params["params"], jnp.asarray(seq), chunk_len=16),
                            np.float64)[0]
        logits[:, V - 1] = -np.inf
        pos = np.nonzero(~is_lm[0])[0]                                    # raw token j at pos[j]
        np.testing.assert_array_equal(out[b, :n], prompts[b, :n])
        for j in range(n, n + new):
            assert out[b, j] == logits[pos[j] - 1].argmax(), (b, j)
    # scanned layers decode the same
    scanned, _ = _model(mem_chunk_len=16, mem_top_k=4, max_seq_len=32, scan_layers=True)
    blocks = [params["params"][f"blocks_{i}"] for i in range(2)]
    stacked = {k: v for k, v in params["params"].items() if not k.startswith("blocks_")}
    stacked = {"params": {**stacked, "blocks": jax.tree.map(lambda *x: jnp.stack(x), *blocks)}}
    again = jf.generate(scanned, stacked, prompts, new, temperature=0.0, prompt_lengths=lengths)
    np.testing.assert_array_equal(np.asarray(again), out)


def test_the_cache_is_rounded_to_whole_chunks_plus_one():
    model, params = _model(mem_chunk_len=8)
    cache = init_cache(model, 1, 17)
    assert cache["layers"][0]["k"].shape[1] == 32                        # 17 -> 24, + 8
    wrong = {"index": jnp.zeros((), jnp.int32),
             "layers": [init_attention_cache(model.config, 1, 20) for _ in range(2)]}
    with pytest.raises(ValueError, match="mem_chunk_len=8 decodes with the cache of init_cache"):
        model.apply(params, _with_landmarks(1, 6), cache=wrong)


@pytest.mark.parametrize("splits", [[9], [7, 8, 9], list(range(17, 33))])
def test_tied_landmark_scores_retrieve_the_same_blocks_at_any_batch_size(splits):
    """In the first layer every landmark key is the same vector (the landmark's embedding, keys
    unrotated), so every block's score ties; float32 rounding, which depends on how the scores
    were batched, used to pick among them: three identical rows decoded 0.036 away from
    memory_forward (batch 1 and 2 matched).  Ties within the tolerance go to the earliest blocks."""
    model, params = _model(n_layer=1, mem_chunk_len=8, mem_top_k=2)
    seq = jnp.repeat(_with_landmarks(1, 60, seed=3)[:, :33], 3, axis=0)
    want = memory_forward(model.config, params["params"], seq, chunk_len=8)
    np.testing.assert_allclose(_decode(model, params, seq, splits), want, atol=2e-5, rtol=0)
    np.testing.assert_allclose(want[1:], jnp.broadcast_to(want[:1], want[1:].shape), atol=2e-5, rtol=0)


def test_select_blocks_breaks_near_ties_by_the_earliest_block():
    from jaxformers.models.landmark import select_blocks
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
    key = rng.standard_normal(8).astype(np.float32)
    lm = np.stack([key, key * (1 + 1e-6), key * 2.0, key * (1 - 1e-6), key])[None, :, None]  # [1, 5, 1, 8]
    sign = 1.0 if float(jnp.dot(q[0, 0, 0], key)) > 0 else -1.0
    lm[0, 2, 0] = sign * 3.0 * key                                      # the clear winner
    idx = select_blocks(q, jnp.asarray(lm), 5, 3, "per_head")
    np.testing.assert_array_equal(idx[0, 0, 0], [0, 1, 2])              # block 2, then the earliest tied
    idx = select_blocks(q, jnp.asarray(lm), 2, 3, "per_head")           # 2 stored: the empty slot last
    np.testing.assert_array_equal(idx[0, 0, 0], [0, 1, 2])


def test_a_memory_cache_too_small_for_the_input_is_an_error():
    """The buffer keeps one spare chunk past max_len: feeding into it used to slice keys past the
    buffer (clamped by XLA: a wrong answer); now a ValueError eagerly and NaN under jit."""
    model, params = _model(mem_chunk_len=8)
    seq = _with_landmarks(1, 20)[:, :24]
    cache = init_cache(model, 1, 16)                                     # a 24-position buffer
    with pytest.raises(ValueError, match="24 new tokens do not fit a KV cache of max_len=16"):
        model.apply(params, seq, cache=cache)
    _, full = model.apply(params, seq[:, :16], cache=cache)
    with pytest.raises(ValueError, match="8 new tokens at cache index 16 exceed its max_len=16"):
        model.apply(params, seq[:, 16:], cache=full)
    logits, _ = jax.jit(lambda p, x, c: model.apply(p, x, cache=c))(params, seq[:, 16:], full)
    assert np.isnan(np.asarray(logits)).all()
    with pytest.raises(ValueError, match="no new tokens"):
        model.apply(params, seq[:, :0], cache=cache)
    with pytest.raises(ValueError, match="tokens must hold at least one position"):
        memory_forward(model.config, params["params"], seq[:, :0], chunk_len=8)


@pytest.mark.parametrize("value", [6, 2, 0, True, 8.0])
def test_mem_chunk_len_must_be_a_multiple_of_the_block(value):
    with pytest.raises(ValueError, match="mem_chunk_len must be None or a positive multiple of landmark_block=4"):
        jf.get_config("landmark", "tiny", landmark_block=4, mem_chunk_len=value)


def test_reference_chunk_len_restricts_each_query_to_its_chunk():
    """``landmark_attention_reference(chunk_len=C)`` == the reference on each chunk alone."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 29, 4, 8)), jnp.float32) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]                                       # GQA
    ref = jax.jit(landmark_attention_reference, static_argnames=("block_size", "return_lse", "chunk_len"))
    o, lse = ref(q, k, v, block_size=4, chunk_len=12, return_lse=True)
    for lo in range(0, 29, 12):
        sl = slice(lo, lo + 12)
        o_c, lse_c = ref(q[:, sl], k[:, sl], v[:, sl], block_size=4, return_lse=True)
        np.testing.assert_allclose(o[:, sl], o_c, atol=1e-6)
        np.testing.assert_allclose(lse[:, :, sl], lse_c, atol=1e-6)
    # decoding queries (q_offset) against the same keys
    o_d = ref(q[:, 20:23], k, v, block_size=4, q_offset=20, chunk_len=12)
    np.testing.assert_allclose(o_d, o[:, 20:23], atol=1e-6)
    for bad in (6, 0, True):
        with pytest.raises(ValueError, match="chunk_len must be None or a positive multiple of block_size=4"):
            landmark_attention_reference(q, k, v, block_size=4, chunk_len=bad)


def test_bfloat16_decoding_stays_near_float32():
    """bf16 compute (a bf16 cache): within bf16 noise of the float32 memory_forward (bf16's own
    memory_forward is as far: 0.023 max here, the retrieval's top-k can flip on rounding)."""
    model, params = _model(mem_chunk_len=8, mem_top_k=2, dtype="bfloat16")
    seq = _with_landmarks(2, 40)
    want = memory_forward(model.config.replace(dtype="float32"), params["params"], seq, chunk_len=8)
    got = _decode(model, params, seq, list(range(20, seq.shape[1])))
    assert got.dtype == jnp.float32
    err = np.abs(np.asarray(got) - np.asarray(want))
    assert err.max() < 0.06 and err.mean() < 0.005                      # measured: 0.018, 0.0008
