"""Layer-parallel inference ("Leveraging the true depth of LLMs"): quality vs speed of a trained
model whose consecutive layers run in parallel pairs, and the delete / swap / shuffle study.

    python -m experiments.layer_parallel --preset tiny --out runs/lp-tiny     # a few minutes, 2 CPU cores
    python -m experiments.layer_parallel --preset gpu --out runs/lp-gpu       # ~280M-param Llama, H100/H200
    python -m experiments.layer_parallel --run runs/my-llama --out runs/lp    # a run trained here
    python -m experiments.layer_parallel --run path/to/hf-llama --data DATASET_DIR --out runs/lp

``--run``: a run trained here (a ``gpt``/``llama``, evaluated with its own tokenizer; a
scanned run is unrolled first, so the baseline is timed in the pairs' per-layer form) or a
HF Llama / Mistral / Qwen2 / Qwen3 directory (``--data`` needed; tokenized with ``--tokenizer``, default its
``tokenizer.json``); data whose vocabulary exceeds the model's is a usage error.
Without ``--run`` the preset's Llama (RMSNorm, SwiGLU, GQA, byte tokens or a prepared
``--data``'s) is trained from scratch (``jaxformers.training.train``, seed ``--seed``).  Then, for ``k = 1 .. max`` pairs and
several positions of the paired span (``early``: from layer 1, ``middle``, ``late``: ending
before the last layer; the first and last layers are never paired, as in the authors' runs)
the model is transformed with ``jaxformers.transforms.pair_layers`` (fused form, no retraining;
``--unfused``: the two layers side by side, the same function, slower; ``results.json``'s
``pair_form`` says which form ran and why; a ``qk_norm`` model such as a Qwen3 import fuses too)
and measured: validation perplexity and next-token accuracy (``--eval-batches`` batches of the
validation split, compute dtype ``infer_dtype``; over the targets the trainer's validation counts:
a synthetic task's ``loss_mask`` weights them), prefill tokens/s (batch ``infer_batch`` x
``seq_len``), decode tokens/s at batch 1 and at batch ``infer_batch`` (greedy, KV cache,
``--decode-tokens`` steps after a ``prompt_len`` prompt, jitted ``fori_loop``; the fastest of 3
interleaved rounds of ``--iters`` calls).  Spans ending at layer ``L-2`` are also evaluated with the
authors' shared MLP norm (``mlp_norm="mean"``, same speed).  Study: perplexity after deleting
each layer, swapping each pair of adjacent layers, and shuffling windows of 3 layers
(``--seed``).  ``OUT/results.json`` holds every number; ``OUT/layer_parallel.png`` plots
perplexity increase and accuracy against the decode speed-up, and the study.

``--steps`` / ``--eval-batches`` / ``--n-layer`` / ``--d-model`` / ``--seq-len`` /
``--batch-size`` / ``--decode-tokens`` / ``--max-pairs`` / ``--positions`` / ``--pair-counts`` /
``--no-study`` shrink a run (tests, GPU stages); ``--reuse`` keeps
a finished ``OUT/runs/base`` trained with the same model config and training settings (else exit
naming the fields); ``--train-only`` stops after training (GPU stage split).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from experiments.common import (check_data_vocab, check_reuse, check_run_args, experiment_parser,
                                parse_experiment_args, parse_list, reuse_or_train, run_kind, start_results,
                                train_overrides, unrolled, usage_error, write_json)

#: the PNGs this experiment draws (an earlier invocation's: moved aside by ``start_results``)
PLOTS = ("layer_parallel.png",)

POSITIONS = ("early", "middle", "late")
PRESETS = {
    "tiny": dict(model=dict(d_model=64, n_layer=8, n_head=4, n_kv_head=2, d_ff=192, max_seq_len=128),
                 train=dict(steps=250, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=25, eval_every=0,
                            eval_batches=16),
                 data="default", infer_dtype="float32", infer_batch=16, prompt_len=16, decode_tokens=32,
                 iters=5, positions=POSITIONS, pair_counts=None),
    # a few hundred M params (byte vocab: ~283M); the stdlib corpus needs no network on the device
    "gpu": dict(model=dict(d_model=1024, n_layer=24, n_head=16, n_kv_head=8, d_ff=2816, max_seq_len=1024),
                train=dict(steps=2500, batch_size=32, seq_len=512, lr=6e-4, warmup_steps=250, eval_every=0,
                           eval_batches=40, dtype="bfloat16"),
                data="python", infer_dtype="bfloat16", infer_batch=32, prompt_len=128, decode_tokens=128,
                iters=5, positions=("late",), pair_counts=(1, 2, 4, 6, 8)),
}
TARGET = dict(decode_speedup=1.15, rel_ppl_increase=0.05)


def _parser():
    ap = experiment_parser("layer_parallel", __doc__, PRESETS, data_default=None,
                           data_help="data spec for evaluation (default: the run's / the preset's)")
    ap.add_argument("--run", help="a run directory trained here, or a HF Llama / Mistral / Qwen2 / Qwen3 directory "
                                  "(then --data)")
    ap.add_argument("--tokenizer", help="tokenizer of --data for a --run HF checkpoint (default: its "
                                        "tokenizer.json); a run trained here uses its own")
    ap.add_argument("--eval-batches", type=int, help="override the number of validation batches")
    ap.add_argument("--n-layer", type=int, help="override the preset's depth")
    ap.add_argument("--d-model", type=int, help="override the preset's width")
    ap.add_argument("--seq-len", type=int, help="override the preset's sequence length")
    ap.add_argument("--batch-size", type=int, help="override the training and inference batch size")
    ap.add_argument("--decode-tokens", type=int, help="override the number of timed decode steps")
    ap.add_argument("--max-pairs", type=int, help="at most this many pairs")
    ap.add_argument("--positions", help="comma-separated span positions (early,middle,late; default: the preset's)")
    ap.add_argument("--pair-counts", help="comma-separated numbers of pairs (default: the preset's)")
    ap.add_argument("--no-study", action="store_true", help="skip the delete / swap / shuffle study")
    ap.add_argument("--unfused", action="store_true",
                    help="pair layers unfused (the two layers side by side: the same function, slower; "
                         "default: fused)")
    ap.add_argument("--iters", type=int, help="timed calls per measurement")
    ap.add_argument("--reuse", action="store_true", help="reuse a finished OUT/runs/base (same model config and "
                                                            "training settings, else exit)")
    ap.add_argument("--train-only", action="store_true", help="stop after training OUT/runs/base")
    return ap


#: options that only shape training the preset's model: refused with --run (a run is not retrained)
TRAIN_ONLY_FLAGS = ("n_layer", "d_model", "steps", "reuse", "train_only")


def max_pairs_of(n_layer: int) -> int:
    """The most pairs a model of ``n_layer`` layers has (the first and last layers never pair)."""
    return (n_layer - 2) // 2


def _preset(args) -> dict:
    """A copy of the preset with the overrides of the command line applied."""
    preset = json.loads(json.dumps(PRESETS[args.preset]))
    for key in ("n_layer", "d_model"):
        if getattr(args, key) is not None:
            preset["model"][key] = getattr(args, key)
    if args.seq_len is not None:
        preset["train"]["seq_len"] = args.seq_len
        preset["model"]["max_seq_len"] = max(preset["model"]["max_seq_len"], args.seq_len)
    if args.batch_size is not None:
        preset["train"]["batch_size"] = preset["infer_batch"] = args.batch_size
    for key in ("decode_tokens", "iters"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.positions is not None:
        preset["positions"] = args.positions
    if args.pair_counts is not None:
        preset["pair_counts"] = args.pair_counts
    return preset


def _check_args(ap, args) -> None:
    """Usage errors before anything is loaded or trained (with ``--run``, the checks that need
    the model's depth and length follow in :func:`check_model`); ``--positions`` /
    ``--pair-counts`` become lists."""
    if args.run == "":
        ap.error("--run: empty path")
    if args.run:
        given = ["--" + f.replace("_", "-") for f in TRAIN_ONLY_FLAGS
                 if getattr(args, f) not in (None, False)]
        if given:
            ap.error(f"--run: {', '.join(given)} only shape(s) the preset's training; a --run model is not "
                     "retrained (drop them, or drop --run)")
    check_run_args(ap, args)
    if not args.run and args.data is not None and args.data.startswith(("synthetic:", "domains:")):
        ap.error(f"--data {args.data!r}: a synthetic / domains spec needs --run (the preset's model is "
                 "trained on a corpus or prepared dataset)")
    if args.n_layer is not None and args.n_layer < 4:
        ap.error(f"--n-layer must be >= 4 (pairs are taken inside layers 1 .. L-2), got {args.n_layer}")
    args.positions = parse_list(ap, "--positions", args.positions, allowed=POSITIONS, unique=True)
    args.pair_counts = parse_list(ap, "--pair-counts", args.pair_counts, cast=int, lo=1, unique=True)
    if args.pair_counts is not None and args.max_pairs is not None and max(args.pair_counts) > args.max_pairs:
        ap.error(f"--pair-counts {max(args.pair_counts)} is more than --max-pairs {args.max_pairs}")
    if not args.run:
        preset = _preset(args)
        check_model(ap, args, preset, preset["model"]["n_layer"], preset["model"]["max_seq_len"])


def check_model(ap, args, preset: dict, n_layer: int, max_seq_len: int) -> None:
    """Usage errors for settings the model (``n_layer`` layers, ``max_seq_len`` positions) cannot run."""
    if n_layer < 4:
        usage_error(ap, f"the model needs >= 4 layers to pair inner layers, has {n_layer}")
    kmax = max_pairs_of(n_layer)
    counts = preset["pair_counts"]
    too_many = [k for k in counts or () if k > kmax]
    if too_many:
        flag = ("--pair-counts" if args.pair_counts is not None
                else f"the {args.preset} preset's pair counts {list(counts)} (set --pair-counts)")
        usage_error(ap, f"{flag}: {too_many} pair(s) do not fit in the {n_layer}-layer model "
                        f"(at most {kmax}: the first and last layers are never paired)")
    if args.seq_len is not None and args.seq_len > max_seq_len:
        usage_error(ap, f"--seq-len {args.seq_len} is longer than the model's max_seq_len={max_seq_len}")
    if preset["decode_tokens"] >= max_seq_len:
        usage_error(ap, f"--decode-tokens must be < max_seq_len={max_seq_len}, got {preset['decode_tokens']}")


# ============================================================================ model
def load_model(args, preset, out: Path):
    """``(config, float32 params, data, tokenizer, train info)`` of ``--run`` or a fresh preset run."""
    import jax
    from jaxformers import get_config
    from jaxformers.training import load_run
    from jaxformers.training.trainer import open_dataset

    if args.run:
        run = Path(args.run)
        if run_kind(None, run) == "hf":  # (--data and the tokenizer checked by _check_args)
            from jaxformers.convert import from_hf
            cfg, params = from_hf(str(run), dtype="float32")
            return cfg, params, args.data, args.tokenizer, {"source": f"hf:{run}"}
        cfg, tc, params = load_run(run)
        return cfg, params, args.data or tc.data, tc.tokenizer, {"source": str(run), "train": tc.to_dict()}
    data = args.data or preset["data"]
    train_kw = train_overrides(preset["train"], args.steps, args.eval_batches)
    _, meta, _, _ = open_dataset(data, "byte")
    cfg = get_config("llama", "tiny", vocab_size=int(meta["vocab_size"]), **preset["model"])
    reusable = (check_reuse(out, [("base", cfg)], seed=args.seed, data=data, train_kw=train_kw, log_points=10)
                if args.reuse else [])
    summary, params, _, tc = reuse_or_train("base", cfg, out, reusable, seed=args.seed, data=data,
                                            train_kw=train_kw, log_points=10, tag="layer_parallel")
    info = {"source": "trained", "train": tc.to_dict(),
            "summary": {k: summary.get(k) for k in ("val_loss", "val_ppl", "train_loss", "n_params",
                                                    "tokens_per_s", "wall_s")}}
    return cfg, jax.device_get(params), data, "byte", info


def spans(n_layer: int, max_pairs=None, positions=POSITIONS, pair_counts=None):
    """``[(position, start, end)]``: for k pairs (``pair_counts``, default ``1 .. max``), the
    span of 2k layers inside ``1 .. L-2`` at the early / middle / late position (a span already
    listed under an earlier position is not repeated)."""
    inner = n_layer - 2
    out = []
    kmax = inner // 2 if max_pairs is None else min(inner // 2, max_pairs)
    counts = range(1, kmax + 1) if pair_counts is None else [k for k in pair_counts if 1 <= k <= kmax]
    for k in counts:
        w = 2 * k
        seen = set()
        for pos, start in (("early", 1), ("middle", 1 + (inner - w) // 2), ("late", n_layer - 1 - w)):
            if pos in positions and start not in seen:
                seen.add(start)
                out.append((pos, start, start + w))
    return out


# ============================================================================ measurements
class Evaluator:
    """Validation perplexity + next-token accuracy over the targets the trainer's validation
    counts (weighted by the batch's ``loss_mask``, e.g. a synthetic task's answer tokens, and
    kept inside packed ``segment_ids``); one compiled program per config."""

    def __init__(self, data, tokenizer, batch, seq_len, max_batches, dtype):
        from jaxformers.data import open_data
        source = open_data(data, tokenizer)
        keys = ("tokens", "loss_mask", "segment_ids", "positions")  # what the trainer's loss reads
        self.batches = [{k: b[k] for k in keys if b.get(k) is not None}
                        for b in source.eval_batches(batch, seq_len, max_batches, drop_last=True)]
        if not self.batches:
            raise SystemExit(f"the validation split of {data!r} has no full batch of {batch} x {seq_len + 1}")
        self.dtype, self._fns = dtype, {}

    def _fn(self, cfg):
        import jax
        import jax.numpy as jnp
        from jaxformers import build
        from jaxformers.training.losses import model_inputs, next_token_targets

        if cfg not in self._fns:
            module = build(cfg)

            def stats(params, batch):
                tokens, inputs = model_inputs(batch)
                logits = module.apply({"params": params}, tokens, **inputs).astype(jnp.float32)
                targets, w = next_token_targets(batch)       # loss_mask / segment weights
                logp = jax.nn.log_softmax(logits, axis=-1)
                nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
                return jnp.sum(w * nll), jnp.sum(w * (jnp.argmax(logits, -1) == targets)), jnp.sum(w)

            self._fns[cfg] = jax.jit(stats)
        return self._fns[cfg]

    def __call__(self, cfg, params) -> dict:
        cfg, params = cast(cfg, params, self.dtype)
        fn = self._fn(cfg)
        nll = correct = n = 0.0
        for batch in self.batches:
            a, b, w = fn(params, batch)
            nll, correct, n = nll + float(a), correct + float(b), n + float(w)
        if n <= 0:
            raise SystemExit("the validation batches have no target token of weight > 0 (loss_mask)")
        return {"val_loss": nll / n, "val_ppl": math.exp(nll / n), "val_acc": correct / n,
                "val_tokens": int(n)}


def cast(cfg, params, dtype):
    import jax
    import jax.numpy as jnp
    from jaxformers.layers.common import dtype_of
    if cfg.dtype == dtype and cfg.param_dtype == dtype:
        return cfg, params
    return (cfg.replace(dtype=dtype, param_dtype=dtype),
            jax.tree.map(lambda x: jnp.asarray(x, dtype_of(dtype)), params))


def speed_fns(cfg, params, *, batch, seq_len, prompt_len, decode_tokens, dtype):
    """``{name: (thunk, tokens per call)}``: prefill (batch x seq_len), decode at batch 1 and at
    ``batch`` (greedy, ``decode_tokens`` steps from a prefilled cache)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxformers import build, init_cache

    cfg, params = cast(cfg, params, dtype)
    params = jax.device_put(params)
    module = build(cfg)
    rng = np.random.default_rng(0)
    fns = {}

    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq_len)), jnp.int32)
    prefill = jax.jit(lambda p, t: module.apply({"params": p}, t)[:, -1])
    fns["prefill"] = (lambda: prefill(params, prompt), batch * seq_len)

    def decoder(b):
        start = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, prompt_len)), jnp.int32)

        @jax.jit
        def warm(p, t):
            logits, cache = module.apply({"params": p}, t, cache=init_cache(module, b, prompt_len + decode_tokens))
            return logits[:, -1], cache

        @jax.jit
        def decode(p, last, cache):
            def step(_, state):
                last, cache, acc = state
                tok = jnp.argmax(last, axis=-1).astype(jnp.int32)
                logits, cache = module.apply({"params": p}, tok[:, None], cache=cache)
                return logits[:, -1], cache, acc + tok
            return jax.lax.fori_loop(0, decode_tokens, step, (last, cache, jnp.zeros((b,), jnp.int32)))[2]

        last, cache = jax.block_until_ready(warm(params, start))
        return lambda: decode(params, last, cache)

    fns["decode_b1"] = (decoder(1), decode_tokens)
    fns[f"decode_b{batch}"] = (decoder(batch), batch * decode_tokens)
    for fn, _ in fns.values():
        jax.block_until_ready(fn())  # compile
    return fns


def time_all(entries: dict, iters: int, rounds: int = 3) -> dict:
    """``{key: {name: tokens/s}}`` from the fastest of ``rounds x iters`` calls, the configs
    interleaved round by round (the fastest call is the one least disturbed by other jobs)."""
    import jax
    best = {k: {n: 0.0 for n in fns} for k, fns in entries.items()}
    for _ in range(rounds):
        for key, fns in entries.items():
            for name, (fn, tokens) in fns.items():
                jax.block_until_ready(fn())
                for _ in range(iters):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn())
                    best[key][name] = max(best[key][name], tokens / (time.perf_counter() - t0))
    return best


# ============================================================================ run
def run(args, ap=None) -> dict:
    """The experiment (``args`` checked by :func:`_check_args`; ``ap``: the parser, for the usage
    errors that need the loaded model)."""
    import jax
    from jaxformers.transforms import delete_layers, pair_layers, shuffle_layers, swap_layers
    from jaxformers.transforms.layer_parallel import base_models

    preset = _preset(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.train_only:  # an earlier run's results.json: not this run's until it saves its own
        start_results(out, PLOTS)
    cfg, params, data, tokenizer, info = load_model(args, preset, out)
    if args.train_only:
        return {"train_only": True, **info}
    # before any evaluation or timing
    if cfg.model not in base_models():
        usage_error(ap, f"--run: layer pairs need a plain transformer ({base_models()}), got model {cfg.model!r}")
    check_model(ap, args, preset, cfg.n_layer, cfg.max_seq_len)
    check_data_vocab(ap, data, tokenizer, cfg.vocab_size)
    # pairs are per-layer trees: a scanned run is timed unrolled too, so that the speed-ups
    # compare pairing, not the layer loop's form
    info["unrolled_from_scan"] = bool(cfg.scan_layers)
    cfg, params = unrolled(cfg, params)
    seq_len = min(preset["train"]["seq_len"], cfg.max_seq_len)
    prompt_len = min(preset["prompt_len"], cfg.max_seq_len - preset["decode_tokens"])  # >= 1 (check_model)
    batch, dtype = preset["infer_batch"], preset["infer_dtype"]
    ev = Evaluator(data, tokenizer, batch, seq_len,
                   preset["train"]["eval_batches"] if args.eval_batches is None else args.eval_batches, dtype)
    speed_kw = dict(batch=batch, seq_len=seq_len, prompt_len=prompt_len,
                    decode_tokens=preset["decode_tokens"], dtype=dtype)
    tag = "[layer_parallel]"
    fused, why = not args.unfused, "--unfused" if args.unfused else None
    pair_form = {"fused": fused, "reason": why}

    base = ev(cfg, params)
    print(f"{tag} baseline: ppl {base['val_ppl']:.4f} acc {base['val_acc']:.4f}", file=sys.stderr, flush=True)
    rows, paired = [], {}
    study = {"delete": [], "swap": [], "shuffle": []}
    results = {
        "preset": args.preset, "seed": args.seed, "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__, "data": data,
        "model": cfg.to_dict(), "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "source": info, "infer": {k: preset[k] for k in ("infer_dtype", "infer_batch", "decode_tokens", "iters",
                                                          "positions", "pair_counts")}
        | {"prompt_len": prompt_len, "seq_len": seq_len, "eval_batches": len(ev.batches),
           "max_pairs": args.max_pairs, "no_study": bool(args.no_study)},
        "pair_form": pair_form, "baseline": base, "pairs": rows, "study": study, "complete": False,
        "note": f"speeds measured on {jax.default_backend()} ({jax.devices()[0].device_kind})",
    }

    def save():  # quality so far (complete: false): an interrupted run keeps every row it measured
        write_json(out / "results.json", results, indent=2)

    save()
    for position, start, end in spans(cfg.n_layer, args.max_pairs, preset["positions"], preset["pair_counts"]):
        for mlp_norm in (("own", "mean") if end == cfg.n_layer - 1 else ("own",)):
            pcfg, pparams = pair_layers(cfg, params, start, end, mlp_norm=mlp_norm, fused=fused)
            row = {"position": position, "start": start, "end": end, "n_pairs": len(pcfg.pairs),
                   "mlp_norm": mlp_norm, "effective_depth": pcfg.effective_depth, **ev(pcfg, pparams)}
            row["rel_ppl_increase"] = row["val_ppl"] / base["val_ppl"] - 1
            paired.setdefault(f"{start}:{end}", (start, end))  # speed: the same for both norms
            rows.append(row)
            save()
            print(f"{tag} pairs {start}:{end} ({position}, mlp_norm={mlp_norm}): ppl {row['val_ppl']:.4f} "
                  f"(+{100 * row['rel_ppl_increase']:.2f}%) acc {row['val_acc']:.4f}", file=sys.stderr, flush=True)

    # ------------------------------------------------ preliminary study (no speed: quality only)
    def study_item(kind, item, model):
        item.update(ev(*model))
        item["rel_ppl_increase"] = item["val_ppl"] / base["val_ppl"] - 1
        study[kind].append(item)
        save()

    for i in range(0 if args.no_study else cfg.n_layer):
        study_item("delete", {"layer": i}, delete_layers(cfg, params, [i]))
    for i in range(0 if args.no_study else cfg.n_layer - 1):
        study_item("swap", {"layers": [i, i + 1]}, swap_layers(cfg, params, i))
    for s in range(0, 0 if args.no_study else cfg.n_layer - 2):
        c2, p2, order = shuffle_layers(cfg, params, s, s + 3, seed=args.seed)
        study_item("shuffle", {"layers": [s, s + 3], "order": order, "seed": args.seed}, (c2, p2))

    # ------------------------------------------------ speed (compiled last: the costly part on a GPU)
    speed = {"baseline": speed_fns(cfg, params, **speed_kw)}
    for key, (start, end) in paired.items():
        speed[key] = speed_fns(*pair_layers(cfg, params, start, end, fused=fused), **speed_kw)
    tps = time_all(speed, preset["iters"])
    names = list(tps["baseline"])
    base.update({f"{n}_tokens_per_s": tps["baseline"][n] for n in names})
    for row in rows:
        t = tps[f"{row['start']}:{row['end']}"]
        for n in names:
            row[f"{n}_tokens_per_s"] = t[n]
            row[f"{n}_speedup"] = t[n] / tps["baseline"][n]
    dk = f"decode_b{batch}"
    ok = [r for r in rows if r["rel_ppl_increase"] <= TARGET["rel_ppl_increase"]]
    best = max(ok, key=lambda r: r["decode_b1_speedup"], default=None)
    results["complete"] = True
    results["target"] = {**TARGET, "decode_key": "decode_b1", "best_within_ppl": best and {
        k: best[k] for k in ("start", "end", "mlp_norm", "rel_ppl_increase", "decode_b1_speedup",
                             f"{dk}_speedup", "prefill_speedup")},
        "met": bool(best and best["decode_b1_speedup"] >= TARGET["decode_speedup"])}
    write_json(out / "results.json", results, indent=2)
    plot(results, out / "layer_parallel.png")
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["pairs"]
    batch = results["infer"]["infer_batch"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"early": "tab:blue", "middle": "tab:green", "late": "tab:red"}
    for ax, key, ylabel in ((axes[0], "rel_ppl_increase", "relative perplexity increase"),
                            (axes[1], "val_acc", "next-token accuracy")):
        for r in rows:
            c = colors[r["position"]]
            face = c if r["mlp_norm"] == "own" else "none"
            for dk, marker in (("decode_b1", "o"), (f"decode_b{batch}", "s")):
                ax.scatter(r[f"{dk}_speedup"], r[key], marker=marker, edgecolors=c, facecolors=face)
            ax.annotate(f"{r['start']}:{r['end']}", (r["decode_b1_speedup"], r[key]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        base = 0.0 if key == "rel_ppl_increase" else results["baseline"]["val_acc"]
        ax.scatter([1.0], [base], marker="*", s=120, color="k", label="unpaired")
        for pos, c in colors.items():
            ax.scatter([], [], color=c, label=pos)
        ax.scatter([], [], marker="o", color="gray", label="decode batch 1")
        ax.scatter([], [], marker="s", color="gray", label=f"decode batch {batch}")
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="gray", label="mlp_norm=mean (authors)")
        ax.set_xlabel(f"decode speed-up vs unpaired ({results['device_kind']})")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if True:
        ax = axes[0]
        ax.axhline(TARGET["rel_ppl_increase"], ls=":", color="gray")
        ax.axvline(TARGET["decode_speedup"], ls=":", color="gray")
    ax = axes[2]
    st = results["study"]
    ax.plot([d["layer"] for d in st["delete"]], [d["val_ppl"] for d in st["delete"]], "o-", label="delete layer i")
    ax.plot([s["layers"][0] + 0.5 for s in st["swap"]], [s["val_ppl"] for s in st["swap"]], "s-",
            label="swap i, i+1 (at i+0.5)")
    ax.plot([s["layers"][0] + 1 for s in st["shuffle"]], [s["val_ppl"] for s in st["shuffle"]], "^-",
            label="shuffle i-1..i+1 (at i)")
    ax.axhline(results["baseline"]["val_ppl"], color="k", ls=":", label="unmodified")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("validation perplexity")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(f"layer-parallel pairs, {results['preset']} ({results['n_params'] / 1e6:.1f}M params, "
                 f"{results['model']['n_layer']} layers, seed {results['seed']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = _parser()
    args = parse_experiment_args(ap, argv, check=_check_args, data_specs=True)
    t0 = time.perf_counter()
    results = run(args, ap)
    if not results.get("train_only"):
        b = results["baseline"]
        print(f"baseline: ppl {b['val_ppl']:.4f} acc {b['val_acc']:.4f} decode b1 {b['decode_b1_tokens_per_s']:.0f} tok/s")
        for r in results["pairs"]:
            print(f"pairs {r['start']}:{r['end']} {r['position']:6s} {r['mlp_norm']:4s} ppl {r['val_ppl']:.4f} "
                  f"(+{100 * r['rel_ppl_increase']:.2f}%) acc {r['val_acc']:.4f} speed-up prefill "
                  f"{r['prefill_speedup']:.2f}x decode b1 {r['decode_b1_speedup']:.2f}x")
        print(f"total {time.perf_counter() - t0:.0f}s -> {args.out}/results.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
