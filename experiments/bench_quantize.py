"""Time and peak memory of :func:`jaxformers.quant.quantize` against the number of layers.

    python -m experiments.bench_quantize [--quick] [--out DIR] [--layers 1,2,4]
                                         [--specs rotate,rtn4,rtn4_clip] [--widths llama7b]

Each (spec, layers) runs in a fresh Python process, so that its peak resident memory
(``ru_maxrss``) is its own: the process builds a ``llama`` with random float32 weights
(non-trivial norm scales) at ``--widths`` (``llama7b``: d 4096, 32 x 128 heads, d_ff 11008 =
172 x 64, vocab 512, so that the blocks dominate; ``tiny``: the tiny preset's widths) and
``--layers`` layers, then times ``quantize(cfg, params, QuantSpec(**SPECS[spec]))``.
The peak memory should grow by the input and output layers only (``quantize`` goes block by
block); the ``growth a layer`` column is the slope between the two largest layer counts.

Specs (:data:`SPECS`): ``rotate`` (QuaRot's rotations only), ``rtn4`` (rotated, RTN W4
without the clipping search), ``rtn4_clip`` (with it), ``gptq4`` (rotated GPTQ W4 on
``--calib`` random sequences of ``--calib-len`` tokens; slow at llama7b widths on a CPU;
the authors' sequential groups: 5 block passes over the calibration tokens a layer),
``gptq4_onepass`` (``gptq_sequential=False``: all Hessians from one pass, 2 passes a layer).

Prints a Markdown table and writes ``DIR/results.json`` after every measurement
(``complete: false`` until the last one, so a run cut short keeps what it finished).
``--quick``: tiny widths, layers 1,2, specs rotate,gptq4 (seconds; the CI smoke test).

``--platform cpu`` (default) runs each child with ``JAX_PLATFORMS=cpu``; ``--platform
default`` lets JAX pick the accelerator, where the rotation (float64), RTN, GPTQ, the
clipping search and the calibration forward run; the rows then also give
the device's peak memory (``peak_device_gb``, from ``memory_stats()`` where the backend has
it).  The stage ``quantize-7b`` of ``scripts/gpu_session.sh`` runs it on the GPU with
QuaRot's calibration size (128 x 2048 tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from experiments.common import check_out, parse_list, start_results, write_results

SPECS = {"rotate": dict(rotate=True),
         "rtn4": dict(rotate=True, w_bits=4, w_clip=False),
         "rtn4_clip": dict(rotate=True, w_bits=4),
         "gptq4": dict(rotate=True, w_bits=4, w_method="gptq"),
         "gptq4_onepass": dict(rotate=True, w_bits=4, w_method="gptq", gptq_sequential=False)}
WIDTHS = {"llama7b": dict(d_model=4096, n_head=32, n_kv_head=32, head_dim=128, d_ff=11008,
                          vocab_size=512),
          "tiny": {}}


def _rss_gb():
    """Current resident memory of this process (GB); ``None`` where ``/proc`` does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1e6
    except OSError:  # no /proc (macOS)
        pass
    return None


def child(job: dict) -> dict:
    """One measurement, in this process: build the model, quantize it, report."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxformers as jf
    from jaxformers.quant import QuantSpec, quantize
    from jaxformers.utils import abstract_params

    cfg = jf.get_config("llama", "tiny", n_layer=job["layers"],
                        max_seq_len=max(256, job["calib_len"]), **WIDTHS[job["widths"]])
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(1 + 0.5 * rng.standard_normal(x.shape, np.float32)
                                    if str(path[-1].key) == "scale"
                                    else 0.02 * rng.standard_normal(x.shape, np.float32)),
        abstract_params(jf.build(cfg)))
    fields = dict(SPECS[job["spec"]])
    if fields.get("w_method") == "gptq":  # (calib_batch is GPTQ's: RTN refuses it)
        fields["calib_batch"] = min(16, job["calib"])
    spec = QuantSpec(**fields)
    calib = rng.integers(0, cfg.vocab_size, (job["calib"], job["calib_len"])) \
        if spec.w_method == "gptq" else None
    layer_gb = sum(x.nbytes for x in jax.tree_util.tree_leaves(params["blocks_0"])) / 1e9
    before = _rss_gb()
    t = time.perf_counter()
    _, qp = quantize(cfg, params, spec, calibration=calib)
    jax.block_until_ready(qp)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux
    dev = jax.devices()[0]
    device_peak = (getattr(dev, "memory_stats", lambda: None)() or {}).get("peak_bytes_in_use")
    return dict(job, seconds=seconds, peak_rss_gb=peak, rss_before_gb=before, layer_f32_gb=layer_gb,
                device=dev.device_kind,
                peak_device_gb=None if device_peak is None else device_peak / 1e9)


def bench(jobs, platform="cpu", progress=None):
    """Run each job in a fresh process (on the CPU, or with ``platform="default"`` where JAX
    puts it); the rows in order.  ``progress(rows so far)`` after every job."""
    rows = []
    env = {**os.environ, "JAX_PLATFORMS": "cpu"} if platform == "cpu" else None
    for job in jobs:
        cmd = [sys.executable, "-m", "experiments.bench_quantize", "--child", json.dumps(job)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            row = dict(job, note=f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
        else:
            row = json.loads(lines[-1])
        rows.append(row)
        print(f"{job['spec']:10s} {job['layers']:3d} layers: "
              + (f"{row['seconds']:8.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB"
                 if "seconds" in row else row["note"]), flush=True)
        if progress is not None:
            progress(rows)
    return rows


def table(rows) -> str:
    """Markdown: time and peak RSS (and the device's peak, where reported) per layer count,
    and the growth of the peak RSS a layer between the two largest layer counts, per spec."""
    layers = sorted({r["layers"] for r in rows})
    lines = ["| spec | " + " | ".join(f"{n} layers: s / peak GB" for n in layers) + " | growth a layer (GB) |",
             "|---" * (len(layers) + 2) + "|"]
    for spec in dict.fromkeys(r["spec"] for r in rows):
        got = {r["layers"]: r for r in rows if r["spec"] == spec and "seconds" in r}
        cells = [f"{got[n]['seconds']:.1f} / {got[n]['peak_rss_gb']:.2f}"
                 + (f" (device {got[n]['peak_device_gb']:.2f})" if got[n].get("peak_device_gb") else "")
                 if n in got else "failed" for n in layers]
        lo, hi = layers[-2:] if len(layers) > 1 else (None, None)
        growth = (f"{(got[hi]['peak_rss_gb'] - got[lo]['peak_rss_gb']) / (hi - lo):.2f}"
                  if lo in got and hi in got else "")
        lines.append(f"| {spec} | " + " | ".join(cells) + f" | {growth} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny widths, layers 1,2, specs rotate,gptq4")
    ap.add_argument("--out", default="runs/bench_quantize")
    ap.add_argument("--layers", default=None, help="comma list of layer counts (default 1,2,4)")
    ap.add_argument("--specs", default=None, help=f"comma list of {list(SPECS)} (default rotate,rtn4,rtn4_clip)")
    ap.add_argument("--widths", default=None, choices=list(WIDTHS), help="default llama7b (--quick: tiny)")
    ap.add_argument("--calib", type=int, default=16, help="GPTQ calibration sequences")
    ap.add_argument("--calib-len", type=int, default=128, help="tokens per calibration sequence")
    ap.add_argument("--platform", default="cpu", choices=["cpu", "default"],
                    help="cpu (JAX_PLATFORMS=cpu in each child) or default (the accelerator if any)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    check_out(ap, args.out)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    for flag in ("calib", "calib_len"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    layers = parse_list(ap, "--layers", args.layers, cast=int, lo=1, unique=True) \
        or ([1, 2] if args.quick else [1, 2, 4])
    specs = parse_list(ap, "--specs", args.specs, allowed=list(SPECS), unique=True) \
        or (["rotate", "gptq4"] if args.quick else ["rotate", "rtn4", "rtn4_clip"])
    widths = args.widths or ("tiny" if args.quick else "llama7b")
    jobs = [dict(spec=s, layers=n, widths=widths, calib=args.calib, calib_len=args.calib_len)
            for s in specs for n in sorted(layers)]
    command = "python -m experiments.bench_quantize " + " ".join(argv if argv is not None else sys.argv[1:])

    start_results(args.out)  # an earlier run's results.json: not this run's until it saves its own
    def save(rows, complete=False):
        write_results(args.out, command=command, rows=list(rows), table=table(rows),
                      platform=args.platform, complete=complete,
                      note="peak RSS per process (ru_maxrss); --platform cpu: each child runs with "
                           "JAX_PLATFORMS=cpu; peak_device_gb: the device's peak_bytes_in_use where the "
                           "backend reports it")

    rows = bench(jobs, args.platform, progress=save)
    print(table(rows))
    save(rows, complete=True)
    return 0 if all("seconds" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
