"""Train a registered model on a text corpus; prints the run summary as JSON.

    python -m experiments.train                          # gpt tiny, Shakespeare bytes: minutes on a CPU
    python -m experiments.train --model llama --preset tiny --steps 1000 --out runs/llama
    python -m experiments.train --model gpt --set n_layer=4 --set d_model=256 --mesh data=2,fsdp=2,tensor=2
    python -m experiments.train --out runs/llama --resume       # continue (configs come from the run dir)
    python -m experiments.train --data synthetic:copying --seq-len 64 --steps 200 --out runs/copy
    python -m experiments.train --mesh data=2,expert=2,tensor=2 --loss cross_entropy \
        --train-set aux_loss_weights=load_balance=0.01

``--set field=value`` overrides model-config fields, ``--train-set field=value``
train-config fields (see ``jaxformers.training.TrainConfig``).  The model's
``vocab_size`` comes from the dataset (override with ``--set vocab_size=N``,
N >= the dataset's); ``max_seq_len`` is raised to ``--seq-len`` if needed.
``--data synthetic:TASK[:k=v,...]`` trains on a synthetic task with its answer
mask (see ``jaxformers.data.sources``); ``--loss`` picks a registered loss.
Compiled programs are cached in ``<jaxformers cache>/xla`` (``$JAX_COMPILATION_CACHE_DIR``
wins; ``--no-compile-cache`` disables).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from experiments.common import enable_compile_cache

DEFAULTS = dict(model="gpt", preset="tiny", steps=300, batch_size=16, seq_len=128, grad_accum=1, lr=3e-3,
                warmup_steps=30, schedule="cosine", data="default", tokenizer="byte", seed=0, dtype="auto",
                eval_every=100, eval_batches=20, log_every=10, checkpoint_every=100, keep_checkpoints=2)
# CLI flag -> TrainConfig field (None = not a TrainConfig field)
_TRAIN_FLAGS = ("steps", "batch_size", "seq_len", "grad_accum", "lr", "warmup_steps", "schedule", "data",
                "tokenizer", "seed", "dtype", "eval_every", "eval_batches", "log_every", "checkpoint_every",
                "keep_checkpoints", "mesh", "loss")


class CLIError(Exception):
    pass


def _parser():
    ap = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", help=f"architecture name (default {DEFAULTS['model']})")
    ap.add_argument("--preset", help=f"model preset (default {DEFAULTS['preset']})")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int, help="global batch (sequences per step)")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--grad-accum", type=int, help="micro-batches per step")
    ap.add_argument("--lr", type=float, help="peak learning rate")
    ap.add_argument("--warmup-steps", type=int)
    ap.add_argument("--schedule", choices=["cosine", "wsd", "constant"])
    ap.add_argument("--data",
                    help="built-in corpus name, folder/file of text, hf:NAME, a prepared dataset dir, "
                         "or synthetic:TASK[:k=v,...] (copying, recall, arithmetic, passkey)")
    ap.add_argument("--tokenizer", help="byte | bpe | bpe:VOCAB")
    ap.add_argument("--mesh", help="axes data, fsdp, expert, tensor, e.g. data=2,fsdp=2,tensor=2 or "
                                   "data=2,expert=2,tensor=2 (default: all devices on data)")
    ap.add_argument("--loss", help="registered loss function (default cross_entropy)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--eval-batches", type=int)
    ap.add_argument("--log-every", type=int)
    ap.add_argument("--checkpoint-every", type=int)
    ap.add_argument("--keep-checkpoints", type=int)
    ap.add_argument("--out", help="run directory (default runs/<model>-<preset>)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest checkpoint in --out (starts fresh if there is none)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="model config override")
    ap.add_argument("--train-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="train config override")
    ap.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA cache")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def _pairs(items, flag):
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise CLIError(f"{flag} expects FIELD=VALUE, got {item!r}")
        out.append((name.strip(), value.strip()))
    return out


def build_configs(args):
    """``(model_config, train_config)`` from parsed CLI args (raises ValueError / CLIError)."""
    from jaxformers import get_config
    from jaxformers.config import coerce_value
    from jaxformers.registry import config_from_dict, get_spec
    from jaxformers.training import TrainConfig
    from jaxformers.data import open_data
    from jaxformers.training.rundir import CONFIG_FILE

    model_sets = _pairs(args.set, "--set")
    train_sets = _pairs(args.train_set, "--train-set")
    saved = None
    if args.resume and args.model is None and args.out and (Path(args.out) / CONFIG_FILE).is_file():
        saved = json.loads((Path(args.out) / CONFIG_FILE).read_text())

    flags = {name: getattr(args, name) for name in _TRAIN_FLAGS if getattr(args, name) is not None}
    if saved is not None:  # resume: the run's own configs, with explicitly given flags on top
        model_config = config_from_dict(saved["model"])
        spec = get_spec(model_config.model)
        if model_sets:
            model_config = model_config.replace(
                **{k: coerce_value(spec.config_cls, k, v) for k, v in model_sets})
        base = dict(saved["train"])
        base.update(flags)
        base["out_dir"] = args.out
    else:
        model = args.model or DEFAULTS["model"]
        preset = args.preset or DEFAULTS["preset"]
        spec = get_spec(model)
        overrides = {k: coerce_value(spec.config_cls, k, v) for k, v in model_sets}
        base = {k: DEFAULTS[k] for k in _TRAIN_FLAGS if k in DEFAULTS}
        base.update(flags)
        base["out_dir"] = args.out or f"runs/{model}-{preset}"
        for k, v in train_sets:
            base[k] = coerce_value(TrainConfig, k, v)
        tc = TrainConfig(**base)
        overrides.setdefault("vocab_size", open_data(tc.data, tc.tokenizer).vocab_size)
        if "max_seq_len" not in overrides:
            preset_len = get_config(model, preset).max_seq_len
            if tc.seq_len > preset_len:
                print(f"note: raising max_seq_len {preset_len} -> {tc.seq_len} (= --seq-len)",
                      file=sys.stderr)
                overrides["max_seq_len"] = tc.seq_len
        model_config = get_config(model, preset, **overrides)
        return model_config, tc
    for k, v in train_sets:
        base[k] = coerce_value(TrainConfig, k, v)
    return model_config, TrainConfig(**base)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from jaxformers.training import CheckpointError, train

    debug = os.environ.get("JAXFORMERS_DEBUG", "") not in ("", "0")
    try:
        if not args.no_compile_cache:
            enable_compile_cache()
        try:
            model_config, train_config = build_configs(args)
        except RuntimeError as e:  # e.g. the built-in corpus could not be downloaded
            raise CLIError(str(e)) from e
        summary = train(model_config, train_config, resume=args.resume,
                        progress=False if args.quiet else None)
    except (CLIError, CheckpointError, ValueError, FileExistsError, FileNotFoundError) as e:
        if debug:  # JAXFORMERS_DEBUG=1: full traceback
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    import jax
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=1))
    if summary.get("stopped_by_signal"):  # preempted: checkpoint saved, not finished
        return 128 + int(summary["stopped_by_signal"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
