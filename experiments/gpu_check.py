"""The GPU check: every kernel family and model, correct and timed, in one command of under
8 minutes on an H200 (the GPU record issue).

    bash scripts/gpu_check.sh                       # the check: parts 1-5, everything under $OUT
    bash scripts/gpu_check.sh followup              # the follow-up (< 4.5 min): flash + SCFA tile sweeps
    bash scripts/gpu_check.sh models kernels        # any parts by name (a part cut short, say)
    bash scripts/gpu_check.sh --gpu-quick           # only part 1 (every kernel family correct on the GPU)
    python -m experiments.gpu_check --smoke --out DIR   # CPU: tiny shapes, interpret mode (tests)

Parts, in order of value (positional ``PART`` names; each runs in its own process under its own time budget,
``--budget PART=SECONDS``, and the whole run stops at ``--deadline``, so a hang or a crash
costs one part; rows are appended to ``<work>/<part>.jsonl`` as they are measured, so a part
cut short keeps what it measured):

1. ``correct``: each kernel family (flash attention causal + GQA, sliding window + packed
   segments; selective scan and SSD with initial state, packed segments and final state;
   hash- and QK-sparse attention (GQA); landmark attention (L=51, GQA, o and lse); Hadamard
   transform (2^k, two factored sizes: 12 x 2^j, 172 x 2^j, and 8192, split as
   H_4 (x) H_2048); the int8 linear) against its
   float32 reference at one awkward shape (T=333), forward and every gradient, float32 inputs with
   ``JAX_DEFAULT_MATMUL_PRECISION=highest``; fresh random inputs each run (the seed is in the
   row); the compiled kernel is run twice and must give bit-identical results (a moving
   result is a race).  Relative error ``|a - ref| / |ref|`` per output.
2. ``attention``: first the two ceilings of this card (device copy GB/s, 8192^3 bf16 matmul
   TFLOP/s); then causal bf16 H16, D 128 / 64, T 16k / 4k at 16k tokens per batch: ours vs
   cuDNN (``jax.nn.dot_product_attention``) vs JAX's bundled Pallas ``mha``, fwd and fwd+bwd,
   TFLOP/s, and our output's difference from cuDNN's; then a sliding window (T 16k, w 2048:
   vs cuDNN's ``local_window_size``) and packed segments (T 4k, B 4: vs XLA and cuDNN with
   the explicit mask), with FLOPs counted over the visible pairs only.
3. ``scan``: selective scan B4 L4096 D2048 N16 and SSD B4 L4096 H16 P128 N128 (bf16), fwd and
   fwd+bwd: ours vs ``lax.associative_scan`` and the sequential reference, and fla's
   ``chunk_simple_gla`` when its wheel is carried (``runs/wheels``, see scripts/gpu_check.sh).
4. ``models``: one training step (AdamW, bf16 compute, fp32 params) of ``gpt``/``mamba2``/
   ``mamba`` ``small`` at B32 x T1024 with MFU (datasheet peak and measured matmul ceiling),
   prefill tokens/s (B16 x T1024) and greedy decode tokens/s (batch 1 and 64, 64 steps after
   a 1024-token cache).
5. ``kernels``: the later kernel families at their issues' target shapes: hash- (16 buckets)
   and QK-sparse (keep 0.5) attention at T=16k, H16, D 64 / 128 vs cuDNN and our flash kernel
   (SCFA targets: fwd+bwd >= 3x / 2x cuDNN); landmark attention vs flash (T 4k); the Hadamard
   transform vs a dense ``x @ H`` (GB/s); the int8 linear (int8 x int8 -> int32) vs a bf16
   matmul; decode tokens/s of the layer-parallel (paired) ~283M Llama vs unpaired (random
   weights: speed does not depend on them; the issue's perplexity half needs the trained run).

Follow-up parts (``followup`` = both): ``flash_tiles`` (the flash kernel's forward and
backward tiles / warps / stages at T 16k, D 128 and 64, against cuDNN and ``mha`` measured
in the same process) and ``scfa_tiles`` (the sparse kernels' tile sizes at T 16k).

Timing: a part's cases are lowered on a background thread and compiled in a pool of threads,
a group at a time (the most valuable group first); nothing is timed while anything compiles
(compiling on a GPU runs XLA's autotuning kernels).  A case is run once (warm-up), then timed
as the median of 5 samples of back-to-back calls (each sample >= 20 ms, so launch gaps and the
host's clock do not matter); fla (torch) is timed the same way (``bench_scan.torch_median_ms``).
Ratios are against anchors measured in the same process.  Attention FLOPs: causal pairs only,
fwd+bwd = 3.5x fwd (FlashAttention-2's convention: the backward's five matmuls).

Outputs under ``--out`` (the device returns at most 8 files): ``results.json`` (every row,
the targets, each part's status and time), ``table.md`` (the tables for BENCHMARKS.md) and
``log.txt`` (every part's log); the table is printed last.  ``results.json`` and ``table.md`` are
rewritten after every part and every 15 s while one runs, so a run killed from outside keeps
what was measured; the part running then dies with the driver (it would hold the GPU for the next
command), and a SIGTERM also records it as killed.  A part's row file is emptied before it starts:
no row of an earlier run on the same machine is reported.  scripts/gpu_check.sh's set-up steps
are time-limited and count against ``--deadline``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

# fwd+bwd / fwd attention FLOPs (FlashAttention-2's convention: the backward is 2.5x the forward;
# experiments.bench_attention.FWD_BWD_FLOPS, not imported: this driver does not import jax)
FWD_BWD_FLOPS = 3.5

CHECK_PARTS = ("correct", "attention", "scan", "models", "kernels")
FOLLOWUP_PARTS = ("flash_tiles", "scfa_tiles")
ALL_PARTS = CHECK_PARTS + FOLLOWUP_PARTS
ALIASES = {"gpu-quick": "correct"}  # every kernel family's ``--gpu-quick`` part is its ``correct`` case
# seconds per part on the H200 (each includes its process start and jax/CUDA init, ~10 s)
BUDGET = dict(correct=75, attention=115, scan=65, models=110, kernels=85, flash_tiles=150,
              scfa_tiles=105)
DEADLINE_S = 465  # the whole check, so that it ends under 8 minutes with the script's set-up
# the follow-up alone: the check (8 min) + a follow-up + the machine's start fit 15 minutes of device time
FOLLOWUP_DEADLINE_S = 270
# scripts/gpu_check.sh's set-up before the driver starts (nvidia-smi, one jax start, the wheels):
# the parts' budgets add up to at most a deadline less this, so a part that uses its whole
# budget never takes time from the parts after it
SETUP_ALLOWANCE_S = 15
SMOKE_BUDGET_S = 400  # per part on a CPU (interpret mode)
REFRESH_S = 15.0  # results.json / table.md rewritten this often while a part runs
MIN_BUDGET_S = 5  # a part given less time is skipped ("out of time"); --budget must give at least this
# per-part environment: IEEE float32 dots for the correctness part; no preallocation where torch
# (fla) shares the GPU with jax
PART_ENV = dict(correct={"JAX_DEFAULT_MATMUL_PRECISION": "highest"},
                scan={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
# relative-error tolerances of the correctness part: float32 inputs, IEEE float32 dots give ~1e-6;
# tf32 dots (if a lowering ignored the precision) ~3e-4: passed but flagged (``ieee_level`` False);
# a real bug (a wrong mask, a lost tile, a mis-scaled gradient) gives 1e-3 or more
TOL = dict(default=2e-3, ieee=1e-4, int8_linear=1e-5)
TARGETS = (  # (key, description, goal, comparison)
    ("flash_fwd_vs_cudnn", "flash attention fwd vs cuDNN, T 16k (D128, D64: the worse)", 0.75, ">="),
    ("flash_fwdbwd_vs_mha", "flash attention fwd+bwd vs JAX Pallas mha, T 16k (the worse)", 2.0, ">="),
    ("selective_scan_fwd_vs_assoc", "selective scan fwd vs associative_scan", 20.0, ">="),
    ("selective_scan_fwdbwd_vs_assoc", "selective scan fwd+bwd vs associative_scan", 10.0, ">="),
    ("ssd_fwd_vs_fla", "SSD fwd time / fla chunk_simple_gla fwd time", 1.5, "<="),
    ("gpt_small_mfu", "gpt small training MFU (datasheet bf16 peak)", 0.40, ">="),
    ("hash16_fwdbwd_vs_cudnn", "hash attention 16 buckets T 16k fwd+bwd vs cuDNN (the worse D)", 3.0, ">="),
    ("qk50_fwdbwd_vs_cudnn", "QK-sparse attention keep 0.5 T 16k fwd+bwd vs cuDNN (the worse D)", 2.0, ">="),
    ("layer_parallel_decode", "layer-parallel decode b1 speed-up, best span (speed half only)", 1.15, ">="),
)


# ============================================================================ measuring
class Part:
    """One part's process: rows appended to ``<work>/<name>.jsonl`` as they are measured."""

    def __init__(self, name: str, work: Path, smoke: bool):
        import jax
        self.name, self.smoke = name, smoke
        self.on_gpu = jax.default_backend() == "gpu"
        self.path = work / f"{name}.jsonl"
        self.path.write_text("")
        dev = jax.devices()[0]
        self.row(kind="env", device=dev.device_kind, backend=jax.default_backend(), jax_version=jax.__version__,
                 precision=os.environ.get("JAX_DEFAULT_MATMUL_PRECISION"))

    def row(self, **r) -> dict:
        r = {"part": self.name, **r}
        with self.path.open("a") as f:
            f.write(json.dumps(r, default=_jsonable) + "\n")
        short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                 if k not in ("part",) and v is not None}
        print(json.dumps(short, default=_jsonable), flush=True)
        return r

    def close(self):
        """Stop this part's :class:`Pipeline` threads (:func:`run_part` does at the part's end)."""
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            pipe.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def jit(self, fn, **kw):
        import jax
        if not self.on_gpu:  # interpreted kernels: compile cheaply
            kw.setdefault("compiler_options", {"xla_backend_optimization_level": 0})
        return jax.jit(fn, **kw)


def _jsonable(x):
    try:
        return float(x)
    except Exception:  # noqa: BLE001
        return str(x)


def _err(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


_STAGE = object()  # a stage boundary in the pipeline's queue


class Pipeline:
    """Lower cases in order on a background thread and compile them in a pool of threads (XLA and
    Triton compiles release the GIL).  ``add(fn, args)`` returns a Future of ``(compiled,
    compile_s)``; :meth:`result` waits for one.

    Compiling on a GPU runs kernels (XLA's autotuning), so nothing is timed while anything
    compiles: :meth:`wait_idle` (called before each timing) waits until no compile is in flight.
    ``stage()`` marks a boundary: the cases after it are compiled only once the main thread asks
    for one of them (so a part compiles and times its most valuable group first, and a part cut
    short by its budget keeps those rows)."""

    def __init__(self, part: Part, workers: int = 8):
        if getattr(part, "pipe", None) is not None:
            part.pipe.close()  # the part's earlier pipeline
        part.pipe = self
        self.part = part
        self.pool = ThreadPoolExecutor(workers)
        self.todo = []
        self.queued = set()  # futures of the cases not yet taken from the queue
        self.cv = threading.Condition()
        self.pending = 0  # popped from the queue, not yet compiled (or failed)
        self.at_stage = False  # the lowering thread waits at a stage boundary
        self.released = self.reached = 0
        self.closed = False
        self.thread = threading.Thread(target=self._lower_all, daemon=True)
        self.thread.start()

    def add(self, fn, args, **jit_kw) -> Future:
        fut = Future()
        with self.cv:
            self.todo.append((fn, args, jit_kw, fut))
            self.queued.add(fut)
            self.cv.notify_all()
        return fut

    def stage(self):
        with self.cv:
            self.todo.append(_STAGE)
            self.cv.notify_all()

    def result(self, fut: Future):
        """``fut``'s result, releasing stage boundaries until its case has been compiled."""
        with self.cv:
            while not fut.done():
                # release the boundary only for a case behind it (not one still compiling before it)
                if self.at_stage and self.released != self.reached and fut in self.queued:
                    self.released = self.reached  # idempotent until the lowering thread wakes
                    self.cv.notify_all()
                self.cv.wait(0.05)
        return fut.result()

    def wait_idle(self):
        """Until the lowering thread is blocked at a stage boundary or out of work, and no compile
        is in flight."""
        with self.cv:
            while self.pending or not (self.at_stage or not self.todo):
                self.cv.wait(0.05)

    def close(self):
        """End the lowering thread and the compile pool: cases still queued fail, a compile in
        flight finishes in the background.  Without it the threads outlive the part (idle, but
        kept with what they reference by a process that runs several parts, as the tests do).
        The lowering thread is joined: one that used jax and ends while the interpreter shuts
        down aborts the process ("FATAL: exception not rethrown"); the pool's threads are joined
        before that by ``concurrent.futures`` itself."""
        with self.cv:
            if self.closed:
                return
            self.closed = True
            for job in self.todo:
                if job is not _STAGE and not job[3].done():
                    job[3].set_exception(RuntimeError("the pipeline was closed before this case compiled"))
            self.todo.clear()
            self.cv.notify_all()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if threading.current_thread() is not self.thread:
            self.thread.join()

    def _done(self, fut, value=None, error=None):
        if error is None:
            fut.set_result(value)
        else:
            fut.set_exception(error)
        with self.cv:
            self.pending -= 1
            self.cv.notify_all()

    def _lower_all(self):
        while True:
            with self.cv:
                while not self.todo and not self.closed:
                    self.cv.wait()
                if self.closed:
                    return
                job = self.todo.pop(0)
                if job is _STAGE:
                    self.reached += 1
                    self.at_stage = True
                    self.cv.notify_all()
                    while self.released < self.reached and not self.closed:
                        self.cv.wait()
                    self.at_stage = False
                    continue
                self.queued.discard(job[3])
                self.pending += 1
            fn, args, jit_kw, fut = job
            try:
                lowered = self.part.jit(fn, **jit_kw).lower(*args)
            except BaseException as e:  # noqa: BLE001 - recorded by the case
                self._done(fut, error=e)
                continue
            try:
                self.pool.submit(self._compile, lowered, fut)
            except RuntimeError as e:  # the interpreter is shutting down (the part ended)
                self._done(fut, error=e)
                return

    def _compile(self, lowered, fut):
        t0 = time.perf_counter()
        try:
            compiled = lowered.compile()
        except BaseException as e:  # noqa: BLE001
            self._done(fut, error=e)
            return
        self._done(fut, value=(compiled, time.perf_counter() - t0))


def time_ms(fn, args, *, smoke: bool, samples: int = 5, min_sample_ms: float = 20.0) -> float:
    """Median ms of one ``fn(*args)``: a warm-up call, then ``samples`` samples of back-to-back
    calls (enough calls that a sample takes ``min_sample_ms``; one sample of one call in smoke)."""
    import jax
    jax.block_until_ready(fn(*args))
    if smoke:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = (time.perf_counter() - t0) * 1e3
    reps = max(1, min(200, math.ceil(min_sample_ms / max(one, 1e-3))))
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        out = None
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(times)


def run_timed(part: Part, fut: Future, args, **row):
    """Wait for ``fut``'s compiled function, time it on ``args``; write and return the row
    (``ms`` None and ``error`` set when it fails).  Also returns the compiled function."""
    try:
        compiled, compile_s = part.pipe.result(fut)
        part.pipe.wait_idle()
        ms = time_ms(compiled, args, smoke=part.smoke)
        row.update(ms=ms, compile_s=compile_s)
    except Exception as e:  # noqa: BLE001 - OOM / unsupported: record, go on
        compiled = None
        row.update(ms=None, error=_err(e))
    for key, scale in (("flops", 1e9), ("bytes", 1e6)):
        if row.get(key) and row.get("ms"):
            row["tflops" if key == "flops" else "gbps"] = row[key] / (row["ms"] * scale)
    return part.row(**row), compiled


def fwd_and_fwd_bwd(fn, n_diff: int):
    """``fwd(*args)`` and ``fwd_bwd(*args, ct)``: the vjp of ``fn`` in its first ``n_diff`` args."""
    import jax

    def fwd_bwd(*a):
        *args, ct = a
        out, vjp = jax.vjp(lambda *d: fn(*d, *args[n_diff:]), *args[:n_diff])
        return out, vjp(ct)

    return fn, fwd_bwd


def rel_err(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _worst(errs) -> float:
    """The largest error, NaN if any is NaN (``max`` would skip a NaN after a number)."""
    return float("nan") if any(e != e for e in errs) else max(errs)


# ============================================================================ 1. correct
def _segments(rng, b, t, n):
    import numpy as np
    ids = np.zeros((b, t), np.int32)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=n - 1, replace=False))
        for c in cuts:
            ids[i, c:] += 1
    return ids


def correctness_cases(smoke: bool, seed: int, interpret=None):
    """``[(name, kernel_fn, reference_fn, diff_args, static_args)]`` on fresh inputs (``interpret``
    goes to every kernel: None = interpret mode on a CPU backend, compiled on a GPU)."""
    import jax.numpy as jnp
    import numpy as np
    from pallas_kernels import flash_attention as fa
    from pallas_kernels import hadamard as hd
    from pallas_kernels import landmark_attention as lm
    from pallas_kernels import selective_scan as ss
    from pallas_kernels import sparse_attention as sa
    from pallas_kernels import ssd as ssd_mod
    from jaxformers.quant.quantizers import int8_linear, quantize_rows_int8

    rng = np.random.default_rng(seed)
    ip = interpret
    f32 = jnp.float32
    b, t = (2, 40) if smoke else (2, 333)
    d, dim, n, p, lm_block, w = (32, 16, 8, 16, 8, 16) if smoke else (64, 64, 16, 64, 51, 100)
    rows, had = (8, 64) if smoke else (64, 1024)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), f32)

    cases = []
    q, k, v = normal(b, t, 4, d), normal(b, t, 2, d), normal(b, t, 2, d)
    cases.append(("flash causal GQA 4:2", lambda q, k, v: fa.flash_attention(q, k, v, causal=True, interpret=ip),
                  lambda q, k, v: fa.reference(q, k, v, causal=True), (q, k, v), ()))
    d2 = 2 * d
    seg = jnp.asarray(_segments(rng, b, t, 3))
    cases.append((f"flash window {w} + packed segments D{d2}",
                  lambda q, k, v, s: fa.flash_attention(q, k, v, causal=True, window=w, segment_ids=s, interpret=ip),
                  lambda q, k, v, s: fa.reference(q, k, v, causal=True, window=w, segment_ids=s),
                  (normal(b, t, 2, d2), normal(b, t, 2, d2), normal(b, t, 2, d2)), (seg,)))
    ss_args = (normal(b, t, dim), normal(b, t, dim) - 2.0, -jnp.exp(normal(dim, n)), normal(b, t, n),
               normal(b, t, n), normal(dim), normal(b, t, dim), normal(dim, scale=0.1), normal(b, dim, n))
    ss_kw = dict(dt_softplus=True, return_final_state=True)

    def ss_call(op, **kw):
        return lambda x, dt, A, B, C, D, z, bias, h0, s: op(x, dt, A, B, C, D=D, z=z, dt_bias=bias,
                                                            initial_state=h0, segment_ids=s, **ss_kw, **kw)
    cases.append(("selective scan (D, z, softplus, initial state, segments, final state)",
                  ss_call(ss.selective_scan, interpret=ip), ss_call(ss.reference), ss_args, (seg,)))
    h, g, nn_ = 4, 2, (16 if smoke else 64)
    ssd_args = (normal(b, t, h, p), normal(b, t, h) - 2.0, -jnp.exp(normal(h)), normal(b, t, g, nn_),
                normal(b, t, g, nn_), normal(h), normal(b, t, h, p), normal(h, scale=0.1),
                normal(b, h, p, nn_))
    cases.append(("SSD (G=2, D, z, softplus, initial state, segments, final state)",
                  ss_call(ssd_mod.ssd, interpret=ip), ss_call(ssd_mod.reference), ssd_args, (seg,)))
    qb, kb = (jnp.asarray(rng.integers(0, 4, (b, t, hh)), jnp.int32) for hh in (4, 2))
    cases.append(("hash-sparse 4 buckets GQA 4:2", lambda q, k, v, a, c: sa.hash_attention(q, k, v, a, c, interpret=ip),
                  lambda q, k, v, a, c: sa.hash_reference(q, k, v, a, c), (q, k, v), (qb, kb)))
    qk_, kk_ = (jnp.asarray(rng.random((b, t, hh)) < 0.5) for hh in (4, 2))
    cases.append(("QK-sparse keep 0.5 GQA 4:2",
                  lambda q, k, v, a, c: sa.qk_sparse_attention(q, k, v, a, c, interpret=ip),
                  lambda q, k, v, a, c: sa.qk_sparse_reference(q, k, v, a, c), (q, k, v), (qk_, kk_)))
    cases.append((f"landmark L={lm_block} GQA 4:2 (o, lse)",
                  lambda q, k, v: lm.landmark_attention(q, k, v, block_size=lm_block, interpret=ip, return_lse=True),
                  lambda q, k, v: lm.landmark_attention_reference(q, k, v, block_size=lm_block, return_lse=True),
                  (q, k, v), ()))
    # 2^k, and Kronecker-factored sizes: 12 x 2^j (Paley) and 172 x 2^j (Goethals-Seidel,
    # LLaMA-2-7B's d_ff 11008 = 172 x 64); wider than 2048: split as H_s (x) H_2048
    for size in (had, 12 * had // 16, 172 * had // 64, 4096 if smoke else 8192):
        cases.append((f"Hadamard n={size}", lambda x: hd.hadamard_transform(x, interpret=ip),
                      lambda x: hd.hadamard_reference(x), (normal(rows, size),), ()))
    w_q, w_s = quantize_rows_int8(normal(256, 128))  # per output channel: rows of W^T [out, in]
    w_int8, w_scale = w_q.T, w_s[:, 0]

    def int8_ref(x, wq, ws):
        qx, sx = quantize_rows_int8(x)
        return (qx.astype(f32) @ wq.astype(f32)) * sx * ws
    cases.append(("int8 linear (int8 x int8 -> int32)", lambda x, wq, ws: int8_linear(x, wq, ws),
                  int8_ref, (), (normal(64, 128), w_int8, w_scale)))
    return cases


def part_correct(part: Part):
    import jax
    import numpy as np

    seed = int.from_bytes(os.urandom(4), "little")
    part.row(kind="seed", seed=seed)
    pipe = Pipeline(part)
    jobs = []
    for name, kfn, rfn, diff, static in correctness_cases(part.smoke, seed):
        n = len(diff)
        args = tuple(diff) + tuple(static)
        try:
            out_shape = jax.eval_shape(kfn, *args)
        except Exception as e:  # noqa: BLE001 - a case that cannot even trace fails alone
            part.row(kind="correct", case=name, ok=False, error=_err(e))
            continue
        ct = jax.tree.map(lambda s: jax.random.normal(jax.random.PRNGKey(seed % 2**31), s.shape, s.dtype)
                          if jax.numpy.issubdtype(s.dtype, jax.numpy.floating) else jax.numpy.zeros(s.shape, s.dtype),
                          out_shape)
        if n:
            kf, rf = fwd_and_fwd_bwd(kfn, n)[1], fwd_and_fwd_bwd(rfn, n)[1]
            call = args + (ct,)
        else:
            kf, rf, call = kfn, rfn, args
        jobs.append((name, pipe.add(kf, call), pipe.add(rf, call), call, n))
    for name, kfut, rfut, call, n in jobs:
        row = dict(kind="correct", case=name)
        try:
            kc, compile_s = pipe.result(kfut)
            rc, _ = pipe.result(rfut)
            got, again, want = kc(*call), kc(*call), rc(*call)
            got, again, want = jax.device_get((got, again, want))
            flat = lambda x: [np.asarray(a) for a in jax.tree.leaves(x)]  # noqa: E731
            g, a2, r = flat(got), flat(again), flat(want)
            errs = [rel_err(x, y) for x, y in zip(g, r)]
            tol = TOL["int8_linear"] if name.startswith("int8") else TOL["default"]
            worst = _worst(errs)
            row.update(compile_s=compile_s, out_rel_err=errs[0], rel_errs=errs, max_rel_err=worst, tol=tol,
                       ieee_level=bool(worst <= min(tol, TOL["ieee"])),
                       repeat_identical=all(np.array_equal(x, y, equal_nan=True) for x, y in zip(g, a2)))
            row["ok"] = bool(all(e <= tol for e in errs) and row["repeat_identical"])
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=_err(e))
        part.row(**row)


# ============================================================================ 2. attention
def part_ceilings(part: Part, pipe: Pipeline):
    """Device copy bandwidth and bf16 matmul rate (random data), the card's two ceilings."""
    import jax
    import jax.numpy as jnp
    n_copy, n_mm = (1 << 16, 128) if part.smoke else (1 << 29, 8192)
    x = jax.random.normal(jax.random.PRNGKey(1), (n_copy,), jnp.bfloat16)
    a = jax.random.normal(jax.random.PRNGKey(2), (n_mm, n_mm), jnp.bfloat16)
    bm = jax.random.normal(jax.random.PRNGKey(3), (n_mm, n_mm), jnp.bfloat16)
    f1 = pipe.add(lambda x: x * 2, (x,))
    f2 = pipe.add(lambda a, b: a @ b, (a, bm))
    run_timed(part, f1, (x,), kind="ceiling", case="copy (x * 2, bf16)", bytes=4 * n_copy)
    run_timed(part, f2, (a, bm), kind="ceiling", case=f"matmul bf16 {n_mm}^3", flops=2 * n_mm ** 3)


def causal_pairs(t: int, window=None, segment_ids=None) -> int:
    """Visible (query, key) pairs of causal attention (with a window of ``window`` keys, or
    within packed segments ``segment_ids [B, T]``, summed over B)."""
    import numpy as np
    if segment_ids is not None:
        total = 0
        for row in np.asarray(segment_ids):
            _, counts = np.unique(row, return_counts=True)
            total += int(sum(c * (c + 1) // 2 for c in counts))
        return total
    if window is None or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


def attention_inputs(b, t, h, d, dtype, seed=0):
    import jax
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return tuple(jax.random.normal(kk, (b, t, h, d), dtype) for kk in ks)


def attention_fns(impl, d, *, window=None, masked=False, segmented=False, block_sizes=None):
    """``fn(q, k, v, aux)`` of one causal attention implementation (None when not importable).
    ``aux``: the segment ids ``[B, T]`` (ours, ``segmented``), the mask ``[B, 1, T, T]`` (cuDNN /
    XLA, ``masked``) or None: an argument, not a constant baked into the compiled program."""
    import jax
    from pallas_kernels.flash_attention import flash_attention
    if impl == "pallas":
        return lambda q, k, v, aux: flash_attention(q, k, v, causal=True, window=window,
                                                    segment_ids=aux if segmented else None,
                                                    block_sizes=block_sizes)
    if impl in ("cudnn", "xla"):
        kw = dict(implementation=impl)
        if window is not None:
            kw["local_window_size"] = (window - 1, 0)
        if masked:
            return lambda q, k, v, aux: jax.nn.dot_product_attention(q, k, v, mask=aux, **kw)
        return lambda q, k, v, aux: jax.nn.dot_product_attention(q, k, v, is_causal=True, **kw)
    if impl == "jax_pallas":
        from experiments.bench_attention import jax_pallas_attention
        fn = jax_pallas_attention(d)
        return None if fn is None else (lambda q, k, v, aux: fn(q, k, v))
    raise ValueError(impl)


def attention_group(part, pipe, *, group, impls, b, t, h, d, dtype, pairs, extra=None, seed=0,
                    compare_to="cudnn", window=None, segment_ids=None, mask=None, block_sizes=None):
    """Submit fwd and fwd+bwd of each impl on one shape; returns a thunk that times them in order
    and records ours-vs-anchor output differences.  With ``segment_ids`` ours gets them and the
    anchors get ``mask``."""
    import jax
    q, k, v, do = attention_inputs(b, t, h, d, dtype, seed)
    flops = 4 * h * d * pairs
    submitted = []
    for impl in impls:
        if impl in ("cudnn", "jax_pallas") and not part.on_gpu:
            submitted.append((impl, None, None, "needs a GPU"))
            continue
        ours = impl == "pallas"
        aux = segment_ids if ours else mask
        fn = attention_fns(impl, d, window=window, block_sizes=block_sizes if ours else None,
                           segmented=ours and segment_ids is not None, masked=not ours and mask is not None)
        if fn is None:
            submitted.append((impl, None, None, "not importable in this jax"))
            continue
        fwd, fb = fwd_and_fwd_bwd(fn, 3)
        submitted.append((impl, (pipe.add(fwd, (q, k, v, aux)), pipe.add(fb, (q, k, v, aux, do))), aux, None))

    def finish():
        outs = {}
        for impl, futs, aux, skip in submitted:
            base = dict(kind="attention", group=group, impl=impl, batch=b, seq_len=t, heads=h, head_dim=d,
                        dtype=jax.numpy.dtype(dtype).name, **(extra or {}))
            if futs is None:
                for mode in ("fwd", "fwd+bwd"):
                    part.row(**base, mode=mode, ms=None, skipped=skip)
                continue
            r, compiled = run_timed(part, futs[0], (q, k, v, aux), **base, mode="fwd", flops=flops)
            if compiled is not None:
                outs[impl] = compiled(q, k, v, aux)
            run_timed(part, futs[1], (q, k, v, aux, do), **base, mode="fwd+bwd", flops=FWD_BWD_FLOPS * flops)
        if "pallas" in outs and compare_to in outs:
            part.row(kind="attention_diff", group=group, seq_len=t, head_dim=d, vs=compare_to,
                     rel_diff=rel_err(outs["pallas"].astype("float32"), outs[compare_to].astype("float32")))
    return finish


def part_attention(part: Part):
    import jax.numpy as jnp
    import numpy as np
    pipe = Pipeline(part)
    part_ceilings(part, pipe)
    if part.smoke:
        shapes, tokens, h, dtype, w, seg_t, seg_b = [(32, 64)], 128, 2, jnp.float32, 16, 64, 2
    else:
        shapes, tokens, h, dtype, w, seg_t, seg_b = ([(128, 16384), (64, 16384), (128, 4096), (64, 4096)],
                                                     16384, 16, jnp.bfloat16, 2048, 4096, 4)
    impls = ("pallas", "cudnn", "jax_pallas")
    thunks = []
    for i, (d, t) in enumerate(shapes):
        if i and t != shapes[i - 1][1]:
            pipe.stage()  # the longest T (the targets) compiled and timed first
        b = max(1, tokens // t)
        thunks.append(attention_group(part, pipe, group="causal", impls=impls, b=b, t=t, h=h, d=d,
                                      dtype=dtype, pairs=b * causal_pairs(t)))
    d, t = shapes[0]
    pipe.stage()
    thunks.append(attention_group(part, pipe, group=f"window {w}", impls=("pallas", "cudnn"), b=1, t=t, h=h,
                                  d=d, dtype=dtype, pairs=causal_pairs(t, window=w), window=w,
                                  extra=dict(window=w)))
    ids = _segments(np.random.default_rng(0), seg_b, seg_t, 4)
    same = ids[:, :, None] == ids[:, None, :]
    mask = jnp.asarray(np.tril(np.ones((seg_t, seg_t), bool))[None] & same)[:, None]  # [B, 1, T, T]
    thunks.append(attention_group(part, pipe, group="packed segments (4 per row)", impls=("pallas", "xla", "cudnn"),
                                  b=seg_b, t=seg_t, h=h, d=d, dtype=dtype, pairs=causal_pairs(seg_t, segment_ids=ids),
                                  segment_ids=jnp.asarray(ids), mask=mask, compare_to="xla"))
    for finish in thunks:
        finish()


# ============================================================================ 3. scan
def part_scan(part: Part):
    import jax.numpy as jnp
    from experiments import bench_scan as bs
    pipe = Pipeline(part)
    if part.smoke:
        ss_shape, ssd_shape, chunk, dtype = (1, 64, 16, 4), (1, 64, 2, 16, 16, 1), 16, jnp.float32
    else:
        ss_shape, ssd_shape, chunk, dtype = (4, 4096, 2048, 16), (4, 4096, 16, 128, 128, 1), 64, jnp.bfloat16
    b, l, dim, n = ss_shape
    ss_in = bs._ss_inputs(b, l, dim, n, dtype)
    bh, lh, hh, ph, nh, gh = ssd_shape
    ssd_in = bs._ssd_inputs(bh, lh, hh, ph, nh, gh, dtype)
    jobs = []
    for kernel, inputs, diff, impls, shape in (
            ("selective_scan", ss_in, ("x", "dt", "A", "B", "C", "D", "z"), bs.SS_IMPLS,
             f"B{b} L{l} D{dim} N{n}"),
            ("ssd", ssd_in, ("x", "dt", "A", "B", "C"), ("pallas", "reference"),
             f"B{bh} L{lh} H{hh} P{ph} N{nh} G{gh}")):
        for impl in impls:
            fn = bs._ss_fn(impl) if kernel == "selective_scan" else bs._ssd_fn(impl, chunk)

            def fwd(inp, fn=fn):
                return fn(**inp)

            def fwd_bwd(inp, dy, fn=fn, diff=diff):
                import jax
                d = {k: inp[k] for k in diff}
                rest = {k: v for k, v in inp.items() if k not in diff}
                y, vjp = jax.vjp(lambda d: fn(**rest, **d), d)
                return y, vjp(dy)
            dy = jnp.ones(inputs["x"].shape, inputs["x"].dtype)
            if kernel == "ssd" and impl == impls[0]:
                pipe.stage()
            jobs.append((dict(kind="scan", kernel=kernel, impl=impl, shape=shape, dtype=jnp.dtype(dtype).name),
                         pipe.add(fwd, (inputs,)), pipe.add(fwd_bwd, (inputs, dy)), inputs, dy))
    base = dict(kind="scan", kernel="ssd", impl="fla", shape=f"B{bh} L{lh} H{hh} P{ph} N{nh} G{gh}",
                dtype=jnp.dtype(dtype).name)

    def fla():
        if not part.on_gpu:
            for mode in ("fwd", "fwd+bwd"):
                part.row(**base, mode=mode, ms=None, skipped="fla only on a GPU")
            return
        part.pipe.wait_idle()
        # timed as time_ms times JAX (back-to-back calls, >= 20 ms a sample); each row written as
        # soon as it is measured (fla's first calls autotune its Triton kernels)
        for r in bs._bench_fla(base, ssd_in, warmup=2, iters=5, min_sample_ms=20.0):
            part.row(**r)
    # timing order, by value: the targets' rows (ours, associative_scan, fla), then the sequential
    # references (only for the kernels' difference from them)
    order = ([j for j in jobs if j[0]["impl"] != "reference"] + [None]
             + [j for j in jobs if j[0]["impl"] == "reference"])
    outs = {}
    for job in order:
        if job is None:
            fla()
            continue
        base_row, ff, fb, inputs, dy = job
        _, compiled = run_timed(part, ff, (inputs,), **base_row, mode="fwd")
        if compiled is not None:
            outs[(base_row["kernel"], base_row["impl"])] = compiled(inputs)
        run_timed(part, fb, (inputs, dy), **base_row, mode="fwd+bwd")
    for kernel in ("selective_scan", "ssd"):  # the kernels at the benchmark shapes vs the sequential oracle
        if (kernel, "pallas") in outs and (kernel, "reference") in outs:
            part.row(kind="scan_diff", kernel=kernel, vs="reference", rel_diff=rel_err(
                outs[(kernel, "pallas")].astype("float32"), outs[(kernel, "reference")].astype("float32")))


# ============================================================================ 4. models
def part_models(part: Part):
    import jax
    import jax.numpy as jnp
    import optax
    from experiments.bench_models import ModelBench
    from jaxformers import init_cache
    from jaxformers.training.metrics import model_flops_per_token, peak_flops

    if part.smoke:
        preset, models, train_bt, prefill_bt, gen_batches, prompt, new = (
            "tiny", ("gpt", "mamba2", "mamba"), (4, 64), (2, 64), (1, 4), 32, 8)
        dtype = "float32"
    else:
        preset, models, train_bt, prefill_bt, gen_batches, prompt, new = (
            "small", ("gpt", "mamba2", "mamba"), (32, 1024), (16, 1024), (1, 64), 1024, 64)
        dtype = "bfloat16"
    pipe = Pipeline(part)
    benches, jobs = {}, []
    peak = peak_flops()
    for name in models:  # order by value: every train step first (the MFU target), then inference
        try:
            mb = benches[name] = ModelBench(name, preset, dtype, max(train_bt[1], prompt + new))
        except Exception as e:  # noqa: BLE001
            part.row(kind="model", model=name, error=_err(e))
            continue
        module, tx = mb.module, mb.tx

        def step(params, opt_state, tokens, module=module, tx=tx):
            def loss_fn(p):
                logits = module.apply({"params": p}, tokens[:, :-1])
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits.astype(jnp.float32), tokens[:, 1:]).mean()
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss
        b, t = train_bt
        args = (mb.params, tx.init(mb.params), mb.random_tokens((b, t + 1)))
        fpt = model_flops_per_token(mb.config, t)
        jobs.append((dict(kind="model", model=name, task="train", batch=b, seq_len=t, n_params=mb.n_params,
                          attention=getattr(mb.config, "attention_impl", None), flops=fpt * b * t),
                     pipe.add(step, args), args))
    pipe.stage()  # the train steps (the MFU target) first
    for name, mb in benches.items():
        b, t = prefill_bt
        args = (mb.params, mb.random_tokens((b, t)))
        jobs.append((dict(kind="model", model=name, task="prefill", batch=b, seq_len=t, tokens=b * t),
                     pipe.add(_unjit(mb.prefill()), args), args))
    pipe.stage()
    for name, mb in benches.items():
        gen = _unjit(mb.generate(new))
        for b in gen_batches:
            cache = init_cache(mb.module, b, prompt + new)
            cache = dict(cache, index=jnp.asarray(prompt, jnp.int32))
            args = (mb.params, jnp.zeros((b, 1), jnp.int32), cache)
            jobs.append((dict(kind="model", model=name, task=f"decode b{b}", batch=b, prompt=prompt,
                              new_tokens=new, tokens=b * new), pipe.add(gen, args), args))
    for base, fut, args in jobs:
        row, _ = run_timed(part, fut, args, **base)
        if row.get("ms"):
            tokens = base.get("tokens") or base["batch"] * base["seq_len"]
            extra = dict(tokens_per_s=tokens / (row["ms"] * 1e-3))
            if base["task"] == "train" and peak:
                extra["mfu"] = row["flops"] / (row["ms"] * 1e-3) / peak
                extra["peak_tflops"] = peak / 1e12
            part.row(kind="model_rate", model=base["model"], task=base["task"], **extra)


def _unjit(f):
    """The Python function under ``jax.jit`` (the pipeline jits it again), else ``f``."""
    return getattr(f, "__wrapped__", f)


# ============================================================================ 5. kernels
def part_kernels(part: Part):
    import jax
    import jax.numpy as jnp
    from experiments.scfa_speed import _labels
    from pallas_kernels import sparse_attention as sa
    from pallas_kernels.flash_attention import flash_attention
    from pallas_kernels.hadamard import hadamard_matrix, hadamard_transform
    from pallas_kernels.landmark_attention import landmark_attention
    from jaxformers.quant.quantizers import int8_linear, quantize_rows_int8

    pipe = Pipeline(part)
    smoke = part.smoke
    dtype = jnp.float32 if smoke else jnp.bfloat16
    thunks = []
    # SCFA (issue 12 kernel targets): B1 T16k H16, D 64 and 128
    t, h, blk = (64, 2, 16) if smoke else (16384, 16, 64)
    for d in ((32,) if smoke else (64, 128)):
        q, k, v, do = attention_inputs(1, t, h, d, dtype, seed=d)
        (hq, hk), (kq, kk) = _labels("hash", 16, (1, t, h), 1), _labels("qk", 0.5, (1, t, h), 1)
        # labels are arguments (drawn once, outside the timed function), not baked-in constants
        impls = [("flash", lambda q, k, v, a, c: flash_attention(q, k, v, causal=True), (None, None)),
                 ("hash_nb16", lambda q, k, v, a, c: sa.hash_attention(q, k, v, a, c, block_q=blk, block_k=blk),
                  (hq, hk)),
                 ("qk_keep0.5", lambda q, k, v, a, c: sa.qk_sparse_attention(q, k, v, a, c, block_q=blk, block_k=blk),
                  (kq, kk))]
        if part.on_gpu:
            impls.insert(0, ("cudnn", lambda q, k, v, a, c: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn"), (None, None)))
        futs = []
        for name, fn, labels in impls:
            fwd, fb = fwd_and_fwd_bwd(fn, 3)
            futs.append((name, pipe.add(fwd, (q, k, v, *labels)), pipe.add(fb, (q, k, v, *labels, do)), labels))

        def scfa(futs=futs, q=q, k=k, v=v, do=do, d=d):
            for name, ff, fb, labels in futs:
                base = dict(kind="scfa", impl=name, batch=1, seq_len=t, heads=h, head_dim=d)
                run_timed(part, ff, (q, k, v, *labels), **base, mode="fwd")
                run_timed(part, fb, (q, k, v, *labels, do), **base, mode="fwd+bwd")
        thunks.append(scfa)
        pipe.stage()
    # landmark attention vs flash (same shape), T 4k B4 H16 D128, L=64
    lt, lb, ld, lbk = (64, 1, 32, 8) if smoke else (4096, 4, 128, 64)
    q, k, v, do = attention_inputs(lb, lt, h, ld, dtype, seed=7)
    lfuts = []
    for name, fn in (("flash", lambda q, k, v: flash_attention(q, k, v, causal=True)),
                     (f"landmark L={lbk}", lambda q, k, v: landmark_attention(q, k, v, block_size=lbk))):
        fwd, fb = fwd_and_fwd_bwd(fn, 3)
        lfuts.append((name, pipe.add(fwd, (q, k, v)), pipe.add(fb, (q, k, v, do))))

    def landmark(q=q, k=k, v=v, do=do):
        flops = 4 * h * ld * lb * causal_pairs(lt)
        for name, ff, fb in lfuts:
            base = dict(kind="landmark", impl=name, batch=lb, seq_len=lt, heads=h, head_dim=ld)
            run_timed(part, ff, (q, k, v), **base, mode="fwd", flops=flops)
            run_timed(part, fb, (q, k, v, do), **base, mode="fwd+bwd", flops=FWD_BWD_FLOPS * flops)
    thunks.append(landmark)
    pipe.stage()
    # Hadamard transform vs dense x @ H
    rows = 64 if smoke else 65536
    hfuts = []
    for n in ((64, 48) if smoke else (128, 1024, 4096, 11008)):  # 11008 = 172 x 64 (LLaMA-2-7B d_ff)
        x = jax.random.normal(jax.random.PRNGKey(n), (rows, n), dtype)
        hm = jnp.asarray(hadamard_matrix(n) * n ** -0.5, dtype)
        hfuts.append((n, x, hm, pipe.add(lambda x: hadamard_transform(x), (x,)),
                      pipe.add(lambda x, hm: jnp.matmul(x, hm, preferred_element_type=jnp.float32).astype(x.dtype),
                               (x, hm))))

    def hadamard():
        for n, x, hm, fp, fd in hfuts:
            nbytes = 2 * x.size * x.dtype.itemsize
            run_timed(part, fp, (x,), kind="hadamard", impl="pallas", n=n, rows=rows, bytes=nbytes)
            run_timed(part, fd, (x, hm), kind="hadamard", impl="dense x @ H", n=n, rows=rows, bytes=nbytes)
    thunks.append(hadamard)
    pipe.stage()
    # int8 linear (per-token activation quantization included) vs bf16 matmul
    m, kdim, ndim = (64, 128, 96) if smoke else (8192, 4096, 11008)
    x = jax.random.normal(jax.random.PRNGKey(3), (m, kdim), dtype)
    wf = jax.random.normal(jax.random.PRNGKey(4), (kdim, ndim), dtype)
    wq, ws = quantize_rows_int8(wf.T)
    wq, ws = wq.T, ws[:, 0]
    qx, _ = quantize_rows_int8(x)
    ifuts = [("bf16 x @ W", pipe.add(lambda x, w: x @ w, (x, wf)), (x, wf)),
             ("int8_linear (quantize x + int8 dot + scale)",
              pipe.add(lambda x, a, s: int8_linear(x, a, s), (x, wq, ws)), (x, wq, ws)),
             ("int8 dot only (int32 acc)", pipe.add(lambda a, b: jax.lax.dot_general(
                 a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32), (qx, wq)), (qx, wq))]

    def int8():
        for name, fut, args in ifuts:
            run_timed(part, fut, args, kind="int8", impl=name, m=m, k=kdim, n=ndim, flops=2 * m * kdim * ndim)
    thunks.append(int8)
    pipe.stage()
    thunks.append(lambda: layer_parallel_decode(part, pipe))
    for th in thunks:
        th()


def layer_parallel_decode(part: Part, pipe: Pipeline):
    """Greedy decode tokens/s (batch 1) of the layer-parallel Llama vs unpaired, random weights."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from experiments.layer_parallel import PRESETS
    from jaxformers import build, get_config, init_cache
    from jaxformers.transforms import pair_layers

    if part.smoke:
        model, prompt, new, pair_counts, dtype = dict(PRESETS["tiny"]["model"]), 16, 8, (1, 2), "float32"
    else:
        model, prompt, new, pair_counts, dtype = dict(PRESETS["gpu"]["model"]), 128, 64, (4, 6, 8), "bfloat16"
    cfg = get_config("llama", "tiny", vocab_size=256, dtype=dtype, param_dtype=dtype, **model)
    module = build(cfg)
    params = jax.jit(lambda r: nn.unbox(module.init(r, jnp.zeros((1, 8), jnp.int32)))["params"])(
        jax.random.key(0, impl="unsafe_rbg"))
    end = cfg.n_layer - 1
    variants = [("unpaired", cfg, params)]
    for k in pair_counts:
        pc, pp = pair_layers(cfg, params, end - 2 * k, end)
        variants.append((f"{k} pairs [{end - 2 * k}, {end})", pc, pp))
    futs = []
    for name, c, p in variants:
        mod = build(c)
        cache = dict(init_cache(mod, 1, prompt + new), index=jnp.asarray(prompt, jnp.int32))
        tok = jnp.zeros((1, 1), jnp.int32)

        def decode(p, tok, cache, mod=mod):
            def body(_, s):
                tok, cache = s
                logits, cache = mod.apply({"params": p}, tok, cache=cache)
                return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], cache
            return jax.lax.fori_loop(0, new, body, (tok, cache))[0]
        futs.append((name, pipe.add(decode, (p, tok, cache)), (p, tok, cache)))
    base_ms = None  # the unpaired model's time: no speed-up is claimed without it
    for name, fut, args in futs:
        row, _ = run_timed(part, fut, args, kind="layer_parallel", impl=name, n_layer=cfg.n_layer,
                           d_model=cfg.d_model, batch=1, new_tokens=new)
        if name == "unpaired":
            base_ms = row.get("ms")
        if row.get("ms"):
            part.row(kind="layer_parallel_rate", impl=name, tokens_per_s=new / (row["ms"] * 1e-3),
                     speedup=base_ms / row["ms"] if base_ms else None)


# ============================================================================ follow-ups
def part_flash_tiles(part: Part):
    """Flash attention tiles at T 16k (D 128, 64) vs cuDNN / mha in the same process."""
    import jax.numpy as jnp
    from pallas_kernels.flash_attention import BlockSizes
    pipe = Pipeline(part)
    if part.smoke:
        shapes, h, dtype = [(32, 64)], 2, jnp.float32
        grid = {32: [BlockSizes(16, 16), BlockSizes(32, 16)]}
    else:
        shapes, h, dtype = [(128, 16384), (64, 16384)], 16, jnp.bfloat16
        grid = {
            128: [BlockSizes.get_default(128), BlockSizes(128, 64, 64, 32, 32, 64, 8, 3, 8, 2),
                  BlockSizes(128, 128, 64, 64, 64, 64, 8, 2, 8, 2), BlockSizes(64, 64, 64, 64, 64, 64, 4, 3, 4, 3),
                  BlockSizes(128, 32, 128, 32, 32, 128, 8, 3, 8, 3), BlockSizes(128, 64, 128, 32, 64, 64, 8, 2, 8, 2)],
            64: [BlockSizes.get_default(64), BlockSizes(128, 64, 128, 32, 32, 128, 4, 3, 8, 3),
                 BlockSizes(128, 128, 128, 64, 64, 128, 8, 2, 8, 2), BlockSizes(64, 64, 64, 64, 64, 64, 4, 3, 4, 3),
                 BlockSizes(128, 32, 128, 32, 64, 64, 4, 4, 4, 2), BlockSizes(128, 64, 64, 64, 64, 64, 4, 2, 4, 2)]}
    thunks = []
    for d, t in shapes:
        if thunks:
            pipe.stage()
        b = max(1, (16384 if not part.smoke else 64) // t)
        thunks.append(attention_group(part, pipe, group="causal anchors", impls=("cudnn", "jax_pallas"), b=b, t=t,
                                      h=h, d=d, dtype=dtype, pairs=b * causal_pairs(t)))
        for bs in grid[d]:
            tag = (f"fwd {bs.block_q}x{bs.block_k} w{bs.num_warps} s{bs.num_stages} | dq {bs.block_q_dq}x"
                   f"{bs.block_k_dq} dkv {bs.block_q_dkv}x{bs.block_k_dkv} w{bs.num_warps_bwd} s{bs.num_stages_bwd}")
            thunks.append(attention_group(part, pipe, group="tiles " + tag, impls=("pallas",), b=b, t=t, h=h, d=d,
                                          dtype=dtype, pairs=b * causal_pairs(t), block_sizes=bs,
                                          extra=dict(tiles=tag)))
    for th in thunks:
        th()


def part_scfa_tiles(part: Part):
    """Sparse kernels' block_q x block_k x warps at T 16k, H16 D64 / D128, vs cuDNN."""
    import jax
    import jax.numpy as jnp
    from experiments.scfa_speed import _labels
    from pallas_kernels import sparse_attention as sa
    pipe = Pipeline(part)
    t, h, ds, dtype = (64, 2, (32,), jnp.float32) if part.smoke else (16384, 16, (64, 128), jnp.bfloat16)
    tiles = ([(16, 16, None)] if part.smoke else
             [(64, 64, None), (128, 64, None), (64, 128, None), (128, 128, 8), (64, 64, 8)])
    jobs = []
    for d in ds:
        q, k, v, do = attention_inputs(1, t, h, d, dtype, seed=d)
        labels = {"hash_nb16": _labels("hash", 16, (1, t, h), 1), "qk_keep0.5": _labels("qk", 0.5, (1, t, h), 1)}
        fns = []
        if part.on_gpu:
            fns.append(("cudnn", None, lambda q, k, v, a, c: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn"), (None, None)))
        for name, lab in labels.items():
            op = sa.hash_attention if name.startswith("hash") else sa.qk_sparse_attention
            for bq, bk, nw in tiles:
                fns.append((name, f"{bq}x{bk} w{nw or 'default'}",
                            lambda q, k, v, a, c, op=op, bq=bq, bk=bk, nw=nw:
                            op(q, k, v, a, c, block_q=bq, block_k=bk, num_warps=nw), lab))
        for name, tag, fn, lab in fns:
            _, fb = fwd_and_fwd_bwd(fn, 3)
            args = (q, k, v, *lab, do)
            jobs.append((dict(kind="scfa_tiles", impl=name, tiles=tag, seq_len=t, heads=h, head_dim=d),
                         pipe.add(fb, args), args))
    for base, fut, args in jobs:
        run_timed(part, fut, args, **base, mode="fwd+bwd")


PART_FNS = dict(correct=part_correct, attention=part_attention, scan=part_scan, models=part_models,
                kernels=part_kernels, flash_tiles=part_flash_tiles, scfa_tiles=part_scfa_tiles)


# ============================================================================ collecting
def read_rows(work: Path, parts) -> list:
    rows = []
    for p in parts:
        path = work / f"{p}.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    pass
    return rows


def _ms(rows, **match):
    for r in rows:
        if r.get("ms") and all(r.get(k) == v for k, v in match.items()):
            return r["ms"]
    return None


def _ratio(num, den):
    return num / den if num and den else None


def evaluate_targets(rows) -> list:
    """Each target's measured ratio (None when a side is missing) and whether it is met."""
    att = [r for r in rows if r.get("kind") == "attention" and r.get("group") == "causal"]
    t_max = max((r["seq_len"] for r in att), default=None)
    dims = sorted({r["head_dim"] for r in att if r["seq_len"] == t_max})

    def worst(values):
        values = [v for v in values if v is not None]
        return min(values) if len(values) == len(dims) and values else None

    measured = {}
    measured["flash_fwd_vs_cudnn"] = worst(
        [_ratio(_ms(att, impl="cudnn", head_dim=d, seq_len=t_max, mode="fwd"),
                _ms(att, impl="pallas", head_dim=d, seq_len=t_max, mode="fwd")) for d in dims])
    measured["flash_fwdbwd_vs_mha"] = worst(
        [_ratio(_ms(att, impl="jax_pallas", head_dim=d, seq_len=t_max, mode="fwd+bwd"),
                _ms(att, impl="pallas", head_dim=d, seq_len=t_max, mode="fwd+bwd")) for d in dims])
    scan = [r for r in rows if r.get("kind") == "scan"]
    for mode, key in (("fwd", "selective_scan_fwd_vs_assoc"), ("fwd+bwd", "selective_scan_fwdbwd_vs_assoc")):
        measured[key] = _ratio(_ms(scan, kernel="selective_scan", impl="assoc_scan", mode=mode),
                               _ms(scan, kernel="selective_scan", impl="pallas", mode=mode))
    measured["ssd_fwd_vs_fla"] = _ratio(_ms(scan, kernel="ssd", impl="pallas", mode="fwd"),
                                        _ms(scan, kernel="ssd", impl="fla", mode="fwd"))
    mfu = [r.get("mfu") for r in rows if r.get("kind") == "model_rate" and r.get("model") == "gpt"
           and r.get("task") == "train"]
    measured["gpt_small_mfu"] = mfu[0] if mfu else None
    sc = [r for r in rows if r.get("kind") == "scfa"]
    sdims = sorted({r["head_dim"] for r in sc})
    for impl, key in (("hash_nb16", "hash16_fwdbwd_vs_cudnn"), ("qk_keep0.5", "qk50_fwdbwd_vs_cudnn")):
        vals = [_ratio(_ms(sc, impl="cudnn", head_dim=d, mode="fwd+bwd"),
                       _ms(sc, impl=impl, head_dim=d, mode="fwd+bwd")) for d in sdims]
        measured[key] = min(vals) if sdims and all(v is not None for v in vals) else None
    lp = [r["speedup"] for r in rows if r.get("kind") == "layer_parallel_rate" and r.get("impl") != "unpaired"
          and r.get("speedup") is not None]
    measured["layer_parallel_decode"] = max(lp) if lp else None
    out = []
    for key, desc, goal, op in TARGETS:
        m = measured.get(key)
        met = None if m is None else (m >= goal if op == ">=" else m <= goal)
        # how far off: the factor the measured value must still improve by (1 or less: met)
        gap = None if not m else (goal / m if op == ">=" else m / goal)
        out.append(dict(key=key, target=desc, goal=f"{op} {goal:g}", measured=m, met=met, gap=gap))
    return out


def _f(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:.{nd}e}" if (abs(x) < 10 ** -nd and x != 0) else f"{x:.{nd}f}"
    return str(x)


def _cell(x) -> str:
    """``x`` as one Markdown table cell: ``|`` escaped, one line (the follow-up's tile tags and
    error messages contain ``|``)."""
    return " ".join(str(x).split()).replace("|", "\\|")


def markdown(results: dict) -> str:
    rows, env = results["rows"], results.get("env", {})
    L = [f"### GPU check: {env.get('device', '?')} ({env.get('backend', '?')}), {results['date']}, "
         f"jax {env.get('jax_version', '?')}", "",
         f"Command: `{results['command']}` ({results['wall_s']:.0f} s in all).", "",
         "| part | status | seconds | rows |", "|---|---|---|---|"]
    for p in results["parts"]:
        L.append(f"| {p['part']} | {_cell(p['status'])} | {p['wall_s']:.0f} | {p['rows']} |")
    L += ["", "**Targets** (ratios measured in the same run; gap: the factor still missing)", "",
          "| target | goal | measured | met | gap |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        gap = f"{t['gap']:.2f}x" if t.get("met") is False and t.get("gap") else ""
        L.append(f"| {t['target']} | {t['goal']} | {_f(t['measured'])} | {met} | {gap} |")
    corr = [r for r in rows if r.get("kind") == "correct"]
    if corr:
        L += ["", "**Correctness on the device** (float32, fwd + every gradient vs the float32 reference; "
              f"seed {next((r['seed'] for r in rows if r.get('kind') == 'seed'), '?')})", "",
              "| case | max rel. error | tol | IEEE-float32 level (<= 1e-4) | run twice: identical | ok |",
              "|---|---|---|---|---|---|"]
        for r in corr:
            L.append(f"| {_cell(r['case'])} | {_f(r.get('max_rel_err'))} | {_f(r.get('tol'))} | "
                     f"{r.get('ieee_level', '-')} | {r.get('repeat_identical', '-')} | "
                     f"{'yes' if r.get('ok') else '**no** ' + _cell(r.get('error', ''))} |")
    ceil = [r for r in rows if r.get("kind") == "ceiling"]
    if ceil:
        L += ["", "**Ceilings of this card**: " + "; ".join(
            f"{r['case']}: {_f(r.get('gbps') or r.get('tflops'), 0)} {'GB/s' if r.get('gbps') else 'TFLOP/s'}"
            for r in ceil if r.get("ms"))]
    att = [r for r in rows if r.get("kind") == "attention"]
    if att:
        L += ["", f"**Attention** (bf16, H16; TFLOP/s over the visible pairs; fwd+bwd = {FWD_BWD_FLOPS:g}x fwd "
              "FLOPs)", "",
              "| group | D | B x T | impl | fwd ms | fwd TF/s | fwd+bwd ms | fwd+bwd TF/s | note |",
              "|---|---|---|---|---|---|---|---|---|"]
        keys = []
        for r in att:
            k = (r["group"], r["head_dim"], r["batch"], r["seq_len"], r["impl"])
            if k not in keys:
                keys.append(k)
        for g, d, b, t, impl in keys:
            f = {r["mode"]: r for r in att if (r["group"], r["head_dim"], r["batch"], r["seq_len"], r["impl"]) ==
                 (g, d, b, t, impl)}
            fw, fb = f.get("fwd", {}), f.get("fwd+bwd", {})
            note = fw.get("skipped") or fw.get("error") or fb.get("error") or ""
            L.append(f"| {_cell(g)} | {d} | {b} x {t} | {_cell(impl)} | {_f(fw.get('ms'), 3)} | "
                     f"{_f(fw.get('tflops'), 0)} | {_f(fb.get('ms'), 3)} | {_f(fb.get('tflops'), 0)} | "
                     f"{_cell(note[:100])} |")
    diffs = [r for r in rows if r.get("kind") in ("attention_diff", "scan_diff")]
    if diffs:
        L += ["", "Our output vs the anchor's at the benchmark shapes (bf16 inputs, rel. difference): " + "; ".join(
            (f"{r['group']} D{r['head_dim']} T{r['seq_len']}" if r["kind"] == "attention_diff" else r["kernel"])
            + f" vs {r['vs']}: {_f(r['rel_diff'], 4)}" for r in diffs)]
    for kind, title, cols in (
            ("scan", "**Scans**", ("kernel", "shape", "impl", "mode")),
            ("scfa", "**Sparse causal flash attention** (B1 T16k H16; sparse times include the sort)",
             ("impl", "head_dim", "mode")),
            ("landmark", "**Landmark attention vs flash**", ("impl", "batch", "seq_len", "head_dim", "mode")),
            ("hadamard", "**Hadamard transform** (GB/s: read + write of x)", ("impl", "n", "rows")),
            ("int8", "**int8 linear vs bf16 matmul** (TFLOP/s or TOP/s)", ("impl", "m", "k", "n")),
            ("model", "**Models** (AdamW step, bf16 compute, fp32 params)", ("model", "task", "batch", "seq_len")),
            ("layer_parallel", "**Layer-parallel decode** (batch 1, random weights)", ("impl", "n_layer")),
            ("scfa_tiles", "**SCFA tiles** (fwd+bwd)", ("impl", "tiles", "head_dim"))):
        sel = [r for r in rows if r.get("kind") == kind]
        if not sel:
            continue
        L += ["", title, "", "| " + " | ".join(cols) + " | ms | rate | note |", "|" + "---|" * (len(cols) + 3)]
        rates = {(r.get("model"), r.get("task"), r.get("impl")): r for r in rows if r.get("kind", "").endswith("_rate")}
        for r in sel:
            rate = r.get("tflops") or r.get("gbps")
            extra = rates.get((r.get("model"), r.get("task"), r.get("impl") if kind == "layer_parallel" else None))
            if extra:
                bits = [f"{extra['tokens_per_s']:,.0f} tok/s"]
                if extra.get("mfu") is not None:
                    bits.append(f"MFU {100 * extra['mfu']:.1f}%")
                if extra.get("mfu_vs_measured") is not None:
                    bits.append(f"{100 * extra['mfu_vs_measured']:.1f}% of the measured matmul rate")
                if extra.get("speedup") is not None:
                    bits.append(f"{extra['speedup']:.2f}x")
                rate = ", ".join(bits)
            note = r.get("skipped") or r.get("error") or ""
            L.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) +
                     f" | {_f(r.get('ms'), 3)} | {rate if isinstance(rate, str) else _f(rate, 1)} | "
                     f"{_cell(note[:100])} |")
    return "\n".join(L) + "\n"


# ============================================================================ driver
def run_part(name: str, work: Path, smoke: bool) -> int:
    import jax
    if smoke:
        jax.config.update("jax_platforms", "cpu")
    with Part(name, work, smoke) as part:  # its pipeline's threads end with it
        test_hook = os.environ.get("JAXFORMERS_GPU_CHECK_TEST", "")  # the tests' hang / crash of one part
        if test_hook == f"hang:{name}":
            time.sleep(1e6)
        if test_hook == f"fail:{name}":
            raise RuntimeError(f"{name}: failing on purpose (JAXFORMERS_GPU_CHECK_TEST)")
        PART_FNS[name](part)
    return 0


def orchestrate(parts, out: Path, work: Path, *, smoke: bool, budgets: dict, deadline: float, command: str) -> dict:
    """Run ``parts`` one process each, under their budgets and ``deadline``; returns the results.
    ``results.json`` and ``table.md`` are rewritten after each part and every ``REFRESH_S`` while a
    part runs (its status then says ``running``), so a run killed from outside (the device's
    command timeout) still returns everything measured until then.  A SIGTERM / SIGHUP (the
    device's ``timeout``) kills the running part too (it runs in its own session and would
    otherwise keep the GPU for the next command), then writes the results and exits.  Each part's
    row file in ``work`` is emptied before it starts (or is skipped), so no row of an earlier run
    on the same machine is reported as this run's."""
    import signal
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    status = []
    log = out / "log.txt"
    log.write_text("")

    def write(extra=()):
        return write_results(out, work, parts, status + list(extra), command=command, smoke=smoke,
                             wall_s=time.perf_counter() - t_start)

    def terminated(signum, _frame):
        raise _Terminated(signum)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, terminated)
    try:
        return _run_parts(parts, work, log, status, write, t_start, smoke=smoke, budgets=budgets,
                          deadline=deadline)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Terminated(BaseException):
    """A SIGTERM / SIGHUP reached the driver (the device's command limit)."""


def _run_parts(parts, work, log, status, write, t_start, *, smoke, budgets, deadline) -> dict:
    for name in parts:
        (work / f"{name}.jsonl").unlink(missing_ok=True)  # an earlier run's rows are not this run's
    for name in parts:
        left = deadline - (time.perf_counter() - t_start)
        budget = min(budgets.get(name, SMOKE_BUDGET_S if smoke else BUDGET[name]), left)
        if budget < MIN_BUDGET_S:
            status.append(dict(part=name, status="skipped: out of time", wall_s=0.0, rows=0))
            continue
        env = dict(os.environ, PYTHONUNBUFFERED="1", **PART_ENV.get(name, {}))
        cmd = [sys.executable, "-m", "experiments.gpu_check", "--part", name, "--work", str(work)]
        if smoke:
            cmd.append("--smoke")
        t0 = time.perf_counter()
        print(f"== {name} (budget {budget:.0f} s)", flush=True)
        with log.open("a") as f:
            f.write(f"\n===== part {name} (budget {budget:.0f} s)\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=_die_with_parent)
            try:
                while True:
                    waited = time.perf_counter() - t0
                    try:
                        rc = proc.wait(timeout=max(0.0, min(REFRESH_S, budget - waited)))
                        state = "ok" if rc == 0 else f"failed (exit {rc})"
                        break
                    except subprocess.TimeoutExpired:
                        if time.perf_counter() - t0 >= budget:
                            state = f"timed out after {budget:.0f} s"
                            if not _kill(proc):
                                state += " (its process did not exit when killed)"
                            break
                        try:
                            write([dict(part=name, status="running (the run ended during this part)",
                                        wall_s=time.perf_counter() - t0, rows=len(read_rows(work, [name])))])
                        except Exception as e:  # noqa: BLE001 - an interim copy must never stop the run
                            print(f"   (results not refreshed: {_err(e)})", flush=True)
            except _Terminated as e:  # the part dies with the driver; what was measured is written
                _kill(proc)
                status.append(dict(part=name, status=f"killed: the driver got signal {e.args[0]}",
                                   wall_s=time.perf_counter() - t0, rows=len(read_rows(work, [name]))))
                print(f"   killed (signal {e.args[0]}) in part {name}", flush=True)
                write()
                raise SystemExit(128 + e.args[0]) from None
        wall = time.perf_counter() - t0
        n_rows = len(read_rows(work, [name]))
        status.append(dict(part=name, status=state, wall_s=wall, rows=n_rows))
        print(f"   {state} in {wall:.0f} s, {n_rows} rows", flush=True)
        write()
    results = write()
    print(markdown(results), flush=True)
    return results


def write_results(out: Path, work: Path, parts, status, *, command: str, smoke: bool, wall_s: float) -> dict:
    """``out/results.json`` and ``out/table.md`` from the parts' row files and ``status``
    (each file replaced whole: a reader never sees half of one)."""
    import datetime
    rows = add_ceiling_mfu(read_rows(work, parts))
    env_rows = [r for r in rows if r.get("kind") == "env"]
    results = dict(command=command, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   smoke=smoke, wall_s=wall_s, env=env_rows[0] if env_rows else {},
                   parts=list(status), targets=evaluate_targets(rows), rows=rows)
    for name, text in (("results.json", json.dumps(results, indent=1, default=_jsonable) + "\n"),
                       ("table.md", markdown(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return results


def add_ceiling_mfu(rows: list) -> list:
    """Training rows' MFU also against the matmul rate measured on this card in the same run
    (``mfu_vs_measured``), when the attention part measured it."""
    ceiling = next((r["tflops"] for r in rows if r.get("kind") == "ceiling" and r.get("case", "").startswith("matmul")
                    and r.get("tflops")), None)
    for r in rows:
        if ceiling and r.get("kind") == "model_rate" and r.get("mfu") is not None and r.get("peak_tflops"):
            r["mfu_vs_measured"] = r["mfu"] * r["peak_tflops"] / ceiling
            r["measured_matmul_tflops"] = ceiling
    return rows


def _die_with_parent():
    """In the part's process (Linux): SIGKILL it when the driver dies, even by SIGKILL (the device's
    ``timeout -k``), so no part outlives the command holding the GPU."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the SIGTERM handler still covers a normal end
        pass


KILL_WAIT_S = 20.0  # how long a killed part may take to exit before the driver goes on without it


def _kill(proc) -> bool:
    """SIGKILL the part's process group; False when it has not exited ``KILL_WAIT_S`` later (stuck in
    the GPU driver, say): the driver goes on rather than wait for it forever."""
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    try:
        proc.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        print(f"   (process {proc.pid} still there {KILL_WAIT_S:.0f} s after SIGKILL; going on)", flush=True)
        return False
    return True


def _budgets(items, ap=None) -> dict:
    """``--budget PART=SECONDS`` items -> ``{part: seconds}``; a bad item is a usage error
    (``ap.error``), or ``SystemExit(message)`` without a parser."""
    def fail(message):
        if ap is None:
            raise SystemExit(message)
        ap.error(message)

    out = {}
    for item in items or []:
        name, _, sec = item.partition("=")
        try:
            seconds = float(sec)
        except ValueError:
            seconds = None
        if name not in ALL_PARTS or seconds is None:
            fail(f"--budget: expected PART=SECONDS with PART in {list(ALL_PARTS)} and SECONDS a number, "
                 f"got {item!r}")
        if not seconds >= MIN_BUDGET_S:  # also NaN
            fail(f"--budget {item}: a part needs at least {MIN_BUDGET_S} s (PART=SECONDS)")
        out[name] = seconds
    return out


def _setup_s() -> float:
    """Seconds since scripts/gpu_check.sh started (``JAXFORMERS_GPU_CHECK_T0``, epoch seconds): its
    set-up counts against ``--deadline``.  0 when unset or not a number."""
    try:
        t0 = float(os.environ.get("JAXFORMERS_GPU_CHECK_T0", ""))
    except ValueError:
        return 0.0
    return max(0.0, time.time() - t0) if math.isfinite(t0) else 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("parts", nargs="*", help=f"parts to run: {', '.join(ALL_PARTS)}, 'check' (= "
                    f"{','.join(CHECK_PARTS)}, the default), 'followup' (= {','.join(FOLLOWUP_PARTS)}) or "
                    "'gpu-quick' (= correct)")
    ap.add_argument("--out", default="runs/gpu_check", help="folder for results.json, table.md, log.txt")
    ap.add_argument("--work", help="folder for the parts' row files (default OUT/../<OUT name>.parts)")
    ap.add_argument("--gpu-quick", action="store_true", help="run the 'correct' part (every kernel family "
                    "against its reference on the device, about a minute)")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, interpret mode (for the tests)")
    ap.add_argument("--budget", action="append", metavar="PART=SECONDS",
                    help=f"override a part's time budget (SECONDS >= {MIN_BUDGET_S})")
    ap.add_argument("--deadline", type=float,
                    help=f"seconds (> 0) for the whole run (default {DEADLINE_S}, the follow-up alone "
                    f"{FOLLOWUP_DEADLINE_S}; smoke: none), counted from scripts/gpu_check.sh's start "
                    "when it runs this")
    ap.add_argument("--part", choices=ALL_PARTS, help=argparse.SUPPRESS)  # one part, in this process
    args = ap.parse_args(argv)
    if args.part:
        return run_part(args.part, Path(args.work), args.smoke)
    from experiments.common import check_out
    check_out(ap, args.out)
    if args.deadline is not None and not args.deadline > 0:  # also NaN; inf: no limit
        ap.error(f"--deadline must be > 0 seconds, got {args.deadline}")
    budgets = _budgets(args.budget, ap)
    parts = []
    for p in (args.parts or ([] if args.gpu_quick else ["check"])) + (["correct"] if args.gpu_quick else []):
        p = ALIASES.get(p, p)
        for q in (CHECK_PARTS if p == "check" else FOLLOWUP_PARTS if p == "followup" else [p]):
            if q not in ALL_PARTS:
                ap.error(f"unknown part {q!r}; choose from {list(ALL_PARTS)}, 'check' or 'followup'")
            if q not in parts:
                parts.append(q)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / f".{out.name}.parts"
    default = FOLLOWUP_DEADLINE_S if set(parts) <= set(FOLLOWUP_PARTS) else DEADLINE_S
    deadline = args.deadline if args.deadline is not None else math.inf if args.smoke else default
    deadline -= _setup_s()
    command = "python -m experiments.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    results = orchestrate(parts, out, work, smoke=args.smoke, budgets=budgets, deadline=deadline,
                          command=command)
    return 0 if all(p["status"] == "ok" for p in results["parts"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
