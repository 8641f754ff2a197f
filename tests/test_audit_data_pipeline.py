"""Regression tests of the data-pipeline audit (loader, domains, sources, prepare, corpus):
stratified sampling vs weights, the domains memo after a file edit, integer arguments that were
truncated, token ids that wrapped to int32, huge/infinite domain weights, repeated spec options,
unknown eval splits, max_batches=0 with domains, prepare's seed/val_fraction, iterate_rows with
ragged arrays, an empty hf: dataset; plus exact resumption / process split of every loader."""
import numpy as np
import pytest

from jaxformers.data import corpus
from jaxformers.data.domains import Domain, DomainLoader, DomainSource, domain_spec, parse_domains_spec
from jaxformers.data.loader import SyntheticLoader, TokenLoader, eval_batches, iterate_rows, synthetic_rows
from jaxformers.data.prepare import default_out_dir, prepare, split_documents
from jaxformers.data.sources import SyntheticSource, TextSource

ONE = dict(process_index=0, process_count=1)


def _domains(k=3, n=200):
    return [Domain(f"d{i}", np.arange(n, dtype=np.int32) + 1000 * i, np.arange(40, dtype=np.int32) + 1000 * i)
            for i in range(k)]


def _folder(root, name, text):
    (root / name).mkdir(exist_ok=True)
    (root / name / "doc.txt").write_text(text)
    return str(root / name)


def test_stratified_sampling_refuses_unequal_weights():
    """sample=stratified took rows r % K from every domain whatever the weights: a domain of
    weight 0 (documented "never sampled") was a third of every batch, 0.9/0.1 became 1/3 each."""
    d = _domains()
    with pytest.raises(ValueError, match="stratified.*weights must be equal"):
        DomainLoader(d, [0.9, 0.1, 0.0], 6, 8, sample="stratified", **ONE)
    with pytest.raises(ValueError, match="stratified"):
        DomainLoader(d, [1, 1, 0], 6, 8, sample="stratified", **ONE)
    # equal weights (any scale) are what stratified means
    loader = DomainLoader(d, [2, 2, 2], 6, 8, sample="stratified", **ONE)
    assert loader.domains_at(0).tolist() == [0, 1, 2, 0, 1, 2]
    assert np.all(loader.batch_dict_at(3)["tokens"] // 1000 == loader.domains_at(3)[:, None])


def test_domains_are_encoded_again_after_a_domain_file_changes(tmp_path):
    """build_domains was memoised on the spec string: a DomainSource made again in the same process
    after a domain's file was edited silently trained on the old text."""
    spec = domain_spec(["a", "b"], [_folder(tmp_path, "a", ("a" * 30 + "\n") * 40),
                                    _folder(tmp_path, "b", ("b" * 30 + "\n") * 40)], val_fraction=0.1)
    first = DomainSource(spec)
    assert first.domains[0].train_tokens[0] == ord("a")
    (tmp_path / "a" / "doc.txt").write_text(("z" * 30 + "\n") * 40)
    second = DomainSource(spec)
    assert second.domains[0].train_tokens[0] == ord("z")
    assert np.array_equal(second.domains[1].train_tokens, first.domains[1].train_tokens)
    # unchanged files: the memo is still used (the same arrays)
    assert DomainSource(spec).domains[0].train_tokens is second.domains[0].train_tokens


def test_loaders_refuse_non_integer_arguments_instead_of_truncating():
    """batch_size=2.5 gave batches of 2 rows, seq_len=4.7 windows of 5 tokens, step=1.5 the
    batch of step 1, True a batch of 1 (TokenLoader, eval_batches, DomainLoader, SyntheticLoader)."""
    toks = np.arange(100, dtype=np.uint16)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        TokenLoader(toks, 2.5, 4, **ONE)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        TokenLoader(toks, True, 4, **ONE)
    with pytest.raises(ValueError, match="seq_len must be an int"):
        TokenLoader(toks, 2, 4.7, **ONE)
    with pytest.raises(ValueError, match="step must be an int"):
        TokenLoader(toks, 2, 4, **ONE).batch_at(1.5)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        list(eval_batches(toks, 2.5, 10, **ONE))
    with pytest.raises(ValueError, match="max_batches must be an int"):
        list(eval_batches(toks, 2, 10, 1.5, **ONE))
    with pytest.raises(ValueError, match="process_index must be an int"):
        TokenLoader(toks, 2, 4, process_index=0.5, process_count=1)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        DomainLoader(_domains(), [1, 1, 1], 4.5, 4, **ONE)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        DomainLoader(_domains(), [1, 1, 1], 4, 4, seed=-1, **ONE)
    with pytest.raises(ValueError, match="step must be an int"):
        DomainLoader(_domains(), [1, 1, 1], 4, 4, **ONE).batch_dict_at(2.5)
    with pytest.raises(ValueError, match="seed must be an int"):
        SyntheticLoader("copying", 2, 8, seed=1.5, **ONE)
    with pytest.raises(ValueError, match="step must be an int"):
        SyntheticLoader("copying", 2, 8, **ONE).batch_dict_at(1.5)
    with pytest.raises(ValueError, match="n_rows must be an int"):
        synthetic_rows("copying", 2.5, 9, 0)
    # numpy integers are integers
    assert TokenLoader(toks, np.int64(2), np.int32(4), **ONE).batch_at(np.int64(1)).shape == (2, 5)


def test_token_ids_outside_int32_are_refused_not_wrapped():
    """Windows are int32: an int64 id of 2**40 became 0 and a negative id passed through."""
    with pytest.raises(ValueError, match=r"token ids in \[0, 2\*\*31\)"):
        TokenLoader(np.full(40, 2 ** 40, np.int64), 2, 4, **ONE)
    with pytest.raises(ValueError, match=r"token ids in \[0, 2\*\*31\)"):
        TokenLoader(np.full(40, -3), 2, 4, **ONE)
    with pytest.raises(ValueError, match="token ids"):
        list(eval_batches(np.arange(-1, 40), 2, 4, **ONE))
    ok = TokenLoader(np.arange(40, dtype=np.int64) + 2 ** 30, 2, 4, **ONE).batch_at(0)
    assert ok.dtype == np.int32 and ok.min() >= 2 ** 30


def test_huge_and_infinite_domain_weights():
    """Weights 1e308 overflowed their sum: both domains got weight 0.0 (and then "positive sum"
    errors); an infinite weight reached numpy's "Probabilities contain NaN"."""
    assert parse_domains_spec("domains:comedies@1e308,tragedies@1e308").weights == (0.5, 0.5)
    assert parse_domains_spec("domains:comedies@1,tragedies@3").weights == (0.25, 0.75)
    with pytest.raises(ValueError, match="finite non-negative"):
        DomainLoader(_domains(2), [np.inf, 1], 4, 4, **ONE)
    loader = DomainLoader(_domains(2), [1e308, 1e308], 4, 4, **ONE)
    np.testing.assert_allclose(loader.weights, [0.5, 0.5])


def test_domain_spec_option_given_twice_is_refused():
    """``max_bytes=5,max_bytes=7`` silently kept the last value."""
    with pytest.raises(ValueError, match="option 'max_bytes' is given twice"):
        parse_domains_spec("domains:comedies,tragedies:max_bytes=5,max_bytes=7")


def test_unknown_eval_split_is_refused(tmp_path):
    """split='test' silently evaluated the TRAIN split of a text source (and of every domain);
    a synthetic source raised a bare KeyError."""
    src = TextSource("<x>", None, {"vocab_size": 100}, np.arange(60), np.arange(60) + 30)
    for s in (src, SyntheticSource("synthetic:copying")):
        with pytest.raises(ValueError, match="split='test' is not allowed"):
            list(s.eval_batches(2, 8, 1, "test", **ONE))
    dom = DomainSource(domain_spec(["a", "b"], [_folder(tmp_path, "a", "alpha beta\n" * 60),
                                                _folder(tmp_path, "b", "gamma delta\n" * 60)], val_fraction=0.2))
    with pytest.raises(ValueError, match="split='test' is not allowed"):
        list(dom.eval_batches(2, 8, 2, "test", **ONE))
    for group in dom.eval_groups().values():
        with pytest.raises(ValueError, match="split='test' is not allowed"):
            group.has_eval_data(8, "test")
    assert np.array_equal(next(src.eval_batches(1, 8, 1, "val", **ONE))["tokens"][0], np.arange(30, 39))


def test_domain_eval_with_max_batches_zero_yields_nothing(tmp_path):
    """max_batches=0 gave one batch per domain (``max(1, 0 // K)``), unlike eval_batches' nothing."""
    dom = DomainSource(domain_spec(["a", "b"], [_folder(tmp_path, "a", "alpha beta\n" * 60),
                                                _folder(tmp_path, "b", "gamma delta\n" * 60)], val_fraction=0.2))
    assert list(dom.eval_batches(2, 8, 0, **ONE)) == []
    assert len(list(dom.eval_batches(2, 8, 2, **ONE))) == 2  # one per domain


def test_prepare_refuses_a_float_seed_and_a_bad_val_fraction(tmp_path, monkeypatch):
    """seed=1.5 was truncated to 1 for the split but kept as 1.5 in the directory name; a string
    val_fraction gave a TypeError, a negative seed numpy's "expected non-negative integer"."""
    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    data = _folder(tmp_path, "c", "some text\n" * 30)
    for kw, match in [(dict(seed=1.5), "seed must be an int"), (dict(seed=-1), "seed must be >= 0"),
                      (dict(val_fraction="0.1"), "val_fraction must be a number"),
                      (dict(val_fraction=True), "val_fraction must be a number")]:
        with pytest.raises(ValueError, match=match):
            prepare(data, "byte", **kw)
        with pytest.raises(ValueError, match=match):
            default_out_dir(data, "byte", **kw)
    with pytest.raises(ValueError, match="seed must be an int"):
        split_documents(["a" * 10, "b" * 10, "c" * 10], 0.3, 1.7)
    assert not (tmp_path / "cache").exists()
    assert default_out_dir(data, "byte", 0.05, np.int64(0)).name.endswith("-byte")


def test_iterate_rows_refuses_arrays_of_different_lengths():
    """Arrays of 5 and 3 rows were silently cut to 3; no arrays gave 'min() arg is an empty sequence'."""
    with pytest.raises(ValueError, match="same number of rows"):
        list(iterate_rows({"a": np.zeros((5, 2)), "b": np.zeros((3, 2))}, 2, **ONE))
    with pytest.raises(ValueError, match="same number of rows"):
        list(iterate_rows({}, 2, **ONE))


def test_empty_hf_dataset_is_a_clear_error(monkeypatch):
    """An hf: dataset with no text was an empty corpus: prepare then failed with 'cannot split an
    empty corpus', naming neither the data nor the cause."""
    monkeypatch.setattr(corpus, "_load_hf", lambda spec: [])
    with pytest.raises(ValueError, match="hf:someone/empty.*no non-empty text"):
        corpus.load_corpus("hf:someone/empty")


# ----------------------------------------------------------------------------- checked correct
def _make_loaders(P=1, p=0):
    proc = dict(process_index=p, process_count=P)
    toks = (np.arange(3000) * 7919 % 1009).astype(np.uint16)
    return [TokenLoader(toks, 12, 16, seed=5, **proc),
            DomainLoader(_domains(3, 500), [0.5, 0.3, 0.2], 12, 16, seed=5, **proc),
            DomainLoader(_domains(3, 500), [1, 1, 1], 12, 16, seed=5, sample="stratified", **proc),
            SyntheticLoader("recall", 12, 31, seed=5, **proc)]


def _dict(loader, step):
    return loader.batch_dict_at(step) if hasattr(loader, "batch_dict_at") else {"tokens": loader.batch_at(step)}


def test_resume_and_process_split_are_exact_for_every_loader():
    """A loader built afresh at step s (a resume) gives the batch an uninterrupted run gives at s,
    and the processes' shares (4 processes, 3 rows each, each split again by grad_accum 3) are
    disjoint blocks that together are the global batch."""
    run = _make_loaders()
    uninterrupted = {i: [_dict(ld, s) for s in range(6)] for i, ld in enumerate(run)}
    for i, ld in enumerate(_make_loaders()):
        for s in (3, 5):
            got, want = _dict(ld, s), uninterrupted[i][s]
            assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
        assert not np.array_equal(uninterrupted[i][0]["tokens"], uninterrupted[i][1]["tokens"])
    shares = [_make_loaders(4, p) for p in range(4)]
    for i in range(len(run)):
        want = uninterrupted[i][4]
        parts = [_dict(shares[p][i], 4) for p in range(4)]
        assert all(part["tokens"].shape[0] == 3 for part in parts)
        for k in want:
            assert np.array_equal(np.concatenate([part[k] for part in parts]), want[k])


def test_weight_zero_domain_needs_no_training_window():
    """A domain of weight 0 is never sampled, yet the loader refused the mixture unless it held a
    training window of seq_len + 1 tokens (an evaluation-only domain of a small file)."""
    d = [Domain("big", np.arange(500, dtype=np.int32), np.arange(100, dtype=np.int32)),
         Domain("heldout", np.arange(10, dtype=np.int32), np.arange(40, dtype=np.int32))]
    loader = DomainLoader(d, [1.0, 0.0], 8, 16, **ONE)
    assert all((loader.domains_at(s) == 0).all() for s in range(20))
    with pytest.raises(ValueError, match="domain 'heldout' train tokens has 10 tokens"):
        DomainLoader(d, [1.0, 0.5], 8, 16, **ONE)


def test_evaluate_domains_without_a_validation_window_is_a_value_error(tmp_path):
    """evaluate() on a domains: spec without any validation window crashed with AttributeError
    ('DomainSource' object has no attribute 'split_tokens') instead of its ValueError."""
    import jax
    import jaxformers as jf
    from jaxformers.training import evaluate

    spec = domain_spec(["a", "b"], [_folder(tmp_path, n, ("word " * 8 + "\n") * 30) for n in "ab"],
                       val_fraction=0.05)
    cfg = jf.get_config("gpt", "tiny", d_model=32, n_layer=1, vocab_size=257, max_seq_len=256)
    params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"no val group has seq_len \+ 1 = 201 tokens \(tokens per group: a: \d+, b: \d+\)"):
        evaluate((cfg, params), spec, seq_len=200)
    assert len(DomainSource(spec).split_tokens("val")) == max(
        len(d.val_tokens) for d in DomainSource(spec).domains)


def test_prepare_into_an_explicit_dir_warns_when_it_replaces_another_dataset(tmp_path, caplog):
    import logging
    from jaxformers.data.prepare import prepare

    corpus = _folder(tmp_path, "c", ("some words here\n" * 40))
    out = tmp_path / "ds"
    prepare(str(corpus), "byte", out_dir=out)
    with caplog.at_level(logging.WARNING, logger="jaxformers.data.prepare"):
        prepare(str(corpus), "byte", out_dir=out)  # the same settings: reused, no warning
        assert "replacing" not in caplog.text
        prepare(str(corpus), "byte", out_dir=out, val_fraction=0.2)
    assert "replacing the dataset in" in caplog.text and "val_fraction: 0.05 -> 0.2" in caplog.text
