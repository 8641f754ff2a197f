"""Audit 54 (Mamba family): regressions for the bugs found in the Mamba layers, models,
scan kernels' callers, HF conversion and the Mamba experiments."""
import json

import pytest


# ----------------------------------------------------------------------------- experiments.bench_scan
def test_bench_scan_keeps_finished_rows_when_cut_short(tmp_path, monkeypatch):
    """results.json used to be written only at the very end: a run interrupted in the SSD part
    (a kill, a GPU stage's time limit) lost every selective-scan row already measured."""
    from experiments import bench_scan

    calls = []

    def fake_bench(base, fn, inputs, diff_keys, on_gpu, warmup, iters):
        calls.append(base["kernel"])
        if base["kernel"] == "ssd":
            raise KeyboardInterrupt  # the run is cut short while timing the SSD
        return [dict(base, mode=m, ms=1.0) for m in ("fwd", "fwd+bwd")]

    monkeypatch.setattr(bench_scan, "_bench_jax", fake_bench)
    with pytest.raises(KeyboardInterrupt):
        bench_scan.main(["--quick", "--impls", "pallas", "--out", str(tmp_path)])
    assert calls == ["selective_scan", "ssd"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is False
    timed = [r for r in saved["rows"] if r.get("ms") is not None]
    assert [(r["kernel"], r["impl"], r["mode"]) for r in timed] == [
        ("selective_scan", "pallas", "fwd"), ("selective_scan", "pallas", "fwd+bwd")]
    assert len(saved["rows"]) == 6  # the skipped assoc_scan / reference rows too


def test_bench_scan_marks_a_finished_run_complete(tmp_path, monkeypatch):
    from experiments import bench_scan

    monkeypatch.setattr(bench_scan, "_bench_jax", lambda base, *a: [dict(base, mode=m, ms=1.0)
                                                                   for m in ("fwd", "fwd+bwd")])
    assert bench_scan.main(["--quick", "--impls", "pallas", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is True and len(saved["rows"]) == 12


# ----------------------------------------------------------------------------- HybridConfig.attn_layers
def test_hybrid_attn_layers_non_int_is_named_as_not_an_int():
    """attn_layers=(1.0,) was refused as "has indices [1.0] outside [0, n_layer=4)": 1.0 is
    inside; the entry is refused for not being an int, and the error now says so."""
    import jaxformers as jf

    with pytest.raises(ValueError, match=r"attn_layers=\(1\.0,\) must hold int layer indices .*\[1\.0\] \(not ints\)"):
        jf.get_config("hybrid", "tiny", attn_layers=(1.0,))
    with pytest.raises(ValueError, match=r"indices \[4\] outside \[0, n_layer=4\)"):
        jf.get_config("hybrid", "tiny", attn_layers=(4,))


# ----------------------------------------------------------------------------- HF Mamba export
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_hf_export_ignores_the_weight_decay_groups(tmp_path, kind):
    """A model trained with weight_decay_groups="nanogpt" (an optimizer setting: it changes no
    output) was refused: "this config cannot be exported as HF mamba: weight_decay_groups='nanogpt'
    (HF Mamba: 'shape')"; the Llama exporter accepts it.  It now exports, and reads back."""
    import jax
    import numpy as np

    import jaxformers as jf
    from jaxformers.convert.hf_mamba import config_to_hf_mamba, from_hf_mamba, to_hf_mamba

    extra = dict(headdim=16, d_state=8, chunk_size=16) if kind == "mamba2" else dict(d_state=8)
    c = jf.get_config(kind, "tiny", vocab_size=32, d_model=16, n_layer=1, weight_decay_groups="nanogpt",
                      **extra)
    assert config_to_hf_mamba(c) == config_to_hf_mamba(c.replace(weight_decay_groups="shape"))
    params = jf.init_params(jf.build(c), jax.random.PRNGKey(0))
    to_hf_mamba(c, params, str(tmp_path))
    back, params_back = from_hf_mamba(str(tmp_path))
    assert back.d_model == 16 and back.model == kind
    import flax.linen as nn

    assert jax.tree.structure(nn.unbox(params)) == jax.tree.structure(params_back)
    for a, b in zip(jax.tree.leaves(nn.unbox(params)), jax.tree.leaves(params_back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- HF Mamba import
@pytest.mark.parametrize("bad", [16.7, True, "32"])
def test_hf_mamba2_import_chunk_size_is_checked_not_truncated(bad):
    """config_from_hf_mamba(chunk_size=...) ran int() on it: 16.7 became a 16-step tile, True a
    1-step tile, "32" was read as 32, all silently; now a ValueError naming chunk_size."""
    import numpy as np

    from jaxformers.convert.hf_mamba import config_from_hf_mamba

    hf = dict(model_type="mamba2", hidden_size=32, num_heads=4, head_dim=16, n_groups=2, state_size=8,
              num_hidden_layers=1, vocab_size=64)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        config_from_hf_mamba(hf, chunk_size=bad)
    assert config_from_hf_mamba(hf, chunk_size=np.int64(32)).chunk_size == 32
    assert config_from_hf_mamba(hf).chunk_size == 64
