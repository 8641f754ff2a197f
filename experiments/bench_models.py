"""Benchmark whole models: training, prefill and generation throughput (attention vs Mamba).

    python -m experiments.bench_models [--out DIR] [--models gpt,mamba] [--quick]

Default sweep (meant for a GPU): each model at its ``small`` preset (gpt ~124M,
mamba ~130M), compute dtype bfloat16 on GPU/TPU (float32 on CPU), float32 params.

* ``train``: one jitted forward + backward + AdamW step (``optax.adamw``, params and
  optimizer state donated) on ``[B, T]`` random tokens, at T in {2k, 8k, 32k} with a
  fixed ``--tokens`` per batch (32k: B = tokens // T, at least 1).
* ``prefill``: one jitted forward that fills a fresh decoding cache for the same
  ``[B, T]`` (returns the last position's logits and the cache).
* ``generate``: ``--gen-tokens`` greedy decode steps inside one jitted
  ``lax.fori_loop`` at batch sizes {1, 8, 32, 128}, from a cache allocated for
  ``--gen-prompt + --gen-tokens`` tokens whose index starts at ``--gen-prompt`` (a
  step's cost does not depend on the cache contents, so no prefill is run).

Each row is compiled first (``compile_s``), run ``--warmup`` times, then timed
``--iters`` times with ``block_until_ready``; the median is reported.  A row that
runs out of memory (or fails otherwise) is recorded with ``status`` "oom" (or
"error") and the sweep goes on.  Prints a table and writes ``DIR/results.json``
(device, device kind, date, jax / flax versions, one entry per row), rewritten after every
model (``complete`` is true once the last one is done: a sweep cut short keeps its rows).

``--quick``: tiny presets, T in {64, 128} with 512 tokens per batch, generation batches
{1, 4} -- a CPU smoke run of well under a minute.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time
from pathlib import Path

from experiments.common import (check_counts, check_out, is_out_of_memory, parse_list, start_results,
                                write_json)

FULL = dict(preset="small", seq_lens=(2048, 8192, 32768), tokens=32768, gen_batches=(1, 8, 32, 128),
            gen_prompt=1024, gen_tokens=128, warmup=2, iters=10)
QUICK = dict(preset="tiny", seq_lens=(64, 128), tokens=512, gen_batches=(1, 4), gen_prompt=32,
             gen_tokens=16, warmup=1, iters=3)


def _parser():
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_models", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke configuration")
    ap.add_argument("--out", default="runs/bench_models", help="output directory (default runs/bench_models)")
    ap.add_argument("--models", default="gpt,mamba", help="comma-separated registered models (default gpt,mamba)")
    ap.add_argument("--preset", help="model preset (default: small, or tiny with --quick)")
    ap.add_argument("--seq-lens", help="comma-separated T for train / prefill")
    ap.add_argument("--tokens", type=int, help="tokens per train / prefill batch (B = tokens // T, >= 1)")
    ap.add_argument("--gen-batches", help="comma-separated generation batch sizes")
    ap.add_argument("--gen-prompt", type=int, help="generation: tokens already in the cache")
    ap.add_argument("--gen-tokens", type=int, help="generation: decode steps timed")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    ap.add_argument("--warmup", type=int, help="untimed calls per row (>= 0)")
    ap.add_argument("--iters", type=int, help="timed calls per row (>= 1)")
    return ap


def _time(fn, state, *, warmup: int, iters: int, carry: bool = False):
    """Median seconds of ``fn(*state)``; with ``carry`` the output becomes the next input (donation)."""
    import jax

    def call(s):
        out = fn(*s)
        jax.block_until_ready(out)
        return out

    for _ in range(warmup):
        out = call(state)
        if carry:
            state = out[:len(state) - 1] + (state[-1],)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = call(state)
        times.append(time.perf_counter() - t0)
        if carry:
            state = out[:len(state) - 1] + (state[-1],)
    return statistics.median(times)


class ModelBench:
    """Compiled train / prefill / generate functions of one registered model."""

    def __init__(self, name: str, preset: str, dtype: str, max_len: int):
        import jax
        import jax.numpy as jnp
        import flax.linen as nn
        import optax
        from jaxformers import build, get_config

        base = get_config(name, preset)
        self.config = get_config(name, preset, dtype=dtype, param_dtype="float32",
                                 max_seq_len=max(max_len, base.max_seq_len))
        self.module = build(self.config)
        self.tx = optax.adamw(1e-4, weight_decay=0.1)
        tokens0 = jnp.zeros((1, 8), jnp.int32)
        # The model's own initializers, driven by the "unsafe_rbg" PRNG: its init compiles several
        # times faster than threefry's on CPU, and parameter values do not change throughput.
        self.params = jax.jit(lambda r: nn.unbox(self.module.init(r, tokens0))["params"])(
            jax.random.key(0, impl="unsafe_rbg"))
        self.n_params = int(sum(x.size for x in jax.tree.leaves(self.params)))

    def random_tokens(self, shape, seed=0):
        import jax.numpy as jnp
        import numpy as np

        return jnp.asarray(np.random.default_rng(seed).integers(0, self.config.vocab_size, shape), jnp.int32)

    # -------------------------------------------------------------- train
    def train_step(self):
        import jax
        import optax

        module, tx = self.module, self.tx

        def loss_fn(params, tokens):
            logits = module.apply({"params": params}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype("float32"), tokens[:, 1:]).mean()

        def step(params, opt_state, tokens):
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        return jax.jit(step, donate_argnums=(0, 1))

    # -------------------------------------------------------------- prefill
    def prefill(self):
        import jax
        from jaxformers import init_cache

        module = self.module

        def fn(params, tokens):
            b, t = tokens.shape
            logits, cache = module.apply({"params": params}, tokens, cache=init_cache(module, b, t))
            return logits[:, -1], cache

        return jax.jit(fn)

    # -------------------------------------------------------------- generate
    def generate(self, n_tokens: int):
        import jax
        import jax.numpy as jnp

        module = self.module

        def fn(params, tok, cache):
            def body(_, state):
                tok, cache = state
                logits, cache = module.apply({"params": params}, tok, cache=cache)
                return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None], cache

            return jax.lax.fori_loop(0, n_tokens, body, (tok, cache))

        return jax.jit(fn)


def _row(kind, model, **kw):
    return {"kind": kind, "model": model, **kw}


def _run_row(row, build_and_time):
    """Fill ``row`` with the timing from ``build_and_time()`` or the failure."""
    try:
        row.update(build_and_time())
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one failing row must not end the sweep
        row["status"] = "oom" if is_out_of_memory(e) else "error"
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    gc.collect()
    return row


def bench_model(name: str, cfg: dict, dtype: str) -> list:
    import jax
    import jax.numpy as jnp
    from jaxformers import init_cache

    max_len = max(max(cfg["seq_lens"]), cfg["gen_prompt"] + cfg["gen_tokens"])
    mb = ModelBench(name, cfg["preset"], dtype, max_len)
    rows = []
    timing = dict(warmup=cfg["warmup"], iters=cfg["iters"])
    info = dict(preset=cfg["preset"], n_params=mb.n_params, dtype=dtype)

    for t in cfg["seq_lens"]:
        b = max(1, cfg["tokens"] // t)

        def train_row(t=t, b=b):
            step = mb.train_step()
            params = jax.tree.map(jnp.copy, mb.params)  # donated below; keep mb.params intact
            opt_state = mb.tx.init(params)
            tokens = mb.random_tokens((b, t + 1))
            t0 = time.perf_counter()
            compiled = step.lower(params, opt_state, tokens).compile()
            compile_s = time.perf_counter() - t0
            sec = _time(compiled, (params, opt_state, tokens), carry=True, **timing)
            return {"compile_s": compile_s, "ms": sec * 1e3, "tokens_per_s": b * t / sec}

        rows.append(_run_row(_row("train", name, seq_len=t, batch=b, **info), train_row))
        print(_fmt(rows[-1]), file=sys.stderr, flush=True)

        def prefill_row(t=t, b=b):
            fn = mb.prefill()
            tokens = mb.random_tokens((b, t))
            t0 = time.perf_counter()
            compiled = fn.lower(mb.params, tokens).compile()
            compile_s = time.perf_counter() - t0
            sec = _time(compiled, (mb.params, tokens), **timing)
            return {"compile_s": compile_s, "ms": sec * 1e3, "tokens_per_s": b * t / sec}

        rows.append(_run_row(_row("prefill", name, seq_len=t, batch=b, **info), prefill_row))
        print(_fmt(rows[-1]), file=sys.stderr, flush=True)

    n_new, prompt = cfg["gen_tokens"], cfg["gen_prompt"]
    gen = mb.generate(n_new)
    for b in cfg["gen_batches"]:
        def gen_row(b=b):
            cache = init_cache(mb.module, b, prompt + n_new)
            cache = dict(cache, index=jnp.asarray(prompt, jnp.int32))
            tok = jnp.zeros((b, 1), jnp.int32)
            t0 = time.perf_counter()
            compiled = gen.lower(mb.params, tok, cache).compile()
            compile_s = time.perf_counter() - t0
            sec = _time(compiled, (mb.params, tok, cache), **timing)
            cache_bytes = int(sum(x.nbytes for x in jax.tree.leaves(cache)))
            return {"compile_s": compile_s, "ms": sec * 1e3, "ms_per_step": sec * 1e3 / n_new,
                    "tokens_per_s": b * n_new / sec, "cache_bytes": cache_bytes}

        rows.append(_run_row(_row("generate", name, batch=b, prompt=prompt, new_tokens=n_new,
                                  seq_len=prompt + n_new, **info), gen_row))
        print(_fmt(rows[-1]), file=sys.stderr, flush=True)
    mb = None  # frees the model before the next one (the row closures share this variable)
    gc.collect()
    return rows


def _fmt(r: dict) -> str:
    shape = f"T={r.get('seq_len', '-'):>6} B={r.get('batch', '-'):>4}"
    if r["status"] != "ok":
        return f"{r['kind']:8s} {r['model']:8s} {shape}  {r['status'].upper()}  {r.get('error', '')[:80]}"
    return (f"{r['kind']:8s} {r['model']:8s} {shape}  {r['tokens_per_s']:>12,.0f} tok/s  {r['ms']:>10.2f} ms"
            f"  (compile {r['compile_s']:.1f}s)")


def sweep_config(ap, args):
    """``(models, cfg)``: the ``--models`` list and ``QUICK`` / ``FULL`` with the options given
    on the command line applied -- each checked first (a usage error names the option), so a
    typo cannot end a sweep after the first models ran."""
    from jaxformers import list_models, list_presets

    check_counts(ap, args)
    models = parse_list(ap, "--models", args.models, allowed=list_models(), unique=True)
    cfg = dict(QUICK if args.quick else FULL)
    if args.preset is not None:
        cfg["preset"] = args.preset
    missing = [m for m in models if cfg["preset"] not in list_presets(m)]
    if missing:
        ap.error(f"--preset {cfg['preset']!r}: not a preset of {', '.join(missing)} "
                 f"(presets: {'; '.join(f'{m}: {list_presets(m)}' for m in missing)})")
    for name in ("seq_lens", "gen_batches"):
        flag = "--" + name.replace("_", "-")
        values = parse_list(ap, flag, getattr(args, name), cast=int, lo=1, unique=True)
        if values is not None:
            cfg[name] = tuple(values)
    for name in ("tokens", "gen_prompt", "gen_tokens", "warmup", "iters"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    return models, cfg


def main(argv=None) -> dict:
    ap = _parser()
    args = ap.parse_args(argv)
    check_out(ap, args.out)
    models, cfg = sweep_config(ap, args)
    import flax
    import jax
    from jaxformers.training.trainer import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    dev = jax.devices()[0]
    results = {
        "device": str(dev), "device_kind": dev.device_kind, "platform": dev.platform,
        "n_devices": jax.device_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__, "flax_version": flax.__version__,
        "command": "python -m experiments.bench_models " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": bool(args.quick), "compute_dtype": dtype, "config": cfg, "rows": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_results(args.out)  # an earlier run's results.json: not this run's until it saves its own
    t0 = time.perf_counter()
    for i, m in enumerate(models):
        results["rows"].extend(bench_model(m, cfg, dtype))
        results["wall_s"] = time.perf_counter() - t0
        # after every model, so a sweep cut short (killed, a time limit) keeps what it measured
        results["complete"] = i == len(models) - 1
        write_json(out / "results.json", results, indent=2)
    print(f"# {results['device_kind']} ({results['platform']}), jax {results['jax_version']}, "
          f"{dtype}, {results['date']}")
    for r in results["rows"]:
        print(_fmt(r))
    print(f"total {results['wall_s']:.0f}s -> {out / 'results.json'}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
