"""Audit 55, checkpoints / run directories / resume, "nothing lost on interruption".

* ``experiments.train --extend-steps N`` (and ``--resume``) built the run's config from
  ``config.json``, which a resume writes just before its first checkpoint: one killed during
  that save left ``config.json`` ahead of the checkpoints, and the same ``--extend-steps N``
  command retried extended the run twice (a 4-step run + 4 became 12 steps, 8 when the kill
  landed a moment earlier).  It now reads the config ``train`` itself resumes from
  (``rundir.resume_config``: the newest complete checkpoint's copy).
* A resume that trains nothing (a finished run resumed again, e.g. by a job script that always
  passes ``--resume``) rewrote ``summary.json`` with its own numbers: ``tokens_per_s`` /
  ``mfu`` ``None``, the ``wall_s`` / ``compile_s`` of reopening the run (a fraction of a second),
  the machine and versions of the call that merely reopened it.  It now keeps those of the
  training that reached that step.
* ``Checkpointer(async_save="no")`` saved asynchronously (truthiness), ``restore(True)`` looked
  for a folder named ``True`` and, unverified, reported a checkpoint "deleted while it was being
  restored"; ``ValueError`` naming the argument now.
* ``Checkpointer.wait`` forgot the background finalizer before joining it: a join cut short (a
  second Ctrl-C while a big checkpoint is hashed) made ``close()`` run ``_finalize`` again beside it.
* ``load_run(mesh="data=1")`` was an ``AttributeError`` deep in the sharding code; an ``out_dir``
  that is a file (or lies below one) an ``OSError`` (a traceback from ``experiments.train``).
"""
import json
import shutil

import pytest

import jaxformers as jf
from jaxformers.training import CompileCache, TrainConfig, train
from jaxformers.training.checkpoint import Checkpointer

CACHE = CompileCache(max_entries=2)


def _tiny_gpt():
    return jf.get_config("gpt", "tiny", vocab_size=257, n_layer=1, d_model=32, n_head=2, max_seq_len=32)


def _tc(corpus, out, **kw):
    base = dict(steps=4, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=1, data=corpus, out_dir=str(out),
                eval_every=2, eval_batches=1, log_every=1, checkpoint_every=2, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """``(corpus, run_dir, summary)``: a finished 4-step run (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("audit55_ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXFORMERS_CACHE", str(root / "cache"))
        corpus = root / "corpus.txt"
        corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
        run = root / "run"
        summary = train(_tiny_gpt(), _tc(str(corpus), run), progress=False, cache=CACHE)
        yield str(corpus), run, summary


@pytest.fixture
def env(finished, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    return finished


def test_a_retried_extension_builds_on_the_checkpoints_config_not_a_config_json_ahead(env, tmp_path):
    from experiments import train as train_cli

    corpus, base_run, _ = env
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    # `--extend-steps 4` killed during its first save: config.json (written just before it) says 8
    # steps, the newest complete checkpoint (step 4) was trained with 4
    config = json.loads((run / "config.json").read_text())
    config["train"]["steps"] = 8
    (run / "config.json").write_text(json.dumps(config))
    args = train_cli._parser().parse_args(["--extend-steps", "4", "--out", str(run)])
    _, tc = train_cli.build_configs(args)
    assert tc.steps == 8  # was 12: extended twice
    # --resume continues from the checkpoint's config too (the killed command's changes never took)
    args = train_cli._parser().parse_args(["--resume", "--out", str(run)])
    _, tc = train_cli.build_configs(args)
    assert tc.steps == 4


def test_a_resume_that_trains_nothing_keeps_the_runs_throughput(env, tmp_path):
    corpus, base_run, first = env
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    assert first["tokens_per_s"] is not None
    summary = train(_tiny_gpt(), _tc(corpus, run), resume=True, progress=False, cache=CACHE)
    assert summary["trained_steps"] == 0 and summary["finished"] and summary["resumed_from"] == 4
    saved = json.loads((run / "summary.json").read_text())
    for s in (summary, saved):
        # were None / the fraction of a second this call took
        assert s["tokens_per_s"] == first["tokens_per_s"] and s["wall_s"] == first["wall_s"]
        assert s["compile_s"] == first["compile_s"] and s["val_loss"] == first["val_loss"]


def test_checkpointer_refuses_a_non_bool_flag_and_a_non_int_step(env, tmp_path):
    _, run, _ = env
    with pytest.raises(ValueError, match="async_save must be a bool"):
        Checkpointer(tmp_path / "x", async_save="no")
    ckpt = Checkpointer(run)
    try:
        for step in (True, 2.0, "2"):
            with pytest.raises(ValueError, match="Checkpointer.restore: step must be an int"):
                ckpt.restore(step, None, verify=False)
        with pytest.raises(ValueError, match="verify must be a bool"):
            ckpt.restore(2, None, verify="no")
    finally:
        ckpt.close()


def test_a_wait_cut_short_never_finalizes_a_save_twice(tmp_path, monkeypatch):
    """A second Ctrl-C while ``save`` waits for the previous save's background finalizer (hashing a
    big checkpoint) interrupted the join; ``close()`` (the trainer's ``finally``) then ran
    ``_finalize`` again in the main thread beside the still-running background one."""
    import threading
    import time

    import jax.numpy as jnp

    calls = []
    real = Checkpointer._finalize

    def slow(self, step):
        calls.append(step)
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.3)  # the background thread still hashing when the join is cut short
        return real(self, step)

    monkeypatch.setattr(Checkpointer, "_finalize", slow)
    ckpt = Checkpointer(tmp_path / "run")
    tree = {"w": jnp.arange(4.0)}
    ckpt.save(1, tree, tree, {}, files={"a.json": "{}"})
    real_join = threading.Thread.join

    def interrupted_join(self, *a, **k):
        monkeypatch.setattr(threading.Thread, "join", real_join)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "join", interrupted_join)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, tree, tree, {})
    ckpt.close()
    assert calls == [1]  # was [1, 1]: finalized by both threads
    assert ckpt.latest_step() == 1 and "a.json" in ckpt.verify(1)["files"]


def test_load_run_takes_a_mesh_spec_and_refuses_other_meshes(env):
    """``load_run(mesh="data=1")`` (the spec ``evaluate(mesh=)`` / ``TrainConfig.mesh`` take) was an
    ``AttributeError: 'str' object has no attribute 'size'`` deep in the sharding code."""
    import jax

    from jaxformers.training import load_run

    _, run, _ = env
    _, _, params = load_run(run, mesh="data=1")
    _, _, ref = load_run(run)
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
    with pytest.raises(ValueError, match="mesh must be None .* a jax.sharding.Mesh or a mesh spec"):
        load_run(run, mesh=3)


@pytest.mark.parametrize("sub", ["", "run"])
def test_an_out_dir_blocked_by_a_file_is_a_value_error_naming_the_file(tmp_path, sub):
    """``out_dir`` an existing file (or below one): ``FileExistsError: [Errno 17]`` /
    ``NotADirectoryError`` from the lock's mkdir (the latter a traceback from the CLI)."""
    from jaxformers.training.rundir import run_lock

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=f"cannot be created: {blocker} is a file, not a folder"):
        with run_lock(blocker / sub if sub else blocker):
            pass
