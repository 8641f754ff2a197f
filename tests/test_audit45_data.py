"""Audit 45, data preparation and run-directory files: prepare() writes a long document's ids as
they are encoded (same bytes, less memory), two processes finishing the same stale rebuild
install one after the other, the run directory's tokenizer/ is replaced atomically, and run.yaml
records absolute paths for local files."""
import importlib
import json
import os
import threading

import numpy as np
import yaml

import jaxformers as jf
prep = importlib.import_module("jaxformers.data.prepare")
from jaxformers.data import tokenizer as toklib
from jaxformers.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer
from jaxformers.training import TrainConfig, rundir


def _docs():
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "eta\n", "\n\n", "  ", "θ"]
    return ["".join(rng.choice(words, size=n)) for n in (0, 3, 400, 5000)] + [""]


def test_encode_stream_concatenates_to_encode_arrays(monkeypatch):
    docs = _docs()
    monkeypatch.setattr(toklib, "_BATCH_CHARS", 64)  # many parts per document
    monkeypatch.setattr(toklib, "_PIECE_CHARS", 50)
    bpe = BPETokenizer(300).train(docs)
    for tok in (ByteTokenizer(), bpe):
        want = tok.encode_arrays(docs)
        got = [[] for _ in docs]
        seen = []
        for i, arr in tok._encode_stream(docs):
            seen.append(i)
            got[i].append(np.asarray(arr))
        assert seen == sorted(seen)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(np.concatenate(g) if g else np.zeros(0), w)


def test_prepare_output_is_unchanged_by_streaming(tmp_path, monkeypatch):
    """The streamed write gives the bytes of ``encode_arrays`` + end-of-text per document."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i, d in enumerate(_docs()[1:4] * 3):
        (corpus / f"{i:02d}.txt").write_text(d + str(i))
    monkeypatch.setattr(toklib, "_BATCH_CHARS", 64)
    for spec in ("byte", "bpe:300"):
        out = prep.prepare(str(corpus), spec, out_dir=tmp_path / spec.replace(":", ""), val_fraction=0.2)
        meta, train, val = prep.load_prepared(out)
        tok = load_tokenizer(out)
        docs = importlib.import_module("jaxformers.data.corpus").load_corpus(str(corpus))
        tr, va, _ = prep.split_documents(docs, 0.2, 0)
        for split_docs, arr in ((tr, train), (va, val)):
            want = np.concatenate([np.append(a, tok.eos_id) for a in tok.encode_arrays(split_docs)])
            np.testing.assert_array_equal(np.asarray(arr), want)


def test_two_processes_finishing_a_stale_rebuild_never_move_the_installed_dataset(tmp_path, monkeypatch):
    """Process B has found ``out`` stale when process A installs the same dataset: B must keep A's
    (the old code moved it aside, leaving ``out`` missing under A, which had returned it)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    out = prep.prepare(str(corpus), "byte", out_dir=tmp_path / "ds")
    identity = json.loads((out / prep.META_FILE).read_text())
    identity = {k: identity[k] for k in prep._identity("", "", 0.0, 0, "")}
    meta = json.loads((out / prep.META_FILE).read_text())
    meta["corpus_sha256"] = "stale"
    (out / prep.META_FILE).write_text(json.dumps(meta))  # out is now a stale dataset

    def staged(name):
        d = tmp_path / name
        d.mkdir()
        for f in ("train.bin", "val.bin", "tokenizer_config.json"):
            (d / f).write_bytes((tmp_path / "ds" / f).read_bytes())
        (d / prep.META_FILE).write_text(json.dumps(dict(meta, corpus_sha256=identity["corpus_sha256"])))
        return d

    tmp_a, tmp_b = staged("a"), staged("b")
    real_complete, real_rename = prep._is_complete, os.rename
    renames, fired = [], []

    def rename(src, dst):
        renames.append((str(src), str(dst)))
        return real_rename(src, dst)

    def is_complete(d, ident=None):
        result = real_complete(d, ident)
        if threading.current_thread() is threading.main_thread() and not fired:
            fired.append(1)  # B has just seen out stale: A installs now
            t = threading.Thread(target=prep._install, args=(tmp_a, out, identity))
            t.start()
            t.join(2.0)  # the old code: A finishes; the new: A waits for B's lock
            fired.append(t)
        return result

    monkeypatch.setattr(prep, "_is_complete", is_complete)
    monkeypatch.setattr(prep.os, "rename", rename)
    prep._install(tmp_b, out, identity)
    fired[1].join(10.0)
    assert not fired[1].is_alive()
    installed = [i for i, (s, d) in enumerate(renames) if d == str(out)]
    moved_aside = [i for i, (s, d) in enumerate(renames) if s == str(out)]
    assert installed and all(m < installed[0] for m in moved_aside), renames
    assert real_complete(out, identity)


class _FailingSave(BPETokenizer):
    def save(self, directory):
        Tokenizer.save(self, directory)  # tokenizer_config.json written ...
        raise OSError("disk full")       # ... tokenizer.json not


def test_copy_tokenizer_interrupted_leaves_the_previous_tokenizer(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rundir.copy_tokenizer(run, None, ByteTokenizer())
    assert load_tokenizer(run / rundir.TOKENIZER_DIR).spec == "byte"
    bad = _FailingSave(300).train(["some text to train on " * 20])
    rundir.copy_tokenizer(run, None, bad)  # best effort: logs, does not raise
    assert load_tokenizer(run / rundir.TOKENIZER_DIR).spec == "byte"  # old code: a half-written bpe dir
    assert sorted(p.name for p in run.iterdir()) == [rundir.TOKENIZER_DIR]  # no temporary left
    good = BPETokenizer(300).train(["some text to train on " * 20])
    rundir.copy_tokenizer(run, None, good)
    assert load_tokenizer(run / rundir.TOKENIZER_DIR).spec == "bpe:300"
    assert sorted(p.name for p in run.iterdir()) == [rundir.TOKENIZER_DIR]


def test_copy_tokenizer_interrupted_first_time_leaves_none(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rundir.copy_tokenizer(run, None, _FailingSave(300).train(["some text to train on " * 20]))
    assert not (run / rundir.TOKENIZER_DIR).exists()


def test_run_yaml_records_absolute_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus_dir").mkdir()
    (tmp_path / "corpus_dir" / "a.txt").write_text("text")
    hf = tmp_path / "tok"
    BPETokenizer(300).train(["some text to train on " * 20]).save(hf)  # a tokenizer.json
    (tmp_path / "prev").mkdir()
    model = jf.get_config("gpt", "tiny", vocab_size=257, d_model=32, n_layer=1, n_head=4, max_seq_len=32)
    tc = TrainConfig(data="corpus_dir", tokenizer="hf:tok", out_dir="runs/x", init_from="prev")
    (tmp_path / "r").mkdir()
    train = yaml.safe_load(rundir.write_run_file(tmp_path / "r", model, tc).read_text())["train"]
    assert train["data"] == str(tmp_path / "corpus_dir")
    assert train["tokenizer"] == f"hf:{tmp_path / 'tok'}"
    assert train["out_dir"] == str(tmp_path / "runs" / "x")
    assert train["init_from"] == str(tmp_path / "prev")
    # specs that are not local paths are kept as given
    for data in ("synthetic:copying", "default", "hf:wikitext", "domains:poems"):
        tc = TrainConfig(data=data, tokenizer="byte", out_dir="/abs/run")
        train = yaml.safe_load(rundir.write_run_file(tmp_path / "r", model, tc).read_text())["train"]
        assert (train["data"], train["tokenizer"], train["out_dir"]) == (data, "byte", "/abs/run")


def test_a_resume_from_run_yaml_reports_no_change_for_an_absolute_data_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus_dir").mkdir()
    (tmp_path / "corpus_dir" / "a.txt").write_text("text")
    saved = {"train": TrainConfig(data="corpus_dir").to_dict()}
    assert rundir.train_config_changes(saved, TrainConfig(data=str(tmp_path / "corpus_dir"))) == []
    assert rundir.train_config_changes(saved, TrainConfig(data="default")) != []


def test_run_yaml_records_a_prepared_dataset_named_like_a_builtin_corpus_as_its_path(tmp_path, monkeypatch):
    """``open_dataset`` takes a folder holding meta.json for that prepared dataset before a built-in
    name: run.yaml must record its path, not the name (which elsewhere means the built-in corpus)."""
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    prep.prepare(str(corpus), "byte", out_dir=tmp_path / "python")
    model = jf.get_config("gpt", "tiny", vocab_size=257, d_model=32, n_layer=1, n_head=4, max_seq_len=32)
    (tmp_path / "r").mkdir()
    path = rundir.write_run_file(tmp_path / "r", model, TrainConfig(data="python", out_dir="/abs/run"))
    assert yaml.safe_load(path.read_text())["train"]["data"] == str(tmp_path / "python")


def _long_text():
    rng = np.random.default_rng(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "É", "x2", "3", "don't", ",", ".", "\n", "\n\n", "  ", "\t"]
    return "".join(w + (" " if rng.random() < 0.6 else "") for w in rng.choice(words, size=4000))


def _hf_dir(tmp_path, name, pre=None, added=()):
    """A tokenizer.json trained here (never downloaded); ``pre``: another pre-tokenizer."""
    from tokenizers import AddedToken
    tok = BPETokenizer(400).train([_long_text()] * 2)
    hf = tok._tok
    if pre is not None:
        hf.pre_tokenizer = pre
    for content, kw in added:
        hf.add_tokens([AddedToken(content, **kw)])
    d = tmp_path / name
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    return d


def test_hf_tokenizer_encodes_long_texts_in_pieces_only_where_exact(tmp_path, monkeypatch):
    from tokenizers import pre_tokenizers
    text = _long_text()
    cases = {"bytelevel": (None, ()),  # GPT-2's kind: cut into pieces
             "whitespace": (pre_tokenizers.Whitespace(), ()),  # another pre-tokenizer: whole
             "lstrip": (None, (("sat", {"lstrip": True}),)),
             "rstrip": (None, (("mat", {"rstrip": True}),)),
             "space": (None, (("on a", {}),))}
    for name, (pre, added) in cases.items():
        d = _hf_dir(tmp_path, name, pre, added)
        tok = toklib.HFTokenizer(d)
        whole = tok.encode(text)
        with monkeypatch.context() as m:
            m.setattr(toklib, "_PIECE_CHARS", 40)
            m.setattr(toklib, "_BATCH_CHARS", 300)
            parts = list(tok._encode_stream([text, "", text[:50]]))
            got = tok.encode_arrays([text, "", text[:50]])
        assert got[0].tolist() == whole, name
        assert got[1].tolist() == [] and got[2].tolist() == tok.encode(text[:50])
        n_parts = sum(1 for i, _ in parts if i == 0)
        assert (n_parts > 1) == (name == "bytelevel"), (name, n_parts)
