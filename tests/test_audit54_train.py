"""Audit 54 (training loop): regression tests for the bugs this audit fixed."""
import json

import pytest

import jaxformers as jf
from jaxformers.training import TrainConfig


# ----------------------------------------------------------------------------- CLI: warmup flags
def _build(argv):
    from experiments.train import _parser, build_configs
    return build_configs(_parser().parse_args(argv))


def test_warmup_fraction_flag_overrides_a_config_files_warmup_steps(tmp_path):
    """--warmup-fraction 0.5 over a --config file with warmup_steps: 10 was silently ignored
    (TrainConfig lets warmup_steps win: warmup stayed 10 of 100 steps); flags take precedence."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: gpt\npreset: tiny\ntrain:\n  steps: 100\n  warmup_steps: 10\n"
                   "  data: synthetic:copying\n")
    out = str(tmp_path / "out")
    _, tc = _build(["--config", str(cfg), "--warmup-fraction", "0.5", "--out", out])
    assert (tc.warmup_steps, tc.warmup_fraction, tc.warmup) == (None, 0.5, 50)
    _, tc = _build(["--config", str(cfg), "--train-set", "warmup_fraction=0.2", "--out", out])
    assert tc.warmup == 20
    _, tc = _build(["--config", str(cfg), "--out", out])  # no flag: the file's warmup_steps
    assert tc.warmup == 10


def test_warmup_fraction_flag_overrides_a_resumed_runs_warmup_steps(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    saved = {"model": jf.get_config("gpt", "tiny", vocab_size=300).to_dict(),
             "train": TrainConfig(steps=100, warmup_steps=10, data="synthetic:copying", out_dir=str(out)).to_dict()}
    (out / "config.json").write_text(json.dumps(saved))
    _, tc = _build(["--out", str(out), "--resume", "--warmup-fraction", "0.3"])
    assert tc.warmup == 30
    _, tc = _build(["--out", str(out), "--resume"])
    assert tc.warmup == 10


def test_both_warmup_flags_are_refused_naming_them(tmp_path):
    from experiments.train import CLIError
    with pytest.raises(CLIError, match="--warmup-steps.*--warmup-fraction"):
        _build(["--warmup-steps", "5", "--warmup-fraction", "0.5", "--data", "synthetic:copying",
                "--out", str(tmp_path / "o")])


# ----------------------------------------------------------------------------- train(progress=...)
@pytest.mark.parametrize("bad", [1, 0, "yes", "bar"])
def test_train_progress_that_is_not_none_or_a_bool_is_a_value_error_naming_it(bad, tmp_path):
    """progress=1 (or any value but None / True / False) showed nothing at all (the bar needs
    ``True``, the lines ``None``): now a ValueError naming progress, raised before any work."""
    from jaxformers.training import train
    tc = TrainConfig(steps=1, batch_size=2, seq_len=8, data="synthetic:copying", out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="progress"):
        train(jf.get_config("gpt", "tiny", vocab_size=300), tc, progress=bad)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["resume", "allow_lr_jump"])
@pytest.mark.parametrize("bad", ["no", "False", None, 1])
def test_train_resume_and_allow_lr_jump_must_be_bools(name, bad, tmp_path):
    """resume="no" / "False" (a string from a job script) resumed, being truthy: now a ValueError
    naming the argument, before the run directory is touched."""
    from jaxformers.training import train
    tc = TrainConfig(steps=1, batch_size=2, seq_len=8, data="synthetic:copying", out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=name):
        train(jf.get_config("gpt", "tiny", vocab_size=300), tc, progress=False, **{name: bad})
    assert not (tmp_path / "o").exists()
