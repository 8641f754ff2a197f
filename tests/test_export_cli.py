"""``python -m experiments.export``: a run becomes a directory transformers loads with
``AutoModelForCausalLM`` / ``AutoTokenizer``: same logits, same token ids, eos ids in config.json."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxformers as jf  # noqa: E402
from jaxformers.data.tokenizer import get_tokenizer  # noqa: E402

pytestmark = pytest.mark.hf

TEXT = "Héllo wörld,\n  the end — ünïcode ✓ and\ttabs."


def _export(tmp_path, monkeypatch, capsys, config, tok, argv=()):
    """experiments.export on a fake run (``load_run`` patched) holding ``tok``; returns
    (rc, out dir, params, stdout / stderr)."""
    import jaxformers.training as training
    from experiments import export
    from jaxformers.training.rundir import TOKENIZER_DIR

    run = tmp_path / "run"
    tok.save(run / TOKENIZER_DIR)
    params = jf.init_params(jf.build(config), jax.random.PRNGKey(0))
    monkeypatch.setattr(training, "load_run", lambda r, step=None, **kw: (config, None, params))
    out = tmp_path / "hf"
    capsys.readouterr()
    rc = export.main(["--run", str(run), "--out", str(out), *argv])
    return rc, out, params, capsys.readouterr()


def test_llama_run_with_the_byte_tokenizer_loads_in_transformers(tmp_path, monkeypatch, capsys):
    tok = get_tokenizer("byte")
    config = jf.get_config("llama", "tiny", vocab_size=tok.vocab_size, n_head=4, n_kv_head=2)
    rc, out, params, io = _export(tmp_path, monkeypatch, capsys, config, tok)
    assert rc == 0, io.err
    assert json.loads(io.out)["tokenizer"] == "byte"
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok.encode(TEXT)
    assert hf_tok.encode(TEXT, add_special_tokens=False) == ids
    assert hf_tok.decode(ids) == TEXT and hf_tok.eos_token_id == tok.eos_id == 256
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == cfg["pad_token_id"] == 256
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    toks = np.asarray([ids[:24]], np.int32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(toks.astype(np.int64))).logits.numpy()
    ours = np.asarray(jf.build(config).apply({"params": params}, jnp.asarray(toks)))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


def test_mamba2_run_with_a_bpe_tokenizer(tmp_path, monkeypatch, capsys):
    tok = get_tokenizer("bpe:300").train([TEXT * 3, "the quick brown fox jumps over the lazy dog"] * 20)
    config = jf.get_config("mamba2", "tiny", vocab_size=320)  # padded above the tokenizer's vocab
    rc, out, params, io = _export(tmp_path, monkeypatch, capsys, config, tok)
    assert rc == 0, io.err
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in (TEXT, "the lazy fox", " leading space"):
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text
    assert hf_tok.eos_token_id == tok.eos_id
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    assert type(model).__name__ == "Mamba2ForCausalLM"


def test_export_refuses_what_hf_cannot_express_and_a_used_out_dir(tmp_path, monkeypatch, capsys):
    tok = get_tokenizer("byte")
    rc, out, _, io = _export(tmp_path, monkeypatch, capsys, jf.get_config("gpt", "tiny", vocab_size=257), tok)
    assert rc == 2 and "not llama-compatible" in io.err and not (out / "model.safetensors").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    from experiments import export
    rc = export.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "used")])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "used" / "x").read_text() == "keep me"


# one refusal path each: not a TransformerConfig (hybrid), another module class (denseformer), a
# config subclass (landmark); every model goes through one of them
@pytest.mark.parametrize("model", ["hybrid", "denseformer", "landmark"])
def test_export_of_a_model_without_a_hf_equivalent_names_the_ones_it_supports(tmp_path, monkeypatch, capsys,
                                                                              model):
    config = jf.get_config(model, "tiny", vocab_size=257, d_model=32)
    rc, out, _, io = _export(tmp_path, monkeypatch, capsys, config, get_tokenizer("byte"))
    assert rc == 2 and not out.exists() and "Traceback" not in io.err, io.err
    assert f"model={model!r}" in io.err and "supports model='llama'" in io.err
    assert "'mamba' and 'mamba2'" in io.err


def test_evaluate_and_generate_read_an_exported_directory(tmp_path, monkeypatch, capsys):
    """``--run HF_DIR``: the same val loss as the (config, params) it came from on the same data,
    tokenizer and windows, and the same greedy samples."""
    from experiments import evaluate as eval_cli
    from experiments import generate as gen_cli
    from jaxformers.training import evaluate

    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while birds sing".split()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, size=800)) + ".\n")
    tok = get_tokenizer("byte")
    config = jf.get_config("llama", "tiny", vocab_size=tok.vocab_size, max_seq_len=64)
    rc, out, params, io = _export(tmp_path, monkeypatch, capsys, config, tok)
    assert rc == 0, io.err
    want = evaluate((config, params), str(corpus), tokenizer="byte", batch_size=4, seq_len=32, max_batches=None)
    assert eval_cli.main(["--run", str(out), "--data", str(corpus), "--batch-size", "4", "--seq-len", "32"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["val_tokens"] == want["val_tokens"]
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--run", str(out)])
    assert e.value.code == 2 and "needs --data" in capsys.readouterr().err

    assert gen_cli.main(["--run", str(out), "--prompt", "the quick", "--temperature", "0",
                         "--max-new-tokens", "6", "--json"]) == 0
    sample = json.loads(capsys.readouterr().out)["samples"][0]
    ids = tok.encode("the quick")
    greedy = np.asarray(jf.generate(jf.build(config), {"params": params}, np.asarray([ids], np.int32), 6,
                                    temperature=0.0))[0, len(ids):]
    assert sample == tok.decode(greedy)
    (out / "tokenizer.json").unlink()
    assert gen_cli.main(["--run", str(out), "--prompt", "x"]) == 2
    assert "without a tokenizer.json" in capsys.readouterr().err


def test_an_hf_tokenizer_with_a_bos_post_processor_exports_without_it(tmp_path, monkeypatch, capsys):
    """jaxformers trains without BOS; the exported AutoTokenizer must encode the same ids (a
    Llama-style tokenizer.json prepends <s> through its post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([TEXT] * 30, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))])
    src = tmp_path / "src_tok"
    src.mkdir()
    raw.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = get_tokenizer(f"hf:{src}")
    config = jf.get_config("llama", "tiny", vocab_size=320)
    rc, out, _, io = _export(tmp_path, monkeypatch, capsys, config, tok)
    assert rc == 0, io.err
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok(TEXT)["input_ids"] == tok.encode(TEXT)  # default call: no <s> added
    assert hf_tok.eos_token == "</s>" and tok._tok.post_processor is not None  # the live one is untouched
