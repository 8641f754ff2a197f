"""Hugging Face export as users expect it: bf16 / fp16 weights (``dtype``), sharded files
(``max_shard_size``), and an export that fails half-way never touches ``--out``."""
import json
import os
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

import jaxformers as jf  # noqa: E402
from jaxformers.convert import from_hf, to_hf  # noqa: E402
from jaxformers.convert.hf_io import read_header  # noqa: E402

pytestmark = pytest.mark.hf

TOKENS = np.random.RandomState(0).randint(0, 64, (2, 11)).astype(np.int32)


def _perturbed(config, seed=1):
    params = jf.init_params(jf.build(config), jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


def _llama():
    config = jf.get_config("llama", "tiny", vocab_size=64, d_model=32, n_head=4, n_kv_head=2, d_ff=48,
                           n_layer=2, tie_embeddings=False)
    return config, _perturbed(config)


def _mamba2():
    config = jf.get_config("mamba2", "tiny", vocab_size=64, d_model=32, n_layer=1, headdim=16, n_groups=2,
                           d_state=16, chunk_size=8)
    return config, _perturbed(config)


def _ours(config, params):
    return np.asarray(jf.build(config).apply({"params": params}, jnp.asarray(TOKENS)))


def _theirs(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS.astype(np.int64)), use_cache=False).logits.numpy()


def _rounded(params, dtype):
    return jax.tree.map(lambda x: np.asarray(x, np.float32).astype(dtype).astype(np.float32), params)


def _assert_tree_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _dtypes(path):
    header, _ = read_header(str(path))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


# --------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("kind", ["llama", "mamba2"])
def test_a_bfloat16_export_is_half_the_size_reads_back_rounded_and_loads_in_transformers(kind, tmp_path):
    config, params = _llama() if kind == "llama" else _mamba2()
    to_hf(config, params, str(tmp_path / "f32"))
    to_hf(config, params, str(tmp_path / "bf16"), dtype="bfloat16")
    f32, bf16 = tmp_path / "f32" / "model.safetensors", tmp_path / "bf16" / "model.safetensors"
    assert _dtypes(f32) == {"F32"} and _dtypes(bf16) == {"BF16"}  # A_log / D / dt_bias too (HF keeps none)
    assert bf16.stat().st_size < 0.52 * f32.stat().st_size
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16
    _, back = from_hf(str(tmp_path / "bf16"))
    _assert_tree_equal(back, _rounded(params, ml_dtypes.bfloat16))  # exactly the bf16-rounded originals
    # transformers computes our function of the rounded weights (a wrong layout is far off)
    np.testing.assert_allclose(_theirs(tmp_path / "bf16"), _ours(config, back), atol=1e-4, rtol=1e-4)
    # ... and loaded in its stored dtype, as a user does, within bf16 compute noise
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        low = model(torch.from_numpy(TOKENS.astype(np.int64)), use_cache=False).logits.float().numpy()
    np.testing.assert_allclose(low, _ours(config, back), atol=0.1)


def test_a_float16_export_and_an_unknown_dtype(tmp_path):
    config, params = _llama()
    to_hf(config, params, str(tmp_path / "f16"), dtype="float16")
    assert _dtypes(tmp_path / "f16" / "model.safetensors") == {"F16"}
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["dtype"] == "float16"
    _, back = from_hf(str(tmp_path / "f16"))
    _assert_tree_equal(back, _rounded(params, np.float16))
    with pytest.raises(ValueError, match=r"dtype must be one of \['float32', 'bfloat16', 'float16'\], got 'int8'"):
        to_hf(config, params, str(tmp_path / "bad"), dtype="int8")
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- shards
def test_max_shard_size_splits_as_huggingface_hub_does_and_both_loaders_read_it(tmp_path, monkeypatch):
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.numpy import load_file

    import jaxformers.convert.hf_write as hf_write

    config, params = _llama()
    to_hf(config, params, str(tmp_path / "one"))
    assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors"]
    limit = 9000  # bytes: the 64x32 float32 embedding (8192) fits, two of them do not
    order, real = [], hf_write.write_weights
    monkeypatch.setattr(hf_write, "write_weights", lambda t, *a: order.extend(t) or real(t, *a))
    to_hf(config, params, str(tmp_path / "sh"), max_shard_size=limit)
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(os.listdir(tmp_path / "sh")) == sorted(files + ["config.json", "model.safetensors.index.json"])
    whole = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in whole.values())
    assert index["metadata"]["total_parameters"] == sum(v.size for v in whole.values())
    for f in files:
        part = load_file(str(tmp_path / "sh" / f))
        assert set(part) == {k for k, v in index["weight_map"].items() if v == f}
        assert sum(v.nbytes for v in part.values()) <= limit or len(part) == 1
    # the same packing as save_pretrained's helper, tensor order as written
    split = split_torch_state_dict_into_shards({k: torch.from_numpy(np.array(whole[k])) for k in order},
                                               max_shard_size=limit)
    assert split.tensor_to_filename == index["weight_map"]
    _, back = from_hf(str(tmp_path / "sh"))
    _assert_tree_equal(back, params)  # bit-equal round trip
    np.testing.assert_allclose(_theirs(tmp_path / "sh"), _ours(config, params), atol=1e-4, rtol=1e-4)


def test_max_shard_size_strings_and_refusals():
    from jaxformers.convert.hf_write import parse_size, shard_names

    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("500MB") == 5 * 10 ** 8
    assert parse_size("1.5kb") == 1500 and parse_size(77) == 77
    for bad in ("5 parsecs", "GB", "-1", 0, "abc", 0.5, "123"):  # "123": no unit (huggingface_hub refuses it)
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)
    t = {n: np.zeros(s, np.float32) for n, s in [("a", 6), ("b", 6), ("c", 2), ("d", 6), ("e", 2), ("f", 2)]}
    # huggingface_hub's docstring example (sizes in units of 4 bytes, limit 10 units)
    assert list(shard_names(t, 40).values()) == [["a"], ["b", "c"], ["d", "e", "f"]]
    assert list(shard_names({"big": np.zeros(20, np.float32), "s": np.zeros(1, np.float32)}, 40).values()) \
        == [["big"], ["s"]]
    assert shard_names(t, "1KB") == {"model.safetensors": list(t)}


# --------------------------------------------------------------------------- export CLI: atomic
def _fake_run(tmp_path, monkeypatch, config, params, tokenizer=True):
    import jaxformers.training as training
    from jaxformers.data.tokenizer import get_tokenizer
    from jaxformers.training.rundir import TOKENIZER_DIR

    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    if tokenizer:
        get_tokenizer("byte").save(run / TOKENIZER_DIR)
    monkeypatch.setattr(training, "load_run", lambda r, step=None, **kw: (config, None, params))
    return run


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _export(run, out, *argv):
    from experiments import export
    return export.main(["--run", str(run), "--out", str(out), *argv])


def test_export_cli_dtype_shards_and_a_smaller_export_over_a_sharded_one(tmp_path, monkeypatch, capsys):
    config = jf.get_config("llama", "tiny", vocab_size=257, d_model=32, n_head=4, n_kv_head=2, d_ff=48,
                           n_layer=2, tie_embeddings=False)
    params = _perturbed(config)
    run = _fake_run(tmp_path, monkeypatch, config, params)
    out = tmp_path / "hf"
    capsys.readouterr()
    assert _export(run, out, "--dtype", "bfloat16", "--max-shard-size", "20KB") == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["dtype"] == "bfloat16" and len(summary["weights"]) >= 3
    assert "model.safetensors.index.json" in summary["weights"]
    assert summary["bytes"] == sum((out / n).stat().st_size for n in summary["weights"] if n.endswith("safetensors"))
    sharded = sorted(n for n in os.listdir(out) if n.startswith("model-"))
    assert len(sharded) >= 2 and all(_dtypes(out / n) == {"BF16"} for n in sharded)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["eos_token_id"] == 256
    _, back = from_hf(str(out))
    _assert_tree_equal(back, _rounded(params, ml_dtypes.bfloat16))
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]  # no temporary folder left
    # a one-file float32 export over it: no shard or index of the earlier one is left behind
    assert _export(run, out, "--force") == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary["removed"]) == sorted(sharded + ["model.safetensors.index.json"])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    _, back = from_hf(str(out))
    _assert_tree_equal(back, params)
    # and a sharded export over a one-file one removes model.safetensors (read before the index)
    assert _export(run, out, "--force", "--max-shard-size", "20000") == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["removed"] == ["model.safetensors"]
    _, back = from_hf(str(out))
    _assert_tree_equal(back, params)
    np.testing.assert_allclose(_theirs(out), _ours(config, params), atol=1e-4, rtol=1e-4)
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]
    assert _export(run, out, "--force", "--max-shard-size", "5 parsecs") == 2
    assert "max_shard_size" in capsys.readouterr().err


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_an_export_failing_after_the_weights_leaves_the_earlier_export_intact(tmp_path, monkeypatch, capsys,
                                                                             failure):
    import jaxformers.convert.hf_tokenizer as hf_tokenizer

    config = jf.get_config("llama", "tiny", vocab_size=257, d_model=32, n_head=4, n_kv_head=2, d_ff=48,
                           n_layer=2)
    params = _perturbed(config)
    run = _fake_run(tmp_path, monkeypatch, config, params)
    out = tmp_path / "hf"
    assert _export(run, out) == 0, capsys.readouterr().err
    (out / "notes.txt").write_text("keep me")
    before = _snapshot(out)
    written = []

    def fail(tok, out_dir, **kw):  # the weights and config.json are complete by now
        written.extend(sorted(os.listdir(out_dir)))
        raise failure
    monkeypatch.setattr(hf_tokenizer, "save_hf_tokenizer", fail)
    other = _perturbed(config, seed=7)
    monkeypatch.setattr(__import__("jaxformers.training", fromlist=["x"]), "load_run",
                        lambda r, step=None, **kw: (config, None, other))
    capsys.readouterr()
    if isinstance(failure, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            _export(run, out, "--force")
    else:
        assert _export(run, out, "--force") == 2
        assert "disk full" in capsys.readouterr().err
    assert {"config.json", "model.safetensors"} <= set(written)  # it failed after the weights
    assert _snapshot(out) == before  # the earlier export intact, byte for byte
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]  # no temporary folder left
    _, back = from_hf(str(out))
    _assert_tree_equal(back, params)


def test_to_hf_failing_half_way_writes_nothing(tmp_path, monkeypatch):
    """The library call is staged too: a failure while writing the weights leaves no torn file."""
    import jaxformers.convert.hf_write as hf_write

    config, params = _llama()
    out = tmp_path / "hf"
    to_hf(config, params, str(out))
    before = _snapshot(out)
    real = hf_write.write_json

    def fail(path, obj):
        if path.endswith("config.json"):
            raise OSError("quota")
        real(path, obj)
    monkeypatch.setattr(hf_write, "write_json", fail)
    with pytest.raises(OSError, match="quota"):
        to_hf(config, _perturbed(config, seed=5), str(out), max_shard_size=9000)
    assert _snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["hf"]


# --------------------------------------------------------------------------- layer_parallel on Qwen3
def test_layer_parallel_runs_a_qk_norm_model_with_fused_pairs(tmp_path, capsys):
    """``--run`` of a Qwen3 checkpoint (``qk_norm``): the experiment crashed with fused pairs'
    ValueError, then fell back to unfused pairs; fused pairs now take qk_norm (per-head q/k norm
    scales), so its pairs run fused, as any model's (``--unfused`` still unfuses them)."""
    from experiments import layer_parallel as exp

    config = jf.get_config("llama", "tiny", vocab_size=257, d_model=32, n_layer=4, n_head=4, n_kv_head=2,
                           d_ff=48, max_seq_len=64, qk_norm=True)
    params = _perturbed(config)
    to_hf(config, params, str(tmp_path / "qwen3"))
    assert json.loads((tmp_path / "qwen3" / "config.json").read_text())["model_type"] == "qwen3"
    common = ["--data", "default", "--tokenizer", "byte", "--eval-batches", "1", "--seq-len", "16",
              "--batch-size", "2", "--decode-tokens", "2", "--iters", "1", "--no-study", "--no-compile-cache",
              "--positions", "early", "--max-pairs", "1"]
    res = exp.main(["--run", str(tmp_path / "qwen3"), "--out", str(tmp_path / "lp"), *common])
    assert res["pair_form"] == {"fused": True, "reason": None}
    assert "unfused" not in capsys.readouterr().err
    assert [(r["start"], r["end"], r["mlp_norm"]) for r in res["pairs"]] == [(1, 3, "own"), (1, 3, "mean")]
    assert all(r["val_ppl"] > 1 and r["decode_b1_speedup"] > 0 for r in res["pairs"])
    saved = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert saved["pair_form"] == res["pair_form"] and saved["complete"] is True
    unf = exp.main(["--run", str(tmp_path / "qwen3"), "--out", str(tmp_path / "lpu"), "--unfused", *common])
    assert unf["pair_form"] == {"fused": False, "reason": "--unfused"}
    for a, b in zip(res["pairs"], unf["pairs"]):  # the same function
        assert a["val_ppl"] == pytest.approx(b["val_ppl"], rel=1e-4)


def test_to_hf_through_a_symlinked_out_stages_beside_the_real_folder(tmp_path):
    config, params = _llama()
    (tmp_path / "real").mkdir()
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "link"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    to_hf(config, params, str(link), max_shard_size=9000)
    to_hf(config, params, str(link), dtype="bfloat16")  # one file over the shards
    assert link.is_symlink() and sorted(os.listdir(tmp_path / "real")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "real"] and os.listdir(tmp_path / "elsewhere") == ["link"]
    _, back = from_hf(str(link))
    _assert_tree_equal(back, _rounded(params, ml_dtypes.bfloat16))
