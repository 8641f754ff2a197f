"""Audit 46 (decoding): regression tests from a mutation pass over ``jaxformers/decoding.py``
and the bugs it found.  Tiny configs (vocab 32, d_model 16, one layer) keep each test fast."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.registry import build, get_config


def _tiny(**kw):
    kw = dict(dict(d_model=16, n_head=2, n_layer=1, vocab_size=32), **kw)
    module = build(get_config("gpt", "tiny", **kw))
    return module, {"params": jf.init_params(module, jax.random.PRNGKey(0))}


@pytest.fixture(scope="module")
def gpt():
    return _tiny()


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_prompt_ids_beyond_int32_are_refused_not_wrapped(gpt, dtype):
    """An id of 2**32 + 3 was cast to int32 first (3, a valid id) and silently decoded as 3;
    also with prompt_lengths (the id inside the row's prompt)."""
    module, params = gpt
    with pytest.raises(ValueError, match="prompt_tokens must be ids"):
        jf.generate(module, params, np.array([[1, 2**32 + 3]], dtype), 2, temperature=0.0)
    with pytest.raises(ValueError, match="prompt_tokens must be ids"):
        jf.generate(module, params, np.array([[1, 2**32 + 3], [1, 2]], dtype), 2, temperature=0.0,
                    prompt_lengths=[2, 1])
    with pytest.raises(ValueError, match="prompt_tokens must be ids"):  # wraps negative: refused before too
        jf.generate(module, params, np.array([[1, 2**31]], dtype), 2, temperature=0.0)


def test_ragged_padding_beyond_int32_is_still_ignored(gpt):
    module, params = gpt
    prompts = np.array([[1, 2, 2**40], [3, 4, 5]], np.int64)
    got = np.asarray(jf.generate(module, params, prompts, 2, temperature=0.0, prompt_lengths=[2, 3]))
    want = np.asarray(jf.generate(module, params, np.array([[1, 2, 0], [3, 4, 5]]), 2, temperature=0.0,
                                  prompt_lengths=[2, 3]))
    np.testing.assert_array_equal(got, want)


def test_top_p_accepts_a_numpy_int_like_a_python_int(gpt):
    """``top_p=1`` was accepted but ``top_p=np.int64(1)`` refused (top_k takes numpy ints)."""
    module, params = gpt
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    key = jax.random.PRNGKey(0)
    want = int(jf.sample_logits(logits, key, top_p=1)[0])
    assert int(jf.sample_logits(logits, key, top_p=np.int64(1))[0]) == want
    prompt = np.ones((1, 2), np.int32)
    a = jf.generate(module, params, prompt, 3, top_p=np.int64(1), rng=1)
    np.testing.assert_array_equal(a, jf.generate(module, params, prompt, 3, top_p=1.0, rng=1))
    with pytest.raises(ValueError, match="top_p"):
        jf.sample_logits(logits, key, top_p=np.int64(0))
    with pytest.raises(ValueError, match="top_p"):
        jf.sample_logits(logits, key, top_p=np.bool_(True))


def test_every_step_draws_with_a_fresh_key():
    """Zero params: every position's logits are equal (uniform over 32 ids).  A sampler that
    reused one key per step would then draw the same id at every step (the last one aside).
    The same seed repeats the sample, another seed does not."""
    module, params = _tiny()
    params = jax.tree.map(jnp.zeros_like, params)
    prompt = np.array([[1, 2], [1, 2]], np.int32)
    out = np.asarray(jf.generate(module, params, prompt, 24, temperature=1.0, rng=5))
    for row in out[:, 2:]:  # ~17 distinct expected; fewer than 8 has probability below 1e-7
        assert len(set(row.tolist())) >= 8, row
    assert not np.array_equal(out[0, 2:], out[1, 2:])  # rows draw independently too
    np.testing.assert_array_equal(out, jf.generate(module, params, prompt, 24, temperature=1.0, rng=5))
    assert not np.array_equal(out, jf.generate(module, params, prompt, 24, temperature=1.0, rng=6))


def test_ragged_eos_sampled_at_a_prompt_position_does_not_end_the_row(gpt):
    """Row 1 is still being fed its own prompt while row 0 samples: the token drawn (and
    discarded) for row 1 there must not count as its ``eos_id``.  Greedy: the token drawn after
    row 1's first prompt token is the eos; row 1 must decode exactly as it would alone."""
    module, params = gpt
    x = 1
    eos = int(np.asarray(jf.generate(module, params, np.array([[x]]), 1, temperature=0.0))[0, -1])
    pad = 31
    for z in range(32):
        row = np.array([[x, 5, z]], np.int32)
        alone = np.asarray(jf.generate(module, params, row, 4, temperature=0.0, eos_id=eos, pad_id=pad))
        if alone[0, 3] not in (eos, pad):  # row 1's first new token: not eos, not the fill
            break
    else:
        pytest.fail("no prompt found whose first new token is neither eos nor pad")
    prompts = np.array([[x, 0, 0], [x, 5, z]], np.int32)
    out = np.asarray(jf.generate(module, params, prompts, 4, temperature=0.0, eos_id=eos, pad_id=pad,
                                 prompt_lengths=[1, 3]))
    np.testing.assert_array_equal(out[1], alone[0])


def test_scanned_layers_share_the_prefill_of_num_samples():
    """With ``scan_layers`` the layer caches are stacked on a leading [L] axis: the k rows per
    prompt are repeated on axis 1, giving what generating each row separately gives."""
    module, params = _tiny(n_layer=2, scan_layers=True)
    prompt = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    got = np.asarray(jf.generate(module, params, prompt, 4, temperature=0.0, num_samples=2))
    want = jf.generate(module, params, np.repeat(prompt, 2, 0), 4, temperature=0.0)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("top_k", [33, 100])
def test_top_k_above_the_vocab_is_refused_by_name(gpt, top_k):
    """Not an error from inside ``lax.top_k``: the message names top_k and its range."""
    module, params = gpt
    with pytest.raises(ValueError, match=r"top_k must be None or an int in \[1, vocab_size=32\]"):
        jf.sample_logits(jnp.zeros((1, 32)), jax.random.PRNGKey(0), top_k=top_k)
    with pytest.raises(ValueError, match=r"top_k must be None or an int in \[1, vocab_size=32\]"):
        jf.generate(module, params, np.ones((1, 2), np.int32), 2, top_k=top_k)


@pytest.mark.parametrize("kw", [{}, {"prompt_lengths": np.zeros((0,), np.int32)}])
def test_an_empty_batch_of_prompts_is_refused_by_name(gpt, kw):
    """B=0 was "batch_size must be a positive int" (init_cache's argument) or, with
    prompt_lengths, numpy's "zero-size array to reduction operation minimum"."""
    module, params = gpt
    with pytest.raises(ValueError, match=r"prompt_tokens must be \[B, P\] with B >= 1"):
        jf.generate(module, params, np.zeros((0, 3), np.int32), 2, **kw)


@pytest.mark.parametrize("kw", [dict(eos_id=32), dict(eos_id=1, pad_id=32)])
def test_eos_and_pad_id_equal_to_vocab_size_are_refused(gpt, kw):
    """The boundary: ids are in [0, vocab_size), so vocab_size itself is not one."""
    module, params = gpt
    name = "pad_id" if "pad_id" in kw else "eos_id"
    with pytest.raises(ValueError, match=rf"{name} must be None or a token id in \[0, vocab_size=32\)"):
        jf.generate(module, params, np.ones((1, 2), np.int32), 2, **kw)


@pytest.mark.parametrize("top_k", [None, 2])
def test_a_tiny_temperature_that_overflows_several_logits_is_greedy(top_k):
    """temperature=1e-37 (above float32's smallest normal, so not the greedy shortcut): 40/T,
    45/T and 50/T all overflow float32 to +inf, and a categorical draw would pick the first inf;
    the limit T -> 0 is the argmax."""
    logits = jnp.array([[40.0, 50.0, 10.0, -1.0], [40.0, 45.0, 50.0, 0.0]])
    for seed in range(3):
        got = jf.sample_logits(logits, jax.random.PRNGKey(seed), temperature=1e-37, top_k=top_k)
        assert got.tolist() == [1, 2]
