"""The TPU (Mosaic) side of the Hadamard kernel, checked on the CPU: the forward and gradient
export for TPU (``interpret=False``), and the TPU variant runs in Pallas' TPU interpreter
(``interpret=pltpu.InterpretParams()``) against the dense float32 reference."""
import jax
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.hadamard import hadamard_reference, hadamard_transform, tpu_vmem_bytes

from test_gpu_lowering import HADAMARD_CASES, _grad_all, quarot_forward_case


def _export_tpu(fn, *args):
    return jax.export.export(jax.jit(fn), platforms=("tpu",))(*args).mlir_module()


@pytest.mark.parametrize("case", sorted(HADAMARD_CASES))
def test_hadamard_lowers_for_tpu(case):
    lead, n, dtype = HADAMARD_CASES[case]
    fn = lambda x: hadamard_transform(x, interpret=False)  # noqa: E731
    x = jax.ShapeDtypeStruct(lead + (n,), dtype)
    assert _export_tpu(fn, x).count("tpu_custom_call") == 1
    mod = _export_tpu(_grad_all(fn, 1), x)
    assert mod.count("tpu_custom_call") == 2 and "triton" not in mod
    assert tpu_vmem_bytes(n, dtype)["hadamard_transform"] < 16 * 2**20


@pytest.mark.parametrize("lead, n", [((3, 7), 256), ((5,), 352), ((2,), 8)])
def test_tpu_interpret_matches_reference(lead, n):
    x = jax.random.normal(jax.random.PRNGKey(0), lead + (n,))
    ct = jax.random.normal(jax.random.PRNGKey(1), lead + (n,))
    y, vjp = jax.vjp(lambda x: hadamard_transform(x, interpret=pltpu.InterpretParams()), x)
    want, vjp_ref = jax.vjp(hadamard_reference, x)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(vjp(ct)[0], vjp_ref(ct)[0], atol=2e-5, rtol=2e-5)


def test_quarot_model_exports_for_tpu(monkeypatch):
    monkeypatch.setattr("pallas_kernels.hadamard.kernel.resolve_interpret", lambda interpret: False)
    fwd, params, tokens = quarot_forward_case()
    mod = _export_tpu(fwd, params, tokens)
    assert mod.count("tpu_custom_call") == 8 and "triton" not in mod
