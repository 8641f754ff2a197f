"""Audit 55 (experiment command lines): regression tests for the bugs this audit fixed.

1. ``--out`` naming a file (or a folder below a file): every experiment / benchmark ran its
   data loading (or a whole benchmark) and then died in ``mkdir`` with a ``FileExistsError`` /
   ``NotADirectoryError`` traceback; now a usage error (exit 2) naming ``--out`` before anything runs.
2. ``scfa_speed --buckets none --keep none`` silently timed the dense anchors alone (no sparse
   row, an empty speedup plot); now a usage error.
3. A paper experiment re-run into the same ``--out`` and cut short before its first result left
   the earlier invocation's ``results.json`` (``"complete": true``, the old settings' numbers) in
   place while its runs were being replaced; now that file is moved to ``results.previous.json``
   when the run starts (``experiments.common.start_results``); the benchmarks (bench_*,
   kernel_report, scfa_speed) likewise.
4. ``prepare`` / ``export`` with an ``--out`` below a file: ``[Errno 17] File exists`` naming no
   flag; now ``--out`` and the file are named (``prepare``: a usage error before any work).
5. ``--out ""`` (``Path("")``: the current directory) wrote the results there silently; now an
   error naming ``--out`` (experiments, benchmarks, prepare, export).
"""
import importlib

import pytest

#: module -> the smallest extra arguments it needs to get past its own checks
_EXP = ["--steps", "1", "--no-compile-cache"]
OUT_CLIS = {
    **{name: _EXP for name in ("cotformer", "denseformer", "distill", "doge", "landmark_lm", "landmark_passkey",
                               "layer_parallel", "mamba", "quarot", "scfa_lm")},
    "bench_attention": ["--quick"], "bench_hadamard": ["--quick"], "bench_models": ["--quick"],
    "bench_quantize": ["--quick"], "bench_scan": ["--quick"], "scfa_speed": ["--quick"],
    "kernel_report": ["--preset", "quick"], "gpu_check": ["--smoke"],
}


@pytest.mark.parametrize("below", [False, True], ids=["file", "below_file"])
@pytest.mark.parametrize("name", sorted(OUT_CLIS))
def test_out_that_is_a_file_is_a_usage_error(name, below, tmp_path, capsys):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder\n")
    out = blocker / "sub" if below else blocker
    module = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as e:
        module.main(["--out", str(out), *OUT_CLIS[name]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err and str(blocker) in err
    assert blocker.read_text() == "not a folder\n"


def test_scfa_speed_without_any_sparse_kernel_is_a_usage_error(tmp_path, capsys):
    """2. ``scfa_speed --buckets none --keep none`` timed only the dense anchors and wrote a
    results.json with no sparse row and an empty speedup plot; now a usage error naming both."""
    from experiments import scfa_speed

    with pytest.raises(SystemExit) as e:
        scfa_speed.main(["--quick", "--buckets", "none", "--keep", "none", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--buckets" in err and "--keep" in err
    assert not (tmp_path / "o").exists()


#: experiment -> the function its run trains through (patched to stop as a kill during the first training would)
TRAINS_THROUGH = {"cotformer": "reuse_or_train", "denseformer": "reuse_or_train", "distill": "train_stage",
                  "doge": "reuse_or_train", "landmark_lm": "reuse_or_train", "landmark_passkey": "train_model",
                  "layer_parallel": "reuse_or_train", "mamba": "reuse_or_train", "quarot": "reuse_or_train",
                  "scfa_lm": "reuse_or_train"}


@pytest.mark.parametrize("name", sorted(TRAINS_THROUGH))
def test_a_rerun_cut_short_before_its_first_result_does_not_leave_the_old_results(name, tmp_path, monkeypatch):
    """3. A re-run into the same --out (other settings, no --reuse: its runs are retrained from
    scratch) stopped during its first training left the earlier invocation's results.json --
    ``"complete": true``, the old settings' numbers -- as if it were this run's, although the
    runs it described were already being replaced.  Now the old file is moved to
    results.previous.json when the run starts."""
    import json

    module = importlib.import_module(f"experiments.{name}")
    old = {"complete": True, "seed": 0, "models": {"old": {"val_ppl": 1.0}}}
    (tmp_path / "results.json").write_text(json.dumps(old))

    def killed(*a, **k):
        raise SystemExit("stopped by a signal during the first training")

    monkeypatch.setattr(module, TRAINS_THROUGH[name], killed)
    with pytest.raises(SystemExit, match="first training"):
        module.main(["--out", str(tmp_path), "--steps", "1", "--no-compile-cache"])
    assert not (tmp_path / "results.json").exists()
    assert json.loads((tmp_path / "results.previous.json").read_text()) == old


def test_prepare_and_export_out_below_a_file(tmp_path, capsys):
    """4. ``prepare`` / ``export`` with an ``--out`` below a file said only ``[Errno 17] File
    exists: '...'`` (naming no flag; ``prepare`` after tokenizing the corpus); now ``prepare`` is a
    usage error naming ``--out`` before any work and ``export`` names ``--out`` and the file."""
    from experiments import export, prepare

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        prepare.main(["--data", "shakespeare", "--out", str(blocker / "ds")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and f"{str(blocker)!r} is a file" in err
    assert export.main(["--run", str(tmp_path / "norun"), "--out", str(blocker / "hf")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and f"{blocker} is a file" in err and "Errno" not in err


#: benchmark -> (the function its sweep measures through, its quick arguments)
BENCH_WORK = {"bench_attention": ("bench_one", ["--quick", "--impls", "xla"]),
              "bench_hadamard": ("bench", ["--quick"]),
              "bench_models": ("bench_model", ["--quick", "--models", "gpt"]),
              "bench_quantize": ("bench", ["--quick"]),
              "bench_scan": ("_bench_jax", ["--quick"]),
              "kernel_report": ("run", ["--preset", "quick", "--families", "hadamard"]),
              "scfa_speed": ("run", ["--quick"])}


@pytest.mark.parametrize("name", sorted(BENCH_WORK))
def test_a_benchmark_rerun_cut_short_does_not_leave_the_old_results(name, tmp_path, monkeypatch):
    """3 (benchmarks). The same for a benchmark re-run into its --out and cut short before its
    first row was saved: the old results.json (``"complete": true``) stayed as if it were this run's."""
    import json

    module = importlib.import_module(f"experiments.{name}")
    old = {"complete": True, "rows": [{"old": 1}]}
    (tmp_path / "results.json").write_text(json.dumps(old))
    func, argv = BENCH_WORK[name]

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, func, killed)
    with pytest.raises(KeyboardInterrupt):
        module.main([*argv, "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()
    assert json.loads((tmp_path / "results.previous.json").read_text()) == old


@pytest.mark.parametrize("name", ["cotformer", "scfa_speed", "bench_hadamard", "prepare"])
def test_empty_out_is_a_usage_error(name, tmp_path, monkeypatch, capsys):
    """5. ``--out ""`` is ``Path("")``, the current directory: ``scfa_speed`` / the benchmarks /
    the experiments wrote results.json, plots and runs/ there without a word; now a usage error."""
    monkeypatch.chdir(tmp_path)
    extra = {"cotformer": _EXP, "scfa_speed": ["--quick"], "bench_hadamard": ["--quick"],
             "prepare": ["--data", "shakespeare"]}[name]
    module = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as e:
        module.main([*extra, "--out", ""])
    assert e.value.code == 2
    assert "--out: empty path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_empty_out_is_an_error(tmp_path, monkeypatch, capsys):
    from experiments import export

    monkeypatch.chdir(tmp_path)
    assert export.main(["--run", str(tmp_path / "norun"), "--out", "", "--force"]) == 2
    assert "--out: empty path" in capsys.readouterr().err
