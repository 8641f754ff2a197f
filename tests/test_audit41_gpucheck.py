"""Audit 41 of the GPU check (experiments/gpu_check.py): the anchors only a GPU runs, which the
CPU smoke run (``--smoke``) records as skipped.  Each is lowered *for CUDA* on this CPU, so a
changed jax API (an argument name of ``jax.nn.dot_product_attention``'s cuDNN path, of JAX's
Pallas ``mha``) or a wrong translation of our window to cuDNN's fails here, not in the one
device run.  jax's cuDNN path asks the installed cuDNN for its version while lowering; the CPU
has none, so the fixture answers for the device's (cuDNN 9, Hopper)."""
import re
import warnings

import jax
import jax.numpy as jnp
import pytest

from experiments import gpu_check as gc
from pallas_kernels import triton_inspect as ti

S = jax.ShapeDtypeStruct
B, T, H, D = 1, 128, 2, 64


@pytest.fixture
def cudnn_on_hopper(monkeypatch):
    fas = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    names = ("check_cudnn_version", "check_compute_capability", "is_cuda_compute_capability_equal")
    if not all(hasattr(fas, n) for n in names):
        pytest.skip("this jax moved its cuDNN version checks")
    monkeypatch.setattr(fas, "check_cudnn_version", lambda: 91400)
    monkeypatch.setattr(fas, "check_compute_capability", lambda cap: tuple(map(int, cap.split("."))) <= (9, 0))
    monkeypatch.setattr(fas, "is_cuda_compute_capability_equal", lambda cap: cap == "9.0")


def _cuda_ir(fn, *args) -> str:
    with ti._target_gpu(90):
        return str(jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo"))


def _cudnn_calls(ir: str):
    """``[(custom call target, {backend config key: value})]`` of the cuDNN attention calls."""
    out = []
    for line in ir.splitlines():
        m = re.search(r"custom_call @(__cudnn\$fmha\w*)\(", line)
        if m:
            cfg = dict(re.findall(r'\\22(mask_type|sliding_window_length)\\22: (?:\\22)?(\w+)', line))
            out.append((m.group(1), cfg))
    return out


def _qkv(dtype=jnp.bfloat16):
    return (S((B, T, H, D), dtype),) * 3


@pytest.mark.parametrize("window", [None, 16])
def test_cudnn_anchor_lowers_with_our_window(cudnn_on_hopper, window):
    """Causal cuDNN (fwd and fwd+bwd), with our window ``w`` (query i sees keys i-w < j <= i)
    passed as cuDNN's sliding window of ``w`` keys."""
    fwd, fwd_bwd = gc.fwd_and_fwd_bwd(gc.attention_fns("cudnn", D, window=window), 3)
    calls = _cudnn_calls(_cuda_ir(fwd_bwd, *_qkv(), None, S((B, T, H, D), jnp.bfloat16)))
    assert [c[0] for c in calls] == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"], calls
    for _, cfg in calls:
        assert cfg.get("mask_type") == "CAUSAL"
        assert cfg.get("sliding_window_length", "0") == str(window or 0), cfg
    assert _cudnn_calls(_cuda_ir(fwd, *_qkv(), None))


def test_cudnn_anchor_of_packed_segments_takes_the_mask_as_a_bias(cudnn_on_hopper):
    """Packed segments: cuDNN gets the explicit ``[B, 1, T, T]`` mask (as an additive bias, no
    causal flag of its own: the mask holds it)."""
    fwd, fwd_bwd = gc.fwd_and_fwd_bwd(gc.attention_fns("cudnn", D, masked=True), 3)
    mask = S((B, 1, T, T), jnp.bool_)
    calls = _cudnn_calls(_cuda_ir(fwd_bwd, *_qkv(), mask, S((B, T, H, D), jnp.bfloat16)))
    assert len(calls) == 2 and all("Bias" in name for name, _ in calls), calls
    assert all(cfg.get("mask_type") in (None, "NO_MASK") for _, cfg in calls), calls


def test_jax_pallas_mha_anchor_lowers_to_triton():
    """JAX's bundled Pallas ``mha`` (the flash target's anchor): forward and backward kernels.
    jax 0.11 deprecates the module (a DeprecationWarning on import, which this suite's filters
    would turn into an error and so into "not importable"); the device run only prints it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fn = gc.attention_fns("jax_pallas", D)
    if fn is None:
        pytest.skip("this jax has no jax.experimental.pallas.ops.gpu.attention")
    _, fwd_bwd = gc.fwd_and_fwd_bwd(fn, 3)
    names = {c.name for c in ti.triton_calls(fwd_bwd, *_qkv(), None, S((B, T, H, D), jnp.bfloat16))}
    assert {"mha_forward", "mha_backward"} <= names, names
