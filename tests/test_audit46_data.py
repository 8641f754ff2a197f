"""Audit 46, data preparation: the byte tokenizer prepares a corpus that is one UTF-8 file from
the file read in chunks (the same train.bin / val.bin / meta.json, without holding its text), and
regression tests for mutants of stop 45's additions that no test killed."""
import filecmp
import importlib
import warnings

import numpy as np
import pytest

prep = importlib.import_module("jaxformers.data.prepare")
corpus_lib = importlib.import_module("jaxformers.data.corpus")
from jaxformers.data import tokenizer as toklib


def _general(monkeypatch, *args, **kw):
    with monkeypatch.context() as m:
        m.setattr(prep._ByteFile, "open", classmethod(lambda cls, src: None))
        return prep.prepare(*args, **kw)


_TEXTS = {
    "ascii": b"hello world\nsecond line\nthird\n" * 40,
    "crlf": b"line one\r\nline two\r\n\r\nend" * 30,
    "utf8": ("\u00e9t\u00e9 \u4e2d\u6587 \U0001F600\n" * 50 + "tail \u03b8").encode(),
    "bom": b"\xef\xbb\xbf" + "\ufeffx\u00e9\n".encode() * 70,
    "no_newline": ("\u00e9" * 3000).encode(),
    "one_char": "\u4e2d".encode(),
    "two_chars": b"\n\n",
}


@pytest.mark.parametrize("name", sorted(_TEXTS))
def test_byte_prepare_of_one_file_streams_it_with_the_same_output(tmp_path, monkeypatch, name):
    f = tmp_path / f"{name}.txt"
    f.write_bytes(_TEXTS[name])
    for chunk, vf in ((1, 0.05), (3, 0.3), (7, 0.0), (1 << 20, 0.9)):
        monkeypatch.setattr(prep._ByteFile, "_CHUNK", chunk)  # chunk boundaries inside characters
        want = _general(monkeypatch, str(f), "byte", out_dir=tmp_path / f"g{chunk}", val_fraction=vf)
        with monkeypatch.context() as m:  # the file's text is never loaded
            for loader in ("load_corpus", "_load_path", "_load_file"):
                m.setattr(corpus_lib, loader, lambda *a, **k: pytest.fail("the file was loaded whole"))
            got = prep.prepare(str(f), "byte", out_dir=tmp_path / f"s{chunk}", val_fraction=vf)
            assert prep.prepare(str(f), "byte", out_dir=got, val_fraction=vf) == got  # reused as is
        for part in ("train.bin", "val.bin", "meta.json", "tokenizer_config.json"):
            assert filecmp.cmp(want / part, got / part, shallow=False), (name, chunk, vf, part)


@pytest.mark.parametrize("raw", [b"ok\xff\xfebad\n" * 5, b"\xff\xfeh\x00i\x00", b"a\xed\xa0\x80b", b"\xef\xbb\xbf"])
def test_byte_prepare_of_a_file_that_is_not_plain_utf8_keeps_the_general_path(tmp_path, monkeypatch, raw):
    f = tmp_path / "c.txt"
    f.write_bytes(raw)
    assert prep._ByteFile.open(prep.resolve_corpus(str(f))) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            got = prep.prepare(str(f), "byte", out_dir=tmp_path / "s")
        except ValueError:
            return  # e.g. no text: the general path's error
    want = _general(monkeypatch, str(f), "byte", out_dir=tmp_path / "g")
    for part in ("train.bin", "val.bin", "meta.json"):
        assert filecmp.cmp(want / part, got / part, shallow=False)


def test_byte_prepare_refuses_a_file_changed_between_reads(tmp_path, monkeypatch):
    f = tmp_path / "c.txt"
    f.write_bytes(b"abcdef\n" * 100)
    real_split = prep._ByteFile.split

    def split_then_change(self, vf):
        out = real_split(self, vf)
        f.write_bytes(b"ABCDEF\n" * 100)  # same size, other bytes
        return out

    monkeypatch.setattr(prep._ByteFile, "split", split_then_change)
    with pytest.raises(RuntimeError, match="changed"):
        prep.prepare(str(f), "byte", out_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def _long_text():
    rng = np.random.default_rng(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "\u00c9", "x2", "3", "don't", ",", ".", "\n", "\n\n", "  "]
    return "".join(w + (" " if rng.random() < 0.6 else "") for w in rng.choice(words, size=3000))


def _hf_tokenizer_dir(tmp_path, name, configure):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    configure(hf)
    hf.train_from_iterator([_long_text()] * 2, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path / name
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    return d


def _set(attr, value):
    return lambda hf: setattr(hf, attr, value)


@pytest.mark.parametrize("name", ["prefix_space", "normalizer", "no_regex"])
def test_hf_tokenizer_of_another_kind_encodes_a_long_text_whole(tmp_path, monkeypatch, name):
    """Cutting a text into pieces is exact only for byte-level BPE's regex with no normalizer and
    no added prefix space: any of those gives the ids of the whole text (not of its pieces)."""
    from tokenizers import normalizers, pre_tokenizers
    configure = {"prefix_space": _set("pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
                 "normalizer": _set("normalizer", normalizers.Prepend("\u2581")),
                 "no_regex": _set("pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                            use_regex=False))}[name]
    tok = toklib.HFTokenizer(_hf_tokenizer_dir(tmp_path, name, configure))
    text = _long_text()
    monkeypatch.setattr(toklib, "_PIECE_CHARS", 40)
    monkeypatch.setattr(toklib, "_BATCH_CHARS", 300)
    assert tok.encode_arrays([text])[0].tolist() == tok.encode(text)


def test_prepare_writes_every_id_of_a_document_over_a_million_ids_and_of_many_documents(tmp_path):
    """Ids are written in slices of 2**20 and documents encoded 64 at a time: a document longer
    than a slice, and more than 64 documents, come out whole and in order."""
    import json
    corpus = tmp_path / "c"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    big = bytes(rng.integers(97, 123, size=(1 << 20) + 4321, dtype=np.uint8))
    (corpus / "a.txt").write_bytes(big)
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": f"doc {i} \u00e9"}) + "\n" for i in range(150)))
    out = prep.prepare(str(corpus), "byte", out_dir=tmp_path / "o", val_fraction=0.0)
    meta, train, val = prep.load_prepared(out)
    tr, va, _ = prep.split_documents(corpus_lib.load_corpus(str(corpus)), 0.0, 0)
    assert len(tr) == 151 and not va
    for docs, arr in ((tr, train), (va, val)):
        want = b"".join(d.encode() + b"\x00" for d in docs)  # 0: a stand-in for end-of-text
        got = np.asarray(arr)
        assert got.size == len(want)
        np.testing.assert_array_equal(np.where(got == 256, 0, got), np.frombuffer(want, np.uint8))


def test_a_forced_rebuild_leaves_no_copy_of_the_replaced_dataset(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("some text\n" * 50)
    (tmp_path / "ds").mkdir()
    for _ in range(3):
        prep.prepare(str(f), "byte", out_dir=tmp_path / "ds" / "o", force=True)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["o"]


def test_domains_sources_under_a_folder_whose_path_would_not_parse_are_kept_as_given(tmp_path, monkeypatch):
    folder = "a,b"  # the absolute path would split the entry in two
    from jaxformers.data.domains import absolute_source_paths, parse_domains_spec
    cwd = tmp_path / folder
    (cwd / "texts").mkdir(parents=True)
    (cwd / "texts" / "a.txt").write_text("hello\n")
    monkeypatch.chdir(cwd)
    spec = "domains:t=texts@2,poems"
    out = absolute_source_paths(spec)
    assert out == spec and parse_domains_spec(out).sources[0] == "texts"


@pytest.mark.parametrize("gap", [998, 999, 1000])
def test_byte_prepare_of_one_file_cuts_at_a_line_break_up_to_999_characters_past_the_tail(
        tmp_path, monkeypatch, gap):
    """The general rule (``text.find("\\n", cut, cut + 1000)``) for 4-byte characters too."""
    n = 21000
    cut = int(round(n * 0.95))
    chars = ["\U0001F600"] * n
    chars[cut + gap] = "\n"
    f = tmp_path / "c.txt"
    f.write_text("".join(chars), encoding="utf-8")
    want = _general(monkeypatch, str(f), "byte", out_dir=tmp_path / "g")
    got = prep.prepare(str(f), "byte", out_dir=tmp_path / "s")
    for part in ("train.bin", "val.bin", "meta.json"):
        assert filecmp.cmp(want / part, got / part, shallow=False), part
    import json
    assert json.loads((got / "meta.json").read_text())["n_chars"]["train"] == (cut + gap + 1 if gap < 1000 else cut)


def test_a_one_file_corpus_with_a_bpe_tokenizer_is_trained_and_encoded_with_it(tmp_path):
    f = tmp_path / "c.txt"
    text = _long_text()
    f.write_text(text, encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = prep.prepare(str(f), "bpe:300", out_dir=tmp_path / "o", val_fraction=0.0)
    meta, train, _ = prep.load_prepared(out)
    tok = toklib.load_tokenizer(out)
    assert meta["vocab_size"] == tok.vocab_size > 258
    assert np.asarray(train).tolist() == tok.encode(text) + [tok.eos_id]


@pytest.mark.parametrize("tokens", [[-3, 1, 2], [0.5, 3.2], [[1, 2], [3, 4]], [True, False], ["a", "b"], [2 ** 40]])
def test_from_tokens_refuses_what_is_not_a_1d_array_of_ids_even_without_a_vocab_size(tokens):
    """It used to derive a vocab_size from any of these (2**40 + 1 for ``[2**40]``: a model that
    size would be built before the loader refused the ids) or crash in numpy (strings)."""
    from jaxformers.data.sources import TextSource, open_data
    for make in (TextSource.from_tokens, open_data):
        with pytest.raises(ValueError, match="tokens must be"):
            make(tokens)
    assert TextSource.from_tokens([0, 5, 2]).vocab_size == 6 and TextSource.from_tokens([]).vocab_size == 1
