"""Audit 52 review: regressions found by differential testing / reading the streaming prepare and
the new corpus readers."""
import importlib
import json

import pytest

from jaxformers.data import corpus as C

P = importlib.import_module("jaxformers.data.prepare")


@pytest.mark.parametrize("tokenizer", ["byte-jsonl", "bpe:300"])
def test_a_one_document_corpus_changed_between_passes_is_an_error(tmp_path, monkeypatch, tokenizer):
    # the text of a one-document corpus is read again to be split, and that text is written:
    # an edit of the same length between the passes must not give a dataset whose meta.json
    # records the fingerprint of the text before the edit
    f = tmp_path / ("one.jsonl" if tokenizer == "byte-jsonl" else "one.txt")
    text = "alpha gamma\n" * 40
    f.write_text(json.dumps({"text": text}) + "\n" if f.suffix == ".jsonl" else text)
    real = P._Documents.split

    def edited(self, *a, **k):
        f.write_text(f.read_text().replace("a", "b"))  # the same length
        return real(self, *a, **k)

    monkeypatch.setattr(P._Documents, "split", edited)
    with pytest.raises(RuntimeError, match="changed while it was prepared"):
        P.prepare(str(f), tokenizer.split("-")[0], out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_parquet_string_that_is_not_utf8_is_an_error_naming_the_file_and_row(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq
    # a string column written without validation by another tool: its second value is not UTF-8
    offsets = pa.py_buffer(b"\x00\x00\x00\x00\x02\x00\x00\x00\x04\x00\x00\x00")
    column = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"ok\xff\xfe")])
    pq.write_table(pa.table({"text": column}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: row 2: 'text' is not valid UTF-8"):
        C.load_corpus(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"text": column.dictionary_encode()}), tmp_path / "dict.parquet")  # categorical
    with pytest.raises(ValueError, match=r"dict\.parquet: row 2: 'text' is not valid UTF-8"):
        C.load_corpus(tmp_path / "dict.parquet")


def test_text_fields_whose_slugs_collide_get_distinct_default_out_dirs(tmp_path):
    # "a b" and "a_b" (or "é" and "data") are different fields: their datasets must not share a
    # default folder (each prepare would replace the other's); a long name stays a valid file name
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "x"}\n')
    fields = ("a b", "a_b", "\u00e9", "data", "x" * 300, "x" * 301)
    names = [P.default_out_dir(str(f), "byte", text_field=t).name for t in fields]
    assert len(set(names)) == len(names)
    assert all(len(n.encode()) < 200 for n in names)
    assert P.default_out_dir(str(f), "byte", text_field="content").name.endswith("-field-content")


def test_a_domain_source_is_read_no_further_than_its_cap(tmp_path, monkeypatch):
    """A ``domains:`` source was loaded whole (every file read) before being cut to ``max_bytes``."""
    from jaxformers.data import corpus
    from jaxformers.data.domains import load_domain_docs

    folder = tmp_path / "src"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.txt").write_text(f"document {i} " + "x" * 100)
    opened = []
    real = corpus._read_text
    monkeypatch.setattr(corpus, "_read_text", lambda path, *a, **k: opened.append(path.name) or real(path, *a, **k))
    docs = load_domain_docs("mine", str(folder), max_bytes=150)
    assert [len(d) for d in docs] == [111, 39] and docs[1] == ("document 1 " + "x" * 100)[:39]
    assert opened == ["0.txt", "1.txt"]  # was every file
    opened.clear()
    assert load_domain_docs("mine", str(folder), max_bytes=0) == [f"document {i} " + "x" * 100 for i in range(6)]
    assert len(opened) == 6
