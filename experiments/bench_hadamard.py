"""Benchmark the fast Walsh-Hadamard transform kernel against a dense matmul by ``H_n``.

    python -m experiments.bench_hadamard [--quick] [--out DIR] [--rows R] [--sizes 128,1024]

For each size ``n`` (default 64..8192 and 352 = 44 * 8, 768 = 12 * 64, 11008 = 172 * 64:
Kronecker-factored sizes, the last LLaMA-2-7B's d_ff) and ``R`` rows of bf16 (default 65536: e.g. 16 sequences x 4096 tokens),
times forward and forward+backward of

* ``pallas``: :func:`pallas_kernels.hadamard.hadamard_transform` (Pallas kernel for the
  ``2^k`` part, a dense ``[m, m]`` matmul for the factor ``m``),
* ``dense``: ``x @ (H_n / sqrt(n))`` (XLA matmul, bf16 in, float32 accumulation).

Prints median milliseconds and the effective bandwidth (read + write of x); writes
``DIR/results.json`` after every size (``complete: false`` until the last one, so a run cut
short keeps the sizes it finished).  ``--quick``: tiny shapes to prove the script runs
(interpret mode on CPU, so the CPU timings measure the Pallas interpreter, not a kernel).
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from pallas_kernels.hadamard import hadamard_matrix, hadamard_transform, split_size
from experiments.common import check_counts, check_out, median_ms, parse_list, start_results, write_results

SIZES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 352, 768, 11008)


def dense_hadamard(x, h):
    return jnp.matmul(x, h, preferred_element_type=jnp.float32).astype(x.dtype)


def bench(sizes, rows, dtype, warmup, iters, progress=None):
    """The rows (one per size, impl and mode); ``progress(rows so far)`` after every size."""
    out = []
    for n in sizes:
        x = jax.random.normal(jax.random.PRNGKey(n), (rows, n)).astype(dtype)
        h = jnp.asarray(hadamard_matrix(n) * n ** -0.5, dtype)
        fns = {"pallas": lambda x, h: hadamard_transform(x), "dense": dense_hadamard}
        for impl, f in fns.items():
            fwd = jax.jit(f)
            def fb(x, h, f=f):  # forward + VJP of a data-dependent cotangent (x itself)
                y, vjp = jax.vjp(lambda x: f(x, h), x)
                return y, vjp(x)[0]
            fb = jax.jit(fb)
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fb)):
                try:
                    ms = median_ms(fn, (x, h), warmup, iters)
                    note = None
                except Exception as e:  # noqa: BLE001 - recorded
                    ms, note = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                gbs = None if ms is None else (2 * rows * n * x.dtype.itemsize) / (ms * 1e6)
                row = dict(n=n, rows=rows, dtype=str(jnp.dtype(dtype)), impl=impl, mode=mode,
                           ms=ms, fwd_gbs=gbs if mode == "fwd" else None, note=note)
                out.append(row)
                print(f"n {n:5d} {impl:6s} {mode:8s} "
                      + (f"{ms:9.3f} ms" if ms is not None else f"FAILED {note}")
                      + (f"  {gbs:7.1f} GB/s" if gbs and mode == "fwd" else ""), flush=True)
        if progress is not None:
            progress(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_hadamard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--out", default="runs/bench_hadamard")
    ap.add_argument("--rows", type=int, default=None, help="rows of x (default 65536; --quick: 64)")
    ap.add_argument("--sizes", default=None,
                    help="comma list of sizes m * 2^k (m = 1 or a supported factor: 12, 20, ..., 172, ...; "
                         "default: the list above; --quick: 64,352)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args(argv)
    check_out(ap, args.out)
    check_counts(ap, args)
    sizes = parse_list(ap, "--sizes", args.sizes, cast=int, lo=1, unique=True)
    for n in sizes or ():
        try:
            split_size(n)
        except ValueError as e:
            ap.error(f"--sizes: {e}")
    sizes = tuple(sizes) if sizes is not None else (64, 352) if args.quick else SIZES
    rows = args.rows if args.rows is not None else 64 if args.quick else 65536
    warmup, iters = (1, 3) if args.quick else (3, 20)
    command = "python -m experiments.bench_hadamard " + " ".join(argv if argv is not None else sys.argv[1:])

    start_results(args.out)  # an earlier run's results.json: not this run's until it saves its own
    def save(rows_out, complete=False):
        write_results(args.out, command=command, rows=list(rows_out), complete=complete,
                      note="CPU runs time the Pallas interpreter (interpret mode), not a compiled kernel")

    save(bench(sizes, rows, jnp.dtype(args.dtype), warmup, iters, progress=save), complete=True)


if __name__ == "__main__":
    main()
