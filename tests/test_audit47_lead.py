"""Audit 47 (lead): limits earlier stops noticed and left alone, now refused with a ``ValueError``
naming the argument: an ``eos_id`` that ``vocab_limit`` can never let be sampled, and a
``Checkpointer`` given a ``keep`` below 1 or a step that is not a non-negative int."""
import jax
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.registry import build, get_config
from jaxformers.training.checkpoint import Checkpointer


@pytest.fixture(scope="module")
def gpt():
    module = build(get_config("gpt", "tiny", d_model=16, n_head=2, n_layer=1, vocab_size=32))
    return module, {"params": jf.init_params(module, jax.random.PRNGKey(0))}


@pytest.mark.parametrize("eos_id", [20, 31])
def test_eos_id_at_or_above_vocab_limit_is_refused(gpt, eos_id):
    """Ids >= vocab_limit are never sampled: such an eos_id could never finish a row (it was
    accepted, and decoding silently never stopped early)."""
    module, params = gpt
    with pytest.raises(ValueError, match=r"eos_id must be None or an id < vocab_limit=20"):
        jf.generate(module, params, np.array([[1, 2]]), 3, temperature=0.0, vocab_limit=20, eos_id=eos_id)


def test_eos_id_below_vocab_limit_still_stops_a_row(gpt):
    module, params = gpt
    free = np.asarray(jf.generate(module, params, np.array([[1, 2]]), 4, temperature=0.0, vocab_limit=20))
    eos = int(free[0, 2])  # the first greedy token: with it as eos the row finishes at once
    out = np.asarray(jf.generate(module, params, np.array([[1, 2]]), 4, temperature=0.0, vocab_limit=20,
                                 eos_id=eos, pad_id=0))
    assert out[0, 2] == eos and (out[0, 3:] == 0).all()


@pytest.mark.parametrize("keep", [0, -1, 1.5, True, "2"])
def test_checkpointer_keep_must_be_a_positive_int(tmp_path, keep):
    """keep=0 (or negative) used to keep every checkpoint; 1.5 was read as 1."""
    with pytest.raises(ValueError, match="Checkpointer: keep must be"):
        Checkpointer(tmp_path, keep=keep)


@pytest.mark.parametrize("step", [-1, 5.5, True, "3"])
def test_checkpointer_save_step_must_be_a_non_negative_int(tmp_path, step):
    """A float step 5.5 was saved as step 5; a negative step made a folder step_dirs never lists."""
    ckpt = Checkpointer(tmp_path, async_save=False)
    with pytest.raises(ValueError, match="Checkpointer.save: step must be"):
        ckpt.save(step, {"w": np.zeros(2, np.float32)}, {}, {})
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    ckpt.close()


def test_stop_request_restores_a_handler_python_cannot_name(monkeypatch):
    """signal.signal returns None for a handler installed outside Python (an embedding
    interpreter); restore() passed that None back and raised TypeError at the end of training."""
    import signal

    from jaxformers.training import trainer

    calls = []

    def fake_signal(sig, handler):
        calls.append((sig, handler))
        if handler is None:
            raise TypeError("signal handler must be signal.SIG_IGN, signal.SIG_DFL, or a callable object")
        return None  # "the previous handler was not installed from Python"

    monkeypatch.setattr(trainer.signal, "signal", fake_signal)
    stop = trainer._StopRequest()
    stop.restore()
    assert calls[2:] == [(signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.SIG_DFL)]


def test_stratified_with_unequal_weights_is_refused_when_the_spec_is_parsed(monkeypatch):
    """It was refused only once the loader was built, after every domain had been loaded."""
    from jaxformers.data import domains

    monkeypatch.setattr(domains, "build_domains", lambda *a, **k: pytest.fail("domains were loaded"))
    with pytest.raises(ValueError, match="sample=stratified takes one equal share"):
        domains.parse_domains_spec("domains:comedies@2,python:sample=stratified")
    with pytest.raises(ValueError, match="sample=stratified takes one equal share"):
        domains.DomainSource("domains:comedies@2,python:sample=stratified")
    spec = domains.parse_domains_spec("domains:comedies@2,python@2:sample=stratified")  # equal: fine
    assert spec.weights == (0.5, 0.5)


def test_doge_weight_history_names_a_bad_kind(tmp_path):
    """kind='bogus' was reported as "not a DoGE proxy run" (a run that is one)."""
    import json

    from jaxformers.training.doge import doge_weight_history

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "doge/weight/a": 0.5, "doge/weight/b": 0.5}) + "\n")
    with pytest.raises(ValueError, match=r"kind must be one of \['weight', 'avg_weight', 'score', 'grad_norm'\]"):
        doge_weight_history(tmp_path, "bogus")
    assert doge_weight_history(tmp_path, "weight") == ([1], {"a": [0.5], "b": [0.5]})


def test_evaluate_a_domains_run_in_another_batch_size_reads_the_runs_rows(tmp_path):
    """evaluate(max_batches=-1) converted the run's eval_batches into batches of the new size and
    then split those over the domains: at batch_size 1, 16 rows over 3 domains gave each domain
    5 rows where the run had evaluated 4 (and a batch size not dividing the run's read more)."""
    import json

    from jaxformers.training import TrainConfig, evaluate, train

    data = "domains:a=noise,b=noise@2,c=noise:max_bytes=3000"
    tc = TrainConfig(out_dir=str(tmp_path / "run"), data=data, steps=1, batch_size=4, seq_len=16,
                     eval_batches=4, eval_every=1, warmup_steps=0)
    summary = train(get_config("gpt", "tiny", d_model=16, n_head=2, n_layer=1, vocab_size=264), tc,
                    progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    run_eval = [r for r in logged if "val_loss/a" in r][-1]
    for bs in (4, 1, 3):
        ev = evaluate(str(tmp_path / "run"), batch_size=bs)
        assert ev["val_tokens"] == 3 * 4 * 16, bs  # 4 rows of 16 targets per domain, as the run
        assert ev["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5), bs
        for name in "abc":
            assert ev[f"val_loss/{name}"] == pytest.approx(run_eval[f"val_loss/{name}"], rel=1e-5), (bs, name)
