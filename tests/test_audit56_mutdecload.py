"""Audit 56 (mutdecload): tests from a mutation pass over ``jaxformers/decoding.py`` and
``jaxformers/data/loader.py`` that kill mutants the suite let through.  Each asserts against an
independent computation (the docstring's formula, a hand enumeration, an empirical
distribution); tiny shapes and a one-layer vocab-32 model keep the file fast."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.data.loader import TokenLoader, strided_eval_batches, strided_windows
from jaxformers.decoding import sample_logits
from jaxformers.registry import build, get_config


def _tiny(**kw):
    kw = dict(dict(d_model=16, n_head=2, n_layer=1, vocab_size=32), **kw)
    module = build(get_config("gpt", "tiny", **kw))
    return module, {"params": jf.init_params(module, jax.random.PRNGKey(0))}


# ----------------------------------------------------------------------------- data loader

def test_token_loader_starts_are_the_documented_draw():
    """The module docstring promises the starts come from ``default_rng([seed, step])`` (so a
    checkpoint of an older run resumes on the same windows): integers in ``[0, n - seq_len)``."""
    tokens = np.arange(500, dtype=np.int32)
    loader = TokenLoader(tokens, 6, 8, seed=3, process_index=0, process_count=1)
    for step in (0, 1, 7):
        want = np.random.default_rng([3, step]).integers(0, 500 - 8, size=6, dtype=np.int64)
        np.testing.assert_array_equal(loader.offsets_at(step), want)
        np.testing.assert_array_equal(loader.batch_at(step), tokens[want[:, None] + np.arange(9)])


@pytest.mark.parametrize("max_windows", [4, 5, 100])
def test_max_windows_at_or_above_the_full_windows_changes_nothing(max_windows):
    """``max_windows`` only caps: 41 tokens, seq_len 10 hold 4 full windows, so a cap of 4 or
    more gives exactly the uncapped windows (no window past the scored tokens)."""
    want = strided_windows(41, 10, 3)
    got = strided_windows(41, 10, 3, max_windows=max_windows)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    assert got[0][-1] + 10 == 40  # the last window ends at the last scored token
    tokens = np.arange(41, dtype=np.int32)
    batches = list(strided_eval_batches(tokens, 4, 10, 3, max_windows=max_windows, process_index=0,
                                        process_count=1))
    scored = np.concatenate([b["tokens"][b["loss_mask"] > 0] for b in batches])
    np.testing.assert_array_equal(np.sort(scored), np.arange(1, 41))  # every target exactly once


# ----------------------------------------------------------------------------- sampling

def _draws(logits, n=4000, **kw):
    """``n`` draws of ``sample_logits`` over one row of ``logits`` (one key each), as counts."""
    logits = jnp.asarray(logits, jnp.float32)[None]
    keys = jax.random.split(jax.random.PRNGKey(11), n)
    draws = jax.jit(jax.vmap(lambda k: sample_logits(logits, k, **kw)[0]))(keys)
    return np.bincount(np.asarray(draws), minlength=logits.shape[-1])


def test_temperature_scales_the_logits_once():
    """At temperature 0.5 the draws follow softmax(logits / 0.5) (and not, e.g., / 0.25)."""
    logits = np.array([0.0, 0.5, 1.0, 0.2], np.float32)
    want = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum()  # [.14, .23, .38, .21]..
    freq = _draws(logits, temperature=0.5) / 4000
    np.testing.assert_allclose(freq, want, atol=0.03)


def test_a_temperature_below_floats_smallest_normal_is_greedy_even_with_tied_logits():
    """The docstring: a temperature below float32's smallest normal number samples greedily.
    Tied logits do not overflow when divided, so only that rule makes them greedy (id 0)."""
    counts = _draws(np.zeros(4, np.float32), n=64, temperature=1e-40)
    assert counts[0] == 64, counts


@pytest.mark.parametrize("kw", [dict(temperature=2.0, top_p=0.7), dict(temperature=0.5, top_p=0.9),
                                dict(temperature=1.5, top_k=4, top_p=0.8)])
def test_the_draws_follow_hfs_temperature_top_k_top_p_warpers(kw):
    """Hugging Face's warpers in generate's order (temperature, top-k, top-p) on distinct logits
    give the distribution the draws must follow: the nucleus is cut on the tempered
    distribution, after top-k."""
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = np.array([1.3, -0.4, 0.1, 2.0, 0.8, -1.1, 0.45], np.float32)
    scores = torch.tensor(logits)[None]
    warpers = [lp.TemperatureLogitsWarper(kw["temperature"])]
    if "top_k" in kw:
        warpers.append(lp.TopKLogitsWarper(kw["top_k"]))
    warpers.append(lp.TopPLogitsWarper(kw["top_p"]))
    for w in warpers:
        scores = w(None, scores)
    want = torch.softmax(scores, -1)[0].numpy()
    freq = _draws(logits, **kw) / 4000
    assert set(np.nonzero(freq)[0]) == set(np.nonzero(want)[0]), (freq, want)
    np.testing.assert_allclose(freq, want, atol=0.03)


def test_top_k_equal_to_the_vocab_is_accepted_and_keeps_every_token():
    """``top_k`` may be anything in ``[1, vocab_size]``: ``top_k == V`` keeps every token (the
    draws follow the plain softmax), and ``generate`` takes ``top_k=vocab_size``."""
    logits = np.array([0.3, -0.2, 0.9, 0.0], np.float32)
    freq = _draws(logits, top_k=4) / 4000
    np.testing.assert_allclose(freq, np.exp(logits) / np.exp(logits).sum(), atol=0.03)
    module, params = _tiny()
    out = np.asarray(jf.generate(module, params, np.array([[1, 2]]), 3, top_k=32, rng=1))
    assert out.shape == (1, 5) and ((0 <= out) & (out < 32)).all()


def test_the_refusal_names_the_earliest_step_then_the_lowest_row():
    """Rows 1 and 2 went bad at new tokens 3 and 1: the error names row 2, step 1 (the earliest
    step), not the first bad row."""
    from jaxformers.decoding import NonFiniteLogitsError, _refuse_unusable
    module, _ = _tiny()
    with pytest.raises(NonFiniteLogitsError) as e:
        _refuse_unusable(np.array([-1, 3, 1, 1]), module)
    assert (e.value.row, e.value.step) == (2, 1)
    np.testing.assert_array_equal(e.value.steps, [-1, 3, 1, 1])


def test_vocab_limit_equal_to_the_vocab_is_no_limit():
    """``vocab_limit`` may be anything in ``[1, vocab_size]``; ``vocab_size`` itself draws what no
    limit draws (the same rng stream), ``eos_id`` and ``top_k`` up to it included."""
    module, params = _tiny()
    prompt = np.array([[1, 2], [3, 4]], np.int32)
    kw = dict(temperature=1.0, rng=4, top_k=32, eos_id=31)
    np.testing.assert_array_equal(jf.generate(module, params, prompt, 6, vocab_limit=32, **kw),
                                  jf.generate(module, params, prompt, 6, **kw))
    out = np.asarray(jf.generate(module, params, prompt, 6, vocab_limit=20, top_k=20, eos_id=19, rng=4))
    assert (out[:, 2:] < 20).all()
    with pytest.raises(ValueError, match="eos_id"):  # id 20 is never drawn: no row would finish
        jf.generate(module, params, prompt, 6, vocab_limit=20, eos_id=20)


def test_finished_rows_are_filled_with_eos_by_default():
    """Without ``pad_id`` a row's positions after its ``eos_id`` hold ``eos_id``: greedy, the eos
    is the row's first new token, so every later position is the eos too."""
    module, params = _tiny()
    prompt = np.array([[5, 6, 7]], np.int32)
    eos = int(np.asarray(jf.generate(module, params, prompt, 1, temperature=0.0))[0, -1])
    out = np.asarray(jf.generate(module, params, prompt, 5, temperature=0.0, eos_id=eos))
    np.testing.assert_array_equal(out[0], [5, 6, 7] + [eos] * 5)
