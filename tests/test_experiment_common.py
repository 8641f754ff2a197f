"""Helpers shared by the experiments."""
import json

from experiments.common import save_progress


def test_save_progress_writes_what_is_finished_marked_incomplete(tmp_path):
    results = {"models": {"a": {"val_ppl": 3.5}}}
    save_progress(tmp_path / "out", results)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == {"models": {"a": {"val_ppl": 3.5}}, "complete": False}
    assert "complete" not in results  # the caller's dict is not changed


def test_experiment_parser_standard_options_and_checks(capsys, monkeypatch):
    import pytest

    from experiments import common
    from experiments.common import experiment_parser, parse_experiment_args

    enabled = []
    monkeypatch.setattr(common, "enable_compile_cache", lambda: enabled.append(True))
    ap = experiment_parser("demo", "Demo experiment.\n\nMore text.", {"tiny": {}, "gpu": {}}, data=False)
    ap.add_argument("--eval-batches", type=int)
    args = parse_experiment_args(ap, ["--out", "o", "--steps", "3"])
    assert (args.preset, args.out, args.steps, args.seed, args.no_compile_cache) == ("tiny", "o", 3, 0, False)
    assert not hasattr(args, "data") and enabled == [True]
    parse_experiment_args(ap, ["--out", "o", "--no-compile-cache"])
    assert enabled == [True]
    for bad, name in ((["--steps", "0"], "--steps"), (["--eval-batches", "-1"], "--eval-batches")):
        with pytest.raises(SystemExit):
            parse_experiment_args(ap, ["--out", "o", *bad])
        assert f"{name} must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_experiment_args(ap, ["--out", "o", "--preset", "huge"])
    assert experiment_parser("d", "D.", {"tiny": {}}).parse_args(["--out", "o"]).data == "default"


# --------------------------------------------------------------------------- argument checks
import argparse  # noqa: E402
import importlib  # noqa: E402

import pytest  # noqa: E402

from experiments.common import check_counts, check_data, parse_list  # noqa: E402


def _usage_error(capsys, fn, *args, **kwargs) -> str:
    """``fn(...)`` must end in a usage error (SystemExit 2); returns its stderr."""
    with pytest.raises(SystemExit) as e:
        fn(*args, **kwargs)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


def test_parse_list_values():
    ap = argparse.ArgumentParser(prog="demo")
    assert parse_list(ap, "--x", None) is None  # not given: the caller's default
    assert parse_list(ap, "--x", " a, b ") == ["a", "b"]
    assert parse_list(ap, "--x", "a,a") == ["a", "a"]  # repeats only refused with unique=True
    assert parse_list(ap, "--n", "1,2", cast=int, lo=1, hi=2, unique=True) == [1, 2]
    assert parse_list(ap, "--f", "0.5;1", cast=float, sep=";") == [0.5, 1.0]
    assert parse_list(ap, "--x", "b", allowed=("a", "b")) == ["b"]
    assert parse_list(ap, "--x", "None", none=True) == []  # the option's "skip"


@pytest.mark.parametrize("text, kwargs, message", [
    (",", {}, "empty list ','"),
    ("", {}, "empty list"),
    ("a,,b", {}, "empty entry in 'a,,b'"),
    ("a,", {}, "empty entry"),
    ("1,x", dict(cast=int), "'x' is not an integer (in '1,x')"),
    ("1.5", dict(cast=int), "'1.5' is not an integer"),
    ("1,x", dict(cast=float), "'x' is not a number"),
    ("1,nan", dict(cast=float), "'nan' is not a finite number"),
    ("a,c", dict(allowed=("a", "b")), "unknown 'c'; choose from ['a', 'b']"),
    (",", dict(allowed=("a", "b")), "choose from ['a', 'b']"),
    ("0,1", dict(cast=int, lo=1), "0 is out of range (each entry must be >= 1)"),
    ("3", dict(cast=int, lo=1, hi=2), "3 is out of range (each entry must be in [1, 2])"),
    ("1.5", dict(cast=float, hi=1.0), "1.5 is out of range (each entry must be <= 1.0)"),
    ("a,b,a", dict(unique=True), "'a' is given twice in 'a,b,a'"),
    ("none,a", dict(none=True), "'none' (skip) stands alone"),
])
def test_parse_list_refuses_with_a_usage_error_naming_the_flag(capsys, text, kwargs, message):
    ap = argparse.ArgumentParser(prog="demo")
    err = _usage_error(capsys, parse_list, ap, "--x", text, **kwargs)
    assert "error: --x: " in err and message in err


def test_check_counts_and_check_data(capsys, tmp_path):
    ap = argparse.ArgumentParser(prog="demo")
    ok = argparse.Namespace(steps=1, warmup=0, missing=None)
    check_counts(ap, ok, positive=("steps", "missing", "absent"), nonnegative=("warmup",))
    for args, flag in ((argparse.Namespace(steps=0), "--steps must be >= 1, got 0"),
                       (argparse.Namespace(warmup=-1), "--warmup must be >= 0, got -1")):
        err = _usage_error(capsys, check_counts, ap, args, positive=("steps",), nonnegative=("warmup",))
        assert flag in err
    for data in (None, "default", "python", str(tmp_path)):
        check_data(ap, data)
    check_data(ap, "synthetic:copying", specs=True)
    for data, specs in (("nosuchcorpus", False), ("synthetic:copying", False), ("synthetic:nosuch", True),
                        ("", False)):
        assert "error: --data:" in _usage_error(capsys, check_data, ap, data, specs=specs)


#: a function each command reaches only after its arguments passed: patched to fail the test
#: at once (nothing is loaded, trained or timed even if a check were missing)
TRIPWIRES = {"cotformer": "run", "denseformer": "run", "scfa_lm": "run", "mamba": "run",
             "layer_parallel": "run", "quarot": "run", "distill": "run", "landmark_passkey": "run",
             "landmark_lm": "run", "doge": "run", "bench_attention": "bench_one",
             "bench_models": "bench_model", "bench_hadamard": "bench", "bench_scan": "_bench_jax", "bench_quantize": "bench",
             "scfa_speed": "run", "gpu_check": "orchestrate", "kernel_report": "run"}
EXPERIMENTS = {"cotformer", "denseformer", "scfa_lm", "mamba", "layer_parallel", "quarot", "distill",
               "landmark_passkey", "landmark_lm", "doge"}  # experiment_parser: --no-compile-cache


@pytest.mark.parametrize("module, argv, flag", [
    ("cotformer", ["--only", ","], "--only"),
    ("cotformer", ["--only", "gpt_L2,nosuch"], "--only"),
    ("cotformer", ["--budgets", "1,x"], "--budgets"),
    ("cotformer", ["--budgets", "0.2,0.8"], "--budgets"),  # increasing: refused before 9 models train
    ("cotformer", ["--only", "gpt_L2", "--budgets", "1,1"], "--budgets"),
    ("cotformer", ["--seq-len", "0"], "--seq-len"),
    ("cotformer", ["--d-model", "-8"], "--d-model"),
    ("cotformer", ["--data", "nosuchcorpus"], "--data"),
    ("denseformer", ["--only", "gpt_L4,nope"], "--only"),
    ("scfa_lm", ["--only", ","], "--only"),
    ("scfa_lm", ["--seq-len", "100"], "--seq-len"),
    ("mamba", ["--models", ","], "--models"),
    ("mamba", ["--contexts", "256,64"], "--contexts"),
    ("mamba", ["--contexts", "64,x"], "--contexts"),
    ("layer_parallel", ["--positions", ","], "--positions"),
    ("layer_parallel", ["--pair-counts", "2,4"], "--pair-counts"),  # tiny: 8 layers, at most 3 pairs
    ("layer_parallel", ["--pair-counts", "1,x"], "--pair-counts"),
    ("layer_parallel", ["--max-pairs", "0"], "--max-pairs"),
    ("layer_parallel", ["--n-layer", "0", "--iters", "0"], "--n-layer"),
    ("layer_parallel", ["--decode-tokens", "128"], "--decode-tokens"),
    ("layer_parallel", ["--run", "{tmp}", "--steps", "3"], "--steps"),
    ("layer_parallel", ["--tokenizer", "bpe"], "--tokenizer"),  # the preset trains on bytes
    ("layer_parallel", ["--run", "{tmp}"], "--run"),            # no config.json
    ("layer_parallel", ["--run", "{tmp}/run", "--tokenizer", "bpe"], "--tokenizer"),  # its own
    ("layer_parallel", ["--run", "{tmp}/hf", "--data", "default"], "--tokenizer"),  # no tokenizer.json
    ("layer_parallel", ["--run", "{tmp}/hf"], "--data"),
    ("layer_parallel", ["--run", "{tmp}/neither"], "--run"),
    ("quarot", ["--tokenizer", "bpe"], "--tokenizer"),
    ("quarot", ["--run", "{tmp}"], "--run"),
    ("quarot", ["--run", "{tmp}/run", "--tokenizer", "bpe"], "--tokenizer"),
    ("quarot", ["--run", "{tmp}/hf", "--data", "default"], "--tokenizer"),
    ("quarot", ["--run", "{tmp}/hf"], "--data"),
    ("quarot", ["--only", "W4A16_RTN,W4A16_TYPO"], "--only"),
    ("quarot", ["--int-schemes", "W9A9"], "--int-schemes"),
    ("quarot", ["--calib", "0"], "--calib"),
    ("distill", ["--students", ","], "--students"),
    ("distill", ["--students", "mamba2,foo"], "--students"),
    ("distill", ["--students", "mamba2_random", "--student", "hybrid"], "--student"),
    ("distill", ["--attn-layers", "9"], "--attn-layers"),
    ("distill", ["--problems", "0"], "--problems"),
    ("distill", ["--samples", "0"], "--samples"),
    ("distill", ["--speed-lengths", "4096"], "--speed-lengths"),
    ("landmark_passkey", ["--eval-samples", "0"], "--eval-samples"),
    ("landmark_passkey", ["--digits", "0"], "--digits"),
    ("landmark_passkey", ["--factors", "1,x"], "--factors"),
    ("landmark_lm", ["--factors", "1,x"], "--factors"),
    ("landmark_lm", ["--eval-windows", "0"], "--eval-windows"),
    ("landmark_lm", ["--top-k", ","], "--top-k"),
    ("doge", ["--no-ood", "--ood-target", "python"], "--ood-target"),
    ("doge", ["--proxy-steps", "0"], "--proxy-steps"),
    ("bench_attention", ["--quick", "--impls", ","], "--impls"),
    ("bench_attention", ["--quick", "--iters", "0"], "--iters"),
    ("bench_models", ["--quick", "--models", "gpt,nosuch"], "--models"),
    ("bench_models", ["--quick", "--seq-lens", "0"], "--seq-lens"),
    ("bench_models", ["--quick", "--preset", "nope"], "--preset"),
    ("bench_hadamard", ["--quick", "--sizes", "64,188"], "--sizes"),
    ("bench_hadamard", ["--quick", "--rows", "0"], "--rows"),
    ("bench_scan", ["--quick", "--impls", "pallas,nope"], "--impls"),
    ("bench_quantize", ["--quick", "--specs", "rtn4,rtn9"], "--specs"),
    ("bench_quantize", ["--quick", "--layers", "0"], "--layers"),
    ("bench_quantize", ["--quick", "--calib", "0"], "--calib"),
    ("bench_quantize", ["--quick", "--platform", "tpu"], "--platform"),
    ("scfa_speed", ["--quick", "--keep", "0"], "--keep"),
    ("scfa_speed", ["--quick", "--seq-lens", ","], "--seq-lens"),
    ("gpu_check", ["--smoke", "--deadline", "-1"], "--deadline"),
    ("gpu_check", ["--smoke", "--budget", "correct=abc"], "--budget"),
    ("gpu_check", ["--smoke", "--budget", "correct=3"], "--budget"),
    ("kernel_report", ["--families", ","], "--families"),
])
def test_bad_arguments_are_usage_errors_before_anything_runs(capsys, monkeypatch, tmp_path, module,
                                                             argv, flag):
    mod = importlib.import_module(f"experiments.{module}")

    def tripwire(*a, **k):
        raise AssertionError(f"experiments.{module} got past its argument checks")

    monkeypatch.setattr(mod, TRIPWIRES[module], tripwire)
    # --run directories told apart by their config.json: a run trained here, a HF checkpoint
    # (without tokenizer.json), and neither
    for name, saved in (("run", {"model": {}, "train": {}}), ("hf", {"model_type": "llama"}), ("neither", {})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(saved))
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(out)]
    err = _usage_error(capsys, mod.main, argv + (["--no-compile-cache"] if module in EXPERIMENTS else []))
    assert flag in err.splitlines()[-1]
    assert not (out / "runs").exists() and not out.exists()  # nothing trained, nothing written


@pytest.mark.parametrize("module, argv", [  # the arguments of the (slow) tests/test_experiment_*.py runs
    ("cotformer", ["--steps", "2", "--eval-batches", "1", "--d-model", "32", "--seq-len", "16",
                   "--batch-size", "2", "--only", "cotformer_L2x2,adaptive_L2x3", "--budgets", "0,0;1,1"]),
    ("denseformer", ["--steps", "2", "--eval-batches", "1", "--only", "gpt_L4,denseformer_1x1_L4"]),
    ("scfa_lm", ["--steps", "2", "--eval-batches", "1", "--only", "hash_nb4", "--no-kernel-check"]),
    ("mamba", ["--steps", "10", "--eval-batches", "2", "--contexts", "32,128", "--models", "gpt,mamba"]),
    ("layer_parallel", ["--steps", "2", "--eval-batches", "1", "--n-layer", "4", "--d-model", "32",
                        "--seq-len", "16", "--batch-size", "2", "--decode-tokens", "3", "--iters", "1"]),
    ("layer_parallel", ["--preset", "gpu", "--steps", "1500", "--positions", "early,middle",
                        "--pair-counts", "2,4,8", "--no-study"]),  # scripts/gpu_session.sh
    ("quarot", ["--steps", "3", "--eval-batches", "1", "--seq-len", "32", "--batch-size", "4", "--calib", "4",
                "--only", "fp_rot,W4A4KV4_GPTQ_rot", "--int-schemes", "W4A4"]),
    ("quarot", ["--int-schemes", "none"]),
    ("distill", ["--teacher-steps", "20", "--steps", "3", "--align-steps", "2",
                 "--students", "hybrid,mamba2_random", "--problems", "4", "--samples", "1,2",
                 "--speed-batches", "2", "--speed-lengths", "24"]),
    ("landmark_passkey", ["--steps", "2", "--factors", "2", "--top-k", "1", "--eval-samples", "2",
                          "--d-model", "32", "--n-layer", "1"]),
    ("landmark_lm", ["--steps", "2", "--factors", "2", "--top-k", "1", "--eval-windows", "1",
                     "--d-model", "32", "--n-layer", "1"]),
    ("doge", ["--steps", "2", "--proxy-steps", "3", "--eval-batches", "1", "--max-bytes", "30000"]),
])
def test_good_arguments_pass_the_checks(module, argv, tmp_path):
    from experiments.common import parse_experiment_args

    mod = importlib.import_module(f"experiments.{module}")
    ap = mod._parser()
    argv = argv + ["--out", str(tmp_path / "o"), "--no-compile-cache"]
    args = parse_experiment_args(ap, argv, check=mod._check_args, data_specs=module == "layer_parallel")
    if module == "cotformer":
        assert args.only == ["cotformer_L2x2", "adaptive_L2x3"] and args.budgets == ((0.0, 0.0), (1.0, 1.0))
    if module == "quarot":
        assert args.int_schemes in (["W4A4"], [])
    if module == "distill":
        assert args.students == ["hybrid", "mamba2_random"] and args.speed_lengths == [24]
    assert not (tmp_path / "o").exists()


def test_bench_quick_applies_the_given_options_over_its_values():
    from experiments import bench_models, scfa_speed

    ap = bench_models._parser()
    args = ap.parse_args(["--quick", "--seq-lens", "32", "--iters", "1"])
    models, cfg = bench_models.sweep_config(ap, args)
    assert models == ["gpt", "mamba"] and cfg["seq_lens"] == (32,) and cfg["iters"] == 1
    assert cfg["preset"] == "tiny" and cfg["tokens"] == bench_models.QUICK["tokens"]
    ap = argparse.ArgumentParser()
    for name in ("seq_lens", "buckets", "keep"):
        ap.add_argument("--" + name.replace("_", "-"))
    for name in ("tokens", "heads", "head_dim", "block", "warmup", "iters"):
        ap.add_argument("--" + name.replace("_", "-"), type=int)
    ap.add_argument("--quick", action="store_true")
    cfg = scfa_speed.sweep_config(ap, ap.parse_args(["--quick", "--buckets", "none", "--iters", "3"]))
    assert cfg["buckets"] == () and cfg["iters"] == 3 and cfg["seq_lens"] == scfa_speed.QUICK["seq_lens"]


def test_checks_that_need_the_loaded_model(capsys):
    """``--run`` / ``--teacher``: the depth and length checks run once the model is loaded."""
    from experiments import distill, layer_parallel

    ap = layer_parallel._parser()
    args = ap.parse_args(["--out", "o", "--pair-counts", "2,3", "--seq-len", "64"])
    layer_parallel._check_args(ap, args)  # the tiny preset's 8 layers hold 3 pairs
    preset = layer_parallel._preset(args)
    layer_parallel.check_model(ap, args, preset, 8, 128)
    assert "--pair-counts: [3]" in _usage_error(capsys, layer_parallel.check_model, ap, args, preset, 6, 128)
    err = _usage_error(capsys, layer_parallel.check_model, ap, args, preset, 8, 32)
    assert "--seq-len 64 is longer" in err
    ap = distill._parser()
    args = ap.parse_args(["--out", "o", "--attn-layers", "1,3"])
    distill._check_args(ap, args)
    distill.check_teacher(ap, args, 4, 256)
    assert "--attn-layers: [3]" in _usage_error(capsys, distill.check_teacher, ap, args, 3, 256)
    assert "speed lengths" in _usage_error(capsys, distill.check_teacher, ap, args, 4, 128)


def test_reuse_is_checked_against_the_finished_runs_config_and_settings(tmp_path):
    """``--reuse`` (cotformer, layer_parallel): a finished run is reused only with the same model
    config and training settings; otherwise SystemExit naming the field, before any training."""
    import jaxformers as jf
    from experiments.common import check_reuse, train_fresh

    cfg = jf.get_config("gpt", "tiny", vocab_size=257, n_layer=1, d_model=32, n_head=2, max_seq_len=32)
    train_kw = dict(steps=2, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=1, eval_every=0,
                    eval_batches=1)
    kw = dict(seed=0, data="default", train_kw=train_kw, log_points=10)
    train_fresh("a", cfg, tmp_path, tag="test", **kw)
    assert check_reuse(tmp_path, [("a", cfg), ("b", cfg)], **kw) == ["a"]  # b: not trained yet
    with pytest.raises(SystemExit, match="steps: 2 -> 3"):
        check_reuse(tmp_path, [("a", cfg)], **dict(kw, train_kw=dict(train_kw, steps=3)))
    with pytest.raises(SystemExit, match="seed: 0 -> 1"):
        check_reuse(tmp_path, [("a", cfg)], **dict(kw, seed=1))
    with pytest.raises(SystemExit, match="d_model: 32 -> 64"):
        check_reuse(tmp_path, [("a", cfg.replace(d_model=64))], **kw)


def test_landmark_lm_refuses_windows_longer_than_the_split_before_writing(capsys, monkeypatch, tmp_path):
    mod = importlib.import_module("experiments.landmark_lm")
    monkeypatch.setattr(mod, "reuse_or_train", lambda *a, **k: pytest.fail("trained past the split check"))
    out = tmp_path / "out"
    err = _usage_error(capsys, mod.main, ["--factors", "100000", "--out", str(out), "--no-compile-cache"])
    assert "--factors" in err.splitlines()[-1] and "validation split" in err
    assert not out.exists()
