"""Mutation audit (SCFA labels / GQA, sampling, DoGE smoothing, KD temperature): tests that kill
mutants the existing suites let through.  Each test checks against an independent oracle
(numpy formulas, exact label algebra, or sampling frequencies with wide statistical margins)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.decoding import sample_logits
from jaxformers.distill import kl_per_token
from jaxformers.models.scfa import hash_buckets, hash_matrices, packed_labels, segment_ranks
from jaxformers.training.doge import update_weights


# ----------------------------------------------------------------------------- SCFA
def test_packed_labels_match_iff_same_segment_and_bucket():
    """Packed labels encode (segment, bucket) injectively: with more segments than buckets a
    ``rank + n_buckets * bucket`` encoding (rank and bucket swapped) collides across segments.
    QK labels match iff same segment and query and key both kept."""
    rng = np.random.default_rng(0)
    b, t, h, nb = 2, 24, 3, 4
    seg = np.repeat(np.arange(12), 2)[None].repeat(b, 0)            # 12 segments (ranks 0..11 > nb)
    seg[1] = rng.permutation(12)[np.repeat(np.arange(12), 2)]      # arbitrary ids, same run structure
    seg = jnp.asarray(seg, jnp.int32)
    qb = jnp.asarray(rng.integers(0, nb, (b, t, h)), jnp.int32)
    kb = jnp.asarray(rng.integers(0, nb, (b, t, h)), jnp.int32)
    ql, kl = packed_labels("hash", qb, kb, seg, nb)
    s = np.asarray(seg)
    same_seg = s[:, :, None, None] == s[:, None, :, None]                         # [B, Tq, Tk, 1]
    want = same_seg & (np.asarray(qb)[:, :, None, :] == np.asarray(kb)[:, None, :, :])
    np.testing.assert_array_equal(np.asarray(ql)[:, :, None, :] == np.asarray(kl)[:, None, :, :], want)
    # QK-sparse: kept flags
    qk = jnp.asarray(rng.random((b, t, h)) < 0.5)
    kk = jnp.asarray(rng.random((b, t, h)) < 0.5)
    ql, kl = packed_labels("qk", qk, kk, seg, nb)
    want = same_seg & np.asarray(qk)[:, :, None, :] & np.asarray(kk)[:, None, :, :]
    np.testing.assert_array_equal(np.asarray(ql)[:, :, None, :] == np.asarray(kl)[:, None, :, :], want)
    np.testing.assert_array_equal(segment_ranks(seg)[0], np.repeat(np.arange(12), 2))


def _gqa_cfg(name, **kw):
    kw = {"n_buckets": 4, "qk_drop_rate": 0.5, **kw}
    kw.pop({"hash_sparse": "qk_drop_rate", "qk_sparse": "n_buckets"}[name])  # the other kind's field
    return jf.get_config(name, "tiny", vocab_size=64, d_model=32, n_head=4, n_kv_head=2, n_layer=2,
                         max_seq_len=32, sparse_impl="reference", **kw)


def test_gqa_query_heads_hash_with_their_kv_heads_matrix():
    """Query head ``h`` is hashed with the ``R`` of kv head ``h // g`` (the kernel's GQA mapping):
    a query equal to its kv head's key lands in the key's bucket (``np.tile`` of R would hash
    heads 1 and 2 with the other kv head's R)."""
    from jaxformers.models.scfa import SparseAttention
    cfg = _gqa_cfg("hash_sparse", n_buckets=8)
    k = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 2, 8))
    q = jnp.repeat(k, 2, axis=2)                                   # head h = kv head h // 2
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    ql, kl = SparseAttention(cfg).labels(jax.random.PRNGKey(1), q, k, pos, pos)
    np.testing.assert_array_equal(ql, jnp.repeat(kl, 2, axis=2))
    # and against hash_buckets with the explicit per-kv-head matrix
    r = hash_matrices(jax.random.PRNGKey(1), 2, 8, 8)
    np.testing.assert_array_equal(kl, hash_buckets(k, r))
    assert len(np.unique(np.asarray(kl))) > 2                       # the check is not vacuous


@functools.lru_cache(maxsize=None)
def _gqa_params():
    cfg = _gqa_cfg("hash_sparse")
    shapes = jax.eval_shape(lambda r: jf.init_params(jf.build(cfg), r, jnp.zeros((1, 8), jnp.int32)),
                            jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    fill = lambda path, x: jnp.asarray(  # noqa: E731
        (1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
        + 0.1 * rng.standard_normal(x.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("name", ["hash_sparse", "qk_sparse"])
def test_gqa_decoding_equals_forward(name):
    """Prefill + one-token steps == the full forward with grouped-query heads (the decode path
    maps query head ``h`` to kv head ``h // g`` for the cached keys' labels).  Same float32
    math on both paths up to summation order: 2e-5."""
    cfg = _gqa_cfg(name)
    m, p = jf.build(cfg), _gqa_params()
    tok = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 64)
    full = jax.jit(lambda p, t: m.apply({"params": p}, t))(p, tok)
    step = jax.jit(lambda p, c, t: m.apply({"params": p}, t, cache=c))
    logits, cache = step(p, jf.decoding.init_cache(m, 2, 12), tok[:, :4])
    outs = [logits]
    for i in range(4, 12):
        logits, cache = step(p, cache, tok[:, i:i + 1])
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- sampling
_PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def _freqs(n=4000, **kw):
    logits = jnp.log(jnp.asarray(_PROBS))[None]
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draws = jax.jit(jax.vmap(lambda k: sample_logits(logits, k, **kw)[0]))(keys)
    return np.bincount(np.asarray(draws), minlength=4) / n


def test_temperature_divides_the_logits():
    """Sampling at temperature T draws from softmax(logits / T).  n=4000: the standard error
    of a frequency is <= 0.008, so 0.04 is a 5-sigma margin, while multiplying by T (T=0.5)
    moves the top probability from 0.69 to 0.41."""
    for t in (0.5, 2.0):
        want = _PROBS ** (1 / t) / np.sum(_PROBS ** (1 / t))
        np.testing.assert_allclose(_freqs(temperature=t), want, atol=0.04)


def test_top_k_keeps_exactly_the_k_largest():
    """top_k=2 samples both of the two largest (renormalised 0.625 / 0.375) and nothing else."""
    np.testing.assert_allclose(_freqs(top_k=2), [0.625, 0.375, 0, 0], atol=0.04)
    np.testing.assert_allclose(_freqs(top_k=1), [1, 0, 0, 0])


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    """Nucleus: the smallest prefix whose mass reaches top_p.  top_p=0.9 -> {0.5, 0.3, 0.15}
    (0.95 >= 0.9, the 0.15 token crosses it and stays); top_p=0.75 -> exactly {0.5, 0.3}
    (thresholds away from the cumulative sums 0.5, 0.8, 0.95: float32 rounding cannot flip them)."""
    np.testing.assert_allclose(_freqs(top_p=0.9), np.r_[_PROBS[:3] / 0.95, 0], atol=0.04)
    np.testing.assert_allclose(_freqs(top_p=0.75), [0.625, 0.375, 0, 0], atol=0.04)


# ----------------------------------------------------------------------------- DoGE
def test_smoothing_mixes_with_uniform_over_the_training_domains():
    """``(1 - eps) * softmax + eps / K_train`` on the training domains, 0 on the targets,
    summing to 1 (float32 softmax: rtol 1e-5)."""
    train = np.array([True, False, True, True])
    w = jnp.asarray([0.2, 0.0, 0.5, 0.3])
    scores = jnp.asarray([0.01, 0.0, -0.02, 0.03])
    mu, eps = 0.05, 0.2
    got = np.asarray(update_weights(w, scores, train, mu, smoothing=eps))
    logit = np.log(np.asarray(w)[train]) + np.asarray(scores)[train] / mu
    soft = np.exp(logit - logit.max())
    soft /= soft.sum()
    want = np.zeros(4)
    want[train] = (1 - eps) * soft + eps / 3
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert abs(got.sum() - 1) < 1e-6


# ----------------------------------------------------------------------------- KD loss
def test_kl_per_token_is_tau_squared_kl_teacher_to_student():
    """``tau^2 * KL(softmax(t / tau) || softmax(s / tau))`` (teacher first, both tempered),
    against a float64 numpy oracle; float32 log-softmax of O(1) logits: rtol 1e-4."""
    rng = np.random.default_rng(0)
    t = rng.normal(size=(2, 3, 7)) * 2
    s = rng.normal(size=(2, 3, 7)) * 2

    def logsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    for tau in (1.0, 2.0, 0.5):
        lt, ls = logsm(t / tau), logsm(s / tau)
        want = tau ** 2 * np.sum(np.exp(lt) * (lt - ls), -1)
        got = kl_per_token(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32), tau)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- conversion
def test_attention_init_copies_each_norm_to_its_place():
    """The SSM block's pre-mixer ``norm`` is the teacher's ``attn_norm`` and its ``mlp_norm`` the
    teacher's ``mlp_norm``.  At init every RMSNorm scale is 1, so a swap is invisible there: the
    teacher's scales are set to distinct random values first (exact copies: array_equal)."""
    from jaxformers.distill import init_student, student_config
    cfg = jf.get_config("llama", "tiny", vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                        d_ff=64, max_seq_len=32)
    tp = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tp = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        if jax.tree_util.keystr(path).endswith("['scale']") else x, tp)
    s = student_config(cfg, "hybrid", (1,))
    sp = init_student(cfg, tp, s, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(sp["blocks_0"]["norm"]["scale"], tp["blocks_0"]["attn_norm"]["scale"])
    np.testing.assert_array_equal(sp["blocks_0"]["mlp_norm"]["scale"], tp["blocks_0"]["mlp_norm"]["scale"])
    np.testing.assert_array_equal(sp["final_norm"]["scale"], tp["final_norm"]["scale"])
