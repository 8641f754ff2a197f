"""Benchmark the Mamba scan kernels: forward and forward+backward.

    python -m experiments.bench_scan [--quick] [--out DIR] [--impls pallas,assoc_scan,...]

GPU defaults (bf16 activations, float32 A/D/biases):

* ``selective_scan`` at B=4, L=4096, dim=2048, N=16 (softplus, D, z, dt_bias):
  this repo's Pallas kernel (``pallas``), a ``lax.associative_scan`` over the
  materialised ``[B, L, dim, N]`` decay/input tensors (``assoc_scan``) and the
  sequential ``lax.scan`` oracle (``reference``).
* ``ssd`` at B=4, L=4096, H=16, P=128, N=128, G=1, chunk 64: the Pallas kernel
  (``pallas``), the sequential oracle (``reference``) and, when ``torch`` and
  ``fla`` import and CUDA is available, ``fla.ops.simple_gla.chunk_simple_gla``
  (``fla``: q=C, k=B, v=dt*x, g=dt*A, scale=1 — the same recurrence, no D/z).

Prints median milliseconds and writes ``DIR/results.json`` (device, date, jax
version, one row per measurement; skipped / failed runs carry a note) after every
implementation's rows, ``complete: false`` until the last one, so a run cut short keeps
what it finished.
``--quick`` runs tiny shapes (interpret mode on CPU) to prove the script works.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.selective_scan import reference as ss_reference
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.ssd import reference as ssd_reference
from pallas_kernels.ssd import ssd
from experiments.common import check_counts, check_out, median_ms, parse_list, start_results, write_results

SS_IMPLS = ("pallas", "assoc_scan", "reference")
SSD_IMPLS = ("pallas", "reference", "fla")


def assoc_scan_selective_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus=True):
    """Baseline: ``lax.associative_scan`` over materialised ``exp(dt A)`` and ``dt x B``
    (``[B, L, dim, N]`` float32; B, C without a group axis)."""
    f32 = jnp.float32
    dt = dt.astype(f32) + dt_bias
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    da = jnp.exp(dt[..., None] * A)                                        # [b, L, dim, N]
    dbu = (dt * x.astype(f32))[..., None] * B.astype(f32)[:, :, None, :]

    def combine(a, b):
        return a[0] * b[0], b[0] * a[1] + b[1]

    _, h = lax.associative_scan(combine, (da, dbu), axis=1)
    y = jnp.einsum("bldn,bln->bld", h, C.astype(f32)) + D * x.astype(f32)
    return (y * jax.nn.silu(z.astype(f32))).astype(x.dtype)


# ----------------------------------------------------------------------------- selective scan
def _ss_inputs(b, l, dim, n, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    return dict(
        x=jax.random.normal(ks[0], (b, l, dim)).astype(dtype),
        dt=(jax.random.normal(ks[1], (b, l, dim)) - 4.0).astype(dtype),
        A=-jnp.exp(jax.random.normal(ks[2], (dim, n))),
        B=jax.random.normal(ks[3], (b, l, n)).astype(dtype),
        C=jax.random.normal(ks[4], (b, l, n)).astype(dtype),
        D=jax.random.normal(ks[5], (dim,)),
        z=jax.random.normal(ks[6], (b, l, dim)).astype(dtype),
        dt_bias=0.1 * jax.random.normal(ks[7], (dim,)),
    )


def _ss_fn(impl):
    if impl == "pallas":
        return lambda **kw: selective_scan(**kw, dt_softplus=True)
    if impl == "reference":
        return lambda **kw: ss_reference(**kw, dt_softplus=True)
    if impl == "assoc_scan":
        return lambda **kw: assoc_scan_selective_scan(**kw)
    raise ValueError(impl)


# ----------------------------------------------------------------------------- ssd
def _ssd_inputs(b, l, h, p, n, g, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    return dict(
        x=jax.random.normal(ks[0], (b, l, h, p)).astype(dtype),
        dt=(jax.random.normal(ks[1], (b, l, h)) - 4.0).astype(dtype),
        A=-jnp.exp(jax.random.normal(ks[2], (h,))),
        B=jax.random.normal(ks[3], (b, l, g, n)).astype(dtype),
        C=jax.random.normal(ks[4], (b, l, g, n)).astype(dtype),
        dt_bias=0.1 * jax.random.normal(ks[5], (h,)),
    )


def _ssd_fn(impl, chunk):
    if impl == "pallas":
        return lambda **kw: ssd(**kw, chunk_size=chunk, dt_softplus=True)
    if impl == "reference":
        return lambda **kw: ssd_reference(**kw, dt_softplus=True)
    raise ValueError(impl)


def torch_median_ms(f, sync, *, warmup: int, iters: int, min_sample_ms=None) -> float:
    """Median ms of one ``f()`` on a device ``sync`` waits for: ``warmup`` untimed calls, then
    ``iters`` samples.  ``min_sample_ms`` None: a sample is one call followed by ``sync()`` (as
    :func:`experiments.common.median_ms` times JAX); a number: back-to-back calls, enough that a
    sample lasts that long, then one ``sync()`` (as ``experiments.gpu_check.time_ms`` times JAX:
    the host's launch overhead overlaps the device's work for both sides alike)."""
    for _ in range(warmup):
        f()
    sync()
    reps = 1
    if min_sample_ms is not None:
        t0 = time.perf_counter()
        f()
        sync()
        one = (time.perf_counter() - t0) * 1e3
        reps = max(1, min(200, math.ceil(min_sample_ms / max(one, 1e-3))))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(times)


def _bench_fla(base, inputs, warmup, iters, min_sample_ms=None):
    """``fla`` chunk_simple_gla through torch (CUDA only): yields the fwd row, then the fwd+bwd
    row, each as soon as it is measured (or a skip note); timing: :func:`torch_median_ms`."""
    try:
        import numpy as np
        import torch
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001 - optional
        yield from [dict(base, mode=m, ms=None, skipped=f"fla/torch not importable: {type(e).__name__}")
                    for m in ("fwd", "fwd+bwd")]
        return
    if not torch.cuda.is_available():
        yield from [dict(base, mode=m, ms=None, skipped="torch CUDA not available")
                    for m in ("fwd", "fwd+bwd")]
        return
    h = inputs["x"].shape[2]
    f32 = jnp.float32
    dt = jax.nn.softplus(inputs["dt"].astype(f32) + inputs["dt_bias"])
    rep = lambda v: jnp.repeat(v, h // v.shape[2], axis=2)  # noqa: E731
    arrs = dict(q=rep(inputs["C"]), k=rep(inputs["B"]),
                v=(inputs["x"].astype(f32) * dt[..., None]).astype(inputs["x"].dtype),
                g=dt * inputs["A"])
    t = {k: torch.from_numpy(np.array(v.astype(f32))).cuda() for k, v in arrs.items()}
    for k in ("q", "k", "v"):
        t[k] = t[k].to(torch.bfloat16).requires_grad_()
    t["g"].requires_grad_()
    do = torch.randn_like(t["v"])

    def fwd():
        return chunk_simple_gla(t["q"], t["k"], t["v"], g=t["g"], scale=1.0)[0]

    leaves = (t["q"], t["k"], t["v"], t["g"])

    def fwd_bwd():  # the gradients returned, as JAX's vjp does: ``backward()`` would also add them
        o = fwd()   # into the leaves' ``.grad`` on every call, extra work charged to the anchor
        return o, torch.autograd.grad(o, leaves, do, allow_unused=True)

    for mode, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        row = dict(base, mode=mode)
        try:
            row.update(ms=torch_median_ms(f, torch.cuda.synchronize, warmup=warmup, iters=iters,
                                          min_sample_ms=min_sample_ms))
        except Exception as e:  # noqa: BLE001
            row.update(ms=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        yield row


# ----------------------------------------------------------------------------- driver
def _bench_jax(base, fn, inputs, diff_keys, on_gpu, warmup, iters):
    jit_kw = {} if on_gpu else {"compiler_options": {"xla_backend_optimization_level": 0}}
    fwd = jax.jit(lambda inp: fn(**inp), **jit_kw)

    def _fwd_bwd(inp, dy):
        diff = {k: inp[k] for k in diff_keys}
        rest = {k: v for k, v in inp.items() if k not in diff_keys}
        y, vjp = jax.vjp(lambda d: fn(**rest, **d), diff)
        return y, vjp(dy)

    fwd_bwd = jax.jit(_fwd_bwd, **jit_kw)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        row = dict(base, mode=mode)
        try:
            if mode == "fwd":
                # compiled ahead of time: with --warmup 0 the first timed call would otherwise
                # measure tracing + compilation
                ms = median_ms(fwd.lower(inputs).compile(), (inputs,), warmup, iters)
            else:
                dy = jnp.ones(jax.eval_shape(fwd, inputs).shape, jax.eval_shape(fwd, inputs).dtype)
                ms = median_ms(fwd_bwd.lower(inputs, dy).compile(), (inputs, dy), warmup, iters)
            row.update(ms=ms)
        except Exception as e:  # noqa: BLE001 - record OOM / unsupported and keep going
            row.update(ms=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        rows.append(row)
    return rows


def _print_rows(rows):
    for r in rows:
        ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
        note = r.get("skipped") or r.get("error") or ""
        print(f"{r['kernel']:>15} {r['impl']:>11} {r['shape']:>28} {r['mode']:>8} {ms:>10}  {note}",
              flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_scan",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_scan", help="folder for results.json")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes (CPU/interpret friendly), warmup 1, iters 1 (--warmup / --iters "
                         "override them)")
    ap.add_argument("--warmup", type=int, help="untimed calls (default 3; --quick: 1)")
    ap.add_argument("--iters", type=int, help="timed calls (default 10; --quick: 1)")
    ap.add_argument("--impls", default="pallas,assoc_scan,reference,fla",
                    help="comma list of implementations to run (others are recorded as skipped)")
    args = ap.parse_args(argv)
    check_out(ap, args.out)
    check_counts(ap, args)
    all_impls = sorted(set(SS_IMPLS) | set(SSD_IMPLS))
    impls = set(parse_list(ap, "--impls", args.impls, allowed=all_impls, unique=True))

    on_gpu = jax.default_backend() == "gpu"
    if args.quick:
        ss_shape, ssd_shape, chunk = (1, 32, 16, 4), (1, 32, 2, 16, 16, 1), 16
        warmup, iters = 1, 1
        dtype = jnp.bfloat16 if on_gpu else jnp.float32
    else:
        ss_shape, ssd_shape, chunk = (4, 4096, 2048, 16), (4, 4096, 16, 128, 128, 1), 64
        warmup, iters, dtype = 3, 10, jnp.bfloat16
    warmup = warmup if args.warmup is None else args.warmup  # given options override either
    iters = iters if args.iters is None else args.iters

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    print(f"{'kernel':>15} {'impl':>11} {'shape':>28} {'mode':>8} {'ms':>10}  note")
    start_results(args.out)  # an earlier run's results.json: not this run's until it saves its own
    rows = []

    def save(complete=False):  # after every implementation: a run cut short keeps its rows
        write_results(args.out, quick=args.quick, warmup=warmup, iters=iters, rows=list(rows),
                      complete=complete)

    b, l, dim, n = ss_shape
    ss_in = _ss_inputs(b, l, dim, n, dtype)
    for impl in SS_IMPLS:
        base = dict(kernel="selective_scan", impl=impl, shape=f"B{b} L{l} dim{dim} N{n}",
                    dtype=jnp.dtype(dtype).name)
        if impl not in impls:
            new = [dict(base, mode=m, ms=None, skipped="not in --impls") for m in ("fwd", "fwd+bwd")]
        else:
            new = _bench_jax(base, _ss_fn(impl), ss_in, ("x", "dt", "A", "B", "C", "D", "z"),
                             on_gpu, warmup, iters)
        _print_rows(new)
        rows += new
        save()

    b, l, h, p, n, g = ssd_shape
    ssd_in = _ssd_inputs(b, l, h, p, n, g, dtype)
    for impl in SSD_IMPLS:
        base = dict(kernel="ssd", impl=impl, shape=f"B{b} L{l} H{h} P{p} N{n} G{g}",
                    dtype=jnp.dtype(dtype).name, chunk_size=chunk)
        if impl not in impls:
            new = [dict(base, mode=m, ms=None, skipped="not in --impls") for m in ("fwd", "fwd+bwd")]
        elif impl == "fla":
            new = (list(_bench_fla(base, ssd_in, warmup, iters)) if on_gpu else
                   [dict(base, mode=m, ms=None, skipped="fla only benchmarked on GPU")
                    for m in ("fwd", "fwd+bwd")])
        else:
            new = _bench_jax(base, _ssd_fn(impl, chunk), ssd_in, ("x", "dt", "A", "B", "C"),
                             on_gpu, warmup, iters)
        _print_rows(new)
        rows += new
        save()

    save(complete=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
