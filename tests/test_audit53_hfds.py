"""Audit 53, ``hf:`` sources stream: an ``hf:NAME[@CONFIG][:SPLIT]`` dataset is loaded once and its
text column read a batch of rows at a time on each pass of ``prepare`` (and by ``iter_corpus``),
never taken whole, writing the same dataset as the in-memory path did; ``load_corpus`` still lists
it; the column checks are unchanged.  The ``datasets`` package is replaced by a stand-in
(``_FakeDataset``); the last test checks the stand-in against the real package when it is installed."""
import importlib
import json
import sys
import types
import warnings

import numpy as np
import pytest

from jaxformers.data import corpus as C

import test_audit52_data
from test_audit52_data import _no_load, _old_prepare, _words, _written
from test_audit53_data import _FakeDataset

P = importlib.import_module("jaxformers.data.prepare")
hf_dir = test_audit52_data.hf_dir  # a fixture: a small tokenizer.json


class _Made:
    """A read-only sequence whose value ``i`` is ``make(i)``, made when it is read (a column that is
    never in memory whole)."""

    def __init__(self, n, make):
        self.n, self.make = n, make

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.make(j) for j in range(*i.indices(self.n))]
        return self.make(i)

    def __iter__(self):
        return (self.make(j) for j in range(self.n))


def _install(monkeypatch, ds):
    """``sys.modules['datasets']`` with a ``load_dataset`` that returns ``ds``; its calls are recorded."""
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return ds

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def _texts(n_docs=2600, seed=0):
    """A text column over several 1024-row batches: copies, empty strings and ``None`` among them."""
    rng = np.random.default_rng(seed)
    pool = [_words(rng, int(k)) for k in rng.integers(3, 40, 300)]
    texts = [pool[int(i)] for i in rng.integers(0, len(pool), n_docs)]
    for i in range(0, n_docs, 97):
        texts[i] = ""
    for i in range(5, n_docs, 311):
        texts[i] = None
    return texts


def _old_documents(column):
    """What ``_load_hf`` returned before: ``[t for t in ds[column] if isinstance(t, str) and t]``."""
    return [t for t in column if isinstance(t, str) and t]


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:300", "hf"])
def test_hf_prepare_streams_writing_what_the_in_memory_path_wrote(tmp_path, monkeypatch, hf_dir, tokenizer):
    tok = f"hf:{hf_dir}" if tokenizer == "hf" else tokenizer
    texts = _texts()
    labels = list(range(len(texts)))
    want_docs = _old_documents(texts)
    cases = [("hf:someone/set", "text", texts), ("hf:someone/set@cfg:validation", "body", texts),
             ("hf:one", "text", [None, "", "\n".join(want_docs[:40])]),  # one document: its tail is val
             ("hf:same", "text", [want_docs[3]] * 3)]
    splits = [(0.05, 0), (0.3, 3)] if tokenizer == "bpe:300" else [(0.05, 0), (0.3, 3), (0.0, 0)]
    for spec, field, column in cases:
        ds = _FakeDataset({"label": labels[:len(column)], field: column},
                          {"label": "int64", field: "large_string"})
        calls = _install(monkeypatch, ds)
        for vf, seed in splits:
            with monkeypatch.context() as m, warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # bpe:300 on a tiny text: fewer tokens
                m.setattr(C, "load_corpus", lambda data, text_field="text": _old_documents(column))
                m.setattr(P, "_identity", lambda *a, _identity=P._identity: _identity(*a, field))
                want = _old_prepare(spec, tok, None, vf, seed)
            with monkeypatch.context() as m, warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                _no_load(m)
                m.setattr(C, "_load_hf", lambda *a, **k: pytest.fail("the dataset was listed whole"))
                del ds.log[:], calls[:]
                out = P.prepare(spec, tok, out_dir=tmp_path / f"{spec}-{vf}-{seed}".replace(":", "_"),
                                val_fraction=vf, seed=seed, text_field=field)
            assert _written(out) == want, (spec, vf, seed)
            name, _, split = spec[3:].partition(":")
            name, _, config = name.partition("@")
            assert calls == [(name, config or None, split or "train")]  # loaded once
            assert ("whole", field) not in ds.log and ("select_columns", [field]) in ds.log
            n_batches = -(-len(column) // 1024)
            assert {e for e in ds.log if e[0] == "iter"} == {("iter", 1024)}
            assert sum(e[0] == "batch" for e in ds.log) % n_batches == 0  # every pass reads every batch


def test_hf_prepare_memory_does_not_grow_with_the_dataset(tmp_path, monkeypatch):
    """8192 rows of 2000 characters (16 MB of text), made as they are read: the in-memory path held
    them all; streamed, the Python heap holds a batch of 1024 rows (2 MB) at a time."""
    import tracemalloc
    rng = np.random.default_rng(0)
    block = "".join(chr(c) for c in rng.integers(97, 123, 2000))
    column = _Made(8192, lambda i: f"{i:04d}" + block[4:])  # distinct documents
    _install(monkeypatch, _FakeDataset({"text": column}, {"text": "string"}))
    tracemalloc.start()
    try:
        out = P.prepare("hf:big", "byte", out_dir=tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_documents"]["train"] + meta["n_documents"]["val"] == 8192
    assert sum(meta["n_chars"].values()) == sum(len(t) for t in column)
    assert peak < 6_000_000, peak  # the in-memory path: > 16 MB


def test_hf_iter_corpus_streams_load_corpus_lists_and_the_checks_are_unchanged(monkeypatch):
    texts = _texts(3000, seed=1)
    ds = _FakeDataset({"label": list(range(3000)), "text": texts, "body": texts[::-1]},
                      {"label": "int64", "text": "string", "body": "string"})
    _install(monkeypatch, ds)
    docs = C.iter_corpus("hf:someone/set")
    assert next(docs) == _old_documents(texts)[0]
    assert ("whole", "text") not in ds.log and sum(e[0] == "batch" for e in ds.log) == 1  # one batch read
    assert [next(docs)] + list(docs) == _old_documents(texts)[1:]
    assert C.load_corpus("hf:someone/set") == _old_documents(texts)
    assert C.load_corpus("hf:someone/set", text_field="body") == _old_documents(texts[::-1])
    assert list(C.iter_corpus("hf:someone/set", text_field="body")) == _old_documents(texts[::-1])
    assert ("whole", "text") not in ds.log and ("whole", "body") not in ds.log
    for run in (C.load_corpus, lambda *a, **k: list(C.iter_corpus(*a, **k)), P.prepare):
        with pytest.raises(ValueError, match=r"column 'label' holds int64, not text"):
            run("hf:someone/set", text_field="label")
        with pytest.raises(ValueError, match=r"no column text_field='nope' \(columns: \['label', 'text', 'body'\]\)"):
            run("hf:someone/set", text_field="nope")
    # without a text column the first string column is read; without a string column it is an error
    _install(monkeypatch, _FakeDataset({"n": [1, 2], "s": ["x", ""], "t": ["y", "z"]},
                                       {"n": "int32", "s": "string", "t": "string"}))
    assert C.load_corpus("hf:x") == list(C.iter_corpus("hf:x")) == ["x"]
    _install(monkeypatch, _FakeDataset({"n": [1, 2]}, {"n": "int32"}))
    for run in (C.load_corpus, lambda *a, **k: list(C.iter_corpus(*a, **k)), P.prepare):
        with pytest.raises(ValueError, match=r"has no string column \(columns: \['n'\]\)"):
            run("hf:x")
    _install(monkeypatch, _FakeDataset({"text": ["", None] * 700}, {"text": "string"}))
    for run in (C.load_corpus, lambda *a, **k: list(C.iter_corpus(*a, **k)), P.prepare):
        with pytest.raises(ValueError, match=r"data='hf:x': the dataset holds no non-empty text"):
            run("hf:x")


def test_the_stand_in_behaves_as_the_real_datasets_package(tmp_path, monkeypatch):
    """An ``hf:`` dataset made of a local folder of JSONL files, read with the real ``datasets``
    package and with ``_FakeDataset`` holding the same columns: the same documents, the same
    prepared dataset, the same errors."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    texts = _texts(2100, seed=2)
    folder = tmp_path / "set"
    folder.mkdir()
    with open(folder / "part0.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"label": i, "text": t, "body": texts[-1 - i]}) + "\n")
    spec = f"hf:{folder}"

    def results():
        out = {"load": C.load_corpus(spec), "iter": list(C.iter_corpus(spec)),
               "body": C.load_corpus(spec, text_field="body"),
               "prepared": _written(P.prepare(spec, "byte", out_dir=tmp_path / "out", force=True,
                                              val_fraction=0.2))}
        for field in ("label", "nope"):
            with pytest.raises((ValueError, RuntimeError)) as e:
                C.load_corpus(spec, text_field=field)
            out[field] = (e.type, str(e.value))
        return out

    real = results()
    features = datasets.load_dataset(str(folder), None, split="train").features
    assert {k: f.dtype for k, f in features.items()} == {"label": "int64", "text": "string", "body": "string"}
    with monkeypatch.context() as m:
        _install(m, _FakeDataset({"label": list(range(len(texts))), "text": texts, "body": texts[::-1]},
                                 {k: f.dtype for k, f in features.items()}))
        fake = results()
    assert real == fake
    assert real["load"] == real["iter"] == _old_documents(texts)


def _install_disk(monkeypatch, saved):
    """A stand-in ``datasets`` whose ``load_from_disk`` returns ``saved`` (a ``_FakeDataset``, or a dict
    of them: a ``DatasetDict``) and whose ``load_dataset`` must not be called."""
    def load_dataset(*a, **k):
        raise AssertionError("load_dataset called for a save_to_disk folder")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=load_dataset, load_from_disk=lambda path: saved))


def test_hf_save_to_disk_folders_are_read_with_load_from_disk(tmp_path, monkeypatch):
    """``hf:FOLDER`` of ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (which ``load_dataset``
    cannot read) is read with ``load_from_disk``: a Dataset without ``:SPLIT``, a DatasetDict's split
    (default ``train``); ``@CONFIG``, a split of a Dataset and a missing split are ``ValueError``s."""
    one, both = tmp_path / "one", tmp_path / "both"
    one.mkdir(), both.mkdir()
    (one / "state.json").write_text("{}")
    (both / "dataset_dict.json").write_text("{}")
    texts = ["alpha beta", "", "gamma"]
    _install_disk(monkeypatch, _FakeDataset({"text": texts}, {"text": "string"}))
    assert C.load_corpus(f"hf:{one}") == ["alpha beta", "gamma"]
    for spec, match in ((f"hf:{one}:test", "without splits"), (f"hf:{one}@cfg", "no configurations")):
        with pytest.raises(ValueError, match=match):
            C.load_corpus(spec)
    _install_disk(monkeypatch, {"train": _FakeDataset({"body": texts}, {"body": "string"}),
                                "test": _FakeDataset({"body": ["delta"]}, {"body": "string"})})
    assert C.load_corpus(f"hf:{both}", text_field="body") == ["alpha beta", "gamma"]
    assert C.load_corpus(f"hf:{both}:test", text_field="body") == ["delta"]
    with pytest.raises(ValueError, match=r"split 'val' is not in .* its splits: \['test', 'train'\]"):
        C.load_corpus(f"hf:{both}:val", text_field="body")
    with pytest.raises(ValueError, match="holds int64, not text"):
        _install_disk(monkeypatch, _FakeDataset({"n": [1]}, {"n": "int64"}))
        C.load_corpus(f"hf:{one}", text_field="n")


def test_hf_save_to_disk_with_the_real_package(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = ["one two", "", "three", "four five six"]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(4))}).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                          "test": datasets.Dataset.from_dict({"text": ["seven"]})}).save_to_disk(
        str(tmp_path / "both"))
    assert C.load_corpus(f"hf:{tmp_path / 'one'}") == ["one two", "three", "four five six"]
    assert C.load_corpus(f"hf:{tmp_path / 'both'}") == ["one two", "three", "four five six"]
    assert C.load_corpus(f"hf:{tmp_path / 'both'}:test") == ["seven"]
    with pytest.raises(ValueError, match="without splits"):
        C.load_corpus(f"hf:{tmp_path / 'one'}:train")
