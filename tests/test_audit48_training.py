"""Audit 48 (training): LR schedule boundaries, accumulation without token weights, the micro-batch
row layout, eval_step's target count, the optimizer's clipping stage, decay names, the compile
cache's LRU order and the checkpoint pruning order.  Each test kills a mutant the rest of the suite
let through; the expected values are worked out by hand from the docstrings."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxformers.training import TrainConfig
from jaxformers.training.checkpoint import Checkpointer
from jaxformers.training.optim import decay_mask, lr_at, make_optimizer
from jaxformers.training.steps import CompileCache, eval_step, split_micro_batches, train_step

from test_training import env  # noqa: F401 - the corpus fixture


# ----------------------------------------------------------------------------- schedules
def _lrs(tc, steps):
    return [lr_at(tc, s) for s in steps]


def test_cosine_schedule_at_its_boundaries():
    """step 0, last warmup step, decay start, midpoint, last update, the schedule's end, past it."""
    tc = TrainConfig(steps=20, lr=1.0, min_lr_ratio=0.2, warmup_steps=4, schedule="cosine")
    last = 0.2 + 0.4 * (1 + math.cos(math.pi * 15 / 16))
    assert _lrs(tc, [0, 1, 3, 4, 12, 19, 20, 25]) == pytest.approx(
        [0.25, 0.5, 1.0, 1.0, 0.6, last, 0.2, 0.2], rel=1e-6)


def test_wsd_schedule_at_its_boundaries():
    """steps=10, decay_fraction=0.3: stable through update 7, then linear over 3 updates to the floor."""
    tc = TrainConfig(steps=10, lr=1.0, min_lr_ratio=0.2, warmup_steps=2, schedule="wsd", decay_fraction=0.3)
    assert _lrs(tc, [0, 1, 2, 6, 7, 8, 9, 10, 12]) == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 1.0, 1 - 0.8 / 3, 1 - 1.6 / 3, 0.2, 0.2], rel=1e-6)


def test_wsd_decay_length_is_rounded_and_never_starts_inside_the_warmup():
    """decay steps = round(steps * decay_fraction) (1.5 -> 2, not int's 1); a decay that would
    start inside the warmup starts at its end (max, not min)."""
    tc = TrainConfig(steps=10, lr=1.0, min_lr_ratio=0.2, warmup_steps=2, schedule="wsd", decay_fraction=0.15)
    assert _lrs(tc, [7, 8, 9, 10]) == pytest.approx([1.0, 1.0, 0.6, 0.2], rel=1e-6)
    late = tc.replace(warmup_steps=9, decay_fraction=0.2)  # decay would start at 8, inside the warmup
    assert _lrs(late, [0, 8, 9, 10]) == pytest.approx([1 / 9, 1.0, 1.0, 0.2], rel=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_no_warmup_starts_at_the_peak(schedule):
    tc = TrainConfig(steps=10, lr=0.5, min_lr_ratio=0.1, warmup_steps=0, schedule=schedule)
    assert lr_at(tc, 0) == pytest.approx(0.5, rel=1e-6)
    assert lr_at(tc, 10) == pytest.approx(0.5 if schedule == "constant" else 0.05, rel=1e-6)


def test_default_warmup_is_a_fraction_of_the_schedule_length_not_of_steps():
    tc = TrainConfig(steps=10, schedule_steps=20, warmup_fraction=0.25, lr=1.0, min_lr_ratio=0.2)
    assert tc.warmup == 5 and tc.schedule_length == 20
    assert _lrs(tc, [0, 4]) == pytest.approx([0.2, 1.0], rel=1e-6)
    assert TrainConfig(steps=10, warmup_fraction=0.25).warmup == 2  # round(2.5): banker's rounding
    assert TrainConfig(steps=10, warmup_fraction=0.35).warmup == 4  # round(3.5)


def test_train_config_derived_sizes():
    tc = TrainConfig(batch_size=12, grad_accum=3, seq_len=7, eval_batches=5)
    assert (tc.micro_batch_size, tc.eval_micro_batches, tc.tokens_per_step) == (4, 15, 84)


# ----------------------------------------------------------------------------- optimizer
def test_grad_clip_zero_has_no_clipping_stage_and_positive_clips_the_gradient():
    """grad_clip=0 is plain AdamW (not a clip to norm 0: no update at all, or NaN); grad_clip > 0
    clips the global norm of the gradient before Adam's moments."""
    params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}
    grads = {"w": jnp.full((2, 3), 4.0, jnp.float32)}  # global norm 4 * sqrt(6) ~ 9.8
    tc = TrainConfig(steps=4, lr=0.1, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, schedule="constant",
                     beta1=0.5, beta2=0.5, eps=1.0)  # a large eps: the update depends on |g|
    tx, _ = make_optimizer(tc)
    upd, _ = tx.update(grads, tx.init(params), params)
    ref = optax.adam(0.1, b1=0.5, b2=0.5, eps=1.0)
    want, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(upd["w"], want["w"], rtol=1e-6)
    tx, _ = make_optimizer(tc.replace(grad_clip=1.0))
    upd, _ = tx.update(grads, tx.init(params), params)
    clipped = {"w": grads["w"] / (4.0 * math.sqrt(6.0))}
    want, _ = ref.update(clipped, ref.init(params), params)
    np.testing.assert_allclose(upd["w"], want["w"], rtol=1e-5)


def test_decay_names_decay_a_vector_and_no_decay_wins_over_the_shape_rule():
    params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,)), "alpha": jnp.ones((2,)),
              "A_log": jnp.ones((4, 2))}
    specs = {k: None for k in params}
    assert decay_mask(specs, params, no_decay=("A_log",), decay=("alpha",)) == {
        "kernel": True, "bias": False, "alpha": True, "A_log": False}
    with pytest.raises(ValueError, match="both no_decay and decay"):
        decay_mask(specs, params, no_decay=("alpha",), decay=("alpha",))
    # logical names: the stacked layers axis does not count as a matrix axis
    from jax.sharding import PartitionSpec as P
    stacked = {"scale": jnp.ones((2, 4)), "kernel": jnp.ones((2, 4, 4))}
    specs = {"scale": P("layers", "embed"), "kernel": P("layers", "embed", "mlp")}
    assert decay_mask(specs, stacked) == {"scale": False, "kernel": True}


# ----------------------------------------------------------------------------- train / eval step
def _linear_loss(module, params, batch, rng):
    """Mean over rows of a per-row quadratic: no ``n_targets`` (equal weights per micro-batch)."""
    x = batch["x"]
    per_row = jnp.sum((x @ params["w"] - batch["y"]) ** 2, axis=-1)
    return jnp.mean(per_row), {"rows": jnp.asarray(x.shape[0], jnp.float32)}


def test_grad_accum_without_token_weights_averages_micro_batches_like_the_whole_batch():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    batch = {"x": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)}
    tx = optax.sgd(1.0)
    p1, _, m1 = train_step(None, tx, _linear_loss, params, tx.init(params), batch, 0, None)
    p3, _, m3 = train_step(None, tx, _linear_loss, params, tx.init(params), batch, 0, None, grad_accum=3)
    np.testing.assert_allclose(p3["w"], p1["w"], rtol=1e-5, atol=1e-6)
    assert float(m3["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    assert float(m3["rows"]) == 2.0 and float(m1["rows"]) == 6.0  # metrics: the micro-batches' mean
    assert float(m3["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)


def test_grad_norm_metric_is_the_unclipped_gradient_norm_and_lr_is_the_schedule_at_step():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    batch = {"x": jnp.asarray(rng.normal(size=(4, 3)) * 10, jnp.float32),
             "y": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
    grads = jax.grad(lambda p: _linear_loss(None, p, batch, None)[0])(params)
    want = float(np.sqrt(np.sum(np.asarray(grads["w"], np.float64) ** 2)))
    assert want > 1.0
    tc = TrainConfig(steps=10, lr=1.0, warmup_steps=4, grad_clip=0.5)
    tx, schedule = make_optimizer(tc)
    _, _, m = train_step(None, tx, _linear_loss, params, tx.init(params), batch, 2, None, schedule=schedule)
    assert float(m["grad_norm"]) == pytest.approx(want, rel=1e-5)
    assert float(m["lr"]) == pytest.approx(0.75, rel=1e-6)


def test_micro_batch_a_holds_rows_a_a_plus_n_and_bad_splits_are_value_errors():
    batch = {"tokens": jnp.arange(12).reshape(6, 2)}
    micro = split_micro_batches(batch, 3)["tokens"]
    assert micro.shape == (3, 2, 2)
    np.testing.assert_array_equal(micro[1], [[2, 3], [8, 9]])  # rows 1 and 4
    with pytest.raises(ValueError, match="grad_accum=4 must divide"):
        split_micro_batches(batch, 4)


def _no_count_loss(module, params, batch, rng):
    return jnp.asarray(2.5) * params["s"], {}


def test_eval_step_without_an_n_targets_metric_counts_the_next_token_weights():
    """``(loss * n, n)`` with ``n`` = sum of ``loss_mask[:, 1:]`` (the first token is no target)."""
    mask = np.ones((2, 5), np.float32)
    mask[0, 0] = 0.0  # not a target position: must not be counted
    mask[1, 3:] = 0.0
    batch = {"tokens": jnp.zeros((2, 5), jnp.int32), "loss_mask": jnp.asarray(mask)}
    total, n = eval_step(None, _no_count_loss, {"s": jnp.asarray(1.0)}, batch)
    assert float(n) == 6.0 and float(total) == pytest.approx(15.0)


# ----------------------------------------------------------------------------- compile cache
def test_compile_cache_evicts_the_least_recently_used_program():
    cache = CompileCache(max_entries=2)
    built = []

    def build(name):
        return lambda: built.append(name) or name

    cache.get("a", build("a"))
    cache.get("b", build("b"))
    assert cache.get("a", build("a2")) == "a"  # a hit makes "a" the most recent
    cache.get("c", build("c"))  # evicts "b", the least recently used
    assert cache.get("a", build("a3")) == "a"
    assert cache.get("b", build("b2")) == "b2"
    assert built == ["a", "b", "c", "b2"] and (cache.hits, cache.misses) == (2, 4) and len(cache) == 2
    with pytest.raises(ValueError, match="max_entries"):
        CompileCache(max_entries=0)


# ----------------------------------------------------------------------------- checkpoints
def _save(ckpt, step):
    tree = {"w": jnp.full((2,), float(step), jnp.float32)}
    ckpt.save(step, tree, {"count": jnp.asarray(step, jnp.int32)}, {"data_step": step})
    ckpt.wait()


def test_checkpoints_are_pruned_in_numeric_step_order_keeping_the_newest(tmp_path):
    """Steps 2, 9, 10 with keep=2 keep 9 and 10 (by name "10" < "2" < "9" would delete 10)."""
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    try:
        for step in (2, 9, 10):
            _save(ckpt, step)
        assert ckpt.complete_steps() == [9, 10] and ckpt.latest_step() == 10
        params, _, meta = ckpt.restore(10, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
        assert meta == {"data_step": 10, "step": 10} and float(params["w"][0]) == 10.0
    finally:
        ckpt.close()


def test_an_incomplete_newer_step_directory_does_not_count_as_a_kept_checkpoint(tmp_path):
    """keep=1: saving step 3 over complete step 1 deletes 1, never 3, though an incomplete
    directory 5 (a save cut short) sorts after it."""
    ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
    try:
        _save(ckpt, 1)
        (tmp_path / "checkpoints" / "5").mkdir()
        _save(ckpt, 3)
        assert ckpt.complete_steps() == [3] and ckpt.incomplete_steps() == [5]
        ckpt.verify(3)
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- validation boundaries
@pytest.mark.parametrize("field,bad,good", [
    ("beta1", 1.0, 0.0), ("beta2", 1.0, 0.999), ("eps", 0.0, 1e-12), ("lr", 0.0, 1e-9),
    ("grad_clip", -0.1, 0.0), ("weight_decay", -1e-3, 0.0), ("min_lr_ratio", 1.01, 1.0),
    ("decay_fraction", -0.01, 0.0), ("warmup_fraction", 1.01, 1.0), ("keep_checkpoints", 0, 1),
])
def test_train_config_interval_boundaries(field, bad, good):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: bad})
    assert getattr(TrainConfig(**{field: good}), field) == good


def test_warmup_may_fill_the_schedule_but_not_exceed_it():
    assert TrainConfig(steps=5, warmup_steps=5).warmup == 5
    assert TrainConfig(steps=5, schedule_steps=8, warmup_steps=8).warmup == 8
    with pytest.raises(ValueError, match=r"warmup_steps=6 must be in \[0, 5\]"):
        TrainConfig(steps=5, warmup_steps=6)


def test_truncate_metrics_keeps_the_restored_steps_rows_and_drops_later_ones(tmp_path):
    """A resume from step 3 keeps the rows of step 3 (its training and evaluation rows; the resumed
    loop starts at update 4), drops 4 and 5; a row without a step stays."""
    import json
    from jaxformers.training.rundir import METRICS_FILE, read_metrics, reset_metrics
    rows = [{"step": 2, "loss": 1.0}, {"step": 3, "loss": 0.9}, {"step": 3, "val_loss": 1.1},
            {"note": "x"}, {"step": 4, "loss": 0.8}, {"step": 5, "val_loss": 0.7}]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    reset_metrics(tmp_path, 3)
    assert read_metrics(tmp_path) == rows[:4]
    reset_metrics(tmp_path, None)  # a fresh start
    assert read_metrics(tmp_path) == []


# ----------------------------------------------------------------------------- resume (end to end)
def test_a_stop_between_log_steps_resumes_onto_the_uninterrupted_rows(env, tmp_path):
    """stop_after=3 with log_every=2 writes no training row for step 3 (only the run's last step is
    logged out of turn) and its evaluation row once (not again on the resume), so the resumed run's
    metrics.jsonl equals the uninterrupted one's, row for row, with bit-identical losses; the last
    step is evaluated though eval_every=3 does not divide it."""
    from jaxformers.training import read_metrics, train
    from test_training import tiny_model, tiny_train

    cache = CompileCache(max_entries=2)
    model = tiny_model(d_model=16, n_head=2, max_seq_len=16)

    def run(out, **kw):
        tc = tiny_train(env, out, steps=4, batch_size=4, seq_len=16, log_every=2, eval_every=3, eval_batches=1,
                        checkpoint_every=0, tensorboard=False)
        return train(model, tc, progress=False, cache=cache, **kw)

    def rows(out):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in read_metrics(out)]

    ref = run(tmp_path / "ref")
    part = run(tmp_path / "cut", stop_after=3)
    assert part["final_step"] == 3 and [r["step"] for r in rows(tmp_path / "cut")] == [2, 3]
    assert run(tmp_path / "cut", resume=True)["resumed_from"] == 3
    assert rows(tmp_path / "cut") == rows(tmp_path / "ref")
    assert [(r["step"], "val_loss" in r) for r in rows(tmp_path / "ref")] == [(2, False), (3, True), (4, False),
                                                                              (4, True)]
    assert ref["val_loss"] == rows(tmp_path / "ref")[-1]["val_loss"]


# ----------------------------------------------------------------------------- argument checks (fixed)
@pytest.mark.parametrize("bad", [0, -2, 2.5, "2", True])
def test_grad_accum_that_is_not_a_positive_int_is_a_value_error_naming_it(bad):
    """Was ZeroDivisionError (0), a reshape TypeError (-2) or a TypeError deep in the split."""
    params = {"w": jnp.ones((3, 2), jnp.float32)}
    batch = {"x": jnp.ones((4, 3), jnp.float32), "y": jnp.ones((4, 2), jnp.float32)}
    tx = optax.sgd(1.0)
    with pytest.raises(ValueError, match="grad_accum"):
        train_step(None, tx, _linear_loss, params, tx.init(params), batch, 0, None, grad_accum=bad)
    with pytest.raises(ValueError, match="grad_accum"):
        split_micro_batches(batch, bad)


@pytest.mark.parametrize("bad", ["4", 2.5, True, None])
def test_compile_cache_size_that_is_not_an_int_is_a_value_error(bad):
    """Was a TypeError ('<' between str and int) or, for 2.5, silently a cache of 2."""
    with pytest.raises(ValueError, match="max_entries"):
        CompileCache(max_entries=bad)
