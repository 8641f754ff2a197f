"""DenseFormer vs depth: baseline L layers, DenseFormer L layers (k x p variants), deeper baselines.

    python -m experiments.denseformer --preset tiny --out runs/denseformer-tiny     # ~2-3 min, 2 CPU cores
    python -m experiments.denseformer --preset small --out runs/denseformer-small   # bigger CPU run
    python -m experiments.denseformer --preset gpu --out runs/denseformer-gpu       # 12 vs 24 layers, d=768

Every model trains for the same steps on the same batches of the built-in corpus
(Shakespeare, byte tokens; a prepared ``--data``: its tokens) with ``jaxformers.training.train``; runs go to
``OUT/runs/<name>`` (replaced if present; ``--reuse``: a finished run of an earlier invocation
with the same model config and training settings is loaded instead).  ``OUT/results.json``
(rewritten after every model, ``complete`` false until the end) holds, per model: validation loss / perplexity, parameter count, training tokens/s (the trainer's),
inference tokens/s (jitted full forward on a fixed ``[batch, seq_len]``, timed
after all training in 3 interleaved rounds, best round's median), and memory:
XLA's compiled ``memory_analysis()`` of that forward and of a loss+gradient step,
peak = arguments + outputs + temporaries - aliased bytes (``memory_method`` says
when it fell back to a params + activations estimate).  ``dwa_overhead`` compares each DenseFormer with the baseline of the
same depth (``dwa_overhead_missing``: each DenseFormer without one in the run, and why).  Plots: ``OUT/ppl_vs_depth.png`` (perplexity vs depth, and vs
inference speed) and ``OUT/alpha_heatmap.png`` (the learned DWA weights).  Weight decay: every
model, the baselines included, uses the authors' optimizer groups (``weight_decay_groups="nanogpt"``: the
tied token embedding is not decayed; results recorded before this setting decayed it).

``--steps N`` / ``--eval-batches N`` / ``--only a,b`` shrink a run (tests).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from experiments.common import (check_reuse, experiment_parser, parse_experiment_args, parse_list,
                                reuse_or_train, save_progress, start_results, time_forwards, train_overrides,
                                write_json)

#: the PNGs this experiment draws (an earlier invocation's: moved aside by ``start_results``)
PLOTS = ("ppl_vs_depth.png", "alpha_heatmap.png")

PRESETS = {
    # L=4: 1x1 (a DWA after every block) and 2x2 (after blocks 2 and 4, over even/odd outputs);
    # deeper baselines at 1.5L and 2L.
    "tiny": dict(model=dict(d_model=64, n_head=4, max_seq_len=64), depth=4, deeper=(6, 8),
                 variants=((1, 1), (2, 2)),
                 train=dict(steps=150, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=15,
                            eval_every=0, eval_batches=16), infer_batch=16),
    # L=10: the paper's 4x5 has DWAs after blocks 5 and 10.
    "small": dict(model=dict(d_model=128, n_head=4, max_seq_len=128), depth=10, deeper=(15, 20),
                  variants=((1, 1), (4, 5)),
                  train=dict(steps=1000, batch_size=16, seq_len=128, lr=2e-3, warmup_steps=50,
                             eval_every=250, eval_batches=40), infer_batch=16),
    # GPT-2-small width: 12 layers (1x1 and 4x5 DenseFormers) vs 18 and 24 layer baselines.
    "gpu": dict(model=dict(d_model=768, n_head=12, max_seq_len=512), depth=12, deeper=(18, 24),
                variants=((1, 1), (4, 5)),
                train=dict(steps=5000, batch_size=32, seq_len=512, lr=1e-3, warmup_steps=200,
                           eval_every=1000, eval_batches=50), infer_batch=32),
}


def _parser():
    ap = experiment_parser("denseformer", __doc__, PRESETS)
    ap.add_argument("--base", choices=("gpt", "llama"), default="gpt", help="block style (default gpt)")
    ap.add_argument("--eval-batches", type=int, help="override the number of validation batches")
    ap.add_argument("--only", help="comma-separated model names to run (default: all of the preset)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse finished runs in OUT/runs instead of retraining them (all checked first: "
                         "same model config and training settings)")
    return ap


def model_names(preset: dict, base: str) -> list:
    """Names of :func:`model_grid`'s models, in its order (no vocabulary needed)."""
    depth = preset["depth"]
    return ([f"{base}_L{depth}"] + [f"denseformer_{k}x{p}_L{depth}" for k, p in preset["variants"]]
            + [f"{base}_L{d}" for d in preset["deeper"]])


def model_grid(preset: dict, base: str, vocab_size: int):
    """``[(name, model_config)]``: baseline L, DenseFormers at L, deeper baselines."""
    from jaxformers import get_config
    from jaxformers.models.denseformer import DenseFormerConfig

    # every arm weight-decays as the authors' code (nanoGPT's groups): the token embedding (tied with
    # the head) is not decayed (DenseFormerConfig's default; the baselines are set to match)
    common = dict(preset["model"], vocab_size=vocab_size, weight_decay_groups="nanogpt")
    if base == "llama":  # the MLP / kv heads of the preset's width (not the tiny llama's d_ff=352, 2 kv heads)
        common.update(d_ff=None, n_kv_head=max(1, common["n_head"] // 2))
    depth = preset["depth"]
    configs = [get_config(base, "tiny", n_layer=depth, **common)]
    for k, p in preset["variants"]:
        configs.append(DenseFormerConfig.from_base(base, "tiny", n_layer=depth, dwa_dilation=k, dwa_period=p,
                                                   **common))
    for d in preset["deeper"]:
        configs.append(get_config(base, "tiny", n_layer=d, **common))
    return list(zip(model_names(preset, base), configs))


def _check_args(ap, args) -> None:
    """Usage errors before anything is loaded or trained; ``--only`` becomes a list."""
    args.only = parse_list(ap, "--only", args.only, allowed=model_names(PRESETS[args.preset], args.base),
                           unique=True)


def _peak(ma):
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)


def prepare_measurement(model_config, params, batch: int, seq_len: int, dtype: str):
    """Compiled forward (for timing) and XLA's memory analysis of the forward and of loss+grad."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxformers import build

    cfg = model_config.replace(dtype=dtype)
    module = build(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len)), jnp.int32)

    def loss(p, t):
        logits = module.apply({"params": p}, t[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], -1))

    compiled = jax.jit(lambda p, t: module.apply({"params": p}, t)).lower(params, tokens).compile()
    jax.block_until_ready(compiled(params, tokens))  # warm-up
    out = {"infer_batch": batch, "infer_seq_len": seq_len}
    try:
        fwd_ma = compiled.memory_analysis()
        grad_ma = jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis()
        if fwd_ma is None or grad_ma is None:
            raise NotImplementedError("memory_analysis() returned None")
        out["infer_peak_bytes"], out["train_peak_bytes"] = _peak(fwd_ma), _peak(grad_ma)
        out["infer_temp_bytes"] = int(fwd_ma.temp_size_in_bytes)
        out["train_temp_bytes"] = int(grad_ma.temp_size_in_bytes)
        out["memory_method"] = "xla_memory_analysis (peak = arguments + outputs + temp - aliased)"
    except Exception as e:  # noqa: BLE001 - some backends have no memory analysis
        itemsize = jnp.dtype(cfg.dtype).itemsize
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        act = batch * seq_len * cfg.d_model * itemsize
        # params (+ grads and 2 Adam moments for training) + ~16 activations of [B,T,D] per block
        out["infer_peak_bytes"] = 4 * n_params + 2 * act + batch * seq_len * cfg.vocab_size * 4
        out["train_peak_bytes"] = 16 * n_params + 16 * act * cfg.n_layer
        out["memory_method"] = f"estimate (params + activations; memory_analysis unavailable: {e})"
    return (lambda: compiled(params, tokens)), batch * seq_len, out


def run(args) -> dict:
    import jax
    from jaxformers.training import CompileCache
    from jaxformers.training.trainer import open_dataset
    from jaxformers.models.denseformer import dwa_weights

    preset = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_results(out, PLOTS)  # an earlier run's results.json: not this run's until it saves its own
    train_kw = train_overrides(preset["train"], args.steps, args.eval_batches)
    _, meta, _, _ = open_dataset(args.data, "byte")
    grid = model_grid(preset, args.base, int(meta["vocab_size"]))
    if args.only is not None:  # checked names (_check_args)
        grid = [(n, c) for n, c in grid if n in args.only]

    results = {"preset": args.preset, "seed": args.seed, "base": args.base, "backend": jax.default_backend(),
               "device_kind": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
               "jax_version": jax.__version__, "data": args.data, "train": train_kw, "models": {}}
    alphas, forwards = {}, {}
    cache = CompileCache()  # explicit and scoped to this experiment's runs
    # --reuse: every finished run checked (model config and training settings) before any training
    reusable = (check_reuse(out, grid, seed=args.seed, data=args.data, train_kw=train_kw, log_points=10)
                if args.reuse else [])
    for name, cfg in grid:
        summary, params, dtype, tc = reuse_or_train(name, cfg, out, reusable, seed=args.seed, data=args.data,
                                                    train_kw=train_kw, log_points=10, tag="denseformer",
                                                    cache=cache)
        row = {
            "model": cfg.model, "n_layer": cfg.n_layer,
            "dwa": ({"dilation": cfg.dwa_dilation, "period": cfg.dwa_period, "mode": cfg.dwa_mode}
                    if cfg.model == "denseformer" else None),
            "val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"],
            "train_loss": summary["train_loss"], "n_params": summary["n_params"],
            "train_tokens_per_s": summary["tokens_per_s"], "train_tokens": tc.steps * tc.tokens_per_step,
            "train_wall_s": summary["wall_s"], "compute_dtype": dtype,
        }
        fn, n_tokens, mem = prepare_measurement(cfg, params, preset["infer_batch"], tc.seq_len, dtype)
        forwards[name] = (fn, n_tokens)
        row.update(mem)
        if cfg.model == "denseformer":
            alpha, points = dwa_weights(cfg, params)
            alphas[name] = (cfg, alpha, points)
            row["alpha"] = alpha.tolist()
            row["dwa_after_blocks"] = points
        results["models"][name] = row
        print(f"[denseformer] {name}: val_ppl={row['val_ppl']:.3f} params={row['n_params']}",
              file=sys.stderr, flush=True)
        save_progress(out, results)
    for name, tps in time_forwards(forwards).items():
        results["models"][name]["infer_tokens_per_s"] = tps

    overhead, missing = {}, []
    for name, row in results["models"].items():
        if row["model"] != "denseformer":
            continue
        ref = next((r for n, r in results["models"].items()
                    if r["model"] != "denseformer" and r["n_layer"] == row["n_layer"]), None)
        if ref is None:  # said, not silently left out of dwa_overhead
            missing.append({"model": name, "reason": f"no same-depth baseline ({args.base}_L{row['n_layer']}) "
                                                     "in this run (--only left it out)"})
            continue
        overhead[name] = {
            "infer_throughput_ratio": row["infer_tokens_per_s"] / ref["infer_tokens_per_s"],
            "train_throughput_ratio": (row["train_tokens_per_s"] / ref["train_tokens_per_s"]
                                       if row["train_tokens_per_s"] and ref["train_tokens_per_s"] else None),
            "extra_params": row["n_params"] - ref["n_params"],
            "train_peak_bytes_ratio": row["train_peak_bytes"] / ref["train_peak_bytes"],
            "val_ppl_delta": row["val_ppl"] - ref["val_ppl"],
        }
    results["dwa_overhead"] = overhead
    results["dwa_overhead_missing"] = missing
    results["complete"] = True
    write_json(out / "results.json", results, indent=2)
    plot_ppl_vs_depth(results, out / "ppl_vs_depth.png")
    plot_alpha(alphas, out / "alpha_heatmap.png")
    return results


def plot_ppl_vs_depth(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["models"]
    base = sorted(((r["n_layer"], r) for r in rows.values() if r["model"] != "denseformer"),
                  key=lambda x: x[0])
    dense = [(n, r) for n, r in rows.items() if r["model"] == "denseformer"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    if base:
        ax.plot([d for d, _ in base], [r["val_ppl"] for _, r in base], "o-", color="tab:blue",
                label=f"{results['base']} baseline")
    markers, colors = "s^Dv*P", ("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for i, (n, r) in enumerate(dense):
        label = f"DenseFormer {r['dwa']['dilation']}x{r['dwa']['period']}"
        ax.plot([r["n_layer"]], [r["val_ppl"]], markers[i % len(markers)], color=colors[i % len(colors)],
                markersize=9, label=label)
    ax.set_xlabel("depth (blocks)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"perplexity vs depth ({results['preset']}, {results['train'].get('steps')} steps)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    if base:
        ax.plot([r["infer_tokens_per_s"] for _, r in base], [r["val_ppl"] for _, r in base], "o-",
                color="tab:blue", label=f"{results['base']} baseline")
        for d, r in base:
            ax.annotate(f"L={d}", (r["infer_tokens_per_s"], r["val_ppl"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    for i, (n, r) in enumerate(dense):
        ax.plot([r["infer_tokens_per_s"]], [r["val_ppl"]], markers[i % len(markers)],
                color=colors[i % len(colors)], markersize=9, label=f"DenseFormer {r['dwa']['dilation']}x{r['dwa']['period']} L={r['n_layer']}")
    ax.set_xlabel(f"inference tokens/s ({results['device_kind']})")
    ax.set_ylabel("validation perplexity")
    ax.set_title("perplexity vs inference speed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_alpha(alphas: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from jaxformers.models.denseformer import DWAPlan

    n = max(len(alphas), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, 4.2), squeeze=False)
    for ax, (name, (cfg, alpha, points)) in zip(axes[0], alphas.items()):
        shown = np.where(DWAPlan.from_config(cfg).mask() > 0, alpha, np.nan)
        off = shown.copy()
        off[np.arange(len(points)), points] = np.nan  # the ~1 "self" weights would wash out the colours
        vmax = float(np.nanmax(np.abs(off))) if np.isfinite(off).any() else 1.0
        vmax = vmax if vmax > 0 else 1.0
        im = ax.imshow(shown, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(alpha.shape[1]))
        ax.set_xticklabels(["emb"] + [str(j) for j in range(1, alpha.shape[1])], fontsize=7)
        ax.set_yticks(range(len(points)))
        ax.set_yticklabels([str(m) for m in points], fontsize=7)
        ax.set_xlabel("input X_j (block output j; emb = X_0)")
        ax.set_ylabel("DWA after block m")
        ax.set_title(f"{name}: learned alpha[m, j]\n(colours clipped at the largest off-diagonal |alpha|)",
                     fontsize=9)
        if alpha.size <= 150:
            for (r, j), v in np.ndenumerate(shown):
                if np.isfinite(v):
                    ax.text(j, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if abs(v) > 0.6 * vmax else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    if not alphas:
        axes[0][0].text(0.5, 0.5, "no DenseFormer in this run", ha="center", va="center")
        axes[0][0].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_experiment_args(_parser(), argv, check=_check_args)
    t0 = time.perf_counter()
    results = run(args)
    print(json.dumps({n: {k: r[k] for k in ("n_layer", "val_ppl", "n_params", "infer_tokens_per_s")}
                      for n, r in results["models"].items()}, indent=1))
    for n, o in results["dwa_overhead"].items():
        print(f"{n}: inference throughput x{o['infer_throughput_ratio']:.3f}, train throughput "
              f"x{(o['train_throughput_ratio'] or math.nan):.3f} vs the same-depth baseline")
    for m in results.get("dwa_overhead_missing", []):
        print(f"{m['model']}: no dwa_overhead: {m['reason']}")
    print(f"total {time.perf_counter() - t0:.0f}s -> {args.out}/results.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
