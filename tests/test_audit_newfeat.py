"""Audit of the new features (ragged generation, HF export, evaluate / generate on HF dirs):
regression tests for what the audit found."""
import json
import types

import jax
import numpy as np

import jaxformers as jf
from jaxformers.data.tokenizer import get_tokenizer
from jaxformers.training.rundir import TOKENIZER_DIR

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "birds", "sing"]


def _corpus(tmp_path, seed=0):
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(2):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, size=400)) + ".\n")
    return corpus


def _fake_run(tmp_path, tok, config, train_tokenizer):
    """A run directory as far as the evaluate CLI reads it before ``evaluate``: config.json
    (model + train) and the saved tokenizer."""
    run = tmp_path / "run"
    tok.save(run / TOKENIZER_DIR)
    (run / "config.json").write_text(json.dumps({"model": config.to_dict(), "train": {
        "tokenizer": train_tokenizer, "data": "default"}}))
    return run


def _capture_evaluate(monkeypatch):
    from jaxformers import training
    seen = {}

    def fake(run, data=None, **kw):
        seen.update(kw, data=data)
        return {"val_loss": 1.0, "val_ppl": 2.718, "val_tokens": 1}
    monkeypatch.setattr(training, "evaluate", fake)
    return seen


def test_evaluate_run_on_other_data_uses_the_runs_own_bpe_vocabulary(tmp_path, monkeypatch, capsys):
    """A BPE run evaluated on ``--data`` it was not trained on: the text must be encoded with the
    run's saved tokenizer, not with a new ``bpe:N`` trained on that text (other ids for the same
    text: a silently wrong val_loss; measured 5.49 instead of 5.83 on a tiny run)."""
    from experiments import evaluate as eval_cli

    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    tok = get_tokenizer("bpe:300").train([" ".join(WORDS) * 5, "shakespeare ROMEO juliet"] * 20)
    run = _fake_run(tmp_path, tok, jf.get_config("llama", "tiny", vocab_size=320), "bpe:300")
    seen = _capture_evaluate(monkeypatch)
    assert eval_cli.main(["--run", str(run), "--data", str(_corpus(tmp_path))]) == 0, capsys.readouterr().err
    assert seen["tokenizer"] == f"hf:{run / TOKENIZER_DIR}"


def test_evaluate_refuses_a_tokenizer_larger_than_the_models_vocab(tmp_path, monkeypatch, capsys):
    """``--tokenizer bpe:512`` on a byte run (vocab 257) gave val_loss NaN; now a ValueError."""
    from experiments import evaluate as eval_cli

    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    run = _fake_run(tmp_path, get_tokenizer("byte"), jf.get_config("llama", "tiny", vocab_size=257), "byte")
    _capture_evaluate(monkeypatch)
    corpus = str(_corpus(tmp_path))
    capsys.readouterr()
    assert eval_cli.main(["--run", str(run), "--data", corpus, "--tokenizer", "bpe:300"]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer bpe:300" in err and "vocab_size=300" in err and "vocab_size=257" in err
    assert eval_cli.main(["--run", str(run), "--data", corpus]) == 0  # its own (byte) tokenizer


def _mamba_hf_dir(tmp_path, monkeypatch, capsys):
    """An exported HF Mamba-2 directory (no max_position_embeddings: no position limit)."""
    from experiments import export
    from jaxformers import training

    tok = get_tokenizer("byte")
    config = jf.get_config("mamba2", "tiny", vocab_size=tok.vocab_size, max_seq_len=32)
    run = tmp_path / "run"
    tok.save(run / TOKENIZER_DIR)
    params = jf.init_params(jf.build(config), jax.random.PRNGKey(0))
    monkeypatch.setattr(training, "load_run", lambda r, step=None, **kw: (config, None, params))
    out = tmp_path / "hf"
    assert export.main(["--run", str(run), "--out", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    return out, config, params, tok


def test_generate_on_a_hf_mamba_dir_neither_cuts_the_prompt_nor_caps_new_tokens(tmp_path, monkeypatch, capsys):
    """HF Mamba has no max_position_embeddings; the converted config's max_seq_len is a preset's
    (256 for tiny), which cut the prompt to 256 - max_new_tokens ids and refused longer samples."""
    from experiments import generate as gen_cli

    out, _, _, tok = _mamba_hf_dir(tmp_path, monkeypatch, capsys)
    prompt = "the quick brown fox " * 15  # 300 bytes > the preset's 256
    ids = tok.encode(prompt)
    seen = {}

    def fake_generate(module, params, prompt, new, **kw):  # the prompt the CLI samples after
        seen["prompt"] = np.asarray(prompt)
        return np.zeros((prompt.shape[0], prompt.shape[1] + new), np.int32)
    monkeypatch.setattr(jf, "generate", fake_generate)
    assert gen_cli.main(["--run", str(out), "--prompt", prompt, "--max-new-tokens", "300"]) == 0, \
        capsys.readouterr().err
    np.testing.assert_array_equal(seen["prompt"][0], ids)  # whole, not cut to 256 - 300


def test_evaluate_on_a_hf_mamba_dir_defaults_to_1024_tokens(tmp_path, monkeypatch, capsys):
    from experiments import evaluate as eval_cli

    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    out, *_ = _mamba_hf_dir(tmp_path, monkeypatch, capsys)
    seen = _capture_evaluate(monkeypatch)
    assert eval_cli.main(["--run", str(out), "--data", str(_corpus(tmp_path))]) == 0, capsys.readouterr().err
    assert seen["seq_len"] == 1024


def test_export_force_removes_a_stale_tokenizer_and_sharded_index(tmp_path, monkeypatch, capsys):
    """``--force`` over an earlier checkpoint: a run without a tokenizer left the old
    tokenizer.json beside the new model (generate / evaluate then used it), and a stale sharded
    index is read before model.safetensors by ``from_hf``."""
    from experiments import export
    from jaxformers import training
    from jaxformers.convert import from_hf

    config = jf.get_config("llama", "tiny", vocab_size=64)
    params = jf.init_params(jf.build(config), jax.random.PRNGKey(0))
    tc = types.SimpleNamespace(data="synthetic:copying", tokenizer="byte")  # no tokenizer
    monkeypatch.setattr(training, "load_run", lambda r, step=None, **kw: (config, tc, params))
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (out / name).write_text("{}")
    (out / "model-00001-of-00001.safetensors").write_bytes(b"stale")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}))
    (out / "notes.txt").write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    import jaxformers.data as data_mod

    class _NoTok:
        ds_dir = None
    monkeypatch.setattr(data_mod, "open_data", lambda *a, **k: _NoTok())
    capsys.readouterr()
    assert export.main(["--run", str(run), "--out", str(out), "--force"]) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokenizer"] is None
    left = sorted(p.name for p in out.iterdir())
    assert left == ["config.json", "model.safetensors", "notes.txt"], left
    assert set(summary["removed"]) == {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                       "model-00001-of-00001.safetensors", "model.safetensors.index.json"}
    _, back_params = from_hf(str(out))
    np.testing.assert_array_equal(np.asarray(back_params["final_norm"]["scale"]),
                                  np.asarray(params["final_norm"]["scale"]))


def test_export_out_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """It crashed with FileExistsError (a traceback) under --force."""
    from experiments import export
    from jaxformers import training

    config = jf.get_config("llama", "tiny", vocab_size=64)
    params = jf.init_params(jf.build(config), jax.random.PRNGKey(0))
    tc = types.SimpleNamespace(data="synthetic:copying", tokenizer="byte")
    monkeypatch.setattr(training, "load_run", lambda r, step=None, **kw: (config, tc, params))
    target = tmp_path / "file"
    target.write_text("x")
    assert export.main(["--run", str(tmp_path / "run"), "--out", str(target), "--force"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_prompt_file_splits_only_at_line_ends(tmp_path, monkeypatch, capsys):
    """``str.splitlines`` also split a prompt at a form feed or U+2028 inside it (5 prompts here)."""
    from experiments import generate as gen_cli
    from jaxformers import training

    tok = get_tokenizer("byte")
    run = tmp_path / "run"
    tok.save(run / TOKENIZER_DIR)
    config = jf.get_config("gpt", "tiny", vocab_size=tok.vocab_size, max_seq_len=64)
    monkeypatch.setattr(training, "load_run", lambda r, **kw: (config, None, None))
    monkeypatch.setattr(jf, "generate", lambda m, p, prompt, new, **kw: np.zeros(
        (prompt.shape[0], prompt.shape[1] + new), np.int32))
    path = tmp_path / "prompts.txt"
    path.write_bytes("first\u2028still first\nsecond\x0cpage\r\n\n  \nthird\n".encode())
    capsys.readouterr()
    assert gen_cli.main(["--run", str(run), "--prompt-file", str(path), "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == ["first\u2028still first", "second\x0cpage", "third"]


def test_library_evaluate_of_a_bpe_run_on_other_text_uses_the_runs_vocabulary(tmp_path, monkeypatch):
    """``jaxformers.training.evaluate(run_dir, other_data)``: the same fix as the CLI's (the run's
    saved tokenizer, not a new BPE trained on the other text), and a tokenizer with more ids than
    the model has embeddings is refused instead of giving NaN."""
    import pytest
    from jaxformers.training import TrainConfig, evaluate, load_run, train

    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a").mkdir()
    train_corpus = _corpus(tmp_path / "a")
    other = tmp_path / "b"
    other.mkdir()
    (other / "doc.txt").write_text("birds sing while the dog jumps; a quick fox, a lazy dog. " * 40)
    config = jf.get_config("gpt", "tiny", vocab_size=320, d_model=32, n_layer=1, n_head=4, max_seq_len=32)
    run = tmp_path / "run"
    train(config, TrainConfig(steps=2, batch_size=4, seq_len=32, data=str(train_corpus), tokenizer="bpe:300",
                              out_dir=str(run), eval_every=0, eval_batches=1, log_every=1), progress=False)
    cfg, _, params = load_run(run)
    got = evaluate(str(run), str(other), batch_size=4, seq_len=32, max_batches=None)
    want = evaluate((cfg, params), str(other), tokenizer=f"hf:{run / TOKENIZER_DIR}", batch_size=4, seq_len=32,
                    max_batches=None)
    assert got["val_tokens"] == want["val_tokens"] and got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)
    varied = tmp_path / "c"  # enough distinct words for a 400-token BPE
    varied.mkdir()
    rng = np.random.default_rng(1)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9)))
             for _ in range(3000)]
    (varied / "doc.txt").write_text(" ".join(words * 2))
    with pytest.raises(ValueError, match="vocab_size=400, larger than the model's vocab_size=320"):
        evaluate(str(run), str(varied), tokenizer="bpe:400", batch_size=4, seq_len=32)


def test_library_evaluate_of_config_params_with_a_larger_tokenizer_names_it(tmp_path, monkeypatch):
    """(model_config, params) with no run config: the default byte tokenizer (257 ids) on a
    100-id model is a ValueError naming it (the message once read the missing run's tokenizer)."""
    import pytest
    from jaxformers.training import evaluate

    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    cfg = jf.get_config("gpt", "tiny", vocab_size=100, d_model=32, n_layer=1, n_head=4)
    params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="tokenizer='byte' has vocab_size=257, larger than the model's vocab_size=100"):
        evaluate((cfg, params), str(_corpus(tmp_path)), batch_size=2, seq_len=16)
