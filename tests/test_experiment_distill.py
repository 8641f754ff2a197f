"""Smoke test of ``python -m experiments.distill`` (tiny teacher, one attention-initialised hybrid
and a random-init mamba2 student, two sample counts), interrupted and continued with ``--reuse``."""
import json

import pytest

from experiments import distill as exp


def test_distill_experiment_writes_results(tmp_path, monkeypatch):
    """The tiny preset end to end, with the exps2 audit's regression of an interrupted run (it
    trained a teacher and a student of its own before; one run now checks both):
    ``experiments.distill`` called ``train`` directly: a stop signal during the teacher's training
    (train returns ``finished: false``) went on with the partly trained teacher and wrote
    results.json ``complete: true`` (repro: SIGTERM at step 2238 of 100000).  Every re-run deleted
    OUT/runs (no ``--reuse``).  Now the stop ends the experiment; ``--reuse`` continues the teacher
    from its checkpoint, then reuses every finished run (same numbers), and refuses runs trained
    with other settings before anything trains."""
    import jaxformers as jf
    import jaxformers.training as training
    from jaxformers.data.synthetic import arithmetic, draw_split
    from jaxformers.training import load_run

    out = tmp_path / "distill"
    argv = ["--preset", "tiny", "--out", str(out), "--teacher-steps", "20", "--steps", "3", "--align-steps", "2",
            "--students", "hybrid,mamba2_random", "--problems", "4", "--samples", "1,2",
            "--speed-batches", "2", "--speed-lengths", "24", "--no-compile-cache"]
    # a stop signal during the teacher's training (stop_after: what the signal handler does)
    real = training.train
    monkeypatch.setattr(training, "train", lambda *a, **k: real(*a, **k, stop_after=1))
    with pytest.raises(SystemExit, match="stopped at step 1 of 20"):
        exp.main(argv)
    assert not (out / "results.json").is_file() or not json.loads((out / "results.json").read_text())["complete"]

    monkeypatch.setattr(training, "train", real)
    results = exp.main(argv + ["--reuse"])
    teacher = json.loads((out / "runs" / "teacher" / "summary.json").read_text())
    assert teacher["finished"] and teacher["resumed_from"] == 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is True  # rewritten as it went, finished at the end
    assert set(saved["models"]) == set(results["models"]) == {"teacher", "hybrid", "mamba2_random"}
    for name, row in saved["models"].items():
        assert [p["k"] for p in row["budget"]] == [1, 2]
        assert all(p["seconds_per_problem"] > 0 and 0 <= p["coverage"] <= 1 for p in row["budget"])
        assert row["throughput"] and all(p["tokens_per_s"] > 0 for p in row["throughput"])
    for name, s in saved["students"].items():
        assert s["kl_init"] > 0 and s["kl_final"] >= 0 and s["val_loss"] > 0
        assert (tmp_path / "distill" / "runs" / name / "config.json").is_file()  # a normal run directory
    assert saved["students"]["hybrid"]["attn_layers"] == [3]
    assert saved["students"]["hybrid"]["align_steps"] == 2 and saved["students"]["hybrid"]["kl_aligned"] > 0
    assert saved["students"]["mamba2_random"]["kl_aligned"] is None
    assert (out / "coverage.png").stat().st_size > 1000
    # the KL numbers are over the distilled (loss_mask) positions of the held-out validation rows
    tcfg, _, tp = load_run(out / "runs" / "teacher")
    scfg, _, sp = load_run(out / "runs" / "hybrid")
    tokens, mask = draw_split(lambda m, s: arithmetic(m, 3, seed=s), 64, 10_000, "heldout")  # held out
    want = exp.mean_kl(jf.build(tcfg), tp, jf.build(scfg), sp, tokens, mask)
    assert abs(results["students"]["hybrid"]["kl_final"] - want) < 1e-5

    # --reuse again: every run is finished and reused (same numbers), none trains (generation and
    # timing, checked above, are not what this checks: skipped)
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("retrained a finished run"))
    monkeypatch.setattr(exp, "throughput", lambda *a, **k: 1.0)
    monkeypatch.setattr(exp, "sample_problems", lambda *a, **k: (1.0, 0.5, 0.5))
    again = exp.main(argv + ["--reuse"])
    assert again["students"] == results["students"]
    with pytest.raises(SystemExit, match="kl_weight"):
        exp.main(argv + ["--reuse", "--kl-weight", "0.5"])
