"""Tokenize a corpus once into memory-mappable ``train.bin`` / ``val.bin``.

Layout of a prepared dataset directory::

    meta.json              # written last; see FORMAT_VERSION and prepare()
    train.bin, val.bin     # flat token ids, dtype meta["dtype"] (uint16 or uint32)
    tokenizer_config.json  # + tokenizer.json for BPE; load with load_tokenizer(dir)

Every document is followed by the tokenizer's end-of-text id.  The split is
made at document level (a seeded shuffle; documents are moved to val until it
holds ``val_fraction`` of the characters, always leaving one train document, and
copies of a document all go to the same split),
or, for a single-document corpus, by cutting the tail of the text at a line
break.  The BPE tokenizer is trained on the train documents only.

Output is staged in a sibling temporary directory and renamed into place, so
a crash never leaves a directory that looks complete; re-running with the same
arguments on the same corpus reuses the existing output.

Memory: a local corpus (a folder, a ``.txt`` / ``.jsonl`` / ``.parquet`` file, compressed or
not) is never held whole: it is read a document at a time (:func:`~.corpus.iter_corpus`), once
for its fingerprint, the length of each document and a 16-byte hash of it (copies of a text share
a split: 24 bytes kept per document, ~100 bytes at the peak while they are grouped and the split
is drawn, 1 GB for 10 M documents), once more to write the token files, and once more
before that for ``bpe``, whose trainer reads the train documents (its own memory grows with the
distinct words it sees) -- the same dataset as holding it all gave (:class:`_Documents`).  One
document is held at a time (a ``.txt`` file is one, with its bytes while it is read), a chunk of
64 (at most about 1M characters) while it is encoded; a one-document corpus, or the document
whose tail a ``"tail"`` split cuts, is held while it is split.  The ``byte`` tokenizer on a
corpus that is one valid UTF-8 file copies its bytes in chunks of 1 MB (:class:`_ByteFile`: the
same output, a few MB whatever its size).  An ``hf:`` dataset is read the same way, a batch of 1024
rows of its text column at a time on each pass (:class:`~.corpus._HFDocuments`; ``datasets`` keeps
the dataset in Arrow files it memory-maps).  Built-in corpora are loaded whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from .corpus import (_check_text_field, _file_format, _hf_documents, _iter_files, _load_other, _no_documents,
                     _path_files, _slug, cache_dir, fingerprint_document, resolve_corpus)
from ..utils import int_arg
from .tokenizer import get_tokenizer, hf_tokenizer_dir, load_tokenizer, parse_tokenizer_spec

__all__ = [
    "FORMAT_VERSION",
    "default_out_dir",
    "ensure_dataset",
    "load_prepared",
    "load_tokenizer",
    "prepare",
    "split_documents",
]

FORMAT_VERSION = 1
#: Version of :func:`split_documents`' rule, part of a cached dataset's identity (a change rebuilds).
SPLIT_RULE = 3
META_FILE = "meta.json"
_SPLITS = ("train", "val")
log = logging.getLogger(__name__)


def check_split_args(val_fraction, seed) -> tuple[float, int]:
    """``(val_fraction, seed)`` validated and normalised: a number in [0, 1) as a Python float and
    an int >= 0 as a Python int (``ValueError`` naming the argument; a float seed is refused, not
    truncated).  A numpy float narrower than float64 is read as the shortest decimal that
    it rounds to (``np.float32(0.1)`` is ``0.1``), so equal values name, and are, the same
    dataset (its folder name and its identity)."""
    if isinstance(val_fraction, (bool, np.bool_)) or not isinstance(val_fraction, (int, float, np.integer,
                                                                                   np.floating)) \
            or not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(val_fraction, np.floating) and np.finfo(val_fraction.dtype).bits < 64:
        value = float(np.format_float_positional(val_fraction, unique=True, trim="0"))
    else:
        value = float(val_fraction)
    return value, int_arg("seed", seed, lo=0)


def _canonical_tokenizer(tokenizer: str) -> str:
    kind, vocab = parse_tokenizer_spec(tokenizer)
    if kind == "hf":  # the tokenizer file's content hash: another tokenizer.json is another dataset
        import hashlib
        digest = hashlib.sha256((hf_tokenizer_dir(tokenizer) / "tokenizer.json").read_bytes()).hexdigest()
        return f"hf:{digest[:12]}"
    return kind if vocab is None else f"{kind}:{vocab}"


def default_out_dir(data: str = "default", tokenizer: str = "byte", val_fraction: float = 0.05,
                    seed: int = 0, text_field: str = "text") -> Path:
    """``<cache>/datasets/<corpus name>-<tokenizer>``, e.g. ``.../shakespeare-bpe4096``
    (``hf:DIR`` tokenizers: ``...-hf<hash of tokenizer.json>``); a split other than the default
    adds ``-val<fraction>-seed<seed>``, so it never overwrites (nor is overwritten by) the
    default split that training on ``--data`` prepares; a ``text_field`` other than ``"text"``
    adds ``-field-<name>`` (a name with other characters than ``A-Za-z0-9._-``, or longer than 40:
    its slug and a hash of it)."""
    src = resolve_corpus(data)
    val_fraction, seed = check_split_args(val_fraction, seed)
    tok = _canonical_tokenizer(tokenizer).replace(":", "")
    split = "" if (val_fraction, seed) == (0.05, 0) else f"-val{val_fraction}-seed{seed}"
    field = "" if _check_text_field(text_field) == "text" else f"-field-{_slug(text_field)[:40]}"
    if field and field != f"-field-{text_field}":  # a name the slug changes or cuts: fields never share a folder
        field += "-" + hashlib.sha256(text_field.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return cache_dir() / "datasets" / f"{src.name}-{tok}{split}{field}"


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str], str]:
    """Deterministic train/val split; returns (train_docs, val_docs, method).

    One document: its tail (``"tail"``).  Several: whole documents, in a seeded order, go to val
    until it holds ``val_fraction`` of the characters (``"documents"``); a document that would
    take val past twice that is skipped, so one large document cannot take most of the corpus.
    When every document is that large, the tail of the largest one is cut off instead
    (``"tail"``; train always keeps a document: copies of one single text keep at least their
    first character there, as one document does, and one-character copies all stay in train).
    Copies of a document (the same text) go to the same split, all of them (a cut tail: from
    each copy), so val shares no document with train.  (Rule 3,
    :data:`SPLIT_RULE`: datasets prepared by rule 1, which took the first document whatever its
    size, or by rule 2, which could put copies of a document in both splits, are rebuilt.)"""
    val_fraction, seed = check_split_args(val_fraction, seed)
    if not docs:
        raise ValueError("cannot split an empty corpus")
    if val_fraction == 0.0:
        return list(docs), [], "none"
    if len(docs) == 1:
        return _split_one(docs[0], val_fraction)
    copies: dict[str, int] = {}  # each distinct text (in order of appearance) -> its group
    group = [copies.setdefault(d, len(copies)) for d in docs]
    method, val_groups, big, target = _split_plan([len(d) for d in docs], group, len(copies), val_fraction, seed)
    if method == "tail":
        n_copies = group.count(group[big])
        head, tail = _split_big(docs[big], n_copies, len(copies), target)
        train = [head if group[i] == group[big] else d for i, d in enumerate(docs) if group[i] != group[big] or head]
        return train, [tail] * n_copies if tail else [], "tail"
    train = [d for i, d in enumerate(docs) if not val_groups[group[i]]]
    val = [d for i, d in enumerate(docs) if val_groups[group[i]]]
    return train, val, "documents"


def _split_one(text: str, val_fraction: float) -> tuple[list[str], list[str], str]:
    """:func:`split_documents` of a one-document corpus: its tail."""
    cut = _one_document_cut(len(text), val_fraction, _newline_in(text))
    return [text[:cut]], [text[cut:]] if text[cut:] else [], "tail"


def _split_plan(lengths, group, n_groups: int, val_fraction: float, seed: int):
    """The rule of :func:`split_documents` for two documents or more, from their lengths (in
    characters) and ``group`` (``group[i]``: the index of document ``i``'s text among the distinct
    texts, in order of first appearance: copies share one): ``("documents", val_groups, None,
    target)`` (``val_groups[g]``: group ``g``'s documents go to val) or ``("tail", None, big,
    target)`` (the tail of document ``big``, the first longest one, and of its copies)."""
    lengths, group = np.asarray(lengths, np.int64), np.asarray(group, np.int64)
    n = len(lengths)
    target = val_fraction * int(lengths.sum())
    count = np.bincount(group, minlength=n_groups)
    size_of = np.zeros(n_groups, np.int64)
    size_of[group] = lengths  # copies have one length
    val_groups, n_val, val_chars = np.zeros(n_groups, bool), 0, 0
    for j in np.random.default_rng([int(seed), 0x5EED]).permutation(n_groups):
        if val_chars >= target:
            break
        c = int(count[j])
        if n_val + c > n - 1:  # always leave a train document
            continue
        size = int(size_of[j]) * c
        if val_chars + size > max(2.0 * target, 1.0):  # would overshoot: leave it in train
            continue
        val_groups[j] = True
        n_val += c
        val_chars += size
    if not n_val:  # every document alone is more than twice the target: the largest one's tail
        return "tail", None, int(np.argmax(lengths)), target  # the first longest one
    return "documents", val_groups, None, target


def _split_big(big: str, n_copies: int, n_groups: int, target: float) -> tuple[str, str]:
    """``(head, tail)`` of :func:`split_documents`' ``"tail"`` split: where the text ``big`` (held by
    ``n_copies`` documents of a corpus of ``n_groups`` distinct texts) is cut."""
    cut = _at_line_end(len(big) - max(1, int(round(target / n_copies))), len(big), _newline_in(big))
    if cut == 0 and n_groups == 1:  # copies of one text, none left in train: keep its head
        cut = _at_line_end(1, len(big), _newline_in(big))  # there, as one document (1 char: no val)
    return big[:cut], big[cut:]


def _newline_in(text: str):
    """``find(cut)``: the index of the first line break in ``text[cut:cut + 1000]``, or -1."""
    return lambda cut: text.find("\n", cut, cut + 1000)


def _at_line_end(cut: int, n: int, find) -> int:
    """A cut at character ``cut`` of a text of ``n`` characters, moved just past a line break
    that ``find(cut)`` finds near it, unless that leaves no tail."""
    nl = find(cut)
    return nl + 1 if 0 <= nl < n - 1 else cut


def _one_document_cut(n: int, val_fraction: float, find) -> int:
    """Where one document of ``n`` characters is cut (train ``[:cut]``, val the rest): at
    ``1 - val_fraction`` of it, keeping a character in each split where it has two, then at a
    near line break (:func:`_at_line_end`)."""
    cut = int(round(n * (1.0 - val_fraction)))
    cut = min(max(cut, 1), n - 1) if n > 1 else n
    return _at_line_end(cut, n, find)


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _identity(src_spec: str, tok_spec: str, val_fraction: float, seed: int, fingerprint: str,
              text_field: str = "text") -> dict:
    identity = {"format_version": FORMAT_VERSION, "source": src_spec, "tokenizer": tok_spec,
                "val_fraction": float(val_fraction), "seed": int(seed), "corpus_sha256": fingerprint,
                "split_rule": SPLIT_RULE}
    if text_field != "text":  # recorded only when set: datasets of the default field keep their identity
        identity["text_field"] = text_field
    return identity


def _is_complete(out_dir: Path, identity: dict | None = None) -> bool:
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    if identity is not None and (any(meta.get(k) != v for k, v in identity.items())  # text_field: "text" if absent
                                 or meta.get("text_field", "text") != identity.get("text_field", "text")):
        return False
    try:
        item = np.dtype(meta["dtype"]).itemsize
        return all((out_dir / meta["files"][s]).stat().st_size == meta["n_tokens"][s] * item
                   for s in _SPLITS)
    except (OSError, KeyError, TypeError):
        return False


def prepare(data: str = "default", tokenizer: str = "byte", out_dir: str | os.PathLike | None = None,
            val_fraction: float = 0.05, seed: int = 0, *, force: bool = False, text_field: str = "text") -> Path:
    """Tokenize ``data`` (see :func:`jaxformers.data.corpus.load_corpus`) and write a dataset.

    Returns the dataset directory.  If it already holds a dataset made from the
    same corpus contents with the same tokenizer/val_fraction/seed (and
    ``force`` is false), it is reused untouched (``hf:DIR``: the same tokenizer.json
    and the same end-of-text id).  ``text_field``: the field of ``.jsonl`` records / the column of
    ``.parquet`` files (and ``hf:`` datasets) that holds the text (part of the dataset's identity
    when it is not ``"text"``).

    A local file or folder, or an ``hf:`` dataset, is read a document at a time, in two passes
    (three for ``bpe``: its training reads the train documents), so memory does not grow with the
    corpus's text: what is kept per document is its length and a 16-byte hash (:class:`_Documents`;
    see the module doc).
    """
    src = resolve_corpus(data)
    val_fraction, seed = check_split_args(val_fraction, seed)
    text_field = _check_text_field(text_field)
    tok_spec = _canonical_tokenizer(tokenizer)
    out = (Path(out_dir).expanduser() if out_dir is not None
           else default_out_dir(data, tokenizer, val_fraction, seed, text_field))
    # byte tokenizer on one UTF-8 file: read in chunks, never holding its text (see _ByteFile)
    stream = _ByteFile.open(src) if tok_spec == "byte" else None
    docs = _Documents(src, text_field) if stream is None else None  # read once: its fingerprint
    identity = _identity(src.spec, tok_spec, val_fraction, seed,
                         docs.fingerprint if stream is None else stream.fingerprint, text_field)
    hf_tok = None
    if tok_spec.startswith("hf:"):  # its end-of-text id comes from tokenizer_config.json, not the hash
        hf_tok = get_tokenizer(tokenizer)
        identity["eos_id"] = int(hf_tok.eos_id)
    if not force and _is_complete(out, identity):
        return out
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / META_FILE).exists())):
        raise FileExistsError(f"{out} exists and is not a jaxformers dataset directory; choose another out_dir")
    if out_dir is not None and _is_complete(out):  # an explicit directory holding another dataset
        try:
            old = json.loads((out / META_FILE).read_text())
        except (OSError, ValueError):
            old = {}
        default = {"text_field": "text"}  # not recorded when it is the default
        changed = {k: (old.get(k, default.get(k)), identity.get(k, default.get(k))) for k in {**identity, **default}
                   if old.get(k, default.get(k)) != identity.get(k, default.get(k))}
        log.warning("prepare: replacing the dataset in %s, which was prepared with other settings (%s)", out,
                    ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()) or "force=True")

    if stream is not None:
        n_documents, n_chars, method = stream.split(val_fraction)
    else:
        n_documents, n_chars, method = docs.split(val_fraction, seed)
    tok = hf_tok if hf_tok is not None else get_tokenizer(tok_spec).train(
        docs.texts("train") if docs is not None else [])
    dtype = _dtype_for(tok.vocab_size)
    eos = np.asarray([tok.eos_id], dtype=dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the installed dataset should not be
    try:
        if stream is not None:
            n_tokens = {split: stream.write(split, tmp / f"{split}.bin", dtype, eos) for split in _SPLITS}
        else:
            n_tokens = docs.write(tmp, tok, dtype, eos)
        tok.save(tmp)
        meta = dict(
            identity,
            source_name=src.name,
            source_kind=src.kind,
            tokenizer_vocab_requested=int(tok_spec.split(":")[1]) if tok_spec.startswith("bpe") else None,
            vocab_size=int(tok.vocab_size),
            eos_id=int(tok.eos_id),
            dtype=dtype.name,
            n_tokens=n_tokens,
            n_documents=n_documents,
            n_chars=n_chars,
            split_method=method,
            files={"train": "train.bin", "val": "val.bin"},
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        _install(tmp, out, identity, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


class _Documents:
    """The documents of a corpus for :func:`prepare`, read again on each pass: a local file or
    folder one file (``.txt``) / one record (``.jsonl``) / one batch of rows (``.parquet``) at a
    time (:func:`~.corpus._iter_files`), an ``hf:`` dataset one batch of rows at a time
    (:class:`~.corpus._HFDocuments`, loaded once), a built-in corpus from a list in memory.

    The first pass (made on construction) computes the corpus fingerprint and keeps, per
    document, its length in characters and a 16-byte hash of its text (copies of a text share
    their split): :meth:`split` applies :func:`split_documents`' rule to those
    (:func:`_split_plan`) and gives the same split; :meth:`texts` and :meth:`write` read the
    documents again and route each to its split (the text of a one-document corpus, or of the
    document whose tail is cut, is read once more and held).  A corpus whose files change between
    passes is a ``RuntimeError`` (checked against the fingerprint while writing, and on the read
    that finds the text to split)."""

    _CHUNK_DOCS = 64  # documents encoded at a time, at most (as the in-memory path did)
    _CHUNK_CHARS = 1 << 20  # and about this many characters (the tokenizers library: ~300 B per token)

    def __init__(self, src, text_field: str = "text"):
        import hashlib
        from array import array
        self.src, self.text_field = src, text_field
        if src.kind == "path":
            self._files, self._docs = _path_files(src.path), None  # listed once (its warnings once)
        elif src.kind == "hf":  # loaded and checked once, its text column read again on each pass
            self._files, self._docs = None, _hf_documents(src, text_field)
        else:
            self._files, self._docs = None, _load_other(src, text_field)
        h, lengths, digests = hashlib.sha256(), array("q"), bytearray()
        for doc in self._read(quiet=False):
            b = doc.encode("utf-8", "surrogatepass")
            fingerprint_document(h, len(b), (b,))  # corpus_fingerprint, a document at a time
            lengths.append(len(doc))
            digests += hashlib.blake2b(b, digest_size=16).digest()
            del b
        if not lengths:
            raise _no_documents(src)
        self.fingerprint = h.hexdigest()
        self.lengths = np.frombuffer(lengths, np.int64) if len(lengths) else np.zeros(0, np.int64)
        # group[i]: document i's text among the distinct texts, in order of first appearance
        # (transient: ~100 bytes per document while copies are grouped, 1 GB for 10 M documents)
        _, first, inverse = np.unique(np.frombuffer(digests, np.uint64).reshape(-1, 2), axis=0,
                                      return_index=True, return_inverse=True)
        del digests
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first)] = np.arange(len(first))
        self.group, self.n_groups = rank[inverse.reshape(-1)], len(first)
        self._route = None

    def _read(self, quiet: bool = True):
        if self._docs is not None:
            return iter(self._docs)
        return _iter_files(self._files, self.src.path, self.text_field, quiet)

    def _changed(self) -> RuntimeError:
        return RuntimeError(f"data={self.src.spec!r} changed while it was prepared; prepare it again")

    def _again(self, check: bool = False):
        """``(i, document)`` of every document, read again (``check``: against the fingerprint)."""
        import hashlib
        h, n, i = hashlib.sha256() if check else None, len(self.lengths), -1
        for i, doc in enumerate(self._read()):
            if i >= n or len(doc) != self.lengths[i]:
                raise self._changed()
            if h is not None:
                b = doc.encode("utf-8", "surrogatepass")
                fingerprint_document(h, len(b), (b,))
                del b
            yield i, doc
        if i + 1 != n or (h is not None and h.hexdigest() != self.fingerprint):
            raise self._changed()

    def _document(self, k: int) -> str:
        """Document ``k``, read again with the whole corpus, checked against the fingerprint (what is
        split from it is written as it is: a one-document corpus is not read again)."""
        text = None
        for i, doc in self._again(check=True):
            if i == k:
                text = doc
        return text

    def split(self, val_fraction: float, seed: int) -> tuple[dict, dict, str]:
        """:func:`split_documents`' split: ``(n_documents, n_chars, method)`` per split."""
        n, lengths = len(self.lengths), self.lengths
        total = int(lengths.sum())
        if val_fraction == 0.0:
            self._route = ("none", None)
            return {"train": n, "val": 0}, {"train": total, "val": 0}, "none"
        if n == 1:
            train, val, method = _split_one(self._document(0), val_fraction)
            self._route = ("one", (train, val))
            return ({"train": len(train), "val": len(val)},
                    {"train": sum(map(len, train)), "val": sum(map(len, val))}, method)
        method, val_groups, big, target = _split_plan(lengths, self.group, self.n_groups, val_fraction, seed)
        if method == "tail":
            n_copies = int(np.count_nonzero(self.group == self.group[big]))
            head, tail = _split_big(self._document(big), n_copies, self.n_groups, target)
            self._route = ("tail", (int(self.group[big]), head, tail, n_copies))
            return ({"train": n - n_copies + (n_copies if head else 0), "val": n_copies if tail else 0},
                    {"train": total - n_copies * (len(head) + len(tail)) + n_copies * len(head),
                     "val": n_copies * len(tail)}, "tail")
        in_val = val_groups[self.group]
        self._route = ("documents", in_val)
        n_val, val_chars = int(in_val.sum()), int(lengths[in_val].sum())
        return {"train": n - n_val, "val": n_val}, {"train": total - val_chars, "val": val_chars}, "documents"

    def routed(self, check: bool = False):
        """``(split, text)`` of every document of the split, in the order :func:`split_documents`
        gives them (its train documents, then its val ones, each in corpus order)."""
        kind, how = self._route
        if kind == "one":
            for split, texts in zip(_SPLITS, how):
                for text in texts:
                    yield split, text
            return
        if kind == "tail":
            g_big, head, tail, n_copies = how
        for i, doc in self._again(check):
            if kind == "none":
                yield "train", doc
            elif kind == "documents":
                yield ("val" if how[i] else "train"), doc
            elif self.group[i] != g_big:
                yield "train", doc
            elif head:
                yield "train", head
        if kind == "tail" and tail:
            for _ in range(n_copies):
                yield "val", tail

    def texts(self, split: str):
        """The texts of ``split``, one at a time (what the BPE tokenizer is trained on)."""
        return (text for s, text in self.routed() if s == split)

    def write(self, folder: Path, tok, dtype: np.dtype, eos: np.ndarray) -> dict:
        """Encode every document into ``folder/{train,val}.bin`` (each followed by the end-of-text
        id ``eos``), a chunk of documents at a time; the number of ids in each file."""
        n_tokens, chunks, sizes = {s: 0 for s in _SPLITS}, {s: [] for s in _SPLITS}, {s: 0 for s in _SPLITS}
        with contextlib.ExitStack() as stack:
            files = {s: stack.enter_context(open(folder / f"{s}.bin", "wb")) for s in _SPLITS}

            def flush(split):
                n_tokens[split] += _write_docs(files[split], tok, chunks[split], dtype, eos)
                chunks[split], sizes[split] = [], 0

            for split, text in self.routed(check=True):
                chunks[split].append(text)
                sizes[split] += len(text)
                if len(chunks[split]) >= self._CHUNK_DOCS or sizes[split] >= self._CHUNK_CHARS:
                    flush(split)
            for split in _SPLITS:
                flush(split)
                files[split].flush()
                os.fsync(files[split].fileno())
        return n_tokens


def _write_docs(f, tok, docs: list[str], dtype: np.dtype, eos: np.ndarray) -> int:
    """Write the ids of ``docs``, each followed by ``eos``, to ``f`` as they are encoded (a long
    document's ids are never held whole); their number."""
    n = done = 0  # done: documents whose end-of-text id is written
    for i, arr in tok._encode_stream(docs):
        for _ in range(done, i):
            f.write(eos.data)
            n += 1
        done = i
        for k in range(0, arr.size, 1 << 20):
            f.write(np.ascontiguousarray(arr[k:k + (1 << 20)], dtype=dtype).data)
        n += arr.size
    for _ in range(done, len(docs)):
        f.write(eos.data)
        n += 1
    return n


class _ByteFile:
    """A corpus that is one valid UTF-8 text file, for the byte tokenizer, whose ids are the
    file's bytes (after a UTF-8 byte-order mark, which reading drops): its fingerprint, split and
    ``.bin`` files are made from the file read in chunks of :data:`_CHUNK` bytes, the same bytes
    as :func:`load_corpus` + :func:`split_documents` + encoding give, without holding the text
    and its bytes (twice the file's size).  :meth:`open` returns ``None`` for any other corpus
    (a folder, ``.jsonl``, a UTF-16/32 file, bytes that are not UTF-8, no text), which takes
    the general path with its warnings and errors."""

    _CHUNK = 1 << 20

    def __init__(self, path: Path, start: int, size: int, n_chars: int, fingerprint: str):
        self.path, self.start, self.size, self.n_chars = path, start, size, n_chars
        self.fingerprint = fingerprint
        self.cut = size  # byte offset (from start) of the val tail, set by split()
        self._hash = None  # of the bytes write() reads, checked against the fingerprint

    @classmethod
    def open(cls, src) -> "_ByteFile | None":
        import codecs
        import hashlib
        from .corpus import _UTF16_32_BOMS
        path = src.path
        if src.kind != "path" or path is None or not path.is_file() or _file_format(path) != ("text", None):
            return None  # a folder, .jsonl, .parquet, a compressed file
        with open(path, "rb") as f:
            head = f.read(4)
            if not head or any(head.startswith(bom) for bom, _ in _UTF16_32_BOMS):
                return None
            start = 3 if head.startswith(codecs.BOM_UTF8) else 0
            size = os.fstat(f.fileno()).st_size - start
            if size <= 0:
                return None
            f.seek(start)
            h = hashlib.sha256()
            check = codecs.getincrementaldecoder("utf-8")("strict")
            n_chars = n_read = 0

            def chunks():  # checked as UTF-8 and counted while they are hashed
                nonlocal n_chars, n_read
                for chunk in iter(lambda: f.read(cls._CHUNK), b""):
                    check.decode(chunk)
                    n_read += len(chunk)
                    n_chars += len(chunk) - int(np.count_nonzero(
                        (np.frombuffer(chunk, np.uint8) & 0xC0) == 0x80))  # continuation bytes
                    yield chunk

            try:
                fingerprint_document(h, size, chunks())  # corpus_fingerprint of the one document
                check.decode(b"", final=True)
            except UnicodeDecodeError:  # the general path replaces such bytes, with a warning
                return None
        if n_read != size:  # the file changed while it was read
            return None
        return cls(path, start, size, n_chars, h.hexdigest())

    def _byte_of_char(self, k: int) -> int:
        """The byte offset (from ``start``) of character ``k`` (``size`` for ``k == n_chars``)."""
        if k >= self.n_chars:
            return self.size
        with open(self.path, "rb") as f:
            f.seek(self.start)
            pos = 0
            for chunk in iter(lambda: f.read(min(self._CHUNK, 1 << 16)), b""):  # 64 KB: int64 offsets
                starts = np.flatnonzero((np.frombuffer(chunk, np.uint8) & 0xC0) != 0x80)
                if k < starts.size:
                    return pos + int(starts[k])
                k -= starts.size
                pos += len(chunk)
        raise RuntimeError(f"{self.path} changed while it was prepared")  # pragma: no cover

    def split(self, val_fraction: float) -> tuple[dict, dict, str]:
        """As :func:`split_documents` for one document (its tail; ``"none"`` for no val):
        ``(n_documents, n_chars, method)``."""
        n = self.n_chars
        if val_fraction == 0.0:
            self.cut = self.size
            return {"train": 1, "val": 0}, {"train": n, "val": 0}, "none"
        seen = {}

        def find(cut):  # text.find("\n", cut, cut + 1000), on the file
            b = self._byte_of_char(cut)
            with open(self.path, "rb") as f:
                f.seek(self.start + b)
                window = f.read(4 * 1000)
            w = window.decode("utf-8", "ignore")[:1000]  # only a cut last character is ignored
            seen.update(cut=cut, byte=b, window=w)
            nl = w.find("\n")
            return cut + nl if nl >= 0 else -1

        cut = _one_document_cut(n, val_fraction, find)  # split_documents' rule for one document
        self.cut = seen["byte"] + len(seen["window"][:cut - seen["cut"]].encode("utf-8"))
        return ({"train": 1, "val": 1 if cut < n else 0}, {"train": cut, "val": n - cut}, "tail")

    def write(self, split: str, dest: Path, dtype: np.dtype, eos: np.ndarray) -> int:
        """Write ``split``'s ids (its bytes, then the end-of-text id) to ``dest``; their number."""
        import hashlib
        lo, hi = (0, self.cut) if split == "train" else (self.cut, self.size)
        if split == "train":  # the fingerprint again, over the bytes written (train, then val)
            self._hash = hashlib.sha256()
            fingerprint_document(self._hash, self.size, ())
        with open(self.path, "rb") as src, open(dest, "wb") as f:
            if hi > lo:
                src.seek(self.start + lo)
                left = hi - lo
                while left:
                    chunk = src.read(min(left, self._CHUNK))
                    if not chunk:
                        raise RuntimeError(f"{self.path} changed while it was prepared")
                    f.write(np.frombuffer(chunk, np.uint8).astype(dtype).data)
                    self._hash.update(chunk)
                    left -= len(chunk)
                f.write(eos.data)
            if split == "val" and self._hash.hexdigest() != self.fingerprint:
                raise RuntimeError(f"{self.path} changed while it was prepared; prepare it again")
            f.flush()
            os.fsync(f.fileno())
        return hi - lo + 1 if hi > lo else 0


def _install(tmp: Path, out: Path, identity: dict, force: bool = False) -> None:
    """Atomically move the staged dataset ``tmp`` to ``out`` (replacing a stale one, or any with
    ``force``).  Two processes that finish rebuilding the same stale dataset at the same time
    install one after the other (an ``flock`` on the folder holding ``out``, only for the
    renames): the second finds the first's dataset complete and keeps it, rather than moving it
    aside (which would leave ``out`` missing for a moment under a process that has already
    returned it)."""
    with _install_lock(out.parent):
        old = _install_locked(tmp, out, identity, force)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _install_lock(folder: Path):
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # pragma: no cover - not POSIX: no lock
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some NFS mounts): install unlocked, as before
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _install_locked(tmp: Path, out: Path, identity: dict, force: bool) -> Path | None:
    """The renames of :func:`_install`; returns the replaced dataset's new name, to delete."""
    if not force and _is_complete(out, identity):
        return None  # a concurrent prepare() already installed the same dataset
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(out, old)
        except FileNotFoundError:
            old = None
    try:
        os.rename(tmp, out)
    except OSError:
        # A concurrent prepare() won the race; accept its result if it is what we want.
        if not _is_complete(out, identity):
            raise
    return old


def load_prepared(directory: str | os.PathLike) -> tuple[dict, np.ndarray, np.ndarray]:
    """Open a prepared dataset: ``(meta, train_tokens, val_tokens)`` as read-only memmaps."""
    d = Path(directory)
    if not _is_complete(d):
        raise FileNotFoundError(f"{d} is not a complete prepared dataset (no valid {META_FILE})")
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{d}: format_version {meta.get('format_version')} != {FORMAT_VERSION}; re-run prepare")
    dtype = np.dtype(meta["dtype"])
    arrays = []
    for s in _SPLITS:
        n = int(meta["n_tokens"][s])
        if n == 0:
            arrays.append(np.zeros(0, dtype=dtype))
        else:
            arrays.append(np.memmap(d / meta["files"][s], dtype=dtype, mode="r", shape=(n,)))
    return meta, arrays[0], arrays[1]


def ensure_dataset(data: str = "default", tokenizer: str = "byte", out_dir: str | os.PathLike | None = None,
                   val_fraction: float = 0.05, seed: int = 0, text_field: str = "text") -> Path:
    """Return the directory of a prepared dataset, preparing it first if needed."""
    return prepare(data, tokenizer, out_dir=out_dir, val_fraction=val_fraction, seed=seed, text_field=text_field)
