"""Audit 52, data preparation at scale: ``prepare`` streams a local corpus (a folder, a .jsonl
file) a document at a time with every tokenizer, writing the same dataset as the in-memory path
did (the same split, token files and meta.json); compressed (.gz / .zst) and Parquet inputs; a
text field other than ``"text"``; errors naming the file."""
import gzip
import importlib
import json
import sys
import warnings

import numpy as np
import pytest

from jaxformers.data import corpus as C
from jaxformers.data.tokenizer import get_tokenizer

P = importlib.import_module("jaxformers.data.prepare")


# ----------------------------------------------------------------------------- the old in-memory path
def _old_split(docs, val_fraction, seed):
    """split_documents as it was before audit 52 (rule 3), verbatim."""
    if val_fraction == 0.0:
        return list(docs), [], "none"
    if len(docs) == 1:
        text = docs[0]
        cut = P._one_document_cut(len(text), val_fraction, P._newline_in(text))
        return [text[:cut]], [text[cut:]] if text[cut:] else [], "tail"
    target = val_fraction * sum(len(d) for d in docs)
    copies = {}
    for i, d in enumerate(docs):
        copies.setdefault(d, []).append(i)
    texts = list(copies)
    val_idx, val_chars = [], 0
    for j in np.random.default_rng([int(seed), 0x5EED]).permutation(len(texts)):
        group = copies[texts[j]]
        if val_chars >= target:
            break
        if len(val_idx) + len(group) > len(docs) - 1:
            continue
        size = len(texts[j]) * len(group)
        if val_chars + size > max(2.0 * target, 1.0):
            continue
        val_idx.extend(group)
        val_chars += size
    if not val_idx:
        big = docs[max(range(len(docs)), key=lambda i: len(docs[i]))]
        n_copies = len(copies[big])
        cut = P._at_line_end(len(big) - max(1, int(round(target / n_copies))), len(big), P._newline_in(big))
        if cut == 0 and len(copies) == 1:
            cut = P._at_line_end(1, len(big), P._newline_in(big))
        head, tail = big[:cut], big[cut:]
        train = [head if d == big else d for d in docs if d != big or head]
        return train, [tail] * n_copies if tail else [], "tail"
    val_set = set(val_idx)
    return ([d for i, d in enumerate(docs) if i not in val_set], [d for i, d in enumerate(docs) if i in val_set],
            "documents")


def _old_prepare(data, tokenizer, out, val_fraction, seed):
    """What prepare wrote before audit 52 (load_corpus, split, train, encode): the bytes of
    train.bin, val.bin and meta.json."""
    src = C.resolve_corpus(data)
    docs = C.load_corpus(data)
    tok_spec = P._canonical_tokenizer(tokenizer)
    identity = P._identity(src.spec, tok_spec, val_fraction, seed, C.corpus_fingerprint(docs))
    tok = get_tokenizer(tokenizer)
    if tok_spec.startswith("hf:"):
        identity["eos_id"] = int(tok.eos_id)
    train, val, method = _old_split(docs, val_fraction, seed)
    tok = tok.train(train)
    dtype = P._dtype_for(tok.vocab_size)
    bins = {}
    for split, texts in (("train", train), ("val", val)):
        ids = [np.append(a, tok.eos_id) for a in tok.encode_arrays(texts)]
        bins[split] = (np.concatenate(ids) if ids else np.zeros(0)).astype(dtype).tobytes()
    meta = dict(identity, source_name=src.name, source_kind=src.kind,
                tokenizer_vocab_requested=int(tok_spec.split(":")[1]) if tok_spec.startswith("bpe") else None,
                vocab_size=int(tok.vocab_size), eos_id=int(tok.eos_id), dtype=dtype.name,
                n_tokens={s: len(bins[s]) // dtype.itemsize for s in bins},
                n_documents={"train": len(train), "val": len(val)},
                n_chars={"train": sum(map(len, train)), "val": sum(map(len, val))},
                split_method=method, files={"train": "train.bin", "val": "val.bin"})
    return bins["train"], bins["val"], json.dumps(meta, indent=1) + "\n"


def _written(out):
    return ((out / "train.bin").read_bytes(), (out / "val.bin").read_bytes(), (out / "meta.json").read_text())


def _no_load(monkeypatch):
    """Make every whole-corpus loader fail: prepare must read documents one at a time."""
    fail = lambda *a, **k: pytest.fail("the whole corpus was loaded")  # noqa: E731
    for mod, name in ((C, "load_corpus"), (C, "_load_path"), (C, "_load_file"),
                      (C, "_read_jsonl"), (P, "split_documents")):
        monkeypatch.setattr(mod, name, fail)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small GPT-2-style tokenizer.json (byte-level BPE) with an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("hftok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog\n"] * 50, trainer=trainer)
    tok.save(str(d / "tokenizer.json"))
    return d


def _words(rng, n):
    words = ["alpha", "beta", "gamma", "delta", "\u00e9t\u00e9", "\u4e2d\u6587", "x", "yy", "emoji\U0001F600"]
    out, line = [], []
    for w in rng.integers(0, len(words), n):
        line.append(words[w])
        if rng.random() < 0.15:
            out.append(" ".join(line))
            line = []
    return "\n".join(out + [" ".join(line)])


def _write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")


def _corpora(root):
    """{name: data spec} of corpora that cover the split's cases."""
    rng = np.random.default_rng(0)
    mixed = root / "mixed"
    (mixed / "sub").mkdir(parents=True)
    docs = [_words(rng, int(n)) for n in rng.integers(5, 120, 30)]
    (mixed / "a.txt").write_text(docs[0], encoding="utf-8")
    _write_jsonl(mixed / "b.jsonl", docs[1:12] + [docs[3], "", docs[3]])  # copies and an empty record
    (mixed / "sub" / "c.txt").write_text(docs[12] + "\n", encoding="utf-8")
    _write_jsonl(mixed / "sub" / "d.jsonl", docs[13:] + [docs[0]])
    (mixed / "sub" / "e.txt").write_text(docs[0], encoding="utf-8")  # a copy of a.txt
    (mixed / "skip.md").write_text("not a corpus file")
    single = root / "single.jsonl"
    _write_jsonl(single, docs[:20])
    one = root / "one"
    one.mkdir()
    (one / "only.txt").write_text("\n".join(docs[:6]), encoding="utf-8")
    one_record = root / "one_record.jsonl"
    _write_jsonl(one_record, ["", docs[5] + "\n" + docs[6]])
    big = root / "big"  # every document alone is more than twice val: the tail of the largest
    big.mkdir()
    _write_jsonl(big / "b.jsonl", [docs[1] * 3, docs[2] * 4, docs[2] * 4])
    same = root / "same.jsonl"  # copies of one text
    _write_jsonl(same, [docs[4]] * 3)
    return {"mixed": str(mixed), "single": str(single), "one": str(one), "one_record": str(one_record),
            "big": str(big), "same": str(same)}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    return _corpora(tmp_path_factory.mktemp("corpora"))


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:300", "hf"])
def test_streaming_prepare_writes_what_the_in_memory_path_wrote(tmp_path, monkeypatch, corpora, hf_dir, tokenizer):
    tok = f"hf:{hf_dir}" if tokenizer == "hf" else tokenizer
    splits = [(0.05, 0), (0.3, 3), (0.0, 0), (0.5, 7)]
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bpe:300 on a tiny text: fewer tokens
        for name, data in corpora.items():
            for vf, seed in splits[:2] if tokenizer == "bpe:300" else splits:
                want = _old_prepare(data, tok, None, vf, seed)
                with monkeypatch.context() as m:
                    _no_load(m)
                    out = P.prepare(data, tok, out_dir=tmp_path / f"{name}-{vf}-{seed}", val_fraction=vf, seed=seed)
                    assert P.prepare(data, tok, out_dir=out, val_fraction=vf, seed=seed) == out  # complete: reused
                assert _written(out) == want, (name, vf, seed)
                n += 1
    assert n >= 12
    # a dataset the in-memory path wrote is complete for the streaming one: reused, not rebuilt
    old = tmp_path / "old"
    old.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        written = _old_prepare(corpora["mixed"], tok, None, 0.05, 0)
    for part, data in zip(("train.bin", "val.bin", "meta.json"), written):
        (old / part).write_bytes(data.encode() if isinstance(data, str) else data)
    with monkeypatch.context() as m:
        _no_load(m)
        m.setattr(P.tempfile, "mkdtemp", lambda *a, **k: pytest.fail("rebuilt"))
        assert P.prepare(corpora["mixed"], tok, out_dir=old) == old


def test_the_split_rule_is_unchanged_on_random_corpora_with_copies():
    rng = np.random.default_rng(1)
    for trial in range(300):
        pool = [_words(rng, int(k)) for k in rng.integers(0, 40, int(rng.integers(1, 6)))]
        docs = [pool[i] for i in rng.integers(0, len(pool), int(rng.integers(1, 12)))]
        if not any(docs):
            continue
        for vf in (0.0, 0.05, 0.2, 0.6, 0.95):
            seed = int(rng.integers(0, 100))
            assert P.split_documents(docs, vf, seed) == _old_split(docs, vf, seed), (trial, vf)


def test_prepare_never_holds_the_whole_corpus(tmp_path):
    """80 records of 200 KB (16 MB of text): the in-memory path held them all (and their ids);
    streamed, the Python heap holds a chunk of documents at a time."""
    import tracemalloc
    root = tmp_path / "c"
    root.mkdir()
    rng = np.random.default_rng(0)
    block = "".join(chr(c) for c in rng.integers(97, 123, 200_000))
    for k in range(4):
        _write_jsonl(root / f"{k}.jsonl", [block[i:] + block[:i] for i in range(k * 20, k * 20 + 20)])
    tracemalloc.start()
    try:
        out = P.prepare(str(root), "byte", out_dir=tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    meta = json.loads((out / "meta.json").read_text())
    assert sum(meta["n_chars"].values()) == 80 * 200_000
    assert peak < 6_000_000, peak  # the in-memory path: > 16 MB


def test_a_corpus_that_changes_between_passes_is_an_error(tmp_path, monkeypatch):
    root = tmp_path / "c"
    root.mkdir()
    _write_jsonl(root / "a.jsonl", ["first text", "second text", "third text"])
    real, calls = C._iter_files, []

    def changing(*a, **k):
        calls.append(1)
        for doc in real(*a, **k):
            yield doc.replace("second", "SECOND") if len(calls) > 1 else doc

    monkeypatch.setattr(P, "_iter_files", changing)
    with pytest.raises(RuntimeError, match="changed while it was prepared"):
        P.prepare(str(root), "byte", out_dir=tmp_path / "out", val_fraction=0.3)
    assert not (tmp_path / "out").exists()


def test_a_lone_surrogate_warning_is_given_once_not_once_per_pass(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"text": "ok \\ud83d end"}\n{"text": "more text here"}\n')
    with pytest.warns(UnicodeWarning) as rec:
        P.prepare(str(f), "bpe:300", out_dir=tmp_path / "out")
    assert sum(issubclass(w.category, UnicodeWarning) for w in rec) == 1


# ----------------------------------------------------------------------------- compressed / Parquet inputs
def _zstd():
    return pytest.importorskip("zstandard")


def _pa():
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq
    return pa, pq


def _jsonl_texts(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8-sig").splitlines()]


def _convert(src_root, dst_root, how):
    """A copy of the corpus folder ``src_root`` with every file converted: ``how`` maps
    ``(kind, path)`` to ``(new name, bytes or a writer)``."""
    for f in sorted(src_root.rglob("*")):
        if f.is_dir() or f.suffix not in (".txt", ".jsonl"):
            continue
        dst = dst_root / f.relative_to(src_root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        how(f, dst)


def _gzip(f, dst):
    dst.with_name(dst.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))


def _zst(f, dst):
    zstd = _zstd()
    raw = f.read_bytes()
    # two frames (a file made by concatenating compressed parts): both are read
    half = len(raw) // 2
    dst.with_name(dst.name + ".zst").write_bytes(zstd.ZstdCompressor().compress(raw[:half])
                                                + zstd.ZstdCompressor().compress(raw[half:]))


def _parquet(f, dst, field="text"):
    pa, pq = _pa()
    texts = _jsonl_texts(f) if f.suffix == ".jsonl" else [f.read_text(encoding="utf-8")]
    table = pa.table({"id": list(range(len(texts))), field: pa.array(texts, pa.large_string())})
    pq.write_table(table, dst.with_suffix(".parquet"), row_group_size=3)


@pytest.mark.parametrize("how", ["gz", "zst", "parquet", "mixed"])
def test_compressed_and_parquet_folders_give_the_corpus_of_the_plain_files(tmp_path, monkeypatch, how, hf_dir):
    plain = tmp_path / "plain"
    plain.mkdir()
    rng = np.random.default_rng(2)
    docs = [_words(rng, int(n)) for n in rng.integers(5, 80, 14)]
    (plain / "a.txt").write_text(docs[0], encoding="utf-8")
    _write_jsonl(plain / "b.jsonl", docs[1:7] + [""])
    (plain / "sub").mkdir()
    (plain / "sub" / "c.jsonl").write_text("\ufeff" + "".join(json.dumps({"text": t}) + "\n" for t in docs[7:]),
                                            encoding="utf-8")  # a byte-order mark, dropped
    conv = tmp_path / how
    if how == "parquet":  # each .txt is one row; Parquet has no BOM: the same texts
        _convert(plain, conv, _parquet)
    elif how == "mixed":
        _zstd()
        _pa()
        (conv / "sub").mkdir(parents=True)
        _gzip(plain / "a.txt", conv / "a.txt")
        _parquet(plain / "b.jsonl", conv / "b.jsonl")
        _zst(plain / "sub" / "c.jsonl", conv / "sub" / "c.jsonl")
    else:
        _convert(plain, conv, _gzip if how == "gz" else _zst)
    assert C.load_corpus(conv) == C.load_corpus(plain) == list(C.iter_corpus(conv))
    for tok in ("byte", f"hf:{hf_dir}"):
        want = P.prepare(str(plain), tok, out_dir=tmp_path / "want", val_fraction=0.2, force=True)
        with monkeypatch.context() as m:
            _no_load(m)
            got = P.prepare(str(conv), tok, out_dir=tmp_path / "got", val_fraction=0.2, force=True)
        for part in ("train.bin", "val.bin"):
            assert (want / part).read_bytes() == (got / part).read_bytes(), (how, tok, part)
        a, b = (json.loads((d / "meta.json").read_text()) for d in (want, got))
        assert a["corpus_sha256"] == b["corpus_sha256"] and a["n_tokens"] == b["n_tokens"]


@pytest.mark.parametrize("suffix", [".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst", ".parquet"])
def test_a_single_compressed_or_parquet_file_is_a_corpus(tmp_path, suffix):
    texts = ["caf\u00e9 one\nline two", "second record", "third \U0001F600"]
    plain = tmp_path / ("p.jsonl" if "jsonl" in suffix or suffix == ".parquet" else "p.txt")
    if plain.suffix == ".jsonl":
        _write_jsonl(plain, texts)
    else:
        plain.write_text("\ufeff" + texts[0], encoding="utf-8")
    dst = tmp_path / "f"
    if suffix.endswith(".gz"):
        _gzip(plain, dst.with_name("f" + plain.suffix))
    elif suffix.endswith(".zst"):
        _zst(plain, dst.with_name("f" + plain.suffix))
    else:
        _parquet(plain, dst.with_name("f.jsonl"))
    f = tmp_path / ("f" + suffix)
    assert f.is_file()
    assert C.load_corpus(f) == C.load_corpus(plain)
    out = P.prepare(str(f), "byte", out_dir=tmp_path / "out")  # not _ByteFile: decompressed first
    ref = P.prepare(str(plain), "byte", out_dir=tmp_path / "ref")
    assert (out / "train.bin").read_bytes() == (ref / "train.bin").read_bytes()
    assert (out / "val.bin").read_bytes() == (ref / "val.bin").read_bytes()


def test_a_folder_skips_other_files_and_an_unknown_single_gz_is_text(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "b.csv.gz").write_bytes(gzip.compress(b"x,y"))
    (tmp_path / "d" / "c.json").write_text('{"text": "no"}')
    assert C.load_corpus(tmp_path / "d") == ["alpha"]
    (tmp_path / "notes.md.gz").write_bytes(gzip.compress("# notes\n".encode()))
    assert C.load_corpus(tmp_path / "notes.md.gz") == ["# notes\n"]


# ----------------------------------------------------------------------------- text_field
def test_a_text_field_other_than_text_is_read_and_is_part_of_the_identity(tmp_path, monkeypatch):
    texts = ["first body\nof text", "second body", "third"]
    _write_jsonl(tmp_path / "t.jsonl", texts)
    (tmp_path / "c").mkdir()
    _write_jsonl(tmp_path / "c" / "b.jsonl", texts, field="body")
    assert C.load_corpus(tmp_path / "c", text_field="body") == texts
    with pytest.raises(ValueError, match=r"b\.jsonl:1: expected an object with a string 'text' field.*'body'"):
        C.load_corpus(tmp_path / "c")
    want = P.prepare(str(tmp_path / "t.jsonl"), "byte", out_dir=tmp_path / "want")
    got = P.prepare(str(tmp_path / "c"), "byte", out_dir=tmp_path / "got", text_field="body")
    assert (want / "train.bin").read_bytes() == (got / "train.bin").read_bytes()
    meta = json.loads((got / "meta.json").read_text())
    assert meta["text_field"] == "body"
    assert "text_field" not in json.loads((want / "meta.json").read_text())  # the default: not recorded
    assert P._is_complete(got, P._identity(meta["source"], "byte", 0.05, 0, meta["corpus_sha256"], "body"))
    assert not P._is_complete(got, P._identity(meta["source"], "byte", 0.05, 0, meta["corpus_sha256"]))
    d0 = P.default_out_dir(str(tmp_path / "c"))
    assert P.default_out_dir(str(tmp_path / "c"), text_field="body") == d0.with_name(d0.name + "-field-body")
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    P.log.addHandler(handler)
    try:  # the same folder and field read as "text" from another file: replacing names the field
        _write_jsonl(tmp_path / "c" / "b.jsonl", texts)
        P.prepare(str(tmp_path / "c"), "byte", out_dir=got)
    finally:
        P.log.removeHandler(handler)
    assert "text_field: 'body' -> 'text'" in records[0].getMessage()
    assert "text_field" not in json.loads((got / "meta.json").read_text())
    for bad in ("", 3, None):
        with pytest.raises(ValueError, match="text_field must be a non-empty string"):
            P.prepare(str(tmp_path / "c"), "byte", out_dir=tmp_path / "x", text_field=bad)
    with pytest.raises(ValueError, match="text_field='body' applies to .jsonl / .parquet files"):
        C.load_corpus("shakespeare", text_field="body")


def test_parquet_text_field_and_the_cli_option(tmp_path, capsys):
    pa, pq = _pa()
    from experiments import prepare as cli
    texts = ["one document", "two documents\nhere", "three"]
    pq.write_table(pa.table({"content": texts, "n": [1, 2, 3]}), tmp_path / "c.parquet")
    assert C.load_corpus(tmp_path / "c.parquet", text_field="content") == texts
    with pytest.raises(ValueError, match=r"c\.parquet: no column 'text' \(its columns: 'content', 'n'\)"):
        C.load_corpus(tmp_path / "c.parquet")
    assert cli.main(["--data", str(tmp_path / "c.parquet"), "--text-field", "content",
                     "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["text_field"] == "content"
    assert cli.main(["--data", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "out2")]) == 2
    assert "no column 'text'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors
def test_unreadable_compressed_files_are_errors_naming_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz: not a valid gzip \(\.gz\) file"):
        C.load_corpus(bad)
    good = gzip.compress(b"".join(json.dumps({"text": f"record {i}"}).encode() + b"\n" for i in range(2000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(good[:len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz: not a valid gzip \(\.gz\) file \(after line \d+\)"):
        C.load_corpus(tmp_path / "cut.jsonl.gz")
    (tmp_path / "cut.txt.gz").write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match=r"cut\.txt\.gz: not a valid gzip"):
        P.prepare(str(tmp_path / "cut.txt.gz"), "byte", out_dir=tmp_path / "o")
    (tmp_path / "u.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "b\xffad"}\n'))
    with pytest.raises(ValueError, match=r"u\.jsonl\.gz:2: not valid UTF-8 \(byte 0xff"):
        C.load_corpus(tmp_path / "u.jsonl.gz")
    (tmp_path / "w.txt.gz").write_bytes(gzip.compress(b"ok \xff bad"))  # as a .txt: replaced, with a warning
    with pytest.warns(UnicodeWarning, match=r"w\.txt\.gz: 1 byte\(s\) are not valid UTF-8"):
        assert C.load_corpus(tmp_path / "w.txt.gz") == ["ok \ufffd bad"]
    (tmp_path / "r.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n{"body": "x"}\n'))
    with pytest.raises(ValueError, match=r"r\.jsonl\.gz:2: expected an object with a string 'text' field"):
        C.load_corpus(tmp_path / "r.jsonl.gz")


def test_a_corrupt_zstd_file_is_an_error_naming_it(tmp_path):
    zstd = _zstd()
    (tmp_path / "bad.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(ValueError, match=r"bad\.txt\.zst: not a valid zstandard \(\.zst\) file"):
        C.load_corpus(tmp_path / "bad.txt.zst")
    data = zstd.ZstdCompressor().compress(b"".join(b'{"text": "r%d"}\n' % i for i in range(5000)))
    (tmp_path / "cut.jsonl.zst").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.zst: not a valid zstandard"):
        C.load_corpus(tmp_path / "cut.jsonl.zst")


def test_unreadable_parquet_files_are_errors_naming_the_file_and_row(tmp_path):
    pa, pq = _pa()
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable Parquet file"):
        C.load_corpus(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), tmp_path / "null.parquet", row_group_size=2)
    with pytest.raises(ValueError, match=r"null\.parquet: row 3: 'text' is null"):
        C.load_corpus(tmp_path / "null.parquet")
    dictionary = pa.array(["x", "y", "x", ""]).dictionary_encode()  # a categorical column: strings
    pq.write_table(pa.table({"text": dictionary}), tmp_path / "dict.parquet")
    assert C.load_corpus(tmp_path / "dict.parquet") == ["x", "y", "x"]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match=r"ints\.parquet: column 'text' holds int64, not strings"):
        C.load_corpus(tmp_path / "ints.parquet")


@pytest.mark.parametrize("module, suffix, package", [("pyarrow", ".parquet", "pyarrow"),
                                                     ("zstandard", ".jsonl.zst", "zstandard")])
def test_a_missing_optional_package_is_an_error_naming_the_file_and_the_package(tmp_path, monkeypatch, module,
                                                                                 suffix, package):
    f = tmp_path / f"c{suffix}"
    f.write_bytes(b"whatever")
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import fails
    with pytest.raises(RuntimeError, match=rf"c{suffix.replace('.', chr(92) + '.')}: reading .* needs the optional "
                                           rf"'{package}' package \(pip install {package}"):
        P.prepare(str(tmp_path), "byte", out_dir=tmp_path / "o")
