"""Regression tests of the exps2 audit (experiments.distill, experiments.mamba,
experiments.landmark_passkey, experiments.doge, jaxformers.distill)."""
import json

import numpy as np
import pytest


# ------------------------------------------------------------------ experiments.distill
def test_distill_mean_kl_weights_the_positions_by_the_loss_mask():
    """``mean_kl`` averaged the KL over every position, prompt included, while the distillation
    (``kd_loss``) and ``val_loss`` weight by the task's loss_mask: on the tiny preset the reported
    ``kl_final`` was 0.85 / 0.83 / 1.13 (mamba2 / hybrid / mamba2_random) where the distilled
    positions give 0.26 / 0.05 / 0.18 (the mamba2 vs mamba2_random order flipped)."""
    import jax
    import jax.numpy as jnp

    import jaxformers as jf
    from experiments.distill import mean_kl
    from jaxformers.data.synthetic import arithmetic
    from jaxformers.distill import kl_per_token

    cfg = jf.get_config("llama", "tiny", vocab_size=18, d_model=32, n_layer=1, n_head=2, n_kv_head=1, d_ff=64,
                        max_seq_len=64)
    model = jf.build(cfg)
    p1 = jf.init_params(model, jax.random.PRNGKey(0))
    p2 = jf.init_params(model, jax.random.PRNGKey(1))
    tokens, mask = arithmetic(4, 2, seed=0)
    x = jnp.asarray(tokens[:, :-1])
    kl = np.asarray(kl_per_token(model.apply({"params": p1}, x), model.apply({"params": p2}, x)))
    w = mask[:, 1:]
    want = float((kl * w).sum() / w.sum())
    got = mean_kl(model, p1, model, p2, tokens, mask)
    assert abs(got - want) < 1e-5 * max(1.0, want)
    assert abs(mean_kl(model, p1, model, p2, tokens) - kl.mean()) < 1e-5 * max(1.0, kl.mean())
    with pytest.raises(ValueError, match="loss_mask"):
        mean_kl(model, p1, model, p2, tokens, mask[:, 1:])


def _fake_generation(monkeypatch, exp):
    # generation and timing are not what these tests check: skip their compilation
    monkeypatch.setattr(exp, "throughput", lambda *a, **k: 1.0)
    monkeypatch.setattr(exp, "sample_problems", lambda *a, **k: (1.0, 0.5, 0.5))


def test_distill_stop_signal_is_not_reported_and_reuse_continues(tmp_path, monkeypatch):
    """``experiments.distill`` called ``train`` directly: a stop signal during the teacher's
    training (train returns ``finished: false``) went on with the partly trained teacher and
    wrote results.json ``complete: true`` (repro: SIGTERM at step 2238 of 100000).  Every re-run
    deleted OUT/runs (no ``--reuse``).  Now the stop ends the experiment; ``--reuse`` continues
    the teacher from its checkpoint, then reuses every finished run (same numbers), and refuses
    runs trained with other settings before anything trains."""
    import jaxformers.training as training
    from experiments import distill as exp
    from jaxformers.data.synthetic import arithmetic, draw_split
    from jaxformers.training import load_run

    _fake_generation(monkeypatch, exp)
    out = tmp_path / "d"
    argv = ["--preset", "tiny", "--out", str(out), "--teacher-steps", "3", "--steps", "2", "--align-steps", "1",
            "--students", "mamba2", "--problems", "2", "--samples", "1", "--speed-batches", "1",
            "--speed-lengths", "12", "--no-compile-cache"]
    real = training.train
    monkeypatch.setattr(training, "train", lambda *a, **k: real(*a, **k, stop_after=1))
    with pytest.raises(SystemExit, match="stopped at step 1 of 3"):
        exp.main(argv)
    assert not (out / "results.json").is_file() or not json.loads((out / "results.json").read_text())["complete"]

    monkeypatch.setattr(training, "train", real)
    first = exp.main(argv + ["--reuse"])
    teacher = json.loads((out / "runs" / "teacher" / "summary.json").read_text())
    assert teacher["finished"] and teacher["resumed_from"] == 1
    # the KL numbers are over the distilled (loss_mask) positions
    tcfg, _, tp = load_run(out / "runs" / "teacher")
    scfg, _, sp = load_run(out / "runs" / "mamba2")
    import jaxformers as jf
    tokens, mask = draw_split(lambda m, s: arithmetic(m, 3, seed=s), 64, 10_000, "heldout")  # held out
    want = exp.mean_kl(jf.build(tcfg), tp, jf.build(scfg), sp, tokens, mask)
    assert abs(first["students"]["mamba2"]["kl_final"] - want) < 1e-5

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("retrained a finished run"))
    again = exp.main(argv + ["--reuse"])
    assert again["students"] == first["students"]
    with pytest.raises(SystemExit, match="kl_weight"):
        exp.main(argv + ["--reuse", "--kl-weight", "0.5"])


def test_distill_refuses_a_teacher_run_stopped_by_a_signal(tmp_path):
    """``--teacher RUN_DIR`` of a run a signal stopped (summary ``finished: false``) was loaded and
    distilled as if trained: now a usage error naming --teacher."""
    from experiments import distill as exp

    run = tmp_path / "t"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "summary.json").write_text(json.dumps({"finished": False, "final_step": 7, "steps": 100}))
    with pytest.raises(SystemExit) as e:
        exp.main(["--teacher", str(run), "--out", str(tmp_path / "o"), "--no-compile-cache"])
    assert e.value.code == 2


@pytest.mark.parametrize("data", [None, "default", "synthetic:arithmetic:n_digits=4",
                                  "synthetic:arithmetic:n_digits=3,answer_only=1", "synthetic:copying"])
def test_distill_refuses_a_teacher_trained_on_another_task(tmp_path, data, capsys):
    """``--teacher RUN_DIR`` trained on another task (the corpus, other digits, other format
    options) was distilled on the preset's arithmetic rows as if it knew them: now a usage
    error naming --teacher and both data specs, before anything loads."""
    from experiments import distill as exp

    run = tmp_path / "t"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {"data": data}}))
    with pytest.raises(SystemExit) as e:
        exp.main(["--teacher", str(run), "--out", str(tmp_path / "o"), "--no-compile-cache"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and f"data={data!r}" in err and "synthetic:arithmetic:n_digits=3" in err


def test_distill_accepts_a_teacher_of_the_presets_task(tmp_path):
    from experiments import distill as exp

    ap = exp._parser()
    args = ap.parse_args(["--teacher", "t", "--out", "o"])
    for data in ("synthetic:arithmetic:n_digits=3", "synthetic:arithmetic:n_digits=3,val_rows=64,worked_steps=1"):
        exp.check_teacher_task(ap, args, {"train": {"data": data}})
