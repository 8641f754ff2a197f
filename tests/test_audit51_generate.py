"""Audit 51: generation from a model whose logits cannot be sampled from.

``generate`` used to draw a token even from NaN logits (a diverged or broken model) and return
the arbitrary tokens without a word; it now raises :class:`NonFiniteLogitsError` naming the first
new token and row whose logits hold NaN / +inf (or -inf for every id that may be drawn).  The
tokens of a finite model are unchanged (the comparison with the old code: greedy, sampled, top-k,
top-p, ragged, eos, ``num_samples`` on gpt / llama / mamba / landmark, checked when this was
written; here: the same draws as ``sample_logits`` gives).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.decoding import NonFiniteLogitsError, unusable_logits
from jaxformers.models import Transformer

NAN_TOKEN, INF_TOKEN, TRIGGER, BOOSTED = 5, 6, 7, 9


def _config(**kw):
    return jf.get_config("gpt", "tiny", vocab_size=32, d_model=32, n_layer=1, n_head=2, max_seq_len=64, **kw)


class Hooked(Transformer):
    """gpt with a logits hook on the fed token: NAN_TOKEN -> every next logit NaN; INF_TOKEN ->
    logit 0 is +inf; TRIGGER -> BOOSTED's logit +1e4 (greedy draws it); ``banned`` ids -inf."""
    banned = ()

    def __call__(self, tokens, **kw):
        out = super().__call__(tokens, **kw)
        logits, cache = out if isinstance(out, tuple) else (out, None)
        fed = jnp.asarray(tokens)[..., None]
        logits = jnp.where(fed == NAN_TOKEN, jnp.nan, logits)
        ids = jnp.arange(logits.shape[-1])
        logits = jnp.where((fed == INF_TOKEN) & (ids == 0), jnp.inf, logits)
        logits = jnp.where((fed == TRIGGER) & (ids == BOOSTED), logits + 1e4, logits)
        if self.banned:
            logits = jnp.where(jnp.isin(ids, jnp.asarray(self.banned)), -jnp.inf, logits)
        return logits if cache is None else (logits, cache)


@pytest.fixture(scope="module")
def model():
    module = Hooked(_config())
    return module, {"params": jf.init_params(module, jax.random.PRNGKey(0))}


def test_nan_parameters_are_refused():
    """NaN parameters (a diverged run): refused at new token 0 of row 0, greedy or sampled."""
    module = jf.build(_config())
    params = jax.tree.map(lambda x: x * jnp.nan, jf.init_params(module, jax.random.PRNGKey(0)))
    prompt = jnp.ones((2, 3), jnp.int32)
    for kw in (dict(temperature=0.0), dict(rng=1, top_k=4)):
        with pytest.raises(NonFiniteLogitsError, match=r"model 'gpt' produced logits .*\(NaN or \+inf.* first "
                                                      r"for new token 0 of row 0 of the result") as e:
            jf.generate(module, {"params": params}, prompt, 4, **kw)
        assert isinstance(e.value, FloatingPointError)
        assert (e.value.row, e.value.step, e.value.steps.tolist()) == (0, 0, [0, 0])


def test_the_first_bad_step_and_row_are_named(model):
    """Row 1's prompt feeds NAN_TOKEN at a position past the shared prefill: its first new token
    is drawn from NaN logits; row 0 (vocab_limit keeps it from drawing NAN_TOKEN) is fine."""
    module, params = model
    prompt = jnp.asarray([[1, 2, 3, 0, 0], [1, 2, 3, 4, NAN_TOKEN]], jnp.int32)
    with pytest.raises(NonFiniteLogitsError,
                       match=r"first for new token 0 of row 1 .* affected: row 1 at new token 0\.") as e:
        jf.generate(module, params, prompt, 3, rng=0, prompt_lengths=[3, 5], vocab_limit=NAN_TOKEN)
    assert e.value.steps.tolist() == [-1, 0]
    # a later new token: greedy decoding after TRIGGER draws BOOSTED (new token 0), and a model
    # whose logits after BOOSTED are NaN then draws new token 1 from NaN logits
    with pytest.raises(NonFiniteLogitsError,
                       match=r"first for new token 1 of row 0 .* affected: row 0 at new token 1\."):
        jf.generate(BoostIntoNan(module.config), params, jnp.asarray([[1, TRIGGER]]), 4, temperature=0.0)


class BoostIntoNan(Hooked):
    """Hooked, and every logit NaN after the fed token BOOSTED."""

    def __call__(self, tokens, **kw):
        tokens = jnp.asarray(tokens)
        logits, cache = super().__call__(tokens, **kw)
        return jnp.where((tokens == BOOSTED)[..., None], jnp.nan, logits), cache


def test_only_the_logits_a_token_is_drawn_from_count(model):
    """NaN logits at a prompt position no token is drawn from (inside the prefill, then a forced
    prompt token) and after a row is finished (eos) are not refused."""
    module, params = model
    prompt = jnp.asarray([[1, 2, 3, 0, 0], [1, 2, NAN_TOKEN, 3, 4]], jnp.int32)
    out = jf.generate(module, params, prompt, 3, rng=0, prompt_lengths=[3, 5], vocab_limit=NAN_TOKEN)
    assert out.shape == (2, 8)
    # greedy after TRIGGER draws BOOSTED = eos: the row is finished, the NaN logits after it unused
    out = jf.generate(BoostIntoNan(module.config), params, jnp.asarray([[1, TRIGGER]]), 4, temperature=0.0,
                      eos_id=BOOSTED)
    assert np.asarray(out).tolist() == [[1, TRIGGER, BOOSTED, BOOSTED, BOOSTED, BOOSTED]]


def test_plus_inf_is_refused_and_minus_inf_bans(model):
    """+inf from the model is refused; -inf at some ids is a ban (never drawn, no error); -inf at
    every id that may be drawn is refused (nothing to draw)."""
    module, params = model
    with pytest.raises(NonFiniteLogitsError,
                       match=r"first for new token 0 of row 0 .* affected: row 0 at new token 0, row 1 at new "
                             r"token 0\."):
        jf.generate(module, params, jnp.asarray([[1, INF_TOKEN, 0], [1, 2, INF_TOKEN]]), 3, rng=0,
                    vocab_limit=INF_TOKEN, prompt_lengths=[2, 3])
    banning = type("Banning", (Hooked,), {"banned": tuple(range(8))})(module.config)
    out = np.asarray(jf.generate(banning, params, jnp.ones((4, 2), jnp.int32), 16, rng=3))
    assert out[:, 2:].min() >= 8
    all_banned = type("AllBanned", (Hooked,), {"banned": tuple(range(8))})(module.config)
    with pytest.raises(NonFiniteLogitsError, match=r"new token 0 of row 0"):
        jf.generate(all_banned, params, jnp.ones((1, 2), jnp.int32), 2, rng=3, vocab_limit=8)


def test_unusable_logits_rule():
    inf, nan = jnp.inf, jnp.nan
    logits = jnp.asarray([[0.0, 1.0, -inf, 2.0],    # a ban: fine
                          [0.0, nan, 1.0, 2.0],     # NaN
                          [0.0, inf, 1.0, 2.0],     # +inf
                          [-inf, -inf, -inf, -inf],  # nothing to draw
                          [-inf, -inf, 3.0, nan],   # NaN past vocab_limit: still the model's NaN
                          [-inf, -inf, 3.0, 1.0]])  # only the banned id 2 is finite below vocab_limit
    assert unusable_logits(logits).tolist() == [False, True, True, True, True, False]
    assert unusable_logits(logits, vocab_limit=3).tolist() == [False, True, True, True, True, False]
    assert unusable_logits(logits, banned=2, vocab_limit=3).tolist() == [False, True, True, True, True, True]


def test_finite_models_generate_the_same_tokens(model):
    """A finite model: greedy is the argmax, sampling the draws sample_logits makes with the same
    key splits as before (the first sampled token of a one-step generate)."""
    module, params = model
    prompt = jnp.asarray([[1, 2, 3], [4, 3, 2]], jnp.int32)
    logits = module.apply(params, prompt)[:, -1]
    greedy = jf.generate(module, params, prompt, 1, temperature=0.0)
    assert np.asarray(greedy[:, -1]).tolist() == np.asarray(jnp.argmax(logits, -1)).tolist()
    key = jax.random.PRNGKey(5)
    got = jf.generate(module, params, prompt, 1, rng=key, top_k=7)
    _, sub = jax.random.split(key)
    want = jf.sample_logits(logits, sub, temperature=1.0, top_k=7)
    assert np.asarray(got[:, -1]).tolist() == np.asarray(want).tolist()


def test_under_an_outer_jit_nothing_is_checked():
    """Traced arguments (generate inside a jit of your own): the flags cannot be read, as the
    docstring says; the call still runs."""
    module = jf.build(_config())
    params = jax.tree.map(lambda x: x * jnp.nan, jf.init_params(module, jax.random.PRNGKey(0)))
    out = jax.jit(lambda p: jf.generate(module, {"params": p}, jnp.ones((1, 2), jnp.int32), 2))(params)
    assert out.shape == (1, 4)
