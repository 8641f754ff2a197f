"""Audit 53, data pipeline: a ``domains:`` spec's ``text_field`` option reaches every folder
domain; an ``hf:`` column that is not text is named as such; ``evaluate --stride`` errors name
the flag; strided evaluation refuses a loss that ignores ``loss_mask``."""
import json
import sys
import types

import numpy as np
import pytest

from jaxformers.data.domains import DomainSource, domain_spec, parse_domains_spec

from corpora import WORDS


def _jsonl_folder(folder, field, n_docs=3, n_words=400, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=n_words)) + ".\n" for _ in range(n_docs)]
    with open(folder / "part0.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"id": len(t), field: t}) + "\n")
    return texts


def test_domains_text_field_reaches_every_folder_domain(tmp_path):
    a = _jsonl_folder(tmp_path / "a", "content", seed=1)
    b = _jsonl_folder(tmp_path / "b", "content", seed=2)
    spec = f"domains:a={tmp_path / 'a'},b={tmp_path / 'b'}@2,c=noise:max_bytes=20000,text_field=content"
    assert parse_domains_spec(spec).text_field == "content"
    src = DomainSource(spec)
    train = {d.name: d.train_tokens for d in src.domains}
    val = {d.name: d.val_tokens for d in src.domains}
    for name, texts in (("a", a), ("b", b)):  # byte tokens of the "content" texts, eos-separated
        got = np.concatenate([train[name], val[name]])
        assert (got < 256).sum() == sum(len(t) for t in texts)
    assert train["c"].size > 0  # a domain without fields beside them: still read
    assert domain_spec(["a", "b"], [str(tmp_path / "a"), str(tmp_path / "b")],
                       text_field="content").endswith(":text_field=content")
    with pytest.raises(ValueError, match="'text'"):  # the default field: the records have none
        DomainSource(f"domains:a={tmp_path / 'a'},b={tmp_path / 'b'}")


@pytest.mark.parametrize("spec, match", [
    ("domains:comedies,histories:text_field=content", "no domain has such a SOURCE"),
    ("domains:comedies,histories:text_field=", "bad option"),
])
def test_domains_text_field_is_refused_where_it_cannot_apply(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_domains_spec(spec)


class _FakeValue:
    def __init__(self, dtype):
        self.dtype = dtype


class _FakeDataset:
    """A stand-in for a ``datasets.Dataset`` (datasets 5) with what ``hf:`` sources read of it:
    ``column_names``, ``features`` (``Value``-likes with a ``dtype``), ``select_columns`` and
    ``iter`` (batches of rows as ``{column: [values]}``).  ``columns``: ``{name: sequence}``, e.g. a
    list, or a sequence that makes each value when it is read.  ``log`` records the calls;
    ``ds[column]`` (the whole column, a ``datasets.Column``) is logged as ``"whole"``."""

    def __init__(self, columns, dtypes, log=None):
        self._columns, self.column_names = dict(columns), list(columns)
        self.features = {k: _FakeValue(dtypes[k]) for k in columns}
        self.log = [] if log is None else log

    def __len__(self):
        return len(next(iter(self._columns.values()), ()))

    def __getitem__(self, column):
        self.log.append(("whole", column))
        return self._columns[column]

    def select_columns(self, column_names):
        names = [column_names] if isinstance(column_names, str) else list(column_names)
        missing = [n for n in names if n not in self._columns]
        if missing:
            raise ValueError(f"Column name {missing} not in the dataset. "
                             f"Current columns in the dataset: {self.column_names}.")
        self.log.append(("select_columns", names))
        return _FakeDataset({k: self._columns[k] for k in names}, {k: self.features[k].dtype for k in names},
                            self.log)

    def iter(self, batch_size, drop_last_batch=False):
        self.log.append(("iter", batch_size))
        n = len(self)
        for start in range(0, n, batch_size):
            if drop_last_batch and start + batch_size > n:
                break
            self.log.append(("batch", start))
            yield {k: list(v[start:start + batch_size]) for k, v in self._columns.items()}


@pytest.fixture
def fake_hf(monkeypatch):
    ds = _FakeDataset({"text": ["a doc", "another doc"], "label": [0, 1], "body": ["x y z", ""]},
                      {"text": "string", "label": "int64", "body": "large_string"})
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: ds))
    return ds


def test_hf_text_field_naming_a_non_text_column_says_its_type(fake_hf):
    from jaxformers.data.corpus import load_corpus

    with pytest.raises(ValueError, match=r"column 'label' holds int64, not text"):
        load_corpus("hf:fake", text_field="label")
    assert load_corpus("hf:fake") == ["a doc", "another doc"]
    assert load_corpus("hf:fake", text_field="body") == ["x y z"]  # large_string is text


# ----------------------------------------------------------------------------- strided eval needs loss_mask
def _ce_without_mask(module, params, batch, rng=None):
    """Cross-entropy over every target, ``loss_mask`` ignored (n_targets counts them all)."""
    from jaxformers.training import cross_entropy
    return cross_entropy(module, params, {"tokens": batch["tokens"]}, rng)


def _ce_without_mask_or_count(module, params, batch, rng=None):
    """Cross-entropy over every target, ``loss_mask`` ignored, no n_targets (evaluation counts the mask)."""
    return _ce_without_mask(module, params, batch, rng)[0], {}


def _ce_without_count(module, params, batch, rng=None):
    """Cross-entropy honouring ``loss_mask``, no n_targets: a correct loss."""
    from jaxformers.training import cross_entropy
    return cross_entropy(module, params, batch, rng)[0], {}


@pytest.fixture(scope="module")
def tiny_model():
    import jax

    import jaxformers as jf
    cfg = jf.get_config("gpt", "tiny", vocab_size=64, d_model=32, n_layer=1, n_head=4, max_seq_len=16)
    params = jax.jit(lambda r: jf.init_params(jf.build(cfg), r))(jax.random.PRNGKey(0))
    tokens = (np.arange(400) * 7 % 61).astype(np.int32)
    return cfg, params, tokens


@pytest.mark.parametrize("loss_fn, why", [(_ce_without_mask, "still counts in its n_targets"),
                                          (_ce_without_mask_or_count, "still changes its value")])
def test_strided_evaluation_refuses_a_loss_that_ignores_loss_mask(tiny_model, loss_fn, why):
    from jaxformers.training import evaluate
    cfg, params, tokens = tiny_model
    with pytest.raises(ValueError, match=rf"loss '.*{loss_fn.__name__}' ignores loss_mask: .*{why}.*"
                                         r"stride=4 < seq_len=16, --stride"):
        evaluate((cfg, params), tokens, batch_size=2, seq_len=16, max_batches=None, stride=4, loss_fn=loss_fn)
    # without a stride nothing is masked: the same loss evaluates
    assert evaluate((cfg, params), tokens, batch_size=2, seq_len=16, max_batches=None,
                    loss_fn=loss_fn)["val_loss"] > 0


def test_strided_evaluation_accepts_losses_that_honour_loss_mask(tiny_model):
    from jaxformers.training import evaluate
    cfg, params, tokens = tiny_model
    ref = evaluate((cfg, params), tokens, batch_size=2, seq_len=16, max_batches=None, stride=4)
    got = evaluate((cfg, params), tokens, batch_size=2, seq_len=16, max_batches=None, stride=4,
                   loss_fn=_ce_without_count)
    assert got["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6) and got["val_tokens"] == ref["val_tokens"]
