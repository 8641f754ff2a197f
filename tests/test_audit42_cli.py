"""Audit 42, command-line entry points: bad paths and conflicting flags end in an error naming
the option (exit code 2), never a traceback, a destroyed run or a literal "~" folder."""
import json

import jax
import pytest

import jaxformers as jf
from jaxformers.data.tokenizer import get_tokenizer


def _fake_run(tmp_path, monkeypatch, name="run"):
    """A run directory (config.json + byte tokenizer) whose ``load_run`` is patched to a tiny
    llama; returns (run dir, config)."""
    import jaxformers.training as training
    from jaxformers.training.rundir import TOKENIZER_DIR

    tok = get_tokenizer("byte")
    config = jf.get_config("llama", "tiny", vocab_size=tok.vocab_size, n_head=4, n_kv_head=2)
    run = tmp_path / name
    tok.save(run / TOKENIZER_DIR)
    (run / "config.json").write_text(json.dumps({"model": {"model": "llama"}, "train": {}}))
    params = jf.init_params(jf.build(config), jax.random.PRNGKey(0))
    monkeypatch.setattr(training, "load_run", lambda r, step=None, **kw: (config, None, params))
    return run, config


def test_export_refuses_out_equal_to_the_run_even_with_force(tmp_path, monkeypatch, capsys):
    from experiments import export

    run, _ = _fake_run(tmp_path, monkeypatch)
    before = (run / "config.json").read_text()
    rc = export.main(["--run", str(run), "--out", str(run), "--force"])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "run directory" in err
    assert (run / "config.json").read_text() == before  # the run's config is intact
    assert not (run / "model.safetensors").exists()


def test_export_expands_tilde_in_out_and_run(tmp_path, monkeypatch, capsys):
    from experiments import export

    _fake_run(tmp_path, monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc = export.main(["--run", "~/run", "--out", "~/hf"])
    io = capsys.readouterr()
    assert rc == 0, io.err
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert not (cwd / "~").exists()  # no literal "~" folder in the working directory
    assert json.loads(io.out)["tokenizer"] == "byte"


def test_generate_reads_a_tilde_hf_checkpoint(tmp_path, monkeypatch, capsys):
    pytest.importorskip("safetensors")
    from experiments import export, generate

    run, _ = _fake_run(tmp_path, monkeypatch)
    assert export.main(["--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    monkeypatch.setenv("HOME", str(tmp_path))
    capsys.readouterr()
    rc = generate.main(["--run", "~/hf", "--prompt", "ab", "--max-new-tokens", "2", "--temperature", "0",
                        "--json"])
    io = capsys.readouterr()
    assert rc == 0, io.err  # was: "a Hugging Face checkpoint without a tokenizer.json"
    assert json.loads(io.out)["prompt"] == "ab"


def test_prepare_unwritable_out_is_an_error_not_a_traceback(tmp_path, capsys):
    from experiments import prepare

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, the quick brown fox\n" * 20)
    rc = prepare.main(["--data", str(corpus), "--out", str(tmp_path / ("x" * 300))])  # name too long
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:")


@pytest.mark.parametrize("extra", [["--model", "llama"], ["--seq-len", "64"]])
def test_info_fields_refuses_flags_it_would_ignore(extra, capsys):
    from experiments import info

    with pytest.raises(SystemExit) as e:
        info.main(["--fields", "gpt", *extra])
    assert e.value.code == 2
    assert "--fields excludes " + extra[0] in capsys.readouterr().err


def test_export_out_under_a_file_is_an_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    from experiments import export

    run, _ = _fake_run(tmp_path, monkeypatch)
    (tmp_path / "f.txt").write_text("x")
    rc = export.main(["--run", str(run), "--out", str(tmp_path / "f.txt" / "hf")])  # NotADirectoryError
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "f.txt" in err


def test_evaluate_unreadable_run_path_is_an_error_not_a_traceback(tmp_path, capsys):
    from experiments import evaluate

    rc = evaluate.main(["--run", str(tmp_path / ("x" * 300))])  # ENAMETOOLONG
    assert rc == 2 and capsys.readouterr().err.startswith("error:")
