"""Audit 45 (data follow-ups): run.yaml records a ``domains:`` spec's local sources as absolute
paths (the rest of the spec byte for byte), and equal ``val_fraction`` values of different
numeric types name and are the same prepared dataset."""
import importlib
import os

import numpy as np
import pytest
import yaml

import jaxformers as jf
from jaxformers.data.domains import absolute_source_paths, parse_domains_spec
from jaxformers.training import TrainConfig, rundir

prep = importlib.import_module("jaxformers.data.prepare")


def _corpus(root):
    (root / "texts").mkdir()
    (root / "texts" / "a.txt").write_text("hello world\n" * 50)
    (root / "code.txt").write_text("x = 1\n" * 50)


def test_run_yaml_records_a_domains_specs_local_sources_as_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path)
    spec = ("domains:text=texts@2, code = ./code.txt ,poems,wiki=hf:wikitext@wikitext-2-raw-v1:train@0.5,"
            "n=noise@0,gone=missing_dir:max_bytes=0,sample=weighted")
    model = jf.get_config("gpt", "tiny", vocab_size=257, d_model=32, n_layer=1, n_head=4, max_seq_len=32)
    (tmp_path / "r").mkdir()
    tc = TrainConfig(data=spec, tokenizer="byte", out_dir="/abs/run")
    recorded = yaml.safe_load(rundir.write_run_file(tmp_path / "r", model, tc).read_text())["train"]["data"]
    # only the two local sources change; every other byte is as given
    assert recorded == spec.replace("=texts@", f"={tmp_path / 'texts'}@").replace(
        "= ./code.txt", f"= {tmp_path / 'code.txt'}")
    # from another working directory it names the same files
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    before, after = parse_domains_spec(spec), parse_domains_spec(recorded)
    assert after.sources[:2] == (str(tmp_path / "texts"), str(tmp_path / "code.txt"))
    assert after.sources[2:] == before.sources[2:]
    assert (after.names, after.weights, after.max_bytes, after.sample) == \
        (before.names, before.weights, before.max_bytes, before.sample)
    assert absolute_source_paths(recorded) == recorded  # already absolute: unchanged


def test_domains_specs_without_local_sources_are_kept_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("domains:poems", "domains:poems,python", "domains:a=missing,b=hf:x@1:max_bytes=5",
                 "domains:a=noise,b=shakespeare@0.5", "domains:bad name=x,y=z"):
        assert absolute_source_paths(spec) == spec


def test_a_resume_from_run_yaml_with_a_domains_spec_reports_no_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path)
    saved = {"train": TrainConfig(data="domains:t=texts,c=code.txt").to_dict()}
    same = TrainConfig(data=f"domains:t={tmp_path / 'texts'},c={tmp_path / 'code.txt'}")
    assert rundir.train_config_changes(saved, same) == []


@pytest.mark.parametrize("value", [np.float32(0.1), np.float16(0.1), np.float64(0.1)])
def test_val_fraction_of_another_numeric_type_names_and_is_the_same_dataset(tmp_path, monkeypatch, value):
    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path)
    data = str(tmp_path / "texts")
    assert prep.default_out_dir(data, "byte", value, np.int64(0)) == prep.default_out_dir(data, "byte", 0.1, 0)
    out = prep.prepare(data, val_fraction=0.1)
    stamp = os.stat(out / "meta.json").st_mtime_ns
    assert prep.prepare(data, val_fraction=value, seed=np.int32(0)) == out
    assert os.stat(out / "meta.json").st_mtime_ns == stamp  # reused, not rebuilt


def test_a_float32_default_val_fraction_does_not_rebuild_the_default_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path)
    data = str(tmp_path / "texts")
    out = prep.prepare(data)
    stamp = os.stat(out / "meta.json").st_mtime_ns
    assert prep.default_out_dir(data, "byte", np.float32(0.05)) == out
    assert prep.prepare(data, val_fraction=np.float32(0.05)) == out
    assert os.stat(out / "meta.json").st_mtime_ns == stamp
    assert prep.default_out_dir(data, "byte", 0) == prep.default_out_dir(data, "byte", 0.0)


@pytest.mark.parametrize("bad", [float("nan"), np.float32("inf"), -0.01, 1.0, True, "0.1"])
def test_bad_val_fraction_is_a_value_error_naming_it(tmp_path, bad):
    _corpus(tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        prep.default_out_dir(str(tmp_path / "texts"), "byte", bad)


def test_from_tokens_refuses_a_vocab_size_below_an_id_or_not_an_int():
    from jaxformers.data.sources import TextSource
    assert TextSource.from_tokens(np.arange(10)).vocab_size == 10
    assert TextSource.from_tokens(np.arange(10), vocab_size=np.int64(12)).vocab_size == 12
    with pytest.raises(ValueError, match="vocab_size=4"):
        TextSource.from_tokens(np.arange(10), vocab_size=4)
    for bad in (12.7, 0, True):
        with pytest.raises(ValueError, match="vocab_size"):
            TextSource.from_tokens(np.arange(10), vocab_size=bad)


@pytest.mark.parametrize("task,shortest", [("copying", 4), ("passkey", 104)])
def test_a_synthetic_row_too_short_for_the_task_names_the_seq_len_given(task, shortest):
    from jaxformers.data.loader import SyntheticLoader, synthetic_rows
    with pytest.raises(ValueError, match=rf"seq_len >= {shortest - 1} \(got seq_len=2\)"):
        SyntheticLoader(task, 2, 2, 0, process_index=0, process_count=1)
    assert synthetic_rows(task, 1, shortest, 0)["tokens"].shape == (1, shortest)


def test_a_synthetic_parameter_given_twice_is_refused():
    from jaxformers.data.sources import parse_synthetic_spec
    assert parse_synthetic_spec("synthetic:copying:vocab=32,val_rows=8") == ("copying", {"vocab": 32}, 8)
    for spec in ("synthetic:copying:vocab=32,vocab=64", "synthetic:recall:val_rows=4, val_rows=8"):
        with pytest.raises(ValueError, match="given twice"):
            parse_synthetic_spec(spec)
