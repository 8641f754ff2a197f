"""Tokenizers with one small interface: ``byte`` and locally trained byte-level ``bpe``.

Specs accepted by :func:`get_tokenizer`:

* ``"byte"``: ids 0..255 are the UTF-8 bytes, id 256 is the end-of-text
  token; ``vocab_size == 257``.  Needs no training.
* ``"bpe"`` / ``"bpe:VOCAB"``: byte-level BPE trained with the ``tokenizers``
  library on the training documents (default ``VOCAB`` = 4096).  Id 0 is the
  end-of-text token.  ``vocab_size`` may come out below ``VOCAB`` on a tiny
  corpus (no merge is kept that occurs fewer than twice).
* ``"hf:DIR"``: a pretrained ``tokenizer.json`` (``tokenizers`` library), e.g. the one
  shipped with a Hugging Face checkpoint; needs no training.  The end-of-text id is
  ``eos_token`` of ``DIR/tokenizer_config.json``, else the first of ``</s>``,
  ``<|endoftext|>``, ``<|end_of_text|>``, ``<eos>``, ``<|eos|>`` the vocabulary holds.  No BOS
  token is added (documents are separated by the end-of-text id, as for the others).

End-of-text text inside a document is always encoded as ordinary text, so
the only end-of-text ids in a token stream are the ones :mod:`prepare` puts
between documents.  ``decode`` decodes the runs of ids between end-of-text ids one by one
(each run is one document's text, so a character never takes bytes from both sides of an
end-of-text id) and joins them with ``"<|endoftext|>"`` (``hf:DIR``: the token as the
vocabulary spells it), or with nothing if ``skip_special=True`` (``hf:DIR`` then also drops
its other special tokens): ``decode(encode(a) + [eos_id] + encode(b), skip_special=True) ==
a + b``.  It raises ``ValueError`` on an id outside ``[0, vocab_size)``.  ``bpe`` and
``hf:DIR`` encode a lone surrogate (a Python string that is not valid UTF-8) as U+FFFD;
``byte`` keeps its ``surrogatepass`` bytes.

``save(dir)`` writes ``tokenizer_config.json`` (and, for BPE, the trained
``tokenizer.json`` in the ``tokenizers`` format); ``Tokenizer.load(dir)`` /
:func:`load_tokenizer` read them back.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pallas_kernels._common import check_flag

from ..utils import int_arg, read_json_object

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "DEFAULT_BPE_VOCAB",
    "EOS_TEXT",
    "Tokenizer",
    "get_tokenizer",
    "load_tokenizer",
    "parse_tokenizer_spec",
]

EOS_TEXT = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 4096
_MIN_BPE_VOCAB = 258          # 256 byte symbols + end-of-text + at least one merge
_MAX_BPE_VOCAB = 1 << 22
CONFIG_FILE = "tokenizer_config.json"
BPE_FILE = "tokenizer.json"


def parse_tokenizer_spec(spec: str) -> tuple[str, int | None]:
    """``"byte"`` -> ("byte", None); ``"bpe"`` / ``"bpe:N"`` -> ("bpe", N); ``"hf:DIR"`` ->
    ("hf", None) (the directory: :func:`hf_tokenizer_dir`)."""
    allowed = "'byte', 'bpe', 'bpe:VOCAB' (e.g. 'bpe:8192') or 'hf:DIR' (a tokenizer.json)"
    if not isinstance(spec, str):
        raise ValueError(f"tokenizer must be a string: {allowed}; got {spec!r}")
    if spec.strip().startswith("hf:"):
        hf_tokenizer_dir(spec)
        return "hf", None
    s = spec.strip().lower()
    if s == "byte":
        return "byte", None
    if s == "bpe":
        return "bpe", DEFAULT_BPE_VOCAB
    if s.startswith("bpe:"):
        try:
            vocab = int(s[4:])
        except ValueError:
            raise ValueError(f"tokenizer={spec!r}: VOCAB must be an integer; allowed: {allowed}") from None
        if not _MIN_BPE_VOCAB <= vocab <= _MAX_BPE_VOCAB:
            raise ValueError(
                f"tokenizer={spec!r}: VOCAB must be in [{_MIN_BPE_VOCAB}, {_MAX_BPE_VOCAB}]; allowed: {allowed}")
        return "bpe", vocab
    raise ValueError(f"unknown tokenizer={spec!r}; allowed: {allowed}")


def hf_tokenizer_dir(spec: str) -> Path:
    """The directory of an ``hf:DIR`` spec (``ValueError`` unless it holds a tokenizer.json)."""
    if not spec.strip()[3:].strip():  # Path("") is the working directory (e.g. hf:$DIR with DIR unset)
        raise ValueError(f"tokenizer={spec!r}: hf:DIR needs a directory (of a Hugging Face tokenizer.json; "
                         "hf:. for the working directory)")
    d = Path(spec.strip()[3:]).expanduser()
    if not (d / BPE_FILE).is_file():
        raise ValueError(f"tokenizer={spec!r}: no {BPE_FILE} in {str(d)!r} (hf:DIR needs the directory of "
                         "a Hugging Face tokenizer.json)")
    return d.resolve()


_SURROGATES = re.compile("[\ud800-\udfff]")


def _str_arg(text) -> str:
    """``text`` if it is a ``str``; ``ValueError`` otherwise (bytes, None, ...)."""
    if not isinstance(text, str):
        raise ValueError(f"encode expects a str, got {type(text).__name__}")
    return text


def _texts_arg(texts, what: str):
    """``texts`` unless it is one ``str`` / ``bytes`` (an iterable of characters: each would be a
    text of its own); ``ValueError`` then."""
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"{what} expects an iterable of texts (e.g. a list of str), got one "
                         f"{type(texts).__name__}; pass [text]")
    return texts


def _valid_text(text: str) -> str:
    """``text`` with lone surrogates (valid in Python strings and JSON escapes, not in UTF-8) replaced
    by U+FFFD, as :mod:`.corpus` does for ``.jsonl``; the ``tokenizers`` library refuses them."""
    return _SURROGATES.sub("\ufffd", _str_arg(text))


# Where byte-level BPE's pre-tokenizer (the GPT-2 regex of ``ByteLevel(use_regex=True)``) always
# starts a new pre-token, whatever lies around: after a line break between a visible character
# (a letter, a digit or ASCII punctuation) and a letter or digit (not after a blank: the regex
# keeps the blanks that end a text together), and at a space between a letter/digit and a letter.
# A long text cut there encodes to the same ids, and trains the same merges, as the whole text;
# whole, the ``tokenizers`` library holds a record of ~300 bytes per token while it encodes it,
# and trains on it in one thread with ~120 bytes per character (2.4 GB for a 20 MB file: a
# file with no document breaks is one document).
_CUT = re.compile(r"(?<=[^\W_]|[!-~])\n(?=[^\W_])|(?<=[^\W_]) (?=[^\W\d_])")
_PIECE_CHARS = 1 << 16     # cut texts into pieces of about this many characters
_BATCH_CHARS = 1 << 21     # encode at most about this many characters at a time


def _pieces(text: str, size: int | None = None) -> Iterable[str]:
    """``text`` cut at :data:`_CUT` places into pieces of a little over ``size`` characters (default
    :data:`_PIECE_CHARS`; one piece if it is shorter or has no such place); ``"".join(_pieces(t)) == t``."""
    size = _PIECE_CHARS if size is None else size
    start, n = 0, len(text)
    while n - start > size:
        m = _CUT.search(text, start + size)
        if m is None:
            break
        cut = m.end() if m.group() == "\n" else m.start()
        yield text[start:cut]
        start = cut
    yield text[start:]


def _exact_cuts(tok) -> bool:
    """Whether a ``tokenizers`` tokenizer encodes a text cut at :data:`_CUT` places to the same ids
    as the whole text: its pre-tokenizer is byte-level BPE's regex (as :meth:`BPETokenizer.train`
    sets; the model then sees each pre-token alone, whatever it is), it has no normalizer, and no
    added token it matches in text (special ones are text: ``encode_special_tokens``) spans a
    space or a line break or takes the blanks beside it (``lstrip`` / ``rstrip``)."""
    from tokenizers import pre_tokenizers
    pre = tok.pre_tokenizer
    return (tok.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex
            and not pre.add_prefix_space
            and all(t.special or not (" " in t.content or "\n" in t.content or t.lstrip or t.rstrip)
                    for t in tok.get_added_tokens_decoder().values()))


def _stream_encode(tok, texts: Sequence[str]) -> Iterable[tuple[int, np.ndarray]]:
    """``(i, ids)`` parts of each text's ids in order (:meth:`Tokenizer._encode_stream`): long texts
    encoded in pieces (:func:`_pieces`) where :func:`_exact_cuts` holds, else whole, at most about
    :data:`_BATCH_CHARS` characters per call."""
    texts = [_valid_text(t) for t in texts]
    size = None if _exact_cuts(tok) else len(max(texts, key=len, default="")) + 1
    # only the ids are kept: the fast variant (tokenizers >= 0.20) skips the offsets, ~1.7x faster
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    batch: list[str] = []
    owners: list[int] = []

    def flush():
        out = [(i, np.asarray(e.ids, dtype=np.int64))
               for i, e in zip(owners, encode_batch(batch, add_special_tokens=False))]
        batch.clear()
        owners.clear()
        return out

    chars = 0
    for i, t in enumerate(texts):
        for piece in _pieces(t, size):
            batch.append(piece)
            owners.append(i)
            chars += len(piece)
            if chars >= _BATCH_CHARS:
                yield from flush()
                chars = 0
    if batch:
        yield from flush()


def _parts_to_arrays(n: int, stream) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for i, ids in stream:
        parts[i].append(ids)
    return [p[0] if len(p) == 1 else np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]


def _checked_ids(ids, vocab_size: int, what: str) -> list[int]:
    """``ids`` (one sequence ``[T]``) as a list of ints; ``ValueError`` unless each is an integer
    (not a float, a bool or a string, which would be truncated / parsed) in ``[0, vocab_size)``,
    or for a batch ``[B, T]`` (its rows would be decoded as one text: decode each row)."""
    arr = np.asarray(ids)
    if arr.ndim > 1:
        raise ValueError(f"{what}: ids must be one sequence [T], got shape {arr.shape} (decode each row "
                         "of a batch on its own)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: ids must be integers, got dtype {arr.dtype} ({arr.reshape(-1)[0]!r}, ...)")
    ids = arr.reshape(-1)  # compared in its own dtype: a uint64 id is not wrapped to a negative one
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(f"{what}: id {int(bad[0])} out of range [0, {vocab_size}) (ids must be the "
                         "tokenizer's; a model vocab padded above it can sample ids with no text)")
    return ids.astype(np.int64).tolist()


def _decode_runs(ids: list[int], eos: int, decode_run, marker: str) -> str:
    """The runs of ``ids`` between end-of-text ids ``eos``, each decoded on its own by ``decode_run``
    (``list[int] -> str``), joined by ``marker`` (see the module doc)."""
    out, run = [], []
    for i in ids:
        if i != eos:
            run.append(i)
            continue
        if run:
            out.append(decode_run(run))
            run = []
        out.append(marker)
    if run:
        out.append(decode_run(run))
    return "".join(out)


class Tokenizer(ABC):
    """Common tokenizer interface."""

    spec: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    def is_trained(self) -> bool:
        return True

    def train(self, texts: Iterable[str]) -> "Tokenizer":
        """Fit to ``texts`` (no-op for tokenizers that need no training). Returns self."""
        return self

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = False) -> str: ...

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts, one integer numpy array each (fast path for data prep)."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in _texts_arg(texts, "encode_arrays")]

    def _encode_stream(self, texts: Sequence[str]) -> Iterable[tuple[int, np.ndarray]]:
        """``(i, ids)`` pairs, ``i`` ascending: the concatenated ``ids`` of text ``i`` are
        ``encode_arrays(texts)[i]`` (a text may come in several parts, or in none when it
        encodes to nothing), so data prep writes them without holding a long text's ids whole."""
        return enumerate(self.encode_arrays(texts))

    @abstractmethod
    def _config(self) -> dict: ...

    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = dict(self._config(), spec=self.spec, vocab_size=self.vocab_size, eos_id=self.eos_id)
        (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")
        return d

    @staticmethod
    def load(directory: str | os.PathLike) -> "Tokenizer":
        d = Path(directory)
        cfg_path = d / CONFIG_FILE
        if cfg_path.is_file():
            cfg = read_json_object(cfg_path)
            kind = cfg.get("type")
        elif (d / BPE_FILE).is_file():
            cfg, kind = {}, "bpe"
        else:
            raise FileNotFoundError(f"no {CONFIG_FILE} or {BPE_FILE} in {d}")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "hf" or (kind is None and (d / BPE_FILE).is_file()):  # a HF tokenizer directory
            return HFTokenizer(d)
        if kind == "bpe":
            return BPETokenizer.from_file(d / BPE_FILE, requested_vocab=cfg.get("requested_vocab"))
        if kind is None:  # e.g. a Hugging Face directory with only a sentencepiece tokenizer.model
            raise ValueError(f"{cfg_path} has no 'type' (byte, bpe or hf) and {d} has no {BPE_FILE}: not a "
                             f"saved jaxformers tokenizer nor a Hugging Face {BPE_FILE} directory")
        raise ValueError(f"{cfg_path}: unknown tokenizer type {kind!r}; allowed: 'byte', 'bpe', 'hf'")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids (0..255) plus an end-of-text id 256."""

    spec = "byte"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(_str_arg(text).encode("utf-8", "surrogatepass"))

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(_str_arg(t).encode("utf-8", "surrogatepass"), dtype=np.uint8)
                for t in _texts_arg(texts, "encode_arrays")]

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = False) -> str:
        ids = _checked_ids(ids, self.vocab_size, "byte tokenizer")
        skip_special = check_flag("skip_special", skip_special)  # ("False" is truthy)
        return _decode_runs(ids, self.eos_id, lambda run: bytes(run).decode("utf-8", "replace"),
                            "" if skip_special else EOS_TEXT)

    def _config(self) -> dict:
        return {"type": "byte"}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (``tokenizers`` library), trained locally."""

    def __init__(self, vocab: int = DEFAULT_BPE_VOCAB):
        # an int (2.5 or "x" refused, not truncated / parsed); its range is checked by train (a
        # loaded tokenizer.json may be smaller)
        self.requested_vocab = int_arg("vocab", vocab, lo=1, where="BPETokenizer")
        self.spec = f"bpe:{self.requested_vocab}"
        self._tok = None

    # -- construction ---------------------------------------------------
    @staticmethod
    def _pipeline(tok):
        from tokenizers import decoders, pre_tokenizers
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        return tok

    def train(self, texts: Iterable[str]) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers
        _texts_arg(texts, "train")
        if not _MIN_BPE_VOCAB <= self.requested_vocab <= _MAX_BPE_VOCAB:
            raise ValueError(f"BPETokenizer: vocab must be in [{_MIN_BPE_VOCAB}, {_MAX_BPE_VOCAB}] (256 bytes + "
                             f"end-of-text + at least one merge), got {self.requested_vocab}")
        tok = self._pipeline(HFTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=self.requested_vocab,
            min_frequency=2,
            special_tokens=[EOS_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((p for t in texts for p in _pieces(_valid_text(t))), trainer=trainer)
        self._set(tok)
        if self.vocab_size < self.requested_vocab:  # the text has fewer merges seen twice
            warnings.warn(f"bpe:{self.requested_vocab}: the text gives only {self.vocab_size} tokens "
                          "(256 bytes + merges of pairs seen at least twice + end-of-text); a larger "
                          "text gives more", stacklevel=2)
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike, requested_vocab: int | None = None) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found (the trained BPE tokenizer)")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
            raise ValueError(f"{path} is not a tokenizer.json the tokenizers library can read: {e}") from None
        self = cls(requested_vocab or tok.get_vocab_size())
        self._set(tok)
        return self

    def _set(self, tok) -> None:
        eos = tok.token_to_id(EOS_TEXT)
        if eos is None:
            raise ValueError(f"BPE tokenizer has no {EOS_TEXT!r} token")
        # Literal special-token text inside documents is plain text, never the eos id.
        tok.encode_special_tokens = True
        self._tok, self._eos = tok, int(eos)

    # -- interface ---------------------------------------------------------
    def _require(self):
        if self._tok is None:
            raise RuntimeError(f"{self.spec} tokenizer is not trained yet: call .train(texts) or load()")
        return self._tok

    @property
    def is_trained(self) -> bool:
        return self._tok is not None

    @property
    def vocab_size(self) -> int:
        return self._require().get_vocab_size()

    @property
    def eos_id(self) -> int:
        self._require()
        return self._eos

    def encode(self, text: str) -> list[int]:
        return self._require().encode(_valid_text(text), add_special_tokens=False).ids

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """As :meth:`encode` for each text; long texts are encoded in pieces (:func:`_pieces`, the
        same ids) a few MB at a time, so memory does not grow with a document's length."""
        texts = list(_texts_arg(texts, "encode_arrays"))  # any iterable (read twice below)
        return _parts_to_arrays(len(texts), self._encode_stream(texts))

    def _encode_stream(self, texts: Sequence[str]) -> Iterable[tuple[int, np.ndarray]]:
        return _stream_encode(self._require(), texts)

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = False) -> str:
        tok = self._require()
        ids = _checked_ids(ids, tok.get_vocab_size(), f"{self.spec} tokenizer")
        skip_special = check_flag("skip_special", skip_special)  # ("False" is truthy)
        return _decode_runs(ids, self._eos, lambda run: tok.decode(run, skip_special_tokens=False),
                            "" if skip_special else EOS_TEXT)

    def save(self, directory: str | os.PathLike) -> Path:
        d = super().save(directory)
        self._require().save(str(d / BPE_FILE))
        return d

    def _config(self) -> dict:
        return {"type": "bpe", "requested_vocab": self.requested_vocab, "file": BPE_FILE}


class HFTokenizer(Tokenizer):
    """A pretrained ``tokenizer.json`` (``tokenizers`` library), e.g. a Hugging Face checkpoint's."""

    EOS_CANDIDATES = ("</s>", EOS_TEXT, "<|end_of_text|>", "<eos>", "<|eos|>")

    def __init__(self, directory: str | os.PathLike):
        from tokenizers import Tokenizer as _HF

        d = hf_tokenizer_dir(f"hf:{directory}")
        self.directory = d
        self.spec = f"hf:{d}"
        try:
            self._tok = _HF.from_file(str(d / BPE_FILE))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
            raise ValueError(f"{d / BPE_FILE} is not a tokenizer.json the tokenizers library can read "
                             f"(a Git LFS pointer or a truncated download?): {e}") from None
        self._tok.encode_special_tokens = True  # special-token text in documents stays text
        # a tokenizer.json may carry truncation / padding settings (for batched inference): a
        # document is encoded whole, as AutoTokenizer does unless asked to truncate or pad
        self._tok.no_truncation()
        self._tok.no_padding()
        # the highest id + 1, not the number of tokens: a vocabulary may have unused ids (gaps)
        ids = self._tok.get_vocab(with_added_tokens=True).values()
        self._vocab_size = 1 + max(ids) if ids else 0
        self._eos = self._find_eos(d)

    def _find_eos(self, d: Path) -> int:
        cfg = {}
        if (d / CONFIG_FILE).is_file():
            cfg = read_json_object(d / CONFIG_FILE)
        if cfg.get("eos_id") is not None:  # saved by HFTokenizer.save
            eos = cfg["eos_id"]
            if (isinstance(eos, bool) or not isinstance(eos, int) or eos < 0
                    or self._tok.id_to_token(eos) is None):
                raise ValueError(f"{d / CONFIG_FILE}: eos_id {eos!r} is not an id of a token of {d / BPE_FILE}")
            return eos
        eos = cfg.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):  # named: that token, never another one
            if self._tok.token_to_id(eos) is None:
                raise ValueError(f"{d / CONFIG_FILE}: eos_token {eos!r} is not in the vocabulary of {d / BPE_FILE}")
            return int(self._tok.token_to_id(eos))
        for name in self.EOS_CANDIDATES:
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        raise ValueError(f"{d / BPE_FILE}: no end-of-text token (set eos_token in {CONFIG_FILE}, or have one "
                         f"of {list(self.EOS_CANDIDATES)} in the vocabulary)")

    @property
    def vocab_size(self) -> int:
        """The highest id + 1 (ids are in ``[0, vocab_size)``; with gaps this exceeds the number
        of tokens, which ``tokenizers``' ``get_vocab_size`` counts)."""
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(_valid_text(text), add_special_tokens=False).ids

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """As :meth:`encode` for each text.  A long text is encoded in pieces (the same ids, less
        memory) only when the tokenizer.json is of the kind for which cutting at :data:`_CUT` places
        is exact (:func:`_exact_cuts`: byte-level BPE's regex pre-tokenizer, e.g. GPT-2's); any
        other normalizer / pre-tokenizer (Split sequences, Metaspace, ...) encodes it whole, which
        costs the ``tokenizers`` library's memory for its whole length (hundreds of bytes per
        token): split such a corpus into documents."""
        texts = list(_texts_arg(texts, "encode_arrays"))
        return _parts_to_arrays(len(texts), self._encode_stream(texts))

    def _encode_stream(self, texts: Sequence[str]) -> Iterable[tuple[int, np.ndarray]]:
        return _stream_encode(self._tok, texts)

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = False) -> str:
        ids = _checked_ids(ids, self.vocab_size, "hf tokenizer")
        skip_special = check_flag("skip_special", skip_special)  # ("False" is truthy)
        decode = self._tok.decode
        marker = "" if skip_special else decode([self._eos], skip_special_tokens=False)
        return _decode_runs(ids, self._eos, lambda run: decode(run, skip_special_tokens=skip_special), marker)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write this tokenizer into ``directory``, never into its own source directory (that
        would replace the checkpoint's ``tokenizer_config.json`` -- its eos / bos / chat settings
        -- with jaxformers' own)."""
        if Path(directory).resolve() == Path(self.directory).resolve():
            raise ValueError(f"directory {str(directory)!r} is this tokenizer's source directory: saving "
                             f"there would overwrite its {CONFIG_FILE}; save into another directory")
        d = super().save(directory)
        self._tok.save(str(d / BPE_FILE))
        return d

    def _config(self) -> dict:
        return {"type": "hf", "source": str(self.directory), "file": BPE_FILE}


def get_tokenizer(spec: str = "byte") -> Tokenizer:
    """Make an (untrained, for BPE) tokenizer from a spec string; see module doc."""
    kind, vocab = parse_tokenizer_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer(spec.strip()[3:])
    return BPETokenizer(vocab)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer saved beside a prepared dataset."""
    return Tokenizer.load(directory)
