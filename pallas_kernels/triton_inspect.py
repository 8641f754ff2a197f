"""See what the Pallas kernels become on an NVIDIA GPU, without a GPU.

Pallas' Triton lowering runs at MLIR-lowering time, so a CPU-only jaxlib can
lower any jitted function *for CUDA* and hand back every kernel launch with its
Triton IR (:func:`triton_calls`).  The ``triton`` package (pure wheel, no GPU
needed: ``pip install triton==3.6.0``) can then compile that IR for Hopper
(``sm_90``; also Ampere ``sm_80`` and Ada / GA10x ``sm_89`` / ``sm_86``: :data:`GPU_LIMITS`) and
report what decides a kernel's speed and whether it runs at all
(:func:`compile_report`): registers per thread, spills (local memory), shared
memory per block, the tensor-core instruction its dots became (``wgmma`` on
Hopper vs the older ``mma.sync``) and the resulting occupancy bound.

Caveat: on a real GPU, XLA compiles the same IR with the Triton it was built
with, not the pip one; the report is a close proxy (same IR, same passes
upstream), not the binary that will run.  Speed still needs the GPU.

    calls = triton_calls(lambda q, k, v: flash_attention(q, k, v), q, k, v)
    [compile_report(c) for c in calls]

Both use jax internals (the lowered module's custom-call attributes and jaxlib's
Triton dialect bindings); a jax version that moved them raises a
:class:`SetupError` (a ``RuntimeError``) saying so, as does a missing ``triton`` package.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile

import jax

TRITON_TARGET = "__gpu$xla.gpu.triton"
_WARP = 32


class SetupError(RuntimeError):
    """This environment cannot lower or compile any kernel (no ``triton``, a jax that moved the
    internals used here, an unreadable ``cuobjdump``): not one kernel's problem."""


@dataclasses.dataclass(frozen=True)
class GpuLimits:
    """Per-SM limits of one CUDA compute capability (CUDA C Programming Guide, "Technical
    Specifications per Compute Capability") and a device of it to lower the kernels for."""

    device_kind: str        # what jax's Pallas lowering reads the compute capability from
    num_sms: int
    shared_per_block: int   # opt-in maximum dynamic shared memory per block
    shared_per_sm: int
    max_warps_per_sm: int
    max_ctas_per_sm: int
    regs_per_sm: int = 65536
    reserved_shared_per_block: int = 1024  # the system's share of each block (sm_80 and later)


GPU_LIMITS = {
    80: GpuLimits("NVIDIA A100-SXM4-80GB", 108, 163 * 1024, 164 * 1024, 64, 32),
    86: GpuLimits("NVIDIA A10", 72, 99 * 1024, 100 * 1024, 48, 16),
    89: GpuLimits("NVIDIA L4", 58, 99 * 1024, 100 * 1024, 48, 24),
    90: GpuLimits("NVIDIA H100 80GB HBM3", 132, 227 * 1024, 228 * 1024, 64, 32),  # also H200
}
H100_SHARED_PER_BLOCK = GPU_LIMITS[90].shared_per_block
H100_SHARED_PER_SM = GPU_LIMITS[90].shared_per_sm
H100_REGS_PER_SM = GPU_LIMITS[90].regs_per_sm
# The GPU the kernels are lowered for by default (jax >= 0.12 needs one named when none is present).
TARGET_DEVICE_KIND = GPU_LIMITS[90].device_kind
TARGET_NUM_SMS = GPU_LIMITS[90].num_sms


def gpu_limits(arch: int) -> GpuLimits:
    """The limits of ``sm_{arch}``; ``ValueError`` naming the supported ones otherwise."""
    if isinstance(arch, bool) or arch not in GPU_LIMITS:
        raise ValueError(f"arch must be one of {sorted(GPU_LIMITS)} (CUDA compute capability x10), got {arch!r}")
    return GPU_LIMITS[arch]


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: int = 90) -> int:
    """Resident CTAs per SM of a kernel (an upper bound): the least of what its registers
    (allocated per warp in units of 256), its shared memory (plus the reserved 1 KiB per block),
    its warps and the CTA limit allow."""
    lim = gpu_limits(arch)
    regs_per_warp = -(-registers * _WARP // 256) * 256
    by_regs = lim.regs_per_sm // (regs_per_warp * num_warps) if registers else lim.max_ctas_per_sm
    by_smem = lim.shared_per_sm // (shared_bytes + lim.reserved_shared_per_block) if shared_bytes \
        else lim.max_ctas_per_sm
    by_warps = lim.max_warps_per_sm // num_warps
    return max(0, min(by_regs, by_smem, by_warps, lim.max_ctas_per_sm))


@dataclasses.dataclass(frozen=True)
class TritonCall:
    """One Pallas kernel launch as XLA would run it on the GPU."""

    name: str
    grid: tuple
    num_warps: int
    num_stages: int
    ttir: str  # Triton IR (text)


def _target_gpu(arch: int = 90):
    """A context naming the GPU we lower for (a device of ``sm_{arch}``), where this jax needs one.

    Newer jax (0.12) asks the device for its compute capability while lowering
    Pallas to Triton and, with no GPU present, needs an abstract GPU device in
    the abstract-mesh context ("No supported GPU devices found, please specify
    an abstract GPU device using AbstractDevice").  An empty mesh (no axes)
    carries the device without changing how anything is sharded.  Older jax
    (0.10) ignores the context; one without ``AbstractDevice`` gets none.
    """
    sharding = jax.sharding
    if not hasattr(sharding, "AbstractDevice") or not hasattr(sharding, "use_abstract_mesh"):
        return contextlib.nullcontext()  # pragma: no cover - jax < 0.10
    lim = gpu_limits(arch)
    device = sharding.AbstractDevice(device_kind=lim.device_kind, num_cores=lim.num_sms, platform="gpu")
    return sharding.use_abstract_mesh(sharding.AbstractMesh((), (), abstract_device=device))


def _lower_for_cuda(fn, *args, arch: int = 90):
    try:
        with _target_gpu(arch):
            traced = jax.jit(fn).trace(*args)
            return traced.lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    except TypeError as e:  # pragma: no cover - jax without cross-platform lowering
        raise SetupError(f"this jax ({jax.__version__}) cannot lower for CUDA here: {e}") from e


def _walk(op):
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield child.operation
                yield from _walk(child.operation)


def _ttir_text(ir_bytes: bytes) -> str:
    """jaxlib's serialized Triton module (MLIR bytecode) -> textual IR."""
    try:
        from jax._src.interpreters import mlir as jax_mlir
        from jax._src.lib import triton as jaxlib_triton
        from jax._src.lib.mlir import ir
    except ImportError as e:  # pragma: no cover - depends on jaxlib
        raise SetupError(f"jaxlib has no Triton dialect bindings: {e}") from e
    ctx = jax_mlir.make_ir_context()
    jaxlib_triton.dialect.register_dialect(ctx)
    with ctx:
        module = ir.Module.parse(ir_bytes)
        return module.operation.get_asm(enable_debug_info=False)


def triton_calls(fn, *args, arch: int = 90) -> list:
    """Every Pallas->Triton launch in ``jax.jit(fn)(*args)`` lowered for CUDA (for a device of
    ``sm_{arch}`` where this jax asks for one; jax 0.10 lowers the same IR for every arch).

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s.  Kernels must be built
    with ``interpret=False`` (the default resolves to interpret mode on a CPU
    backend, which lowers to plain XLA loops instead).
    """
    from jax._src.lib.mlir import ir

    module = _lower_for_cuda(fn, *args, arch=arch)
    calls = []
    for op in _walk(module.operation):
        if op.name != "stablehlo.custom_call":
            continue
        if ir.StringAttr(op.attributes["call_target_name"]).value != TRITON_TARGET:
            continue
        if "mhlo.backend_config" not in op.attributes:  # pragma: no cover - jax moved it
            raise SetupError("Triton custom call without mhlo.backend_config; this jax moved it")
        cfg = {a.name: a.attr for a in ir.DictAttr(op.attributes["mhlo.backend_config"])}
        ival = lambda key: ir.IntegerAttr(cfg[key]).value  # noqa: E731
        calls.append(TritonCall(
            name=ir.StringAttr(cfg["name"]).value,
            grid=(ival("grid_x"), ival("grid_y"), ival("grid_z")),
            num_warps=ival("num_warps"), num_stages=ival("num_stages"),
            ttir=_ttir_text(ir.StringAttr(cfg["ir"]).value_bytes)))
    return calls


def _resource_usage(cuobjdump: str, cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:  # pragma: no cover - cuobjdump format changed
        raise SetupError(f"cannot parse cuobjdump -res-usage output:\n{out}")
    regs, stack, shared, local = map(int, m.groups())
    return dict(registers=regs, stack_bytes=stack, static_shared_bytes=shared, local_bytes=local)


def compile_report(call: TritonCall, arch: int = 90) -> dict:
    """Compile ``call`` for ``sm_{arch}`` with the ``triton`` package; resources.

    Returns a dict: ``registers`` (per thread), ``local_bytes`` / ``stack_bytes``
    (non-zero = register spills), ``shared_bytes`` (dynamic shared memory per
    block), ``fits`` (shared memory within the arch's per-block limit, :data:`GPU_LIMITS`),
    ``wgmma`` / ``mma_sync`` (tensor-core instruction counts in the PTX; ``wgmma`` exists on
    sm_90 only), ``ctas_per_sm`` (:func:`occupancy`: the bound from registers, shared memory
    and warps) plus the launch parameters.
    """
    lim = gpu_limits(arch)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        raise SetupError("compile_report needs the `triton` package: pip install triton==3.6.0") from e
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{call.name}.ttir")
        with open(path, "w") as f:
            f.write(call.ttir)
        kernel = triton.compile(path, target=GPUTarget("cuda", arch, _WARP),
                                options=dict(num_warps=call.num_warps, num_stages=call.num_stages))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = _resource_usage(cuobjdump, kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    shared = int(kernel.metadata.shared)
    threads = call.num_warps * _WARP
    return dict(
        name=call.name, grid=list(call.grid), num_warps=call.num_warps, num_stages=call.num_stages,
        threads=threads, shared_bytes=shared, fits=shared <= lim.shared_per_block,
        wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
        ctas_per_sm=occupancy(usage["registers"], shared, call.num_warps, arch),
        triton_version=triton.__version__,
        arch=f"sm_{arch}", **usage)
