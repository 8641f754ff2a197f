"""Compile every Pallas GPU kernel for an NVIDIA GPU (default Hopper sm_90) on the CPU and report its resources.

    python -m experiments.kernel_report [--preset quick|full] [--arch 80|86|89|90] [--out DIR]

No GPU needed: each kernel is lowered for CUDA by this jaxlib (Pallas' Triton
lowering) and compiled by the ``triton`` package (``pip install triton==3.6.0``,
in the ``test`` extra).  For the issues' benchmark shapes and a sweep of tile
configurations it reports, per kernel: registers per thread, spills (stack /
local bytes), dynamic shared memory per block (sm_90 limit 227 KiB), tensor-core
instructions (``wgmma`` = Hopper warpgroup MMA, ``mma.sync`` = the older warp
MMA, neither = CUDA cores) and the occupancy bound (CTAs per SM).  This tells
which configurations *can* run fast and which spill or cannot launch at all; it
does not time anything (``bench_attention`` / ``bench_scan`` do, on a GPU).

Every row has two TPU columns beside the sm_90 ones: ``tpu_lowers`` (the same
gradient exported with ``jax.export(..., platforms=("tpu",))``: Pallas' Mosaic TPU
lowering succeeds, ``tpu_error`` otherwise) and ``tpu_vmem_bytes`` (VMEM per grid
step that kernel's TPU block specs imply, double-buffered; from the kernel
package's ``tpu_vmem_bytes``).  The TPU variants round tiles up to what Mosaic
wants (128-row sequence tiles, 128-lane head / state dims), so their tiles can
differ from the GPU configuration in the row's label.

The pip Triton is not the Triton inside XLA that compiles these kernels on a
GPU, so treat the numbers as a close proxy.  ``quick`` = the default tiles only;
``full`` adds the sweep.  Writes ``DIR/results.json`` (one row per kernel and
configuration; rewritten atomically after every configuration with ``"complete": false``,
so an interrupted sweep keeps its rows; ``no_triton_calls``: the configurations whose lowering
had no Triton call, so no row; ``errors``: the configurations whose lowering or compile raised,
after which the sweep goes on and the command exits non-zero; ``launches``: how many identical
launches of the kernel the row stands for) and ``DIR/kernel_report.png``.  ``--arch`` (default
90: H100 / H200) is one of 80 (A100), 86 (A10 / RTX 30xx), 89 (L4 / L40 / RTX 40xx), 90: the
kernels are lowered for a device of that compute capability and compiled for it, and the
``fits`` / ``ctas_per_sm`` columns use its limits (``triton_inspect.GPU_LIMITS``: shared memory
per block 163 KiB on sm_80, 99 KiB on sm_86 / sm_89, 227 KiB on sm_90).  The kernels' default
tiles are chosen for sm_90; on the smaller parts a ``fits: false`` row names a tile to shrink.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import flash_attention as fa, selective_scan as ss, sparse_attention as sa, ssd as ssd_pkg
from pallas_kernels import landmark_attention as la
from pallas_kernels import hadamard as hd
from pallas_kernels.flash_attention import BlockSizes, flash_attention
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.sparse_attention import hash_attention, qk_sparse_attention
from pallas_kernels.ssd import ssd
from pallas_kernels.triton_inspect import GPU_LIMITS, SetupError, compile_report, gpu_limits, triton_calls
from experiments.common import check_out, environment, parse_list, start_results, write_json, write_results

#: the PNGs this experiment draws (an earlier invocation's: moved aside by ``start_results``)
PLOTS = ("kernel_report.png",)

S = jax.ShapeDtypeStruct
bf16, f32 = jnp.bfloat16, jnp.float32
PRESETS = ("quick", "full")


def _grads(fn, n):
    # value and gradients: the value keeps every forward kernel in the program (jax >= 0.12
    # drops a kernel whose outputs only an unused primal needs, e.g. the scans' forward)
    return jax.value_and_grad(lambda *a: fn(*a).astype(f32).sum(), argnums=tuple(range(n)))


# --------------------------------------------------------------------------- cases
class Case(NamedTuple):
    """One kernel configuration: the gradient to lower, its abstract args, and the VMEM per
    TPU kernel (``{kernel name: bytes}``) its TPU block specs imply."""

    fn: Callable
    args: tuple
    tpu_vmem: Callable[[], dict]


def tpu_columns(case: Case) -> dict:
    """``{kernel name: {"tpu_lowers", "tpu_error", "tpu_vmem_bytes"}}``: the case's gradient
    exported for TPU (Pallas' Mosaic lowering on this CPU) and the VMEM of each TPU kernel."""
    try:
        jax.export.export(jax.jit(case.fn), platforms=("tpu",))(*case.args)
        ok, err = True, None
    except Exception as e:  # noqa: BLE001 - reported, not raised
        ok, err = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return {name: {"tpu_lowers": ok, "tpu_error": err, "tpu_vmem_bytes": int(b)}
            for name, b in case.tpu_vmem().items()}


def tpu_attention_columns(d: int, bs: BlockSizes | None, t: int = 4096, heads: int = 16) -> dict:
    """:func:`tpu_columns` of :func:`attention_case`."""
    return tpu_columns(attention_case(d, bs, t, heads))


def attention_case(d: int, bs: BlockSizes | None, t: int = 4096, heads: int = 16):
    """bf16 causal attention, B*T = t, fwd + bwd kernels."""
    q = S((1, t, heads, d), bf16)
    fn = lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=bs, interpret=False)  # noqa: E731
    return Case(_grads(fn, 3), (q, q, q),
                lambda: fa.tpu_vmem_bytes(q.shape, q.shape, q.dtype, block_sizes=bs))


def attention_candidates(d: int, full: bool):
    default = BlockSizes.get_default(d)
    cands = {"default": default}
    if full:
        for bq, bk, w, st in ((128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 2),
                              (64, 64, 4, 2), (64, 32, 4, 2)):
            cands[f"fwd {bq}x{bk} w{w} s{st}"] = dataclasses.replace(
                default, block_q=bq, block_k=bk, num_warps=w, num_stages=st)
        for dq, dkv, w in (((64, 64), (64, 64), 8), ((128, 32), (32, 128), 8),
                           ((64, 32), (32, 64), 4), ((64, 64), (64, 64), 4),
                           ((128, 64), (64, 128), 8)):
            cands[f"bwd dq{dq[0]}x{dq[1]} dkv{dkv[0]}x{dkv[1]} w{w}"] = dataclasses.replace(
                default, block_q_dq=dq[0], block_k_dq=dq[1], block_q_dkv=dkv[0], block_k_dkv=dkv[1],
                num_warps_bwd=w)
    return cands


def scan_case(block_d=None, chunk_size=None):
    """selective_scan at B=4, L=4096, dim=2048, N=16 (bf16, softplus, D, z, bias)."""
    b, l, dim, n = 4, 4096, 2048, 16
    args = (S((b, l, dim), bf16), S((b, l, dim), bf16), S((dim, n), f32), S((b, l, n), bf16),
            S((b, l, n), bf16), S((dim,), f32), S((dim,), f32), S((b, l, dim), bf16))

    def fn(x, dt, A, B, C, D, bias, z):
        return selective_scan(x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True,
                              interpret=False, block_d=block_d, chunk_size=chunk_size)
    # the TPU variant's channel block is 128 lanes whatever the GPU's block_d
    return Case(_grads(fn, len(args)), args, lambda: ss.tpu_vmem_bytes(
        b, l, dim, n, dtype=bf16, z=True, chunk_size=chunk_size or 64))


def ssd_case(chunk_size=64, block_p=None, dtype=bf16):
    """ssd at B=4, L=4096, H=16, P=128, N=128, G=1."""
    b, l, h, p, g, n = 4, 4096, 16, 128, 1, 128
    args = (S((b, l, h, p), dtype), S((b, l, h), dtype), S((h,), f32), S((b, l, g, n), dtype),
            S((b, l, g, n), dtype))

    def fn(x, dt, A, B, C):
        return ssd(x, dt, A, B, C, chunk_size=chunk_size, block_p=block_p, dt_softplus=True,
                   interpret=False)
    return Case(_grads(fn, len(args)), args, lambda: ssd_pkg.tpu_vmem_bytes(
        args[0].shape, args[3].shape, dtype, chunk_size=chunk_size))


def sparse_case(kind: str, d: int = 64, t: int = 4096, heads: int = 16, buckets: int = 16,
                keep: float = 0.5):
    """Sparse causal flash attention (SCFA), bf16, fwd + bwd kernels: ``kind="hash"``
    (``buckets`` uniform buckets) or ``"qk"`` (keep rate ``keep``; the masks are data, so
    the compiled kernels do not depend on the rate)."""
    q = S((1, t, heads, d), bf16)
    ids = S((1, t, heads), jnp.int32 if kind == "hash" else jnp.bool_)
    op = hash_attention if kind == "hash" else qk_sparse_attention

    def fn(q, k, v, qi, ki):
        return op(q, k, v, qi, ki, interpret=False)
    return Case(_grads(fn, 3), (q, q, q, ids, ids), lambda: sa.tpu_vmem_bytes(q.shape, q.shape, bf16))


def landmark_case(d: int = 64, t: int = 4096, heads: int = 16, block_size: int = 64):
    """Landmark (grouped-softmax) attention, bf16, fwd + bwd kernels (``block_size`` tokens
    per block incl. the landmark; 64 = the paper's 63 + 1 without padding)."""
    q = S((1, t, heads, d), bf16)

    def fn(q, k, v):
        return la.landmark_attention(q, k, v, block_size=block_size, interpret=False)
    return Case(_grads(fn, 3), (q, q, q),
                lambda: la.tpu_vmem_bytes(q.shape, q.shape, bf16, block_size=block_size))


def hadamard_case(n: int = 128, rows: int = 4096 * 8, dtype=bf16):
    """Fast Walsh-Hadamard transform of ``rows`` vectors of size ``n`` (fwd + the VJP, which is
    the same kernel); QuaRot's online transforms (head dim 128, MLP 2^k part)."""
    x = S((rows, n), dtype)
    fn = lambda x: hd.hadamard_transform(x, interpret=False)  # noqa: E731
    return Case(_grads(fn, 1), (x,), lambda: hd.tpu_vmem_bytes(n, dtype, rows))


FAMILIES = ("attention", "selective_scan", "ssd", "sparse_attention", "landmark_attention", "hadamard")


def cases(preset: str, families=FAMILIES):
    """``(family, config label, thunk -> Case)`` for the preset."""
    full = preset == "full"
    out = []
    for d in (128, 64, 256):
        for label, bs in attention_candidates(d, full).items():
            out.append((f"attention D{d}", label, functools.partial(attention_case, d, bs)))
    out.append(("selective_scan", "default", scan_case))
    if full:
        for bd in (16, 64):
            out.append(("selective_scan", f"block_d {bd}", lambda bd=bd: scan_case(block_d=bd)))
    out.append(("ssd", "default (chunk 64)", ssd_case))
    if full:
        for q, bp in ((32, 64), (64, 128), (128, 64), (256, 64)):
            out.append(("ssd", f"chunk {q} block_p {bp}",
                        lambda q=q, bp=bp: ssd_case(chunk_size=q, block_p=bp)))
        out.append(("ssd", "default, float32 inputs", lambda: ssd_case(dtype=f32)))
    for d in (64, 128):
        out.append(("sparse_attention", f"hash 16 buckets D{d}", functools.partial(sparse_case, "hash", d)))
        out.append(("sparse_attention", f"qk keep 0.5 D{d}", functools.partial(sparse_case, "qk", d)))
    for d in (64, 128):
        out.append(("landmark_attention", f"block 64 D{d}", functools.partial(landmark_case, d)))
    out.append(("landmark_attention", "block 51 (50 + landmark) D128",
                functools.partial(landmark_case, 128, block_size=51)))
    for n in (128, 1024, 8192) if full else (128,):  # 8192: split into H_4 (x) H_2048
        label = f"default (n {n} bf16)" if n == 128 else f"n {n} bf16"
        out.append(("hadamard", label, functools.partial(hadamard_case, n)))
    return [c for c in out if c[0].split()[0] in families]


# --------------------------------------------------------------------------- report
def run(preset: str, arch: int, families=FAMILIES, progress=None, missing=None, errors=None):
    """The report's rows; ``progress(rows)`` is called after every configuration; ``missing``
    (a list) gets ``{"family", "config"}`` of each configuration whose lowering has no Triton
    call (so no row).  ``errors`` (a list): a configuration whose CUDA lowering, or a kernel whose
    compile, raises is recorded there (``{"family", "config", "kernel", "stage", "error"}``) and
    the sweep goes on; without it, and for a broken setup (``triton_inspect.SetupError``, a
    missing ``cuobjdump``) that every configuration would repeat, the exception propagates.
    A kernel launched several times with the same Triton IR and launch parameters (the Hadamard
    transform's forward and gradient) gives one row, with ``launches`` the number of launches."""
    rows = []

    def failed(family, label, kernel, stage, e):
        if errors is None or isinstance(e, (SetupError, FileNotFoundError)):  # the setup: stop at once
            raise e
        msg = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        errors.append({"family": family, "config": label, "kernel": kernel, "stage": stage, "error": msg})
        print(f"{family:16s} {label:34s} {kernel or '':26s} {stage.upper()} FAILED: {msg}", flush=True)

    for family, label, thunk in cases(preset, families):
        case = thunk()
        fn, args = case.fn, case.args
        tpu = tpu_columns(case)
        limit_kib = gpu_limits(arch).shared_per_block // 1024
        try:
            calls = triton_calls(fn, *args, arch=arch)
        except Exception as e:  # noqa: BLE001 - recorded in errors, the sweep goes on
            failed(family, label, None, "lower", e)
            calls = None
        if calls is not None and not calls:
            print(f"{family:16s} {label:34s} NO TRITON CALLS in its lowering (no row)", flush=True)
            if missing is not None:
                missing.append({"family": family, "config": label})
        calls = calls or []
        unique = [c for i, c in enumerate(calls) if c not in calls[:i]]  # identical launches: one row
        for call, n in ((c, calls.count(c)) for c in unique):
            t0 = time.perf_counter()
            try:
                r = compile_report(call, arch=arch)
            except Exception as e:  # noqa: BLE001 - recorded in errors, the sweep goes on
                failed(family, label, call.name, "compile", e)
                continue
            r.update(family=family, config=label, launches=n, compile_s=round(time.perf_counter() - t0, 2),
                     spills=r["stack_bytes"] > 0 or r["local_bytes"] > 0)
            r.update(tpu.get(r["name"], {}))
            rows.append(r)
            print(f"{family:16s} {label:34s} {r['name']:26s} warps {r['num_warps']} "
                  f"regs {r['registers']:3d} spill {r['stack_bytes'] + r['local_bytes']:5d}B "
                  f"smem {r['shared_bytes'] // 1024:4d}KiB{'' if r['fits'] else f' (>{limit_kib}!)'} "
                  f"wgmma {r['wgmma']:3d} mma.sync {r['mma_sync']:3d} ctas/SM {r['ctas_per_sm']}"
                  + (f" x{n} launches" if n > 1 else "")
                  + (f" | tpu {'lowers' if r['tpu_lowers'] else 'FAILS'} "
                     f"vmem {r['tpu_vmem_bytes'] / 2**20:.1f}MiB" if "tpu_lowers" in r else ""),
                  flush=True)
        if progress is not None:
            progress(rows)
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:  # every configuration without a Triton call: say so instead of plotting nothing
        fig, ax = plt.subplots(figsize=(8, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no kernel rows: no configuration lowered to a Triton call", ha="center", va="center")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        print(f"kernel_report: no rows to plot ({path} says so)", file=sys.stderr, flush=True)
        return
    # the default tiles; a family without a "default ..." configuration (sparse / landmark attention:
    # their configurations are shapes at the default tiles) is shown whole, not left out
    with_default = {r["family"] for r in rows if r["config"].startswith("default")}
    default = [r for r in rows if r["config"].startswith("default") or r["family"] not in with_default]
    labels = [f"{r['family']}\n{r['name']}" + ("" if r["config"] == "default" else f"\n{r['config']}")
              for r in default]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(default)), 5.5))
    x = range(len(default))
    colors = ["tab:red" if r["spills"] or not r["fits"] else "tab:blue" for r in default]
    axes[0].bar(x, [r["registers"] for r in default], color=colors)
    axes[0].axhline(255, color="k", ls="--", lw=0.8)
    axes[0].set_ylabel("registers / thread (red: spills or no fit)")
    axes[1].bar(x, [r["shared_bytes"] / 1024 for r in default], color=colors)
    axes[1].axhline(gpu_limits(int(rows[0]["arch"][3:])).shared_per_block / 1024, color="k", ls="--", lw=0.8)
    axes[1].set_ylabel("shared memory / block (KiB)")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
    fig.suptitle(f"Pallas kernels compiled for {rows[0]['arch']} (triton {rows[0]['triton_version']}), "
                 "default tiles")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.kernel_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", choices=PRESETS)
    ap.add_argument("--out", default="runs/kernel_report")
    ap.add_argument("--arch", type=int, default=90, choices=sorted(GPU_LIMITS),
                    help="CUDA compute capability x10 (80 A100, 86 A10, 89 L4, 90 H100/H200): the "
                         "lowering and compile target and the limits of the fits / ctas_per_sm columns")
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"comma list from {list(FAMILIES)}")
    args = ap.parse_args(argv)
    check_out(ap, args.out)
    families = tuple(parse_list(ap, "--families", args.families, allowed=list(FAMILIES), unique=True))
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        ap.error("needs the `triton` package (no GPU needed): pip install triton==3.6.0")
    fields = dict(command="python -m experiments.kernel_report " + " ".join(
                      argv if argv is not None else sys.argv[1:]),
                  preset=args.preset, arch=f"sm_{args.arch}", families=list(families),
                  note="compiled on the CPU with the pip triton; resources only, no timing")
    os.makedirs(args.out, exist_ok=True)
    start_results(args.out, PLOTS)  # an earlier run's results.json: not this run's until it saves its own
    path = os.path.join(args.out, "results.json")
    env = environment()
    missing = []  # configurations whose lowering has no Triton call (no row): recorded, not dropped
    errors = []  # lowerings / compiles that raised: recorded, and the sweep goes on
    rows = run(args.preset, args.arch, families, missing=missing, errors=errors,
               progress=lambda rows: write_json(path, {**env, **fields, "rows": rows, "no_triton_calls": missing,
                                                      "errors": errors, "complete": False}))
    plot(rows, os.path.join(args.out, "kernel_report.png"))
    write_results(args.out, **fields, rows=rows, no_triton_calls=missing, errors=errors, complete=True)
    if errors:
        sys.exit(f"{len(errors)} kernel configuration(s) failed to lower or compile: see {path} (errors)")


if __name__ == "__main__":
    main()
