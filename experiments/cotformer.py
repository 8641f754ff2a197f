"""CoTFormer vs block universal transformer vs deeper baselines, and the adaptive CoTFormer's
perplexity-vs-compute curve.

    python -m experiments.cotformer --preset tiny --out runs/cotformer-tiny   # a few minutes, 2 CPU cores
    python -m experiments.cotformer --preset gpu --out runs/cotformer-gpu     # d=768, 12 heads, T=256

Models (``L`` = the preset's depth), all trained for the same steps on the same batches of
the built-in corpus (byte tokens; a prepared ``--data``: its own tokens), with
``jaxformers.training.train``, seed ``--seed``:
``gpt_L``, ``gpt_2L``, ``gpt_3L`` (standard transformers), ``but_Lx2``, ``but_Lx3`` (block
universal transformer), ``cotformer_Lx2``, ``cotformer_Lx3``, ``ln_cotformer_Lx3``
(LN-CoTFormer: norm after every repeat, learned linear depth embedding, the preset's reserved
begin/end layers) and ``adaptive_Lx3`` (LN-CoTFormer with routers, trained with sampled
capacities as the authors do).  ``OUT/results.json`` holds, per model: validation loss /
perplexity, parameters, forward MACs per token (``flops_per_token / 6``: each weight counted
per repeat it runs, attention over the keys of all earlier repeats; the adaptive model's at the
full budget), ``train_flops_per_token`` (the trainer's count; for the adaptive model the
expectation under the sampled capacities, i.e. the authors' routed compute, not the masked
full-depth compute run here), average depth, training
tokens/s (the trainer's, includes the sampled-capacity masking for the adaptive model) and
inference tokens/s (jitted forward in the trainer's compute dtype, best of 3 interleaved
rounds).  ``adaptive_curve``: the one trained adaptive model evaluated at each inference budget
(``length_factors``: the fraction of the sequence that runs repeats 2..R): perplexity,
MACs/token, average depth.  Weight decay: every model, the GPT baselines included, uses the
authors' optimizer groups (``weight_decay_groups="nanogpt"``: the tied token embedding and the depth
embedding are not decayed; results recorded before this setting decayed them).  Plot:
``OUT/ppl_vs_macs.png`` (perplexity vs MACs/token, and vs inference tokens/s).

Interruption: ``results.json`` is rewritten (atomically) after every model and every adaptive
budget, ``"complete": false`` until the end (the inference tokens/s are measured last, for all
models together, so they appear only in the complete file).

``--steps N`` / ``--eval-batches N`` / ``--only a,b`` / ``--budgets`` / ``--d-model`` /
``--seq-len`` / ``--batch-size`` shrink a run (tests); ``--reuse`` keeps the finished runs of an
earlier invocation in ``OUT/runs`` and trains only the missing ones; every finished run is checked
first (same model config and training settings, else exit 1 naming the fields), so a mismatch
costs no training.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from experiments.common import (check_heads, check_reuse, experiment_parser, parse_experiment_args,
                                parse_list, reuse_or_train, save_progress, start_results, time_forwards,
                                train_overrides, write_json)

#: the PNGs this experiment draws (an earlier invocation's: moved aside by ``start_results``)
PLOTS = ("ppl_vs_macs.png",)

PRESETS = {
    "tiny": dict(model=dict(d_model=64, n_head=4, max_seq_len=64), depth=2, ln_reserved=(0, 0),
                 train=dict(steps=150, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=15,
                            eval_every=0, eval_batches=16), infer_batch=16),
    # the paper's setting (d=768, 12 heads, T=256, 12 layers) scaled to one device's budget;
    # LN-CoTFormer with the authors' reserved layers (2 begin, 1 end)
    "gpu": dict(model=dict(d_model=768, n_head=12, max_seq_len=256), depth=12, ln_reserved=(2, 1),
                train=dict(steps=4000, batch_size=64, seq_len=256, lr=1e-3, warmup_steps=800,
                           eval_every=1000, eval_batches=50), infer_batch=32),
}

#: inference budgets of the adaptive model (length factors f_2, f_3 of its 3 repeats)
BUDGETS = ((0.0, 0.0), (0.25, 0.0), (0.5, 0.25), (1.0, 0.0), (1.0, 0.5), (1.0, 1.0))


def _parser():
    ap = experiment_parser("cotformer", __doc__, PRESETS)
    ap.add_argument("--eval-batches", type=int, help="override the number of validation batches")
    ap.add_argument("--only", help="comma-separated model names to run (default: all of the preset)")
    ap.add_argument("--budgets", help="adaptive budgets, e.g. '0,0;1,1' (default: %s)" %
                    ";".join(",".join(str(x) for x in b) for b in BUDGETS))
    ap.add_argument("--d-model", type=int, help="override the preset's width")
    ap.add_argument("--seq-len", type=int, help="override the preset's sequence length")
    ap.add_argument("--batch-size", type=int, help="override the preset's batch size")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse finished runs in OUT/runs instead of retraining them (all checked first: "
                         "same model config and training settings, else exit)")
    return ap


def model_specs(preset: dict):
    """``[(name, registered model, config fields)]`` of the preset (no vocabulary needed)."""
    # every arm weight-decays as the authors' code (nanoGPT's groups): embedding tables (the token
    # embedding, tied with the head; the depth embedding) are not decayed -- the CoTFormer configs'
    # default, set on the GPT baselines to match
    common = dict(preset["model"], weight_decay_groups="nanogpt")
    L = preset["depth"]
    b, e = preset["ln_reserved"]
    specs = [(f"gpt_L{d}", "gpt", dict(n_layer=d, **common)) for d in (L, 2 * L, 3 * L)]
    for name in ("but", "cotformer"):
        for r in (2, 3):
            specs.append((f"{name}_L{L}x{r}", name, dict(n_layer=L, n_repeat=r, **common)))
    ln = dict(n_layer=L, n_repeat=3, n_layer_begin=b, n_layer_end=e, ln_mid=True,
              depth_embedding="linear_learned", **common)
    specs.append((f"ln_cotformer_L{L}x3", "cotformer", ln))
    specs.append((f"adaptive_L{L}x3", "adaptive_cotformer", ln))
    return specs


def model_grid(preset: dict, vocab_size: int):
    """``[(name, model_config)]`` of the preset."""
    from jaxformers import get_config

    return [(name, get_config(model, "tiny", vocab_size=vocab_size, **fields))
            for name, model, fields in model_specs(preset)]


def _preset(args) -> dict:
    """A copy of the preset with the ``--d-model`` / ``--seq-len`` / ``--batch-size`` overrides."""
    preset = json.loads(json.dumps(PRESETS[args.preset]))
    if args.d_model is not None:
        preset["model"]["d_model"] = args.d_model
    if args.seq_len is not None:
        preset["model"]["max_seq_len"] = preset["train"]["seq_len"] = args.seq_len
    if args.batch_size is not None:
        preset["train"]["batch_size"] = preset["infer_batch"] = args.batch_size
    return preset


def _check_args(ap, args) -> None:
    """Usage errors before anything is loaded or trained; ``--only`` / ``--budgets`` become lists."""
    specs = model_specs(_preset(args))
    names = [n for n, _, _ in specs]
    args.only = parse_list(ap, "--only", args.only, allowed=names, unique=True)
    wanted = names if args.only is None else args.only
    check_heads(ap, _preset(args)["model"])
    if args.budgets is not None:
        adaptive = [(n, f) for n, m, f in specs if m == "adaptive_cotformer" and n in wanted]
        if not adaptive:
            ap.error(f"--budgets applies to the adaptive model, which --only leaves out "
                     f"({[n for n, m, _ in specs if m == 'adaptive_cotformer']})")
        n_factors = adaptive[0][1]["n_repeat"] - 1
        budgets = []
        for text in parse_list(ap, "--budgets", args.budgets, sep=";"):
            b = tuple(parse_list(ap, "--budgets", text, cast=float, lo=0.0, hi=1.0))
            if len(b) != n_factors or any(y > x for x, y in zip(b, b[1:])):
                ap.error(f"--budgets: {text!r} must be {n_factors} non-increasing length factors in [0, 1] "
                         f"(one per repeat after the first), e.g. '1,0.5'")
            if b in budgets:
                ap.error(f"--budgets: {text!r} is given twice in {args.budgets!r}")
            budgets.append(b)
        args.budgets = tuple(budgets)


def forward_fn(cfg, params, batch: int, seq_len: int, dtype: str):
    """``(thunk, tokens per call)``: the compiled (and warmed-up) forward of ``cfg`` on a fixed
    ``[batch, seq_len]``, computing in ``dtype`` (the trainer's compute dtype: bf16 on a GPU)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxformers import build

    module = build(cfg.replace(dtype=dtype))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len)), jnp.int32)
    compiled = jax.jit(lambda p, t: module.apply({"params": p}, t)).lower(params, tokens).compile()
    jax.block_until_ready(compiled(params, tokens))
    return (lambda: compiled(params, tokens)), batch * seq_len


def _macs(cfg, seq_len: int) -> float:
    return cfg.flops_per_token(seq_len) / 6.0


def run(args) -> dict:
    import jax
    from jaxformers.models.cotformer import routed_counts
    from jaxformers.training import CompileCache, evaluate
    from jaxformers.training.trainer import open_dataset

    preset = _preset(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_results(out, PLOTS)  # an earlier run's results.json: not this run's until it saves its own
    train_kw = train_overrides(preset["train"], args.steps, args.eval_batches)
    _, meta, _, _ = open_dataset(args.data, "byte")
    grid = model_grid(preset, int(meta["vocab_size"]))
    if args.only is not None:  # checked names (_check_args)
        grid = [(n, c) for n, c in grid if n in args.only]
    budgets = BUDGETS if args.budgets is None else args.budgets
    seq_len = train_kw["seq_len"]

    results = {"preset": args.preset, "seed": args.seed, "backend": jax.default_backend(),
               "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
               "data": args.data, "train": train_kw, "model": preset["model"], "models": {},
               "adaptive_curve": [], "complete": False}
    forwards = {}
    cache = CompileCache()
    # --reuse: every finished run checked (model config and training settings) before any training
    reusable = (check_reuse(out, grid, seed=args.seed, data=args.data, train_kw=train_kw, log_points=10)
                if args.reuse else [])
    for name, cfg in grid:
        summary, params, dtype, tc = reuse_or_train(name, cfg, out, reusable, seed=args.seed, data=args.data,
                                                     train_kw=train_kw, log_points=10, tag="cotformer",
                                                     cache=cache)
        eval_cfg = cfg.replace(length_factors=(1.0,) * (cfg.n_repeat - 1)) if cfg.model == "adaptive_cotformer" else cfg
        row = {
            "model": cfg.model, "n_layer": cfg.n_layer, "n_repeat": getattr(cfg, "n_repeat", 1),
            "n_layer_begin": getattr(cfg, "n_layer_begin", 0), "n_layer_end": getattr(cfg, "n_layer_end", 0),
            "ln_mid": getattr(cfg, "ln_mid", False), "depth_embedding": getattr(cfg, "depth_embedding", None),
            "val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"], "train_loss": summary["train_loss"],
            "n_params": summary["n_params"], "macs_per_token": _macs(eval_cfg, seq_len),
            "train_flops_per_token": summary["flops_per_token"],
            "average_depth": (eval_cfg.average_depth(seq_len) if hasattr(eval_cfg, "average_depth")
                              else cfg.n_layer),
            "train_tokens_per_s": summary["tokens_per_s"], "train_tokens": tc.steps * tc.tokens_per_step,
            "train_wall_s": summary["wall_s"], "compute_dtype": dtype,
        }
        if cfg.model == "adaptive_cotformer":
            row["note"] = "val_ppl: the trainer's eval (full budget, every token runs every repeat)"
            for b in budgets:
                bc = cfg.replace(length_factors=tuple(b))
                ev = evaluate((bc, params), args.data, tokenizer="byte", batch_size=tc.batch_size,
                              seq_len=seq_len, max_batches=tc.eval_batches, dtype=tc.dtype, cache=cache)
                point = {"length_factors": list(b), "val_loss": ev["val_loss"], "val_ppl": ev["val_ppl"],
                         "macs_per_token": _macs(bc, seq_len), "average_depth": bc.average_depth(seq_len),
                         "tokens_per_repeat": routed_counts(tuple(b), cfg.n_repeat, seq_len)}
                fn, n_tok = forward_fn(bc, params, preset["infer_batch"], seq_len, dtype)
                forwards[f"{name}@{','.join(str(x) for x in b)}"] = (fn, n_tok)
                results["adaptive_curve"].append(point)
                save_progress(out, results)
                print(f"[cotformer] {name} budget {b}: val_ppl={ev['val_ppl']:.3f} "
                      f"MACs/token={point['macs_per_token']:.3g}", file=sys.stderr, flush=True)
        fn, n_tok = forward_fn(eval_cfg, params, preset["infer_batch"], seq_len, dtype)
        forwards[name] = (fn, n_tok)
        results["models"][name] = row
        save_progress(out, results)
        print(f"[cotformer] {name}: val_ppl={row['val_ppl']:.3f} params={row['n_params']} "
              f"MACs/token={row['macs_per_token']:.3g}", file=sys.stderr, flush=True)
    speeds = time_forwards(forwards)
    for name, tps in speeds.items():
        if "@" in name:
            lf = [float(x) for x in name.split("@")[1].split(",")]
            for p in results["adaptive_curve"]:
                if p["length_factors"] == lf:
                    p["infer_tokens_per_s"] = tps
        else:
            results["models"][name]["infer_tokens_per_s"] = tps
    results["complete"] = True
    write_json(out / "results.json", results, indent=2)
    plot(results, out / "ppl_vs_macs.png")
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["models"]
    styles = {"gpt": ("o-", "tab:blue", "standard transformer"), "but": ("s--", "tab:orange", "BUT"),
              "cotformer": ("^-", "tab:green", "CoTFormer")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, xlabel in ((axes[0], "macs_per_token", "forward MACs / token"),
                            (axes[1], "infer_tokens_per_s", f"inference tokens/s ({results['device_kind']})")):
        for kind, (fmt, color, label) in styles.items():
            pts = sorted((r[key], r["val_ppl"], n) for n, r in rows.items()
                         if r["model"] == kind and not r["ln_mid"] and r.get(key) and r["val_ppl"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], fmt, color=color, label=label)
                for x, y, n in pts:
                    ax.annotate(n.split("_", 1)[1], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for n, r in rows.items():
            if r["model"] == "cotformer" and r["ln_mid"] and r.get(key):
                ax.plot([r[key]], [r["val_ppl"]], "D", color="tab:red", markersize=8, label=f"LN-CoTFormer {n.split('_')[-1]}")
        curve = sorted((p[key], p["val_ppl"]) for p in results["adaptive_curve"] if p.get(key) and p["val_ppl"])
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], "*:", color="tab:purple", markersize=9,
                    label="adaptive LN-CoTFormer (one model, budgets)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title(f"perplexity vs compute ({results['preset']}, {results['train'].get('steps')} steps, "
                      f"seed {results['seed']})", fontsize=9)
    axes[1].set_title("perplexity vs inference speed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_experiment_args(_parser(), argv, check=_check_args)
    t0 = time.perf_counter()
    results = run(args)
    print(json.dumps({n: {k: r.get(k) for k in ("val_ppl", "n_params", "macs_per_token", "average_depth",
                                                "train_tokens_per_s", "infer_tokens_per_s")}
                      for n, r in results["models"].items()}, indent=1))
    for p in results["adaptive_curve"]:
        print(f"adaptive budget {p['length_factors']}: ppl {p['val_ppl']:.3f}, MACs/token "
              f"{p['macs_per_token']:.4g}, depth {p['average_depth']:.2f}")
    print(f"total {time.perf_counter() - t0:.0f}s -> {args.out}/results.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
