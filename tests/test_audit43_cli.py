"""Audit 43, config / norms / CLI bad input: a family change through ``replace``, nonsense
``init_std`` / norm ``eps``, usage errors of ``experiments.generate`` naming the flag, and an
``experiments.export --out`` inside the run directory."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from test_audit42_cli import _fake_run  # a tiny llama run whose load_run is patched


# ------------------------------------------------------------------ config.replace(model=...)
def test_replace_refuses_a_model_of_another_config_class():
    landmark = jf.get_config("landmark", "tiny")
    with pytest.raises(ValueError, match=r"model='gpt'.*LandmarkConfig.*get_config\('gpt'"):
        landmark.replace(model="gpt")  # was: a TransformerConfig-built GPT, landmark fields ignored
    with pytest.raises(ValueError, match="model='landmark'"):
        jf.get_config("gpt", "tiny").replace(model="landmark")
    with pytest.raises(ValueError, match="unknown model name"):
        jf.get_config("gpt", "tiny").replace(model="nope")


def test_replace_keeps_a_model_of_the_same_config_class():
    assert jf.get_config("gpt", "tiny").replace(model="llama").model == "llama"
    assert jf.get_config("qk_sparse", "tiny").replace(model="hash_sparse").model == "hash_sparse"
    assert jf.get_config("mamba", "tiny").replace(model="mamba", d_model=64).d_model == 64


# ----------------------------------------------------------------------------- init_std / eps
@pytest.mark.parametrize("value", [0.0, 0, -0.02, float("nan"), float("inf")])
def test_init_std_must_be_positive(value):
    # 0: every weight zero, every gradient exactly zero: the model never trains
    with pytest.raises(ValueError, match="init_std must be a finite number > 0"):
        jf.get_config("gpt", "tiny", init_std=value)


@pytest.mark.parametrize("cls_name", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf"), 0.0, "1e-5", True])
def test_standalone_norm_refuses_bad_eps(cls_name, eps):
    from jaxformers.layers import norms
    with pytest.raises(ValueError, match=f"{cls_name} eps must be a finite number > 0"):
        getattr(norms, cls_name)(eps=eps).init(jax.random.PRNGKey(0), jnp.ones((2, 4)))


@pytest.mark.parametrize("eps", [1e-6, np.float32(1e-5), 1])
def test_standalone_norm_accepts_a_positive_eps(eps):
    from jaxformers.layers.norms import RMSNorm
    x = jnp.ones((2, 4))
    y = RMSNorm(eps=eps).apply(RMSNorm(eps=eps).init(jax.random.PRNGKey(0), x), x)
    assert bool(jnp.isfinite(y).all())


# ------------------------------------------------------------------ generate: flags, not params
@pytest.mark.parametrize("flags,flag", [(["--top-k", "0"], "--top-k"), (["--top-p", "0"], "--top-p"),
                                        (["--top-p", "1.5"], "--top-p"),
                                        (["--temperature", "-1"], "--temperature"),
                                        (["--temperature", "nan"], "--temperature"),
                                        (["--max-new-tokens", "0"], "--max-new-tokens"),
                                        (["--max-new-tokens", "-3"], "--max-new-tokens")])
def test_generate_usage_errors_name_the_flag(tmp_path, monkeypatch, capsys, flags, flag):
    from experiments import generate
    run, _ = _fake_run(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        generate.main(["--run", str(run), "--prompt", "hi", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{flag} must" in err, err


def test_generate_top_k_above_the_vocab_names_the_flag(tmp_path, monkeypatch, capsys):
    from experiments import generate
    run, config = _fake_run(tmp_path, monkeypatch)
    rc = generate.main(["--run", str(run), "--prompt", "hi", "--max-new-tokens", "2",
                        "--top-k", str(config.vocab_size + 1)])
    err = capsys.readouterr().err
    assert rc == 2 and "--top-k must be <=" in err and "top_k must" not in err, err


def test_generate_still_runs_with_valid_flags(tmp_path, monkeypatch, capsys):
    from experiments import generate
    run, _ = _fake_run(tmp_path, monkeypatch)
    rc = generate.main(["--run", str(run), "--prompt", "hi", "--max-new-tokens", "3", "--top-k", "5",
                        "--top-p", "0.9", "--json"])
    io = capsys.readouterr()
    assert rc == 0, io.err
    assert len(json.loads(io.out)["samples"]) == 1


# ------------------------------------------------------------------------ export --out in the run
@pytest.mark.parametrize("sub", ["tokenizer", "sub/deeper"])
def test_export_refuses_out_inside_the_run(tmp_path, monkeypatch, capsys, sub):
    from experiments import export
    from jaxformers.training.rundir import TOKENIZER_DIR
    run, _ = _fake_run(tmp_path, monkeypatch)
    before = {p.name: p.read_bytes() for p in (run / TOKENIZER_DIR).iterdir()}
    rc = export.main(["--run", str(run), "--out", str(run / sub), "--force"])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "inside the run directory" in err, err
    assert {p.name: p.read_bytes() for p in (run / TOKENIZER_DIR).iterdir()} == before
    assert not (run / sub / "model.safetensors").exists()


def test_export_refuses_out_reaching_the_run_through_a_symlink(tmp_path, monkeypatch, capsys):
    from experiments import export
    run, _ = _fake_run(tmp_path, monkeypatch)
    (tmp_path / "link").symlink_to(run)
    rc = export.main(["--run", str(run), "--out", str(tmp_path / "link" / "tokenizer"), "--force"])
    assert rc == 2 and "inside the run directory" in capsys.readouterr().err


def test_export_beside_the_run_still_works(tmp_path, monkeypatch, capsys):
    pytest.importorskip("safetensors")
    from experiments import export
    run, _ = _fake_run(tmp_path, monkeypatch)
    rc = export.main(["--run", str(run), "--out", str(tmp_path / "run-hf")])  # a prefix, not inside
    io = capsys.readouterr()
    assert rc == 0, io.err
    assert (tmp_path / "run-hf" / "config.json").is_file()


# ------------------------------------------------------------------ evaluate: flags, not params
@pytest.mark.parametrize("flags,flag", [(["--batch-size", "0"], "--batch-size"),
                                        (["--seq-len", "-4"], "--seq-len"),
                                        (["--max-batches", "-2"], "--max-batches")])
def test_evaluate_usage_errors_name_the_flag(tmp_path, monkeypatch, capsys, flags, flag):
    from experiments import evaluate
    run, _ = _fake_run(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", str(run), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{flag} must" in err, err


# --------------------------------------------------------------------------- write_kv_cache: negative index
def test_write_kv_cache_refuses_a_negative_index():
    """A negative ``cache_index`` was wrapped by ``dynamic_update_slice`` (-2 wrote slot S-2 of a
    4-slot cache): eagerly a ValueError naming it, under jit the written keys/values are NaN."""
    from jaxformers.layers.attention import write_kv_cache

    cache = {"k": jnp.zeros((1, 4, 1, 2)), "v": jnp.zeros((1, 4, 1, 2))}
    new = jnp.ones((1, 1, 1, 2))
    with pytest.raises(ValueError, match="cache_index must be >= 0"):
        write_kv_cache(cache, new, new, -2)
    out = jax.jit(lambda i: write_kv_cache(cache, new, new, i))(-2)
    assert not np.any(np.asarray(out["k"]) == 1.0)  # nothing written as if it were valid
    assert np.isnan(np.asarray(out["k"])).any()
    ok = jax.jit(lambda i: write_kv_cache(cache, new, new, i))(1)
    np.testing.assert_array_equal(np.asarray(ok["k"][0, :, 0, 0]), [0.0, 1.0, 0.0, 0.0])
