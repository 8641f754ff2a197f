"""Mamba vs attention at matched size: language-model quality, and decode cost vs context length.

    python -m experiments.mamba --preset tiny --out runs/mamba-tiny     # ~3-4 min, 2 CPU cores
    python -m experiments.mamba --preset small --out runs/mamba-small   # bigger CPU run
    python -m experiments.mamba --preset gpu --out runs/mamba-gpu       # d_model 768 (GPT-2 / mamba-130m width)

The Mamba paper's main claims, at small scale: (1) a selective-SSM language model
matches a Transformer of the same size, and (2) autoregressive generation needs
only a constant-size state, whereas attention's KV cache -- and the work of a
decode step reading it -- grows linearly with the context.

Models: the attention baseline (``--base gpt`` or ``llama``) with ``L`` layers, and
``mamba``, ``mamba2`` and ``hybrid`` (attention blocks every ``attn_every``-th
layer, Mamba blocks elsewhere) of the same width, each with the layer count whose
parameter count is closest to the baseline's (a Mamba block has ~6 d^2 parameters,
an attention+MLP block ~12 d^2, so SSM models get about twice the layers -- as in
the paper).  Every model trains with ``jaxformers.training.train`` for the same
steps on the same batches of the built-in corpus (byte tokens, or a prepared ``--data``'s
tokens; vocab from the dataset); runs go to ``OUT/runs/<name>`` (replaced if present).

Decode scaling: for each context length ``L`` a cache is allocated for ``L``
tokens (``init_cache(module, batch, L)``) with its index at ``L - 1`` (the next
token is the last one that fits), and one jitted single-token step
``module.apply(params, tok, cache=cache)`` is timed (warm-up, block_until_ready,
median).  The step's cost does not depend on what the cache holds -- attention
reads the whole ``[B, L]`` buffer under a mask, the SSM state has a fixed size --
so the cache is not prefilled unless ``--prefill`` is given (then ``L - 1``
validation tokens are run through the model first).  Cache memory is the sum of
``nbytes`` over the cache's leaves.

Outputs: ``OUT/results.json`` (every number), ``OUT/val_ppl.png`` (validation
perplexity per model and training-loss curves), ``OUT/decode_scaling.png``
(decode-step latency and cache bytes vs context, per model).
``--steps`` / ``--eval-batches`` / ``--contexts`` / ``--models`` shrink a run (tests).
Interruption: ``results.json`` is rewritten after every model (``"complete": false`` until
the last one), and ``--reuse`` keeps the finished runs in ``OUT/runs`` of an earlier
invocation (checked first: same model config and training settings) instead of retraining.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path
from experiments.common import (check_reuse, experiment_parser, parse_experiment_args, parse_list,
                                reuse_or_train, start_results, train_overrides, write_json)

#: the PNGs this experiment draws (an earlier invocation's: moved aside by ``start_results``)
PLOTS = ("val_ppl.png", "decode_scaling.png")

MODELS = ("base", "mamba", "mamba2", "hybrid")  # "base" = the --base attention model

PRESETS = {
    # d=64: baseline 2 layers (~115k params incl. the byte embedding); SSM models ~4 layers.
    "tiny": dict(source="tiny", d_model=64, n_layer=2, n_head=4, attn_every=2,
                 ssm=dict(mamba=dict(d_state=16), mamba2=dict(d_state=32, headdim=32, chunk_size=32)),
                 train=dict(steps=200, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=20,
                            eval_every=0, eval_batches=10),
                 contexts=(64, 256, 1024), decode_batch=1),
    "small": dict(source="tiny", d_model=256, n_layer=4, n_head=8, attn_every=3,
                  ssm=dict(mamba=dict(d_state=16), mamba2=dict(d_state=64, headdim=64, chunk_size=64)),
                  train=dict(steps=1500, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=100,
                             eval_every=500, eval_batches=40),
                  contexts=(128, 512, 2048, 8192), decode_batch=1),
    # GPT-2-small / mamba-130m width (byte vocab: ~85M params, i.e. the 130M models minus their
    # 50k-token embedding); hybrid 1 attention : 3 Mamba layers.  SSD chunk 64: the chunk the
    # Pallas kernels fit sm_90 with (256 needs 280 KiB of shared memory in the backward).
    "gpu": dict(source="small", d_model=768, n_layer=12, n_head=12, attn_every=4,
                ssm=dict(mamba=dict(d_state=16), mamba2=dict(d_state=128, headdim=64, chunk_size=64)),
                train=dict(steps=5000, batch_size=32, seq_len=1024, lr=1e-3, warmup_steps=200,
                           eval_every=1000, eval_batches=50),
                contexts=(512, 2048, 8192, 32768), decode_batch=1),
}


def _parser():
    ap = experiment_parser("mamba", __doc__, PRESETS)
    ap.add_argument("--base", choices=("gpt", "llama"), default="gpt", help="attention baseline (default gpt)")
    ap.add_argument("--eval-batches", type=int, help="override the number of validation batches")
    ap.add_argument("--contexts",
                    help="comma-separated increasing decode context lengths (default: the preset's)")
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} "
                                     "(base may also be written gpt/llama; default: all)")
    ap.add_argument("--prefill", action="store_true", help="prefill each decode cache with L-1 real tokens")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse finished runs in OUT/runs instead of retraining them (all checked first: "
                         "same model config and training settings, else exit)")
    return ap


def _check_args(ap, args) -> None:
    """Usage errors before anything is loaded or trained; ``--contexts`` and ``--models``
    become lists (``--models``: the --base model's name written ``base``)."""
    args.contexts = parse_list(ap, "--contexts", args.contexts, cast=int, lo=1, unique=True)
    if args.contexts is not None and args.contexts != sorted(args.contexts):
        # the ratios (context, cache bytes, decode latency) are last / first
        ap.error(f"--contexts must be increasing, got {','.join(map(str, args.contexts))}")
    models = parse_list(ap, "--models", args.models, allowed=("base", args.base, *MODELS[1:]), unique=True)
    if models is not None:
        args.models = ["base" if m in ("base", args.base) else m for m in models]
        if len(set(args.models)) < len(args.models):
            ap.error(f"--models: 'base' and {args.base!r} name the same model")


# ============================================================================ model grid
def n_params(config) -> int:
    """Parameter count of ``config`` (abstract init: nothing is compiled or allocated)."""
    from jaxformers import build
    from jaxformers.utils import abstract_param_count

    return abstract_param_count(build(config))


def _base_config(preset: dict, base: str, vocab_size: int, max_seq_len: int):
    from jaxformers import get_config

    extra = dict(n_kv_head=max(1, preset["n_head"] // 2), d_ff=None) if base == "llama" else {}
    return get_config(base, preset["source"], vocab_size=vocab_size, d_model=preset["d_model"],
                      n_layer=preset["n_layer"], n_head=preset["n_head"], max_seq_len=max_seq_len, **extra)


def _ssm_config(kind: str, preset: dict, n_layer: int, vocab_size: int, max_seq_len: int):
    """``mamba`` / ``mamba2`` / ``hybrid`` (Mamba mixer) at the preset's width with ``n_layer`` layers."""
    from jaxformers import get_config

    common = dict(vocab_size=vocab_size, d_model=preset["d_model"], n_layer=n_layer, max_seq_len=max_seq_len)
    if kind == "hybrid":
        return get_config("hybrid", preset["source"], **common, **preset["ssm"]["mamba"], mixer="mamba",
                          n_head=preset["n_head"], n_kv_head=max(1, preset["n_head"] // 2), mlp="swiglu",
                          d_ff=None, attn_layers=None, attn_every=min(preset["attn_every"], n_layer))
    return get_config(kind, preset["source"], **common, **preset["ssm"][kind])


def _matched_layers(kind: str, preset: dict, target: int, vocab_size: int, max_seq_len: int) -> int:
    """Layer count of ``kind`` whose parameter count is closest to ``target`` (ties: fewer layers).

    Counts are affine in the number of SSM / attention layers, so three abstract inits suffice."""
    one = n_params(_ssm_config(kind if kind != "hybrid" else "mamba", preset, 1, vocab_size, max_seq_len))
    two = n_params(_ssm_config(kind if kind != "hybrid" else "mamba", preset, 2, vocab_size, max_seq_len))
    ssm_layer, rest = two - one, 2 * one - two
    attn_layer = 0
    if kind == "hybrid":  # hybrid with one layer, attention at layer 0: embedding + one attention block
        attn_layer = n_params(_ssm_config("hybrid", preset, 1, vocab_size, max_seq_len).replace(
            attn_every=None, attn_layers=(0,))) - rest
    every = preset["attn_every"]
    best = None
    for n in range(1, 4 * preset["n_layer"] + 1):
        n_attn = n // min(every, n) if kind == "hybrid" else 0
        count = rest + n_attn * attn_layer + (n - n_attn) * ssm_layer
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (n, count)
    return best[0]


def model_grid(preset: dict, base: str, vocab_size: int, max_seq_len: int, wanted=None):
    """``[(name, model_config)]``: the attention baseline and SSM models matched to its size."""
    base_cfg = _base_config(preset, base, vocab_size, max_seq_len)
    target = n_params(base_cfg)
    grid = []
    for kind in MODELS:
        if wanted is not None and kind not in wanted:
            continue
        if kind == "base":
            grid.append((base, base_cfg))
            continue
        n = _matched_layers(kind, preset, target, vocab_size, max_seq_len)
        grid.append((kind, _ssm_config(kind, preset, n, vocab_size, max_seq_len)))
    return grid, target


# ============================================================================ decode scaling
def cache_nbytes(cache) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves(cache)))


def _median_time(fn, *args, min_reps: int = 5, min_time: float = 0.5, max_reps: int = 200) -> float:
    """Median seconds of ``fn(*args)`` after two warm-up calls (block_until_ready)."""
    import jax

    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times, t_end = [], time.perf_counter() + min_time
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_scaling(model_config, params, contexts, *, batch: int = 1, dtype: str = "float32",
                   prefill_tokens=None) -> list:
    """One row per context length: decode-step latency (median s) and cache bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxformers import build, init_cache

    cfg = model_config.replace(dtype=dtype, max_seq_len=max(max(contexts), model_config.max_seq_len))
    module = build(cfg)
    variables = {"params": params}
    step = jax.jit(lambda v, tok, cache: module.apply(v, tok, cache=cache))
    prefill = jax.jit(lambda v, toks, cache: module.apply(v, toks, cache=cache)[1])
    tok = jnp.zeros((batch, 1), jnp.int32)
    flat = None if prefill_tokens is None else np.asarray(prefill_tokens).reshape(-1)  # (a view of an array)
    rows = []
    for length in contexts:
        cache = init_cache(module, batch, length)
        if flat is not None and length > 1:
            need = batch * (length - 1)  # the first tokens (repeated if too few): not a copy of them all
            toks = (flat[:need] if flat.size >= need else np.resize(flat, need)).reshape(batch, length - 1)
            t0 = time.perf_counter()
            cache = jax.block_until_ready(prefill(variables, jnp.asarray(toks, jnp.int32), cache))
            prefill_s = time.perf_counter() - t0  # includes compilation
        else:
            cache = dict(cache, index=jnp.asarray(length - 1, jnp.int32))
            prefill_s = None
        latency = _median_time(step, variables, tok, cache)
        rows.append({"context": int(length), "batch": int(batch), "decode_step_ms": latency * 1e3,
                     "decode_tokens_per_s": batch / latency, "cache_bytes": cache_nbytes(cache),
                     "prefilled": prefill_s is not None, "prefill_s_incl_compile": prefill_s})
    return rows


# ============================================================================ run
def run(args) -> dict:
    import jax
    from jaxformers.training import read_metrics
    from jaxformers.training import CompileCache
    from jaxformers.training.trainer import open_dataset

    preset = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_results(out, PLOTS)  # an earlier run's results.json: not this run's until it saves its own
    train_kw = train_overrides(preset["train"], args.steps, args.eval_batches)
    # --contexts / --models: checked lists (_check_args)
    contexts = preset["contexts"] if args.contexts is None else tuple(args.contexts)
    wanted = None if args.models is None else set(args.models)
    _, meta, _, val_tokens = open_dataset(args.data, "byte")
    vocab = int(meta["vocab_size"])
    grid, target = model_grid(preset, args.base, vocab, train_kw["seq_len"], wanted)

    results = {"preset": args.preset, "seed": args.seed, "base": args.base, "backend": jax.default_backend(),
               "device_kind": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
               "jax_version": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "data": args.data, "vocab_size": vocab, "train": train_kw,
               "target_params": target, "contexts": list(contexts), "decode_batch": preset["decode_batch"],
               "decode_prefilled": bool(args.prefill), "complete": False, "models": {}}
    cache = CompileCache()  # explicit and scoped to this experiment's runs
    # --reuse: every finished run checked (model config and training settings) before any training
    reusable = (check_reuse(out, grid, seed=args.seed, data=args.data, train_kw=train_kw, log_points=20)
                if args.reuse else [])
    for name, cfg in grid:
        run_dir = out / "runs" / name
        summary, params, dtype, tc = reuse_or_train(name, cfg, out, reusable, seed=args.seed, data=args.data,
                                                     train_kw=train_kw, log_points=20, tag="mamba",
                                                     cache=cache)
        print(f"[mamba] {name}: val_ppl={summary['val_ppl'] or math.nan:.3f}; "
              f"timing decode at {list(contexts)}", file=sys.stderr, flush=True)
        decode = decode_scaling(cfg, params, contexts, batch=preset["decode_batch"], dtype=dtype,
                                prefill_tokens=val_tokens if args.prefill else None)
        metrics = read_metrics(run_dir)
        results["models"][name] = {
            "model": cfg.model, "n_layer": cfg.n_layer, "d_model": cfg.d_model,
            "attention_layers": (list(cfg.attention_layers) if cfg.model == "hybrid"
                                 else list(range(cfg.n_layer)) if cfg.model in ("gpt", "llama") else []),
            "n_params": summary["n_params"], "params_vs_base": summary["n_params"] / target,
            "val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"],
            "train_loss": summary["train_loss"], "train_tokens": tc.steps * tc.tokens_per_step,
            "train_tokens_per_s": summary["tokens_per_s"], "train_wall_s": summary["wall_s"],
            "compile_s": summary["compile_s"], "compute_dtype": dtype,
            "loss_curve": [[r["step"], r["loss"]] for r in metrics if "loss" in r],
            "val_curve": [[r["step"], r["val_loss"]] for r in metrics if r.get("val_loss") is not None],
            "decode": decode,
            "cache_bytes_ratio": decode[-1]["cache_bytes"] / decode[0]["cache_bytes"],
            "decode_latency_ratio": decode[-1]["decode_step_ms"] / decode[0]["decode_step_ms"],
            "config": cfg.to_dict(),
        }
        row = results["models"][name]
        print(f"[mamba] {name}: params={row['n_params']} val_ppl={row['val_ppl'] or math.nan:.3f} "
              f"train_tok/s={row['train_tokens_per_s'] or 0:.0f} decode_ms="
              f"{[round(d['decode_step_ms'], 3) for d in decode]} cache_bytes="
              f"{[d['cache_bytes'] for d in decode]}", file=sys.stderr, flush=True)
        # after every model: an interrupted run keeps what is done (rerun with --reuse)
        write_json(out / "results.json", results, indent=2)
    results["context_ratio"] = contexts[-1] / contexts[0]
    results["complete"] = True
    write_json(out / "results.json", results, indent=2)
    plot_val_ppl(results, out / "val_ppl.png")
    plot_decode_scaling(results, out / "decode_scaling.png")
    return results


# ============================================================================ plots
_COLORS = {"gpt": "tab:blue", "llama": "tab:blue", "mamba": "tab:orange", "mamba2": "tab:green",
           "hybrid": "tab:purple"}


def plot_val_ppl(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["models"]
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ppl = [rows[n]["val_ppl"] if rows[n]["val_ppl"] is not None else math.nan for n in names]
    bars = ax.bar(names, ppl, color=[_COLORS.get(n, "gray") for n in names])
    for b, n in zip(bars, names):
        ax.annotate(f"{rows[n]['val_ppl'] or math.nan:.3f}\n{rows[n]['n_params'] / 1e3:.0f}k params\n"
                    f"{rows[n]['n_layer']} layers", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    finite = [p for p in ppl if math.isfinite(p)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, max(finite) * 1.12)
    ax.set_ylabel("validation perplexity (bytes)")
    ax.set_title(f"val perplexity, {results['train']['steps']} steps ({results['preset']})")
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    for n in names:
        curve = rows[n]["loss_curve"]
        if curve:
            ax.plot(*zip(*curve), label=f"{n} train", color=_COLORS.get(n, "gray"), lw=1.2)
        val = rows[n]["val_curve"]
        if val:
            ax.plot(*zip(*val), "o--", color=_COLORS.get(n, "gray"), lw=1, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title("training loss (dots: validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_decode_scaling(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["models"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, r in rows.items():
        ctx = [d["context"] for d in r["decode"]]
        color = _COLORS.get(n, "gray")
        axes[0].plot(ctx, [d["decode_step_ms"] for d in r["decode"]], "o-", color=color, label=n)
        axes[1].plot(ctx, [d["cache_bytes"] for d in r["decode"]], "o-", color=color, label=n)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (cache allocated for L tokens)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("decode step latency (ms, median)")
    axes[0].set_title(f"one-token decode step, batch {results['decode_batch']} ({results['device_kind']})")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("cache bytes")
    axes[1].set_title("decoding cache memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_experiment_args(_parser(), argv, check=_check_args)
    t0 = time.perf_counter()
    results = run(args)
    print(f"{'model':8s} {'layers':>6s} {'params':>10s} {'val_ppl':>8s} {'train tok/s':>11s}  "
          f"decode ms @ {results['contexts']}  cache KiB")
    for n, r in results["models"].items():
        print(f"{n:8s} {r['n_layer']:6d} {r['n_params']:10d} {r['val_ppl'] or math.nan:8.3f} "
              f"{r['train_tokens_per_s'] or math.nan:11.0f}  "
              f"{[round(d['decode_step_ms'], 3) for d in r['decode']]}  "
              f"{[round(d['cache_bytes'] / 1024, 1) for d in r['decode']]}")
    print(f"total {time.perf_counter() - t0:.0f}s -> {args.out}/results.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
