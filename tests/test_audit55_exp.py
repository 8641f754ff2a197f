"""Audit 55 (experiment command lines): regression tests for the bugs this audit fixed.

1. ``--out`` naming a file (or a folder below a file): every experiment / benchmark ran its
   data loading (or a whole benchmark) and then died in ``mkdir`` with a ``FileExistsError`` /
   ``NotADirectoryError`` traceback; now a usage error (exit 2) naming ``--out`` before anything runs.
2. ``scfa_speed --buckets none --keep none`` silently timed the dense anchors alone (no sparse
   row, an empty speedup plot); now a usage error.
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
