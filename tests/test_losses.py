"""Loss functions over batch dicts, auxiliary losses, and the step functions used without train().

Every check runs jitted (one compilation per batch structure): eager op-by-op dispatch of a
transformer is slower than compiling it on this CPU.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.config import TransformerConfig
from jaxformers.layers import Block
from jaxformers.models.transformer import Transformer
from jaxformers.training import (TrainConfig, apply_model, cross_entropy, eval_step, get_loss, list_losses,
                                 register_loss, train_step)
from jaxformers.training.losses import aux_weight, next_token_targets
from jaxformers.training.steps import global_norm, loss_with_aux


# ----------------------------------------------------------------------------- toy model
class SowMLP(nn.Module):
    """MLP that sows an auxiliary loss ``toy`` (twice, to check the sown tuple is summed)."""
    config: object

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(2 * self.config.d_model, use_bias=False, name="up")(x))
        self.sow("losses", "toy", 0.5 * jnp.mean(h.astype(jnp.float32) ** 2))
        self.sow("losses", "toy", 0.5 * jnp.mean(h.astype(jnp.float32) ** 2))
        return nn.Dense(self.config.d_model, use_bias=False, name="down")(h)


class SowLM(Transformer):
    def block_class(self):
        return Block.using(mlp=SowMLP)


def init(module, seed=0):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(lambda r: nn.unbox(module.init(r, tokens))["params"])(jax.random.PRNGKey(seed))


def log_softmax_ce(logits, targets):
    """Per-token cross-entropy by hand (numpy, float64)."""
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def model():
    config = jf.get_config("gpt", "tiny", vocab_size=32, d_model=32, n_layer=2, n_head=4, max_seq_len=16,
                           attention_impl="xla")
    module = jf.build(config)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (3, 13), 0, 32), np.int32)

    @jax.jit
    def probe(params, batch):
        """logits, cross-entropy, its metrics and gradient norm for one batch dict."""
        (loss, metrics), grads = jax.value_and_grad(lambda p: cross_entropy(module, p, batch), has_aux=True)(
            params)
        logits, _ = apply_model(module, params, batch)
        return logits, loss, metrics, global_norm(grads)

    return module, init(module), tokens, probe


def full_batch(tokens, loss_mask=None, segment_ids=None):
    """Every batch of these tests but the first has this structure (one compilation)."""
    return {"tokens": tokens,
            "loss_mask": np.ones(tokens.shape, np.float32) if loss_mask is None else loss_mask,
            "segment_ids": np.ones(tokens.shape, np.int32) if segment_ids is None else segment_ids,
            "domain": np.arange(tokens.shape[0])}  # an extra key: carried along, ignored by the loss


# ----------------------------------------------------------------------------- cross-entropy
def test_loss_mask_matches_hand_computation(model):
    module, params, tokens, probe = model
    # no mask: the plain mean
    logits, loss, metrics, _ = probe(params, {"tokens": tokens})
    ce = log_softmax_ce(logits, tokens[:, 1:])  # [3, 12] from the logits
    np.testing.assert_allclose(float(loss), ce.mean(), rtol=1e-5)
    assert float(metrics["n_targets"]) == 36
    # a mask aligned with tokens ([B, T+1]; column 0 ignored), with fractional weights
    mask = np.zeros(tokens.shape, np.float32)
    mask[0, 5:9] = 1.0
    mask[1, 1] = 0.25
    mask[2, 0] = 7.0  # column 0 is never a target
    mask[2, 12] = 2.0
    w = mask[:, 1:]
    _, loss, metrics, _ = probe(params, full_batch(tokens, mask))
    np.testing.assert_allclose(float(loss), (w * ce).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["n_targets"]), w.sum())
    assert abs(float(loss) - ce.mean()) > 1e-3  # the mask really changed it
    # all-zero mask: loss 0 (not NaN) and zero gradients
    _, loss, metrics, grad_norm = probe(params, full_batch(tokens, np.zeros_like(mask)))
    assert float(loss) == 0.0 and float(grad_norm) == 0.0 and float(metrics["n_targets"]) == 0.0
    with pytest.raises(ValueError, match=r"loss_mask must be aligned with tokens"):
        next_token_targets({"tokens": tokens, "loss_mask": mask[:, 1:]})


def test_segment_boundaries_are_excluded(model):
    module, params, tokens, probe = model
    seg = np.array([[1] * 5 + [2] * 8, [1] * 13, [3] * 2 + [4] * 4 + [5] * 7], np.int32)
    batch = full_batch(tokens, segment_ids=seg)
    logits, loss, metrics, _ = probe(params, batch)
    ce = log_softmax_ce(logits, tokens[:, 1:])
    w = (seg[:, 1:] == seg[:, :-1]).astype(np.float64)
    assert w.sum() == 36 - 3  # three targets start a new document
    np.testing.assert_allclose(float(loss), (w * ce).sum() / w.sum(), rtol=1e-5)
    assert float(metrics["n_targets"]) == w.sum()
    # the model saw the segments: the second document of row 0 is predicted as if it were alone
    alone = jax.jit(module.apply)({"params": params}, tokens[:1, 5:12])
    np.testing.assert_allclose(np.asarray(logits)[0, 5:12], np.asarray(alone)[0], atol=2e-5)
    # masks and segments combine
    targets, weights = next_token_targets(full_batch(tokens, np.full(tokens.shape, 0.5, np.float32), seg))
    np.testing.assert_array_equal(np.asarray(weights), 0.5 * w)
    np.testing.assert_array_equal(np.asarray(targets), tokens[:, 1:])


def test_negative_ids_are_padding(model):
    """Right padding with -100 (Hugging Face's ignore index) or -1: the loss and the gradients
    equal those of the same batch with the padding masked out (before: -1 wrapped to the last
    vocabulary row and was a target, -100 made the gradients NaN)."""
    module, params, tokens, probe = model
    padded = tokens.copy()
    padded[0, 9:] = -100
    padded[2, 11:] = -1
    mask = np.ones(tokens.shape, np.float32)
    mask[0, 9:] = 0.0
    mask[2, 11:] = 0.0
    clean = np.where(padded < 0, 0, padded).astype(np.int32)
    grad = jax.jit(jax.grad(lambda p, b: cross_entropy(module, p, b)[0]))
    _, loss, metrics, _ = probe(params, full_batch(padded))
    _, want, want_metrics, _ = probe(params, full_batch(clean, mask))
    assert float(loss) == float(want) and float(metrics["n_targets"]) == float(want_metrics["n_targets"]) == 36 - 6
    got_g, want_g = grad(params, full_batch(padded)), grad(params, full_batch(clean, mask))
    for a, b in zip(jax.tree_util.tree_leaves(got_g), jax.tree_util.tree_leaves(want_g)):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    targets, weights = next_token_targets({"tokens": padded})
    assert float(jnp.sum(weights)) == 36 - 6 and np.asarray(weights)[2, 10:].sum() == 0


def test_loss_registry():
    assert "cross_entropy" in list_losses() and get_loss("cross_entropy") is cross_entropy
    with pytest.raises(ValueError, match=r"unknown loss='nope'; choose one of \[.*'cross_entropy'"):
        get_loss("nope")

    def mine(module, params, batch, rng):
        return cross_entropy(module, params, batch, rng)

    register_loss("test-losses-mine", mine)
    register_loss("test-losses-mine", mine)  # the same function again: fine
    assert get_loss("test-losses-mine") is mine
    with pytest.raises(ValueError, match="already registered"):
        register_loss("test-losses-mine", lambda *a: None)
    with pytest.raises(ValueError, match="non-empty string"):
        TrainConfig(loss="")


def test_aux_weights_in_train_config():
    tc = TrainConfig(aux_loss_weights={"b": 2, "a": 0.5})
    assert tc.aux_loss_weights == (("a", 0.5), ("b", 2.0)) and hash(tc)
    assert tc.aux_weight("a") == 0.5 and tc.aux_weight("unlisted") == 1.0
    assert tc.to_dict()["aux_loss_weights"] == {"a": 0.5, "b": 2.0}
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    assert TrainConfig(aux_loss_weights="a=0.5,b=2").aux_loss_weights == tc.aux_loss_weights
    assert TrainConfig(aux_loss_weights='{"b": 2, "a": 0.5}') == tc
    assert TrainConfig(aux_loss_weights=[("a", 0.5), ("b", 2)]) == tc
    assert TrainConfig().replace(aux_loss_weights={"x": 0}).aux_loss_weights == (("x", 0.0),)
    from jaxformers.config import coerce_value
    assert TrainConfig(aux_loss_weights=coerce_value(TrainConfig, "aux_loss_weights", "a=0.5,b=2")) == tc
    as_json = coerce_value(TrainConfig, "aux_loss_weights", '{"a": 0.5, "b": 2}')
    assert as_json == {"a": 0.5, "b": 2} and TrainConfig(aux_loss_weights=as_json) == tc
    for bad, msg in [("a", "NAME=WEIGHT"), ({"a": "x"}, "must be a number"), ({"a": float("nan")}, "finite"),
                     ([("a", 1), ("a", 2)], "given twice"), ({"": 1}, "non-empty")]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(aux_loss_weights=bad)


# ----------------------------------------------------------------------------- auxiliary losses
@pytest.mark.parametrize("scan", [False, True])
def test_aux_losses_are_summed_weighted_and_reported(scan):
    config = TransformerConfig(model="gpt", vocab_size=32, d_model=16, n_layer=3, n_head=2, max_seq_len=16,
                               attention_impl="xla", scan_layers=scan, remat="full" if scan else "none")
    module = SowLM(config)
    params = init(module)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 32), np.int32)
    batch = {"tokens": tokens}

    @jax.jit
    def probe(params, batch, w):  # w traced: one compilation for every weight
        _, state = module.apply({"params": params}, batch["tokens"][:, :-1], mutable=["losses"])
        _, aux = apply_model(module, params, batch)
        ce, _ = cross_entropy(module, params, batch)
        def objective(p, w):
            return loss_with_aux(module, cross_entropy, p, batch, None, {"toy": w})

        (total, metrics), (grads, d_w) = jax.value_and_grad(objective, (0, 1), has_aux=True)(params, w)
        return state["losses"], aux, ce, total, metrics, grads, d_w

    sown, aux, ce, total, metrics, grads0, d_w = probe(params, batch, 0.0)
    # by hand: the sown values of every layer (2 sows x 3 layers; stacked over layers when scanned)
    assert len(jax.tree.leaves(sown)) == (2 if scan else 6)
    sown = sum(float(jnp.sum(x)) for x in jax.tree.leaves(sown))
    assert set(aux) == {"toy"} and float(aux["toy"]) == pytest.approx(sown, rel=1e-6)
    assert float(d_w) == pytest.approx(sown, rel=1e-5)  # d(objective)/d(weight) = the aux loss
    for w in (0.0, 0.25, 1.0, 10.0):
        _, _, _, total, metrics, grads, _ = probe(params, batch, w)
        assert float(metrics["loss"]) == pytest.approx(float(ce), rel=1e-6)
        assert float(metrics["aux/toy"]) == pytest.approx(sown, rel=1e-6)
        assert float(total) == pytest.approx(float(ce) + w * sown, rel=1e-6)
        assert float(metrics["total_loss"]) == float(total)
    # the weighted aux loss is differentiated
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads)))
    # names not listed weigh 1.0
    assert aux_weight(None, "toy") == aux_weight({"other": 3.0}, "toy") == aux_weight((), "toy") == 1.0
    assert aux_weight((("toy", 0.5),), "toy") == 0.5


# ----------------------------------------------------------------------------- step functions
def test_step_functions_without_train(model):
    module, params0, tokens, probe = model
    tx = optax.adam(1e-2)
    mask = np.ones(tokens.shape, np.float32)
    mask[0, :8] = 0.0  # rows (= micro-batches below) with different target counts
    mask[2, 3:] = 0.0
    batch = full_batch(tokens, mask)
    rngs = []

    def custom(module, params, batch, rng):  # a custom loss from Python: CE with label smoothing
        rngs.append(rng)
        logits, _ = apply_model(module, params, batch, rng)
        targets, w = next_token_targets(batch)
        labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), 0.1)
        per_token = optax.softmax_cross_entropy(logits, labels)
        return jnp.sum(per_token * w) / jnp.sum(w), {"n_targets": jnp.sum(w)}

    step = jax.jit(lambda p, o, b, s, r: train_step(module, tx, custom, p, o, b, s, r,
                                                    schedule=lambda s: 1e-2 * jnp.ones(())))
    params, opt_state = params0, tx.init(params0)
    losses = []
    for i in range(8):
        params, opt_state, metrics = step(params, opt_state, batch, i, jax.random.PRNGKey(3))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.3, losses
    assert set(metrics) == {"loss", "n_targets", "grad_norm", "lr"}
    assert float(metrics["lr"]) == pytest.approx(1e-2) and rngs[0] is not None  # a per-step rng

    # gradient accumulation over 3 micro-batches (one row each, different target counts)
    # equals the whole batch: micro-batches are weighted by n_targets
    sgd = optax.sgd(1.0)

    @jax.jit
    def one_step_each(p, b):
        return [train_step(module, sgd, cross_entropy, p, sgd.init(p), b, 0, None, grad_accum=a)
                for a in (1, 3)], eval_step(module, cross_entropy, p, b)

    ((p1, _, m1), (p3, _, m3)), (total, n) = one_step_each(params0, batch)
    # eval_step: (loss * n_targets, n_targets)
    assert float(n) == mask[:, 1:].sum()
    assert float(total / n) == pytest.approx(float(probe(params0, batch)[1]), rel=1e-5)
    assert float(m3["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    assert float(m3["n_targets"]) == float(m1["n_targets"]) == mask[:, 1:].sum()
    assert float(m3["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p3)):
        np.testing.assert_allclose(a, b, atol=1e-6)
