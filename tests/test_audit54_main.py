"""Audit 54 (main session): regressions found.

* An export of parameters holding NaN / inf (a diverged run) was written as is, in every dtype: a
  checkpoint whose every output is NaN, silently.
* ``experiments.generate`` with a prompt its tokenizer encodes to no tokens failed in ``jf.generate``
  naming ``prompt_tokens``, not ``--prompt``.
* ``jf.init_params(config, rng)`` was an AttributeError; an id-array ``data`` beyond the vocab
  printed the whole array in ``evaluate``'s error.
* ``get_config("denseformer", "tiny", base="llama")`` built GPT blocks labelled llama.
* ``DogeStep.data_spec(sample=...)`` was a bare TypeError.
* A landmark model's ``attention_impl`` was silently ignored.
* ``init_from`` warned that kernel choices / tiles and weight-decay groups change what the loaded
  weights compute.
Only the export tests need torch / transformers (``@pytest.mark.hf``; skipped without them)."""
import os

import numpy as np
import pytest

import jax

from jaxformers.convert.hf_write import cast_all


def _hf():
    """The HF export tests' helpers (they need torch / transformers: skipped without them)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import test_audit52_export
    import test_audit53_hf
    return test_audit53_hf, test_audit52_export


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.hf
def test_an_export_of_non_finite_weights_is_refused_naming_the_tensor(tmp_path, dtype, value):
    from jaxformers.convert import to_hf
    h53, _ = _hf()
    config, params = h53._llama()
    _big = h53._big
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight holds "
                                         + (r"1 NaN and 0" if np.isnan(value) else r"0 NaN and 1")
                                         + r" \+-inf values of 1536 \(a diverged run\?\)"):
        to_hf(config, _big(params, value), str(tmp_path / "out"), dtype=dtype)
    assert os.listdir(tmp_path) == []  # nothing written, nothing staged left behind


def test_cast_all_passes_finite_tensors_unchanged_and_names_the_first_bad_one():
    ok = {"a": np.ones((2, 3), np.float32), "b": np.full((4,), -2.5, np.float32)}
    out = cast_all(ok, "float32")
    assert all(np.array_equal(out[k], ok[k]) for k in ok)
    bad = dict(ok, c=np.array([1.0, np.nan, np.nan], np.float32), d=np.array([np.inf], np.float32))
    with pytest.raises(ValueError, match=r"^c holds 2 NaN and 0 \+-inf values of 3"):
        cast_all(bad, "bfloat16")


@pytest.mark.hf
def test_the_export_cli_refuses_a_nan_checkpoint_and_leaves_out_untouched(tmp_path, monkeypatch, capsys):
    h53, h52 = _hf()
    _big, _export, _fake_run, _snapshot = h53._big, h52._export, h52._fake_run, h52._snapshot
    config, params = h53._llama()
    out = tmp_path / "hf"
    assert _export(_fake_run(tmp_path, monkeypatch, config, params), out) == 0, capsys.readouterr().err
    before = _snapshot(out)
    run = _fake_run(tmp_path, monkeypatch, config, _big(params, float("nan")))
    capsys.readouterr()
    assert _export(run, out, "--force") == 2
    assert "model.layers.1.mlp.down_proj.weight holds 1 NaN" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_generate_names_a_prompt_that_encodes_to_no_tokens(tmp_path, monkeypatch, capsys):
    """A tokenizer that drops every character of a non-empty prompt: was a prompt_lengths error of
    jf.generate, naming no flag."""
    from experiments import generate
    from jaxformers.data import Tokenizer
    from test_audit42_cli import _fake_run

    run, _ = _fake_run(tmp_path, monkeypatch)
    load = Tokenizer.load

    def dropping(path):
        tok = load(path)
        monkeypatch.setattr(tok, "encode", lambda text: [])
        return tok

    monkeypatch.setattr(Tokenizer, "load", staticmethod(dropping))
    rc = generate.main(["--run", str(run), "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--prompt 'hi' encodes to no tokens" in err, err


def test_init_params_and_logical_axes_take_a_config_or_name_the_argument():
    """``jf.init_params(config, rng)`` was an AttributeError ('TransformerConfig' object has no
    attribute 'config'); a config is built, anything else is a ValueError naming module."""
    import jaxformers as jf
    config = jf.get_config("gpt", "tiny", vocab_size=64)
    a = jf.init_params(config, jax.random.PRNGKey(0))
    b = jf.init_params(jf.build(config), jax.random.PRNGKey(0))
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))
    assert jax.tree.structure(jf.logical_axes(config)) == jax.tree.structure(jf.logical_axes(jf.build(config)))
    with pytest.raises(ValueError, match="module must be a flax model .* or a model config, got str"):
        jf.init_params("gpt", jax.random.PRNGKey(0))


def test_evaluate_of_an_id_array_beyond_the_vocab_names_it_briefly():
    """The error printed the whole array's repr (and a tokenizer that did not encode it)."""
    import jaxformers as jf
    from jaxformers.training import evaluate
    config = jf.get_config("gpt", "tiny", vocab_size=64)
    params = jf.init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"^data=<ndarray of shape \(5000,\)> of ids has vocab_size=300, larger "
                                         r"than the model's vocab_size=64"):
        evaluate((config, params), np.arange(5000) % 300, seq_len=16, batch_size=2)


def test_a_denseformer_base_label_that_contradicts_its_blocks_is_refused():
    """``get_config("denseformer", "tiny", base="llama")`` built GPT blocks (LayerNorm, GELU)
    labelled llama: ``base`` is a label, not a switch."""
    import jaxformers as jf
    from jaxformers.models.denseformer import DenseFormerConfig
    with pytest.raises(ValueError, match=r"base='llama' labels a config whose blocks are gpt-style .*"
                                         r"get_config\('denseformer', 'llama-tiny'\)"):
        jf.get_config("denseformer", "tiny", base="llama")
    with pytest.raises(ValueError, match=r"base='gpt' labels a config whose blocks are llama-style"):
        jf.get_config("denseformer", "llama-tiny", base="gpt")
    assert (jf.get_config("denseformer", "llama-tiny").mlp, DenseFormerConfig.from_base("llama").norm) == \
        ("swiglu", "rmsnorm")
    assert jf.get_config("denseformer", "tiny", norm="rmsnorm").base == "gpt"  # one field changed: kept


def test_doge_data_spec_names_a_sample_option():
    """``DogeStep.data_spec(sample=...)`` was a bare TypeError (keyword given twice)."""
    from jaxformers.training.doge import DogeStep
    step = DogeStep(("a", "b", "c"))
    assert "stratified" in step.data_spec()
    with pytest.raises(ValueError, match=r"sample='uniform' is not allowed: the DoGE proxy samples 'stratified'"):
        step.data_spec(sample="uniform")


@pytest.mark.parametrize("impl", ["xla", "cudnn", "pallas"])
def test_a_landmark_attention_impl_is_refused_not_ignored(impl):
    """Landmark models never read ``attention_impl`` (their attention is ``landmark_impl``'s): a
    value other than the default was silently ignored."""
    import jaxformers as jf
    from jaxformers.config import ATTENTION_IMPLS
    assert impl in ATTENTION_IMPLS
    with pytest.raises(ValueError, match=rf"attention_impl='{impl}' is not used by landmark models"):
        jf.get_config("landmark", "tiny", attention_impl=impl)
    assert jf.get_config("landmark", "tiny", landmark_impl="reference").attention_impl == "auto"


def test_init_from_does_not_warn_of_kernel_or_optimizer_fields(tmp_path, caplog):
    """``--init-from`` a Mamba-2 checkpoint with another ``scan_impl`` / ``chunk_size`` (the SSD
    kernel and its exact chunking) or ``weight_decay_groups`` warned that the loaded weights
    "compute something else"; a real change (``norm_eps``) still warns."""
    pytest.importorskip("safetensors")
    from jaxformers.convert import to_hf
    from jaxformers.training.init_from import load_params
    from jaxformers.utils import abstract_params
    import jaxformers as jf

    config = jf.get_config("mamba2", "tiny", vocab_size=64, d_model=32, n_layer=1, headdim=16, d_state=16,
                           chunk_size=16)
    params = jf.init_params(config, jax.random.PRNGKey(0))
    src = to_hf(config, params, str(tmp_path / "hf"))
    same = config.replace(scan_impl="reference", chunk_size=32, weight_decay_groups="nanogpt")
    with caplog.at_level("WARNING"):
        loaded = load_params(src, abstract_params(jf.build(same)), model_config=same)
    assert "compute something else" not in caplog.text
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
    with caplog.at_level("WARNING"):
        load_params(src, abstract_params(jf.build(same)), model_config=same.replace(norm_eps=1e-3))
    assert "compute something else" in caplog.text and "norm_eps" in caplog.text


def test_init_student_names_a_student_config_of_another_teacher():
    """The final check of ``init_student`` (a student config from another teacher) lists the
    shapes that differ, as ``check_params_tree`` does (one shared comparison)."""
    import jaxformers as jf
    from jaxformers.distill import init_student, student_config
    teacher = jf.get_config("llama", "tiny")
    params = jf.init_params(teacher, jax.random.PRNGKey(0))
    other = student_config(teacher.replace(d_ff=2 * teacher.d_ff), "mamba2")
    with pytest.raises(ValueError, match=r"vs the mapped teacher: missing \[\], unexpected \[\], shapes \(expected "
                                         r"vs given\) \[\"\['blocks_0'\]\['mlp'\]\['down'\]\['kernel'\]: \(704, 128\) "
                                         r"vs \(352, 128\)"):
        init_student(teacher, params, other, jax.random.PRNGKey(1))
