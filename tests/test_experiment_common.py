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
