"""Passkey retrieval with landmark attention vs a same-size baseline, far beyond the training length.

    python -m experiments.landmark_passkey --preset tiny --out runs/landmark-passkey-tiny  # a few CPU minutes
    python -m experiments.landmark_passkey --preset gpu --out runs/landmark-passkey-gpu

Task (synthetic, as the paper's passkey test): a repeated filler pattern, somewhere in it the
passkey ``K d1 .. dn`` (marker token, ``n`` random digits), and at the end the question
``Q`` followed by the digits; the loss / score is on the answer digits only (``loss_mask``).
A 20-token vocabulary rather than :func:`jaxformers.data.synthetic.passkey`'s byte-level
English needle: a tiny CPU model does not learn the byte-level task in a few hundred steps.
Both models (``landmark`` and the ``gpt`` baseline, same width / depth / rotary, seed
``--seed``) are trained on windows of ``T`` raw tokens (``T = train_blocks * (L - 1)``;
with landmarks inserted exactly ``train_blocks`` blocks = one memory chunk), then evaluated
on fresh samples ``f * T`` tokens long for ``f`` in ``--factors`` (1x .. 16x): the baseline
with full attention over the whole input (rotary positions past the training length), the
landmark model chunk by chunk with its retrieval memory
(:func:`jaxformers.models.landmark.memory_forward`, ``chunk_len`` = the training length,
top-k in ``--top-k``, per-head selection).  Accuracy = all answer digits right (argmax at
each answer position given the correct earlier digits, i.e. greedy decoding's exact match).
``OUT/results.json``: accuracies per (model, top-k, factor), training losses, settings
(rewritten after each model and length, ``complete`` false until the end);
``OUT/passkey.png``: accuracy vs input length.  Trained parameters go to
``OUT/models/<name>.msgpack`` (+ ``.json``: settings, seed, config, loss curve); ``--reuse``
loads them instead of training again when the settings, seed and config are the same
(``SystemExit`` naming the model when they differ).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import (check_heads, experiment_parser, parse_experiment_args, parse_list,
                                save_progress, start_results, write_json)

#: the PNGs this experiment draws (an earlier invocation's: moved aside by ``start_results``)
PLOTS = ("passkey.png",)

PRESETS = {
    "tiny": dict(model=dict(d_model=64, n_head=4, n_layer=2), block=16, train_blocks=6,
                 digits=2, steps=800, batch=32, lr=3e-3, warmup=50, eval_samples=24,
                 factors=(1, 2, 4, 8, 16), top_k=(1, 2, 4)),
    # the paper's block (50 tokens + landmark) and a wider model; T = 10 blocks = 500 tokens
    "gpu": dict(model=dict(d_model=256, n_head=8, n_layer=4), block=51, train_blocks=10,
                digits=5, steps=4000, batch=32, lr=1e-3, warmup=200, eval_samples=100,
                factors=(1, 2, 4, 8, 16), top_k=(1, 2, 4)),
}
DIGIT0, KEY, QUERY, FILLER0, N_FILLER = 0, 10, 11, 12, 8   # token ids (landmark: vocab - 1)
VOCAB = FILLER0 + N_FILLER + 1


def passkey_batch(rng, batch: int, length: int, digits: int):
    """``(tokens [B, length], loss_mask [B, length], answer positions [digits])``: filler
    pattern, ``KEY d1..dn`` at a random place, ``QUERY d1..dn`` at the end."""
    tokens = np.empty((batch, length), np.int32)
    phase = rng.integers(0, N_FILLER, batch)
    t = np.arange(length)
    tokens[:] = FILLER0 + (t[None, :] + phase[:, None]) % N_FILLER
    keys = rng.integers(0, 10, (batch, digits)).astype(np.int32) + DIGIT0
    tail = 1 + digits
    pos = rng.integers(0, length - tail - (1 + digits), batch)
    for r in range(batch):
        tokens[r, pos[r]] = KEY
        tokens[r, pos[r] + 1:pos[r] + 1 + digits] = keys[r]
    tokens[:, length - tail] = QUERY
    tokens[:, length - digits:] = keys
    mask = np.zeros((batch, length), np.float32)
    mask[:, length - digits:] = 1.0
    return tokens, mask, np.arange(length - digits, length)


def _parser():
    ap = experiment_parser("landmark_passkey", __doc__, PRESETS, steps_help="override the training steps",
                           data=False)
    ap.add_argument("--factors", help="comma list of length factors (default: the preset's)")
    ap.add_argument("--top-k", help="comma list of retrieved blocks (default: the preset's)")
    ap.add_argument("--eval-samples", type=int, help="override the samples per length")
    ap.add_argument("--digits", type=int, help="override the passkey digits")
    ap.add_argument("--d-model", type=int, help="override the width")
    ap.add_argument("--n-layer", type=int, help="override the depth")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the models trained into OUT/models by an earlier invocation with the same "
                         "settings instead of retraining them")
    return ap


def _preset(args) -> dict:
    """A copy of the preset with the overrides of the command line applied."""
    preset = dict(PRESETS[args.preset])
    if args.steps is not None:
        preset["steps"] = args.steps
        preset["warmup"] = min(preset["warmup"], args.steps // 10)  # < steps (optax's cosine needs one)
    for key in ("eval_samples", "digits"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    for key in ("d_model", "n_layer"):
        if getattr(args, key) is not None:
            preset["model"] = dict(preset["model"], **{key: getattr(args, key)})
    return preset


def _check_args(ap, args) -> None:
    """Usage errors before anything is trained; ``--factors`` / ``--top-k`` become lists."""
    preset = _preset(args)
    args.factors = parse_list(ap, "--factors", args.factors, cast=int, lo=1, unique=True)
    args.top_k = parse_list(ap, "--top-k", args.top_k, cast=int, lo=1, unique=True)
    raw = preset["train_blocks"] * (preset["block"] - 1)
    if 2 * (preset["digits"] + 1) >= raw:  # KEY d1..dn somewhere before QUERY d1..dn
        ap.error(f"--digits {preset['digits']}: two copies of the passkey (2 x (1 + digits) tokens) "
                 f"must fit in the {raw}-token training window: at most {(raw - 1) // 2 - 1} digits")
    check_heads(ap, preset["model"])


def make_configs(preset):
    from jaxformers import get_config
    from jaxformers.models.landmark import landmark_seq_len

    L, nb = preset["block"], preset["train_blocks"]
    raw = nb * (L - 1)
    common = dict(preset["model"], vocab_size=VOCAB, max_seq_len=max(raw, nb * L))
    lm = get_config("landmark", "tiny", landmark_block=L, **common)
    base = get_config("gpt", "tiny", **common)
    assert landmark_seq_len(raw - 1, L) == nb * L - 1
    return lm, base, raw


def train_model(cfg, preset, raw_len: int, seed: int, landmark: bool):
    """AdamW + warmup/cosine on fresh passkey batches; returns (params, loss curve).  Weight
    decay applies to every parameter here (norm scales included), unlike the trainer's rule
    (:func:`jaxformers.training.optim.decay_mask`); the recorded results were trained so."""
    import jax
    import jax.numpy as jnp
    import optax
    from jaxformers import build, init_params
    from jaxformers.models.landmark import landmark_cross_entropy
    from jaxformers.training.losses import cross_entropy

    model = build(cfg)
    params = jax.jit(lambda r: init_params(model, r))(jax.random.PRNGKey(seed))
    sched = optax.warmup_cosine_decay_schedule(0.0, preset["lr"], preset["warmup"], preset["steps"],
                                               preset["lr"] * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.1))
    loss_fn = landmark_cross_entropy if landmark else cross_entropy

    @jax.jit
    def step(p, s, tokens, mask):
        (loss, _), g = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
            model, p, {"tokens": tokens, "loss_mask": mask})
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    rng = np.random.default_rng([seed, 1])
    state, curve = tx.init(params), []
    for i in range(preset["steps"]):
        tokens, mask, _ = passkey_batch(rng, preset["batch"], raw_len, preset["digits"])
        params, state, loss = step(params, state, jnp.asarray(tokens), jnp.asarray(mask))
        if i % max(1, preset["steps"] // 20) == 0 or i == preset["steps"] - 1:
            curve.append((i, float(loss)))
    return params, curve


_TRAIN_KEYS = ("model", "block", "train_blocks", "digits", "steps", "batch", "lr", "warmup")


def _model_record(cfg, preset, seed: int) -> dict:
    """What a trained model depends on (compared by ``--reuse``), JSON-normalised."""
    return json.loads(json.dumps({"seed": seed, "settings": {k: preset[k] for k in _TRAIN_KEYS},
                                  "config": cfg.to_dict()}))


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested dict as ``{"a.b": value}``."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def save_model(out: Path, name: str, params, record: dict) -> None:
    """``out/models/name.msgpack`` (parameters) then ``name.json`` (``record``), each atomically;
    the ``.json`` is written last: it marks a finished model."""
    from flax import serialization

    from experiments.common import write_json
    from jaxformers.training.checkpoint import atomic_write, fsync_dir

    folder = out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").unlink(missing_ok=True)  # an older model's record: not this one's
    fsync_dir(folder)  # the old record's removal reaches the disk before the new parameters
    atomic_write(folder / f"{name}.msgpack", serialization.to_bytes(params))
    write_json(folder / f"{name}.json", record)


def load_model(out: Path, name: str, cfg, record: dict, seed: int):
    """``(params, saved record)`` of a model saved by :func:`save_model` with the same record
    (settings, seed, config), ``None`` when none was saved; ``SystemExit`` naming the model and
    the differing fields when one was saved with others."""
    import jax
    from flax import serialization
    from jaxformers import build, init_params
    from jaxformers.training.rundir import config_diff

    meta = out / "models" / f"{name}.json"
    if not meta.is_file() or not (out / "models" / f"{name}.msgpack").is_file():
        return None
    saved = json.loads(meta.read_text())
    sections = ("seed", "settings", "config")
    diff = config_diff(_flat({k: saved.get(k) for k in sections}), _flat({k: record[k] for k in sections}))
    if diff:
        raise SystemExit(f"--reuse: cannot reuse {meta.with_suffix('.msgpack')}: it was trained with other "
                         f"settings: {'; '.join(diff)}\n(rerun without --reuse to retrain, or use another --out)")
    template = jax.eval_shape(lambda r: init_params(build(cfg), r), jax.random.PRNGKey(seed))
    params = serialization.from_bytes(template, (out / "models" / f"{name}.msgpack").read_bytes())
    return params, saved


def eval_baseline(cfg, params, tokens, answer, batch: int = 4):
    import jax
    import jax.numpy as jnp
    from jaxformers import build

    model = build(cfg)
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t)[:, answer - 1].argmax(-1))
    preds = np.concatenate([np.asarray(fwd(params, jnp.asarray(tokens[i:i + batch])))
                            for i in range(0, len(tokens), batch)])
    return float(np.mean(np.all(preds == tokens[:, answer], axis=1)))


def eval_landmark(cfg, params, tokens, answer, *, chunk_len, top_k, max_blocks, batch: int = 8):
    from jaxformers.models.landmark import insert_landmarks, memory_forward

    L = cfg.landmark_block
    seq, _ = insert_landmarks(tokens, L, cfg.landmark_token)
    where = answer + answer // (L - 1)          # the answer digits' with-landmark positions
    preds = []
    for i in range(0, len(seq), batch):
        logits = memory_forward(cfg, params, seq[i:i + batch], chunk_len=chunk_len, top_k=top_k,
                                selection="per_head", max_blocks=max_blocks)
        preds.append(np.asarray(logits[:, where - 1].argmax(-1)))
    preds = np.concatenate(preds)
    return float(np.mean(np.all(preds == tokens[:, answer], axis=1)))


def run(args) -> dict:
    import jax

    preset = _preset(args)
    # --factors / --top-k: checked lists (_check_args)
    factors = preset["factors"] if args.factors is None else tuple(args.factors)
    top_ks = preset["top_k"] if args.top_k is None else tuple(args.top_k)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_results(out, PLOTS)  # an earlier run's results.json: not this run's until it saves its own
    lm_cfg, base_cfg, raw = make_configs(preset)
    L, nb = preset["block"], preset["train_blocks"]
    results = {"preset": args.preset, "seed": args.seed, "backend": jax.default_backend(),
               "jax_version": jax.__version__, "settings": {**preset, "factors": factors,
                                                            "top_k": top_ks},
               "train_len_raw": raw, "train_len_with_landmarks": nb * L, "chunk_len": nb * L,
               "models": {}}
    trained = {}
    models = (("landmark", lm_cfg, True), ("baseline", base_cfg, False))
    records = {name: _model_record(cfg, preset, args.seed) for name, cfg, _ in models}
    # --reuse: every saved model checked before any training
    reused = ({name: load_model(out, name, cfg, records[name], args.seed) for name, cfg, _ in models}
              if getattr(args, "reuse", False) else {})
    for name, cfg, is_lm in models:
        if reused.get(name) is not None:
            params, saved = reused[name]
            curve, train_s = [tuple(c) for c in saved["train_curve"]], saved["train_s"]
            print(f"[passkey] reusing {out / 'models' / name}.msgpack", file=sys.stderr, flush=True)
        else:
            t0 = time.perf_counter()
            print(f"[passkey] training {name}", file=sys.stderr, flush=True)
            params, curve = train_model(cfg, preset, raw, args.seed, is_lm)
            train_s = round(time.perf_counter() - t0, 1)
            save_model(out, name, params, {**records[name], "train_curve": curve, "train_s": train_s})
        trained[name] = params
        results["models"][name] = {"model": cfg.model, "train_curve": curve,
                                   "final_train_loss": curve[-1][1],
                                   "train_s": train_s, "accuracy": {}}
        save_progress(out, results)
    rng = np.random.default_rng([args.seed, 2])
    max_blocks = max(factors) * nb
    for f in factors:
        tokens, _, answer = passkey_batch(rng, preset["eval_samples"], f * raw, preset["digits"])
        acc = eval_baseline(base_cfg, trained["baseline"], tokens, answer)
        results["models"]["baseline"]["accuracy"][str(f)] = acc
        for k in top_ks:
            a = eval_landmark(lm_cfg, trained["landmark"], tokens, answer, chunk_len=nb * L,
                              top_k=k, max_blocks=max_blocks)
            results["models"]["landmark"]["accuracy"].setdefault(f"top{k}", {})[str(f)] = a
        print(f"[passkey] {f}x ({f * raw} tokens): baseline {acc:.2f} landmark "
              + " ".join(f"top{k} {results['models']['landmark']['accuracy'][f'top{k}'][str(f)]:.2f}"
                         for k in top_ks), file=sys.stderr, flush=True)
        save_progress(out, results)
    results["complete"] = True
    write_json(out / "results.json", results)
    plot(results, out / "passkey.png")
    return results


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = results["train_len_raw"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    base = results["models"]["baseline"]["accuracy"]
    xs = sorted(int(f) for f in base)
    ax.plot([f * raw for f in xs], [base[str(f)] for f in xs], "o-", color="k",
            label="baseline (full attention)")
    # top-k in numeric order ("top2" before "top16")
    for k, accs in sorted(results["models"]["landmark"]["accuracy"].items(), key=lambda kv: int(kv[0][3:])):
        ax.plot([f * raw for f in xs], [accs[str(f)] for f in xs], "s--",
                label=f"landmark, memory {k}")
    ax.axvline(raw, color="gray", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input length (tokens; dotted: training length)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"passkey retrieval ({results['preset']}, seed {results['seed']})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_experiment_args(_parser(), argv, check=_check_args)
    t0 = time.perf_counter()
    results = run(args)
    print(json.dumps({n: r["accuracy"] for n, r in results["models"].items()}, indent=1))
    print(f"total {time.perf_counter() - t0:.0f}s -> {args.out}/results.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
