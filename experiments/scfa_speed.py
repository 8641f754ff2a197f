"""SCFA kernel speed: hash-sparse and QK-sparse flash attention vs dense causal attention.

    python -m experiments.scfa_speed [--out DIR]      # GPU sweep (bf16)
    python -m experiments.scfa_speed --quick          # tiny shapes, interpret mode on CPU (tests)

Forward and forward+backward median milliseconds of

* ``hash_nb{n}``: :func:`pallas_kernels.sparse_attention.hash_attention` with random buckets
  (uniform over ``n`` buckets per token and head, as random-projection hashes of random
  vectors give), n in ``--buckets`` (default 2, 4, 8, 16, 32, 64);
* ``qk_keep{p}``: :func:`~pallas_kernels.sparse_attention.qk_sparse_attention` with random keep
  masks (each query / key kept with probability p), p in ``--keep`` (default 0.2 .. 0.8);
* the dense causal anchors of the same run: cuDNN (``jax.nn.dot_product_attention``, GPU only)
  and this repo's Pallas flash kernel (``flash``),

for T in ``--seq-lens`` (default 1k .. 32k) with B*T = ``--tokens`` (16k; B at least 1),
H=``--heads`` (12), D=``--head-dim`` (64); ``--quick``: tiny shapes, the options given with it
override its values.  The sparse kernels' time includes the token sort and the
tile tables (plain JAX around the kernel), as a model pays them.  Speedups are ratios to the
anchors measured in the same run (``speedup_vs_flash`` / ``speedup_vs_cudnn``); rows also
carry the computed tile fraction (``tiles / causal tiles`` of the forward).  Writes
``DIR/results.json`` (rewritten after every T with ``complete: false``, so a sweep cut short
by a device stage's time limit keeps the lengths it finished; ``complete: true`` at the end)
and ``DIR/speedup_vs_T.png`` (forward and forward+backward speedup over the Pallas flash
kernel vs T, one line per sparse setting).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import check_counts, check_out, median_ms, parse_list, start_results, write_results

#: the PNGs this experiment draws (an earlier invocation's: moved aside by ``start_results``)
PLOTS = ("speedup_vs_T.png",)


def _inputs(batch, seq_len, heads, head_dim, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    shape = (batch, seq_len, heads, head_dim)
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in ks)


def _labels(kind, param, shape, seed):
    """Random buckets (uniform over ``param``) or keep masks (rate ``param``), ``shape [B, T, H]``."""
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    if kind == "hash":
        return (jax.random.randint(kq, shape, 0, param, jnp.int32),
                jax.random.randint(kk, shape, 0, param, jnp.int32))
    return jax.random.uniform(kq, shape) < param, jax.random.uniform(kk, shape) < param


def make_fn(impl: str, param, *, on_gpu: bool, block: int, shape=None, seed: int = 1):
    """``(fn(q, k, v) -> o, labels or None, None)`` or ``(None, None, reason)``."""
    from pallas_kernels.flash_attention import flash_attention
    from pallas_kernels import sparse_attention as sa

    if impl == "cudnn":
        if not on_gpu:
            return None, None, "cudnn needs a GPU"
        return (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                             implementation="cudnn")), None, None
    if impl == "flash":
        return (lambda q, k, v: flash_attention(q, k, v, causal=True)), None, None
    kw = dict(block_q=block, block_k=block)
    if impl in ("hash", "qk"):
        ql, kl = _labels(impl, param, shape, seed)  # drawn once, outside the timed function
        op = sa.hash_attention if impl == "hash" else sa.qk_sparse_attention
        return (lambda q, k, v: op(q, k, v, ql, kl, **kw)), (impl, param), None
    raise ValueError(f"unknown impl {impl!r}")


def tile_fraction(kind, param, batch, seq_len, heads, block, seed=1, platform="gpu"):
    """Forward tiles of :func:`make_fn`'s labels / the dense causal count, with the tiles of the
    kernel variant ``platform`` runs (``"tpu"``: at least 128 rows, whatever ``block``)."""
    from pallas_kernels import sparse_attention as sa

    ql, kl = _labels(kind, param, (batch, seq_len, heads), seed)
    counter = sa.hash_tile_count if kind == "hash" else sa.qk_sparse_tile_count
    blocks = dict(block_q=block, block_k=block, platform=platform)
    n = counter(ql, kl, **blocks)
    dense = sa.causal_tile_count(seq_len, **blocks) * batch * heads
    return float(np.asarray(n).sum()) / dense


def bench(name, fn, q, k, v, do, *, on_gpu, warmup, iters):
    jit_kw = {} if on_gpu else {"compiler_options": {"xla_backend_optimization_level": 0}}
    fwd = jax.jit(fn, **jit_kw)

    def _fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return o, vjp(do)

    fwd_bwd = jax.jit(_fwd_bwd, **jit_kw)
    out = {}
    for mode, f, args in (("fwd", fwd, (q, k, v)), ("fwd+bwd", fwd_bwd, (q, k, v, do))):
        try:
            # compiled ahead of time: with --warmup 0 the first timed call would otherwise measure
            # tracing + compilation (the Pallas kernels' far longer than cuDNN's: a skewed speedup)
            out[mode] = median_ms(f.lower(*args).compile(), args, warmup, iters)
        except Exception as e:  # noqa: BLE001 - record OOM / unsupported and keep going
            out[mode] = None
            out[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


#: the GPU sweep and ``--quick``'s tiny shapes; an option given on the command line replaces
#: the value of either
FULL = dict(seq_lens=(1024, 2048, 4096, 8192, 16384, 32768), buckets=(2, 4, 8, 16, 32, 64),
            keep=(0.2, 0.4, 0.6, 0.8), tokens=16384, heads=12, head_dim=64, block=64, warmup=2, iters=5)
MIN_BLOCK = 16  # smallest tile of the GPU kernels (Triton's tl.dot)
QUICK = dict(seq_lens=(64,), buckets=(2, 4), keep=(0.5,), tokens=128, heads=2, head_dim=32, block=16,
             warmup=1, iters=2)


def sweep_config(ap, args) -> dict:
    """``FULL`` or ``QUICK`` with the options given on the command line applied (each checked:
    a usage error names the option)."""
    check_counts(ap, args)
    cfg = dict(QUICK if args.quick else FULL)
    lists = dict(seq_lens=parse_list(ap, "--seq-lens", args.seq_lens, cast=int, lo=1, unique=True),
                 buckets=parse_list(ap, "--buckets", args.buckets, cast=int, lo=1, unique=True, none=True),
                 keep=parse_list(ap, "--keep", args.keep, cast=float, lo=0.0, hi=1.0, unique=True, none=True))
    if lists["keep"] and min(lists["keep"]) <= 0:
        ap.error(f"--keep: keep rates must be in (0, 1], got {args.keep!r}")
    for name, value in lists.items():
        if value is not None:
            cfg[name] = tuple(value)
    if not cfg["buckets"] and not cfg["keep"]:  # only the dense anchors: no speedup to measure or plot
        ap.error("--buckets none and --keep none skip both sparse kernels: nothing to compare with the dense "
                 "anchors (keep at least one of them)")
    for name in ("tokens", "heads", "head_dim", "block", "warmup", "iters"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    block = cfg["block"]
    if block < MIN_BLOCK or block & (block - 1):
        # the kernels' block_q / block_k: a power of two (Triton's tl.dot: >= 16)
        ap.error(f"--block must be a power of two >= {MIN_BLOCK}, got {block}")
    return cfg


def run(args, cfg=None, progress=None) -> list:
    """The sweep of ``cfg`` (:func:`sweep_config`; default: ``QUICK`` / ``FULL`` as ``args.quick`` says).
    ``progress(rows)``: called with the rows so far after every sequence length."""
    on_gpu = jax.default_backend() == "gpu"
    cfg = dict(QUICK if args.quick else FULL) if cfg is None else cfg
    seq_lens, buckets, keeps = cfg["seq_lens"], cfg["buckets"], cfg["keep"]
    tokens, heads, head_dim, block = cfg["tokens"], cfg["heads"], cfg["head_dim"], cfg["block"]
    warmup, iters = cfg["warmup"], cfg["iters"]
    dtype = jnp.bfloat16 if on_gpu or not args.quick else jnp.float32
    settings = [("cudnn", None), ("flash", None)] + [("hash", n) for n in buckets] + [("qk", p) for p in keeps]
    rows = []
    print(f"{'impl':>12} {'T':>6} {'B':>3} {'fwd ms':>9} {'f+b ms':>9} {'tiles':>6} {'x flash f/fb':>14}",
          flush=True)
    for t in seq_lens:
        b = max(1, tokens // t)
        q, k, v, do = _inputs(b, t, heads, head_dim, dtype)
        anchors = {}
        for impl, param in settings:
            name = impl if param is None else (f"hash_nb{param}" if impl == "hash" else f"qk_keep{param:g}")
            row = dict(impl=name, kind=impl, param=param, seq_len=t, batch=b, heads=heads,
                       head_dim=head_dim, dtype=jnp.dtype(dtype).name, block=block)
            fn, lab, reason = make_fn(impl, param, on_gpu=on_gpu, block=block, shape=(b, t, heads))
            if fn is None:
                rows.append(dict(row, fwd_ms=None, fwd_bwd_ms=None, skipped=reason))
                continue
            res = bench(name, fn, q, k, v, do, on_gpu=on_gpu, warmup=warmup, iters=iters)
            row.update(fwd_ms=res["fwd"], fwd_bwd_ms=res["fwd+bwd"],
                       **{k2: v2 for k2, v2 in res.items() if k2.endswith("_error")})
            if lab is not None:
                row["tile_fraction"] = tile_fraction(lab[0], lab[1], b, t, heads, block, platform=(
                    "tpu" if jax.default_backend() == "tpu" else "gpu"))  # the variant that ran
            else:
                anchors[impl] = row
            for anchor in ("flash", "cudnn"):
                a = anchors.get(anchor)
                for mode, key in (("fwd", "fwd_ms"), ("fwd_bwd", "fwd_bwd_ms")):
                    ok = a is not None and a.get(key) and row.get(key)
                    row[f"speedup_vs_{anchor}_{mode}"] = a[key] / row[key] if ok else None
            rows.append(row)
            fmt = lambda x: f"{x:.3f}" if x else "-"  # noqa: E731
            print(f"{name:>12} {t:>6} {b:>3} {fmt(row['fwd_ms']):>9} {fmt(row['fwd_bwd_ms']):>9} "
                  f"{fmt(row.get('tile_fraction')):>6} {fmt(row.get('speedup_vs_flash_fwd')):>6}/"
                  f"{fmt(row.get('speedup_vs_flash_fwd_bwd'))}", flush=True)
        if progress is not None:
            progress(rows)
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    names = sorted({r["impl"] for r in rows if r["kind"] in ("hash", "qk")},
                   key=lambda n: (n[:2], float(n.split("nb")[-1].split("keep")[-1])))
    for ax, mode in zip(axes, ("fwd", "fwd_bwd")):
        for n in names:
            pts = [(r["seq_len"], r.get(f"speedup_vs_flash_{mode}")) for r in rows if r["impl"] == n]
            pts = [(t, s) for t, s in pts if s]
            if pts:
                ax.plot(*zip(*pts), "o-" if n.startswith("hash") else "s--", label=n)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("speedup over Pallas flash (causal)")
        ax.set_title(f"{'forward' if mode == 'fwd' else 'forward + backward'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.scfa_speed", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default="runs/scfa_speed", help="folder for results.json and the plot")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes (CPU / interpret friendly); options given with it override its values")
    ap.add_argument("--seq-lens", help="comma list (default %s)" % ",".join(map(str, FULL["seq_lens"])))
    ap.add_argument("--buckets", help="hash buckets ('none': skip the hash kernel; default %s)"
                    % ",".join(map(str, FULL["buckets"])))
    ap.add_argument("--keep", help="keep rates in (0, 1] of the QK-sparse kernel ('none': skip it; "
                                   "default %s)" % ",".join(map(str, FULL["keep"])))
    ap.add_argument("--tokens", type=int,
                    help=f"B*T per config: B = max(1, tokens // T) (default {FULL['tokens']})")
    ap.add_argument("--heads", type=int, help=f"default {FULL['heads']}")
    ap.add_argument("--head-dim", type=int, help=f"default {FULL['head_dim']}")
    ap.add_argument("--block", type=int, help=f"sparse kernels' block_q = block_k, a power of two "
                    f">= {MIN_BLOCK} (default {FULL['block']})")
    ap.add_argument("--warmup", type=int, help=f"default {FULL['warmup']}")
    ap.add_argument("--iters", type=int, help=f"default {FULL['iters']}")
    args = ap.parse_args(argv)
    check_out(ap, args.out)
    cfg = sweep_config(ap, args)
    note = ("speedup_vs_X_mode = X's ms / this row's ms, same run; sparse ms include "
            "the token sort and tile tables")
    start_results(args.out, PLOTS)  # an earlier run's results.json: not this run's until it saves its own
    rows = run(args, cfg, progress=lambda rows: write_results(args.out, quick=args.quick, config=cfg, rows=rows,
                                                              note=note, complete=False))
    import os
    path = write_results(args.out, quick=args.quick, config=cfg, rows=rows, note=note, complete=True)
    plot(rows, os.path.join(args.out, "speedup_vs_T.png"))
    return path


if __name__ == "__main__":
    main()
