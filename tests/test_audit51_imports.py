"""Audit 51: a run of your own architecture remembers the modules it needs.

``experiments.train --import MODULE`` reached a user-registered architecture, but the run
directory did not remember it: ``--resume``, ``experiments.evaluate / generate --run`` and every
loader failed on such a run ("unknown model name") unless ``--import`` was given again.  The run
now records its modules (``train.imports`` in config.json / run.yaml / each checkpoint's config)
and loading it imports them before its model name is looked up.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers import registry
from jaxformers.training import TrainConfig, load_run, train
from jaxformers.training.rundir import check_resume, read_metrics

REPO = Path(__file__).resolve().parents[1]
MODULE = "audit51_arch"
MODEL = "audit51-arch"

# a class of its own: executed twice, the module would register another spec under a taken
# name (a ValueError), so loading a run twice in one process shows it is imported once
USER_MODULE = f"""
import os
from jaxformers.config import TransformerConfig
from jaxformers.models.transformer import Transformer
from jaxformers.registry import register

os.environ["AUDIT51_EXECUTIONS"] = str(int(os.environ.get("AUDIT51_EXECUTIONS", "0")) + 1)


class Audit51LM(Transformer):
    pass


register({MODEL!r}, TransformerConfig, Audit51LM,
         {{"tiny": dict(d_model=32, n_layer=1, n_head=2, max_seq_len=32)}})
"""

TINY = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--eval-every", "0",
        "--log-every", "1", "--checkpoint-every", "0", "--warmup-steps", "0", "--no-tensorboard",
        "--no-compile-cache", "--quiet"]


def _forget_module():
    """As in a fresh process: the module not imported, the model not registered."""
    sys.modules.pop(MODULE, None)
    if MODEL in registry.list_models():
        registry.unregister(MODEL)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of the user's architecture trained by the CLI with ``--import`` (a subprocess:
    the module on PYTHONPATH, as a user's would be)."""
    root = tmp_path_factory.mktemp("audit51_imports")
    (root / "code").mkdir()
    (root / "code" / f"{MODULE}.py").write_text(USER_MODULE)
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    (root / "corpus.txt").write_text(" ".join(rng.choice(words, size=2000)) + ".\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "code"), str(REPO)]))
    env.pop("AUDIT51_EXECUTIONS", None)
    run = root / "run"
    got = _cli(env, "train", "--import", MODULE, "--model", MODEL, "--data", str(root / "corpus.txt"),
               "--out", str(run), *TINY)
    assert got.returncode == 0, got.stderr[-3000:]
    yield {"root": root, "run": run, "env": env}
    _forget_module()


def _cli(env, name, *args):
    return subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def importable(trained, monkeypatch):
    """The user's module importable in this process (its folder on sys.path); forgotten after."""
    monkeypatch.syspath_prepend(str(trained["root"] / "code"))
    monkeypatch.setenv("AUDIT51_EXECUTIONS", "0")  # restored (removed) after the test
    _forget_module()
    yield trained
    _forget_module()


def test_the_run_records_its_modules(trained):
    """config.json and run.yaml name the module (train.imports)."""
    import yaml

    run = trained["run"]
    assert json.loads((run / "config.json").read_text())["train"]["imports"] == [MODULE]
    assert yaml.safe_load((run / "run.yaml").read_text())["train"]["imports"] == [MODULE]


def test_resume_evaluate_generate_without_import(trained):
    """Each used to fail with "unknown model name='audit51-arch'" unless --import was given again."""
    run, env = trained["run"], trained["env"]
    got = _cli(env, "train", "--resume", "--out", str(run), "--extend-steps", "2", "--quiet",
               "--no-compile-cache")
    assert got.returncode == 0, got.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((run / "config.json").read_text())["train"]["imports"] == [MODULE]
    got = _cli(env, "evaluate", "--run", str(run))
    assert got.returncode == 0, got.stderr[-3000:]
    assert json.loads(got.stdout)["val_loss"] == pytest.approx(read_metrics(run)[-1]["val_loss"], rel=1e-4)
    got = _cli(env, "generate", "--run", str(run), "--prompt", "the", "--max-new-tokens", "4", "--json")
    assert got.returncode == 0, got.stderr[-3000:]
    assert len(json.loads(got.stdout)["samples"]) == 1


def test_loaders_import_the_module_once(importable):
    """load_run / check_resume / source_config import the recorded module before the model name
    is looked up, and only once (loading twice does not run it again, so nothing re-registers)."""
    from jaxformers.training.init_from import source_config, source_imports

    run = importable["run"]
    config, tc, params = load_run(run)
    assert config.model == MODEL and tc.imports == (MODULE,)
    load_run(run)
    assert check_resume(run, config) is not None
    assert source_config(run)[0] == config and source_imports(run) == (MODULE,)
    assert os.environ["AUDIT51_EXECUTIONS"] == "1"
    registry.register(MODEL, *[getattr(registry.get_spec(MODEL), f) for f in ("config_cls", "module_cls")],
                      registry.get_spec(MODEL).presets)  # the same spec again: a no-op


def test_cli_configs_carry_the_imports(importable, tmp_path):
    """Fine-tuning from the run (--init-from), reproducing it (--config run.yaml) and resuming it
    record the module too, with another --import added after it."""
    from experiments.train import _parser, build_configs

    run = importable["run"]
    corpus = str(importable["root"] / "corpus.txt")
    for argv in (["--init-from", str(run), "--data", corpus, "--out", str(tmp_path / "ft")],
                 ["--config", str(run / "run.yaml"), "--out", str(tmp_path / "again")],
                 ["--resume", "--out", str(run), "--import", "json"]):
        config, tc = build_configs(_parser().parse_args(argv))
        assert config.model == MODEL
        assert tc.imports == ((MODULE, "json") if "--import" in argv else (MODULE,))


def test_a_module_that_cannot_be_imported_is_named(trained, tmp_path, capsys):
    """A recorded module that is not importable here: a ValueError naming it and the run and
    saying how to fix it, from the library and from the CLIs (exit 2)."""
    from experiments import evaluate as evaluate_cli
    from experiments import train as train_cli

    _forget_module()  # its folder is not on sys.path in this process
    message = (rf"the run {trained['run']} \(its config.json: train.imports\) names module '{MODULE}', which "
               r"cannot be imported here \(ModuleNotFoundError: .*\); .* on PYTHONPATH")
    with pytest.raises(ValueError, match=message):
        load_run(trained["run"])
    assert evaluate_cli.main(["--run", str(trained["run"])]) == 2
    assert f"names module '{MODULE}', which cannot be imported here" in capsys.readouterr().err
    assert train_cli.main(["--resume", "--out", str(trained["run"]), "--extend-steps", "1", "--quiet",
                           "--no-compile-cache"]) == 2
    assert "PYTHONPATH" in capsys.readouterr().err
    # a hand-made run.yaml naming a missing module: --config names it
    (tmp_path / "run.yaml").write_text("model: gpt\ntrain:\n  imports: [audit51_no_such_module]\n")
    assert train_cli.main(["--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "x"), "--quiet",
                           "--no-compile-cache"]) == 2
    err = capsys.readouterr().err
    assert "--config " in err and "train.imports audit51_no_such_module: ModuleNotFoundError" in err
    # a config.json naming a missing module (no checkpoint needed: the import comes first)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model": {"model": "gpt"},
                                                  "train": {"imports": ["audit51_no_such_module"]}}))
    with pytest.raises(ValueError, match=rf"the run {fake} .* names module 'audit51_no_such_module'"):
        load_run(fake)


def test_old_run_dirs_load_as_before(importable, tmp_path):
    """A config.json without the field (written before it existed) loads as before (the module
    imported by the caller, as then)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(importable["run"], old)
    saved = json.loads((old / "config.json").read_text())
    del saved["train"]["imports"]
    (old / "config.json").write_text(json.dumps(saved))
    __import__(MODULE)
    config, tc, _ = load_run(old)
    assert config.model == MODEL and tc.imports == ()


def test_library_resume_and_fine_tune_keep_the_modules(importable, tmp_path):
    """train() resuming a run with a train_config that does not name its modules, or fine-tuning
    from it (init_from), still records them: a fresh process could not load the new run else."""
    import dataclasses
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(importable["run"], run)
    config, tc, _ = load_run(run)
    bare = dataclasses.replace(tc, imports=(), out_dir=str(run), steps=tc.steps + 1, eval_batches=0)
    train(config, bare, resume=True, progress=False)
    assert json.loads((run / "config.json").read_text())["train"]["imports"] == [MODULE]
    ft = dataclasses.replace(bare, out_dir=str(tmp_path / "ft"), init_from=str(run), steps=1)
    train(config, ft, progress=False)
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["train"]["imports"] == [MODULE]


def test_train_config_imports():
    """Normalised to a tuple of module names (a string split at commas, duplicates dropped),
    checked, written as a list; train() imports them first."""
    assert TrainConfig(imports="a.b, c,a.b").imports == ("a.b", "c")
    assert TrainConfig(imports=["x"]).to_dict()["imports"] == ["x"]
    assert TrainConfig.from_dict(TrainConfig(imports=("x",)).to_dict()) == TrainConfig(imports=("x",))
    with pytest.raises(ValueError, match=r"imports: 'my-arch' is not a module name"):
        TrainConfig(imports=["my-arch"])
    with pytest.raises(ValueError, match=r"imports must be a list of module names"):
        TrainConfig(imports=3)
    with pytest.raises(ValueError, match=r"train_config.imports names module 'audit51_no_such_module'"):
        train(registry.get_config("gpt", "tiny"), TrainConfig(imports=("audit51_no_such_module",),
                                                               out_dir="/nonexistent/never-written"))


def test_generate_cli_on_nan_logits(importable, monkeypatch, capsys):
    """experiments.generate on a run whose parameters are NaN (a diverged run) is an error
    naming the prompt (exit 1) instead of printing arbitrary text."""
    import jaxformers.training as training
    from experiments import generate as generate_cli

    real = training.load_run

    def nan_run(path, **kw):
        config, tc, params = real(path, **kw)
        return config, tc, jax.tree.map(lambda x: x * jnp.nan, params)
    monkeypatch.setattr(training, "load_run", nan_run)
    rc = generate_cli.main(["--run", str(importable["run"]), "--prompt", "the", "--max-new-tokens", "3",
                            "--num-samples", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"model '{MODEL}' produced logits that no token can be drawn from" in err
    assert "first for new token 0 of row 0" in err and "(row 0 is prompt 0, sample 0;" in err
