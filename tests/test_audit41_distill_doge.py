"""Regression tests of the distillation / DoGE audit (jaxformers/distill, training/doge.py,
experiments/distill.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.distill import align_loss, init_student, kd_loss, student_config, teacher_hidden_states
from jaxformers.training.doge import DogeStep


def _teacher(**kw):
    cfg = jf.get_config("llama", "tiny", vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                        max_seq_len=32, init_std=0.1, **kw)
    module = jf.build(cfg)
    return cfg, module, jf.init_params(module, jax.random.PRNGKey(0))


def test_student_keeps_the_teachers_residual_fp32():
    """student_config dropped ``residual_fp32``: a bfloat16 teacher's student kept its residual
    stream in bfloat16, so even its kept attention layer (teacher weights) computed another stream."""
    cfg, module, tp = _teacher(dtype="bfloat16", residual_fp32=True)
    s = student_config(cfg, "hybrid", (0,))
    assert s.residual_fp32
    sp = init_student(cfg, tp, s, jax.random.PRNGKey(1))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 64)
    _, state = jf.build(s).apply({"params": sp}, tokens, mutable=["intermediates"],
                                 capture_intermediates=lambda m, n: n == "__call__" and m.name == "blocks_0")
    student_h1 = state["intermediates"]["blocks_0"]["__call__"][0][0]
    np.testing.assert_array_equal(student_h1, teacher_hidden_states(module, tp, tokens)[:, 1])


def test_distill_experiment_needs_a_converted_layer():
    """--attn-layers covering every teacher layer gave a "hybrid" with no SSM layer; the experiment
    accepted it and failed in the alignment stage, after training the teacher."""
    from experiments import distill

    ap = distill._parser()
    args = ap.parse_args(["--out", "unused", "--student", "hybrid", "--attn-layers", "0,1,2,3"])
    with pytest.raises(SystemExit) as e:
        distill._check_args(ap, args)  # the tiny preset's 4-layer teacher
    assert e.value.code == 2


def test_distillation_losses_refuse_a_mismatched_student():
    """align_loss silently aligned student layer i to teacher layer i for a student of another depth;
    kd_loss failed in a broadcast for another vocabulary."""
    cfg, module, tp = _teacher()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 64)
    hidden = teacher_hidden_states(module, tp, tokens[:, :-1])
    shallow = jf.build(cfg.replace(n_layer=1))
    with pytest.raises(ValueError, match=r"teacher_hidden .* must be \[B, L \+ 1, T, D\]"):
        align_loss(shallow, jf.init_params(shallow, jax.random.PRNGKey(2)),
                   {"tokens": tokens, "teacher_hidden": hidden})
    small = jf.build(cfg.replace(vocab_size=32))
    with pytest.raises(ValueError, match="teacher_logits .* must match"):
        kd_loss(small, jf.init_params(small, jax.random.PRNGKey(2)),
                {"tokens": tokens % 32, "teacher_logits": module.apply({"params": tp}, tokens[:, :-1])})


def test_init_student_accepts_a_variables_dict():
    """The ``{"params": ...}`` dict that ``module.init`` returns gave ``KeyError: 'blocks_0'``."""
    cfg, _, tp = _teacher()
    s = student_config(cfg, "hybrid", (1,))
    a = init_student(cfg, {"params": tp}, s, jax.random.PRNGKey(3))
    b = init_student(cfg, tp, s, jax.random.PRNGKey(3))
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


@pytest.mark.parametrize("kw, match", [
    (dict(domains="abc"), "domains must be a sequence"),          # was 3 domains 'a', 'b', 'c'
    (dict(domains=("a", "b", "poems"), targets="poems"), "targets must be a sequence"),
    (dict(domains=("a", "b", "c"), mu=float("inf")), "mu must be a finite"),  # weights that never move
    (dict(domains=("a", "b", "c"), mu="0.01"), "mu must be a number"),        # was a TypeError
    (dict(domains=("a", "b", "c"), mu=True), "mu must be a number"),
])
def test_dogestep_rejects_bad_arguments_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        DogeStep(**kw)


def test_resuming_a_distillation_with_another_stage_is_refused(tmp_path):
    """The run directory recorded neither the stage nor the loss settings: resuming an alignment
    run with ``DistillStep(stage="kd")`` went on silently with the other objective."""
    from jaxformers.distill import DistillStep
    from jaxformers.training import TrainConfig, train

    t = jf.get_config("llama", "tiny", vocab_size=64, d_model=16, n_layer=2, n_head=2, d_ff=32, max_seq_len=16)
    tp = jf.init_params(jf.build(t), jax.random.PRNGKey(0))
    s = student_config(t, "mamba2")
    tc = TrainConfig(steps=2, batch_size=2, seq_len=8, data="synthetic:copying:vocab=32", out_dir=str(tmp_path / "run"),
                     lr=1e-3, warmup_steps=0, eval_every=0, eval_batches=1, log_every=1, checkpoint_every=0)
    train(s, tc, step_fn=DistillStep(t, tp, stage="align"), init_params=init_student(t, tp, s, jax.random.PRNGKey(1)),
          progress=False, stop_after=1)
    with pytest.raises(ValueError, match=r"another DistillStep \(stage: 'align' -> 'kd'; temperature: 1.0 -> 2.0\)"):
        train(s, tc, step_fn=DistillStep(t, tp, stage="kd", temperature=2.0), progress=False, resume=True)
    summary = train(s, tc, step_fn=DistillStep(t, tp, stage="align"), progress=False, resume=True)
    assert summary["finished"] and summary["resumed_from"] == 1


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_kl_per_token_rejects_a_bad_temperature(temperature):
    """kd_loss / kl_per_token (public; DistillStep checks its own) gave NaN for temperature 0."""
    from jaxformers.distill import kl_per_token

    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        kl_per_token(jnp.zeros((1, 2, 3)), jnp.ones((1, 2, 3)), temperature)
