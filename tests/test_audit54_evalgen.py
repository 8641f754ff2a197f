"""Audit 54, evaluation and generation: evaluation batches padded with rows of weight 0 refuse a
loss that ignores ``loss_mask`` (those rows would count in its perplexity)."""
import numpy as np
import pytest


# the losses and the model of stop 53's strided-evaluation tests (test_audit53_data)
from test_audit53_data import _ce_without_count as _ce_no_count  # noqa: E402
from test_audit53_data import _ce_without_mask as _ce_ignoring_mask  # noqa: E402
from test_audit53_data import _ce_without_mask_or_count as _ce_ignoring_mask_no_count  # noqa: E402
from test_audit53_data import tiny_model  # noqa: E402,F401  (a fixture)


@pytest.mark.parametrize("loss_fn, why", [(_ce_ignoring_mask, "still counts in its n_targets"),
                                          (_ce_ignoring_mask_no_count, "still changes its value")])
def test_padded_evaluation_batch_refuses_a_loss_that_ignores_loss_mask(tiny_model, loss_fn, why):
    from jaxformers.training import evaluate
    cfg, params, tokens = tiny_model
    # batch_size=5: the last of the 24 windows' batches has 4 rows and 1 padding row of weight 0;
    # the old code counted it (val_loss 4.172 with 400 targets instead of 4.197 with 384)
    with pytest.raises(ValueError, match=rf"loss '.*{loss_fn.__name__}' ignores loss_mask: .*{why}.*"
                                         r"batch_size=5 .* 24 evaluation windows.* 4 rows"):
        evaluate((cfg, params), tokens, batch_size=5, seq_len=16, max_batches=None, loss_fn=loss_fn)
    # full batches: nothing weighs 0, the same loss evaluates to the cross-entropy
    ref = evaluate((cfg, params), tokens, batch_size=2, seq_len=16, max_batches=None)
    got = evaluate((cfg, params), tokens, batch_size=2, seq_len=16, max_batches=None, loss_fn=loss_fn)
    assert got["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6) and got["val_tokens"] == 384


def test_padded_evaluation_batch_with_a_loss_that_honours_loss_mask(tiny_model):
    from jaxformers.training import evaluate
    cfg, params, tokens = tiny_model
    ref = evaluate((cfg, params), tokens, batch_size=2, seq_len=16, max_batches=None)
    for bs in (5, 7):
        got = evaluate((cfg, params), tokens, batch_size=bs, seq_len=16, max_batches=None, loss_fn=_ce_no_count)
        assert got["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5) and got["val_tokens"] == 384


def test_run_eval_windows_in_other_batches_refuse_a_loss_that_ignores_loss_mask(tiny_model):
    """``unit_rows`` (a run's evaluation read with another batch size): the last batch's rows past
    the run's windows weigh 0 through ``loss_mask`` only."""
    from jaxformers.data import open_data
    from jaxformers.training import make_mesh
    from jaxformers.training.trainer import eval_loss, eval_program
    cfg, params, tokens = tiny_model
    source, mesh = open_data(tokens, "byte"), make_mesh(None)
    ref = eval_loss(eval_program(cfg, mesh, "float32", _ce_no_count), params, source, 2, 16, 3, unit_rows=2)
    assert ref["val_tokens"] == 6 * 16
    got = eval_loss(eval_program(cfg, mesh, "float32", _ce_no_count), params, source, 5, 16, 3, unit_rows=2)
    assert got["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5) and got["val_tokens"] == 96
    with pytest.raises(ValueError, match=r"ignores loss_mask: .*6 evaluation windows"):
        eval_loss(eval_program(cfg, mesh, "float32", _ce_ignoring_mask), params, source, 5, 16, 3, unit_rows=2)


def test_generate_names_params_given_as_a_bare_parameter_tree(tiny_model):
    """``jf.init_params`` returns the bare tree (which ``evaluate`` takes); ``generate`` takes the
    variables dict: the bare tree was a flax ScopeCollectionNotFound from inside the prefill."""
    import jaxformers as jf
    cfg, params, _ = tiny_model
    module = jf.build(cfg)
    prompt = np.array([[1, 2, 3]], np.int32)
    with pytest.raises(ValueError, match=r"params must be the variables dict .*keys \['blocks_0', 'embed'.*"
                                         r"pass \{'params': params\}"):
        jf.generate(module, params, prompt, 2, temperature=0.0)
    with pytest.raises(ValueError, match=r"params must be the variables dict .*got list"):
        jf.generate(module, [params], prompt, 2, temperature=0.0)
    out = np.asarray(jf.generate(module, {"params": params}, prompt, 2, temperature=0.0))
    assert out.shape == (1, 5) and out[0, :3].tolist() == [1, 2, 3]


def test_padded_synthetic_evaluation_with_its_own_loss_mask():
    """A synthetic task's loss_mask already zeroes targets (the last column among them): the padding
    check must not take its cross-entropy for a loss that ignores loss_mask."""
    import jax

    import jaxformers as jf
    from jaxformers.data import open_data
    from jaxformers.training import evaluate
    src = open_data("synthetic:copying", None)
    cfg = jf.get_config("gpt", "tiny", vocab_size=src.vocab_size, d_model=32, n_layer=1, n_head=4, max_seq_len=32)
    params = jax.jit(lambda r: jf.init_params(jf.build(cfg), r))(jax.random.PRNGKey(0))
    ref = evaluate((cfg, params), "synthetic:copying", batch_size=8, seq_len=32, max_batches=None)
    got = evaluate((cfg, params), "synthetic:copying", batch_size=7, seq_len=32, max_batches=None)  # 256 rows
    assert got["val_tokens"] == ref["val_tokens"] and got["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
    with pytest.raises(ValueError, match=r"ignores loss_mask: .*256 evaluation windows"):
        evaluate((cfg, params), "synthetic:copying", batch_size=7, seq_len=32, max_batches=None,
                 loss_fn=_ce_ignoring_mask)


def test_evaluate_names_a_loss_fn_that_is_not_callable(tiny_model):
    """It was a TypeError ("'int' object is not callable") from inside the compiled step."""
    from jaxformers.training import evaluate
    cfg, params, tokens = tiny_model
    with pytest.raises(ValueError, match=r"loss_fn must be callable \(module, params, batch, rng\) -> "
                                         r"\(loss, metrics\), got int"):
        evaluate((cfg, params), tokens, batch_size=2, seq_len=16, max_batches=None, loss_fn=5)


def test_evaluate_a_run_on_an_array_of_token_ids(tiny_model, monkeypatch):
    """``data`` as a 1-D array of ids (documented) with a run directory: comparing it with the run's
    data spec (``data != tc.data``) was numpy's "truth value of an array ... is ambiguous"."""
    import jaxformers.training.trainer as trainer
    from jaxformers.training import TrainConfig, evaluate
    cfg, params, tokens = tiny_model
    tc = TrainConfig(data="synthetic:copying", seq_len=16, batch_size=2, steps=1)
    monkeypatch.setattr(trainer, "load_run", lambda run, **kw: (cfg, tc, params))
    got = evaluate("a-run", tokens, batch_size=2)
    ref = evaluate((cfg, params), tokens, batch_size=2, seq_len=16, max_batches=None)
    assert got["val_tokens"] == ref["val_tokens"] == 384 and got["val_loss"] == pytest.approx(ref["val_loss"])


def test_training_refuses_a_loss_that_would_count_padding_rows_before_its_first_step(tmp_path):
    """The run's evaluation has a padded last batch (256 synthetic val rows in batches of 3): a loss
    that ignores loss_mask is refused before training (it was refused only at the first evaluation,
    after eval_every steps); a loss that honours it trains."""
    import jaxformers as jf
    from jaxformers.data import open_data
    from jaxformers.training import TrainConfig, train
    src = open_data("synthetic:copying", None)
    cfg = jf.get_config("gpt", "tiny", vocab_size=src.vocab_size, d_model=32, n_layer=1, n_head=4, max_seq_len=32)
    calls = []

    def counting(module, params, batch, rng=None):
        calls.append(1)
        return _ce_ignoring_mask(module, params, batch, rng)

    tc = TrainConfig(data="synthetic:copying", steps=2, batch_size=3, seq_len=32, out_dir=str(tmp_path / "a"),
                     eval_every=1, eval_batches=100, checkpoint_every=0, log_every=1)
    with pytest.raises(ValueError, match=r"ignores loss_mask: .*batch_size=3 the last of the 256 evaluation"):
        train(cfg, tc, progress=False, loss_fn=counting)
    traced = len(calls)  # the evaluation step's trace; no training step was traced or run
    assert traced <= 1 and not (tmp_path / "a" / "metrics.jsonl").exists()
    summary = train(cfg, tc.replace(out_dir=str(tmp_path / "b")), progress=False, loss_fn=_ce_no_count)
    assert summary["val_loss"] is not None
