"""Mutation-audit tests of the training infrastructure and the data pipeline: each one kills a
realistic mutant that the rest of the suite let through (see the audit report).  Every oracle
is independent of the code under test (a NumPy AdamW, the PRNG keys derived by hand, the
windows' start offsets enumerated)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxformers.data.loader import TokenLoader, eval_batches
from jaxformers.data.prepare import split_documents
import jaxformers as jf
from jaxformers.training import TrainConfig, evaluate, read_metrics, train
from jaxformers.training.losses import weighted_mean
from jaxformers.training.optim import decay_mask, make_optimizer
from jaxformers.training.steps import train_step

from test_training import env, tiny_model, tiny_train  # noqa: F401 - env: the corpus fixture


# ----------------------------------------------------------------------------- optimizer
def _schedule(t, tc):
    """Warmup (t + 1) / W, then cosine from lr to lr * min_lr_ratio over the remaining steps."""
    lr, floor, w, total = tc.lr, tc.lr * tc.min_lr_ratio, tc.warmup_steps, tc.steps
    if t < w:
        return lr * (t + 1) / w
    frac = min(max((t - w) / (total - w), 0.0), 1.0)
    return floor + 0.5 * (lr - floor) * (1 + np.cos(np.pi * frac))


def _numpy_adamw(params, grads, tc, mask):
    """AdamW (bias-corrected moments, decoupled decay scaled by the LR) on the gradient clipped
    to global norm ``grad_clip`` before the moments, in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads):
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
        scale = min(1.0, tc.grad_clip / norm)
        for k in p:
            gk = g[k] * scale
            m[k] = tc.beta1 * m[k] + (1 - tc.beta1) * gk
            v[k] = tc.beta2 * v[k] + (1 - tc.beta2) * gk ** 2
            mhat = m[k] / (1 - tc.beta1 ** (t + 1))
            vhat = v[k] / (1 - tc.beta2 ** (t + 1))
            upd = mhat / (np.sqrt(vhat) + tc.eps) + (tc.weight_decay * p[k] if mask[k] else 0.0)
            p[k] = p[k] - _schedule(t, tc) * upd
    return p


def test_make_optimizer_is_clipped_bias_corrected_adamw_with_the_decay_mask():
    """Kills: clipping the update instead of the gradient, dropped bias correction, the decay
    mask not passed to adamw (norms/biases decayed), a 2-D ``A_log`` decayed."""
    tc = TrainConfig(steps=6, lr=0.1, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.5,
                     beta1=0.9, beta2=0.95, eps=1e-3, grad_clip=1.0)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,)),
              "scale": 1.0 + rng.normal(size=(4,)), "A_log": rng.normal(size=(4, 2))}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    assert decay_mask({k: None for k in params}, params)["A_log"]  # 2-D: decayed by the shape rule
    mask = decay_mask({k: None for k in params}, params, no_decay=("A_log",))  # a config's no_weight_decay
    assert mask == {"kernel": True, "bias": False, "scale": False, "A_log": False}
    # global norms far above and below grad_clip, so clipping changes the result
    grads = [{k: jnp.asarray(rng.normal(size=v.shape) * s, jnp.float32) for k, v in params.items()}
             for s in (10.0, 0.05, 3.0, 0.2, 30.0, 1.0)]
    tx, _ = make_optimizer(tc, mask)
    state, p = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    want = _numpy_adamw(params, grads, tc, mask)
    # float32 vs float64 over 6 updates of size <= lr = 0.1: rounding is ~1e-7; every mutant
    # above moves some parameter by >= 1e-3
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=0, atol=2e-6, err_msg=k)


# ----------------------------------------------------------------------------- losses
def test_weighted_mean_ignores_nan_and_inf_at_zero_weight():
    """Kills: ``sum(w * v)`` without the ``w != 0`` guard (0 * NaN = NaN: one masked target with a
    non-finite loss, e.g. an out-of-vocabulary padding id, would poison the step)."""
    values = jnp.array([1.0, jnp.nan, jnp.inf, 4.0, -jnp.inf])
    weights = jnp.array([1.0, 0.0, 0.0, 0.5, 0.0])
    mean, total = weighted_mean(values, weights)
    assert float(total) == 1.5
    assert float(mean) == pytest.approx((1.0 + 0.5 * 4.0) / 1.5, rel=1e-7)
    grad = jax.grad(lambda v: weighted_mean(v, weights)[0])(values)
    np.testing.assert_allclose(np.asarray(grad), [1 / 1.5, 0.0, 0.0, 0.5 / 1.5, 0.0], rtol=1e-6)


# ----------------------------------------------------------------------------- per-step rng
def _rng_probe(module, params, batch, rng):
    """A loss whose metric ``r`` is a uniform draw from the rng it was given."""
    return jnp.sum(params["w"] ** 2), {"r": jax.random.uniform(rng, ())}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_loss_sees_the_rng_folded_with_the_step_and_split_per_micro_batch(grad_accum):
    """Kills: the rng not folded with the step (the same dropout mask every update), and every
    micro-batch of an accumulated step given the same key."""
    params = {"w": jnp.ones((2,), jnp.float32)}
    tx = optax.sgd(0.0)
    batch = {"tokens": jnp.zeros((2, 3), jnp.int32)}
    key = jax.random.PRNGKey(7)
    step = jax.jit(lambda s: train_step(None, tx, _rng_probe, params, tx.init(params), batch, s, key,
                                        grad_accum=grad_accum)[2]["r"])
    seen = []
    for s in (0, 1, 5):
        k = jax.random.fold_in(key, s)
        keys = [k] if grad_accum == 1 else list(jax.random.split(k, grad_accum))
        want = np.mean([float(jax.random.uniform(kk, ())) for kk in keys])
        got = float(step(s))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7)  # float32 mean of <= 2 draws
        seen.append(got)
    assert len(set(seen)) == 3


# ----------------------------------------------------------------------------- data
def test_every_window_start_is_drawn_and_windows_are_the_tokens():
    """Kills: the last start (a window ending on the last token) never drawn."""
    T = 5
    tokens = np.arange(100, 100 + T + 3, dtype=np.int32)  # starts 0, 1, 2
    loader = TokenLoader(tokens, batch_size=4, seq_len=T, seed=0, process_index=0, process_count=1)
    starts = set()
    for step in range(40):
        offs = loader.offsets_at(step)
        starts.update(offs.tolist())
        np.testing.assert_array_equal(loader.global_batch_at(step),
                                      np.stack([tokens[s:s + T + 1] for s in offs]))
    assert starts == {0, 1, 2}


def test_batches_of_other_seeds_are_not_shifted_copies():
    """Kills: ``default_rng(seed + step)``: seed 1 would replay seed 0's batches one step later."""
    tokens = np.arange(50_000, dtype=np.int32)
    batches = {}
    for seed in range(3):
        loader = TokenLoader(tokens, batch_size=4, seq_len=8, seed=seed, process_index=0, process_count=1)
        for step in range(3):
            batches[(seed, step)] = tuple(loader.offsets_at(step).tolist())
    assert len(set(batches.values())) == len(batches)


@pytest.mark.parametrize("extra", [0, 1, 3])
def test_eval_windows_cover_every_target_once_including_the_last_window(extra):
    T, k = 4, 5
    tokens = np.arange(1, k * T + 2 + extra, dtype=np.int32)  # k whole windows + a short tail
    rows = np.concatenate(list(eval_batches(tokens, 2, T, process_index=0, process_count=1)))
    assert rows.shape == (k, T + 1)
    np.testing.assert_array_equal(rows[:, 1:].reshape(-1), tokens[1:k * T + 1])
    np.testing.assert_array_equal(rows[:, 0], tokens[0:k * T:T])


def test_document_split_is_a_partition():
    docs = [f"document {i} " * (5 + 3 * i) for i in range(12)]
    train, val, method = split_documents(docs, 0.2, seed=3)
    assert method == "documents" and val
    assert sorted(train + val) == sorted(docs)
    assert not set(train) & set(val)
    # a large val_fraction still leaves a train document (two equal documents, target 1.2 of them)
    train, val, method = split_documents(["a" * 100, "b" * 100], 0.6, seed=0)
    assert method == "documents" and len(train) == 1 and len(val) == 1


# ----------------------------------------------------------------------------- trainer
def test_tokens_count_whole_batches_and_eval_follows_eval_every_with_grad_accum(env):
    """Kills: ``tokens`` / ``tokens_seen`` counted per micro-batch with ``grad_accum > 1``, and
    the evaluation cadence shifted by one step."""
    import json

    out = env["root"] / "audit_ga2"
    train(tiny_model(), tiny_train(env, out, steps=4, batch_size=8, grad_accum=2, warmup_steps=0,
                                   eval_every=2, eval_batches=1, checkpoint_every=0), progress=False)
    rows = read_metrics(out)
    assert {r["step"]: r["tokens"] for r in rows if "loss" in r} == {s: s * 8 * 32 for s in (1, 2, 3, 4)}
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    meta = json.loads((out / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["tokens_seen"] == 4 * 8 * 32 and meta["data_step"] == 4


def test_evaluate_with_a_short_last_batch_counts_only_real_windows():
    """Kills: the rows that pad a short last evaluation batch counted in the loss (5 windows in
    batches of 4: 3 padding rows).  Oracle: the mean cross-entropy of the 5 windows from
    ``module.apply`` directly; float32 on both sides, rtol 1e-5."""
    T, V = 8, 32
    cfg = tiny_model(vocab_size=V, max_seq_len=T)
    module = jf.build(cfg)
    params = jf.init_params(module, jax.random.PRNGKey(0))
    tokens = np.random.default_rng(0).integers(0, V, size=5 * T + 1).astype(np.int32)
    ev = evaluate((cfg, params), data=tokens, batch_size=4, seq_len=T, max_batches=None, dtype="float32")
    windows = np.stack([tokens[i * T:i * T + T + 1] for i in range(5)])
    logits = module.apply({"params": params}, jnp.asarray(windows[:, :-1]))
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    ce = -np.take_along_axis(np.asarray(logp), windows[:, 1:, None], axis=-1)
    assert ev["val_tokens"] == 5 * T
    assert ev["val_loss"] == pytest.approx(float(ce.mean()), rel=1e-5)
