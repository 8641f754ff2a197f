"""Audit 55 (mutation pass over training/losses.py and training/steps.py): each test kills a
mutant that the rest of the suite let through; expected values follow from the docstrings."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import flax.linen as nn

import jaxformers as jf
from jaxformers.training import TrainConfig, apply_model, make_mesh
from jaxformers.training.steps import Program, compute_config, program_key


def _tiny(**kw):
    return jf.get_config("gpt", "tiny", vocab_size=32, d_model=16, n_layer=1, n_head=2, max_seq_len=16,
                         attention_impl="xla", **kw)


# ----------------------------------------------------------------------------- program_key
def _ce(module, params, batch, rng):  # pragma: no cover - only its identity matters
    raise AssertionError


def _other(module, params, batch, rng):  # pragma: no cover
    raise AssertionError


def test_program_key_follows_every_field_that_changes_the_compiled_program():
    """Two trainings that differ in grad_accum, aux_loss_weights, the loss function, the step
    function or an optimizer field must not share a compiled program; paths and seeds may."""
    config, mesh = _tiny(), make_mesh("data=1")
    tc = TrainConfig(steps=4, batch_size=4, seq_len=8)
    base = program_key(config, mesh, tc, _ce)
    assert program_key(config, mesh, tc.replace(seed=7), _ce) == base
    for other in (program_key(config, mesh, tc.replace(grad_accum=2), _ce),
                  program_key(config, mesh, tc.replace(aux_loss_weights={"toy": 0.5}), _ce),
                  program_key(config, mesh, tc, _other),
                  program_key(config, mesh, tc, _ce, step_fn=_other),
                  program_key(config, mesh, tc.replace(lr=0.5), _ce),
                  program_key(config.replace(d_model=32), mesh, tc, _ce),
                  program_key(config, mesh, None, _ce)):
        assert other != base
    # evaluation programs: the loss function is part of the key too
    assert program_key(config, mesh, None, _ce) != program_key(config, mesh, None, _other)


# ----------------------------------------------------------------------------- apply_model
class _BF16LM(nn.Module):
    """A model whose logits come out in bfloat16 (the library's own models upcast them)."""

    @nn.compact
    def __call__(self, tokens):
        return nn.Embed(32, 32, dtype=jnp.bfloat16)(tokens)


def test_apply_model_returns_float32_logits_for_a_bfloat16_model():
    """``(logits [B, T, V] float32, ...)`` whatever the model returns: a loss that takes the
    logits (distillation, a custom CE) must not compute its softmax in bfloat16."""
    module = _BF16LM()
    batch = {"tokens": jnp.asarray(np.arange(18).reshape(2, 9) % 32, jnp.int32)}
    params = module.init(jax.random.PRNGKey(0), batch["tokens"][:, :-1])["params"]
    assert module.apply({"params": params}, batch["tokens"][:, :-1]).dtype == jnp.bfloat16
    logits, aux = apply_model(module, params, batch)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 8, 32) and aux == {}


# ----------------------------------------------------------------------------- Program
@pytest.fixture(scope="module")
def eval_program():
    module = jf.build(compute_config(_tiny(), "float32"))
    prog = Program(module, make_mesh("data=1"))
    params, _ = prog.init(0)
    return prog, params


def test_program_compiles_again_for_a_batch_of_another_dtype(eval_program):
    """Steps are compiled once per batch structure -- keys, shapes *and dtypes*: a loss_mask of
    another dtype with the same shape gets its own program (the first one refuses it)."""
    prog, params = eval_program
    tokens = np.arange(18).reshape(2, 9) % 32
    mask = np.ones((2, 9))
    mask[0, 4:] = 0
    f32 = {"tokens": tokens.astype(np.int32), "loss_mask": mask.astype(np.float32)}
    i32 = {"tokens": tokens.astype(np.int32), "loss_mask": mask.astype(np.int32)}
    t1, n1 = prog.eval_step(params, prog.put_batch(f32, 2))
    t2, n2 = prog.eval_step(params, prog.put_batch(i32, 2))
    assert float(n1) == float(n2) == 11.0  # 3 + 8 targets
    assert float(t2) == pytest.approx(float(t1), rel=1e-6)
    assert len([k for k in prog._compiled if k[0] == "eval"]) == 2


# ----------------------------------------------------------------------------- auxiliary losses
class _Sower(nn.Module):
    """Logits from an embedding; sows ``toy`` = the mean input id and ``other`` = 1.0."""

    @nn.compact
    def __call__(self, tokens):
        self.sow("losses", "toy", jnp.mean(tokens.astype(jnp.float32)))
        self.sow("losses", "other", jnp.ones((), jnp.float32))
        return nn.Embed(32, 32)(tokens)


def _sower():
    module = _Sower()
    return module, module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]


def test_aux_losses_of_every_apply_model_call_in_the_loss_are_summed():
    """A loss that runs the model twice (e.g. on two views) gets both calls' auxiliary losses,
    summed by name, weighted once each."""
    from jaxformers.training.steps import loss_with_aux
    module, params = _sower()
    a = {"tokens": jnp.asarray([[1, 3, 5, 7, 9]], jnp.int32)}  # inputs 1, 3, 5, 7: mean 4
    b = {"tokens": jnp.asarray([[2, 2, 2, 2, 2]], jnp.int32)}  # mean 2

    def two_views(module, params, batch, rng):
        apply_model(module, params, a)
        apply_model(module, params, b)
        return jnp.asarray(0.5), {}

    total, m = loss_with_aux(module, two_views, params, a, None, {"toy": 0.25})
    assert float(m["aux/toy"]) == pytest.approx(6.0) and float(m["aux/other"]) == pytest.approx(2.0)
    assert float(m["loss"]) == 0.5 and float(total) == pytest.approx(0.5 + 0.25 * 6.0 + 2.0)
    assert float(m["total_loss"]) == pytest.approx(float(total))


class _InfSower(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        self.sow("losses", "probe", jnp.asarray(jnp.inf, jnp.float32))  # e.g. a diverged diagnostic
        return nn.Embed(32, 32)(tokens)


def test_aux_loss_of_weight_zero_is_only_logged_not_added():
    """weight 0.0 = "only log it": the objective is the loss itself (not loss + 0 * inf = NaN)."""
    from jaxformers.training.losses import cross_entropy
    from jaxformers.training.steps import loss_with_aux
    module = _InfSower()
    batch = {"tokens": jnp.asarray([[1, 3, 5, 7, 9]], jnp.int32)}
    params = module.init(jax.random.PRNGKey(0), batch["tokens"][:, :-1])["params"]
    total, m = loss_with_aux(module, cross_entropy, params, batch, None, (("probe", 0.0),))
    assert np.isfinite(float(total)) and float(total) == float(m["loss"]) == float(m["total_loss"])
    assert float(m["aux/probe"]) == np.inf


# ----------------------------------------------------------------------------- train / eval step
class _LM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        return nn.Embed(32, 32)(tokens)


def test_grad_accum_step_whose_micro_batches_have_no_targets_changes_nothing():
    """Every micro-batch without targets: the update is zero (sum of nothing / 1), not 0 / 0 = NaN."""
    from jaxformers.training import cross_entropy, train_step
    module = _LM()
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    batch = {"tokens": jnp.asarray(np.arange(20).reshape(4, 5) % 32, jnp.int32),
             "loss_mask": jnp.zeros((4, 5), jnp.float32)}
    tx = optax.sgd(1.0)
    new, _, m = train_step(module, tx, cross_entropy, params, tx.init(params), batch, 0, None, grad_accum=2)
    np.testing.assert_array_equal(new["Embed_0"]["embedding"], params["Embed_0"]["embedding"])
    assert float(m["grad_norm"]) == 0.0 and float(m["n_targets"]) == 0.0 and float(m["loss"]) == 0.0


def test_eval_step_counts_the_loss_functions_own_n_targets():
    """``n`` is the loss's ``n_targets`` metric when it has one (a loss may count other targets than
    the next-token weights, e.g. landmark or distillation losses); the next-token weights only
    when it has none."""
    from jaxformers.training import eval_step

    def five(module, params, batch, rng):
        return jnp.asarray(2.0), {"n_targets": jnp.asarray(5.0)}

    batch = {"tokens": jnp.zeros((2, 4), jnp.int32)}  # 6 next-token targets
    total, n = eval_step(None, five, {}, batch)
    assert (float(total), float(n)) == (10.0, 5.0)


class _DropLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        return nn.Dropout(0.5, deterministic=False)(nn.Embed(32, 32)(tokens))


def test_apply_model_passes_rng_as_the_dropout_rng():
    module = _DropLM()
    batch = {"tokens": jnp.asarray(np.arange(10).reshape(2, 5), jnp.int32)}
    params = module.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                         batch["tokens"][:, :-1])["params"]
    a, _ = apply_model(module, params, batch, jax.random.PRNGKey(1))
    b, _ = apply_model(module, params, batch, jax.random.PRNGKey(2))
    want = module.apply({"params": params}, batch["tokens"][:, :-1], rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(a, want)
    assert not np.array_equal(a, b)


# ----------------------------------------------------------------------------- Program checks
def test_program_without_optimizer_refuses_to_train(eval_program):
    prog, params = eval_program
    with pytest.raises(ValueError, match="no optimizer .* can only evaluate"):
        prog.compile_train_step({"tokens": np.zeros((2, 9), np.int32)})
    with pytest.raises(ValueError, match="no optimizer .* can only evaluate"):
        prog.init_opt_state(params)


def test_check_params_refuses_another_tree_or_other_shapes(eval_program):
    prog, params = eval_program
    prog.check_params(params)
    host = jax.tree.map(np.asarray, params)
    flat = jax.tree_util.tree_leaves_with_path(host)
    path0 = jax.tree_util.keystr(flat[0][0])
    leaves = [np.zeros((1,) + a.shape, a.dtype) if i == 0 else a for i, (_, a) in enumerate(flat)]
    wrong_shape = jax.tree.unflatten(jax.tree.structure(host), leaves)
    with pytest.raises(ValueError, match=r"init params have the wrong shapes: " + __import__("re").escape(path0)):
        prog.check_params(wrong_shape, "init params")
    with pytest.raises(ValueError, match="do not match the model's parameter tree"):
        prog.check_params({"extra": host})


def test_compute_config_replaces_the_dtypes():
    """The trainer computes in TrainConfig.dtype with float32 parameters, whatever the model config says."""
    c = compute_config(_tiny(dtype="float32", param_dtype="bfloat16"), "bfloat16")
    assert (c.dtype, c.param_dtype) == ("bfloat16", "float32")


def test_model_inputs_pass_positions_and_segment_ids_input_side():
    from jaxformers.training.losses import model_inputs
    tokens = np.array([[5, -100, 7, 8]], np.int32)
    seg = np.array([[1, 1, 2, 2]], np.int32)
    pos = np.array([[0, 1, 0, 1]], np.int32)
    x, kw = model_inputs({"tokens": tokens, "segment_ids": seg, "positions": pos, "domain": np.zeros(1)})
    np.testing.assert_array_equal(x, [[5, 0, 7]])  # padding read as id 0
    assert sorted(kw) == ["positions", "segment_ids"]
    np.testing.assert_array_equal(kw["positions"], [[0, 1, 0]])
    np.testing.assert_array_equal(kw["segment_ids"], [[1, 1, 2]])
    assert model_inputs({"tokens": tokens, "positions": None})[1] == {}


def test_a_batch_without_2d_tokens_is_a_value_error_naming_the_shape():
    from jaxformers.training.losses import model_inputs, next_token_targets
    for fn in (next_token_targets, model_inputs):
        with pytest.raises(ValueError, match=r"tokens must be \[B, T\+1\], got shape \(9,\)"):
            fn({"tokens": jnp.zeros((9,), jnp.int32)})
        with pytest.raises(ValueError, match=r"must have a 'tokens' array \[B, T\+1\]; got keys \['x'\]"):
            fn({"x": jnp.zeros((2, 9), jnp.int32)})


def test_program_train_step_uses_its_grad_accum_and_aux_weights():
    """The compiled step splits the batch into ``grad_accum`` micro-batches (the loss sees B / A rows)
    and weighs the auxiliary losses with the Program's ``aux_weights``."""
    from jaxformers.training import cross_entropy
    seen = []

    def recording(module, params, batch, rng):
        seen.append(tuple(batch["tokens"].shape))
        return cross_entropy(module, params, batch, rng)

    prog = Program(_Sower(), make_mesh("data=1"), loss_fn=recording, tx=optax.sgd(0.0), grad_accum=2,
                   aux_weights={"toy": 0.0, "other": 3.0})
    params, opt = prog.init(0)
    tokens = np.arange(20, dtype=np.int32).reshape(4, 5) % 32
    _, _, m = prog.train_step(params, opt, prog.put_batch({"tokens": tokens}, 4), 0, jax.random.PRNGKey(0))
    assert seen and set(seen) == {(2, 5)}
    assert float(m["aux/other"]) == pytest.approx(1.0) and float(m["aux/toy"]) > 1.0
    assert float(m["total_loss"]) == pytest.approx(float(m["loss"]) + 3.0, rel=1e-6)
