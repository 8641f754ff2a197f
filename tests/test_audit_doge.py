"""Regression tests of the DoGE audit (training/doge.py, experiments/doge.py)."""
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.training import TrainConfig, cross_entropy, train
from jaxformers.training.doge import DogeStep, doge_weights
from jaxformers.training.losses import apply_model, next_token_targets


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on under mat tree and then quickly slowly".split()
    (root / "prose.txt").write_text("\n".join(" ".join(rng.choice(words, size=12)) + "." for _ in range(400)))
    (root / "code.txt").write_text(inspect.getsource(json.decoder))
    return [str(root / "prose.txt"), str(root / "code.txt"), "noise"]


CFG = jf.get_config("gpt", "tiny", vocab_size=257, d_model=16, n_layer=1, n_head=2, max_seq_len=8)


def _tc(out, spec, steps, **kw):
    return TrainConfig(steps=steps, batch_size=3, seq_len=8, data=spec, out_dir=str(out), eval_every=0,
                       eval_batches=1, log_every=1, lr=3e-3, warmup_steps=0, checkpoint_every=0, **kw)


def test_resume_with_another_dogestep_is_refused(tmp_path, texts):
    """Resuming a proxy run with another mu / targets silently mixed two weight trajectories."""
    step = DogeStep(domains=("prose", "code", "noise"), mu=0.01)
    spec = step.data_spec(texts, max_bytes=8000)
    train(CFG, _tc(tmp_path / "run", spec, 2), step_fn=step, progress=False, stop_after=1)
    other = DogeStep(domains=("prose", "code", "noise"), mu=1.0, targets=("noise",))
    with pytest.raises(ValueError, match=r"another DogeStep.*targets.*mu: 0.01 -> 1.0"):
        train(CFG, _tc(tmp_path / "run", spec, 2), step_fn=other, progress=False, resume=True)
    assert json.loads((tmp_path / "run" / "doge.json").read_text())["mu"] == 0.01  # the run's own settings


def _fake_run(run_dir, steps_total, logged):
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"train": {"steps": steps_total}}))
    rows = [{"step": s, "loss": 1.0, "doge/avg_weight/a": 0.5 + 0.01 * s, "doge/avg_weight/b": 0.5 - 0.01 * s}
            for s in logged]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_doge_weights_refuses_an_unfinished_run(tmp_path):
    """A run stopped before its last step silently gave the average of its last *logged* step."""
    _fake_run(tmp_path / "cut", 8, [4])
    with pytest.raises(ValueError, match="not finished.*step 4 of 8"):
        doge_weights(tmp_path / "cut")
    assert doge_weights(tmp_path / "cut", allow_unfinished=True) == {"a": 0.54, "b": 0.46}
    _fake_run(tmp_path / "done", 8, [4, 8])
    assert doge_weights(tmp_path / "done") == pytest.approx({"a": 0.58, "b": 0.42})


def _naive_ce(module, params, batch, rng=None):
    """Cross-entropy as sum / count: 0 / 0 = NaN for a micro-batch without targets."""
    logits, _ = apply_model(module, params, batch, rng)
    t, w = next_token_targets(batch)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), t[..., None], -1)[..., 0]
    return jnp.sum(ce * w) / jnp.sum(w), {"n_targets": jnp.sum(w)}


def test_domain_without_targets_adds_nothing():
    """A domain micro-batch with n_targets == 0 and a NaN loss made every weight and parameter NaN."""
    module = jf.build(CFG)
    params = jf.init_params(module, jax.random.PRNGKey(0))
    step = DogeStep(domains=("a", "b", "c"))
    tx = step.wrap_optimizer(optax.sgd(1.0))
    tok = np.random.default_rng(0).integers(0, 257, size=(6, 9))
    mask = np.ones((6, 9), np.float32)
    mask[1::3] = 0  # domain b: no targets
    batch = {"tokens": jnp.asarray(tok, jnp.int32), "loss_mask": jnp.asarray(mask)}
    outs = [jax.jit(lambda p, st, b, fn=fn: step(module, tx, fn, p, st, b, 0, None,
                                                 schedule=lambda c: jnp.float32(0.1)))(params, tx.init(params), batch)
            for fn in (_naive_ce, cross_entropy)]  # cross_entropy: 0 loss, 0 gradient for b
    (p, s, m), (p_ref, s_ref, _) = outs
    assert np.isfinite(np.asarray(s.weights)).all() and float(m["loss/b"]) == 0.0
    np.testing.assert_allclose(s.weights, s_ref.weights, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_doge_experiment_reuses_finished_runs(tmp_path, monkeypatch, capsys):
    """Re-running the experiment retrained every run (no way to keep finished work), and a run
    stopped by a signal (train returns early) was reported as if finished."""
    import jaxformers.training as training
    from experiments import doge as exp

    tiny = dict(exp.PRESETS["tiny"], proxy_model=dict(d_model=16, n_layer=1, n_head=2, max_seq_len=16),
                base_model=dict(d_model=16, n_layer=1, n_head=2, max_seq_len=16),
                proxy=dict(steps=2, batch_size=5, seq_len=16, lr=3e-3, warmup_steps=0),
                base=dict(steps=2, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=0))
    monkeypatch.setitem(exp.PRESETS, "tiny", tiny)
    real_train = training.train

    def stopped(cfg, tc, **kw):  # base_uniform: as if SIGTERM arrived after step 1
        return real_train(cfg, tc, stop_after=1, **kw) if tc.out_dir.endswith("base_uniform") else \
            real_train(cfg, tc, **kw)

    argv = ["--preset", "tiny", "--out", str(tmp_path), "--eval-batches", "1", "--max-bytes", "20000",
            "--no-compile-cache", "--no-ood"]
    monkeypatch.setattr(training, "train", stopped)
    with pytest.raises(SystemExit, match="base_uniform stopped at step 1 of 2"):
        exp.main(argv)
    monkeypatch.setattr(training, "train", real_train)
    capsys.readouterr()
    first = exp.main(argv + ["--reuse"])
    err = capsys.readouterr().err
    assert "reusing" in err and "proxy" in err and "resuming base_uniform" in err
    assert first["base_runs"]["uniform"]["avg_ppl"] > 1
    summary = json.loads((tmp_path / "runs" / "base_uniform" / "summary.json").read_text())
    assert summary["finished"] and summary["resumed_from"] == 1
    again = exp.main(argv + ["--reuse"])
    err = capsys.readouterr().err
    assert "training" not in err and err.count("reusing") == 4
    assert again["doge_weights"] == first["doge_weights"] and again["base_runs"] == first["base_runs"]
    with pytest.raises(SystemExit, match="cannot reuse .*proxy.*mu: 0.01 -> 0.5"):
        exp.main(argv + ["--reuse", "--mu", "0.5"])


def test_two_domain_universal_mode_warns():
    """With 2 domains in universal mode both scores are <g_1, g_2>: uniform weights whatever the data."""
    with pytest.warns(UserWarning, match="weights stay uniform"):
        DogeStep(domains=("text", "noise"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DogeStep(domains=("text", "noise"), targets=("noise",))
        DogeStep(domains=("a", "b", "c"))


def test_doge_experiment_saves_the_ood_results_as_it_goes(tmp_path, monkeypatch):
    """results.json got the out-of-domain proxy's weights and runs only at the very end: an
    interrupted OOD stage lost them all."""
    from experiments import doge as exp
    from jaxformers.training import doge as doge_mod

    triple = "reuse" in inspect.signature(exp._train).parameters  # (summary, run_dir, reused)

    def fake_train(name, *a, **kw):
        if name == "ood_doge_ood":
            raise KeyboardInterrupt  # killed during the last run
        summary = {"train_loss": 1.0, **{f"val_loss/{d}": 1.0 for d in exp.DOMAINS}}
        return (summary, tmp_path / "runs" / name) + ((False,) if triple else ())

    weights = {d: 0.0 if d == "poems" else 0.25 for d in exp.DOMAINS}
    monkeypatch.setattr(exp, "_train", fake_train)
    monkeypatch.setattr(doge_mod, "doge_weights", lambda run_dir, **kw: dict(weights))
    monkeypatch.setattr(doge_mod, "doge_weight_history", lambda run_dir, kind="weight": ([1], {"a": [1.0]}))
    with pytest.raises(KeyboardInterrupt):
        exp.main(["--preset", "tiny", "--out", str(tmp_path), "--max-bytes", "20000", "--no-compile-cache"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is False and saved["ood"]["doge_weights"] == weights
    assert saved["ood"]["runs"]["uniform"]["target_val_ppl"] == pytest.approx(np.e)
