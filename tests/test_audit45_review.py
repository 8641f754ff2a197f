"""Regression tests for the review of stop 45's changes."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import jaxformers as jf
from jaxformers.training import TrainConfig


def test_resume_from_a_run_yaml_written_before_weight_decay_groups(tmp_path):
    """``--config RUN/run.yaml --resume`` on a CoTFormer run saved before the field existed keeps
    the run's groups ("shape"), instead of today's family default (refused as another config)."""
    from experiments import train as train_cli
    from jaxformers.training.rundir import CONFIG_FILE

    run = tmp_path / "run"
    run.mkdir()
    model = jf.get_config("cotformer", "tiny", vocab_size=64).to_dict()
    del model["weight_decay_groups"]
    tc = TrainConfig(steps=4, batch_size=2, seq_len=16, data="synthetic:copying", out_dir=str(run)).to_dict()
    (run / CONFIG_FILE).write_text(json.dumps({"model": model, "train": tc}))
    overrides = {k: v for k, v in model.items() if k != "model"}
    (run / "run.yaml").write_text(yaml.safe_dump({"model": "cotformer", "overrides": overrides, "train": tc}))
    args = train_cli._parser().parse_args(["--config", str(run / "run.yaml"), "--resume", "--out", str(run)])
    model_config, _ = train_cli.build_configs(args)
    assert model_config.weight_decay_groups == "shape"
    # a new run from the same file (no saved run): the family's default
    args = train_cli._parser().parse_args(["--config", str(run / "run.yaml"), "--out", str(tmp_path / "new")])
    assert train_cli.build_configs(args)[0].weight_decay_groups == "nanogpt"


def test_finiteness_check_ignores_a_scalar_inf_in_the_optimizer_state():
    from jaxformers.training.trainer import _all_finite

    params = {"w": jnp.ones((2, 2))}
    assert bool(_all_finite(params, {"best_value": jnp.float32(jnp.inf), "count": jnp.int32(3)}))
    assert not bool(_all_finite(params, {"nu": {"w": jnp.full((2, 2), jnp.inf)}}))
    assert not bool(_all_finite({"w": jnp.array([1.0, jnp.nan])}, ()))


def test_from_tokens_refuses_negative_ids():
    from jaxformers.data.sources import TextSource

    with pytest.raises(ValueError, match="tokens must be ids in \\[0, vocab_size=8\\)"):
        TextSource.from_tokens(np.array([0, -1, 3]), vocab_size=8)


def test_dataset_changes_compares_local_paths_as_absolute(tmp_path, monkeypatch):
    from jaxformers.training.rundir import dataset_changes

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello world\n")
    monkeypatch.chdir(tmp_path)
    saved = {"dataset": {"source": "corpus", "vocab_size": 257}}
    assert dataset_changes(saved, {"source": str(tmp_path / "corpus"), "vocab_size": 257}) == []
    assert dataset_changes(saved, {"source": "shakespeare", "vocab_size": 257}) != []


def test_copy_tokenizer_keeps_the_previous_one_when_it_cannot_be_put_back(tmp_path, monkeypatch):
    import os

    from jaxformers.data import get_tokenizer
    from jaxformers.training import rundir

    run = tmp_path / "run"
    run.mkdir()
    rundir.copy_tokenizer(run, None, get_tokenizer("byte"))
    before = sorted(p.name for p in (run / "tokenizer").iterdir())
    real = os.rename
    calls = []

    def rename(a, b):
        calls.append((str(a), str(b)))
        if len(calls) >= 2:  # the new one into place, then the restore of the old one: both fail
            raise OSError("disk gone")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    rundir.copy_tokenizer(run, None, get_tokenizer("byte"))
    monkeypatch.setattr(os, "rename", real)
    kept = [p for p in run.iterdir() if p.name.startswith(".tokenizer.old-")]
    assert len(kept) == 1 and sorted(p.name for p in (kept[0] / "tokenizer").iterdir()) == before
