"""DoGE domain reweighting: learn domain weights with a proxy model, then train base models on
uniform, DoGE and token-proportional mixtures; and the out-of-domain mode.

    python -m experiments.doge --preset tiny --out runs/doge-tiny   # a few minutes, 2 CPU cores
    python -m experiments.doge --preset gpu  --out runs/doge-gpu

Domains (built in, :mod:`jaxformers.data.domains`): Shakespeare's ``comedies``,
``histories``, ``tragedies`` and ``poems`` and the Python standard library (``python``),
byte tokens, each capped at the preset's ``max_bytes``.

1. **Proxy run** (``runs/proxy``): a small model trained with
   :class:`jaxformers.training.DogeStep` (universal generalization: every domain is a
   target) on one equal micro-batch per domain -> the averaged weights, and a plot of the
   weights over the steps (``weights.png``).
2. **Base runs** (``runs/base_<mixture>``), a larger model, equal steps and seed, on the
   ``uniform``, ``doge`` and ``proportional`` (token-count) mixtures -> per-domain and
   average validation perplexity (``ppl.png``).
3. **Out-of-domain** (``--ood-target``, default ``poems``): a proxy run whose target is the
   held-out domain (weight 0, only its gradient is used), then base runs on the other
   domains with uniform vs the DoGE-OOD weights, evaluated on the held-out domain.  Both
   proxies use the same ``mu`` (``--mu``, the preset's 0.01: the authors' universal setting;
   their out-of-domain configs use 0.05).

A signal (a GPU stage's time limit, Ctrl-C) stops the experiment after a checkpoint of the
run in progress (it never reports a partly trained model).  ``--reuse`` keeps the finished
runs in ``OUT/runs`` of an earlier invocation (e.g. one cut short by a time limit) instead of
retraining them, and continues a run stopped by a signal from its checkpoint: only when its
model config, training settings (steps, batch, seed, data spec with its mixture weights, ...)
and, for a proxy, its DoGE settings (``doge.json``) equal this invocation's.  A finished run
with other settings is an error (checked before training for every run whose settings are
known then, including the base run on a finished reusable proxy's DoGE weights); a base run on
DoGE weights is reused only together with its proxy (after a retrained or continued proxy, the
DoGE-weighted base runs are retrained).

``OUT/results.json``: every weight vector, every run's per-domain validation loss and
perplexity, averages (``avg_ppl``: the mean of the training domains' perplexities, the
paper's "average perplexity"), the seed and the settings.  ``--steps`` / ``--proxy-steps`` /
``--eval-batches`` / ``--max-bytes`` / ``--no-ood`` shrink a run (tests).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from experiments.common import (check_reuse, experiment_parser, parse_experiment_args, reuse_or_train,
                                save_progress, start_results, write_results)

#: the PNGs this experiment draws (an earlier invocation's: moved aside by ``start_results``)
PLOTS = ("weights.png", "ppl.png")

DOMAINS = ("comedies", "histories", "tragedies", "poems", "python")
OOD_TARGET = "poems"  # default held-out domain of the out-of-domain mode

PRESETS = {
    "tiny": dict(max_bytes=4_000_000,
                 proxy_model=dict(d_model=64, n_layer=2, n_head=4, max_seq_len=64),
                 base_model=dict(d_model=128, n_layer=2, n_head=4, max_seq_len=64),
                 proxy=dict(steps=150, batch_size=20, seq_len=64, lr=3e-3, warmup_steps=15),
                 base=dict(steps=300, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=30),
                 eval_batches=20, mu=0.01),
    # paper: 82M proxy / 124M-684M base at T=512 on SlimPajama; here sized so that the two
    # proxies and five base runs fit one 10-minute GPU stage (scripts/gpu_session.sh doge)
    "gpu": dict(max_bytes=0,
                proxy_model=dict(d_model=256, n_layer=4, n_head=4, max_seq_len=256),
                base_model=dict(d_model=512, n_layer=8, n_head=8, max_seq_len=256),
                proxy=dict(steps=1000, batch_size=40, seq_len=256, lr=1e-3, warmup_steps=50),
                base=dict(steps=2000, batch_size=32, seq_len=256, lr=1e-3, warmup_steps=100),
                eval_batches=50, mu=0.01),
}


def _parser():
    ap = experiment_parser("doge", __doc__, PRESETS, steps_help="override the base runs' steps", data=False)
    ap.add_argument("--proxy-steps", type=int, help="override the proxy runs' steps")
    ap.add_argument("--eval-batches", type=int, help="override the validation batches per domain")
    ap.add_argument("--max-bytes", type=int, help="override the per-domain text cap (0: none)")
    ap.add_argument("--mu", type=float, help="DoGE step-size inverse (default: the preset's)")
    ap.add_argument("--ood-target", choices=DOMAINS,
                    help=f"held-out target domain of the out-of-domain mode (default: {OOD_TARGET})")
    ap.add_argument("--no-ood", action="store_true", help="skip the out-of-domain mode")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the finished runs in OUT/runs trained with the same settings instead of "
                         "retraining them (a finished run with other settings is an error)")
    return ap


def _check_args(ap, args) -> None:
    """Usage errors before any corpus is loaded or anything trained."""
    import math

    if args.no_ood and args.ood_target is not None:
        ap.error("--ood-target sets the out-of-domain mode's target, which --no-ood skips (drop one of them)")
    if args.mu is not None and not (math.isfinite(args.mu) and args.mu > 0):
        ap.error(f"--mu must be a finite number > 0, got {args.mu}")


def _reusable(name, model_kw, train_kw, data, out, seed, eval_batches, step_fn=None) -> list:
    """``[name]`` when ``OUT/runs/name`` can be reused (:func:`experiments.common.check_reuse`:
    finished, or stopped by a signal, with the same model config, training settings and, for a
    proxy, DoGE settings), else ``[]``; ``SystemExit`` naming the differences when a finished
    run was trained with others."""
    return check_reuse(out, [(name, _model_config(model_kw))], seed=seed, data=data,
                       train_kw=_train_kw(train_kw, eval_batches), log_points=30, step_fn=step_fn)


def _model_config(model_kw):
    import jaxformers as jf
    return jf.get_config("gpt", "tiny", vocab_size=257, **model_kw)


def _train_kw(train_kw, eval_batches) -> dict:
    return dict(train_kw, eval_every=0, eval_batches=eval_batches)


def _train(name, model_kw, train_kw, data, out, seed, eval_batches, step_fn=None, cache=None, reuse=False):
    """``(summary, run_dir, reused)``: run ``name`` trained from scratch, or with ``reuse`` the
    finished run of an earlier invocation with the same settings (:func:`_reusable`, then
    ``reused``), or that run continued from its checkpoint when a signal stopped it.
    ``SystemExit`` when a signal stops this run: the experiment never reports a partly
    trained model (rerun with ``--reuse`` to continue it)."""
    run_dir = Path(out) / "runs" / name
    reusable = _reusable(name, model_kw, train_kw, data, out, seed, eval_batches, step_fn) if reuse else []
    reused = bool(reusable) and _finished(out, name)
    summary, _, _, _ = reuse_or_train(name, _model_config(model_kw), out, reusable, seed=seed, data=data,
                                      train_kw=_train_kw(train_kw, eval_batches), log_points=30, tag="doge",
                                      cache=cache, step_fn=step_fn)
    return summary, run_dir, reused


def _finished(out, name) -> bool:
    """Whether ``OUT/runs/name`` (a run :func:`_reusable` accepted) finished, rather than being
    stopped by a signal (then continued from its checkpoint)."""
    return bool(json.loads((Path(out) / "runs" / name / "summary.json").read_text()).get("finished", True))


def _domain_table(summary, names):
    losses = {n: summary.get(f"val_loss/{n}") for n in names}
    return {n: {"val_loss": v, "val_ppl": None if v is None else math.exp(v)} for n, v in losses.items()}


def _averages(table, names):
    ppl = [table[n]["val_ppl"] for n in names if table[n]["val_ppl"] is not None]
    loss = [table[n]["val_loss"] for n in names if table[n]["val_loss"] is not None]
    return {"avg_ppl": sum(ppl) / len(ppl) if ppl else None, "avg_loss": sum(loss) / len(loss) if loss else None}


def run(args) -> dict:
    import numpy as np

    from jaxformers.data.domains import DomainSource, domain_spec
    from jaxformers.training import CompileCache, DogeStep
    from jaxformers.training.doge import doge_weight_history, doge_weights

    preset = PRESETS[args.preset]
    max_bytes = preset["max_bytes"] if args.max_bytes is None else args.max_bytes
    proxy_kw = dict(preset["proxy"])
    base_kw = dict(preset["base"])
    if args.proxy_steps is not None:
        proxy_kw.update(steps=args.proxy_steps, warmup_steps=min(proxy_kw["warmup_steps"], args.proxy_steps // 10))
    if args.steps is not None:
        base_kw.update(steps=args.steps, warmup_steps=min(base_kw["warmup_steps"], args.steps // 10))
    eval_batches = preset["eval_batches"] if args.eval_batches is None else args.eval_batches
    mu = preset["mu"] if args.mu is None else args.mu
    k = len(DOMAINS)
    # evaluation: eval_batches per domain (the trainer gives each domain max_batches // K)
    ev = eval_batches * k
    cache = CompileCache(max_entries=2)
    results = {"preset": args.preset, "seed": args.seed, "domains": list(DOMAINS), "max_bytes": max_bytes,
               "mu": mu, "proxy": proxy_kw, "base": base_kw, "proxy_model": preset["proxy_model"],
               "base_model": preset["base_model"], "eval_batches_per_domain": eval_batches}

    source = DomainSource(domain_spec(DOMAINS, max_bytes=max_bytes))
    # every domain needs one validation window, else no run reports a loss for it (checked before training)
    need = max(proxy_kw["seq_len"], base_kw["seq_len"]) + 1
    short = {d.name: int(d.val_tokens.size) for d in source.domains if d.val_tokens.size < need}
    if short:
        raise SystemExit(f"error: --max-bytes={max_bytes} leaves too little validation text: {short} tokens, "
                         f"need >= seq_len + 1 = {need} per domain (5% of each document is validation); "
                         "raise --max-bytes")
    results["train_tokens"] = source.describe()["train_tokens"]
    proportional = source.token_fractions()
    step = DogeStep(domains=DOMAINS, mu=mu)
    target = OOD_TARGET if args.ood_target is None else args.ood_target
    ood = DogeStep(domains=DOMAINS, targets=(target,), mu=mu)
    ood_uniform = [0.0 if d == target else 1.0 for d in DOMAINS]
    if args.reuse:  # every run whose settings are known now: checked before anything trains
        known = [("proxy", preset["proxy_model"], proxy_kw, step.data_spec(max_bytes=max_bytes), step)]
        known += [(f"base_{m}", preset["base_model"], base_kw, domain_spec(DOMAINS, weights=w, max_bytes=max_bytes),
                   None) for m, w in (("uniform", [1.0] * k), ("proportional", proportional.tolist()))]
        if not args.no_ood:
            known += [("proxy_ood", preset["proxy_model"], proxy_kw, ood.data_spec(max_bytes=max_bytes), ood),
                      ("ood_uniform", preset["base_model"], base_kw,
                       domain_spec(DOMAINS, weights=ood_uniform, max_bytes=max_bytes), None)]
        finished = {name: bool(_reusable(name, model_kw, train_kw, data, args.out, args.seed, ev, fn))
                    and _finished(args.out, name) for name, model_kw, train_kw, data, fn in known}
        # a finished reusable proxy is reused as it is: its weights, so the data of the base run
        # trained on them, are known now too
        for proxy, base in (("proxy", "base_doge"), ("proxy_ood", "ood_doge_ood")):
            if finished.get(proxy):
                w = doge_weights(Path(args.out) / "runs" / proxy)
                _reusable(base, preset["base_model"], base_kw,
                          domain_spec(DOMAINS, weights=[w[d] for d in DOMAINS], max_bytes=max_bytes),
                          args.out, args.seed, ev)

    # 1. proxy run: universal generalization
    # a base run on DoGE weights is reused only with its reused proxy (a retrained proxy's weights may differ)
    _, _, proxy_reused = _train("proxy", preset["proxy_model"], proxy_kw, step.data_spec(max_bytes=max_bytes),
                                args.out, args.seed, ev, step_fn=step, reuse=args.reuse)
    weights = doge_weights(Path(args.out) / "runs" / "proxy")
    hist_steps, history = doge_weight_history(Path(args.out) / "runs" / "proxy")
    results["doge_weights"] = weights
    results["weight_history"] = {"steps": hist_steps, "weights": history}
    save_progress(args.out, results)

    # 2. base runs on three mixtures
    mixtures = {"uniform": [1.0] * k, "doge": [weights[d] for d in DOMAINS],
                "proportional": proportional.tolist()}
    results["mixtures"] = {m: dict(zip(DOMAINS, map(float, np.asarray(w) / np.sum(w)))) for m, w in mixtures.items()}
    results["base_runs"] = {}
    for name, w in mixtures.items():
        summary, _, _ = _train(f"base_{name}", preset["base_model"], base_kw,
                               domain_spec(DOMAINS, weights=w, max_bytes=max_bytes), args.out, args.seed, ev,
                               cache=cache, reuse=args.reuse and (name != "doge" or proxy_reused))
        table = _domain_table(summary, DOMAINS)
        results["base_runs"][name] = {"domains": table, **_averages(table, DOMAINS),
                                      "train_loss": summary["train_loss"]}
        save_progress(args.out, results)

    # 3. out-of-domain: the held-out target's gradient steers the weights of the others
    if not args.no_ood:
        train_domains = [d for d in DOMAINS if d != target]
        _, _, ood_reused = _train("proxy_ood", preset["proxy_model"], proxy_kw, ood.data_spec(max_bytes=max_bytes),
                                  args.out, args.seed, ev, step_fn=ood, reuse=args.reuse)
        ood_weights = doge_weights(Path(args.out) / "runs" / "proxy_ood")
        ood_steps, ood_history = doge_weight_history(Path(args.out) / "runs" / "proxy_ood")
        runs = {}
        results["ood"] = {"target": target, "doge_weights": ood_weights, "runs": runs,
                          "weight_history": {"steps": ood_steps, "weights": ood_history}}
        save_progress(args.out, results)  # the OOD weights, then each base run as it finishes
        for name, w in {"uniform": ood_uniform, "doge_ood": [ood_weights[d] for d in DOMAINS]}.items():
            summary, _, _ = _train(f"ood_{name}", preset["base_model"], base_kw,
                                   domain_spec(DOMAINS, weights=w, max_bytes=max_bytes), args.out, args.seed, ev,
                                   cache=cache, reuse=args.reuse and (name != "doge_ood" or ood_reused))
            table = _domain_table(summary, DOMAINS)
            runs[name] = {"weights": dict(zip(DOMAINS, map(float, np.asarray(w) / np.sum(w)))),
                          "target_val_loss": table[target]["val_loss"], "target_val_ppl": table[target]["val_ppl"],
                          "domains": table, **_averages(table, train_domains)}
            save_progress(args.out, results)
    return results


def plot(results: dict, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    panels = [("universal", results["weight_history"])]
    if "ood" in results:
        panels.append((f"out-of-domain (target: {results['ood']['target']})", results["ood"]["weight_history"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, hist) in zip(axes[0], panels):
        for name, values in hist["weights"].items():
            ax.plot(hist["steps"], values, label=name)
        ax.set_xlabel("proxy step")
        ax.set_ylabel("domain weight")
        ax.set_title(f"DoGE weights, {title}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "weights.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    names = results["domains"]
    runs = results["base_runs"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(runs)
    x = np.arange(len(names) + 1)
    for i, (mix, r) in enumerate(runs.items()):
        vals = [r["domains"][n]["val_ppl"] or 0 for n in names] + [r["avg_ppl"] or 0]
        ax.bar(x + i * width, vals, width, label=mix)
    ax.set_xticks(x + width * (len(runs) - 1) / 2)
    ax.set_xticklabels(list(names) + ["average"], fontsize=8)
    ax.set_ylabel("validation perplexity (bytes)")
    ax.set_title(f"base model, {results['base']['steps']} steps, seed {results['seed']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "ppl.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return [str(p) for p in paths]


def main(argv=None) -> dict:
    args = parse_experiment_args(_parser(), argv, check=_check_args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_results(out, PLOTS)  # an earlier run's results.json: not this run's until it saves its own
    results = run(args)
    results["plots"] = plot(results, out)
    write_results(out, **results, complete=True)
    def r3(v):
        return None if v is None else round(v, 3)

    summary = {m: r3(r["avg_ppl"]) for m, r in results["base_runs"].items()}
    print(json.dumps({"doge_weights": {k: r3(v) for k, v in results["doge_weights"].items()},
                      "avg_ppl": summary,
                      **({"ood_target_ppl": {m: r3(r["target_val_ppl"])
                                             for m, r in results["ood"]["runs"].items()}}
                         if "ood" in results else {})}, indent=1))
    return results


if __name__ == "__main__":
    main()
