"""Regression tests of the data / decoding audit: padded model vocabularies in sampling and the
generate CLI, tokenizer decode range checks, top_p=1, numpy ints in generate, BOM'd .jsonl."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.data.corpus import load_corpus
from jaxformers.data.tokenizer import ByteTokenizer, get_tokenizer


@pytest.fixture(scope="module")
def tiny():
    m = jf.build(jf.get_config("gpt", "tiny", d_model=32, n_layer=1, vocab_size=256))
    return m, {"params": jf.init_params(m, jax.random.PRNGKey(0))}


def test_generate_vocab_limit_never_samples_padding_ids(tiny):
    m, params = tiny
    prompt = np.zeros((2, 3), np.int32)
    out = np.asarray(jf.generate(m, params, prompt, 12, temperature=5.0, vocab_limit=7,
                                 rng=jax.random.PRNGKey(3), num_samples=2))
    assert out.shape == (4, 15) and out[:, 3:].max() < 7
    # greedy with a limit = argmax over the allowed ids only
    greedy = np.asarray(jf.generate(m, params, prompt, 1, temperature=0.0, vocab_limit=7))
    logits = jax.jit(m.apply)(params, jnp.asarray(prompt))[:, -1, :7]
    np.testing.assert_array_equal(greedy[:, -1], np.argmax(logits, axis=-1))
    with pytest.raises(ValueError, match="vocab_limit"):
        jf.generate(m, params, prompt, 2, vocab_limit=257)
    with pytest.raises(ValueError, match=r"top_k .*vocab_limit=7"):
        jf.generate(m, params, prompt, 2, vocab_limit=7, top_k=8)


def test_generate_cli_with_a_model_vocab_padded_above_the_tokenizer(tmp_path, monkeypatch, capsys):
    """A byte run whose model has vocab_size=1024: the CLI used to sample ids >= 257 and crash with
    a traceback in the byte tokenizer's decode, after generating."""
    import jaxformers.training as training
    from experiments import generate as gen_cli
    from jaxformers.training.rundir import TOKENIZER_DIR

    cfg = jf.get_config("gpt", "tiny", d_model=32, n_layer=1, vocab_size=1024, max_seq_len=64)
    params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
    ByteTokenizer().save(tmp_path / TOKENIZER_DIR)
    monkeypatch.setattr(training, "load_run", lambda run, **kw: (cfg, None, params))
    rc = gen_cli.main(["--run", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "30",
                       "--temperature", "1.0", "--json"])
    assert rc == 0
    sample = json.loads(capsys.readouterr().out)["samples"][0]
    assert isinstance(sample, str)


def test_bpe_decode_rejects_ids_outside_its_vocabulary():
    tok = get_tokenizer("bpe:300").train(["hello world, hello there\n"] * 10)
    n = tok.vocab_size
    assert tok.decode(tok.encode("hello")) == "hello"
    for bad in ([n], [n + 50], [-1]):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode(tok.encode("hi") + bad)  # used to return the text without them (or OverflowError)


def test_top_p_one_keeps_every_token(monkeypatch):
    """float32 cumsums pass 1 before the tail: top_p=1 used to drop hundreds of tokens."""
    seen = []
    real = jax.random.categorical

    def spy(key, logits, *a, **kw):
        seen.append(np.asarray(logits))
        return real(key, logits, *a, **kw)

    monkeypatch.setattr(jax.random, "categorical", spy)
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50000)) * 3
    jf.sample_logits(logits, jax.random.PRNGKey(1), top_p=1.0)
    assert np.isfinite(seen[-1]).all()


def test_generate_accepts_numpy_integers(tiny):
    m, params = tiny
    out = jf.generate(m, params, np.zeros((1, 2), np.int32), np.int64(3), temperature=0.0,
                      num_samples=np.int64(2))
    assert out.shape == (2, 5)
    with pytest.raises(ValueError, match="num_samples"):
        jf.generate(m, params, np.zeros((1, 2), np.int32), 3, num_samples=0)


def test_jsonl_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "hello"}\n{"text": "world"}\n')
    assert load_corpus(str(path)) == ["hello", "world"]


def test_jsonl_lone_surrogate_escape_becomes_replacement_char(tmp_path, monkeypatch):
    """Valid JSON ("\\ud83d" without its pair) used to crash BPE training/encoding in prepare."""
    from jaxformers.data.prepare import load_prepared, prepare

    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "smile \\ud83d here, then more words"}\n{"text": "another document"}\n'
                    '{"text": "a third document"}\n')
    with pytest.warns(UnicodeWarning, match="surrogate"):
        docs = load_corpus(str(path))
    assert docs[0] == "smile \ufffd here, then more words"
    with pytest.warns(UnicodeWarning):
        out = prepare(str(path), "bpe:300", out_dir=str(tmp_path / "ds"), val_fraction=0.3)
    meta, train, val = load_prepared(out)
    assert meta["n_tokens"]["train"] > 0


def test_domain_sources_may_hold_colons_and_at_signs(tmp_path):
    """``NAME=hf:NAME@CONFIG:SPLIT`` (documented) and paths with ':' / '@' used to be cut at the
    first ':' ("need at least two domains"), even in the spec domain_spec() writes."""
    from jaxformers.data.domains import DomainSource, domain_spec, parse_domains_spec

    spec = domain_spec(["wiki", "python"], ["hf:wikitext@wikitext-2-raw-v1:train", None], [0.3, 0.7],
                       max_bytes=5)
    parsed = parse_domains_spec(spec)
    assert parsed.sources == ("hf:wikitext@wikitext-2-raw-v1:train", None)
    assert parsed.weights == pytest.approx((0.3, 0.7)) and parsed.max_bytes == 5
    assert parse_domains_spec("domains:wiki=hf:wikitext,python").sources == ("hf:wikitext", None)
    for bad, match in [("domains:comedies@abc,python", "weight"), ("domains:a=./x@-1,python", "weight"),
                       ("domains:comedies,python:colour=1", "unknown option")]:
        with pytest.raises(ValueError, match=match):
            parse_domains_spec(bad)
    folders = []
    for name in ("v1:a@b", "v2:c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "doc.txt").write_text(f"{name} " * 200)
        folders.append(str(tmp_path / name))
    src = DomainSource(domain_spec(["a", "b"], folders, [1, 3], val_fraction=0.1))
    assert src.names == ("a", "b") and src.weights.tolist() == [0.25, 0.75]
    assert all(d.train_tokens.size > 500 for d in src.domains)


def test_doge_experiment_refuses_domains_without_a_validation_window(monkeypatch, tmp_path):
    """A small --max-bytes left every domain without validation text: all runs trained, then the
    summary crashed on round(None) (and no domain had a validation loss)."""
    import experiments.doge as exp
    import jaxformers.data.domains as domains

    class Source:  # five domains, 30 validation tokens each (< seq_len + 1 = 65)
        def __init__(self, spec, tokenizer="byte"):
            self.domains = [domains.Domain(n, np.zeros(5000, np.int32), np.zeros(30, np.int32))
                            for n in exp.DOMAINS]

        def describe(self):
            return {"train_tokens": {d.name: 5000 for d in self.domains}}

        def token_fractions(self):
            return np.full(len(exp.DOMAINS), 1 / len(exp.DOMAINS))

    def no_training(*a, **kw):
        raise AssertionError("trained although no domain can be evaluated")

    monkeypatch.setattr(domains, "DomainSource", Source)
    monkeypatch.setattr(exp, "_train", no_training)
    with pytest.raises(SystemExit, match="max-bytes"):
        exp.main(["--preset", "tiny", "--out", str(tmp_path / "out"), "--max-bytes", "1000", "--steps", "2",
                  "--proxy-steps", "2", "--no-compile-cache"])
