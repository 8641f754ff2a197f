"""Audit 54: distillation (jaxformers.distill, experiments.distill) and DoGE regressions."""
import jax
import jax.numpy as jnp
import pytest

import jaxformers as jf
from jaxformers.distill import align_loss, init_student, student_config, teacher_hidden_states


def _teacher(**kw):
    cfg = jf.get_config("llama", "tiny", vocab_size=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                        max_seq_len=16, **kw)
    module = jf.build(cfg)
    return cfg, module, module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]


@pytest.mark.parametrize("residual_fp32", [False, True])
def test_align_loss_runs_the_layers_in_the_models_residual_dtype(residual_fp32):
    # a student aligned to its own hidden states has loss 0: each layer computes as in the model
    # (under residual_fp32 the residual stream is float32; it was cast to the bfloat16 compute
    # dtype, so the layer's skip connection ran in bfloat16: loss 2.4e-5)
    cfg, _, tp = _teacher(dtype="bfloat16", residual_fp32=residual_fp32)
    s_cfg = student_config(cfg)
    sp = init_student(cfg, tp, s_cfg, jax.random.PRNGKey(2))
    student = jf.build(s_cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 32)
    hidden = teacher_hidden_states(student, sp, tokens[:, :-1])
    loss, _ = align_loss(student, sp, {"tokens": tokens, "teacher_hidden": hidden})
    assert float(loss) == 0.0


def test_distill_step_takes_a_variables_dict_and_names_a_wrong_teacher_tree():
    # init_student takes the {"params": ...} variables dict; DistillStep kept it as it was, and
    # the trainer then failed placing it ("pytree structure error: different numbers of pytree
    # children"); a tree of another teacher failed the same way
    from jaxformers.distill import DistillStep

    cfg, module, tp = _teacher()
    step = DistillStep(cfg, module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    assert set(step.teacher_params) == set(tp)
    import flax.linen as nn
    want = nn.unbox(tp)
    assert jax.tree_util.tree_structure(step.teacher_params) == jax.tree_util.tree_structure(want)
    assert [x.shape for x in jax.tree.leaves(step.teacher_params)] == [x.shape for x in jax.tree.leaves(want)]
    step.extra_inputs()
    with pytest.raises(ValueError, match=r"teacher_params do not fit teacher_config.*missing.*blocks_1"):
        DistillStep(cfg, {k: v for k, v in tp.items() if k != "blocks_1"})
    other_cfg, _, other = _teacher(d_ff=48)
    with pytest.raises(ValueError, match=r"teacher_params do not fit.*shapes"):
        DistillStep(cfg, other)
    assert DistillStep(cfg, None).teacher_params is None  # (settings only, as experiments.distill builds it)


def test_align_stage_changes_only_the_converted_layers(tmp_path):
    # align_loss reaches only the converted layers, but weight decay (default 0.1) moved the
    # embeddings and the kept attention layer too (5 steps: by 7.9e-5 / 9.3e-5)
    import flax.linen as nn
    import numpy as np

    from jaxformers.distill import DistillStep
    from jaxformers.training import TrainConfig, load_run, train

    cfg, _, tp = _teacher()
    tp = nn.unbox(tp)
    s_cfg = student_config(cfg, "hybrid", (1,))
    sp = init_student(cfg, tp, s_cfg, jax.random.PRNGKey(2))
    tc = TrainConfig(steps=3, batch_size=4, seq_len=16, data="synthetic:copying:vocab=32",
                     out_dir=str(tmp_path / "a"), lr=3e-3, warmup_steps=1, weight_decay=0.1, eval_every=0,
                     eval_batches=1, log_every=1, checkpoint_every=0)
    train(s_cfg, tc, step_fn=DistillStep(cfg, tp, stage="align"), init_params=sp, progress=False)
    _, _, params = load_run(tmp_path / "a")

    def moved(key):
        return max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                   for a, b in zip(jax.tree.leaves(params[key]), jax.tree.leaves(sp[key])))

    assert moved("embed") == 0.0 and moved("blocks_1") == 0.0 and moved("final_norm") == 0.0
    assert moved("blocks_0") > 0


def test_distill_experiment_refuses_align_steps_without_an_aligned_student(capsys):
    # --align-steps was silently ignored when only the random-init student (never aligned) ran
    import experiments.distill as d
    from experiments.common import parse_experiment_args

    with pytest.raises(SystemExit):
        parse_experiment_args(d._parser(), ["--out", "/tmp/unused", "--students", "mamba2_random",
                                            "--align-steps", "5", "--no-compile-cache"], check=d._check_args)
    assert "--align-steps" in capsys.readouterr().err
    args = parse_experiment_args(d._parser(), ["--out", "/tmp/unused", "--students", "mamba2,mamba2_random",
                                               "--align-steps", "5", "--no-compile-cache"], check=d._check_args)
    assert args.align_steps == 5


def test_init_student_names_a_teacher_tree_that_does_not_fit():
    # a missing layer / sub-module, or a scanned teacher's stacked tree with an unscanned config,
    # was a bare KeyError ('blocks_1', 'attn', 'blocks_0') from the weight mapping
    import flax.linen as nn

    cfg, _, tp = _teacher()
    tp = nn.unbox(tp)
    scfg = student_config(cfg)
    stacked = nn.unbox(jf.build(cfg.replace(scan_layers=True)).init(jax.random.PRNGKey(0),
                                                                     jnp.zeros((1, 8), jnp.int32))["params"])
    bad = [{k: v for k, v in tp.items() if k != "blocks_1"},
           {**tp, "blocks_0": {k: v for k, v in tp["blocks_0"].items() if k != "attn"}},
           stacked]
    for params in bad:
        with pytest.raises(ValueError, match=r"teacher_params do not fit teacher_config.*missing"):
            init_student(cfg, params, scfg, jax.random.PRNGKey(1))
    # the stacked tree with the scanned config, and an unstacked tree with it, still convert
    init_student(cfg.replace(scan_layers=True), stacked, scfg, jax.random.PRNGKey(1))
    init_student(cfg.replace(scan_layers=True), tp, scfg, jax.random.PRNGKey(1))


def test_distill_experiment_refuses_a_teacher_run_that_never_finished(tmp_path, capsys):
    # a teacher run killed (or still training) has config.json and checkpoints but no summary.json;
    # it was accepted and its newest checkpoint distilled as the trained teacher
    import json

    import experiments.distill as d
    from experiments.common import parse_experiment_args

    run = tmp_path / "t"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {"data": d.task_spec("tiny")}}))
    argv = ["--teacher", str(run), "--out", str(tmp_path / "o"), "--no-compile-cache"]
    with pytest.raises(SystemExit):
        parse_experiment_args(d._parser(), argv, check=d._check_args)
    assert "summary.json" in capsys.readouterr().err
    (run / "summary.json").write_text(json.dumps({"finished": True}))
    args = parse_experiment_args(d._parser(), argv, check=d._check_args)  # a finished run passes
    assert args.teacher == str(run)


def test_init_student_names_a_bad_teacher_config_or_params():
    # teacher_params=None: TypeError 'NoneType' object is not iterable; teacher_config=None:
    # AttributeError 'NoneType' object has no attribute 'n_layer'
    cfg, _, tp = _teacher()
    scfg = student_config(cfg)
    with pytest.raises(ValueError, match="teacher_params must be"):
        init_student(cfg, None, scfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="teacher_config must be a 'llama' or 'gpt' config"):
        init_student(None, tp, scfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="teacher_config must be a 'llama' or 'gpt' config, got 'hybrid'"):
        init_student(scfg, tp, scfg, jax.random.PRNGKey(0))


def test_hidden_states_refuse_a_teacher_whose_blocks_are_not_chained():
    # DenseFormer feeds block i + 1 a depth-weighted average, not block i's output: its "hidden
    # states" were returned silently (the last one through the head missed the logits by 0.46)
    # and stage="align" aligned the student's layers to inputs the teacher's never saw
    import flax.linen as nn

    from jaxformers.distill import DistillStep

    cfg = jf.get_config("denseformer", "tiny", vocab_size=32, d_model=32, n_layer=2, n_head=4, max_seq_len=16)
    module = jf.build(cfg)
    params = nn.unbox(module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    with pytest.raises(ValueError, match="chained"):
        teacher_hidden_states(module, params, jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="chained"):
        DistillStep(cfg, params, stage="align")
    DistillStep(cfg, params)  # logit distillation needs only the teacher's logits


def test_training_with_a_distill_step_without_teacher_params_is_a_clear_error(tmp_path):
    # DistillStep(cfg, None) (settings only) given to train: a "pytree structure error" when the
    # trainer placed the teacher's parameters
    from jaxformers.distill import DistillStep
    from jaxformers.training import TrainConfig, train

    cfg, _, tp = _teacher()
    with pytest.raises(ValueError, match="teacher_params=None"):
        DistillStep(cfg, None).extra_inputs()
    tc = TrainConfig(steps=1, batch_size=2, seq_len=16, data="synthetic:copying:vocab=32",
                     out_dir=str(tmp_path / "s"), eval_every=0, eval_batches=1, checkpoint_every=0)
    with pytest.raises(ValueError, match="teacher_params=None"):
        train(student_config(cfg), tc, step_fn=DistillStep(cfg, None), progress=False)
