"""Stop 56: regression tests of my own fixes (carry-overs of stop 55's notes)."""
import shutil

from test_train_ux import TINY, base_run, env, loss_rows  # noqa: F401 - the module's fixtures

from experiments import train as train_cli


def test_init_from_and_resume_survive_a_deleted_source(env, base_run, capsys):
    """A fine-tuning job script passes ``--init-from SRC --resume`` on every start; once SRC is
    deleted the run (which holds its config and loss) is continued from its checkpoint
    (it was a FileNotFoundError reading SRC's config.json); another source is still refused."""
    src = env["root"] / "src_copy56"
    shutil.copytree(base_run, src)
    run = env["root"] / "ft56"
    flags = TINY[TINY.index("--batch-size"):] + ["--checkpoint-every", "1"]

    def command(source, *extra):
        return ["--init-from", str(source), "--data", env["corpus"], "--out", str(run)] + flags + list(extra)

    assert train_cli.main(command(src, "--steps", "2", "--resume")) == 0
    shutil.rmtree(src)
    capsys.readouterr()
    assert train_cli.main(command(src, "--steps", "3", "--resume")) == 0, capsys.readouterr().err
    assert [r[0] for r in loss_rows(run)] == [1, 2, 3]
    gone = env["root"] / "never_there56"
    assert train_cli.main(command(gone, "--steps", "4", "--resume")) == 2
    assert f"started with init_from={str(src)!r}" in capsys.readouterr().err


def test_a_no_op_resume_puts_back_a_config_json_left_ahead(env, base_run, caplog):
    """A resume killed after writing config.json / run.yaml and before its first checkpoint was
    complete left them ahead (here an extension to 9 steps that never took); a resume that then
    trains nothing put nothing back, so ``load_run`` reported 9 steps for a run of 4."""
    import json

    from jaxformers.training import load_run
    from jaxformers.training.rundir import CONFIG_FILE, RUN_FILE

    run = base_run.parent / "ahead56"
    shutil.copytree(base_run, run)
    before = {name: (run / name).read_text() for name in (CONFIG_FILE, RUN_FILE)}
    ahead = json.loads(before[CONFIG_FILE])
    ahead["train"]["steps"] = 9
    (run / CONFIG_FILE).write_text(json.dumps(ahead, indent=2, sort_keys=True) + "\n")
    (run / RUN_FILE).write_text(before[RUN_FILE].replace("steps: 4", "steps: 9"))
    assert load_run(run)[1].steps == 9
    assert train_cli.main(["--out", str(run), "--resume", "--quiet"]) == 0
    assert "was ahead of the checkpoint of step 4" in caplog.text
    assert {name: (run / name).read_text() for name in (CONFIG_FILE, RUN_FILE)} == before
    assert load_run(run)[1].steps == 4
    caplog.clear()
    assert train_cli.main(["--out", str(run), "--resume", "--quiet"]) == 0  # consistent: left alone
    assert "was ahead" not in caplog.text


def test_close_closes_the_manager_when_the_wait_reraises_a_save_error(tmp_path, monkeypatch):
    """``Checkpointer.close()`` re-raising a background save's error left the orbax manager open."""
    import jax.numpy as jnp
    import pytest

    from jaxformers.training.checkpoint import Checkpointer

    def failing(self, step):
        raise OSError("disk full")

    monkeypatch.setattr(Checkpointer, "_finalize", failing)
    ckpt = Checkpointer(tmp_path / "run", async_save=True)
    tree = {"w": jnp.arange(4.0)}
    ckpt.save(1, tree, tree, {})  # its finalizer fails in the background
    manager = ckpt._manager
    closed = []
    real_close = type(manager).close
    monkeypatch.setattr(type(manager), "close", lambda self: (closed.append(self), real_close(self)))
    with pytest.raises(OSError, match="disk full"):
        ckpt.close()
    assert closed == [manager] and ckpt._manager is None


def test_help_names_the_built_in_corpora_and_what_the_default_data_is(capsys):
    """``--help`` said ``(default default)`` for ``--data``."""
    import pytest

    from jaxformers.data.corpus import _ALIASES, list_corpora

    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default default" not in text
    assert "built in: " + ", ".join(list_corpora()) + " (default: 'default', an alias of shakespeare)" in text
    assert _ALIASES[train_cli.DEFAULTS["data"]] == "shakespeare"


def test_the_progress_eta_counts_to_stop_after(env, tmp_path, monkeypatch):
    """With ``stop_after`` the progress display (bar total, ETA) counted to ``steps``: a call
    stopping at step 2 of 40 showed an ETA for 38 steps it never trains."""
    import jaxformers as jf
    from jaxformers.training import TrainConfig, train, trainer

    seen = []
    real = trainer.Progress

    def spy(mode, total, initial):
        seen.append((total, initial))
        return real(mode, total, initial)

    monkeypatch.setattr(trainer, "Progress", spy)
    config = jf.get_config("gpt", "tiny", vocab_size=257, d_model=32, n_layer=1, n_head=4, max_seq_len=32)
    tc = TrainConfig(steps=40, batch_size=4, seq_len=32, data=env["corpus"], out_dir=str(tmp_path / "r"),
                     log_every=1, eval_every=0, eval_batches=0, checkpoint_every=0)
    train(config, tc, stop_after=2, progress=False)
    assert seen == [(2, 0)]


def test_a_second_experiment_into_a_busy_out_is_refused(tmp_path):
    """Two invocations of an experiment into one ``--out`` both retrained ``OUT/runs/<name>`` and
    wrote one ``results.json``; ``start_results`` now locks the folder for the process."""
    import os
    import subprocess
    import sys

    import pytest

    from experiments.common import start_results
    from jaxformers.training.rundir import RunDirBusy

    out = tmp_path / "exp"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from experiments.common import start_results; "
         f"start_results({str(out)!r}); print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(RunDirBusy, match=f"in use by another experiment \\(pid {holder.pid}\\)"):
            start_results(out)
    finally:
        holder.communicate("", timeout=60)
    start_results(out)
    start_results(out)  # the same process again: it holds the lock already


def test_evaluate_takes_a_mesh_object_as_load_run_does(env, base_run):
    """``evaluate(mesh=<Mesh>)`` failed with a "bad entry" error of the Mesh's repr (``load_run``
    and ``generate`` take a Mesh); anything else is a ValueError naming ``mesh``."""
    import pytest

    from jaxformers.training import evaluate
    from jaxformers.training.mesh import make_mesh

    kw = dict(batch_size=4, seq_len=32, max_batches=1)
    spec = evaluate(str(base_run), mesh="data=1", **kw)
    mesh = evaluate(str(base_run), mesh=make_mesh("data=1"), **kw)
    assert mesh["val_loss"] == spec["val_loss"] and mesh["val_tokens"] == spec["val_tokens"]
    with pytest.raises(ValueError, match="mesh must be None"):
        evaluate(str(base_run), mesh=2, **kw)


def test_a_blank_generate_mesh_is_no_mesh():
    """``generate(mesh=" ")`` / ``--mesh " "`` decoded on every local device (a blank spec is every
    device on ``data``), ``mesh=None`` / no flag on one; a blank spec is None now, as in training."""
    from jaxformers.decoding import _check_mesh

    assert _check_mesh(" ") is None and _check_mesh("") is None and _check_mesh(None) is None
    assert _check_mesh("data=1") is not None


def test_a_broken_tokenizer_config_json_is_a_value_error_naming_it(tmp_path):
    """``load_tokenizer`` / ``HFTokenizer`` of a directory whose ``tokenizer_config.json`` is not a
    JSON object raised a bare ``JSONDecodeError`` / ``AttributeError`` naming no file."""
    import pytest

    from jaxformers.data import load_tokenizer
    from jaxformers.data.tokenizer import HFTokenizer, get_tokenizer

    get_tokenizer("byte").save(tmp_path / "byte")
    for text in ('{"type": "by', "[1, 2]", "version https://git-lfs.github.com/spec/v1\n"):
        (tmp_path / "byte" / "tokenizer_config.json").write_text(text)
        with pytest.raises(ValueError, match="tokenizer_config.json"):
            load_tokenizer(tmp_path / "byte")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small text gives fewer tokens than asked for
        get_tokenizer("bpe:300").train(["hello world the quick brown fox"] * 50).save(tmp_path / "bpe")
    (tmp_path / "bpe" / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        HFTokenizer(tmp_path / "bpe")


def test_hf_hidden_act_swish_is_silu():
    """transformers' ``hidden_act: "swish"`` is SiLU (``ACT2FN["swish"]``); it was refused."""
    import pytest

    from jaxformers.convert import config_from_hf, config_from_hf_mamba
    from test_audit56_hf import LLAMA, MAMBA

    assert config_from_hf({**LLAMA, "hidden_act": "swish"}) == config_from_hf({**LLAMA, "hidden_act": "silu"})
    assert (config_from_hf_mamba({**MAMBA, "hidden_act": "swish"})
            == config_from_hf_mamba({**MAMBA, "hidden_act": "silu"}))
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf({**LLAMA, "hidden_act": "gelu"})
