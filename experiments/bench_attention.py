"""Benchmark causal attention implementations: forward and forward+backward.

    python -m experiments.bench_attention [--out DIR] [--quick]

GPU default sweep: bf16, causal, H=16, D in {128, 64}, T in {1k .. 32k} with
B*T = 16k tokens, for this repo's Pallas kernel (``pallas``), cuDNN and XLA via
``jax.nn.dot_product_attention`` (``cudnn``, ``xla``) and JAX's bundled Pallas
kernel ``jax.experimental.pallas.ops.gpu.attention.mha`` (``jax_pallas``).
Reports median milliseconds and TFLOP/s, with causal FLOPs
``4*B*H*D*T*(T+1)/2`` (forward, the visible pairs) and 3.5x that (forward+backward: the backward's five matmuls,
``QK^T`` recomputed, ``dV``, ``dP``, ``dQ``, ``dK``, are 2.5x the forward's two; FlashAttention-2's
benchmark convention), and writes
``DIR/results.json`` (device, date, jax version, one row per measurement).

``--quick`` runs one tiny configuration (interpret mode on CPU) to prove the
script works; options given with it (``--seq-lens``, ``--iters``, ...) override its values.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import flash_attention
from experiments.common import check_counts, check_out, median_ms, parse_list, start_results, write_results

IMPLS = ("pallas", "cudnn", "xla", "jax_pallas")
XLA_MAX_LOGITS_BYTES = 24 * 2**30  # skip the materialising XLA path past this

#: the GPU sweep and ``--quick``'s tiny configuration; an option given on the command line
#: replaces the value of either
FULL = dict(head_dims=(128, 64), seq_lens=(1024, 2048, 4096, 8192, 16384, 32768), tokens=16384, heads=16,
            warmup=3, iters=10)
QUICK = dict(head_dims=(32,), seq_lens=(64,), tokens=128, heads=2, warmup=1, iters=2)


def _jax_pallas_mha():
    try:
        from jax.experimental.pallas.ops.gpu import attention as jpa
    except Exception:  # noqa: BLE001 - optional dependency of this jax build
        return None
    return jpa


def jax_pallas_attention(head_dim: int):
    """``fn(q, k, v)``: JAX's bundled Pallas ``mha`` (causal, default blocks), or None if this jax
    has none."""
    jpa = _jax_pallas_mha()
    if jpa is None:
        return None
    bs = jpa.BlockSizes.get_default() if hasattr(jpa, "BlockSizes") else None
    kw = {"block_sizes": bs} if bs is not None else {}
    return lambda q, k, v: jpa.mha(q, k, v, None, sm_scale=head_dim ** -0.5, causal=True, **kw)


def make_attention(impl: str, *, on_gpu: bool, head_dim: int, seq_len: int, batch: int, heads: int):
    """``(fn(q, k, v) -> o, None)`` or ``(None, reason)`` when ``impl`` cannot run here."""
    if impl == "pallas":
        return (lambda q, k, v: flash_attention(q, k, v, causal=True)), None
    if impl == "cudnn":
        if not on_gpu:
            return None, "cudnn needs a GPU"
        return (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")), None
    if impl == "xla":
        logits = batch * heads * seq_len * seq_len * 4
        if logits > XLA_MAX_LOGITS_BYTES:
            return None, f"xla materialises {logits / 2**30:.0f} GiB of logits"
        return (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="xla")), None
    if impl == "jax_pallas":
        fn = jax_pallas_attention(head_dim)
        if fn is None:
            return None, "jax.experimental.pallas.ops.gpu.attention not importable"
        if not on_gpu:
            return None, "only benchmarked on GPU"
        return fn, None
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


#: forward+backward FLOPs / forward FLOPs of attention: forward 2 matmuls (``QK^T``, ``PV``), backward
#: 5 (``QK^T`` recomputed, ``dV``, ``dP``, ``dQ``, ``dK``) = 2.5x the forward (FlashAttention-2's
#: benchmark: ``bwd = 2.5 * fwd``, ``fwd_bwd = 3.5 * fwd``)
FWD_BWD_FLOPS = 3.5


def causal_flops(batch, heads, seq_len, head_dim, mode):
    """Causal attention FLOPs over the visible (query, key) pairs, ``T (T + 1) / 2`` per row
    (as ``experiments.gpu_check.causal_pairs`` counts them): ``4*B*H*D*T*(T+1)/2`` for ``mode``
    "fwd", :data:`FWD_BWD_FLOPS` x that for "fwd+bwd"."""
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
    fwd = 4 * batch * heads * head_dim * (seq_len * (seq_len + 1) // 2)
    return fwd if mode == "fwd" else FWD_BWD_FLOPS * fwd


def bench_one(impl, *, batch, seq_len, heads, head_dim, dtype, on_gpu, warmup, iters, seed=0):
    fn, reason = make_attention(impl, on_gpu=on_gpu, head_dim=head_dim, seq_len=seq_len,
                                batch=batch, heads=heads)
    base = dict(impl=impl, batch=batch, seq_len=seq_len, heads=heads, head_dim=head_dim,
                dtype=jnp.dtype(dtype).name)
    if fn is None:
        return [dict(base, mode=m, ms=None, tflops=None, skipped=reason) for m in ("fwd", "fwd+bwd")]
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    shape = (batch, seq_len, heads, head_dim)
    q, k, v, do = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in ks)
    # Off GPU only the (interpreted) kernels' compile time matters: compile cheaply.
    jit_kw = {} if on_gpu else {"compiler_options": {"xla_backend_optimization_level": 0}}
    fwd = jax.jit(fn, **jit_kw)

    def _fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return o, vjp(do)

    fwd_bwd = jax.jit(_fwd_bwd, **jit_kw)

    rows = []
    for mode, f, args in (("fwd", fwd, (q, k, v)), ("fwd+bwd", fwd_bwd, (q, k, v, do))):
        row = dict(base, mode=mode)
        try:
            # compiled ahead of time: with --warmup 0 the first timed call would otherwise
            # measure tracing + compilation (~100x the run time of these shapes)
            ms = median_ms(f.lower(*args).compile(), args, warmup, iters)
            row.update(ms=ms, tflops=causal_flops(batch, heads, seq_len, head_dim, mode) / (ms * 1e9))
        except Exception as e:  # noqa: BLE001 - record OOM / unsupported and keep going
            row.update(ms=None, tflops=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        rows.append(row)
    return rows


def _print_header():
    print(f"{'impl':>11} {'D':>4} {'B':>3} {'T':>6} {'mode':>8} {'ms':>10} {'TFLOP/s':>8}  note")


def _print_rows(rows):
    for r in rows:
        ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
        tf = f"{r['tflops']:.1f}" if r.get("tflops") else "-"
        note = r.get("skipped") or r.get("error") or ""
        print(f"{r['impl']:>11} {r['head_dim']:>4} {r['batch']:>3} {r['seq_len']:>6} {r['mode']:>8} "
              f"{ms:>10} {tf:>8}  {note}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_attention",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_attention", help="folder for results.json")
    ap.add_argument("--quick", action="store_true",
                    help="one tiny config (CPU/interpret friendly); options given with it override "
                         "its values")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma list from {IMPLS}")
    ap.add_argument("--head-dims", help="comma list (default %s)" % ",".join(map(str, FULL["head_dims"])))
    ap.add_argument("--seq-lens", help="comma list (default %s)" % ",".join(map(str, FULL["seq_lens"])))
    ap.add_argument("--tokens", type=int,
                    help=f"B*T per config: B = max(1, tokens // T) (default {FULL['tokens']})")
    ap.add_argument("--heads", type=int, help=f"default {FULL['heads']}")
    ap.add_argument("--warmup", type=int, help=f"default {FULL['warmup']}")
    ap.add_argument("--iters", type=int, help=f"default {FULL['iters']}")
    args = ap.parse_args(argv)
    check_out(ap, args.out)
    check_counts(ap, args)
    impls = parse_list(ap, "--impls", args.impls, allowed=IMPLS, unique=True)
    cfg = dict(QUICK if args.quick else FULL)
    for name in ("head_dims", "seq_lens"):
        flag = "--" + name.replace("_", "-")
        values = parse_list(ap, flag, getattr(args, name), cast=int, lo=1, unique=True)
        if values is not None:
            cfg[name] = tuple(values)
    for name in ("tokens", "heads", "warmup", "iters"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)

    on_gpu = jax.default_backend() == "gpu"
    head_dims, seq_lens, tokens, heads = cfg["head_dims"], cfg["seq_lens"], cfg["tokens"], cfg["heads"]
    warmup, iters = cfg["warmup"], cfg["iters"]
    dtype = jnp.bfloat16 if on_gpu or not args.quick else jnp.float32

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    start_results(args.out)  # an earlier run's results.json: not this run's until it saves its own
    rows = []
    _print_header()
    for d in head_dims:
        for t in seq_lens:
            b = max(1, tokens // t)
            for impl in impls:
                new = bench_one(impl, batch=b, seq_len=t, heads=heads, head_dim=d, dtype=dtype,
                                on_gpu=on_gpu, warmup=warmup, iters=iters)
                _print_rows(new)
                rows += new

    write_results(args.out, quick=args.quick, config=cfg,
                  flops_note=f"causal: fwd = 4*B*H*D*T*(T+1)/2, fwd+bwd = {FWD_BWD_FLOPS:g} * fwd", rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
