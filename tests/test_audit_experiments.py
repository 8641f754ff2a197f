"""Regression tests of the experiments audit (scfa_lm, scfa_speed, landmark_lm, landmark_passkey,
denseformer, experiments/common.py)."""
import json
import types

import pytest


class _Stop(Exception):
    """Raised by a stand-in to end an experiment early in a test."""


# ------------------------------------------------------------------ common: stopped runs
def _tiny_gpt():
    import jaxformers as jf
    return jf.get_config("gpt", "tiny", vocab_size=257, n_layer=1, d_model=32, n_head=2, max_seq_len=32)


def test_train_fresh_refuses_a_run_stopped_by_a_signal(tmp_path, monkeypatch):
    """A stop signal (SIGTERM from a GPU stage's limit, Ctrl-C) makes ``train`` return early with
    ``finished: false``; ``train_fresh`` handed that partly trained model back as the result."""
    import jaxformers.training as training
    from experiments.common import train_fresh

    def stopped(cfg, tc, **kw):
        return {"finished": False, "final_step": 3, "steps": tc.steps, "stopped_by_signal": 15}

    monkeypatch.setattr(training, "train", stopped)
    kw = dict(steps=100, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=0, eval_every=0, eval_batches=1)
    with pytest.raises(SystemExit, match="stopped at step 3 of 100"):
        train_fresh("a", _tiny_gpt(), tmp_path, seed=0, data="default", train_kw=kw, log_points=10, tag="t")


def test_reuse_continues_a_run_stopped_by_a_signal(tmp_path, monkeypatch):
    """``check_reuse`` took any run with a summary.json as finished, so ``--reuse`` reported a
    run stopped by a signal (summary ``finished: false``) as the trained model.  Now such a run
    with the same settings is continued from its checkpoint to the same params as a run never
    stopped; with other settings it is trained again (not an error)."""
    import jax
    import numpy as np

    import jaxformers.training as training
    from experiments.common import check_reuse, reuse_or_train, train_fresh

    cfg = _tiny_gpt()
    train_kw = dict(steps=3, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=0, eval_every=0, eval_batches=1)
    kw = dict(seed=0, data="default", train_kw=train_kw, log_points=10)
    _, ref, _, _ = train_fresh("ref", cfg, tmp_path, tag="test", **kw)
    real = training.train
    monkeypatch.setattr(training, "train", lambda *a, **k: real(*a, **k, stop_after=1))  # stops after step 1
    with pytest.raises(SystemExit, match="stopped at step 1 of 3"):
        train_fresh("a", cfg, tmp_path, tag="test", **kw)
    monkeypatch.setattr(training, "train", real)
    assert check_reuse(tmp_path, [("a", cfg)], **kw) == ["a"]
    other = dict(kw, train_kw=dict(train_kw, lr=2e-3))
    assert check_reuse(tmp_path, [("a", cfg)], **other) == []      # other settings: retrained, no error
    summary, params, _, _ = reuse_or_train("a", cfg, tmp_path, ["a"], tag="test", **kw)
    assert summary["finished"] and summary["resumed_from"] == 1
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert check_reuse(tmp_path, [("a", cfg)], **kw) == ["a"]


# ------------------------------------------------------------------ common: atomic results
def test_write_results_keeps_the_previous_file_when_a_write_fails(tmp_path):
    """``write_results`` streamed into the open file: a value JSON cannot encode (or a kill
    mid-write) left a truncated results.json, the previous numbers lost."""
    from experiments.common import save_progress, write_results

    write_results(tmp_path, rows=[1, 2])
    with pytest.raises(TypeError):
        write_results(tmp_path, rows=[1, 2], bad=object())
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == [1, 2]
    save_progress(tmp_path, {"x": object()})  # default=str, as before
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is False
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind


# ------------------------------------------------------------------ scfa_speed: interruption
def test_scfa_speed_keeps_the_finished_lengths_when_cut_short(tmp_path, monkeypatch):
    """results.json was written only after the whole sweep: a sweep cut short by a device stage's
    time limit lost every length it had measured."""
    from experiments import scfa_speed

    def fake_bench(name, fn, q, k, v, do, **kw):
        if q.shape[1] == 128:
            raise KeyboardInterrupt
        return {"fwd": 1.0, "fwd+bwd": 2.0}

    monkeypatch.setattr(scfa_speed, "bench", fake_bench)
    with pytest.raises(KeyboardInterrupt):
        scfa_speed.main(["--quick", "--seq-lens", "64,128", "--buckets", "2", "--keep", "none",
                         "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is False
    assert [r["seq_len"] for r in saved["rows"] if r["impl"] == "flash"] == [64]


# ------------------------------------------------------------------ landmark_passkey
def test_passkey_short_runs_and_reuse_of_the_saved_models(tmp_path, monkeypatch):
    """``--steps 1`` (a valid count) crashed in optax (warmup was max(1, steps // 10) = steps).
    And the passkey experiment kept no trained model: every re-run (and every run after an
    interruption) trained both models again; ``--reuse`` loads them, checked against the settings."""
    from experiments import landmark_passkey as lp

    def argv(steps):
        return ["--out", str(tmp_path), "--steps", str(steps), "--d-model", "16", "--n-layer", "1",
                "--eval-samples", "2", "--factors", "1", "--top-k", "1", "--no-compile-cache"]

    first = lp.main(argv(1))
    monkeypatch.setattr(lp, "train_model", lambda *a, **k: pytest.fail("retrained a saved model"))
    second = lp.main(argv(1) + ["--reuse"])
    for name in ("landmark", "baseline"):
        for key in ("accuracy", "final_train_loss", "train_curve"):
            assert json.loads(json.dumps(first["models"][name][key])) == \
                json.loads(json.dumps(second["models"][name][key])), (name, key)
    with pytest.raises(SystemExit, match="settings.steps: 1 -> 2"):
        lp.main(argv(2) + ["--reuse"])


# ------------------------------------------------------------------ landmark_lm
def test_landmark_lm_keys_per_token_counts_what_the_memory_retrieves():
    """``keys_per_token`` of the memory was ``(chunk + 1) / 2 + top_k L`` at every length, also at
    1x where there is no memory to retrieve from (64.5 recorded vs 48.5 attended at the tiny
    preset) and for the first chunk of longer inputs."""
    from experiments.landmark_lm import memory_keys_per_token

    chunk, L = 96, 16
    assert memory_keys_per_token(chunk, chunk, L, 1) == (chunk + 1) / 2        # 1x: nothing stored
    assert memory_keys_per_token(4 * chunk, chunk, L, 2) == (chunk + 1) / 2 + 2 * L * 3 / 4
    # top_k above the stored blocks retrieves only what is stored (2nd chunk: 6 blocks)
    assert memory_keys_per_token(2 * chunk, chunk, L, 100) == (chunk + 1) / 2 + 6 * L / 2


# ------------------------------------------------------------------ --reuse in the trainer-based ones
@pytest.mark.parametrize("module, argv", [
    ("scfa_lm", ["--only", "baseline"]),
    ("landmark_lm", ["--factors", "1"]),
    ("denseformer", ["--only", "gpt_L4"]),
])
def test_reuse_option_reuses_the_finished_runs(module, argv, tmp_path, monkeypatch):
    """scfa_lm, landmark_lm and denseformer retrained every model on a re-run (no ``--reuse``):
    a run cut short by a stage limit had to start over."""
    import importlib

    mod = importlib.import_module(f"experiments.{module}")
    calls = {}
    monkeypatch.setattr(mod, "check_reuse", lambda out, runs, **kw: [n for n, _ in runs])

    def fake(name, cfg, out, reusable, **kw):
        calls[name] = name in reusable
        raise _Stop

    monkeypatch.setattr(mod, "reuse_or_train", fake)
    with pytest.raises(_Stop):
        mod.main(["--out", str(tmp_path), "--steps", "1", "--no-compile-cache", "--reuse", *argv])
    assert calls and all(calls.values()), calls


def test_scfa_lm_tiles_are_counted_on_validation_text(tmp_path, monkeypatch):
    """The tile counts were taken on uniformly random token ids (all 257 byte ids), not on text:
    the hash buckets, hence the tiles the kernel computes, depend on the tokens."""
    import jaxformers as jf
    import jax
    import numpy as np
    from experiments import scfa_lm
    from jaxformers.training.trainer import open_dataset

    seen = []
    real = scfa_lm.tile_counts

    def spy(cfg, params, batch, seq_len, seed, tile, tokens=None):
        seen.append(tokens)
        return real(cfg, params, batch, seq_len, seed, tile, tokens=tokens)

    def fake_train(name, cfg, out, reusable, **kw):
        params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
        summary = dict(tokens_per_s=1.0, val_loss=1.0, val_ppl=2.7, train_loss=1.0, n_params=1, wall_s=1.0)
        return summary, params, "float32", types.SimpleNamespace(batch_size=2, steps=1, tokens_per_step=256)

    monkeypatch.setattr(scfa_lm, "tile_counts", spy)
    monkeypatch.setattr(scfa_lm, "reuse_or_train", fake_train, raising=False)
    monkeypatch.setattr(scfa_lm, "train_fresh", lambda name, cfg, out, **kw: fake_train(name, cfg, out, [], **kw),
                        raising=False)
    monkeypatch.setattr(scfa_lm, "plot", lambda *a: None)
    scfa_lm.main(["--out", str(tmp_path), "--only", "hash_nb4", "--no-kernel-check", "--no-compile-cache"])
    (tokens,) = seen
    assert tokens is not None and np.asarray(tokens).shape == (2, 128)
    val = np.asarray(open_dataset("default", "byte")[3])
    text = val.tobytes() if val.dtype == np.uint8 else val.astype(np.uint8).tobytes()
    for row in np.asarray(tokens):
        assert row.astype(np.uint8).tobytes() in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert 0 < saved["models"]["hash_nb4_T128"]["tile_fraction"] < 1


def test_denseformer_results_record_the_seed(tmp_path, monkeypatch):
    """results.json of the denseformer experiment had no ``seed`` (every other experiment's has)."""
    from experiments import denseformer

    def fake_train(name, cfg, out, reusable, **kw):
        summary = dict(val_loss=1.0, val_ppl=2.7, train_loss=1.0, n_params=1, tokens_per_s=1.0, wall_s=1.0)
        return summary, None, "float32", types.SimpleNamespace(steps=1, tokens_per_step=1, seq_len=64)

    def capture(out, results):
        raise _Stop(results)

    monkeypatch.setattr(denseformer, "reuse_or_train", fake_train, raising=False)
    monkeypatch.setattr(denseformer, "train_fresh", lambda name, cfg, out, **kw: fake_train(name, cfg, out, []),
                        raising=False)
    monkeypatch.setattr(denseformer, "prepare_measurement", lambda *a: (None, 1, {}))
    monkeypatch.setattr(denseformer, "save_progress", capture)
    with pytest.raises(_Stop) as exc:
        denseformer.main(["--out", str(tmp_path), "--only", "gpt_L4", "--seed", "7", "--no-compile-cache"])
    assert exc.value.args[0]["seed"] == 7


def test_negative_seed_is_a_usage_error(capsys, monkeypatch):
    """``--seed -1`` passed the checks: landmark_passkey then failed in numpy ('expected
    non-negative integer') and the trainer-based experiments in TrainConfig (seed in [0, 2**32))."""
    from experiments import landmark_passkey

    monkeypatch.setattr(landmark_passkey, "run", lambda args: pytest.fail("ran with a bad seed"))
    for seed in ("-1", str(2**32)):
        with pytest.raises(SystemExit) as exc:
            landmark_passkey.main(["--out", "o", "--seed", seed, "--no-compile-cache"])
        assert exc.value.code == 2 and "--seed must be in [0, 2**32)" in capsys.readouterr().err
