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
    # one compiled program for every measurement of the same models and shapes (the experiment
    # measures three times per student): a jit made inside mean_kl compiled on every call
    from experiments.distill import _weighted_kl_program
    before = _weighted_kl_program()._cache_size()
    mean_kl(model, p2, jf.build(cfg), p1, tokens, mask)  # another params / an equal module
    assert _weighted_kl_program()._cache_size() == before


# The stop-signal / --reuse regression of experiments.distill (a stop during the teacher's training
# ends the experiment; --reuse continues it, then reuses every finished run) runs inside
# tests/test_experiment_distill.py's tiny-preset run: one experiment trains for both.


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
