"""The training CLI as a nanoGPT / Hugging Face user drives it: config files that reproduce a run,
fine-tuning from a run and from a HF Llama checkpoint (with its tokenizer.json), dropout, resume /
extend semantics, TensorBoard event files."""
import json
import logging
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.training import TrainConfig, evaluate, load_run, read_metrics
from jaxformers.training.losses import cross_entropy
from jaxformers.training.optim import lr_at

from experiments import info as info_cli
from experiments import train as train_cli

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
TINY = ["--model", "gpt", "--preset", "tiny", "--set", "d_model=32", "--set", "n_layer=1",
        "--set", "max_seq_len=32", "--batch-size", "8", "--seq-len", "32", "--log-every", "1",
        "--eval-every", "0", "--eval-batches", "2", "--checkpoint-every", "0", "--no-compile-cache",
        "--quiet"]


def loss_rows(run):
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run) if "loss" in r]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_ux")
    rng = np.random.default_rng(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, size=1200)) + ".\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXFORMERS_CACHE", str(root / "cache"))
        yield {"root": root, "corpus": str(corpus)}


@pytest.fixture(scope="module")
def base_run(env):
    """4 steps from a YAML config file (lr written as YAML reads it: a string) + flags on top."""
    cfg = env["root"] / "base.yaml"
    cfg.write_text(f"model: gpt\npreset: tiny\noverrides: {{n_head: 4}}\n"
                   f"train: {{steps: 40, lr: 3e-3, data: {env['corpus']}, seed: 1}}\n")
    out = env["root"] / "base"
    assert train_cli.main(["--config", str(cfg), "--steps", "4", "--out", str(out)] + TINY) == 0
    return out


def test_config_file_flags_and_run_file_reproduce_the_run(env, base_run, capsys):
    saved = json.loads((base_run / "config.json").read_text())
    assert saved["train"]["steps"] == 4 and saved["train"]["lr"] == 3e-3 and saved["train"]["seed"] == 1
    assert saved["model"]["n_head"] == 4 and saved["model"]["d_model"] == 32
    assert saved["train"]["warmup_steps"] is None and TrainConfig(**{
        k: v for k, v in saved["train"].items() if k != "aux_loss_weights"}).warmup == 0  # 10% of 4
    again = env["root"] / "again"
    assert train_cli.main(["--config", str(base_run / "run.yaml"), "--out", str(again), "--quiet",
                           "--no-compile-cache"]) == 0
    assert loss_rows(again) == loss_rows(base_run) and len(loss_rows(again)) == 4
    capsys.readouterr()
    bad = env["root"] / "bad.yaml"
    bad.write_text("modle: gpt\n")
    assert train_cli.main(["--config", str(bad), "--out", str(env["root"] / "x")]) == 2
    assert "unknown key(s) ['modle']" in capsys.readouterr().err


def test_help_lists_defaults_models_presets_and_fields(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    out = capsys.readouterr().out
    assert "(default 300)" in out and "presets: tiny" in out and "experiments.info --fields" in out
    assert "xla_force_host_platform_device_count" in out
    rows = info_cli.main(["--fields", "gpt"])
    names = {r["field"] for r in rows}
    assert {"dropout", "attn_dropout", "embed_dropout", "n_head", "warmup_fraction", "lr"} <= names
    with pytest.raises(SystemExit) as e:
        info_cli.main(["--seq-len", "-5"])
    assert e.value.code == 2 and "--seq-len must be a positive int" in capsys.readouterr().err


def test_tensorboard_events_hold_the_logged_scalars(base_run):
    assert sorted(base_run.glob("events.out.tfevents.*"))
    scalars = _read_scalars(base_run)
    rows = [r for r in read_metrics(base_run) if "loss" in r]
    assert scalars["train/loss"] == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in rows}
    assert scalars["train/lr"] == {r["step"]: pytest.approx(r["lr"], rel=1e-6) for r in rows}
    val = [r for r in read_metrics(base_run) if "val_loss" in r]
    assert scalars["val/loss"] == {r["step"]: pytest.approx(r["val_loss"], rel=1e-6) for r in val}


def tfevents(run_dir):
    """Every event of a run directory's event files, in file order: the TFRecord framing (u64
    length, u32 crc, payload, u32 crc), each payload parsed by tensorboardX's own Event proto."""
    from tensorboardX.proto import event_pb2

    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4


def _read_scalars(run_dir):
    """``{tag: {step: value}}`` of a run directory's event files: tensorboard's EventAccumulator
    when tensorboard is installed, else :func:`tfevents`."""
    out = {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        for event in tfevents(run_dir):
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
        return out
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return out


def test_resume_of_a_finished_run_trains_nothing_and_extending_keeps_the_lr(env, base_run, capsys, caplog):
    run = env["root"] / "extended"
    shutil.copytree(base_run, run)  # a finished 4-step run (resume takes --out as its directory)
    before = loss_rows(run)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert train_cli.main(["--resume", "--out", str(run), "--quiet", "--no-compile-cache"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trained_steps"] == 0 and summary["finished"]
    assert "already finished" in caplog.text and loss_rows(run) == before
    # a schedule change that moves the LR is refused ...
    assert train_cli.main(["--resume", "--out", str(run), "--steps", "8", "--lr", "1e-2", "--quiet",
                           "--no-compile-cache"]) == 2
    assert "moves the learning rate" in capsys.readouterr().err
    # ... extending continues at the final LR
    assert train_cli.main(["--extend-steps", "2", "--out", str(run), "--quiet", "--no-compile-cache"]) == 0
    rows = loss_rows(run)
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[:4] == before
    tc = load_run(run)[1]
    assert tc.steps == 6 and tc.schedule_steps == 4
    original = tc.replace(steps=4, schedule_steps=None)  # the run's own schedule, continued
    assert rows[4][2] == pytest.approx(lr_at(original, 4)) == pytest.approx(rows[5][2])
    assert rows[5][2] == pytest.approx(original.lr * original.min_lr_ratio)  # held at its final value


def test_dropout_changes_training_losses_not_eval(env, base_run):
    run = env["root"] / "dropout"
    assert train_cli.main(["--config", str(base_run / "run.yaml"), "--set", "dropout=0.3", "--set",
                           "attn_dropout=0.2", "--set", "embed_dropout=0.1", "--steps", "2", "--eval-batches", "0",
                           "--out", str(run), "--quiet", "--no-compile-cache"]) == 0
    assert loss_rows(run)[0][1] != loss_rows(base_run)[0][1]  # same init and batch, dropout on
    config, tc, params = load_run(run)
    assert config.dropout == 0.3
    plain = config.replace(dropout=0.0, attn_dropout=0.0, embed_dropout=0.0)
    got = evaluate((config, params), tc.data, seq_len=32, batch_size=8, max_batches=2)
    want = evaluate((plain, params), tc.data, seq_len=32, batch_size=8, max_batches=2)
    assert got["val_loss"] == want["val_loss"]
    # deterministic under the rng, another rng drops other units (no rng, as in eval: none dropped)
    module = jf.build(config)
    batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 17)), jnp.int32)}
    loss = jax.jit(lambda r: cross_entropy(module, params, batch, r)[0])
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    assert float(loss(k1)) == float(loss(k1)) != float(loss(k2))


def _training_refuses_attn_dropout(config, match):
    """Evaluation (no dropout rng) runs; training with ``attn_dropout`` raises ``match``; with
    ``attn_dropout=0`` residual dropout still trains."""
    module = jf.build(config)
    tokens = jnp.zeros((2, 16), jnp.int32)
    variables = module.init(jax.random.PRNGKey(0), tokens)
    module.apply(variables, tokens)  # no dropout rng: evaluation / generation
    with pytest.raises(ValueError, match=match):
        module.apply(variables, tokens, rngs={"dropout": jax.random.PRNGKey(1)})
    module = jf.build(config.replace(attn_dropout=0.0, dropout=0.1))  # residual dropout still applies
    module.apply(variables, tokens, rngs={"dropout": jax.random.PRNGKey(1)})


@pytest.mark.parametrize("model", ["hash_sparse", "landmark", "cotformer"])
def test_attn_dropout_on_a_model_that_cannot_apply_it_is_an_error_in_training(model):
    """Their attention (a sparse / landmark kernel, CoTFormer's repeat attention) has no attention
    dropout: training with it asks for a change instead of silently ignoring it; evaluation runs."""
    _training_refuses_attn_dropout(jf.get_config(model, "tiny", attn_dropout=0.1),
                                   r"attn_dropout=0.1.*does not implement attention dropout")


@pytest.mark.parametrize("model, overrides", [("mamba", {}), ("mamba2", {}), ("hybrid", {"attn_every": None})])
def test_attn_dropout_on_a_model_without_attention_is_an_error_in_training(model, overrides):
    """Audit 50: a pure Mamba / Mamba-2 model (or a hybrid without attention layers) trained with
    ``attn_dropout`` silently ignored it (ModelConfig documents a ValueError)."""
    config = jf.get_config(model, "tiny", attn_dropout=0.1, n_layer=1, d_model=32, **overrides)
    assert config.n_attention_layers == 0
    _training_refuses_attn_dropout(config, r"attn_dropout=0.1: model .* has no attention layers")


def test_init_from_run_starts_at_its_loss(env, base_run, capsys, caplog):
    run = env["root"] / "finetune"
    flags = [f for f in TINY[TINY.index("--batch-size"):] if f != "--quiet"]  # progress lines on stderr
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):  # --resume of a run that does not exist yet: said once
        assert train_cli.main(["--init-from", str(base_run), "--data", env["corpus"], "--steps", "2",
                               "--resume", "--out", str(run)] + flags) == 0
    said = capsys.readouterr().err + caplog.text
    assert said.count("has no complete checkpoint") == 1 and "no steps trained" not in said
    assert "val loss" in said and "run.yaml" in said  # the human summary
    start = [r for r in read_metrics(run) if r.get("val_loss") is not None and r["step"] == 0]
    source = evaluate(str(base_run), env["corpus"], batch_size=8, seq_len=32, max_batches=2)
    assert start and start[0]["val_loss"] == pytest.approx(source["val_loss"], rel=1e-5)
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["init_from"] == str(base_run) and saved["model"]["d_model"] == 32


def test_init_from_a_landmark_run_keeps_its_loss(env, capsys):
    """A run's loss comes with its model: fine-tuning a landmark run without --loss trains (and
    logs the step-0 source loss) with landmark_cross_entropy, never plain cross-entropy on windows
    without landmarks; --loss still overrides."""
    flags = [f for f in TINY if f not in ("--model", "gpt")]
    source = env["root"] / "landmark"
    assert train_cli.main(["--model", "landmark", "--loss", "landmark_cross_entropy", "--steps", "1",
                           "--data", env["corpus"], "--out", str(source)] + flags) == 0
    run = env["root"] / "landmark_ft"
    assert train_cli.main(["--init-from", str(source), "--data", env["corpus"], "--steps", "1",
                           "--out", str(run)] + flags[flags.index("--batch-size"):]) == 0
    assert load_run(run)[1].loss == "landmark_cross_entropy"
    start = [r for r in read_metrics(run) if r.get("val_loss") is not None and r["step"] == 0]
    want = evaluate(str(source), env["corpus"], batch_size=8, seq_len=32, max_batches=2)  # the run's loss
    assert start and start[0]["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    capsys.readouterr()
    args = train_cli._parser().parse_args(["--init-from", str(source), "--loss", "cross_entropy",
                                           "--out", str(env["root"] / "landmark_ce")])
    assert train_cli.build_configs(args)[1].loss == "cross_entropy"


def test_a_new_run_without_loss_trains_with_its_models_loss(env):
    """``--model landmark`` without ``--loss`` used to train plain cross-entropy on windows
    without landmarks (silently: generate then inserts landmarks the model never saw)."""
    def loss(*argv):
        args = train_cli._parser().parse_args(list(argv) + ["--data", env["corpus"], "--out",
                                                            str(env["root"] / "unused")])
        return train_cli.build_configs(args)[1].loss

    assert loss("--model", "landmark") == "landmark_cross_entropy"
    assert loss("--model", "landmark", "--loss", "cross_entropy") == "cross_entropy"  # a flag wins
    assert loss("--model", "gpt") == loss("--model", "mamba") == "cross_entropy"
    cfg = env["root"] / "landmark_ce.yaml"
    cfg.write_text("model: landmark\ntrain: {loss: cross_entropy}\n")
    assert loss("--config", str(cfg)) == "cross_entropy"  # so does the config file


def test_the_library_warns_when_a_landmark_model_trains_with_plain_cross_entropy(env, caplog):
    """``train()`` keeps ``TrainConfig.loss`` (no silent switch) but says that plain
    cross-entropy inserts no landmarks; the model's own loss trains without the warning.  The
    FLOPs per token count the positions the model runs: with landmarks, 16 raw tokens of a
    window take 21 positions (L=4)."""
    from jaxformers.models.landmark import landmark_seq_len
    from jaxformers.training import train

    cfg = jf.get_config("landmark", "tiny", d_model=32, n_layer=1, n_head=2, vocab_size=258, max_seq_len=40,
                        landmark_block=4, landmark_impl="reference")
    assert landmark_seq_len(16, 4) == 21
    for loss, fpt in (("cross_entropy", cfg.flops_per_token(16)),
                      ("landmark_cross_entropy", cfg.flops_per_token(21) * 21 / 16)):
        tc = TrainConfig(data=env["corpus"], steps=1, batch_size=2, seq_len=16, eval_every=0, log_every=1,
                         checkpoint_every=0, loss=loss, out_dir=str(env["root"] / f"lib_{loss}"))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            summary = train(cfg, tc)
        warned = "pass loss='landmark_cross_entropy' unless you mean it" in caplog.text
        assert warned == (loss == "cross_entropy"), caplog.text
        assert summary["flops_per_token"] == pytest.approx(fpt, rel=1e-12)


def test_a_job_script_always_passing_resume_with_config_and_init_from(env, base_run, capsys, monkeypatch):
    """A requeued job runs the same command every time: ``--config`` and ``--init-from`` with
    ``--resume``. The second start continues the stopped run from its checkpoint (it used to be
    refused), bit-identical to an uninterrupted run; another source or model is refused, and
    ``--extend-steps`` works with the same flags."""
    import jaxformers.training as training

    cfg = env["root"] / "job.yaml"
    cfg.write_text(f"train: {{lr: 1e-3, data: {env['corpus']}}}\n")
    flags = [f for f in TINY[TINY.index("--batch-size"):]] + ["--checkpoint-every", "1"]

    def command(out, *extra):
        return ["--config", str(cfg), "--init-from", str(base_run), "--out", str(out)] + flags + list(extra)

    whole = env["root"] / "job_whole"
    assert train_cli.main(command(whole, "--steps", "4")) == 0
    run = env["root"] / "job"
    real = training.train
    monkeypatch.setattr(training, "train", lambda *a, **k: real(*a, **k, stop_after=2))
    assert train_cli.main(command(run, "--steps", "4", "--resume")) == 0  # stopped after step 2
    assert [r[0] for r in loss_rows(run)] == [1, 2]
    monkeypatch.setattr(training, "train", real)
    capsys.readouterr()
    assert train_cli.main(command(run, "--steps", "4", "--resume")) == 0  # the requeued job
    assert loss_rows(run) == loss_rows(whole)
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["init_from"] == str(base_run) and saved["train"]["lr"] == 1e-3
    # another source, or another model, is another run
    other = env["root"] / "other_source"
    shutil.copytree(base_run, other)
    argv = command(run, "--steps", "4", "--resume")
    argv[argv.index(str(base_run))] = str(other)
    assert train_cli.main(argv) == 2
    assert f"started with init_from={str(base_run)!r}" in capsys.readouterr().err
    assert train_cli.main(command(run, "--steps", "4", "--resume", "--set", "dropout=0.1")) == 2
    err = capsys.readouterr().err
    assert "model config differs" in err and "dropout" in err
    assert train_cli.main(command(run, "--extend-steps", "1")) == 0
    assert [r[0] for r in loss_rows(run)] == [1, 2, 3, 4, 5] and load_run(run)[1].steps == 5


def _tiny_hf_llama(directory):
    """A HF LlamaForCausalLM saved with save_pretrained, plus a tokenizer.json (BPE, eos </s>)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["</s>"], show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=64,
                                      tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    return tok.get_vocab_size()


@pytest.mark.hf
def test_init_from_hf_llama_with_its_tokenizer(env, capsys):
    hf_dir = env["root"] / "hf_llama"
    n_vocab = _tiny_hf_llama(hf_dir)
    run = env["root"] / "hf_finetune"
    assert train_cli.main(["--init-from", str(hf_dir), "--data", env["corpus"], "--steps", "2",
                           "--out", str(run)] + TINY[TINY.index("--batch-size"):]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["tokenizer"] == f"hf:{hf_dir}" and saved["dataset"]["vocab_size"] == n_vocab
    config, params = jf.convert.from_hf(str(hf_dir))
    source = evaluate((config, params), env["corpus"], tokenizer=f"hf:{hf_dir}", batch_size=8, seq_len=32,
                      max_batches=2)
    start = [r for r in read_metrics(run) if r.get("val_loss") is not None and r["step"] == 0]
    assert start[0]["val_loss"] == pytest.approx(source["val_loss"], rel=1e-5)
    capsys.readouterr()
    from experiments import generate as gen_cli
    assert gen_cli.main(["--run", str(run), "--prompt", "the quick", "--max-new-tokens", "5", "--json"]) == 0
    sample = json.loads(capsys.readouterr().out)["samples"][0]
    assert isinstance(sample, str) and sample  # decoded by the checkpoint's tokenizer.json


def test_evaluate_warns_beyond_the_trained_length(env, base_run, caplog):
    with caplog.at_level(logging.WARNING):
        evaluate(str(base_run), seq_len=40, batch_size=8, max_batches=1)
    assert "longer than the sequences the run was trained on" in caplog.text


@pytest.mark.hf
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_init_from_hf_mamba_checkpoints_load_in_either_layer_layout(env, kind):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxformers.training.init_from import load_params, source_config
    from jaxformers.training.steps import abstract_params

    torch.manual_seed(0)
    hf_dir = env["root"] / f"hf_{kind}"
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, expand=2, conv_kernel=4)
    if kind == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(state_size=8, **common))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            state_size=16, head_dim=16, num_heads=4, n_groups=2, chunk_size=8, **common))
    model.save_pretrained(str(hf_dir), safe_serialization=True)
    config, tokenizer = source_config(hf_dir)
    assert config.model == kind and tokenizer is None  # no tokenizer.json shipped
    _, want = jf.convert.from_hf(str(hf_dir))
    for scan in (False, True):
        abstract = abstract_params(jf.build(config.replace(scan_layers=scan)))[0]
        got = load_params(hf_dir, abstract)
        if scan:
            got = jf.convert.unstack_layers(got, "blocks")
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
