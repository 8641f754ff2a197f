"""Regression tests of the data-at-scale audit: byte-level BPE trains on and encodes a long document
in pieces (the same ids and merges, bounded memory), a UTF-16/32 file with a byte-order mark is
decoded as such, and a corpus folder follows symlinked folders (a link loop ends)."""
import os
import random
import warnings

import numpy as np
import pytest

pytest.importorskip("tokenizers")

WORDS = ["the", "of", "and", "thou", "art", "romeo", "king's", "crown", "1599", "naïve", "漢字"]


def _text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts = []
    for i in range(n_words):
        parts.append(rng.choice(WORDS))
        parts.append(rng.choice(["\n", " ", " ", " ", ", ", ".\n", "  ", "\r\n", "\t"]) if i % 7 == 6 else " ")
    return "".join(parts)


class _SpyTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` and records the lengths of the texts it trains on / encodes."""

    def __init__(self, tok, lengths):
        object.__setattr__(self, "_tok", tok)
        object.__setattr__(self, "_lengths", lengths)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)

    def train_from_iterator(self, iterator, **kw):
        def record():
            for t in iterator:
                self._lengths.append(len(t))
                yield t
        return self._tok.train_from_iterator(record(), **kw)

    def encode_batch(self, texts, **kw):
        self._lengths.extend(len(t) for t in texts)
        return self._tok.encode_batch(texts, **kw)

    def encode_batch_fast(self, texts, **kw):
        self._lengths.extend(len(t) for t in texts)
        return self._tok.encode_batch_fast(texts, **kw)


def test_bpe_trains_on_and_encodes_a_long_document_in_pieces(monkeypatch):
    """A 20 MB file with no document breaks is one document: BPE training held ~2.4 GB for it (one
    thread) and encoding another ~2.1 GB (a record per token) -- 43.8 s and 4.66 GB peak RSS to
    prepare it with bpe:4096.  Both now see pieces cut where the pre-tokenizer starts a new
    pre-token anyway (the same merges, the same ids): 28.9 s and 0.47 GB."""
    import tokenizers

    from jaxformers.data.tokenizer import get_tokenizer

    doc = _text(120_000)  # ~650k characters, one document
    real = tokenizers.Tokenizer
    lengths: list[int] = []
    monkeypatch.setattr(tokenizers, "Tokenizer", lambda *a, **k: _SpyTokenizer(real(*a, **k), lengths))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = get_tokenizer("bpe:400").train([doc, "short one"])
    assert lengths and max(lengths) < 200_000, max(lengths)  # trained on pieces
    lengths.clear()
    arrays = tok.encode_arrays([doc, "", "x"])
    assert max(lengths) < 200_000, max(lengths)  # encoded in pieces
    monkeypatch.setattr(tokenizers, "Tokenizer", real)
    whole = tok._tok._tok.encode(doc, add_special_tokens=False).ids
    assert arrays[0].tolist() == whole
    assert arrays[1].size == 0 and arrays[2].tolist() == tok.encode("x")
    with warnings.catch_warnings():  # the same merges as trained on the whole text
        warnings.simplefilter("ignore")
        ref = get_tokenizer("bpe:400")
        monkeypatch.setattr("jaxformers.data.tokenizer._PIECE_CHARS", 10 ** 9, raising=False)
        ref.train([doc, "short one"])
    assert ref._tok.to_str() == tok._tok._tok.to_str()


def test_bpe_pieces_give_the_ids_of_the_whole_text_on_odd_text(monkeypatch):
    """The cut places are exact for any text (blanks at a piece's end, CRLF, NUL, emoji, tabs, lone
    surrogates, Unicode spaces, literal end-of-text): tiny pieces, every text encodes as whole."""
    import jaxformers.data.tokenizer as T

    rng = random.Random(1)
    alpha = list("abXZ09 '\n\r\t.,!") + ["  ", " \n", "é", "中", "😀", "\u2028", "\xa0", "\u3000", "\x85",
                                         "²", "Ⅷ", "_", "'s", "\x00", "\x1c", T.EOS_TEXT, "\ud800"]
    texts = ["".join(rng.choice(alpha) for _ in range(rng.randint(0, 400))) for _ in range(120)]
    texts += [_text(300, seed=2), "", " ", "a\n"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = T.get_tokenizer("bpe:500").train(texts)
    for size in (1, 4, 32):
        monkeypatch.setattr(T, "_PIECE_CHARS", size)
        got = tok.encode_arrays(texts)
        for t, ids in zip(texts, got):
            assert "".join(T._pieces(t)) == t
            assert ids.tolist() == tok.encode(t), (size, t)
    # a loaded tokenizer.json with another pre-tokenizer (cut places unknown) is encoded whole
    from tokenizers import pre_tokenizers
    tok._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    for t, ids in zip(texts, tok.encode_arrays(texts)):
        assert ids.tolist() == tok.encode(t)


def test_bpe_encode_arrays_takes_a_generator_and_keeps_added_tokens_with_spaces_whole(monkeypatch):
    """Review of audit 44: a generator of texts gave empty arrays (read twice), and an added token
    with a space (a loaded tokenizer.json's) could be cut in two by the pieces."""
    import jaxformers.data.tokenizer as T

    texts = [_text(200, seed=3), _text(50, seed=4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = T.get_tokenizer("bpe:400").train(texts)
    got = tok.encode_arrays(t for t in texts)
    assert [a.tolist() for a in got] == [tok.encode(t) for t in texts]
    tok._tok.add_tokens(["thou art"])
    monkeypatch.setattr(T, "_PIECE_CHARS", 1)
    for t, ids in zip(texts, tok.encode_arrays(texts)):
        assert ids.tolist() == tok.encode(t)


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be-bom", "utf-32"])
def test_a_utf16_or_utf32_file_with_a_byte_order_mark_is_decoded(tmp_path, codec):
    """A .txt saved as "Unicode" by Windows Notepad / PowerShell (UTF-16 with a BOM) was read as
    UTF-8: a warning about 2 bad bytes, then a document of U+FFFD U+FFFD and a NUL byte after every
    letter, trained on and tokenized as such."""
    from jaxformers.data.corpus import load_corpus

    text = "Wherefore art thou, Roméo? 😀\r\n"
    raw = b"\xfe\xff" + text.encode("utf-16-be") if codec == "utf-16-be-bom" else text.encode(codec)
    (tmp_path / "a.txt").write_bytes(raw)
    (tmp_path / "b.txt").write_text("plain utf-8\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_corpus(tmp_path) == [text, "plain utf-8\n"]
    (tmp_path / "a.txt").write_bytes(b"\xff\xfeA\x00\x00\xd8")  # a lone surrogate: not UTF-16
    with pytest.raises(ValueError, match="a.txt.*UTF-16"):
        load_corpus(tmp_path)


def test_a_corpus_folder_follows_symlinked_folders_and_ends_link_loops(tmp_path):
    """Symlinked files were read but symlinked folders silently skipped (``Path.rglob`` before
    Python 3.13 does not enter them): a corpus assembled from links lost those documents."""
    from jaxformers.data.corpus import load_corpus

    other = tmp_path / "other"
    other.mkdir()
    (other / "linked.txt").write_text("from a linked folder")
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first")
    (root / "sub" / "b.txt").write_text("second")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.txt").write_text("hidden")
    try:
        os.symlink(other, root / "more")
        os.symlink(root, root / "sub" / "loop")  # a loop back to the corpus root
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    assert load_corpus(root) == ["first", "from a linked folder", "second"]


def test_counting_the_bad_bytes_of_a_binary_txt_file_takes_no_memory_per_byte(tmp_path):
    """A .txt that is not text (a binary dump) had its bad bytes counted with a regex findall: a
    string object per bad byte, 1.05 GB peak RSS to read a 20 MB random file (0.30 GB now)."""
    import tracemalloc
    from pathlib import Path

    from jaxformers.data.corpus import _read_text

    data = np.random.default_rng(0).integers(0, 256, 1_000_000, dtype=np.uint8).tobytes()
    path = Path(tmp_path / "dump.txt")
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.warns(UnicodeWarning) as rec:
            text = _read_text(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    n_bad = sum(0xDC80 <= c <= 0xDCFF for c in map(ord, data.decode("utf-8", "surrogateescape")))
    assert f"{n_bad} byte(s) are not valid UTF-8" in str(rec[0].message)
    assert text == data.decode("utf-8", "replace")
    assert peak < 16 * len(data), peak  # the text and a few copies, not ~80 bytes per bad byte


def test_an_unlistable_subfolder_is_skipped_with_a_warning_and_an_unlistable_root_is_an_error(tmp_path, monkeypatch):
    """Review of audit 44: one unreadable subfolder (a volume's root-only ``lost+found``) aborted
    the whole corpus load; it is skipped with a warning naming it.  The root itself still raises."""
    import jaxformers.data.corpus as C

    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.txt").write_text("beta")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)  # root can list anything: fake the refusal
    with pytest.warns(UserWarning, match="locked: cannot be listed"):
        files = C._corpus_files(tmp_path)
    assert [f.name for f in files] == ["a.txt"]
    with pytest.raises(PermissionError):
        C._corpus_files(tmp_path / "locked")
