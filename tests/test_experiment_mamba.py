"""experiments.mamba end to end at toy scale: results.json, plots, and the cache-size claim."""
import json

from experiments import mamba as exp


def test_param_matching_is_close():
    for name in ("tiny", "gpu"):
        grid, target = exp.model_grid(exp.PRESETS[name], "gpt", 257, 128)
        assert [n for n, _ in grid] == ["gpt", "mamba", "mamba2", "hybrid"]
        for n, cfg in grid:
            assert abs(exp.n_params(cfg) / target - 1) < 0.2, (name, n)
        hybrid = dict(grid)["hybrid"]
        assert 0 < len(hybrid.attention_layers) < hybrid.n_layer


def test_mamba_experiment_tiny(tmp_path):
    out = tmp_path / "mamba"
    exp.main(["--preset", "tiny", "--steps", "10", "--eval-batches", "2", "--contexts", "32,128",
              "--models", "gpt,mamba", "--no-compile-cache", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    for key in ("preset", "backend", "device_kind", "jax_version", "train", "contexts", "models",
                "target_params"):
        assert key in results
    assert results["contexts"] == [32, 128]
    assert set(results["models"]) == {"gpt", "mamba"}
    for name, row in results["models"].items():
        for key in ("n_params", "val_loss", "val_ppl", "train_tokens_per_s", "decode", "n_layer"):
            assert row[key] is not None, (name, key)
        assert row["val_ppl"] > 1.0
        assert [d["context"] for d in row["decode"]] == [32, 128]
        assert all(d["decode_step_ms"] > 0 and d["cache_bytes"] > 0 for d in row["decode"])
    mamba_bytes = [d["cache_bytes"] for d in results["models"]["mamba"]["decode"]]
    gpt_bytes = [d["cache_bytes"] for d in results["models"]["gpt"]["decode"]]
    assert len(set(mamba_bytes)) == 1  # constant-size recurrent state
    assert gpt_bytes[1] > gpt_bytes[0]  # the KV cache grows with the context...
    kv_32 = gpt_bytes[0] - 4  # ...linearly (minus the int32 index)
    assert gpt_bytes[1] - 4 == 4 * kv_32
    for png in ("val_ppl.png", "decode_scaling.png"):
        assert (out / png).stat().st_size > 1000
