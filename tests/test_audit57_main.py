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
