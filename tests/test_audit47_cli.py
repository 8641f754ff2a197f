"""Audit 47, command-line tools and experiments.common: mutants of the CLI / shared helpers that
no earlier test caught, each killed here against a hand-computed oracle."""
import argparse
import json

import pytest

from experiments import common


def _usage_error(capsys, fn, *args, **kwargs) -> str:
    with pytest.raises(SystemExit) as e:
        fn(*args, **kwargs)
    assert e.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------- experiments.common
def test_seed_range_is_half_open_at_2_to_the_32(capsys, monkeypatch):
    monkeypatch.setattr(common, "enable_compile_cache", lambda: None)
    ap = common.experiment_parser("demo", "Demo.", {"tiny": {}}, data=False)
    assert common.parse_experiment_args(ap, ["--out", "o", "--seed", str(2**32 - 1)]).seed == 2**32 - 1
    err = _usage_error(capsys, common.parse_experiment_args, ap, ["--out", "o", "--seed", str(2**32)])
    assert "--seed must be in [0, 2**32)" in err  # PRNGKey(2**32) would silently be PRNGKey(0)


def test_train_overrides_warmup_eval_every_and_eval_batches():
    preset = {"steps": 1000, "warmup_steps": 100, "eval_every": 50, "eval_batches": 20, "lr": 1e-3}
    assert common.train_overrides(preset) == preset
    kw = common.train_overrides(preset, steps=200, eval_batches=3)
    # warmup at most a tenth of the shortened run; evaluation kept (50 < 200); eval batches given
    assert kw == {"steps": 200, "warmup_steps": 20, "eval_every": 50, "eval_batches": 3, "lr": 1e-3}
    assert common.train_overrides(preset, steps=50)["eval_every"] == 0  # 50 >= 50: only at the end
    assert common.train_overrides(preset, steps=51)["eval_every"] == 50
    assert common.train_overrides(preset, steps=5000)["warmup_steps"] == 100  # never raised
    assert preset["steps"] == 1000  # the preset is not changed


def test_fresh_train_config_log_every():
    tc = common.fresh_train_config("a", "/tmp/o", seed=1, data="synthetic:copying",
                                   train_kw=dict(steps=100, batch_size=4, seq_len=32), log_points=10)
    assert (tc.log_every, tc.out_dir, tc.seed, tc.checkpoint_every) == (10, "/tmp/o/runs/a", 1, 0)
    tc = common.fresh_train_config("a", "/tmp/o", seed=1, data="synthetic:copying",
                                   train_kw=dict(steps=3, batch_size=4, seq_len=32), log_points=10)
    assert tc.log_every == 1


def test_write_results_fields_override_the_environment_and_progress_is_incomplete(tmp_path):
    path = common.write_results(tmp_path, device="mine", val_ppl=3.0, complete=True)
    saved = json.loads(open(path).read())
    assert saved["device"] == "mine" and saved["val_ppl"] == 3.0 and saved["complete"] is True
    assert "jax_version" in saved
    common.save_progress(tmp_path, {"val_ppl": 2.0, "complete": True})  # a stale flag: still incomplete
    assert json.loads((tmp_path / "results.json").read_text()) == {"val_ppl": 2.0, "complete": False}


def test_time_forwards_keeps_the_best_round(monkeypatch):
    import itertools

    # fake clock: every call takes 1 s in round 1, 0.5 s in round 2, 2 s in round 3
    durations = itertools.chain([1.0] * 3, [0.5] * 3, [2.0] * 3)  # 3 calls a round
    now = [0.0]

    def fn():
        now[0] += next(durations)
        return 0

    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    best = common.time_forwards({"m": (fn, 100)}, rounds=3, min_time=0.0)
    assert best == {"m": pytest.approx(200.0)}  # 100 tokens / 0.5 s, not the last round's 50



def test_parse_list_bounds_are_inclusive(capsys):
    ap = argparse.ArgumentParser(prog="demo")
    assert common.parse_list(ap, "--x", "1,5", cast=int, lo=1, hi=5) == [1, 5]
    assert "--x: 0 is out of range (each entry must be in [1, 5])" in _usage_error(
        capsys, common.parse_list, ap, "--x", "0,2", cast=int, lo=1, hi=5)
    assert "--x: 6 is out of range" in _usage_error(capsys, common.parse_list, ap, "--x", "2,6", cast=int, lo=1, hi=5)
    assert "--x: -0.5 is out of range (each entry must be >= 0.0)" in _usage_error(
        capsys, common.parse_list, ap, "--x", "-0.5", cast=float, lo=0.0)


# ------------------------------------------------------------------------- experiments.prepare
@pytest.mark.parametrize("flags,message", [(["--val-fraction", "1.5"], "--val-fraction must be a number in [0, 1)"),
                                           (["--val-fraction", "nan"], "--val-fraction must be a number in [0, 1)"),
                                           (["--val-fraction", "-0.1"], "--val-fraction must be"),
                                           (["--seed", "-1"], "--seed must be >= 0")])
def test_prepare_usage_errors_name_the_flag(tmp_path, capsys, flags, message):
    from experiments import prepare
    # was: exit 2 with "val_fraction must be ..." / "seed must be ...": the library's parameter names
    err = _usage_error(capsys, prepare.main, ["--data", "shakespeare", "--out", str(tmp_path / "ds"), *flags])
    assert message in err and "usage:" in err
    assert not (tmp_path / "ds").exists()


def test_prepare_passes_val_fraction_and_seed(tmp_path, capsys):
    from experiments import prepare
    src = tmp_path / "t.txt"
    src.write_text("".join(f"document {i} with some text\n\n" for i in range(40)))
    assert prepare.main(["--data", str(src), "--out", str(tmp_path / "ds"), "--val-fraction", "0.25",
                         "--seed", "3"]) == 0
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta.get("val_fraction") == 0.25 and meta.get("seed") == 3, meta


# ------------------------------------------------------------------------ experiments.generate
def _fake_generate(monkeypatch, new_tokens):
    """Patch ``jf.generate``: every row continues its prompt with ``new_tokens`` (then zeros);
    returns the list of prompt arrays it was called with."""
    import numpy as np

    import jaxformers as jf

    calls = []

    def fake(module, variables, prompt, max_new_tokens, *, num_samples=1, prompt_lengths=None, **kw):
        prompt = np.asarray(prompt)
        calls.append(prompt.copy())
        lengths = [prompt.shape[1]] * len(prompt) if prompt_lengths is None else list(prompt_lengths)
        new = (list(new_tokens) + [0] * max_new_tokens)[:max_new_tokens]
        out = np.zeros((len(prompt) * num_samples, prompt.shape[1] + max_new_tokens), np.int32)
        for r in range(len(out)):
            n = lengths[r // num_samples]
            out[r, :n] = prompt[r // num_samples, :n]
            out[r, n:n + max_new_tokens] = new
        return out

    monkeypatch.setattr(jf, "generate", fake)
    return calls


def test_generate_cuts_the_prompt_to_exactly_max_seq_len_less_the_new_tokens(tmp_path, monkeypatch, capsys):
    from test_audit42_cli import _fake_run

    from experiments import generate

    run, config = _fake_run(tmp_path, monkeypatch)
    calls = _fake_generate(monkeypatch, b"ok")
    new = config.max_seq_len - 5  # room for 5 prompt tokens
    assert generate.main(["--run", str(run), "--prompt", "abcdefghij", "--max-new-tokens", str(new), "--json"]) == 0
    assert bytes(calls[0][0].tolist()) == b"fghij"  # the last 5 bytes: prompt + new == max_seq_len
    assert [t.rstrip("\x00") for t in json.loads(capsys.readouterr().out)["samples"]] == ["ok"]


def test_generate_stop_at_eos_drops_the_end_of_text_token(tmp_path, monkeypatch, capsys):
    from test_audit42_cli import _fake_run

    from experiments import generate

    run, _ = _fake_run(tmp_path, monkeypatch)
    _fake_generate(monkeypatch, [ord("h"), ord("i"), 256, ord("z")])  # 256: the byte tokenizer's eos
    assert generate.main(["--run", str(run), "--prompt", "a", "--max-new-tokens", "4", "--stop-at-eos",
                          "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == ["hi"]
    assert generate.main(["--run", str(run), "--prompt", "a", "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == ["hi<|endoftext|>z"]


def test_generate_prompt_file_text_output_labels_prompt_and_sample(tmp_path, monkeypatch, capsys):
    from test_audit42_cli import _fake_run

    from experiments import generate

    run, _ = _fake_run(tmp_path, monkeypatch)
    _fake_generate(monkeypatch, b"!")
    (tmp_path / "p.txt").write_text("ab\nlonger prompt\n")
    assert generate.main(["--run", str(run), "--prompt-file", str(tmp_path / "p.txt"), "--num-samples", "3",
                          "--max-new-tokens", "1"]) == 0
    expected = []
    for p, text in enumerate(["ab", "longer prompt"]):
        for s in range(3):
            expected += [f"--- prompt {p} sample {s}", text + "!"]
    assert capsys.readouterr().out.splitlines() == expected


def test_memory_decoding_bounds():
    import jaxformers as jf
    from experiments.generate import with_memory_decoding

    c = jf.get_config("landmark", "tiny")  # landmark_block 16, mem_top_k 2, max_seq_len 256
    L, k = c.landmark_block, c.mem_top_k
    edge = c.max_seq_len - k * L  # the largest chunk: top_k * L + chunk == max_seq_len
    assert with_memory_decoding(c, edge, None).mem_chunk_len == edge
    with pytest.raises(ValueError, match="--memory-chunk .* more than max_seq_len"):
        with_memory_decoding(c, edge + L, None)
    for chunk in (0, -L, L + 1):
        with pytest.raises(ValueError, match="--memory-chunk must be a positive multiple"):
            with_memory_decoding(c, chunk, None)
    with pytest.raises(ValueError, match="--memory-top-k must be >= 1"):
        with_memory_decoding(c, L, 0)


# ---------------------------------------------------------------------------- experiments.info
def test_info_non_embedding_params_and_flops_at_the_given_length(capsys):
    import jax

    import jaxformers as jf
    from experiments import info

    rows = {r["preset"]: r for r in info.main(["--model", "llama", "--seq-len", "1024", "--json"])}
    capsys.readouterr()
    tiny = rows["tiny"]
    config = jf.get_config("llama", "tiny")
    params = jf.init_params(jf.build(config), jax.random.PRNGKey(0))
    sizes = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.size
             for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    embedding = [n for p, n in sizes.items() if "embed" in p.lower() or "wte" in p.lower()]
    assert tiny["params"] == sum(sizes.values())
    assert embedding and tiny["non_embedding_params"] == sum(sizes.values()) - config.vocab_size * config.d_model
    assert tiny["seq_len"] == 1024
    assert tiny["flops_per_token"] == config.flops_per_token(1024) > config.flops_per_token(config.max_seq_len)


def test_check_heads(capsys):
    ap = argparse.ArgumentParser(prog="demo")
    common.check_heads(ap, {"d_model": 128, "n_head": 4})
    assert "--d-model must be a multiple of the preset's 4 heads, got 130" in _usage_error(
        capsys, common.check_heads, ap, {"d_model": 130, "n_head": 4})


# ------------------------------------------------- a tiny run: experiments.evaluate and --reuse
KW = dict(steps=3, batch_size=4, seq_len=32, eval_batches=2, eval_every=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``OUT/runs/a``: 3 steps of gpt tiny on synthetic:copying (seq 32, batch 4, 2 eval batches)."""
    import jaxformers as jf

    out = tmp_path_factory.mktemp("out")
    cfg = jf.get_config("gpt", "tiny")
    summary, *_ = common.train_fresh("a", cfg, out, seed=0, data="synthetic:copying", train_kw=KW,
                                     log_points=3, tag="t")
    return out, cfg, summary


def _evaluate(capsys, run, *flags):
    from experiments import evaluate
    assert evaluate.main(["--run", str(run), *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_defaults_reproduce_the_runs_val_loss(trained, capsys):
    import math

    out, _, summary = trained
    run = out / "runs" / "a"
    default = _evaluate(capsys, run)
    assert default["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert default["val_ppl"] == pytest.approx(math.exp(default["val_loss"]), rel=1e-9)  # ppl = e^loss
    one = _evaluate(capsys, run, "--max-batches", "1")
    assert default["val_tokens"] == 2 * one["val_tokens"]  # the run's 2 eval batches, not the whole split
    assert _evaluate(capsys, run, "--max-batches", "0")["val_tokens"] > default["val_tokens"]
    for bs in ("8", "3", "5"):  # the same 8 rows in one batch, or in batches that do not divide 8
        same_rows = _evaluate(capsys, run, "--batch-size", bs)  # (3 used to read 9 rows, 5 ten)
        assert same_rows["val_tokens"] == default["val_tokens"], bs
        assert same_rows["val_loss"] == pytest.approx(default["val_loss"], rel=1e-5), bs


def test_reuse_skips_a_stopped_run_with_other_settings(trained, tmp_path):
    import shutil

    out, cfg, _ = trained
    kw = dict(seed=0, data="synthetic:copying", log_points=3)
    assert common.check_reuse(out, [("a", cfg)], train_kw=KW, **kw) == ["a"]
    with pytest.raises(SystemExit, match="cannot reuse .* other settings"):  # finished, other settings
        common.check_reuse(out, [("a", cfg)], train_kw={**KW, "steps": 4}, **kw)
    copy = tmp_path / "runs" / "a"
    shutil.copytree(out / "runs" / "a", copy)
    summary = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps({**summary, "finished": False}))
    # stopped by a signal: same settings -> continued; other settings -> trained again, no error
    assert common.check_reuse(tmp_path, [("a", cfg)], train_kw=KW, **kw) == ["a"]
    assert common.check_reuse(tmp_path, [("a", cfg)], train_kw={**KW, "steps": 4}, **kw) == []


@pytest.mark.parametrize("value", ["-2", "-100"])
def test_evaluate_max_batches_below_minus_one_is_a_usage_error(tmp_path, capsys, value):
    from experiments import evaluate
    err = _usage_error(capsys, evaluate.main, ["--run", str(tmp_path), "--max-batches", value])
    assert f"--max-batches must be -1 (the run's validation set), 0 (all) or >= 1, got {value}" in err


@pytest.mark.parametrize("positions,seq_len", [(2048, 1024), (512, 512)])
def test_evaluate_hf_checkpoint_defaults(tmp_path, monkeypatch, capsys, positions, seq_len):
    """A HF checkpoint: ``min(max_position_embeddings, 1024)`` tokens a sequence, the whole split."""
    import jaxformers as jf
    import jaxformers.convert as convert
    import jaxformers.training as training
    from experiments import evaluate

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": positions}))
    config = jf.get_config("llama", "tiny", vocab_size=512, max_seq_len=positions)
    monkeypatch.setattr(convert, "from_hf", lambda d: (config, {}))
    seen = {}

    def fake_evaluate(run, data, **kw):
        seen.update(kw, run=run, data=data)
        return {"val_loss": 1.0, "val_ppl": 2.718281828459045, "val_tokens": 7}

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    assert evaluate.main(["--run", str(tmp_path), "--data", "synthetic:copying", "--tokenizer", "byte"]) == 0
    assert (seen["seq_len"], seen["max_batches"], seen["batch_size"]) == (seq_len, None, None)
    assert seen["run"] == (config, {}) and seen["tokenizer"] == "byte"
    assert json.loads(capsys.readouterr().out)["val_tokens"] == 7


def test_results_json_keeps_numpy_and_jax_numbers_as_numbers(tmp_path):
    import jax.numpy as jnp
    import numpy as np

    # was: write_results raised TypeError (float32 is not JSON serializable) at the end of an
    # experiment, and save_progress wrote "1.5" / "3" as strings (its default=str)
    common.save_progress(tmp_path, {"ppl": np.float32(1.5), "n": np.int64(3), "l": jnp.asarray([1, 2]),
                                    "path": tmp_path})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == {"ppl": 1.5, "n": 3, "l": [1, 2], "path": str(tmp_path), "complete": False}
    common.write_results(tmp_path, ppl=np.float32(2.5), loss=jnp.float32(0.5))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (saved["ppl"], saved["loss"]) == (2.5, 0.5)
    with pytest.raises(TypeError):  # what JSON cannot encode still writes nothing
        common.write_results(tmp_path, bad=object())
    assert json.loads((tmp_path / "results.json").read_text())["ppl"] == 2.5
