"""Stop 57's own fixes: experiments move their old plots aside at the start (as they do
``results.json``), ``experiments.info`` counts FLOPs as the trainer does and reads run
directories."""
import importlib
import re
from pathlib import Path

import pytest

from experiments.common import start_results

EXPERIMENTS = ("cotformer", "denseformer", "distill", "doge", "kernel_report", "landmark_lm", "landmark_passkey",
               "layer_parallel", "mamba", "quarot", "scfa_lm", "scfa_speed")


def test_start_results_moves_the_earlier_plots_aside(tmp_path, capsys):
    """A re-run cut short before drawing its plots left the old ones beside its partial
    results.json, as if they were its own."""
    (tmp_path / "ppl.png").write_bytes(b"old plot")
    (tmp_path / "mine.png").write_bytes(b"the user's")
    (tmp_path / "results.json").write_text("{}")
    start_results(tmp_path, ("ppl.png", "weights.png"))
    assert not (tmp_path / "ppl.png").exists() and (tmp_path / "ppl.previous.png").read_bytes() == b"old plot"
    assert (tmp_path / "mine.png").read_bytes() == b"the user's"  # not one of the experiment's plots
    assert not (tmp_path / "weights.previous.png").exists()
    assert (tmp_path / "results.previous.json").exists()
    assert "ppl.previous.png" in capsys.readouterr().err
    for bad in ("../ppl.png", "ppl.jpg", "sub/ppl.png"):
        with pytest.raises(ValueError, match="plots must be PNG file names"):
            start_results(tmp_path, (bad,))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_names_the_plots_it_draws(name):
    """``PLOTS`` (what ``start_results`` moves aside) lists every PNG the module writes."""
    module = importlib.import_module(f"experiments.{name}")
    source = Path(module.__file__).read_text()
    assert set(re.findall(r"[\"'](\w+\.png)[\"']", source)) == set(module.PLOTS)
    assert re.search(r"start_results\((out|args\.out), PLOTS\)", source)


def _info_json(info, argv, capsys):
    rows = info.main([*argv, "--json"])
    capsys.readouterr()
    return rows


def test_info_counts_a_landmark_models_flops_as_its_training_does(capsys):
    """info printed ``flops_per_token(T)`` for a landmark model while its runs' MFU counts the
    landmark positions the model runs (``model_flops_per_token`` with its default loss)."""
    import jaxformers as jf
    from experiments import info
    from jaxformers.training.losses import get_loss
    from jaxformers.training.metrics import model_flops_per_token

    row = {r["preset"]: r for r in _info_json(info, ["--model", "landmark", "--seq-len", "64"], capsys)}["tiny"]
    config = jf.get_config("landmark", "tiny")
    trainer = model_flops_per_token(config, 64, loss_fn=get_loss("landmark_cross_entropy"))
    assert row["flops_per_token"] == trainer > config.flops_per_token(64)


def test_info_reads_a_run_directory(tmp_path, capsys):
    import jaxformers as jf
    from experiments import info
    from jaxformers.training import TrainConfig
    from jaxformers.training.losses import get_loss
    from jaxformers.training.metrics import model_flops_per_token
    from jaxformers.training.rundir import write_config
    from jaxformers.utils import abstract_param_count

    config = jf.get_config("landmark", "tiny")
    tc = TrainConfig(out_dir=str(tmp_path / "run"), seq_len=96, loss="landmark_cross_entropy", steps=2)
    write_config(tmp_path / "run", model_config=config, train_config=tc, compute_dtype="float32", dataset={},
                 n_params=0, mesh="")
    (row,) = _info_json(info, ["--run", str(tmp_path / "run")], capsys)
    assert row["model"] == "landmark" and row["preset"] == str(tmp_path / "run") and row["seq_len"] == 96
    assert row["flops_per_token"] == model_flops_per_token(config, 96, loss_fn=get_loss("landmark_cross_entropy"))
    assert row["params"] == abstract_param_count(jf.build(config))
    (row,) = _info_json(info, ["--run", str(tmp_path / "run"), "--seq-len", "32"], capsys)
    assert row["seq_len"] == 32
    for argv, message in ((["--run", str(tmp_path)], "is not a run directory"),
                          (["--run", str(tmp_path / "run"), "--model", "gpt"], "--run excludes --model"),
                          (["--fields", "gpt", "--run", str(tmp_path / "run")], "--fields excludes --run")):
        with pytest.raises(SystemExit) as e:
            info.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
