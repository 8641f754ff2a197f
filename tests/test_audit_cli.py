"""Regression tests of the command-line audit: generate's decoding after the prompt and non-UTF-8
prompts, lone surrogates in the BPE / hf: tokenizers, masked targets in the losses, safetensors
errors in hf_io, and config-file values in experiments.train."""
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.data.tokenizer import get_tokenizer

pytest.importorskip("tokenizers")


def _sentencepiece_tokenizer(directory):
    """A SentencePiece-style tokenizer.json (Metaspace ``▁``, as Llama / Mistral ship), made locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(["hello world, the world is big"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return get_tokenizer(f"hf:{directory}")


def _generate_cli(tmp_path, monkeypatch, tok, new_text, argv):
    """Run experiments.generate on a fake run whose model 'generates' the ids of ``new_text``."""
    import jaxformers.training as training
    from experiments import generate as gen_cli
    from jaxformers.training.rundir import TOKENIZER_DIR

    cfg = jf.get_config("gpt", "tiny", d_model=32, n_layer=1, vocab_size=tok.vocab_size, max_seq_len=64)
    tok.save(tmp_path / TOKENIZER_DIR)
    seen = {}

    def fake_generate(module, params, prompt, max_new_tokens, num_samples=1, **kw):
        seen["prompt"] = np.asarray(prompt)
        new = np.asarray(tok.encode(new_text), np.int32)[None]
        return np.concatenate([np.asarray(prompt), new], axis=1).repeat(num_samples, 0)

    monkeypatch.setattr(training, "load_run", lambda run, **kw: (cfg, None, None))
    monkeypatch.setattr(jf, "generate", fake_generate)
    rc = gen_cli.main(["--run", str(tmp_path), "--max-new-tokens", "4", "--json"] + argv)
    return rc, seen


def test_generate_keeps_the_space_after_the_prompt_with_a_sentencepiece_tokenizer(tmp_path, monkeypatch,
                                                                                  capsys):
    """The continuation was decoded on its own: a SentencePiece decoder drops the space of its first
    '▁world', so prompt 'hello' + sample printed 'helloworld'."""
    tok = _sentencepiece_tokenizer(tmp_path / "hftok")
    assert tok.decode(tok.encode("hello world")) == "hello world"
    rc, _ = _generate_cli(tmp_path / "run", monkeypatch, tok, " world", ["--prompt", "hello"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] + out["samples"][0] == "hello world"
    # no prompt: the sample starts a document and reads as decoded alone
    rc, seen = _generate_cli(tmp_path / "run2", monkeypatch, tok, "world", [])
    assert rc == 0 and seen["prompt"].tolist() == [[tok.eos_id]]
    assert json.loads(capsys.readouterr().out)["samples"][0] == "world"


def test_generate_prompt_with_bytes_that_are_not_utf8(tmp_path, monkeypatch, capsys):
    """A Latin-1 terminal's 'café' reaches sys.argv as 'caf\\udce9': the BPE tokenizer raised a
    TypeError traceback ('TextInputSequence must be str')."""
    tok = get_tokenizer("bpe:300").train(["hello world, café au lait\n"] * 20)
    rc, seen = _generate_cli(tmp_path, monkeypatch, tok, " au lait", ["--prompt", "caf\udce9"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "not valid UTF-8" in captured.err
    out = json.loads(captured.out)
    assert out["prompt"] == "caf\ufffd" and out["samples"][0] == " au lait"
    assert seen["prompt"].tolist() == [tok.encode("caf\ufffd")]


def test_bpe_and_hf_tokenizers_encode_lone_surrogates_as_replacement_chars(tmp_path):
    bpe = get_tokenizer("bpe:300").train(["ab\ud800cd", "hello world"] * 10)  # training too
    hf = _sentencepiece_tokenizer(tmp_path / "hftok")
    for tok in (bpe, hf):
        ids = tok.encode("x\ud800y")
        assert tok.decode(ids) == "x\ufffdy" and ids == tok.encode("x\ufffdy")
        assert [a.tolist() for a in tok.encode_arrays(["\udce9", "ok"])] == [tok.encode("\ufffd"), tok.encode("ok")]


def test_bpe_round_trip_and_deterministic_training():
    texts = ["hello world 😀 emoji 漢字 text", "ROMEO: wherefore\n\n\tart thou", "naïve café " * 3] * 10
    a, b = get_tokenizer("bpe:400").train(texts), get_tokenizer("bpe:400").train(texts)
    for s in ["", " ", "😀👍🏽", "漢字かなカナ한국어", "\x00\x7f", "<|endoftext|>", "x<|endoftext|>y", "\r\n  ",
              "🏳️‍🌈", "\ufffd"]:
        ids = a.encode(s)
        assert ids == b.encode(s) and a.eos_id not in ids and a.decode(ids) == s


# ----------------------------------------------------------------------------- losses
class _Toy:
    """A tiny 'model': logits = embedding of the input token (enough for the loss functions)."""

    def __init__(self, vocab, seed=0):
        import flax.linen as nn

        class M(nn.Module):
            @nn.compact
            def __call__(self, x, **kw):
                return nn.Embed(vocab, vocab)(x) * 3.0

        self.module = M()
        self.params = self.module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.int32))["params"]


def test_cross_entropy_matches_float64_numpy_with_a_weighted_mask():
    from jaxformers.training.losses import cross_entropy

    rng = np.random.default_rng(0)
    V, toy = 11, _Toy(11)
    tokens = rng.integers(0, V, (3, 8)).astype(np.int32)
    mask = ((rng.random((3, 8)) < 0.6) * rng.random((3, 8)) * 2).astype(np.float32)
    loss, metrics = cross_entropy(toy.module, toy.params, {"tokens": tokens, "loss_mask": mask})
    logits = np.asarray(toy.module.apply({"params": toy.params}, tokens[:, :-1]), np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    ce = lse - np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    w = mask[:, 1:].astype(np.float64)
    assert float(loss) == pytest.approx((ce * w).sum() / w.sum(), rel=1e-6)
    assert float(metrics["n_targets"]) == pytest.approx(w.sum(), rel=1e-6)
    zero = {"tokens": tokens, "loss_mask": np.zeros_like(mask)}
    assert float(cross_entropy(toy.module, toy.params, zero)[0]) == 0.0
    grads = jax.grad(lambda p: cross_entropy(toy.module, p, zero)[0])(toy.params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_masked_targets_outside_the_vocabulary_add_nothing():
    """A masked target id >= vocab_size (e.g. a padding id in the last column) made the loss NaN:
    its cross-entropy is NaN and 0 * NaN = NaN in the weighted sum."""
    from jaxformers.training.losses import cross_entropy, weighted_mean

    V, toy = 11, _Toy(11)
    tokens = np.random.default_rng(1).integers(0, V, (2, 6)).astype(np.int32)
    mask = np.ones_like(tokens, np.float32)
    mask[:, -1] = 0.0
    padded = tokens.copy()
    padded[:, -1] = V + 5
    ref = float(cross_entropy(toy.module, toy.params, {"tokens": tokens, "loss_mask": mask})[0])
    got = float(cross_entropy(toy.module, toy.params, {"tokens": padded, "loss_mask": mask})[0])
    assert np.isfinite(got) and got == pytest.approx(ref, rel=1e-6)
    values = jnp.array([1.0, jnp.nan, jnp.inf, 3.0])
    weights = jnp.array([1.0, 0.0, 0.0, 3.0])
    mean, total = weighted_mean(values, weights)
    assert float(mean) == pytest.approx(2.5) and float(total) == 4.0
    g = jax.grad(lambda v: weighted_mean(v, weights)[0])(values)
    np.testing.assert_array_equal(np.asarray(g), [0.25, 0.0, 0.0, 0.75])


# ----------------------------------------------------------------------------- hf_io
def _write_raw_safetensors(path, entries, data: bytes):
    header = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_safetensors_that_are_not_weights_give_clear_value_errors(tmp_path):
    """A Git LFS pointer (a clone without git-lfs) raised MemoryError; a truncated download raised
    safetensors' own SafetensorError (bf16: a reshape error); an fp8 tensor an AttributeError."""
    from safetensors.numpy import save_file

    from jaxformers.convert.hf_io import read_checkpoint, read_safetensors

    lfs = tmp_path / "lfs"
    lfs.mkdir()
    (lfs / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(ValueError, match="Git LFS pointer"):
        read_checkpoint(str(lfs), {"a": (2,)})
    good = tmp_path / "good.safetensors"
    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(str(cut))
    bf = tmp_path / "bf.safetensors"
    _write_raw_safetensors(bf, {"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}, bytes(10))
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(str(bf))
    f8 = tmp_path / "f8.safetensors"
    _write_raw_safetensors(f8, {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, bytes(2))
    with pytest.raises(ValueError, match="F8_E4M3"):
        read_safetensors(str(f8))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(str(huge))


def test_sharded_index_and_duplicate_tensors(tmp_path):
    """An index without weight_map raised KeyError; a tensor in two files of a directory without an
    index was silently taken from the last file."""
    from safetensors.numpy import save_file

    from jaxformers.convert.hf_io import read_checkpoint

    a = np.ones((2, 2), np.float32)
    save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="weight_map"):
        read_checkpoint(str(tmp_path), {"a": (2, 2)})
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        read_checkpoint(str(tmp_path), {"a": (2, 2), "b": (2,)})
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        read_checkpoint(str(tmp_path), {"a": (2, 2), "b": (2,)})
    dup = tmp_path / "dup"
    dup.mkdir()
    save_file({"a": a}, str(dup / "m1.safetensors"))
    save_file({"a": 2 * a}, str(dup / "m2.safetensors"))
    with pytest.raises(ValueError, match="'a' is in both"):
        read_checkpoint(str(dup), {"a": (2, 2)})


# ----------------------------------------------------------------------------- experiments.train
def _build(tmp_path, text, *flags):
    from experiments.train import _parser, build_configs

    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    return build_configs(_parser().parse_args(["--config", str(cfg), "--out", str(tmp_path / "out"),
                                               "--data", "synthetic:copying", *flags]))


def test_config_file_model_in_overrides_must_match_the_model(tmp_path):
    """'overrides: {model: llama}' was dropped silently: the run trained the default gpt."""
    with pytest.raises(ValueError, match=r"overrides.model='llama' differs from the model 'gpt'"):
        _build(tmp_path, "overrides:\n  model: llama\n  n_layer: 1\n")
    model, _ = _build(tmp_path, "model: llama\noverrides:\n  model: llama\n  n_layer: 1\n")
    assert model.model == "llama" and model.n_layer == 1


def test_config_file_integral_floats_for_int_fields(tmp_path):
    """'steps: 2.0' in a config file was refused while '--train-set steps=2.0' was accepted."""
    model, train = _build(tmp_path, "overrides:\n  n_layer: 2.0\ntrain:\n  steps: 2.0\n  lr: 1e-3\n")
    assert model.n_layer == 2 and train.steps == 2 and isinstance(train.steps, int) and train.lr == 1e-3
    with pytest.raises(ValueError, match="steps"):
        _build(tmp_path, "train:\n  steps: 2.5\n")


@pytest.mark.parametrize("text", ["model: [gpt]\n", "model: ''\n", "preset: [tiny]\n", "init_from: 5\n",
                                  "train:\n  init_from: 5\n"])
def test_config_file_top_level_values_of_the_wrong_type(tmp_path, text):
    """These raised TypeError tracebacks ('unhashable type: list'), or ('model: ''') silently
    trained the default gpt."""
    key = text.split(":")[0] if not text.startswith("train") else "init_from"
    with pytest.raises(ValueError, match=key):
        _build(tmp_path, text)


def test_prepare_rebuilds_when_the_hf_end_of_text_token_changes(tmp_path):
    """Only tokenizer.json was hashed: after eos_token changed in tokenizer_config.json, prepare reused
    the dataset with the old end-of-text id between documents."""
    from jaxformers.data.prepare import load_prepared, prepare

    tok_dir = tmp_path / "hftok"
    _sentencepiece_tokenizer(tok_dir)
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"hello world number {i}\n" * 3)
    out = prepare(str(corpus), f"hf:{tok_dir}", out_dir=tmp_path / "ds")
    meta, train_tokens, _ = load_prepared(out)
    assert meta["eos_id"] == 2 and 2 in set(np.asarray(train_tokens).tolist())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>"}))
    out = prepare(str(corpus), f"hf:{tok_dir}", out_dir=tmp_path / "ds")
    meta, train_tokens, _ = load_prepared(out)
    ids = set(np.asarray(train_tokens).tolist())
    assert meta["eos_id"] == 1 and 1 in ids and 2 not in ids
    assert prepare(str(corpus), f"hf:{tok_dir}", out_dir=tmp_path / "ds") == out  # reused now


def test_a_run_file_with_a_longer_seq_len_raises_max_seq_len(tmp_path):
    """Every run.yaml lists max_seq_len, so '--config RUN/run.yaml --seq-len LONGER' was refused at
    train time ('exceeds the model's max_seq_len') although the docs say it is raised."""
    model, train = _build(tmp_path, "model: gpt\noverrides:\n  max_seq_len: 16\n  n_layer: 1\n", "--seq-len", "32")
    assert train.seq_len == 32 and model.max_seq_len == 32
    model, _ = _build(tmp_path, "overrides:\n  max_seq_len: 16\n", "--seq-len", "8")
    assert model.max_seq_len == 16  # never lowered
    model, _ = _build(tmp_path, "overrides:\n  n_layer: 1\n", "--seq-len", "32", "--set", "max_seq_len=16")
    assert model.max_seq_len == 16  # an explicit --set is kept (train() then names the conflict)


def test_an_unreadable_hf_tokenizer_json_is_a_value_error(tmp_path):
    """tokenizers raises a bare Exception ('expected value at line 1 column 1'): the prepare and train
    CLIs printed a traceback instead of an error line."""
    from experiments import prepare as prepare_cli

    (tmp_path / "tokenizer.json").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        get_tokenizer(f"hf:{tmp_path}")
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello\n" * 10)
    assert prepare_cli.main(["--data", str(corpus), "--tokenizer", f"hf:{tmp_path}", "--out",
                             str(tmp_path / "ds")]) == 2


def test_hf_tokenizer_vocab_size_is_the_highest_id_plus_one(tmp_path):
    """A tokenizer.json whose ids have gaps (a word-level vocabulary {a: 0, b: 1, c: 5} plus an
    added eos): ``tokenizers`` counts 4 tokens, but id 5 is produced, so a model sized by the
    count would embed it out of range (NaN) and decode refused it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 5}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tmp_path.mkdir(exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = get_tokenizer(f"hf:{tmp_path}")
    assert tok.get_vocab_size(with_added_tokens=True) == 4 and ours.vocab_size == 6
    ids = ours.encode("c b c")
    assert ids == [5, 1, 5] and max(ids) < ours.vocab_size
    assert ours.decode(ids) == tok.decode(ids)


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_generate_refuses_a_seed_outside_the_prng_range(seed, capsys):
    """``jax.random.PRNGKey`` wraps (2**32 would draw seed 0's samples): a usage error instead."""
    from experiments import generate as gen_cli

    with pytest.raises(SystemExit) as e:
        gen_cli.main(["--run", "nowhere", "--seed", seed])
    assert e.value.code == 2 and "--seed must be in [0, 2**32)" in capsys.readouterr().err


def test_hf_tokenizer_ignores_saved_truncation_and_padding(tmp_path):
    """A tokenizer.json saved with truncation (max_length=4) and padding settings cut every document
    to 4 ids plus padding (prepare, train, evaluate); AutoTokenizer ignores them unless asked."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2, "</s>": 3, "<pad>": 4}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_truncation(max_length=4)
    tok.enable_padding(length=6, pad_id=4, pad_token="<pad>")
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = get_tokenizer(f"hf:{tmp_path}")
    text = "a b c a b c a b"
    assert ours.encode(text) == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [list(x) for x in ours.encode_arrays([text, "c"])] == [[0, 1, 2, 0, 1, 2, 0, 1], [2]]
    ours.save(tmp_path / "again")  # what a run directory keeps encodes the same
    assert get_tokenizer(f"hf:{tmp_path / 'again'}").encode(text) == ours.encode(text)
