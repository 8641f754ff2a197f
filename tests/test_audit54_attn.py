"""Audit 54 (attention): regression tests."""
import numpy as np
import jax.numpy as jnp
import pytest

from jaxformers.ops.attention import attention


def _qkv(tq=4, tk=6, hq=2, hkv=1, d=8):
    rng = np.random.default_rng(0)
    mk = lambda t, h: jnp.asarray(rng.standard_normal((1, t, h, d)), jnp.float32)  # noqa: E731
    return mk(tq, hq), mk(tk, hkv), mk(tk, hkv)


@pytest.mark.parametrize("q_offset", [2.7, True, np.array([2.9]), jnp.float32(2.0)])
def test_q_offset_must_be_integer(q_offset):
    # a float q_offset was truncated to int32 silently (2.7 -> 2), True read as 1
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q_offset"):
        attention(q, k, v, q_offset=q_offset, implementation="xla")


def test_q_offset_integer_ok():
    q, k, v = _qkv()
    a = attention(q, k, v, implementation="xla")
    for off in (2, np.int32(2), jnp.asarray([2], jnp.int32)):
        np.testing.assert_allclose(attention(q, k, v, q_offset=off, implementation="xla"), a, atol=1e-6)


@pytest.mark.parametrize("bad", [[[0, 1, 2, -1]], [[-1, 0, 1, 2]], [[0, 1, 2, 4]]])
def test_position_causal_q_key_index_out_of_range(bad):
    # -1 was wrapped to the last key's row: query 0 got another query's output, silently
    import jax
    from jaxformers.ops.attention import position_causal_attention

    q, k, v = _qkv(tq=4, tk=4)
    pos = jnp.arange(4, dtype=jnp.int32)[None]
    qki = jnp.asarray(bad, jnp.int32)
    with pytest.raises(ValueError, match="q_key_index"):
        position_causal_attention(q, k, v, q_pos=pos, kv_pos=pos, q_key_index=qki, implementation="pallas")
    f = jax.jit(lambda i: position_causal_attention(q, k, v, q_pos=pos, kv_pos=pos, q_key_index=i,
                                                    implementation="pallas"))
    out = np.asarray(f(qki))
    bad_rows = [(i < 0 or i >= 4) for i in bad[0]]
    for i, is_bad in enumerate(bad_rows):
        assert np.isnan(out[0, i]).all() == is_bad
    ref = position_causal_attention(q, k, v, q_pos=pos, kv_pos=pos)
    ok = [i for i, j in enumerate(bad[0]) if i == j]  # queries placed at their own key
    np.testing.assert_allclose(out[0, ok], np.asarray(ref)[0, ok], atol=1e-5)


def test_noncausal_window_uses_absolute_query_positions():
    # the module docstring said |i - j| < w; the code (rightly) uses |q_offset + i - j| < w
    q, k, v = _qkv(tq=2, tk=8)
    o = attention(q, k, v, causal=False, window=2, q_offset=3, implementation="xla")
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    for i in range(2):
        keys = [j for j in range(8) if abs(3 + i - j) < 2]
        for h in range(2):
            s = kn[0, keys, 0] @ qn[0, i, h] / np.sqrt(8)
            p = np.exp(s - s.max()); p /= p.sum()
            np.testing.assert_allclose(o[0, i, h], p @ vn[0, keys, 0], atol=1e-5)


@pytest.mark.parametrize("window", [0, -2, 2.0, True])
def test_ops_attention_mask_checks_window(window):
    # jaxformers.ops.attention.attention_mask(window=0) hid every key (an all-False mask), silently
    from jaxformers.ops.attention import attention_mask

    with pytest.raises(ValueError, match="window"):
        attention_mask(3, 3, window=window)
    assert int(attention_mask(3, 3, window=np.int64(2)).sum()) == 5


def test_head_dim_zero_is_a_value_error():
    # head_dim 0 was a ZeroDivisionError ("0.0 cannot be raised to a negative power")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="head_dim"):
        attention(q[..., :0], k[..., :0], v[..., :0], implementation="xla")


def test_position_causal_q_key_index_must_match_position_and_id():
    # the kernel path reads a query's position / id from its key: a mismatch gave another answer
    # than implementation="xla" (max abs diff 0.86 / 1.69 in the probe), silently
    from jaxformers.ops.attention import position_causal_attention

    q, k, v = _qkv(tq=4, tk=4)
    pos = jnp.arange(4, dtype=jnp.int32)[None]
    with pytest.raises(ValueError, match="q_key_index"):
        position_causal_attention(q, k, v, q_pos=jnp.asarray([[0, 1, 3, 3]], jnp.int32), kv_pos=pos,
                                  q_key_index=pos, implementation="pallas")
    ids = jnp.asarray([[0, 0, 1, 1]], jnp.int32)
    with pytest.raises(ValueError, match="q_key_index"):
        position_causal_attention(q, k, v, q_pos=pos, kv_pos=pos, q_key_index=pos,
                                  segment_ids=(jnp.asarray([[0, 1, 1, 1]], jnp.int32), ids),
                                  implementation="pallas")
    got = position_causal_attention(q, k, v, q_pos=pos, kv_pos=pos, q_key_index=pos, segment_ids=(ids, ids),
                                    implementation="pallas")
    want = position_causal_attention(q, k, v, q_pos=pos, kv_pos=pos, segment_ids=(ids, ids))
    np.testing.assert_allclose(got, want, atol=1e-5)
