"""SCFA models (hash_sparse / qk_sparse): degenerate settings == baseline, the pattern matches a
direct mask, kernel == reference, decoding == forward, packed == separate, determinism."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.models.scfa import (SCFAConfig, SparseAttention, attention_labels, hash_buckets,
                                    hash_matrices, keep_bits, packed_labels, segment_ranks)
from pallas_kernels.sparse_attention import causal_tile_count, hash_tile_count, qk_sparse_tile_count

SMALL = dict(vocab_size=64, d_model=32, n_head=2, n_layer=2, max_seq_len=32)


def _tokens(b=2, t=16, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, SMALL["vocab_size"])


@functools.lru_cache(maxsize=None)
def _params():
    """Random baseline params (weights ~N(0, 0.1), so attention is far from uniform)."""
    bc = jf.get_config("gpt", "tiny", **SMALL)
    shapes = jax.eval_shape(lambda r: jf.init_params(jf.build(bc), r, _tokens()), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    fill = lambda path, x: jnp.asarray(  # noqa: E731
        (1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
        + 0.1 * rng.standard_normal(x.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


SPARSE = dict(n_buckets=4, qk_drop_rate=0.5)  # one setting everywhere: jitted forwards are shared


def _cfg(name, **kw):
    kw = {**SMALL, "sparse_impl": "reference", **SPARSE, **kw}
    kw.pop({"hash_sparse": "qk_drop_rate", "qk_sparse": "n_buckets"}[name], None)  # the other kind's
    return jf.get_config(name, "tiny", **kw)


@functools.lru_cache(maxsize=None)
def _fwd(cfg):
    m = jf.build(cfg)
    return jax.jit(lambda p, t, seg: m.apply({"params": p}, t, segment_ids=seg))


def _apply(cfg, tokens, segment_ids=None, params=None):
    """Jitted forward (one compile beats op-by-op dispatch of the eager model)."""
    return _fwd(cfg)(_params() if params is None else params, tokens, segment_ids)


def test_params_are_the_baselines():
    for name in ("hash_sparse", "qk_sparse"):
        shapes = jax.eval_shape(lambda r: jf.init_params(jf.build(_cfg(name)), r, _tokens()),
                                jax.random.PRNGKey(0))
        assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, _params())


def test_one_bucket_and_no_dropping_equal_the_baseline():
    tok = _tokens()
    base = _apply(jf.get_config("gpt", "tiny", **SMALL), tok)
    for cfg in (_cfg("hash_sparse", n_buckets=1), _cfg("qk_sparse", qk_drop_rate=0.0)):
        np.testing.assert_allclose(_apply(cfg, tok), base, atol=2e-5, rtol=2e-5)
    for cfg in (_cfg("hash_sparse"), _cfg("qk_sparse")):
        assert float(jnp.abs(_apply(cfg, tok) - base).max()) > 1e-3  # sparsity changes the model


def test_buckets_are_argmax_of_signed_projections():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 3, 16))
    r = hash_matrices(jax.random.PRNGKey(2), 3, 16, 8)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(r), axis=1), 1.0, rtol=1e-5)
    buckets = jax.jit(hash_buckets)
    keep = jax.jit(keep_bits, static_argnums=(2, 3, 4))
    b = np.asarray(buckets(x, r))
    assert b.min() >= 0 and b.max() < 8
    xn = np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
    proj = np.einsum("bthd,hdn->bthn", xn, np.asarray(r))
    np.testing.assert_array_equal(b, np.argmax(np.concatenate([proj, -proj], -1), -1))
    np.testing.assert_array_equal(buckets(3.0 * x, r), b)  # scale invariant
    # keep bits: a token's bit depends on (row, position, head) only, rate ~ 1 - drop
    pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
    kb = keep(jax.random.PRNGKey(3), pos, 4, 32, 0.3)
    np.testing.assert_array_equal(keep(jax.random.PRNGKey(3), pos[:1, 8:12], 4, 32, 0.3), kb[:1, 8:12])
    assert (kb[0] != kb[1]).any()  # per row by default; one table for every row otherwise
    shared = jax.jit(keep_bits, static_argnums=(2, 3, 4, 5))(jax.random.PRNGKey(3), pos, 4, 32, 0.3, False)
    np.testing.assert_array_equal(shared[0], shared[1])
    big = keep(jax.random.PRNGKey(4), jnp.broadcast_to(jnp.arange(512), (2, 512)), 8, 512, 0.3)
    assert abs(float(big.mean()) - 0.7) < 0.03


@pytest.mark.parametrize("name", ["hash_sparse", "qk_sparse"])
def test_layer_matches_direct_masked_attention(name):
    """One SparseAttention layer == softmax over the stated visibility, with its own labels."""
    cfg = _cfg(name, n_buckets=4, qk_drop_rate=0.5)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 16, 32))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    layer = SparseAttention(cfg)
    p = _params()["blocks_0"]["attn"]
    (y, _), st = jax.jit(lambda p, x, pos: layer.apply({"params": p}, x, pos, mutable=["intermediates"]))(
        p, x, pos)
    ql, kl = st["intermediates"]["q_labels"][0], st["intermediates"]["k_labels"][0]
    q = jnp.einsum("btd,dhk->bthk", x, p["q"]["kernel"])
    k = jnp.einsum("btd,dhk->bthk", x, p["k"]["kernel"])
    v = jnp.einsum("btd,dhk->bthk", x, p["v"]["kernel"])
    from jaxformers.layers.rotary import apply_rotary, rotary_angles
    cos, sin = rotary_angles(pos, 16, cfg.rope_theta)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if name == "hash_sparse":
        vis = ql.transpose(0, 2, 1)[..., :, None] == kl.transpose(0, 2, 1)[..., None, :]
        assert len(np.unique(np.asarray(ql))) > 1
    else:
        vis = ql.transpose(0, 2, 1)[..., :, None] & kl.transpose(0, 2, 1)[..., None, :]
        assert 0.3 < float(ql.mean()) < 0.7
    vis = vis & jnp.tril(jnp.ones((16, 16), bool))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    pr = jnp.where(vis, jax.nn.softmax(jnp.where(vis, s, -1e30), -1), 0.0)
    o = jnp.einsum("bhqk,bkhd->bqhd", pr, v)
    want = jnp.einsum("bthk,hkd->btd", o, p["o"]["kernel"])
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


def test_evaluation_is_deterministic_and_training_redraws():
    cfg = _cfg("hash_sparse", n_buckets=4)
    m, tok = jf.build(cfg), _tokens()
    labels = attention_labels(m, _params(), tok)
    assert len(labels) == 2  # both layers sparse
    again = attention_labels(m, _params(), tok)
    for (a, b), (c, d) in zip(labels, again):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    assert not np.array_equal(labels[0][1], labels[1][1])  # layers hash differently
    # a new hash_seed -> another fixed draw; the training rng: per-step draws, same key -> same draw
    other = attention_labels(jf.build(cfg.replace(hash_seed=1)), _params(), tok)
    assert not np.array_equal(labels[0][1], other[0][1])

    train_logits = jax.jit(lambda key: m.apply({"params": _params()}, tok, rngs={"dropout": key}))

    a1, a2, b1 = (train_logits(jax.random.PRNGKey(i)) for i in (7, 7, 8))
    np.testing.assert_array_equal(a1, a2)
    assert float(jnp.abs(a1 - b1).max()) > 1e-4


def test_sparse_layers_selects_layers():
    cfg = _cfg("qk_sparse", sparse_layers=[1])
    assert cfg.sparse_layers == (1,)
    assert SCFAConfig(**json.loads(cfg.to_json())) == cfg
    assert len(attention_labels(jf.build(cfg), _params(), _tokens())) == 1
    classes = jf.build(cfg).layer_classes()
    assert classes[0].mixer_class.__name__ == "Attention" and classes[1].mixer_class is SparseAttention
    with pytest.raises(ValueError, match="sparse_layers"):
        _cfg("qk_sparse", sparse_layers=(2,))
    with pytest.raises(ValueError, match="n_buckets"):
        _cfg("hash_sparse", n_buckets=3)
    with pytest.raises(ValueError, match="qk_drop_rate"):
        _cfg("qk_sparse", qk_drop_rate=1.0)


@pytest.mark.parametrize("name", ["hash_sparse", "qk_sparse"])
def test_decoding_equals_forward(name):
    cfg = _cfg(name)
    m, tok = jf.build(cfg), _tokens()
    full = _apply(cfg, tok)
    cache = jf.decoding.init_cache(m, 2, 16)
    step = jax.jit(lambda c, t: m.apply({"params": _params()}, t, cache=c))
    logits, cache = step(cache, tok[:, :5])  # prefill
    outs = [logits]
    for i in range(5, 16):
        logits, cache = step(cache, tok[:, i:i + 1])
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["hash_sparse", "qk_sparse"])
def test_packed_segments_equal_separate_sequences(name):
    cfg = _cfg(name, n_buckets=4, qk_drop_rate=0.5)
    tok = _tokens(b=1, t=16)
    seg = jnp.asarray([[1] * 6 + [2] * 10])
    packed = _apply(cfg, tok, seg)
    np.testing.assert_allclose(packed[:, :6], _apply(cfg, tok[:, :6]), atol=2e-5)
    np.testing.assert_allclose(packed[:, 6:], _apply(cfg, tok[:, 6:]), atol=2e-5)


@pytest.mark.parametrize("name", ["hash_sparse", "qk_sparse"])
def test_packed_segments_with_any_integer_ids(name):
    """Packed == separate for ids the old label encodings collided on: hash ``b + 4 * 2**30``
    wrapped to segment 0's labels; QK's -1 / -2 were also the dropped-query / -key markers."""
    cfg = _cfg(name)
    tok = _tokens(b=1, t=16)
    first, second = _apply(cfg, tok[:, :6]), _apply(cfg, tok[:, 6:])
    for ids in ((0, 2 ** 30), (-1, 5), (-2, 5), (5, -1), (2 ** 31 - 1, -2 ** 31)):
        packed = _apply(cfg, tok, jnp.asarray([[ids[0]] * 6 + [ids[1]] * 10], jnp.int32))
        np.testing.assert_allclose(packed[:, :6], first, atol=2e-5, err_msg=str(ids))
        np.testing.assert_allclose(packed[:, 6:], second, atol=2e-5, err_msg=str(ids))


def test_segments_are_the_baselines_with_any_ids():
    """``segment_ranks`` is id equality (two runs of one id get one rank); the models first map
    ids to runs (``segment_index``: an id that comes back starts a new segment), so one bucket /
    no dropping with such ids == the baseline with the same ids."""
    seg = jnp.asarray([[7, 7, 7, -3, -3, 7, 7, 2 ** 30, 2 ** 30, -3, -3, -3, 7, 0, 0, 0],
                       [-1, -1, -2, -2, -1, -1, -1, -2, 3, 3, 3, 3, -1, -1, -2, -2]], jnp.int32)
    np.testing.assert_array_equal(segment_ranks(seg), [[2, 2, 2, 0, 0, 2, 2, 3, 3, 0, 0, 0, 2, 1, 1, 1],
                                                       [1, 1, 0, 0, 1, 1, 1, 0, 2, 2, 2, 2, 1, 1, 0, 0]])
    tok = _tokens()
    base = _apply(jf.get_config("gpt", "tiny", **SMALL), tok, seg)
    for cfg in (_cfg("hash_sparse", n_buckets=1), _cfg("qk_sparse", qk_drop_rate=0.0)):
        np.testing.assert_allclose(_apply(cfg, tok, seg), base, atol=2e-5, rtol=2e-5)
    # the int32 label range: n_buckets * T must fit
    lab = jnp.zeros((1, 16, 1), jnp.int32)
    packed_labels("hash", lab, lab, seg[:1], 2 ** 27)  # 2**27 * 16 = 2**31: fits
    with pytest.raises(ValueError, match="n_buckets"):
        packed_labels("hash", lab, lab, seg[:1], 2 ** 28)


def test_attention_labels_in_layer_order():
    """Entry i is the i-th sparse layer's labels (string order put blocks_10 before blocks_2)."""
    cfg = _cfg("hash_sparse", d_model=16, n_layer=11, sparse_layers=(2, 5, 10))
    m, tok = jf.build(cfg), _tokens(b=1)
    params = jf.init_params(m, jax.random.PRNGKey(1), tok)
    labels = attention_labels(m, params, tok)
    inter = m.apply({"params": params}, tok, mutable=["intermediates"])[1]["intermediates"]
    assert sorted(inter) == ["blocks_10", "blocks_2", "blocks_5"]
    assert len(labels) == 3
    for (ql, kl), layer in zip(labels, ("blocks_2", "blocks_5", "blocks_10")):
        np.testing.assert_array_equal(ql, inter[layer]["attn"]["q_labels"][0])
        np.testing.assert_array_equal(kl, inter[layer]["attn"]["k_labels"][0])


@pytest.mark.parametrize("name", ["hash_sparse", "qk_sparse"])
def test_attention_labels_under_scan_layers(name):
    """``scan_layers``: one entry per layer (not ``[]``), entry i the i-th layer's.  The scanned
    layers share one draw and a scan's first layers do not depend on its length, so entry i must
    be the last entry of the same model cut to i + 1 layers."""
    cfg = _cfg(name, d_model=16, n_layer=3, scan_layers=True)
    tok = _tokens(b=1)
    params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(1), tok)
    labels = attention_labels(jf.build(cfg), params, tok)
    assert len(labels) == 3
    assert labels[0][0].shape == (1, 16, 2) and labels[0][1].shape == (1, 16, 2)
    for i in range(2):
        cut = cfg.replace(n_layer=i + 1)
        p = {**params, "blocks": jax.tree.map(lambda x: x[:i + 1], params["blocks"])}
        ql, kl = attention_labels(jf.build(cut), p, tok)[-1]
        np.testing.assert_array_equal(labels[i][0], ql)
        np.testing.assert_array_equal(labels[i][1], kl)
    if name == "hash_sparse":  # one R, but each layer hashes its own q / k
        assert not np.array_equal(labels[0][1], labels[2][1])
    else:  # keep bits depend on the (shared) key and positions only
        np.testing.assert_array_equal(labels[0][1], labels[2][1])
        assert 0.3 < float(labels[0][0].mean()) < 0.7


@pytest.mark.parametrize("seed", [1.5, "7", None, True, -1, 2 ** 32])
def test_hash_seed_must_be_an_int(seed):
    with pytest.raises(ValueError, match="hash_seed"):
        _cfg("hash_sparse", hash_seed=seed)
    assert _cfg("hash_sparse", hash_seed=2 ** 32 - 1).hash_seed == 2 ** 32 - 1


@pytest.mark.parametrize("name", ["hash_sparse", "qk_sparse"])
def test_kernel_equals_reference_and_counts_tiles(name):
    """sparse_impl="pallas" (interpret mode on CPU) == "reference"; tile counts from the labels."""
    kw = dict(n_buckets=4, qk_drop_rate=0.5, n_layer=1, block_q=16, block_k=16)
    tok = _tokens(b=1, t=32)
    params = {k: v for k, v in _params().items() if k != "blocks_1"}
    ref = _apply(_cfg(name, **kw), tok, params=params)
    ker = _apply(_cfg(name, sparse_impl="pallas", **kw), tok, params=params)
    np.testing.assert_allclose(ker, ref, atol=1e-4, rtol=1e-4)
    (ql, kl), = attention_labels(jf.build(_cfg(name, **kw)), params, tok)
    count = (hash_tile_count if name == "hash_sparse" else qk_sparse_tile_count)(ql, kl, block_q=16,
                                                                                block_k=16)
    assert count.shape == (1, 2) and 0 < count.max() <= causal_tile_count(32, block_q=16, block_k=16)


def test_qk_sparse_eval_draw_is_shared_by_rows():
    """Evaluation keep masks are one table for every row (training draws per row): a window's
    logits do not depend on the batch size or its row, and ``generate(num_samples=k)`` shares
    one prefill among the k rows: the same tokens as repeating the prompt, greedy tokens the
    argmax of the model's own full forward of the rows."""
    cfg = jf.get_config("qk_sparse", "tiny", vocab_size=64, d_model=32, n_head=2, n_layer=2, max_seq_len=32,
                        sparse_impl="reference")
    m = jf.build(cfg)
    p = {"params": jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x,  # sharp attention: masks matter
                                jf.init_params(m, jax.random.PRNGKey(0)))}
    tok = jax.random.randint(jax.random.PRNGKey(1), (3, 24), 0, 64)
    fwd = jax.jit(m.apply)
    together = fwd(p, tok)
    for r in range(3):
        np.testing.assert_allclose(fwd(p, tok[r:r + 1])[0], together[r], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(fwd(p, tok[::-1])[2 - r], together[r], atol=1e-5, rtol=1e-5)
    # training still draws one mask per row: identical rows get different logits
    same = jnp.repeat(tok[:1], 2, axis=0)
    train = m.apply(p, same, rngs={"dropout": jax.random.PRNGKey(5)})
    assert float(jnp.abs(train[0] - train[1]).max()) > 1e-3
    (ql, kl), _ = attention_labels(m, p["params"], same)
    np.testing.assert_array_equal(ql[0], ql[1])
    assert 0.2 < float(ql.mean()) < 0.8
    prompt = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
    many = jf.generate(m, p, prompt, 6, temperature=0.0, num_samples=3)
    np.testing.assert_array_equal(many, jf.generate(m, p, jnp.repeat(prompt, 3, axis=0), 6, temperature=0.0))
    np.testing.assert_array_equal(jnp.argmax(m.apply(p, many[:, :-1])[:, 7:], -1), many[:, 8:])