"""Audit 43 (README walk-through): `--config RUN/run.yaml --extend-steps N` without --out."""
import json

import numpy as np
import pytest

from experiments import train as train_cli

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
TINY = ["--set", "d_model=32", "--set", "n_layer=1", "--set", "max_seq_len=32", "--batch-size", "4",
        "--seq-len", "32", "--eval-every", "0", "--eval-batches", "1", "--checkpoint-every", "0",
        "--no-compile-cache", "--no-tensorboard", "--quiet"]


@pytest.fixture()
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    data = tmp_path / "my.txt"
    data.write_text(" ".join(rng.choice(WORDS, size=2000)) + ".\n")
    out = tmp_path / "run"
    assert train_cli.main(["--data", str(data), "--steps", "2", "--out", str(out)] + TINY) == 0
    return out


def test_extend_steps_with_a_run_yaml_and_no_out_extends_that_run(run, capsys):
    # --resume with the same --config and no --out resumes the run the file names; --extend-steps
    # used to stop with "--extend-steps needs --out ... (no config.json in None)"
    capsys.readouterr()
    assert train_cli.main(["--config", str(run / "run.yaml"), "--extend-steps", "1", "--quiet",
                           "--no-compile-cache"]) == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_step"] == 3 and summary["trained_steps"] == 1


def test_extend_steps_without_a_run_directory_names_what_is_missing(tmp_path, capsys):
    cfg = tmp_path / "my_run.yaml"
    cfg.write_text("model: gpt\npreset: tiny\ntrain: {steps: 10}\n")
    assert train_cli.main(["--config", str(cfg), "--extend-steps", "1", "--no-compile-cache"]) == 2
    err = capsys.readouterr().err
    assert "--extend-steps needs --out" in err and "None" not in err


def test_evaluate_out_of_memory_is_one_line_naming_the_flags(tmp_path, monkeypatch, capsys):
    """``evaluate --run RUN --seq-len 8192`` on a CPU ran out of memory (full attention scores)
    with a long XLA traceback; it is now one line naming --batch-size / --seq-len, exit 2."""
    import jaxformers.training as training
    from experiments import evaluate

    def oom(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 84.00GiB.\nmore")

    monkeypatch.setattr(training, "evaluate", oom)
    assert evaluate.main(["--run", str(tmp_path), "--seq-len", "8192", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: out of memory")
    assert "--batch-size 4 x --seq-len 8192" in err and "84.00GiB" in err and "--memory-chunk" in err

    def bug(*a, **k):
        raise RuntimeError("some other failure")  # not an expected one: the traceback stays

    monkeypatch.setattr(training, "evaluate", bug)
    import pytest
    with pytest.raises(RuntimeError, match="other failure"):
        evaluate.main(["--run", str(tmp_path)])


def test_info_fields_shows_the_out_dir_experiments_train_uses():
    """``info --fields`` listed TrainConfig's library default ``runs/default`` for out_dir, while
    ``experiments.train`` writes to ``runs/<model>-<preset>``; every other listed default is the
    one experiments.train uses."""
    from experiments.info import field_rows
    from experiments.train import DEFAULTS

    rows = {r["field"]: r["default"] for r in field_rows() if r["config"].startswith("TrainConfig")}
    assert rows["out_dir"] == "runs/<model>-<preset>"
    for name, value in DEFAULTS.items():
        if name in rows:
            assert rows[name] == value, name


def test_bpe_on_a_small_text_warns_that_it_is_smaller_than_asked():
    """``--tokenizer bpe:8192`` on a 31 KB file silently gave a vocabulary of ~340."""
    import pytest

    from jaxformers.data.tokenizer import BPETokenizer

    with pytest.warns(UserWarning, match=r"bpe:8192: the text gives only \d+ tokens"):
        tok = BPETokenizer(8192).train(["hello world hello there"] * 3)
    assert tok.vocab_size < 8192


def test_evaluate_errors_are_not_taken_for_out_of_memory(tmp_path, capsys):
    """A run directory whose path holds the word "oom" (``runs/oom``) had its 'not a run
    directory' error replaced by out-of-memory advice."""
    from experiments import evaluate

    run = tmp_path / "oom"
    run.mkdir()
    assert evaluate.main(["--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "out of memory" not in err and "oom" in err
