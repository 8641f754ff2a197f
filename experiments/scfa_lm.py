"""SCFA language models: baseline vs hash-sparse vs QK-sparse at equal steps and tokens.

    python -m experiments.scfa_lm --preset tiny --out runs/scfa-tiny             # CPU, a few minutes
    python -m experiments.scfa_lm --preset gpu --out runs/scfa-gpu               # 12 layers, d=768, T=8k+16k
    python -m experiments.scfa_lm --preset gpu --seq-len 8192 --out runs/scfa-8k # one length (one GPU stage)

Every model (GPT-style baseline, ``hash_sparse`` with ``n_buckets`` = nb, ``qk_sparse`` with
``qk_drop_rate`` = s) trains for the same steps on the same batches of the built-in corpus
(Shakespeare, byte tokens; ``--data`` for a prepared one) with ``jaxformers.training.train``;
runs go to ``OUT/runs/<name>``.  ``OUT/results.json`` holds per model and sequence length:
validation loss / perplexity, training tokens/s and wall-clock per step (the trainer's clock,
compilation excluded), and the attention tiles (``tile`` x ``tile`` (q, k) tile pairs of the
Pallas kernels: 16 in the tiny preset, 64 in the gpu one; on a TPU its kernels' 128-row tiles) one
training step's forward computes: from the hash buckets / keep masks the trained model (in its
compute dtype) draws (its evaluation draw) on a
``[batch_size, seq_len]`` batch of validation text (``--seed`` picks the windows), counted with
``pallas_kernels.sparse_attention.{hash,qk_sparse}_tile_count`` summed over layers, batch
rows and heads, next to the dense causal flash kernel's count (``causal_tile_count``);
``tiles_per_sparse_layer`` lists the sparse layers' counts in model order (layer 0 first).
On CPU the models train with the float32 reference (``sparse_impl="auto"``); ``kernel_check``
runs the trained sparse models once through the Pallas kernels (interpret mode on CPU) and
records the max |logits difference| vs the reference.  Plot: ``OUT/scfa_lm.png``.
``results.json`` is rewritten after every model (``complete`` false until the last), so a run
cut short (a device stage's time limit) keeps the models it finished; ``--reuse`` keeps the
finished runs in ``OUT/runs`` of an earlier invocation (checked first: same model config and
training settings) instead of retraining them.

``--steps N`` / ``--eval-batches N`` / ``--only a,b`` / ``--seq-len T`` shrink a run (tests).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from experiments.common import (check_reuse, environment, experiment_parser, parse_experiment_args, parse_list,
                                reuse_or_train, start_results, train_overrides, write_json)

#: the PNGs this experiment draws (an earlier invocation's: moved aside by ``start_results``)
PLOTS = ("scfa_lm.png",)

PRESETS = {
    # 2 layers, d=64, T=128: a few minutes on 2 CPU cores (reference attention).
    "tiny": dict(model=dict(d_model=64, n_head=4, n_layer=2, max_seq_len=128), seq_lens=(128,),
                 hash_buckets=(4,), qk_drop_rates=(0.5,), tile=16, kernel_check=True,
                 train=dict(steps=150, batch_size=8, lr=3e-3, warmup_steps=15, eval_every=0,
                            eval_batches=8)),
    # The paper's LM setting scaled to one device: 12 layers, d=768, 12 heads, T = 8k and 16k,
    # nb = 16 buckets, s = 50% dropping (the authors' defaults); bf16 compute, remat.
    "gpu": dict(model=dict(d_model=768, n_head=12, n_layer=12, max_seq_len=16384,
                           remat="save_attention_out"),
                seq_lens=(8192, 16384), hash_buckets=(16,), qk_drop_rates=(0.5,), tile=64,
                kernel_check=False,
                # 100 steps x 3 models fit one 10-minute GPU stage per length (scripts/gpu_session.sh)
                train=dict(steps=100, batch_size=2, lr=1e-3, warmup_steps=10, eval_every=0,
                           eval_batches=4, weight_decay=0.1)),
}


def _parser():
    ap = experiment_parser("scfa_lm", __doc__, PRESETS)
    ap.add_argument("--eval-batches", type=int, help="override the number of validation batches")
    ap.add_argument("--seq-len", type=int, help="run only this one of the preset's sequence lengths")
    ap.add_argument("--only", help="comma-separated model names (baseline, hash_nb4, qk_s50, ...)")
    ap.add_argument("--no-kernel-check", action="store_true", help="skip the Pallas-vs-reference check")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse finished runs in OUT/runs instead of retraining them (all checked first: "
                         "same model config and training settings)")
    return ap


def model_names(preset: dict) -> list:
    """Names of :func:`model_grid`'s models, in its order."""
    return (["baseline"] + [f"hash_nb{nb}" for nb in preset["hash_buckets"]]
            + [f"qk_s{round(100 * s)}" for s in preset["qk_drop_rates"]])


def model_grid(preset: dict, vocab_size: int, seq_len: int):
    """``[(name, config)]``: the GPT baseline, one hash_sparse per nb, one qk_sparse per s."""
    from jaxformers import get_config

    common = dict(preset["model"], vocab_size=vocab_size, max_seq_len=max(seq_len, preset["model"]["max_seq_len"]))
    tile = dict(block_q=preset["tile"], block_k=preset["tile"])
    configs = [get_config("gpt", "tiny", **common)]
    for nb in preset["hash_buckets"]:
        configs.append(get_config("hash_sparse", "tiny", n_buckets=nb, **tile, **common))
    for s in preset["qk_drop_rates"]:
        configs.append(get_config("qk_sparse", "tiny", qk_drop_rate=s, **tile, **common))
    return list(zip(model_names(preset), configs))


def _check_args(ap, args) -> None:
    """Usage errors before anything is loaded or trained; ``--only`` becomes a list."""
    preset = PRESETS[args.preset]
    if args.seq_len is not None and args.seq_len not in preset["seq_lens"]:
        ap.error(f"--seq-len {args.seq_len}: choose one of the {args.preset} preset's "
                 f"{list(preset['seq_lens'])}")
    args.only = parse_list(ap, "--only", args.only, allowed=model_names(preset), unique=True)


def tile_counts(cfg, params, batch, seq_len, seed, tile, tokens=None, platform=None):
    """Attention tiles one forward of a ``[batch, seq_len]`` batch computes: (sparse model's,
    dense causal flash kernel's, per sparse layer in model order), summed over layers, batch
    rows and query heads.  ``tokens``: that batch (the experiment passes validation text; the
    hash buckets depend on it); ``None``: uniformly random ids drawn with ``seed``.  Dense
    layers (``sparse_layers``) count as the causal kernel's tiles; ``scan_layers`` models are
    counted per layer too (``attention_labels`` raises rather than miss a sparse layer).
    ``platform``: the kernel variant whose tiles are counted (``None``: the one the default
    backend runs: ``"tpu"`` on a TPU -- tiles of at least 128 rows -- else ``"gpu"``: ``tile`` x ``tile``)."""
    import jax
    import numpy as np
    from jaxformers import build
    from jaxformers.models.scfa import attention_labels
    from pallas_kernels.sparse_attention import causal_tile_count, hash_tile_count, qk_sparse_tile_count

    if platform is None:
        platform = "tpu" if jax.default_backend() == "tpu" else "gpu"
    blocks = dict(block_q=tile, block_k=tile, platform=platform)
    dense_layer = causal_tile_count(seq_len, **blocks) * batch * cfg.n_head
    dense = dense_layer * cfg.n_layer
    if cfg.model not in ("hash_sparse", "qk_sparse"):
        return dense, dense, []
    if tokens is None:
        tokens = jax.random.randint(jax.random.PRNGKey(seed), (batch, seq_len), 0, cfg.vocab_size)
    elif tuple(tokens.shape) != (batch, seq_len):
        raise ValueError(f"tokens must be [batch={batch}, seq_len={seq_len}], got {tuple(tokens.shape)}")
    tokens = jax.numpy.asarray(tokens)
    counter = hash_tile_count if cfg.model == "hash_sparse" else qk_sparse_tile_count
    per_layer = [int(np.asarray(counter(ql, kl, **blocks)).sum())
                 for ql, kl in attention_labels(build(cfg), params, tokens)]
    n_dense_layers = sum(not cfg.is_sparse_layer(i) for i in range(cfg.n_layer))
    return sum(per_layer) + n_dense_layers * dense_layer, dense, per_layer


def kernel_check(cfg, params, seq_len, seed):
    """Max |logits(sparse_impl=pallas) - logits(reference)| on one sequence (interpret on CPU)."""
    import jax
    import jax.numpy as jnp
    from jaxformers import build

    tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (1, seq_len), 0, cfg.vocab_size)
    out = {}
    for impl in ("pallas", "reference"):
        m = build(cfg.replace(sparse_impl=impl))
        out[impl] = jax.jit(lambda p, t: m.apply({"params": p}, t))(params, tokens)
    return float(jnp.max(jnp.abs(out["pallas"] - out["reference"])))


def validation_batch(val_tokens, batch: int, seq_len: int, seed: int):
    """``[batch, seq_len]`` int32 windows of the validation split at random starts (``seed``)."""
    import numpy as np

    if len(val_tokens) < seq_len:
        raise SystemExit(f"the validation split ({len(val_tokens)} tokens) is shorter than seq_len={seq_len}")
    starts = np.random.default_rng([seed, 4]).integers(0, len(val_tokens) - seq_len + 1, batch)
    return np.stack([np.asarray(val_tokens[s:s + seq_len], np.int32) for s in starts])


def run(args) -> dict:
    from jaxformers.training import CompileCache
    from jaxformers.training.trainer import open_dataset

    preset = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_results(out, PLOTS)  # an earlier run's results.json: not this run's until it saves its own
    train_kw = train_overrides(preset["train"], args.steps, args.eval_batches)
    _, meta, _, val_tokens = open_dataset(args.data, "byte")
    seq_lens = preset["seq_lens"] if args.seq_len is None else (args.seq_len,)  # checked (_check_args)
    results = {**environment(), "preset": args.preset, "seed": args.seed, "data": args.data,
               "train": train_kw, "tile": preset["tile"], "models": {}, "complete": False}
    cache = CompileCache()
    grids = {}
    for seq_len in seq_lens:
        grid = model_grid(preset, int(meta["vocab_size"]), seq_len)
        if args.only is not None:  # checked names (_check_args)
            grid = [(n, c) for n, c in grid if n in args.only]
        grids[seq_len] = [(f"{name}_T{seq_len}", cfg) for name, cfg in grid]
    # --reuse: every finished run checked (model config and training settings) before any training
    reusable = ([key for seq_len, grid in grids.items() for key in
                 check_reuse(out, grid, seed=args.seed, data=args.data, train_kw=dict(train_kw, seq_len=seq_len),
                             log_points=10)] if args.reuse else [])
    for seq_len, grid in grids.items():
        for key, cfg in grid:
            kw = dict(train_kw, seq_len=seq_len)
            summary, params, dtype, tc = reuse_or_train(key, cfg, out, reusable, seed=args.seed, data=args.data,
                                                        train_kw=kw, log_points=10, tag="scfa_lm", cache=cache)
            tps = summary["tokens_per_s"]
            # counted with the model the trainer ran (its compute dtype: the buckets hash its q / k)
            tiles, dense_tiles, per_layer = tile_counts(
                cfg.replace(dtype=dtype), params, tc.batch_size, seq_len, args.seed, preset["tile"],
                tokens=validation_batch(val_tokens, tc.batch_size, seq_len, args.seed))
            row = {
                "model": cfg.model, "seq_len": seq_len,
                "n_buckets": getattr(cfg, "n_buckets", None) if cfg.model == "hash_sparse" else None,
                "qk_drop_rate": getattr(cfg, "qk_drop_rate", None) if cfg.model == "qk_sparse" else None,
                "val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"],
                "train_loss": summary["train_loss"], "n_params": summary["n_params"],
                "train_tokens": tc.steps * tc.tokens_per_step, "steps": tc.steps,
                "train_tokens_per_s": tps,
                "step_time_s": (tc.tokens_per_step / tps) if tps else None,
                "attention_tiles_per_step": tiles, "dense_attention_tiles_per_step": dense_tiles,
                "tile_fraction": tiles / dense_tiles, "tiles_per_sparse_layer": per_layer,
                "train_wall_s": summary["wall_s"], "compile_s": summary.get("compile_s"),
                "compute_dtype": dtype, "mfu_dense_equivalent": summary.get("mfu"),
            }
            if preset["kernel_check"] and not args.no_kernel_check and cfg.model != "gpt":
                row["kernel_check_max_abs_diff"] = kernel_check(cfg, params, seq_len, args.seed)
            results["models"][key] = row
            print(f"[scfa_lm] {key}: val_ppl={row['val_ppl']:.3f} step={row['step_time_s'] or 0:.4f}s "
                  f"tiles={tiles}/{dense_tiles}", file=sys.stderr, flush=True)
            _write(results, out)  # after every model: a run cut short keeps what it finished
    results["complete"] = True
    _write(results, out)
    plot(results, out / "scfa_lm.png")
    return results


def _write(results: dict, out: Path) -> None:
    """Ratios to the same length's baseline (where trained), then ``OUT/results.json``."""
    for row in results["models"].values():
        base = results["models"].get(f"baseline_T{row['seq_len']}")
        if base is None:
            continue
        if row["val_ppl"] is not None and base["val_ppl"] is not None:  # needs no clock
            row["val_ppl_delta_vs_baseline"] = row["val_ppl"] - base["val_ppl"]
        if base["step_time_s"] and row["step_time_s"]:
            row["speedup_vs_baseline"] = base["step_time_s"] / row["step_time_s"]
    write_json(out / "results.json", results, indent=2)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["models"]
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("val_ppl", "validation perplexity"), ("step_time_s", "wall-clock per step (s)"),
              ("tile_fraction", "attention tiles / dense causal"))
    colors = ["tab:blue" if r["model"] == "gpt" else "tab:orange" if r["model"] == "hash_sparse"
              else "tab:green" for r in rows.values()]
    for ax, (key, label) in zip(axes, panels):
        # a missing number (no timed step: step_time_s None) is no bar and "n/a", not a 0 bar
        vals = [float("nan") if rows[n][key] is None else rows[n][key] for n in names]
        ax.bar(range(len(names)), vals, color=colors)
        ax.set_xlim(-0.6, len(names) - 0.4)  # every model's slot, a missing (nan) bar's included
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        for i, v in enumerate(vals):
            ax.text(i, 0.0 if v != v else v, "n/a" if v != v else f"{v:.3g}", ha="center", va="bottom",
                    fontsize=7)
    fig.suptitle(f"SCFA LMs ({results['preset']}, {results['train']['steps']} steps, "
                 f"{results['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_experiment_args(_parser(), argv, check=_check_args)
    t0 = time.perf_counter()
    results = run(args)
    print(json.dumps({n: {k: r.get(k) for k in ("val_ppl", "step_time_s", "tile_fraction",
                                                 "kernel_check_max_abs_diff")}
                      for n, r in results["models"].items()}, indent=1))
    print(f"total {time.perf_counter() - t0:.0f}s -> {args.out}/results.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
