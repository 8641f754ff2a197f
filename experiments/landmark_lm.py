"""Landmark-attention LM: perplexity beyond the training length vs retrieved blocks, and the
memory / time per token of the retrieval memory vs a full-attention baseline with a KV cache.

    python -m experiments.landmark_lm --preset tiny --out runs/landmark-lm-tiny   # a few CPU minutes
    python -m experiments.landmark_lm --preset gpu --out runs/landmark-lm-gpu

Two models on the built-in byte corpus (``jaxformers.training.train``, same raw batches,
seed ``--seed``): ``landmark`` (``loss="landmark_cross_entropy"``: landmark after every
``L - 1`` bytes, landmark targets masked) and the ``gpt`` baseline, same width / depth,
trained on windows of ``T = train_blocks * (L - 1)`` raw tokens.  Evaluation on validation
windows of ``f * T`` raw tokens, ``f`` in ``--factors`` (1x / 4x / 8x), the loss over the same
raw targets for both:

* baseline: full causal attention over the whole window (rotary positions past ``T`` for
  ``f > 1``);
* landmark: :func:`jaxformers.models.landmark.memory_forward`, chunks of the training
  length, ``top_k`` in ``--top-k`` retrieved blocks (per head) and ``all`` (top-k = every
  stored block: equals the full landmark forward).

Cost at each length (second call timed; compile excluded): the baseline processing the
window chunk by chunk into its KV cache (``cache=`` of the model; per-token attention over
the whole context so far) and the landmark memory (per-token attention over ``chunk +
top_k L`` keys): wall time per token, memory bytes (the baseline's cache; the landmark
memory, and with ``offload="host"`` ``device_memory_bytes``: the stored memory kept on the
device between chunks, 0, and ``device_transfer_bytes``: the peak bytes of one layer's
host-to-device transfer, landmark keys plus the retrieved keys and values gathered per query
token and head), attention keys per token (mean over the input: the baseline's causal
context; the memory's chunk-causal keys plus ``min(stored blocks, top_k) L`` retrieved ones,
none in the first chunk).
Decoding (``decode`` in ``results.json``; second call timed): seconds per new token of greedy
decoding (``--decode-steps`` steps in one jitted loop, batch 1) after a context of ``n`` raw
tokens (``--decode-lengths``, default the evaluation lengths; the landmark models' caches hold
``n`` plus its landmarks): the baseline's KV cache, the landmark model over its full KV cache
(its default decoding), and the landmark model decoding through the retrieval memory
(``mem_chunk_len`` = the chunk, ``mem_top_k`` = the largest ``--top-k``: what
``jf.generate`` / ``experiments.generate --memory-chunk`` run).  A step's cost does not depend
on the cache contents (the retrieved blocks are data-dependent, their number is not), so the
caches are not prefilled.
``OUT/results.json`` (rewritten after each model and length, ``complete`` false until the
end); ``OUT/landmark_lm.png`` (perplexity vs length per top-k; time per token vs length;
decode time per new token vs context).
``--reuse`` keeps the finished runs in ``OUT/runs`` of an earlier invocation (checked first:
same model config and training settings).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import (check_heads, check_reuse, experiment_parser, parse_experiment_args, parse_list,
                                reuse_or_train, save_progress, start_results, usage_error, write_json)

#: the PNGs this experiment draws (an earlier invocation's: moved aside by ``start_results``)
PLOTS = ("landmark_lm.png",)

PRESETS = {
    "tiny": dict(model=dict(d_model=64, n_head=4, n_layer=2), block=16, train_blocks=6,
                 train=dict(steps=300, batch_size=16, lr=3e-3, warmup_steps=30, eval_every=0,
                            eval_batches=4),
                 factors=(1, 4, 8), top_k=(1, 2, 4), eval_windows=4),
    # the paper's block (50 + landmark), GPT-small width; T = 10 blocks = 500 tokens
    "gpu": dict(model=dict(d_model=768, n_head=12, n_layer=12), block=51, train_blocks=10,
                train=dict(steps=2000, batch_size=32, lr=6e-4, warmup_steps=200, eval_every=1000,
                           eval_batches=20),
                factors=(1, 4, 8), top_k=(1, 2, 4), eval_windows=16),
}


def _parser():
    ap = experiment_parser("landmark_lm", __doc__, PRESETS, steps_help="override the training steps")
    ap.add_argument("--factors", help="comma list of length factors (default: the preset's)")
    ap.add_argument("--top-k", help="comma list of retrieved blocks (default: the preset's)")
    ap.add_argument("--eval-windows", type=int, help="validation windows per length")
    ap.add_argument("--decode-lengths", help="comma list of decode contexts in raw tokens (default: the "
                                             "evaluation lengths)")
    ap.add_argument("--decode-steps", type=int, default=16, help="decode steps timed per context (default 16)")
    ap.add_argument("--d-model", type=int, help="override the width")
    ap.add_argument("--n-layer", type=int, help="override the depth")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse finished runs in OUT/runs instead of retraining them (all checked first: "
                         "same model config and training settings)")
    return ap


def _preset(args) -> dict:
    """A copy of the preset with the overrides of the command line applied."""
    preset = json.loads(json.dumps(PRESETS[args.preset]))
    if args.steps is not None:
        preset["train"]["steps"] = args.steps
        preset["train"]["warmup_steps"] = min(preset["train"]["warmup_steps"], args.steps // 10)
    if args.eval_windows is not None:
        preset["eval_windows"] = args.eval_windows
    for key in ("d_model", "n_layer"):
        if getattr(args, key) is not None:
            preset["model"][key] = getattr(args, key)
    return preset


def _check_args(ap, args) -> None:
    """Usage errors before anything is loaded or trained; ``--factors`` / ``--top-k`` become lists."""
    args.factors = parse_list(ap, "--factors", args.factors, cast=int, lo=1, unique=True)
    args.top_k = parse_list(ap, "--top-k", args.top_k, cast=int, lo=1, unique=True)
    args.decode_lengths = parse_list(ap, "--decode-lengths", args.decode_lengths, cast=int, lo=1, unique=True)
    if args.decode_steps < 1:
        ap.error(f"--decode-steps must be >= 1, got {args.decode_steps}")
    check_heads(ap, _preset(args)["model"])


def _ce(logits, targets):
    import jax
    import jax.numpy as jnp
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]


def eval_baseline(cfg, params, windows):
    """Mean next-token loss over ``windows [n, f T]`` (full attention, one forward)."""
    import jax
    import jax.numpy as jnp
    from jaxformers import build

    model = build(cfg)
    fwd = jax.jit(lambda p, t: _ce(model.apply({"params": p}, t[:, :-1]), t[:, 1:]).mean())
    return float(np.mean([float(fwd(params, jnp.asarray(w[None]))) for w in windows]))


def eval_landmark(cfg, params, windows, *, chunk_len, top_k, max_blocks):
    """Mean loss over the same raw targets: the prediction of raw token ``p`` is read at the
    with-landmark position just before it (the landmark, after a block boundary)."""
    import jax.numpy as jnp
    from jaxformers.models.landmark import insert_landmarks, memory_forward

    L = cfg.landmark_block
    seq, _ = insert_landmarks(windows, L, cfg.landmark_token)
    p = np.arange(1, windows.shape[1])
    where = p + p // (L - 1)
    logits = memory_forward(cfg, params, seq, chunk_len=chunk_len, top_k=top_k,
                            max_blocks=max_blocks)
    return float(_ce(logits[:, where - 1], jnp.asarray(windows[:, 1:])).mean())


def memory_keys_per_token(n: int, chunk_len: int, block: int, top_k: int) -> float:
    """Mean attention keys per token of :func:`memory_forward` over a with-landmark input of
    ``n`` tokens: causal keys of its own chunk plus ``min(stored blocks, top_k) * block``
    retrieved keys (no memory yet in the first chunk)."""
    total = 0
    for start in range(0, n, chunk_len):
        cl = min(chunk_len, n - start)
        total += cl * (cl + 1) / 2 + cl * min(start // block, top_k) * block
    return total / n


def _timed(fn, repeats: int = 2):
    import jax
    jax.block_until_ready(fn())  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def cost_baseline(cfg, params, window, chunk):
    """Chunked prefill into the baseline's KV cache: (seconds, cache bytes)."""
    import jax
    import jax.numpy as jnp
    from jaxformers import build
    from jaxformers.decoding import init_cache

    model = build(cfg)
    n = len(window)
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    tok = jnp.asarray(window[None])

    def run():
        cache = init_cache(model, 1, n)
        out = None
        for s in range(0, n, chunk):
            out, cache = step(params, tok[:, s:s + chunk], cache)
        return out
    cache = init_cache(model, 1, n)
    nbytes = sum(int(x.nbytes) for x in jax.tree.leaves(cache["layers"]))
    return _timed(run), nbytes


def cost_landmark(cfg, params, window, chunk_len, top_k, max_blocks, offload=None):
    import jax.numpy as jnp
    from jaxformers.models.landmark import insert_landmarks, memory_forward

    seq, _ = insert_landmarks(window[None], cfg.landmark_block, cfg.landmark_token)
    stats = {}

    def run():
        logits, st = memory_forward(cfg, params, jnp.asarray(seq), chunk_len=chunk_len,
                                    top_k=top_k, offload=offload, max_blocks=max_blocks,
                                    return_stats=True)
        stats.update(st)
        return logits
    return _timed(run), stats


def cost_decode(cfg, params, n: int, steps: int):
    """Seconds per new token of ``steps`` greedy decoding steps (one jitted loop, batch 1) after
    ``n`` cached positions (the cache is not filled: a step's cost does not depend on it)."""
    import jax
    import jax.numpy as jnp
    from jaxformers import build
    from jaxformers.decoding import init_cache

    model = build(cfg)
    cache = init_cache(model, 1, n + steps)
    cache = {"index": jnp.asarray(n, jnp.int32), "layers": cache["layers"]}

    @jax.jit
    def run(p, c):
        def body(_, state):
            tok, c = state
            logits, c = model.apply({"params": p}, tok, cache=c)
            return jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32), c
        return jax.lax.fori_loop(0, steps, body, (jnp.zeros((1, 1), jnp.int32), c))[0]
    return _timed(lambda: run(params, cache)) / steps


def run(args, ap=None) -> dict:
    """The experiment (``args`` checked by :func:`_check_args`; ``ap``: the parser, for the usage
    error that needs the dataset)."""
    import jax
    from jaxformers import get_config
    from jaxformers.models.landmark import LandmarkConfig
    from jaxformers.training.trainer import open_dataset

    preset = _preset(args)
    # --factors / --top-k: checked lists (_check_args)
    factors = tuple(preset["factors"]) if args.factors is None else tuple(args.factors)
    top_ks = tuple(preset["top_k"]) if args.top_k is None else tuple(args.top_k)
    k_max = max(top_ks)  # the largest --top-k (the docstring's), whatever the order given
    L, nb = preset["block"], preset["train_blocks"]
    raw = nb * (L - 1)                       # raw tokens per training window (T + 1)
    chunk = nb * L                           # one training window with its landmarks
    out = Path(args.out)
    _, meta, _, val_tokens = open_dataset(args.data, "byte")
    if max(factors) * raw >= len(val_tokens):  # before training: every window must fit the split
        flag = ("--factors" if args.factors is not None
                else f"the {args.preset} preset's factors (set --factors)")
        usage_error(ap, f"{flag}: {max(factors)} x {raw} tokens do not fit in the {len(val_tokens)}-token "
                        f"validation split of {args.data!r}")
    out.mkdir(parents=True, exist_ok=True)
    start_results(out, PLOTS)  # an earlier run's results.json: not this run's until it saves its own
    vocab = LandmarkConfig.vocab_size_for_data(meta["vocab_size"], {})  # + the landmark token
    common = dict(preset["model"], vocab_size=vocab, max_seq_len=chunk)
    cfgs = {"landmark": get_config("landmark", "tiny", landmark_block=L, **common),
            "baseline": get_config("gpt", "tiny", **common)}
    train_kw = dict(preset["train"], seq_len=raw - 1)
    results = {"preset": args.preset, "seed": args.seed, "backend": jax.default_backend(),
               "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
               "data": args.data, "train": train_kw, "model": preset["model"], "block": L,
               "train_len_raw": raw, "chunk_len": chunk, "factors": factors, "top_k": top_ks,
               "models": {}, "ppl": {}, "cost": {}, "decode": {}}
    params = {}
    kws = {name: dict(train_kw, loss="landmark_cross_entropy") if name == "landmark" else train_kw
           for name in cfgs}
    # --reuse: every finished run checked (model config and training settings) before any training
    reusable = ([n for n, c in cfgs.items()
                 if check_reuse(out, [(n, c)], seed=args.seed, data=args.data, train_kw=kws[n], log_points=10)]
                if args.reuse else [])
    for name, cfg in cfgs.items():
        summary, p, _, _ = reuse_or_train(name, cfg, out, reusable, seed=args.seed, data=args.data,
                                          train_kw=kws[name], log_points=10, tag="landmark_lm")
        params[name] = p
        results["models"][name] = {k: summary.get(k) for k in
                                   ("val_loss", "val_ppl", "train_loss", "n_params",
                                    "tokens_per_s", "wall_s")}
        save_progress(out, results)
    rng = np.random.default_rng([args.seed, 3])
    max_blocks = max(factors) * nb
    for f in factors:
        n = f * raw
        starts = rng.integers(0, len(val_tokens) - n, preset["eval_windows"])
        windows = np.stack([np.asarray(val_tokens[s:s + n], np.int32) for s in starts])
        row = {"baseline_full": float(np.exp(eval_baseline(cfgs["baseline"], params["baseline"],
                                                           windows)))}
        for k in dict.fromkeys(top_ks + (max_blocks,)):  # a --top-k equal to max_blocks is 'all'
            key = "landmark_all" if k == max_blocks else f"landmark_top{k}"
            loss = eval_landmark(cfgs["landmark"], params["landmark"], windows, chunk_len=chunk,
                                 top_k=k, max_blocks=max_blocks)
            row[key] = float(np.exp(loss))
        results["ppl"][str(f)] = row
        cost = {}
        sec, nbytes = cost_baseline(cfgs["baseline"], params["baseline"], windows[0], raw)
        cost["baseline_kv_cache"] = {"s_per_token": sec / n, "memory_bytes": nbytes,
                                     "keys_per_token": (n + 1) / 2}
        # the memory this input fills (f * nb blocks), not the largest factor's: a larger capacity
        # counted its unused slots in memory_bytes / device_transfer_bytes and scored them in the time
        for k in top_ks:
            sec, st = cost_landmark(cfgs["landmark"], params["landmark"], windows[0], chunk, k,
                                    f * nb)
            cost[f"landmark_top{k}"] = {"s_per_token": sec / n, "memory_bytes": st["memory_bytes"],
                                        "keys_per_token": memory_keys_per_token(f * chunk, chunk, L, k)}
        sec, st = cost_landmark(cfgs["landmark"], params["landmark"], windows[0], chunk,
                                k_max, f * nb, offload="host")
        cost[f"landmark_top{k_max}_host"] = {
            "s_per_token": sec / n, "memory_bytes": st["memory_bytes"],
            "device_memory_bytes": st["device_memory_bytes"],
            "device_transfer_bytes": st["device_transfer_bytes"],
            "keys_per_token": memory_keys_per_token(f * chunk, chunk, L, k_max)}
        results["cost"][str(f)] = cost
        print(f"[landmark_lm] {f}x ({n} tokens): " + " ".join(f"{k} {v:.3f}" for k, v in row.items()),
              file=sys.stderr, flush=True)
        save_progress(out, results)
    k = k_max
    memory_cfg = cfgs["landmark"].replace(mem_chunk_len=chunk, mem_top_k=k)
    for n in args.decode_lengths or [f * raw for f in factors]:
        n_lm = n + n // (L - 1)                                           # with its landmarks
        row = {"baseline_kv_cache": cost_decode(cfgs["baseline"], params["baseline"], n, args.decode_steps),
               "landmark_kv_cache": cost_decode(cfgs["landmark"], params["landmark"], n_lm, args.decode_steps),
               f"landmark_memory_top{k}": cost_decode(memory_cfg, params["landmark"], n_lm, args.decode_steps)}
        results["decode"][str(n)] = row
        print(f"[landmark_lm] decode after {n} tokens, ms per token: "
              + " ".join(f"{name} {sec * 1e3:.3f}" for name, sec in row.items()), file=sys.stderr, flush=True)
        save_progress(out, results)
    results["complete"] = True
    write_json(out / "results.json", results)
    plot(results, out / "landmark_lm.png")
    return results


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs = sorted(int(f) for f in results["ppl"])
    raw = results["train_len_raw"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    keys = list(results["ppl"][str(fs[0])])
    for key in keys:
        axes[0].plot([f * raw for f in fs], [results["ppl"][str(f)][key] for f in fs],
                     "o-" if key.startswith("baseline") else "s--", label=key)
    axes[0].set_ylabel("validation perplexity")
    axes[0].set_yscale("log")
    for key in results["cost"][str(fs[0])]:
        axes[1].plot([f * raw for f in fs],
                     [results["cost"][str(f)][key]["s_per_token"] * 1e3 for f in fs], "o-", label=key)
    axes[1].set_ylabel(f"ms / token ({results['device_kind']})")
    ns = sorted(int(n) for n in results["decode"])
    for key in (results["decode"][str(ns[0])] if ns else ()):
        axes[2].plot(ns, [results["decode"][str(n)][key] * 1e3 for n in ns], "o-", label=key)
    axes[2].set_ylabel(f"ms / new token ({results['device_kind']})")
    axes[2].set_title("decoding: KV cache vs retrieval memory", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input length / context (raw tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title(f"perplexity vs length ({results['preset']}, seed {results['seed']})", fontsize=9)
    axes[1].set_title("reading the input: time per token, KV cache vs retrieval memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = _parser()
    args = parse_experiment_args(ap, argv, check=_check_args)
    t0 = time.perf_counter()
    results = run(args, ap)
    print(json.dumps(results["ppl"], indent=1))
    print(f"total {time.perf_counter() - t0:.0f}s -> {args.out}/results.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
