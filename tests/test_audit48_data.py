"""Audit 48: data pipeline (loader, prepare, tokenizer, sources, corpus)."""

import json
import os

import numpy as np
import pytest

from jaxformers.data.corpus import corpus_fingerprint
from jaxformers.data.loader import (SyntheticLoader, TokenLoader, check_token_array, eval_batches,
                                    iterate_rows, synthetic_rows)
from jaxformers.data.prepare import load_prepared, prepare
from jaxformers.data.sources import SyntheticSource, TextSource, open_dataset
from jaxformers.data.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer, load_tokenizer

ONE = dict(process_index=0, process_count=1)


# ----------------------------------------------------------------------------- tokenizer input checks
@pytest.mark.parametrize("ids", [[104.7, 105.2], np.array([104.0, 105.0]), [True, False], ["104"],
                                 np.array(["104", "105"])])
def test_decode_refuses_ids_that_are_not_integers(ids):
    # used to truncate 104.7 -> 104 ('h'), read True as id 1 and parse the string "104"
    with pytest.raises(ValueError, match="integers"):
        ByteTokenizer().decode(ids)


def test_decode_still_takes_empty_and_integer_ids_of_any_width():
    tok = ByteTokenizer()
    assert tok.decode([]) == "" and tok.decode(np.zeros(0)) == ""
    for dtype in (np.uint16, np.int16, np.uint32, np.int64):
        assert tok.decode(np.array([104, 105, 256], dtype)) == "hi<|endoftext|>"
    with pytest.raises(ValueError, match=f"id {2 ** 64 - 1} out of range"):
        tok.decode(np.array([2 ** 64 - 1], np.uint64))  # named as it is, not wrapped to -1 as int64
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([257])  # the first id past the vocabulary


@pytest.mark.parametrize("text", [b"hi", None, 65])
def test_byte_encode_refuses_what_is_not_a_str(text):
    # used to be an AttributeError ('bytes' object has no attribute 'encode'), as bpe / hf already did
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="str"):
        tok.encode(text)
    with pytest.raises(ValueError, match="str"):
        tok.encode_arrays(["ok", text])


def test_byte_round_trip_of_non_ascii_surrogates_and_end_of_text_text():
    tok = ByteTokenizer()
    a, b = "é\u20ac\U0001F600 <|endoftext|>\x00", "\ud83d lone"
    ids = tok.encode(a) + [tok.eos_id] + tok.encode(b)
    assert ids.count(tok.eos_id) == 1  # end-of-text text inside a document is plain bytes
    assert tok.decode(ids, skip_special=True) == a + b.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    assert tok.decode(tok.encode(a)) == a
    assert [a.size for a in tok.encode_arrays([a, ""])] == [len(a.encode("utf-8")), 0]


# ----------------------------------------------------------------------------- token arrays
def test_in_memory_uint32_ids_past_int32_are_refused_not_wrapped():
    big = np.array([5, 2 ** 31 + 1, 7, 9], np.uint32)
    with pytest.raises(ValueError, match=r"2\*\*31"):
        TextSource.from_tokens(big)  # its docstring promised this; the windows came out negative
    with pytest.raises(ValueError, match=r"2\*\*31"):
        TokenLoader(big, 1, 2, **ONE)
    with pytest.raises(ValueError, match=r"2\*\*31"):
        list(eval_batches(big, 1, 2, **ONE))
    edge = np.array([0, 2 ** 31 - 1, 3], np.uint32)  # the largest int32 id is fine
    assert check_token_array(edge) is edge
    assert TokenLoader(edge, 1, 2, **ONE).batch_at(0).tolist() == [[0, 2 ** 31 - 1, 3]]


def test_a_uint32_memmap_is_not_scanned(tmp_path):
    path = tmp_path / "t.bin"
    np.array([1, 2, 3, 4], np.uint32).tofile(path)
    mm = np.memmap(path, dtype=np.uint32, mode="r", shape=(4,))
    assert check_token_array(mm) is mm


# ----------------------------------------------------------------------------- loader invariants
def test_loader_jump_equals_iteration_and_processes_union_is_the_global_batch():
    toks = (np.arange(97) * 7 % 31).astype(np.uint16)
    full = TokenLoader(toks, 8, 5, seed=3, **ONE)
    it = full.iterate(2)
    for step in range(2, 7):
        g = full.global_batch_at(step)
        assert np.array_equal(next(it), g) and np.array_equal(full.batch_at(step), g)
        for n_proc in (2, 4, 8):
            parts = [TokenLoader(toks, 8, 5, seed=3, process_index=p, process_count=n_proc).batch_at(step)
                     for p in range(n_proc)]
            assert all(p.shape == (8 // n_proc, 6) for p in parts)
            assert np.array_equal(np.concatenate(parts), g)
        for row, s in zip(g, full.offsets_at(step)):  # each row is the window at its offset
            assert np.array_equal(row, toks[s:s + 6])


def test_loader_seeds_and_steps_do_not_alias():
    # a seed derived as seed + step would make (seed 0, step 1) the batch of (seed 1, step 0)
    toks = np.arange(5000) % 251
    a = TokenLoader(toks, 4, 8, seed=0, **ONE)
    b = TokenLoader(toks, 4, 8, seed=1, **ONE)
    assert not np.array_equal(a.offsets_at(1), b.offsets_at(0))
    assert not np.array_equal(a.offsets_at(0), b.offsets_at(1))


def test_loader_reaches_the_last_window_and_no_window_past_the_end():
    toks = np.arange(7)  # seq_len 5: starts 0 and 1 only
    loader = TokenLoader(toks, 4, 5, seed=0, **ONE)
    starts = np.concatenate([loader.offsets_at(s) for s in range(20)])
    assert set(starts.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(np.arange(5), 1, 5, **ONE)  # n == seq_len: no window


def _reference_eval(n, seq_len, batch_size, max_batches, drop_last):
    wins = [list(range(i * seq_len, i * seq_len + seq_len + 1)) for i in range((n - 1) // seq_len)]
    batches = [wins[i:i + batch_size] for i in range(0, len(wins), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    return batches if max_batches is None else batches[:max_batches]


@pytest.mark.parametrize("n,seq_len", [(9, 4), (10, 4), (12, 4), (13, 4), (2, 1), (25, 3)])
def test_eval_batches_cover_exactly_the_documented_windows(n, seq_len):
    # (n - 1) % seq_len == 0 (n = 9, 13, 25): the last window ends on the last token and is yielded
    toks = np.arange(n)
    for batch_size in (1, 2, 4):
        for max_batches in (None, 0, 1, 2):
            for drop_last in (False, True):
                ref = _reference_eval(n, seq_len, batch_size, max_batches, drop_last)
                got = [b.tolist() for b in eval_batches(toks, batch_size, seq_len, max_batches,
                                                       drop_last=drop_last, **ONE)]
                assert got == ref, (batch_size, max_batches, drop_last)
                for n_proc in (2,) if batch_size % 2 == 0 else ():
                    per = [list(eval_batches(toks, batch_size, seq_len, max_batches, drop_last=drop_last,
                                             process_index=p, process_count=n_proc)) for p in range(n_proc)]
                    assert [len(x) for x in per] == [len(ref)] * n_proc
                    merged = [np.concatenate([per[p][i] for p in range(n_proc)]).tolist() for i in range(len(ref))]
                    assert merged == ref


def test_eval_batches_refuses_a_drop_last_that_is_not_a_bool():
    # drop_last="no" was truthy: the short last batch was silently dropped
    with pytest.raises(ValueError, match="drop_last"):
        list(eval_batches(np.arange(10), 2, 3, drop_last="no", **ONE))
    with pytest.raises(ValueError, match="drop_last"):
        list(iterate_rows({"a": np.arange(5)}, 2, drop_last=None, **ONE))
    assert len(list(eval_batches(np.arange(10), 2, 3, drop_last=np.bool_(True), **ONE))) == 1


def test_iterate_rows_refuses_a_non_mapping_or_scalar_arrays():
    with pytest.raises(ValueError, match="arrays"):
        list(iterate_rows([np.arange(3)], 2, **ONE))  # was AttributeError: 'list' has no 'items'
    with pytest.raises(ValueError, match="arrays"):
        list(iterate_rows({"a": np.int32(3)}, 2, **ONE))  # was TypeError: no len()


# ----------------------------------------------------------------------------- prepare: dtype and cache key
def _wordlevel_dir(path, eos_id, extra=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "é": 3, "</s>": eos_id, **(extra or {})}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def _corpus(path, docs):
    path.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (path / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    return path


@pytest.mark.parametrize("eos_id,dtype", [(65535, "uint16"), (65536, "uint32")])
def test_prepared_ids_are_uint16_up_to_a_vocab_of_65536_and_uint32_above(tmp_path, eos_id, dtype):
    tok_dir = _wordlevel_dir(tmp_path / "tok", eos_id)
    corpus = _corpus(tmp_path / "c", ["a b é", "b a"])
    out = prepare(str(corpus), f"hf:{tok_dir}", out_dir=tmp_path / "ds", val_fraction=0.0)
    meta, train, val = load_prepared(out)
    assert meta["vocab_size"] == eos_id + 1 and meta["eos_id"] == eos_id and meta["dtype"] == dtype
    assert train.dtype == np.dtype(dtype) and val.size == 0
    assert train.tolist() == [1, 2, 3, eos_id, 2, 1, eos_id]  # the eos id survives the store exactly
    assert os.path.getsize(out / "train.bin") == 7 * np.dtype(dtype).itemsize
    assert load_tokenizer(out).eos_id == eos_id
    window = TextSource(str(out), out, meta, train, val).train_loader(1, 6, 0, **ONE).batch_at(0)
    assert window.dtype == np.int32 and window.max() == eos_id


def _stamp(out):
    st = os.stat(out / "meta.json")
    return st.st_ino, st.st_mtime_ns


def test_prepare_cache_key_follows_every_input_that_changes_the_tokens(tmp_path):
    docs = ["alpha beta\n" * 30, "gamma delta\n" * 30, "eps zeta\n" * 30, "eta theta\n" * 30]
    corpus = _corpus(tmp_path / "c", docs)
    out = tmp_path / "ds"
    args = dict(out_dir=out, val_fraction=0.3)

    def meta():
        return json.loads((out / "meta.json").read_text())

    prepare(str(corpus), "byte", seed=0, **args)
    first = _stamp(out)
    prepare(str(corpus), "byte", seed=0, **args)
    assert _stamp(out) == first  # same inputs: reused untouched
    # another seed: another document order, hence (here) another split; rebuilt
    seeds = {}
    for seed in range(6):
        prepare(str(corpus), "byte", seed=seed, **args)
        assert meta()["seed"] == seed
        seeds[seed] = load_prepared(out)[2].tobytes()
    assert len(set(seeds.values())) > 1
    # another val_fraction, another tokenizer: rebuilt
    prepare(str(corpus), "byte", seed=0, out_dir=out, val_fraction=0.5)
    assert meta()["val_fraction"] == 0.5
    # the same text in other documents (a boundary moved): rebuilt
    stamp = _stamp(out)
    (corpus / "00.txt").write_text(docs[0] + "g", encoding="utf-8")
    (corpus / "01.txt").write_text(docs[1][1:], encoding="utf-8")
    prepare(str(corpus), "byte", seed=0, out_dir=out, val_fraction=0.5)
    assert _stamp(out) != stamp
    m = meta()
    _, train, val = load_prepared(out)
    got = bytes(np.concatenate([train, val]).astype(np.uint8)[np.concatenate([train, val]) != 256]).decode()
    assert sorted(got) == sorted(docs[0] + "g" + docs[1][1:] + docs[2] + docs[3])
    assert m["n_documents"]["train"] + m["n_documents"]["val"] == 4


def test_corpus_fingerprint_sees_document_boundaries_and_order():
    assert corpus_fingerprint(["ab", "c"]) != corpus_fingerprint(["a", "bc"])
    assert corpus_fingerprint(["a", "b"]) != corpus_fingerprint(["b", "a"])
    assert corpus_fingerprint(["ab", ""]) != corpus_fingerprint(["ab"])
    assert corpus_fingerprint(["é"]) == corpus_fingerprint(["é"])


def test_hf_prepare_is_rebuilt_when_the_tokenizer_json_or_its_end_of_text_changes(tmp_path):
    tok_dir = _wordlevel_dir(tmp_path / "tok", 4, {"<eos>": 5})
    corpus = _corpus(tmp_path / "c", ["a b é", "b a"])
    out = tmp_path / "ds"
    spec = f"hf:{tok_dir}"
    prepare(str(corpus), spec, out_dir=out, val_fraction=0.0)
    assert load_prepared(out)[1].tolist() == [1, 2, 3, 4, 2, 1, 4]
    stamp = _stamp(out)
    prepare(str(corpus), spec, out_dir=out, val_fraction=0.0)
    assert _stamp(out) == stamp
    # the same tokenizer.json, another end-of-text token named in tokenizer_config.json
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    prepare(str(corpus), spec, out_dir=out, val_fraction=0.0)
    assert load_prepared(out)[1].tolist() == [1, 2, 3, 5, 2, 1, 5]
    assert load_tokenizer(out).eos_id == 5  # the saved eos_id, not the first candidate ("</s>" = 4)
    # a prepared folder carries its tokenizer: "byte" (the default) means the dataset's, another is refused
    assert open_dataset(str(out), "byte")[1]["eos_id"] == 5
    assert open_dataset(str(out), spec)[1]["eos_id"] == 5
    with pytest.raises(ValueError, match="differs"):
        open_dataset(str(out), "bpe:300")
    # another tokenizer.json (the same end-of-text): rebuilt with its ids
    _wordlevel_dir(tok_dir, 4, {"<eos>": 5, "x": 6})
    (tok_dir / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text().replace('"a": 1', '"a": 7'))
    prepare(str(corpus), spec, out_dir=out, val_fraction=0.0)
    assert load_prepared(out)[1].tolist() == [7, 2, 3, 5, 2, 7, 5]


# ----------------------------------------------------------------------------- packed synthetic rows
@pytest.mark.parametrize("row_len,per_row", [(16, 2), (17, 2), (15, 1), (24, 3)])
def test_packed_recall_rows_hold_every_whole_example_that_fits(row_len, per_row):
    # recall with 2 pairs: 8-token examples; a row of exactly 2 or 3 examples is filled, not padded
    out = synthetic_rows("recall", 3, row_len, seed=5, params={"n_pairs": 2, "vocab": 32})
    used = 8 * per_row
    toks, mask = out["tokens"], out["loss_mask"]
    assert (toks[:, :used:8] == 1).all()  # a BOS opens every example
    assert (toks[:, used:] == 0).all() and (mask[:, used:] == 0).all()  # padding
    assert (mask[:, :used].reshape(3, per_row, 8).sum(-1) == 1).all()  # one answer per example
    if per_row > 1:
        seg = out["segment_ids"]
        assert seg[:, :used].tolist() == [np.repeat(np.arange(1, per_row + 1), 8).tolist()] * 3
        assert (seg[:, used:] == 0).all()
    else:
        assert "segment_ids" not in out


def test_synthetic_loader_processes_union_is_the_global_batch():
    full = SyntheticLoader("recall", 4, 15, seed=2, params={"n_pairs": 2, "vocab": 32}, **ONE)
    g = full.global_batch_dict_at(3)
    assert set(g) == {"tokens", "loss_mask", "segment_ids"}
    parts = [SyntheticLoader("recall", 4, 15, seed=2, params={"n_pairs": 2, "vocab": 32}, process_index=p,
                             process_count=2).batch_dict_at(3) for p in range(2)]
    for k in g:
        assert np.array_equal(np.concatenate([p[k] for p in parts]), g[k])


# ----------------------------------------------------------------------------- sources
def test_has_eval_data_needs_exactly_one_window():
    src = TextSource.from_tokens(np.arange(6))
    assert src.has_eval_data(5) and not src.has_eval_data(6)
    assert [b["tokens"].tolist() for b in src.eval_batches(4, 5, None, **ONE)] == [[list(range(6))]]
    assert src.vocab_size == 6


def test_synthetic_source_val_rows_are_held_out_and_train_rows_are_not():
    from jaxformers.data.synthetic import is_heldout
    spec = "synthetic:recall:n_pairs=2,vocab=32,pack=0,val_rows=8"
    src = SyntheticSource(spec)
    val, train = src.split_rows(7, "val"), src.split_rows(7, "train")
    assert is_heldout(val["tokens"], val["loss_mask"]).all()
    assert not is_heldout(train["tokens"], train["loss_mask"]).any()
    batch = src.train_loader(16, 7, 0, **ONE).batch_dict_at(4)
    assert not is_heldout(batch["tokens"], batch["loss_mask"]).any()
    assert np.array_equal(SyntheticSource(spec).split_rows(7, "val")["tokens"], val["tokens"])


# ----------------------------------------------------------------------------- split / completeness
@pytest.mark.parametrize("seed", range(4))
def test_split_stops_as_soon_as_val_reaches_its_share(seed):
    from jaxformers.data.prepare import split_documents
    docs = ["a" * 10, "b" * 10, "c" * 10, "d" * 10]
    train, val, method = split_documents(docs, 0.25, seed)  # the target is exactly one document
    assert method == "documents" and len(val) == 1 and len(train) == 3
    assert sorted(train + val) == docs


def test_a_bin_file_of_the_wrong_size_is_not_a_complete_dataset(tmp_path):
    corpus = _corpus(tmp_path / "c", ["hello world\n" * 5, "second doc\n" * 5])
    out = prepare(str(corpus), "byte", out_dir=tmp_path / "ds", val_fraction=0.0)
    n = load_prepared(out)[0]["n_tokens"]["train"]
    with open(out / "train.bin", "ab") as f:
        f.write(b"\x00\x00")  # one id too many
    with pytest.raises(FileNotFoundError):
        load_prepared(out)
    prepare(str(corpus), "byte", out_dir=out, val_fraction=0.0)  # rebuilt, not reused
    meta, train, _ = load_prepared(out)
    assert train.size == n == meta["n_tokens"]["train"]


def test_one_document_split_keeps_a_character_in_train_and_in_val():
    from jaxformers.data.prepare import split_documents
    assert split_documents(["abcdefghij"], 0.99, 0) == (["a"], ["bcdefghij"], "tail")
    assert split_documents(["abcdefghij"], 0.001, 0) == (["abcdefghi"], ["j"], "tail")
    assert split_documents(["a"], 0.5, 0) == (["a"], [], "tail")
    assert split_documents(["abcdefghij"], 0.25, 0) == (["abcdefgh"], ["ij"], "tail")  # 7.5 rounds to 8
    # a line break as the last character: the cut stays before it (moving past it leaves no val)
    assert split_documents(["abcdefghi\n"], 0.1, 0) == (["abcdefghi"], ["\n"], "tail")
    assert split_documents(["abcdefg\nij"], 0.3, 0) == (["abcdefg\n"], ["ij"], "tail")


@pytest.mark.parametrize("seed", range(6))
def test_split_always_leaves_a_train_document(seed):
    from jaxformers.data.prepare import split_documents
    for docs in (["aaaa", "bbbb"], ["aaaa", "bbbb", "cccc"], ["ab", "ab", "cd"]):
        train, val, _ = split_documents(docs, 0.9, seed)
        assert train and sorted(train + val) == sorted(docs) and not set(train) & set(val)


def test_one_file_byte_prepare_keeps_a_character_in_train_at_a_large_val_fraction(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij", encoding="utf-8")
    meta, train, val = load_prepared(prepare(str(f), "byte", out_dir=tmp_path / "ds", val_fraction=0.99))
    assert train.tolist() == [ord("a"), 256] and bytes(val[:-1].astype(np.uint8)) == b"bcdefghij"
    assert meta["n_chars"] == {"train": 1, "val": 9}


def test_bpe_vocab_bounds_are_inclusive():
    from jaxformers.data.tokenizer import parse_tokenizer_spec
    assert parse_tokenizer_spec("bpe:258") == ("bpe", 258)
    assert parse_tokenizer_spec("bpe:4194304") == ("bpe", 1 << 22)
    for bad in ("bpe:257", "bpe:4194305"):
        with pytest.raises(ValueError, match="VOCAB"):
            parse_tokenizer_spec(bad)


@pytest.mark.parametrize("bad", ["val_rows=0", "val_rows=-3"])
def test_synthetic_spec_needs_at_least_one_val_row(bad):
    from jaxformers.data.sources import parse_synthetic_spec
    assert parse_synthetic_spec("synthetic:copying:val_rows=1")[2] == 1
    with pytest.raises(ValueError, match="val_rows"):
        parse_synthetic_spec(f"synthetic:copying:{bad}")


def test_hf_decode_refuses_float_ids_and_round_trips_integer_ones(tmp_path):
    tok = HFTokenizer(_wordlevel_dir(tmp_path / "tok", 4))
    assert tok.vocab_size == 5 and tok.eos_id == 4
    ids = tok.encode("a b é") + [tok.eos_id] + tok.encode("b")
    assert ids == [1, 2, 3, 4, 2]
    assert tok.decode(np.asarray(ids, np.int32), skip_special=True) == "a b é" + "b"  # each run on its own
    assert tok.decode(ids) == "a b é</s>b"
    with pytest.raises(ValueError, match="integers"):
        tok.decode(np.asarray(ids, np.float32))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_negative_ids_of_any_signed_width_are_refused(dtype):
    with pytest.raises(ValueError, match=r"2\*\*31"):
        TokenLoader(np.array([1, -1, 2, 3], dtype), 1, 2, **ONE)


def test_hf_eos_token_named_in_the_config_but_not_in_the_vocabulary_is_refused(tmp_path):
    """It fell back silently to ``</s>`` (or another candidate): documents joined by another token."""
    import json

    from jaxformers.data.tokenizer import CONFIG_FILE

    d = _wordlevel_dir(tmp_path / "tok", 4)
    (d / CONFIG_FILE).write_text(json.dumps({"eos_token": "<|eot|>"}))
    with pytest.raises(ValueError, match=r"eos_token '<\|eot\|>' is not in the vocabulary"):
        HFTokenizer(d)
    (d / CONFIG_FILE).write_text(json.dumps({"eos_token": {"content": "b"}}))
    assert HFTokenizer(d).eos_id == 2  # a named token that exists wins over the candidates
