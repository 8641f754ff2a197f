"""Regression tests of the synrope audit: synthetic tasks' argument checks, rotary argument
checks (and parity with transformers at large positions), the cotformer experiment's
progress writes, kernel_report's progress writes and ``--arch``."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.data import synthetic


# ----------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("call, name", [
    (lambda: synthetic.passkey(2, 150.7), "length"),               # was read as 150
    (lambda: synthetic.passkey(2.9, 150), "n"),                    # was read as 2
    (lambda: synthetic.passkey(2, 150, n_digits=True), "n_digits"),  # was 1 digit
    (lambda: synthetic.passkey(2, 150, seed=-1), "seed"),          # numpy's error, no name
    (lambda: synthetic.copying(2, 10.5, 8), "seq_len"),
    (lambda: synthetic.copying(2, 10, 8, seed=1.5), "seed"),
    (lambda: synthetic.copying(2, 10, 2 ** 40), "vocab"),          # numpy "high is out of bounds"
    (lambda: synthetic.associative_recall(2, 3.5, 13), "n_pairs"),
    (lambda: synthetic.arithmetic(2, 2, worked_steps="no"), "worked_steps"),  # "no" was truthy
    (lambda: synthetic.arithmetic(2, 2, answer_only="yes"), "answer_only"),
    (lambda: synthetic.arithmetic_length(0), "n_digits"),          # returned 6
    (lambda: synthetic.arithmetic_length(-3), "n_digits"),         # returned -30
])
def test_synthetic_bad_arguments_raise_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


def test_synthetic_accepts_numpy_ints_and_01_flags():
    a = synthetic.arithmetic(np.int64(3), np.int32(2), 1, np.uint32(5), answer_only=np.bool_(True))
    b = synthetic.arithmetic(3, 2, True, 5, answer_only=True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert synthetic.arithmetic_length(np.int64(2), 0) == synthetic.arithmetic_length(2, False)


# ----------------------------------------------------------------------------- rotary
@pytest.mark.parametrize("call, name", [
    (lambda r: r.rotary_angles(jnp.arange(4), 8), "positions"),              # IndexError
    (lambda r: r.rotary_angles(jnp.arange(4)[None], 7), "head_dim"),          # split error later
    (lambda r: r.rotary_angles(jnp.arange(4)[None], 0), "head_dim"),          # empty, no error
    (lambda r: r.rotary_angles(jnp.arange(4)[None], 8, theta=-1.0), "theta"),  # NaN angles
    (lambda r: r.apply_rotary(jnp.ones((4, 2, 8)), *r.rotary_angles(jnp.arange(4)[None], 8)), "x"),
    (lambda r: r.apply_rotary(jnp.ones((1, 4, 2, 8)), *r.rotary_angles(jnp.arange(4)[None], 16)), "cos"),
])
def test_rotary_bad_arguments_raise_naming_the_argument(call, name):
    from jaxformers.layers import rotary
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call(rotary)


def test_rotary_matches_transformers_llama_at_large_positions():
    """Same float32 angles as HF ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb`` up to 1M
    (both differ from float64 by float32's rounding of ``p * w``, ~3e-3 at p = 100k)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    from jaxformers.layers.rotary import apply_rotary, rotary_angles

    d, theta = 64, 500000.0
    cfg = LlamaConfig(hidden_size=2 * d, num_attention_heads=2, head_dim=d, rope_theta=theta)
    pos = np.array([[0, 1, 7, 4095, 100_000, 1_000_000]])
    x = np.random.default_rng(0).standard_normal((1, pos.shape[1], 2, d)).astype(np.float32)
    xt = torch.tensor(x).transpose(1, 2)
    want, _ = apply_rotary_pos_emb(xt, xt, *LlamaRotaryEmbedding(cfg)(xt, torch.tensor(pos)))
    got = np.asarray(apply_rotary(jnp.asarray(x), *rotary_angles(jnp.asarray(pos), d, theta)))
    err = np.abs(got - want.transpose(1, 2).numpy()).max(axis=(0, 2, 3))
    assert err[:4].max() < 1e-3 and err.max() < 0.1, err


# ----------------------------------------------------------------------------- experiments
def test_cotformer_experiment_keeps_finished_models_when_stopped(tmp_path, monkeypatch):
    """A stop (a GPU stage's time limit) while training the 2nd model used to leave no
    results.json at all; now the finished model's row is there with ``complete: false``."""
    import experiments.cotformer as exp

    real = exp.reuse_or_train

    def stop_at_second(name, *a, **k):
        if name == "cotformer_L2x2":
            raise SystemExit("[cotformer] training of cotformer_L2x2 stopped (signal 15)")
        return real(name, *a, **k)

    monkeypatch.setattr(exp, "reuse_or_train", stop_at_second)
    out = tmp_path / "cot"
    with pytest.raises(SystemExit):
        exp.main(["--preset", "tiny", "--out", str(out), "--steps", "2", "--eval-batches", "1",
                  "--d-model", "32", "--seq-len", "16", "--batch-size", "2",
                  "--only", "gpt_L2,cotformer_L2x2", "--no-compile-cache"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is False and list(saved["models"]) == ["gpt_L2"]
    assert saved["models"]["gpt_L2"]["val_ppl"] > 1


def _fake_report(call, arch=90):
    return dict(name=call.name, num_warps=call.num_warps, registers=32, stack_bytes=0, local_bytes=0,
                shared_bytes=0, fits=True, wgmma=0, mma_sync=0, ctas_per_sm=8, arch=f"sm_{arch}",
                triton_version="fake")


def test_kernel_report_keeps_rows_when_interrupted(tmp_path, monkeypatch):
    """An interrupted sweep (Ctrl-C, a time limit) used to write nothing: results.json is now
    rewritten after every configuration (``complete: false``), ``complete: true`` at the end."""
    pytest.importorskip("triton")
    from experiments import kernel_report as kr

    small = [("hadamard", "a", lambda: kr.hadamard_case(128, rows=256)),
             ("hadamard", "b", lambda: kr.hadamard_case(128, rows=512))]
    monkeypatch.setattr(kr, "cases", lambda preset, families: small)
    seen = []

    def report(call, arch=90):
        seen.append(call.name)
        if len(seen) > 1:  # the second configuration is interrupted (one row a configuration: the
            # Hadamard gradient's launch of the forward kernel is the same row, ``launches: 2``)
            raise KeyboardInterrupt
        return _fake_report(call, arch)

    monkeypatch.setattr(kr, "compile_report", report)
    with pytest.raises(KeyboardInterrupt):
        kr.main(["--families", "hadamard", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is False and [r["config"] for r in saved["rows"]] == ["a"]
    assert saved["rows"][0]["launches"] == 2
    assert all(r["tpu_lowers"] for r in saved["rows"])

    monkeypatch.setattr(kr, "compile_report", _fake_report)
    kr.main(["--families", "hadamard", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is True and [r["config"] for r in saved["rows"]] == ["a", "b"]


def test_kernel_report_refuses_an_arch_whose_limits_it_does_not_know(tmp_path, monkeypatch, capsys):
    """``--arch 80`` once labelled rows sm_80 but judged ``fits`` / ``ctas_per_sm`` with the H100's
    limits; every accepted arch now has its own (``GPU_LIMITS``; tests/test_kernel_report.py), and
    an arch without limits is a usage error."""
    from experiments import kernel_report as kr

    monkeypatch.setattr(kr, "cases", lambda preset, families: [])
    with pytest.raises(SystemExit) as e:
        kr.main(["--arch", "70", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--arch" in capsys.readouterr().err
