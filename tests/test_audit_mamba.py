"""Audit regressions: Mamba / Mamba-2 layers, models, kernels, HF conversion, experiment."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf

SMALL = dict(vocab_size=64, d_model=32, n_layer=1, d_state=8, init_std=0.3)
SMALL2 = dict(SMALL, headdim=16, n_groups=2, chunk_size=16)


@functools.lru_cache(maxsize=None)
def _setup(kind, **overrides):
    c = jf.get_config(kind, "tiny", **{**(SMALL2 if kind == "mamba2" else SMALL), **overrides})
    m = jf.build(c)
    return c, m, jf.init_params(m, jax.random.PRNGKey(1))


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("t", [1, 3])
def test_cache_of_another_batch_is_a_value_error(kind, t):
    """A cache built for another batch size: ValueError naming the cache entry (was a
    TypeError from jnp.concatenate inside the conv)."""
    _, m, params = _setup(kind)
    tok = jnp.zeros((2, t), jnp.int32)
    with pytest.raises(ValueError, match=r"cache\['conv(_x)?'\].*init_cache"):
        m.apply({"params": params}, tok, cache=jf.init_cache(m, 3, 8))


def test_experiment_gpu_preset_ssd_backward_fits_hopper_shared_memory():
    """experiments.mamba --preset gpu trains mamba2 (bf16 on GPU) with the preset's SSD chunk:
    chunk 256 needed 280 KiB of shared memory in the SSD backward (H100/H200: 227 KiB), so
    it could not launch.  Compiled for sm_90 with the pip triton (no GPU needed)."""
    pytest.importorskip("triton")
    from experiments import common, mamba as exp
    from pallas_kernels.ssd import ssd
    from pallas_kernels.triton_inspect import H100_SHARED_PER_BLOCK, compile_report, triton_calls

    preset = exp.PRESETS["gpu"]
    m2 = preset["ssm"]["mamba2"]
    h, p, n = 2 * preset["d_model"] // m2["headdim"], m2["headdim"], m2["d_state"]
    S, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    args = [S((1, 256, h, p), bf16), S((1, 256, h), bf16), S((h,), jnp.float32),
            S((1, 256, 1, n), bf16), S((1, 256, 1, n), bf16)]

    def loss(*a):
        return ssd(*a, chunk_size=m2["chunk_size"], dt_softplus=True, interpret=False).astype(
            jnp.float32).sum()

    calls = [c for c in triton_calls(jax.grad(loss, argnums=(0, 1, 3, 4)), *args)
             if c.name == "ssd_chunk_bwd"]
    assert calls
    r = compile_report(calls[0])
    assert r["shared_bytes"] <= H100_SHARED_PER_BLOCK and r["local_bytes"] == 0, r


def test_experiment_reuse_keeps_finished_runs(tmp_path, monkeypatch):
    """An interrupted ``experiments.mamba`` lost every finished model (no ``--reuse``: all
    retrained); now ``--reuse`` takes finished runs from OUT/runs and nothing retrains."""
    from experiments import common, mamba as exp

    argv = ["--preset", "tiny", "--steps", "1", "--eval-batches", "1", "--contexts", "4",
            "--models", "mamba", "--no-compile-cache", "--out", str(tmp_path)]
    first = exp.main(argv)
    assert first["complete"]
    (tmp_path / "results.json").unlink()

    def no_training(*a, **k):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(common, "train_fresh", no_training)
    again = exp.main(argv + ["--reuse"])
    assert again["complete"] and (tmp_path / "results.json").is_file()
    assert again["models"]["mamba"]["val_ppl"] == first["models"]["mamba"]["val_ppl"]
    with pytest.raises(SystemExit):  # another training setting: not reused silently
        exp.main(argv[:2] + ["--steps", "2"] + argv[4:] + ["--reuse"])


@pytest.mark.parametrize("kwargs, field", [
    (dict(dt_scale=float("nan")), "dt_scale"),        # was accepted: NaN dt_proj init, NaN logits
    (dict(dt_init_floor=float("nan")), "dt_init_floor"),  # was accepted: NaN dt_bias
    (dict(a_init_range=(1.0, float("inf"))), "a_init_range"),  # was accepted
    (dict(dt_min="0.01"), "dt_min"),                  # was a TypeError from the comparison
    (dict(dt_max=float("inf")), "dt_max"),            # was accepted: inf dt_bias
])
def test_non_finite_dt_and_a_init_fields_are_rejected(kwargs, field):
    with pytest.raises(ValueError, match=field):
        jf.get_config("mamba", "tiny", **kwargs)


def test_hf_mamba2_config_without_default_keys_reads_transformers_defaults(tmp_path):
    """A Mamba2 config.json omitting keys at transformers' defaults (state_size=128, n_groups=8)
    loads in transformers; the converter assumed 16 / 1 and failed on the weight shapes."""
    import json
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxformers.convert import from_hf_mamba

    torch.manual_seed(0)
    hf_cfg = transformers.Mamba2Config(vocab_size=32, hidden_size=32, num_hidden_layers=1, head_dim=8,
                                       num_heads=8)  # state_size 128, n_groups 8: the defaults
    model = transformers.Mamba2ForCausalLM(hf_cfg).eval()
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("state_size", "n_groups", "tie_word_embeddings"):
        raw.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config, params = from_hf_mamba(str(tmp_path))
    assert (config.d_state, config.n_groups, config.tie_embeddings) == (128, 8, False)
    toks = np.arange(7, dtype=np.int32)[None] % 32
    with torch.no_grad():
        ref = model(torch.from_numpy(toks.astype(np.int64)), use_cache=False).logits.numpy()
    out = np.asarray(jf.build(config).apply({"params": params}, jnp.asarray(toks)))
    np.testing.assert_allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("x_shape, bc_shape, field", [
    ((1, 64, 4, 64), (1, 64, 3, 16), "bc_shape"),  # G does not divide H: was a reshape TypeError
    ((1, 64, 4, 64), (2, 32, 1, 16), "bc_shape"),  # other B / L: "index can't contain negative values"
    ((1, 64, 4), (1, 64, 1, 16), "x_shape"),       # was "not enough values to unpack"
    ((0, 64, 4, 64), (0, 64, 1, 16), "x_shape"),   # was accepted
])
def test_ssd_tpu_vmem_bytes_rejects_bad_shapes(x_shape, bc_shape, field):
    from pallas_kernels.ssd import tpu_vmem_bytes
    with pytest.raises(ValueError, match=field):
        tpu_vmem_bytes(x_shape, bc_shape)
