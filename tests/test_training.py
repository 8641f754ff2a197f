"""Trainer, checkpoints and experiment CLIs on a tiny model and a tiny synthetic corpus."""
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.config import TransformerConfig
from jaxformers.layers import Block
from jaxformers.models.transformer import Transformer
from jaxformers.registry import register
from jaxformers.training import apply_model, next_token_targets
from jaxformers.training import CheckpointError, CompileCache, TrainConfig, load_run, read_metrics
from jaxformers.training import evaluate as _evaluate
from jaxformers.training import train as _train
from jaxformers.training.checkpoint import MANIFEST
from jaxformers.training.mesh import parse_mesh
from jaxformers.training.optim import decay_mask, make_schedule
from toy_models import SowMLP as _SowMLP

REPO = Path(__file__).resolve().parents[1]
LOSS_KEYS = ("step", "loss", "lr", "grad_norm")
# One explicit compile cache for the in-process runs of this module (runs of the same model
# and optimizer share their compiled programs).
CACHE = CompileCache(max_entries=8)
train = functools.partial(_train, cache=CACHE)
evaluate = functools.partial(_evaluate, cache=CACHE)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny corpus + a private jaxformers cache (and XLA cache for subprocesses)."""
    root = tmp_path_factory.mktemp("training")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    for i in range(4):
        text = " ".join(rng.choice(words, size=1500))
        (corpus / f"doc{i}.txt").write_text(text + ".\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXFORMERS_CACHE", str(root / "cache"))
        yield {"root": root, "corpus": str(corpus),
               "sub_env": dict(os.environ, JAXFORMERS_CACHE=str(root / "cache"),
                               JAX_COMPILATION_CACHE_DIR=str(root / "xla"),
                               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                               JAX_DEFAULT_MATMUL_PRECISION="highest",  # XLA_FLAGS: conftest's
                               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))}


def tiny_model(**kw):
    return jf.get_config("gpt", "tiny", **{**dict(vocab_size=257, d_model=32, n_layer=1, n_head=4,
                                                   max_seq_len=32), **kw})


def tiny_train(env, out, **kw):
    base = dict(steps=6, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, data=env["corpus"],
                out_dir=str(out), log_every=1, eval_every=3, eval_batches=2, checkpoint_every=3,
                keep_checkpoints=3)
    base.update(kw)
    return TrainConfig(**base)


def loss_rows(run_dir):
    return [{k: r[k] for k in LOSS_KEYS} for r in read_metrics(run_dir) if "loss" in r]


def val_rows(run_dir):
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]


def tree_digest(path):
    """{relative path: sha256} of every file under ``path``."""
    path = Path(path)
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_run(env):
    """Uninterrupted 6-step run (checkpoints at 3 and 6)."""
    out = env["root"] / "ref"
    summary = train(tiny_model(), tiny_train(env, out), progress=False)
    return out, summary


# ----------------------------------------------------------------------------- configs / optim
def test_train_config_validation():
    with pytest.raises(ValueError, match=r"schedule='linear'.*cosine"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match=r"dtype='float16'.*bfloat16"):
        TrainConfig(dtype="float16")
    with pytest.raises(ValueError, match=r"grad_accum=3 must divide batch_size=8"):
        TrainConfig(batch_size=8, grad_accum=3)
    with pytest.raises(ValueError, match=r"steps must be an int >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"min_lr_ratio must be in \[0.0, 1.0\]"):
        TrainConfig(min_lr_ratio=2.0)
    with pytest.raises(ValueError, match=r"unknown config field"):
        TrainConfig().replace(stepz=3)
    with pytest.raises(ValueError, match=r"AXIS one of \['data', 'fsdp', 'expert', 'tensor'\]"):
        TrainConfig(mesh="model=2")
    assert parse_mesh("fsdp=2") == {"data": 1, "fsdp": 2, "expert": 1, "tensor": 1}
    assert parse_mesh("expert=2") == {"data": 1, "fsdp": 1, "expert": 2, "tensor": 1}
    tc = TrainConfig(batch_size=8, grad_accum=2)
    assert TrainConfig.from_dict(json.loads(tc.to_json())) == tc


def test_schedules_and_decay_mask():
    tc = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    cos = make_schedule(tc)
    assert float(cos(0)) == pytest.approx(0.1)
    assert float(cos(9)) == pytest.approx(1.0)
    assert float(cos(55)) == pytest.approx(0.55, abs=1e-6)
    assert float(cos(100)) == pytest.approx(0.1)
    wsd = make_schedule(tc.replace(schedule="wsd", decay_fraction=0.2))
    assert float(wsd(79)) == pytest.approx(1.0) and float(wsd(90)) == pytest.approx(0.55)
    assert float(wsd(100)) == pytest.approx(0.1)
    const = make_schedule(tc.replace(schedule="constant"))
    assert float(const(99)) == pytest.approx(1.0)

    import jax
    import flax.linen as nn

    for scan in (False, True):
        module = jf.build(tiny_model(scan_layers=scan, n_layer=2))
        boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))
        mask = decay_mask(nn.get_partition_spec(boxed)["params"], nn.unbox(boxed)["params"])
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
                for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
        assert flat["embed/embedding"] is True
        assert any(v for k, v in flat.items() if k.endswith("q/kernel"))
        assert all(v is False for k, v in flat.items() if k.endswith("scale")), flat


# ----------------------------------------------------------------------------- training
def test_determinism_and_run_files(env, reference_run):
    ref, summary = reference_run
    again = env["root"] / "again"
    train(tiny_model(), tiny_train(env, again), progress=False)
    assert loss_rows(ref) == loss_rows(again)  # bit-identical
    assert val_rows(ref) == val_rows(again)
    rows = loss_rows(ref)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for name in ("config.json", "metrics.jsonl", "summary.json", "loss.png",
                 "tokenizer/tokenizer_config.json"):
        assert (ref / name).is_file(), name
    saved = json.loads((ref / "config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["train"]["steps"] == 6
    assert summary["finished"] and summary["final_step"] == 6
    from jaxformers.utils import abstract_param_count
    assert summary["n_params"] == abstract_param_count(jf.build(tiny_model()))
    assert summary["val_ppl"] == pytest.approx(np.exp(summary["val_loss"]))
    assert summary["mfu"] is None  # CPU: no peak-FLOPs entry
    # different seed -> different losses
    other = env["root"] / "seed1"
    train(tiny_model(), tiny_train(env, other, seed=1), progress=False, stop_after=1)
    assert loss_rows(other)[0]["loss"] != rows[0]["loss"]


def test_resume_matches_uninterrupted_run(env, reference_run):
    ref, _ = reference_run
    out = env["root"] / "resumed"
    tc = tiny_train(env, out)
    part = train(tiny_model(), tc, progress=False, stop_after=4)  # checkpoints 3 and 4
    assert not part["finished"] and part["final_step"] == 4
    assert [r["step"] for r in loss_rows(out)] == [1, 2, 3, 4]
    # Crash before checkpoint 4 was written: rows 4 must be dropped, training replays from 3.
    shutil.rmtree(out / "checkpoints" / "4")
    summary = train(tiny_model(), tc, resume=True, progress=False)
    assert summary["resumed_from"] == 3 and summary["finished"]
    assert loss_rows(out) == loss_rows(ref)  # exact, no duplicated rows
    assert val_rows(out) == val_rows(ref)
    # Everything done already: resuming again trains nothing and reports the same losses.
    again = train(tiny_model(), tc, resume=True, progress=False)
    assert again["resumed_from"] == 6 and again["train_loss"] == summary["train_loss"]
    assert loss_rows(out) == loss_rows(ref)


def test_resume_may_change_how_not_what_the_model_computes(env, reference_run, caplog):
    """``remat`` (and the kernel choices, ``rundir.IMPLEMENTATION_FIELDS``) may change on a resume,
    e.g. after running out of memory: the curve continues, the message names the change, and
    config.json records it; any other model field still refuses the resume."""
    import json
    ref, _ = reference_run
    out = env["root"] / "remat_resumed"
    tc = tiny_train(env, out)
    train(tiny_model(), tc, progress=False, stop_after=3)
    with caplog.at_level("INFO"):
        summary = train(tiny_model(remat="full"), tc, resume=True, progress=False)
    assert summary["resumed_from"] == 3 and summary["finished"]
    assert "resuming with other implementation settings: remat: 'none' -> 'full'" in caplog.text
    got, want = loss_rows(out), loss_rows(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5)
    assert json.loads((out / "config.json").read_text())["model"]["remat"] == "full"
    with pytest.raises(ValueError, match="only remat, attention_impl"):
        train(tiny_model(remat="full", norm_eps=1e-3), tc, resume=True, progress=False)


def test_existing_run_is_not_clobbered_and_resume_without_checkpoint(env, reference_run):
    ref, _ = reference_run
    before = tree_digest(ref)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_model(), tiny_train(env, ref), progress=False)
    assert tree_digest(ref) == before
    # a different model config cannot resume the run
    with pytest.raises(ValueError, match="d_model"):
        train(tiny_model(d_model=64), tiny_train(env, ref), resume=True, progress=False)
    assert tree_digest(ref) == before
    # resume=True with nothing to resume starts from scratch (documented policy)
    fresh = env["root"] / "fresh"
    summary = train(tiny_model(), tiny_train(env, fresh), resume=True, progress=False, stop_after=2)
    assert summary["resumed_from"] is None and not summary["finished"]
    assert loss_rows(fresh) == loss_rows(ref)[:2]


def test_one_run_per_directory_and_no_shortening(env, reference_run, caplog):
    """A second training process into a busy run directory is refused (it would mix config.json /
    metrics.jsonl and clash on checkpoints); resuming with steps below the checkpointed step is
    refused before anything is rewritten; a resume on another data path is a logged warning."""
    from jaxformers.training.rundir import RunDirBusy, run_lock
    ref, _ = reference_run
    busy = env["root"] / "busy"
    with run_lock(busy):  # as if another process were training there
        with pytest.raises(RunDirBusy, match=f"in use by another training process \\(pid {os.getpid()}\\)"):
            train(tiny_model(), tiny_train(env, busy), progress=False)
    run = _copy_run(ref, env["root"] / "shorten")
    before = tree_digest(run)
    with pytest.raises(ValueError, match="steps=4 is below the step 6 checkpointed"):
        train(tiny_model(), tiny_train(env, run, steps=4), resume=True, progress=False)
    assert tree_digest(run) == before
    with caplog.at_level("WARNING", logger="jaxformers"):
        train(tiny_model(), tiny_train(env, run, steps=7, seed=5), resume=True, progress=False)
    assert "another data path" in caplog.text and "seed: 0 -> 5" in caplog.text


def test_evaluate_argument_checks(env, reference_run):
    ref, _ = reference_run
    for kw, match in ((dict(max_batches=-5), "max_batches"), (dict(max_batches=0), "max_batches"),
                      (dict(batch_size=0), "batch_size"), (dict(seq_len=0), "seq_len"),
                      (dict(model_overrides={"no_such_field": 1}), "unknown config field"),
                      (dict(model_overrides={"n_layer": 2}),
                       r"do not fit the model config with model_overrides=\{'n_layer': 2\}")):
        with pytest.raises(ValueError, match=match):
            evaluate(ref, **kw)
    # a run trained without evaluation (eval_batches=0): -1 means the whole split, not nothing
    run = _copy_run(ref, env["root"] / "no_eval")
    saved = json.loads((run / "config.json").read_text())
    saved["train"]["eval_batches"] = 0
    (run / "config.json").write_text(json.dumps(saved))
    assert evaluate(run)["val_tokens"] == evaluate(ref, max_batches=None)["val_tokens"] > 0


def test_prepared_dataset_tokenizer_must_match(env, tmp_path):
    from jaxformers.data import open_data, prepare
    ds = prepare(env["corpus"], "byte", out_dir=tmp_path / "ds")
    assert open_data(str(ds), "byte").vocab_size == 257  # "byte": the dataset's own tokenizer
    with pytest.raises(ValueError, match="differs from the tokenizer 'byte'"):
        open_data(str(ds), "bpe:300")


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupt_or_partial_checkpoints(env, reference_run):
    ref, _ = reference_run
    model = tiny_model()

    def data_files(step_dir):
        return sorted(p for p in (step_dir / "params").rglob("*") if p.is_file() and p.stat().st_size > 64
                      and "ocdbt" in str(p))

    # 1) truncated data file -> clear error, nothing modified
    run = _copy_run(ref, env["root"] / "corrupt_trunc")
    victim = data_files(run / "checkpoints" / "6")[0]
    victim.write_bytes(victim.read_bytes()[:10])
    before = tree_digest(run)
    with pytest.raises(CheckpointError, match=r"checkpoints/6 is corrupt: .*size"):
        train(model, tiny_train(env, run), resume=True, progress=False)
    assert tree_digest(run) == before
    with pytest.raises(CheckpointError, match="corrupt"):
        load_run(run)

    # 2) same size, flipped bytes -> checksum mismatch
    run = _copy_run(ref, env["root"] / "corrupt_flip")
    victim = data_files(run / "checkpoints" / "6")[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        train(model, tiny_train(env, run), resume=True, progress=False)

    # 3) a removed item directory -> missing files
    run = _copy_run(ref, env["root"] / "corrupt_rmdir")
    shutil.rmtree(run / "checkpoints" / "6" / "opt_state")
    before = tree_digest(run)
    with pytest.raises(CheckpointError, match="missing file opt_state/"):
        train(model, tiny_train(env, run), resume=True, progress=False)
    assert tree_digest(run) == before

    # 4) garbage manifest
    run = _copy_run(ref, env["root"] / "corrupt_manifest")
    (run / "checkpoints" / "6" / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_run(run)

    # 5) incomplete newest save (no manifest: killed while saving) -> moved aside, resume from 3,
    #    and the finished curve equals the uninterrupted one.
    run = _copy_run(ref, env["root"] / "partial")
    (run / "checkpoints" / "6" / MANIFEST).unlink()
    good = tree_digest(run / "checkpoints" / "3")
    summary = train(model, tiny_train(env, run), resume=True, progress=False)
    assert summary["resumed_from"] == 3
    assert len(list((run / "checkpoints.incomplete").iterdir())) == 1
    assert loss_rows(run) == loss_rows(ref)
    assert tree_digest(run / "checkpoints" / "3") == good


def test_evaluate_and_load_run(env, reference_run):
    ref, summary = reference_run
    model_config, train_config, params = load_run(ref)
    assert model_config == tiny_model() and train_config.steps == 6
    result = evaluate(ref)
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    result2 = evaluate((model_config, {"params": params}), env["corpus"], max_batches=1)
    assert np.isfinite(result2["val_loss"]) and result2["val_tokens"] == 8 * 32


# ----------------------------------------------------------------------------- losses, aux, data


class _SowLM(Transformer):
    def block_class(self):
        return Block.using(mlp=_SowMLP)


register("test-aux-sow", TransformerConfig, _SowLM,
         {"tiny": dict(vocab_size=257, d_model=32, n_layer=2, n_head=4, max_seq_len=32)})


def test_aux_loss_is_added_with_its_weight_and_logged(env, capsys):
    """The sown ``toy`` loss is weighted into the optimised objective (``total_loss``) and logged
    by name (that the weighted term is differentiated is checked in test_losses.py)."""
    out = env["root"] / "aux"
    tc = tiny_train(env, out, steps=4, grad_accum=2, eval_batches=0, checkpoint_every=0,
                    aux_loss_weights={"toy": 0.5})
    train(jf.get_config("test-aux-sow", "tiny"), tc, progress=None)  # lines on stderr (not a terminal)
    assert json.loads((out / "config.json").read_text())["train"]["aux_loss_weights"] == {"toy": 0.5}
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["aux/toy"] > 0 and r["total_loss"] == pytest.approx(r["loss"] + 0.5 * r["aux/toy"], rel=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "aux/toy=" in capsys.readouterr().err  # the progress lines name it too


def _smoothed_ce(module, params, batch, rng):
    """A custom loss from Python: cross-entropy with label smoothing."""
    logits, _ = apply_model(module, params, batch, rng)
    targets, w = next_token_targets(batch)
    labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), 0.1)
    per_token = optax.softmax_cross_entropy(logits, labels)
    return jnp.sum(per_token * w) / jnp.sum(w), {"n_targets": jnp.sum(w)}


def test_custom_loss_from_python_and_unknown_loss_name(env):
    out = env["root"] / "custom_loss"
    with pytest.raises(ValueError, match=r"unknown loss='nope'; choose one of \[.*'cross_entropy'"):
        train(tiny_model(), tiny_train(env, out, loss="nope"), progress=False)
    assert not out.exists()
    summary = train(tiny_model(), tiny_train(env, out, eval_batches=1, checkpoint_every=0), progress=False,
                    loss_fn=_smoothed_ce)
    rows = loss_rows(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3, rows
    assert summary["loss_fn"].endswith("test_training._smoothed_ce")
    assert json.loads((out / "config.json").read_text())["loss_fn"] == summary["loss_fn"]


def test_synthetic_task_with_loss_mask_and_segments(env):
    from jaxformers.data import open_data
    from jaxformers.training import cross_entropy

    out = env["root"] / "arith"
    data = "synthetic:arithmetic:n_digits=2,worked_steps=0"  # 11 tokens: 2 examples per row of 32
    model = tiny_model(vocab_size=18)
    tc = tiny_train(env, out, data=data, steps=10, lr=1e-2, eval_every=0, eval_batches=2, checkpoint_every=0)
    summary = train(model, tc, progress=False)
    rows = loss_rows(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, rows
    saved = json.loads((out / "config.json").read_text())
    assert saved["dataset"]["source"] == data and saved["dataset"]["vocab_size"] == 18
    # the logged loss of step 1 is the masked, segment-aware loss of batch 0 at the initial params
    batch = open_data(data).train_loader(tc.batch_size, tc.seq_len, tc.seed).batch_dict_at(0)
    assert set(batch) == {"tokens", "loss_mask", "segment_ids"}
    module = jf.build(model)
    params = jax.jit(lambda r: nn.unbox(module.init(r, jnp.zeros((1, 8), jnp.int32)))["params"])(
        jax.random.PRNGKey(tc.seed))
    loss, metrics = jax.jit(lambda p, b: cross_entropy(module, p, b))(params, batch)
    assert float(metrics["n_targets"]) == 2 * 8 * 6  # answer digits + EOS of 2 examples per row
    assert rows[0]["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert summary["val_loss"] is not None and summary["val_loss"] < rows[0]["loss"]  # fixed val rows


def test_resume_and_evaluate_an_old_format_run_dir(env, reference_run):
    """A run directory written before the loss / aux-loss / expert-axis fields existed."""
    ref, summary = reference_run
    run = _copy_run(ref, env["root"] / "old_format")
    saved = json.loads((run / "config.json").read_text())
    for key in ("loss", "aux_loss_weights"):
        del saved["train"][key]
    saved.pop("loss_fn", None)
    saved["mesh"] = "data=1,fsdp=1,tensor=1"
    (run / "config.json").write_text(json.dumps(saved))
    assert evaluate(run)["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    shutil.rmtree(run / "checkpoints" / "6")
    resumed = train(tiny_model(), tiny_train(env, run), resume=True, progress=False)
    assert resumed["resumed_from"] == 3 and resumed["finished"]
    assert loss_rows(run) == loss_rows(ref)


# ----------------------------------------------------------------------------- CLIs
def test_cli_bad_arguments_give_clean_errors(env, capsys):
    from experiments import train as train_cli

    code = train_cli.main(["--data", env["corpus"], "--set", "no_such_field=3", "--out",
                           str(env["root"] / "cli_bad")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown config field" in err and "no_such_field" in err and "Traceback" not in err
    bad_out = str(env["root"] / "cli_bad")
    code = train_cli.main(["--data", env["corpus"], "--set", "n_head=5", "--out", bad_out])
    err = capsys.readouterr().err
    assert code == 2 and "n_head=5" in err
    code = train_cli.main(["--data", env["corpus"], "--set", "oops", "--out", str(env["root"] / "cli_bad")])
    assert code == 2 and "FIELD=VALUE" in capsys.readouterr().err
    code = train_cli.main(["--data", env["corpus"], "--mesh", "data=3", "--out", bad_out])
    assert code == 2 and "must equal the device count" in capsys.readouterr().err
    assert not (env["root"] / "cli_bad" / "checkpoints").exists()


def test_cli_resume_continues_the_runs_own_config(env, reference_run, capsys):
    """--resume reads the run's config even when --model is given (it used to fall back to the
    CLI defaults: another batch size and length); another model is an error."""
    from experiments import train as train_cli
    ref, _ = reference_run
    run = str(_copy_run(ref, env["root"] / "cli_resume"))
    code = train_cli.main(["--model", "llama", "--resume", "--out", run, "--quiet", "--no-compile-cache"])
    assert code == 2 and "differs from the run's model 'gpt'" in capsys.readouterr().err
    code = train_cli.main(["--model", "gpt", "--resume", "--extend-steps", "1", "--out", run, "--quiet",
                           "--no-compile-cache"])
    assert code == 0
    saved = json.loads((Path(run) / "config.json").read_text())["train"]
    assert (saved["steps"], saved["batch_size"], saved["seq_len"]) == (7, 8, 32)


def test_cli_evaluate_and_generate(env, reference_run, capsys):
    from experiments import evaluate as eval_cli
    from experiments import generate as gen_cli

    ref, summary = reference_run
    assert eval_cli.main(["--run", str(ref)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert out["val_ppl"] == pytest.approx(np.exp(out["val_loss"]), rel=1e-6)
    assert gen_cli.main(["--run", str(ref), "--prompt", "the quick", "--max-new-tokens", "12",
                         "--top-k", "20", "--json", "--num-samples", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["samples"]) == 2 and all(isinstance(s, str) for s in out["samples"])
    greedy = ["--run", str(ref), "--prompt", "the quick", "--max-new-tokens", "8", "--temperature", "0", "--json"]
    assert gen_cli.main(greedy) == 0
    alone = json.loads(capsys.readouterr().out)
    assert gen_cli.main(greedy + ["--mesh", "data=1"]) == 0  # --mesh: the samples of one device
    assert json.loads(capsys.readouterr().out) == alone
    assert gen_cli.main(greedy + ["--mesh", "tensor=3"]) == 2
    assert "tensor=3" in capsys.readouterr().err
    assert gen_cli.main(["--run", str(env["root"] / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def _cli_args(env, out, steps):
    return ["--model", "gpt", "--preset", "tiny", "--set", "d_model=32", "--set", "n_layer=1",
            "--set", "n_head=4", "--set", "max_seq_len=32", "--data", env["corpus"], "--steps", str(steps),
            "--batch-size", "8", "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "5",
            "--eval-every", "0", "--log-every", "1", "--checkpoint-every", "4", "--out", str(out), "--quiet"]


def test_killed_process_resumes_on_the_same_curve(env):
    steps = 80
    out = env["root"] / "killed"
    cmd = [sys.executable, "-m", "experiments.train"] + _cli_args(env, out, steps)
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env["sub_env"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while not list((out / "checkpoints").glob(f"*/{MANIFEST}")):
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = max(r["step"] for r in read_metrics(out))
    assert done_before < steps, "the run finished before it could be killed"

    res = subprocess.run(cmd + ["--resume"], cwd=str(REPO), env=env["sub_env"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["finished"] and summary["resumed_from"] is not None and summary["resumed_from"] >= 4

    # reference: the same command, uninterrupted (a subprocess too: same flags, XLA cache hit)
    ref = env["root"] / "killed_ref"
    ref_cmd = [sys.executable, "-m", "experiments.train"] + _cli_args(env, ref, steps)
    res = subprocess.run(ref_cmd + ["--checkpoint-every", "0"], cwd=str(REPO), env=env["sub_env"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = loss_rows(out), loss_rows(ref)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # no duplicates, no gaps
    assert got == want


def test_sigterm_checkpoints_the_current_step_then_stops(env):
    """Preemption (SIGTERM): the step in flight finishes, is checkpointed, and the run stops."""
    out = env["root"] / "sigterm"
    cmd = [sys.executable, "-m", "experiments.train"] + _cli_args(env, out, 400) + ["--checkpoint-every", "0"]
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env["sub_env"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    try:
        while not (out / "metrics.jsonl").exists() or not read_metrics(out):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    summary = json.loads(stdout)
    assert not summary["finished"] and summary["stopped_by_signal"] == signal.SIGTERM
    saved = [int(p.parent.name) for p in (out / "checkpoints").glob(f"*/{MANIFEST}")]
    assert saved == [summary["final_step"]] and 0 < saved[0] < 400
    assert max(r["step"] for r in read_metrics(out)) == saved[0]
