"""Regression tests of the DenseFormer / CoTFormer / distillation audit."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.distill import (DistillStep, align_loss, init_student, student_config,
                                teacher_hidden_states)

TEACHER = dict(vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=32)


def _params(cfg, seed=0):
    return nn.unbox(jf.init_params(jf.build(cfg), jax.random.PRNGKey(seed)))


def _llama(**kw):
    return jf.get_config("llama", "tiny", **{**TEACHER, "n_kv_head": 2, "d_ff": 64, "init_std": 0.1, **kw})


def _tokens(b=2, t=9, seed=2):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, TEACHER["vocab_size"])


# ----------------------------------------------------------------- distill: conversion
def test_student_keeps_the_teachers_skip_gains():
    cfg = jf.get_config("gpt", "tiny", **TEACHER, skip_gains=True)
    tp = _params(cfg)
    tp = {k: ({**v, "attn_skip_gain": jnp.float32(0.5), "mlp_skip_gain": jnp.float32(1.5)}
              if k.startswith("blocks_") else v) for k, v in tp.items()}
    tok = _tokens()
    # every layer kept as attention: the student is the teacher, bit for bit
    s = student_config(cfg, "hybrid", (0, 1))
    assert s.skip_gains
    sp = init_student(cfg, tp, s, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(jf.build(s).apply({"params": sp}, tok), jf.build(cfg).apply({"params": tp}, tok))
    # converted layers take the gains too (mixer gain <- attention gain)
    m = student_config(cfg, "mamba2")
    mp = init_student(cfg, tp, m, jax.random.PRNGKey(1))
    assert float(mp["blocks_0"]["mixer_skip_gain"]) == 0.5 and float(mp["blocks_1"]["mlp_skip_gain"]) == 1.5


def test_scanned_teacher_converts_and_gives_hidden_states():
    cfg = _llama()
    tp = _params(cfg)
    scfg = cfg.replace(scan_layers=True)
    stp = dict(tp)
    blocks = [stp.pop(f"blocks_{i}") for i in range(cfg.n_layer)]
    stp["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    s = student_config(scfg, "hybrid", (1,))
    a = init_student(cfg, tp, s, jax.random.PRNGKey(3))
    b = init_student(scfg, stp, s, jax.random.PRNGKey(3))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    tok = _tokens()
    h = teacher_hidden_states(jf.build(cfg), tp, tok)
    hs = teacher_hidden_states(jf.build(scfg), stp, tok)
    np.testing.assert_allclose(hs, h, atol=1e-6, rtol=1e-6)


def test_align_loss_keeps_packed_sequences_apart():
    cfg = _llama()
    tp = _params(cfg)
    s = student_config(cfg, "hybrid", (1,))
    sm, sp = jf.build(s), init_student(cfg, tp, s, jax.random.PRNGKey(1))
    tok = _tokens(1, 17)
    seg = jnp.asarray([[1] * 8 + [2] * 9], jnp.int32)
    hidden = teacher_hidden_states(jf.build(cfg), tp, tok[:, :-1], segment_ids=seg[:, :-1])
    loss, _ = align_loss(sm, sp, {"tokens": tok, "segment_ids": seg, "teacher_hidden": hidden})
    # reference: the converted layer 0 run on each segment on its own
    cls, lcfg = sm.layer_classes()[0], sm.layer_configs()[0]
    run = lambda x: cls(lcfg).apply({"params": sp["blocks_0"]}, x, jnp.arange(x.shape[1])[None])[0]  # noqa: E731
    y = jnp.concatenate([run(hidden[:, 0, :8]), run(hidden[:, 0, 8:])], axis=1)
    target = hidden[:, 1]
    ref = jnp.mean((y - target) ** 2) / (jnp.mean(target ** 2) + 1e-6)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(kl_weight=float("nan")), dict(ce_weight=float("inf")),
                                dict(temperature=float("inf")), dict(temperature="2")])
def test_distill_step_rejects_non_finite_settings(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        DistillStep(_llama(), None, **kw)


def test_distill_conversion_rejects_bad_inputs():
    cfg = _llama()
    with pytest.raises(ValueError, match="attn_layers"):
        student_config(cfg, "hybrid", (1.5,))  # was truncated to layer 1
    with pytest.raises(ValueError, match="attn_layers"):
        student_config(cfg, "hybrid", 1)
    tp = _params(cfg)
    with pytest.raises(ValueError, match="hybrid Mamba-2 student"):
        init_student(cfg, tp, cfg, jax.random.PRNGKey(0))
    other = cfg.replace(d_ff=32)  # params of another teacher: caught here, not at the first apply
    with pytest.raises(ValueError, match="teacher_params do not fit"):
        init_student(other, tp, student_config(other, "mamba2"), jax.random.PRNGKey(0))


def test_distill_experiment_rejects_zero_loss_weights():
    import experiments.distill as d
    from experiments.common import parse_experiment_args

    with pytest.raises(SystemExit):
        parse_experiment_args(d._parser(), ["--out", "/tmp/unused", "--kl-weight", "0", "--ce-weight", "0"],
                              check=d._check_args)


# ----------------------------------------------------------------- cotformer config
@pytest.mark.parametrize("name, bad, match", [
    ("cotformer", dict(n_repeat=True), "n_repeat"),
    ("adaptive_cotformer", dict(n_repeat=2, length_factors=0.5), "length_factors"),
    ("adaptive_cotformer", dict(n_repeat=2, length_factors="0.5"), "length_factors"),
    ("adaptive_cotformer", dict(n_repeat=2, length_factors=["a"]), "length_factors"),
])
def test_cotformer_rejects_bad_fields_by_name(name, bad, match):
    with pytest.raises(ValueError, match=match):
        jf.get_config(name, "tiny", **bad)


def test_cotformer_decoding_rejects_segment_ids():
    """As the baseline: packed segment ids with a KV cache raise (the mid blocks dropped them)."""
    cfg = jf.get_config("cotformer", "tiny", d_model=32, n_head=2, max_seq_len=32)
    m = jf.build(cfg)
    tok = jnp.zeros((1, 8), jnp.int32)
    p = nn.unbox(m.init(jax.random.PRNGKey(0), tok)["params"])
    seg = jnp.asarray([[1] * 4 + [2] * 4])
    with pytest.raises(ValueError, match="segment_ids"):
        m.apply({"params": p}, tok, segment_ids=seg, cache=jf.init_cache(m, 1, 8))
