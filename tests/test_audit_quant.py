"""Regression tests from the QuaRot (jaxformers.quant, experiments/quarot.py) audit."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.quant import (QuantSpec, collect_stats, fake_quant, int8_linear, quant_config, quantize,
                              quantize_rows_int8)


def _llama(**over):
    from jaxformers.utils import abstract_params
    cfg = jf.get_config("llama", "tiny", **{"d_model": 32, "n_head": 4, "n_kv_head": 2, "d_ff": 64,
                                            "max_seq_len": 32, **over})
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), jnp.float32),
                                    abstract_params(jf.build(cfg)))
    return cfg, params


@pytest.mark.parametrize("clip", [0.0, -0.5, float("nan")])
def test_clip_outside_0_1_is_refused(clip):
    # clip <= 0 made every scale fall back to 1: values silently rounded to integers (all 0 here)
    x = jnp.linspace(-0.05, 0.05, 8)
    with pytest.raises(ValueError, match="clip"):
        fake_quant(x, 4, clip=clip)
    with pytest.raises(ValueError, match="clip"):
        quantize_rows_int8(x, clip=clip)
    with pytest.raises(ValueError, match="clip"):
        int8_linear(x[None], jnp.ones((8, 2), jnp.int8), jnp.ones(2), clip=clip)
    assert float(jnp.abs(fake_quant(x, 4, clip=0.9)).max()) > 0      # valid ratios still work
    assert float(jnp.abs(jax.jit(lambda x: fake_quant(x, 4, clip=1.0))(x)).max()) > 0


def test_quantize_refuses_a_bad_spec_and_params_of_another_config():
    cfg, params = _llama()
    with pytest.raises(ValueError, match="spec must be a QuantSpec"):
        quantize(cfg, params, None)                                   # was AttributeError
    with pytest.raises(ValueError, match=r"params do not match config: no \['blocks_2'\]"):
        quantize(cfg.replace(n_layer=3), params, QuantSpec(w_bits=4))  # was KeyError 'blocks_2'
    with pytest.raises(ValueError, match=r"params do not match config: .* has shape \(32, 2, 8\)"):
        quantize(cfg.replace(d_model=64), params, QuantSpec(w_bits=4))  # was a broadcasting error


def test_collect_stats_refuses_batch_0():
    cfg, params = _llama()
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        collect_stats(quant_config(cfg, QuantSpec(rotate=False)), params, np.zeros((2, 8), np.int32), batch=0)


def test_rotated_quarot_config_names_a_size_without_hadamard():
    # it was accepted, then the first forward failed with "no Hadamard matrix of size 6"
    with pytest.raises(ValueError, match=r"n_head=6: QuaRot's exact Hadamard"):
        jf.get_config("quarot", "tiny", d_model=96, n_head=6, n_kv_head=2, rotated=True)
    with pytest.raises(ValueError, match=r"d_ff=1000: QuaRot's exact Hadamard"):
        jf.get_config("quarot", "tiny", d_ff=1000, rotated=True)
    assert not jf.get_config("quarot", "tiny", d_ff=1000).rotated          # unrotated: no Hadamards


def test_quarot_results_are_marked_incomplete_until_the_end(tmp_path, monkeypatch):
    """results.json was rewritten after every scheme with nothing telling a cut-short run (a GPU
    stage's time limit) from a finished one; now ``complete: false`` until the end."""
    from experiments import quarot as exp
    cfg, params = _llama(vocab_size=260)
    monkeypatch.setattr(exp, "_load_source", lambda args, preset, out: (
        cfg, params, "default", "byte", dict(batch_size=2, seq_len=16, eval_batches=1), "float32", None))
    monkeypatch.setitem(exp.PRESETS["tiny"], "linear_shapes", ((8, 32, 16),))

    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(exp, "outlier_stats", stop)
    argv = ["--out", str(tmp_path), "--only", "fp", "--int-schemes", "none", "--calib", "2",
            "--no-compile-cache"]
    with pytest.raises(KeyboardInterrupt):
        exp.main(argv)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["schemes"]) == ["fp"] and saved["complete"] is False
    monkeypatch.undo()
    monkeypatch.setattr(exp, "_load_source", lambda args, preset, out: (
        cfg, params, "default", "byte", dict(batch_size=2, seq_len=16, eval_batches=1), "float32", None))
    monkeypatch.setitem(exp.PRESETS["tiny"], "linear_shapes", ((8, 32, 16),))
    monkeypatch.setattr(exp, "plot", lambda results, out: None)
    exp.main(argv)
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True


def test_pack_int4_refuses_values_it_would_wrap():
    """8 used to pack as -8 (and 1.5 as 1): a silent wrong weight after unpacking."""
    from jaxformers.quant.quantizers import pack_int4, unpack_int4
    ok = np.arange(-8, 8, dtype=np.int8)
    np.testing.assert_array_equal(np.asarray(unpack_int4(pack_int4(ok))), ok)
    for bad in (np.array([7, 8], np.int32), np.array([-9, 0], np.int32)):
        with pytest.raises(ValueError, match=r"pack_int4 needs values in \[-8, 7\]"):
            pack_int4(bad)
    with pytest.raises(ValueError, match="non-integral"):
        pack_int4(np.array([1.5, 0.0], np.float32))
    with pytest.raises(ValueError, match="even last axis"):
        pack_int4(np.int8(3))
