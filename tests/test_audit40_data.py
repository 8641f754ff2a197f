"""Regression tests of the data-pipeline audit: decode with skip_special treats the end-of-text id
the same way in every tokenizer (the runs between them are decoded on their own), copies of a
document never land in both splits, and the loaders refuse a negative max_batches."""
import json

import numpy as np
import pytest

from jaxformers.data.tokenizer import EOS_TEXT, get_tokenizer

pytest.importorskip("tokenizers")

TEXTS = ["hello world 😀 emoji 漢字 text", "ROMEO: wherefore\n\n\tart thou", "naïve café " * 3] * 10


def _byte_level_ids(tok, data: bytes):
    """The ids of the single-byte tokens of a byte-level BPE for ``data`` (one per byte)."""
    from tokenizers.pre_tokenizers import ByteLevel

    # GPT-2's byte -> printable-character map, as tokenizers' ByteLevel alphabet spells it
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in keep}
    chars.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in keep)})
    assert set(chars.values()) == set(ByteLevel.alphabet())
    vocab = tok._tok.get_vocab()
    return [vocab[chars[b]] for b in data]


def test_decode_never_joins_bytes_across_an_end_of_text_id():
    """A character split by an end-of-text id (a model that ended a document mid-character) used to
    decode as two U+FFFD in the byte tokenizer but as the whole character in BPE with
    ``skip_special=True``: every tokenizer now decodes the runs between end-of-text ids on their
    own, with or without ``skip_special`` (which only leaves the marker out)."""
    lead, cont = "é".encode()
    byte = get_tokenizer("byte")
    bpe = get_tokenizer("bpe:300").train(TEXTS)
    for tok, (a, b) in ((byte, [lead, cont]), (bpe, _byte_level_ids(bpe, bytes([lead, cont])))):
        ids = [a, tok.eos_id, b]
        assert tok.decode(ids) == "\ufffd" + EOS_TEXT + "\ufffd"
        assert tok.decode(ids, skip_special=True) == "\ufffd\ufffd", tok
        assert tok.decode([a, b], skip_special=True) == "é"
        for x, y in (("abc", "déf"), (TEXTS[0], TEXTS[1]), ("", "x")):
            joined = tok.encode(x) + [tok.eos_id] + tok.encode(y)
            assert tok.decode(joined, skip_special=True) == x + y
            assert tok.decode(joined) == x + EOS_TEXT + y


def test_hf_decode_with_skip_special_gives_the_documents(tmp_path):
    """hf:DIR decoded every id as one stream with skip_special: a SentencePiece tokenizer put the
    prefix space of the next document's first word back (``"hello world the world"``), which is
    in neither document; now each document between end-of-text ids is decoded on its own."""
    from test_audit_cli import _sentencepiece_tokenizer

    tok = _sentencepiece_tokenizer(tmp_path / "sp")
    a, b = "hello world", "the world"
    ids = tok.encode(a) + [tok.eos_id] + tok.encode(b)
    assert tok.decode(ids, skip_special=True) == a + b
    assert tok.decode(ids) == a + "</s>" + b
    assert tok.decode(tok.encode(a) + [tok.eos_id]) == a + "</s>"


def test_split_keeps_every_copy_of_a_document_in_one_split(tmp_path):
    """Exact duplicates (a licence, boilerplate) were split independently: with most seeds one copy
    went to val while the others stayed in train, so val shared documents with train."""
    from jaxformers.data.prepare import SPLIT_RULE, load_prepared, prepare, split_documents

    docs = [f"unique document number {i}\n" * 5 for i in range(10)] + ["the same licence text\n"] * 10
    for seed in range(8):
        train, val, how = split_documents(docs, 0.2, seed)
        assert how == "documents" and val and not set(train) & set(val), seed
        assert sorted(train + val) == sorted(docs)
    # every document is a copy of one text: the tail is cut from every copy
    text = "".join(f"line {i}\n" for i in range(40))
    train, val, how = split_documents([text] * 3, 0.05, 0)
    assert how == "tail" and train == [train[0]] * 3 and val == [val[0]] * 3 and train[0] + val[0] == text
    assert val[0] not in train[0]

    folder = tmp_path / "corpus"
    folder.mkdir()
    with open(folder / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    meta, train_ids, val_ids = load_prepared(prepare(str(folder), "byte", out_dir=tmp_path / "ds",
                                                     val_fraction=0.2, seed=1))
    tok = get_tokenizer("byte")
    train_docs = set(tok.decode(np.asarray(train_ids)).split(EOS_TEXT)[:-1])
    val_docs = set(tok.decode(np.asarray(val_ids)).split(EOS_TEXT)[:-1])
    assert val_docs and not train_docs & val_docs and meta["split_rule"] == SPLIT_RULE == 3


def test_split_without_duplicates_is_unchanged():
    """The rule-3 split equals rule 2's on corpora without duplicate documents (pinned values)."""
    from jaxformers.data.prepare import split_documents

    docs = [f"doc {i} " + "x" * (10 * i + 5) for i in range(12)]
    _, val, how = split_documents(docs, 0.2, 0)
    assert how == "documents" and sorted(docs.index(v) for v in val) == [5, 10]


def test_a_negative_max_batches_is_refused():
    """max_batches=-1 yielded no batch at all (silently: no evaluation), where ``evaluate``'s -1
    means the run's eval_batches."""
    from jaxformers.data.loader import eval_batches, iterate_rows

    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(ValueError, match="max_batches"):
        list(eval_batches(tokens, 2, 8, max_batches=-1))
    with pytest.raises(ValueError, match="max_batches"):
        list(iterate_rows({"tokens": np.zeros((10, 3), np.int32)}, 2, max_batches=-1))
    assert len(list(eval_batches(tokens, 2, 8, max_batches=0))) == 0


def test_force_rebuilds_a_dataset_made_with_the_same_settings(tmp_path):
    """``prepare(force=True)`` (``experiments.prepare --force``) kept an existing dataset of the same
    settings: the install step took it for a concurrent prepare's result, so a damaged dataset
    could not be rebuilt."""
    from jaxformers.data.prepare import load_prepared, prepare

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_text(f"document {i} " + "some words here " * 20)
    out = prepare(str(folder), "bpe:300", out_dir=tmp_path / "ds")
    first = np.asarray(load_prepared(out)[1]).copy()
    (out / "tokenizer.json").unlink()
    with open(out / "train.bin", "r+b") as f:
        f.write(b"\xff\xff" * 4)
    out = prepare(str(folder), "bpe:300", out_dir=tmp_path / "ds", force=True)
    assert (out / "tokenizer.json").is_file()
    assert np.array_equal(np.asarray(load_prepared(out)[1]), first)


def test_a_missing_or_unreadable_bpe_tokenizer_json_is_a_clear_error(tmp_path):
    """``load_tokenizer`` of a BPE directory raised the tokenizers library's bare ``Exception``
    ("No such file or directory (os error 2)", no file name), which the CLIs do not catch."""
    from jaxformers.data.tokenizer import load_tokenizer

    get_tokenizer("bpe:300").train(TEXTS).save(tmp_path)
    (tmp_path / "tokenizer.json").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
