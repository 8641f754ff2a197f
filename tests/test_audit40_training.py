"""Audit 40 (trainer numerics): gradient accumulation with sown auxiliary losses, the LR of an
extended run resumed again, and a schedule that is all warmup."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.layers import Block
from jaxformers.models.transformer import Transformer
from jaxformers.training import TrainConfig, get_loss, train_step
from jaxformers.training.optim import lr_at
from jaxformers.training.trainer import resume_schedule
from toy_models import SowMLP


class _SowLM(Transformer):
    def block_class(self):
        return Block.using(mlp=SowMLP)


def _aux_model():
    cfg = jf.get_config("gpt", "tiny", vocab_size=64, d_model=16, n_layer=1, n_head=2, max_seq_len=16)
    module = _SowLM(config=cfg)
    params = jax.jit(lambda r: jf.init_params(module, r))(jax.random.PRNGKey(0))
    return module, params


def test_grad_accum_weighs_sown_aux_losses_like_the_whole_batch():
    """With loss masks of unequal size the loss is token-weighted over the micro-batches, but a
    sown per-token mean (over every token, masked or not) must count once per micro-batch, as in
    the whole batch: before the fix it was weighted by the micro-batch's number of targets
    (update off by ~0.2 with sgd(1), aux/toy logged wrong)."""
    module, params = _aux_model()
    tokens = np.random.default_rng(0).integers(0, 64, (4, 9)).astype(np.int32)
    mask = np.ones((4, 9), np.float32)
    mask[0, 3:] = 0  # micro-batches (rows 0, 2) and (1, 3) of grad_accum=2: 2 + 8 vs 8 + 1 targets
    mask[2] = 0
    mask[3, 1:8] = 0
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
    tx = optax.sgd(1.0)
    loss = get_loss("cross_entropy")
    step = jax.jit(lambda b, a: train_step(module, tx, loss, params, tx.init(params), b, 0, None, grad_accum=a,
                                           aux_weights={"toy": 2.0}), static_argnums=1)
    (p1, _, m1), (p2, _, m2) = step(batch, 1), step(batch, 2)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(x, y, atol=2e-6)
    for k in ("loss", "aux/toy", "total_loss", "n_targets"):
        assert float(m2[k]) == pytest.approx(float(m1[k]), rel=1e-5), k


def test_grad_accum_micro_batch_without_targets_drops_its_aux_loss_too():
    """A micro-batch without targets contributes nothing (documented): the aux losses are the mean
    over the micro-batches that have targets, finite even when the empty one's loss is 0/0."""
    module, params = _aux_model()

    def unguarded(module, params, batch, rng):  # NaN on a micro-batch without targets
        logits, _ = jf.training.apply_model(module, params, batch, rng)
        t, w = jf.training.next_token_targets(batch)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, t)
        return jnp.sum(ce * w) / jnp.sum(w), {"n_targets": jnp.sum(w)}

    tokens = np.random.default_rng(1).integers(0, 64, (3, 9)).astype(np.int32)
    mask = np.ones((3, 9), np.float32)
    mask[1] = 0
    mask[2, 4:] = 0  # 8 and 3 targets in the others
    tx = optax.sgd(1.0)
    full = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
    kept = {k: v[np.array([0, 2])] for k, v in full.items()}  # the rows with targets, as one batch
    p3, _, m3 = train_step(module, tx, unguarded, params, tx.init(params), full, 0, None, grad_accum=3)
    p2, _, m2 = train_step(module, tx, unguarded, params, tx.init(params), kept, 0, None, grad_accum=1)
    for x, y in zip(jax.tree.leaves(p3), jax.tree.leaves(p2)):
        assert np.all(np.isfinite(x))
        np.testing.assert_allclose(x, y, atol=2e-6)
    assert float(m3["aux/toy"]) == pytest.approx(float(m2["aux/toy"]), rel=1e-5)


def test_an_extended_run_resumed_again_by_the_extending_call_keeps_its_lr():
    """train(model, tc.replace(steps=10), resume=True) extends a 6-step run (schedule_steps=6 is
    saved with its first checkpoint); preempted at step 8, the same call again was refused as an
    LR jump (schedule_steps 6 -> None) instead of continuing at the final LR."""
    tc = TrainConfig(steps=10, warmup_steps=2, lr=1e-2, min_lr_ratio=0.1)
    saved = {"train": tc.replace(schedule_steps=6).to_dict()}
    for steps in (10, 9):  # the same total, or a shorter one above the checkpoint
        new, _ = resume_schedule(saved, tc.replace(steps=steps), 8)
        assert new.schedule_steps == 6 and lr_at(new, 8) == pytest.approx(1e-3)
    new, msgs = resume_schedule(saved, tc.replace(steps=14), 8)  # a second extension
    assert new.schedule_steps == 6 and "extending" in msgs[0]
    with pytest.raises(ValueError, match="moves the learning rate"):  # a real change is still refused
        resume_schedule(saved, tc.replace(lr=2e-2), 8)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_schedule_that_is_all_warmup_holds_its_peak_past_its_end(schedule):
    """warmup_steps == steps: the schedule ends at lr and must hold it past its length (an
    extension continues at the value reached); it dropped to lr * min_lr_ratio one step later."""
    tc = TrainConfig(steps=10, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule=schedule)
    assert lr_at(tc, 0) == pytest.approx(0.1) and lr_at(tc, 9) == pytest.approx(1.0)
    assert [lr_at(tc, s) for s in (10, 11, 50)] == pytest.approx([1.0, 1.0, 1.0])
    short = tc.replace(warmup_steps=2)  # an ordinary schedule still ends at the floor
    assert lr_at(short, 10) == pytest.approx(0.1) and lr_at(short, 11) == pytest.approx(0.1)
