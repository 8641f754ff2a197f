"""Train a registered model on a text corpus; prints a short summary (the full one is summary.json).

    python -m experiments.train                          # gpt tiny, Shakespeare bytes: minutes on a CPU
    python -m experiments.train --model llama --preset tiny --steps 1000 --out runs/llama
    python -m experiments.train --data my.txt --out runs/mine       # your own text (file or folder)
    python -m experiments.train --config my_run.yaml --set n_layer=4   # a config file, flags on top
    python -m experiments.train --model gpt --set n_layer=4 --set d_model=256 --mesh data=2,fsdp=2,tensor=2
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m experiments.train --mesh data=2,fsdp=2,tensor=2   # the same mesh on a CPU (8 fake devices)
    python -m experiments.train --out runs/llama --resume       # continue (configs come from the run dir)
    python -m experiments.train --out runs/llama --extend-steps 500   # train a finished run further
    python -m experiments.train --init-from runs/llama --data my.txt --out runs/ft   # fine-tune a run
    python -m experiments.train --init-from path/to/hf_llama --data my.txt --out runs/ft  # or a HF checkpoint
    python -m experiments.train --data synthetic:copying --seq-len 64 --steps 200 --out runs/copy
    python -m experiments.train --mesh data=2,expert=2,tensor=2 --loss cross_entropy \\
        --train-set aux_loss_weights=load_balance=0.01
    python -m experiments.train --import my_moe --model my-moe --loss label_smoothed   # your own code

Settings, lowest precedence first: the defaults below, the model's preset, ``--config FILE``
(YAML or JSON: ``model``, ``preset``, ``overrides`` {model field: value}, ``train`` {train
field: value}, ``init_from``), then the flags.  ``--set field=value`` overrides model-config
fields, ``--train-set field=value`` train-config fields; every field, with its default, is
listed by ``python -m experiments.info --fields MODEL``.  Each run directory gets ``run.yaml``:
``--config RUN_DIR/run.yaml --out NEW_DIR`` reproduces the run.  The model's ``vocab_size``
comes from the dataset, plus one id for a landmark model's landmark token unless ``--set
landmark_id=N`` (override with ``--set vocab_size=N``, N >= the dataset's);
``max_seq_len`` is raised to ``--seq-len`` if needed (unless ``--set max_seq_len=N`` gives it).
A new run's ``--steps`` over a config file's ``schedule_steps``: one equal to the file's steps
follows ``--steps``; another (an extended run's run.yaml) is refused unless ``--train-set
schedule_steps=N|none`` says which schedule length is meant.  A ``--train-set`` of a field the
schedule ignores (``min_lr_ratio`` with ``constant``; ``decay_fraction`` with any but ``wsd``) is refused.

Fine-tuning: ``--init-from RUN_DIR|HF_DIR`` takes the model config and parameters (not the
optimizer state) of a run or of a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Mamba / Mamba-2 checkpoint and starts
a new run; its tokenizer is the source's (``hf:HF_DIR`` when the checkpoint has a
tokenizer.json; ``--tokenizer`` overrides), and so is the loss of a source run (e.g. a landmark
run's ``landmark_cross_entropy``; ``--loss`` overrides).  Step 0 logs the source model's val loss.
Without ``--loss`` a new run trains with its model's loss: ``cross_entropy``, or
``landmark_cross_entropy`` for ``landmark`` (landmarks inserted, landmark targets masked).

Resuming: ``--resume`` continues from the newest checkpoint; a finished run trains nothing.
Without ``--config`` / ``--init-from`` the run's own config is used (flags on top: the config its
newest complete checkpoint was trained with, ``config.json`` being ahead of it when a resume was
killed during its first save, whose changes never took); with them
the command describes the whole run again, as on its first start (a requeued job's same
command), and must be the same run: another model config or ``init_from`` is refused (a source
deleted since is not read: the run's copy of its config and loss is; a HF source's ``hf:DIR``
tokenizer is read from DIR at every start, a plain ``--resume``'s too).
``--extend-steps N`` (the run's total ``steps`` + N; a run stopped before its total also
finishes it) or ``--resume --steps M`` (M larger) trains further, the LR schedule
keeping its length, so the LR continues at the value it reached (no jump); another schedule
change that would move the LR is refused unless ``--allow-lr-jump``.

Logs: ``metrics.jsonl``, TensorBoard event files (``tensorboard --logdir runs``), ``loss.png``
(losses + LR), ``summary.json``.  ``--data synthetic:TASK[:k=v,...]`` trains on a synthetic task
with its answer mask (see ``jaxformers.data.sources``; validation on held-out problems, never
drawn in training); ``--loss`` picks a registered loss.  ``--import MODULE`` (repeatable) imports
your own module first, so the architectures and losses it registers can be named by ``--model`` /
``--loss``; the run records it (``train.imports`` in config.json and run.yaml), so resuming,
evaluating, generating from, fine-tuning or reproducing the run imports it again without
``--import`` (the module must be importable there: on ``PYTHONPATH``, or in the working directory).
Compiled programs are cached in ``<jaxformers cache>/xla`` (``$JAX_COMPILATION_CACHE_DIR``
wins; ``--no-compile-cache`` disables).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from experiments.common import add_import_flag, enable_compile_cache, import_modules

DEFAULTS = dict(model="gpt", preset="tiny", steps=300, batch_size=16, seq_len=128, grad_accum=1, lr=3e-3,
                warmup_fraction=0.1, schedule="cosine", data="default", tokenizer="byte", seed=0,
                dtype="auto", eval_every=100, eval_batches=20, log_every=10, checkpoint_every=100,
                keep_checkpoints=2)
# CLI flags that are TrainConfig fields of the same name
_TRAIN_FLAGS = ("steps", "batch_size", "seq_len", "grad_accum", "lr", "warmup_steps", "warmup_fraction",
                "schedule", "data", "tokenizer", "seed", "dtype", "eval_every", "eval_batches", "log_every",
                "checkpoint_every", "keep_checkpoints", "mesh", "loss", "init_from")
CONFIG_KEYS = ("model", "preset", "overrides", "train", "init_from")


class CLIError(Exception):
    pass


def _models_epilog() -> str:
    try:
        import jaxformers as jf
        width = max(len(m) for m in jf.list_models())
        rows = [f"  {m:<{width}}  presets: {', '.join(jf.list_presets(m))}" for m in jf.list_models()]
    except Exception as e:  # noqa: BLE001 - help must print even if a model fails to import
        return f"(could not list the models: {e})"
    return "models (--model) and their presets (--preset):\n" + "\n".join(rows)


def _parser():
    d = DEFAULTS
    ap = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]) + "\n" + _models_epilog())
    ap.add_argument("--config", metavar="FILE",
                    help="YAML/JSON config file (model, preset, overrides, train, init_from); "
                         "flags override it")
    ap.add_argument("--model", help=f"architecture name (default {d['model']}; list below)")
    add_import_flag(ap)
    ap.add_argument("--preset", help=f"model preset (default {d['preset']}; list below)")
    ap.add_argument("--steps", type=int, help=f"optimizer updates (default {d['steps']})")
    ap.add_argument("--batch-size", type=int,
                    help=f"global batch, sequences per step (default {d['batch_size']})")
    ap.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {d['seq_len']})")
    ap.add_argument("--grad-accum", type=int, help=f"micro-batches per step (default {d['grad_accum']})")
    ap.add_argument("--lr", type=float, help=f"peak learning rate (default {d['lr']})")
    ap.add_argument("--warmup-steps", type=int,
                    help="warmup updates (default: --warmup-fraction of the steps)")
    ap.add_argument("--warmup-fraction", type=float,
                    help=f"warmup as a fraction of the steps (default {d['warmup_fraction']}; replaces a "
                         "warmup_steps of --config or of the resumed run)")
    ap.add_argument("--schedule", choices=["cosine", "wsd", "constant"],
                    help=f"LR schedule (default {d['schedule']})")
    from jaxformers.data.corpus import list_corpora

    ap.add_argument("--data",
                    help="built-in corpus name, a text file or folder of your own (.txt/.jsonl, also .txt.gz, "
                         ".jsonl.gz, .txt.zst, .jsonl.zst, .parquet; read a document at a time), hf:NAME, "
                         "a prepared dataset dir (python -m experiments.prepare; its --text-field reads another "
                         ".jsonl field / .parquet column than 'text'), or synthetic:TASK[:k=v,...] (copying, "
                         f"recall, arithmetic, passkey); built in: {', '.join(list_corpora())} (default: "
                         f"{d['data']!r}, an alias of shakespeare)")
    ap.add_argument("--tokenizer", help="byte | bpe | bpe:VOCAB | hf:DIR (a tokenizer.json) "
                                        f"(default {d['tokenizer']}; with --init-from: the source's)")
    ap.add_argument("--mesh", help="axes data, fsdp, expert, tensor, e.g. data=2,fsdp=2,tensor=2 or "
                                   "data=2,expert=2,tensor=2 (default: all devices on data); the "
                                   "product must equal the device count, or one axis is -1 and takes "
                                   "what the others leave (data=-1,tensor=2) -- on a CPU, try meshes with "
                                   "XLA_FLAGS=--xla_force_host_platform_device_count=8")
    ap.add_argument("--loss", help="registered loss function (default: the model's: cross_entropy, "
                                   "landmark_cross_entropy for landmark; with --init-from a run: its loss)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                    help="compute dtype (default auto: bfloat16 on GPU/TPU, float32 on CPU)")
    ap.add_argument("--seed", type=int, help=f"parameter init, data order and dropout (default {d['seed']})")
    ap.add_argument("--eval-every", type=int,
                    help=f"steps between evaluations, 0 = at the end (default {d['eval_every']})")
    ap.add_argument("--eval-batches", type=int, help=f"batches per evaluation (default {d['eval_batches']})")
    ap.add_argument("--log-every", type=int, help=f"steps between log rows (default {d['log_every']})")
    ap.add_argument("--checkpoint-every", type=int,
                    help=f"steps between checkpoints, 0 = only the last (default {d['checkpoint_every']})")
    ap.add_argument("--keep-checkpoints", type=int,
                    help=f"checkpoints kept (default {d['keep_checkpoints']})")
    ap.add_argument("--out", help="run directory (default runs/<model>-<preset>)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest checkpoint in --out (starts fresh if there is none); "
                         "with --config / --init-from the command must describe the same run")
    ap.add_argument("--extend-steps", type=int, metavar="N",
                    help="resume the run in --out with its total steps raised by N (a run stopped "
                         "early also finishes its own steps; the LR continues at its final value)")
    ap.add_argument("--allow-lr-jump", action="store_true",
                    help="on resume, accept a schedule change that moves the learning rate")
    ap.add_argument("--init-from", metavar="RUN_DIR|HF_DIR",
                    help="fine-tune: parameters (not optimizer state) of a run or of a HF "
                         "Llama/Mistral/Qwen2/Qwen3/Mamba/Mamba-2 checkpoint")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="model config override (fields: python -m experiments.info --fields MODEL)")
    ap.add_argument("--train-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="train config override, e.g. min_lr_ratio=0.05 "
                         "(fields: python -m experiments.info --fields)")
    ap.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    ap.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA cache")
    ap.add_argument("--json", action="store_true",
                    help="print the summary as JSON on stdout (the default when stdout is not a terminal)")
    ap.add_argument("--quiet", action="store_true", help="no progress output and no human summary")
    return ap


def _pairs(items, flag):
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise CLIError(f"{flag} expects FIELD=VALUE, got {item!r}")
        out.append((name.strip(), value.strip()))
    return out


def read_config_file(path) -> dict:
    """The ``--config`` file as a dict with keys from :data:`CONFIG_KEYS` (YAML via PyYAML, or
    JSON for ``.json``); ``ValueError`` for unknown keys or a file that is not a mapping."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r}: no such file")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {str(path)!r}: bad JSON: {e}") from None
    else:
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {str(path)!r}: bad YAML: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"--config {str(path)!r} must hold a mapping with keys {list(CONFIG_KEYS)}")
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"--config {str(path)!r}: unknown key(s) {unknown}; allowed: {list(CONFIG_KEYS)}")
    for key in ("overrides", "train"):
        if not isinstance(data.get(key) or {}, dict):
            raise ValueError(f"--config {str(path)!r}: {key} must be a mapping of field: value")
    for key in ("model", "preset", "init_from"):
        if key in data and data[key] is not None and (not isinstance(data[key], str) or not data[key].strip()):
            raise ValueError(f"--config {str(path)!r}: {key} must be a non-empty string, got {data[key]!r}")
    return data


def _file_values(cls, values: dict) -> dict:
    """Config-file values for dataclass ``cls``: unknown fields refused; strings and floats for
    non-string fields parsed like ``--set`` values (YAML reads ``3e-3`` as a string; an integral
    float such as ``steps: 1000.0`` is an int, as ``--train-set steps=1000.0`` is)."""
    import dataclasses
    from jaxformers.config import check_fields, coerce_value

    check_fields(cls, values)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}

    def parse(k, v):
        if isinstance(defaults[k], str):
            return v
        if isinstance(v, str):
            return coerce_value(cls, k, v)
        if isinstance(v, float):
            return coerce_value(cls, k, repr(v))
        return v

    return {k: parse(k, v) for k, v in values.items()}


def _warmup_fraction_wins(base: dict, args, train_sets) -> None:
    """A warmup fraction given on the command line (``--warmup-fraction`` or ``--train-set
    warmup_fraction=F``) overrides a ``warmup_steps`` of lower precedence (a ``--config`` file's, a
    resumed run's): ``TrainConfig`` lets ``warmup_steps`` win, so the flag was silently ignored.
    Both given on the command line: ``CLIError``."""
    given = {k for k, _ in train_sets} | {k for k in ("warmup_steps", "warmup_fraction")
                                          if getattr(args, k, None) is not None}
    if "warmup_fraction" not in given:
        return
    if "warmup_steps" in given and base.get("warmup_steps") is not None:
        raise CLIError(f"give either a warmup in steps (--warmup-steps, warmup_steps={base['warmup_steps']}) "
                       f"or a fraction of the schedule (--warmup-fraction, warmup_fraction="
                       f"{base.get('warmup_fraction')}), not both: warmup_steps would win")
    base["warmup_steps"] = None


def _schedule_follows_steps(base: dict, file_values: dict, args, train_sets) -> None:
    """A new run whose ``--steps`` (or ``--train-set steps=``) changes the ``--config`` file's
    steps: the file's ``schedule_steps`` equal to its steps is dropped (the schedule follows the
    new steps, as it followed the file's); another one (e.g. the run.yaml of an extended run) is a
    ``CLIError`` unless ``--train-set schedule_steps=`` says which length is meant (it would lay
    the LR schedule over the file's length, not over the new steps)."""
    given = {k for k, _ in train_sets}
    if (args.steps is None and "steps" not in given) or "schedule_steps" in given:
        return
    length = file_values.get("schedule_steps")
    if length is None or length == base["steps"]:
        return
    file_steps = file_values.get("steps", DEFAULTS["steps"])
    if length == file_steps:
        base["schedule_steps"] = None
        return
    flag = "--steps" if args.steps is not None else "--train-set steps="
    raise CLIError(f"--config {args.config} sets schedule_steps={length} (its steps={file_steps}): with "
                   f"{flag} {base['steps']} the LR schedule would still be laid out over {length} steps; say "
                   f"which length you mean with --train-set schedule_steps=N (none: over the {base['steps']} "
                   "steps)")


def _check_schedule_fields(tc, train_sets) -> None:
    """``CLIError`` for a ``--train-set`` of a schedule field that ``tc.schedule`` ignores (e.g.
    ``min_lr_ratio`` with ``constant``): the value would change nothing.  Only what the command
    line gives: a config file or a saved run records every field, used or not."""
    from jaxformers.training.optim import SCHEDULES_USING

    for name, _ in train_sets:
        users = SCHEDULES_USING.get(name)
        if users and tc.schedule not in users:
            raise CLIError(f"--train-set {name}=... has no effect with schedule={tc.schedule!r}: only "
                           f"{' / '.join(users)} use{'s' if len(users) == 1 else ''} it; drop it or pick one "
                           "of those schedules (--schedule)")


def build_configs(args):
    """``(model_config, train_config)`` from parsed CLI args (raises ValueError / CLIError)."""
    from jaxformers import get_config
    from jaxformers.config import coerce_value
    from jaxformers.registry import config_from_dict, get_spec
    from jaxformers.training import TrainConfig
    from jaxformers.data import open_data
    from jaxformers.training.config import module_names
    from jaxformers.training.rundir import CONFIG_FILE, import_run_modules

    model_sets = _pairs(args.set, "--set")
    train_sets = _pairs(args.train_set, "--train-set")
    saved = None
    if args.out:  # as train() reads it (a "~" the shell left alone, e.g. in --out=~/runs/x)
        args.out = os.path.expanduser(args.out)
    if (args.resume or args.extend_steps is not None) and not args.out and not args.config:
        # the default run directory of --model/--preset (as for a new run), before the checks below
        args.out = f"runs/{args.model or DEFAULTS['model']}-{args.preset or DEFAULTS['preset']}"
    if args.extend_steps is not None:
        if args.extend_steps < 1:
            raise CLIError(f"--extend-steps must be >= 1, got {args.extend_steps}")
        out = args.out
        if not out and args.config:  # as --resume does: the run directory the config file names
            file_out = (read_config_file(args.config).get("train") or {}).get("out_dir")
            out = os.path.expanduser(file_out) if isinstance(file_out, str) and file_out else None
        if not out or not (Path(out) / CONFIG_FILE).is_file():
            where = f"no {CONFIG_FILE} in {out!r}" if out else "no run directory given"
            raise CLIError(f"--extend-steps needs --out pointing at an existing run, or a --config whose "
                           f"train.out_dir names one ({where})")
        if args.steps is not None or any(k == "steps" for k, _ in train_sets):
            # (--train-set steps=N was applied after --extend-steps: N won without a word)
            given = "--steps" if args.steps is not None else "--train-set steps="
            raise CLIError(f"give either {given} (the new total) or --extend-steps (steps to add), not both")
        args.resume = True
    if args.resume and args.out and (Path(args.out) / CONFIG_FILE).is_file():
        saved = _run_config(args.out)
        saved_model = saved.get("model", {}).get("model")
        if args.model is not None and args.model != saved_model:
            raise CLIError(f"--model {args.model!r} differs from the run's model {saved_model!r} in {args.out}: "
                           "--resume continues that run (choose a new --out for a new one)")
        if args.preset is not None:
            print("note: --resume continues the run with its own config: --preset is not applied "
                  "(change fields with --set)", file=sys.stderr)

    flags = {name: getattr(args, name) for name in _TRAIN_FLAGS if getattr(args, name, None) is not None}
    if args.no_tensorboard:
        flags["tensorboard"] = False
    if saved is not None and not (args.config or args.init_from):
        # resume: the run's own configs, with explicitly given flags on top; first the modules it
        # recorded (--import of its first start: its architecture / loss of your own)
        import_run_modules(saved, args.out)
        model_config = config_from_dict(saved["model"])
        spec = get_spec(model_config.model)
        if model_sets:
            model_config = model_config.replace(
                **{k: coerce_value(spec.config_cls, k, v) for k, v in model_sets})
        base = dict(saved["train"])
        base.update(flags)
        if args.extend_steps is not None:
            base["steps"] = int(saved["train"]["steps"]) + args.extend_steps
        base["out_dir"] = args.out
        for k, v in train_sets:
            base[k] = coerce_value(TrainConfig, k, v)
        _warmup_fraction_wins(base, args, train_sets)
        base["imports"] = _imports(base.get("imports"), args.imports)  # the run's, then --import's
        tc = TrainConfig.from_dict(base)
        _check_schedule_fields(tc, train_sets)
        return model_config, tc

    file = read_config_file(args.config) if args.config else {}
    file_train = dict(file.get("train") or {})
    if file_train.get("imports"):  # a run.yaml of your own architecture: the modules it recorded
        where = f"--config {args.config}: train.imports"
        import_modules(module_names(file_train["imports"], name=where), flag=where)
    init_from = args.init_from or file.get("init_from") or file_train.get("init_from")
    if init_from is not None and not isinstance(init_from, str):
        raise ValueError(f"init_from must be a run or Hugging Face checkpoint directory, got {init_from!r}")
    source_config = source_tok = source_loss = None
    source_imports = ()
    if init_from:
        from jaxformers.training.init_from import source_config as _source, source_imports as _imports_of
        from jaxformers.training.init_from import source_loss as _loss
        source = _source_or_resumed_run(args, file_train, init_from)
        source_imports = _imports_of(source)  # a source of your own architecture: its modules
        source_config, source_tok = _source(source)
        source_loss = _loss(source)  # e.g. a landmark run's landmark_cross_entropy
    model = args.model or file.get("model") or (source_config.model if source_config else DEFAULTS["model"])
    preset = args.preset or file.get("preset") or DEFAULTS["preset"]
    if source_config is not None and model != source_config.model:
        raise CLIError(f"--model {model!r} differs from the model of --init-from {init_from!r} "
                       f"({source_config.model!r})")
    spec = get_spec(model)
    overrides = _file_values(spec.config_cls, dict(file.get("overrides") or {}))
    if overrides.get("model", model) != model:
        raise ValueError(f"--config {args.config!r}: overrides.model={overrides['model']!r} differs from the model "
                         f"{model!r}; choose the architecture with the top-level 'model' key (or --model)")
    overrides.pop("model", None)
    overrides.update({k: coerce_value(spec.config_cls, k, v) for k, v in model_sets})

    base = {k: DEFAULTS[k] for k in _TRAIN_FLAGS if k in DEFAULTS}
    if source_tok is not None:
        base["tokenizer"] = source_tok
    # the loss the source run was trained with, else the model's (a landmark model's inserts its
    # landmarks), unless --loss / the config file names one
    base["loss"] = source_loss or spec.config_cls.default_loss
    file_values = _file_values(TrainConfig, file_train)
    base.update(file_values)
    base.update(flags)
    base["init_from"] = str(init_from) if init_from else None
    base["out_dir"] = os.path.expanduser(args.out or base.get("out_dir") or f"runs/{model}-{preset}")
    for k, v in train_sets:
        base[k] = coerce_value(TrainConfig, k, v)
    _warmup_fraction_wins(base, args, train_sets)
    # recorded with the run (loading it imports them): the config file's, the source run's, --import's
    base["imports"] = _imports(base.get("imports"), source_imports, args.imports)
    if args.resume and (Path(base["out_dir"]) / CONFIG_FILE).is_file():
        # --resume with --config / --init-from (a job script that always passes --resume): the
        # command describes the whole run again, as on its first start, and must be the same run
        # (train() refuses another model config and names train-config changes, as on any resume)
        saved = _run_config(base["out_dir"])
        _check_same_init_from(init_from, saved, base["out_dir"])
        if "weight_decay_groups" not in overrides and saved.get("model", {}).get("model") == model:
            # a run.yaml written before the field existed: the run's own groups (config_from_dict
            # gives such a run "shape"), not the family's default of today
            overrides["weight_decay_groups"] = config_from_dict(saved["model"]).weight_decay_groups
        if args.extend_steps is not None:
            base["steps"] = int(saved["train"]["steps"]) + args.extend_steps
    else:  # a new run (a resume keeps the run's schedule length: resume_schedule)
        _schedule_follows_steps(base, file_values, args, train_sets)
    tc = TrainConfig(**base)
    _check_schedule_fields(tc, train_sets)
    if source_config is not None:  # the source's architecture; overrides such as dropout on top
        reference = source_config
        source_fields = {k: v for k, v in source_config.to_dict().items() if k != "model"}
        overrides = {**source_fields, **overrides}
    else:
        reference = get_config(model, preset)
        if "vocab_size" not in overrides:  # the data's, plus ids the model adds (a landmark)
            overrides["vocab_size"] = type(reference).vocab_size_for_data(
                open_data(tc.data, tc.tokenizer).vocab_size, overrides)
    # raised unless --set gave it (a config file's, e.g. every run.yaml's, or the source's is raised)
    if "max_seq_len" not in dict(model_sets):
        preset_len = overrides.get("max_seq_len", reference.max_seq_len)
        if tc.seq_len > preset_len:
            print(f"note: raising max_seq_len {preset_len} -> {tc.seq_len} (= --seq-len)", file=sys.stderr)
            overrides["max_seq_len"] = tc.seq_len
    return get_config(model, preset, **overrides), tc


def _imports(*groups) -> list:
    """The module names of ``groups`` (each None, a list or a comma-separated string), in order,
    each once: what the run records in ``train.imports``."""
    from jaxformers.training.config import module_names

    return list(module_names([name for group in groups for name in module_names(group)]))


def _run_config(out) -> dict:
    """The config a resume of the run in ``out`` continues from (``rundir.resume_config``: the one
    saved with its newest complete checkpoint, else its ``config.json``) -- as ``train`` checks it:
    a resume killed between writing ``config.json`` and completing its first checkpoint leaves a
    ``config.json`` ahead of the checkpoints (e.g. an ``--extend-steps`` total), which a retry must
    not build on; ``ValueError`` naming the file when it is unreadable or has no ``model`` /
    ``train`` section."""
    from jaxformers.training.rundir import CONFIG_FILE, resume_config

    saved = resume_config(out)
    missing = [k for k in ("model", "train") if not isinstance((saved or {}).get(k), dict)]
    if missing:
        raise ValueError(f"{Path(out) / CONFIG_FILE} (or its newest checkpoint's copy) is not a run config: "
                         f"no {' / '.join(missing)} section")
    return saved


def _source_or_resumed_run(args, file_train: dict, init_from: str) -> str:
    """Where ``--init-from``'s config, tokenizer, loss and modules are read: ``init_from``, except
    for a ``--resume`` of a run started from it once the source is gone (a job script passing
    ``--init-from SRC --resume`` on every start; the run holds its config, loss and modules, and
    its checkpoints the weights; an ``hf:DIR`` tokenizer is still read from DIR): then the run
    directory, after checking the run's ``init_from`` is this one."""
    from jaxformers.training.rundir import CONFIG_FILE

    out = args.out or file_train.get("out_dir")
    if not (args.resume and out and (Path(out).expanduser() / CONFIG_FILE).is_file()):
        return init_from
    if Path(init_from).expanduser().exists():
        return init_from
    out = os.path.expanduser(out)
    _check_same_init_from(init_from, _run_config(out), out)
    return out


def _check_same_init_from(init_from, saved: dict, out) -> None:
    """``CLIError`` unless a resume's ``init_from`` is the one the run in ``out`` started from
    (both absent, the same text, or the same resolved path)."""
    before = (saved.get("train") or {}).get("init_from")
    if not init_from and not before:
        return
    if init_from and before and (str(init_from) == str(before)
                                 or Path(init_from).resolve() == Path(before).resolve()):
        return
    raise CLIError(f"--resume continues the run in {out}, which was started with init_from={before!r}; "
                   f"this command gives init_from={init_from or None!r} (another source is a new run: "
                   "choose a new --out)")


def _fmt(value, spec, missing="n/a"):
    return missing if value is None else format(value, spec)


def human_summary(summary: dict) -> str:
    """A few lines for people: losses, throughput, and where the run's files are."""
    from jaxformers.training.rundir import PLOT_FILE, RUN_FILE, SUMMARY_FILE

    run = Path(summary["run_dir"])
    if summary.get("trained_steps") == 0 and summary.get("finished"):
        head = (f"no steps trained: the run had finished (step {summary['final_step']} of "
                f"{summary['steps']}); train further with --extend-steps N")
    elif summary.get("finished"):
        head = f"trained {summary['model']} to step {summary['final_step']} in {summary['wall_s']:.0f} s"
    else:
        head = (f"stopped {summary['model']} at step {summary['final_step']} of {summary['steps']}; "
                f"continue with --resume --out {shlex.quote(str(run))}")
    tps = summary.get("tokens_per_s")
    mfu = summary.get("mfu")
    lines = [head,
             f"  val loss {_fmt(summary.get('val_loss'), '.4f')}  "
             f"(ppl {_fmt(summary.get('val_ppl'), '.2f')}),  "
             f"train loss {_fmt(summary.get('train_loss'), '.4f')}",
             f"  {_fmt(tps, ',.0f')} tokens/s, MFU "
             + (f"{100 * mfu:.1f}%" if mfu is not None
                else "n/a" if tps is None  # no throughput measured (not the device's fault)
                else f"n/a (no peak FLOP/s known for {summary.get('device_kind')})"),
             f"  run dir      {run}",
             f"  plot         {run / PLOT_FILE}",
             f"  TensorBoard  tensorboard --logdir {shlex.quote(str(run))}",
             f"  summary      {run / SUMMARY_FILE}",
             f"  reproduce    python -m experiments.train --config {shlex.quote(str(run / RUN_FILE))} --out NEW_DIR"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from jaxformers.training import CheckpointError, TrainingDiverged, train
    from jaxformers.training.rundir import RunDirBusy

    debug = os.environ.get("JAXFORMERS_DEBUG", "") not in ("", "0")
    try:
        if not args.no_compile_cache:
            enable_compile_cache()
        try:
            import_modules(args.imports)
        except ValueError as e:
            raise CLIError(str(e)) from e
        try:
            model_config, train_config = build_configs(args)
        except RuntimeError as e:  # e.g. the built-in corpus could not be downloaded
            raise CLIError(str(e)) from e
        summary = train(model_config, train_config, resume=args.resume,
                        progress=False if args.quiet else None, allow_lr_jump=args.allow_lr_jump)
    except (CLIError, CheckpointError, RunDirBusy, ValueError, FileExistsError, FileNotFoundError) as e:
        if debug:  # JAXFORMERS_DEBUG=1: full traceback
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:  # NaN / inf loss: stopped before checkpointing it
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    import jax
    if jax.process_index() == 0:
        if not args.quiet:
            print(human_summary(summary), file=sys.stderr, flush=True)
        elif summary.get("trained_steps") == 0 and summary.get("finished"):
            print(f"{summary['run_dir']} is already finished: nothing trained", file=sys.stderr)
        if args.json or not sys.stdout.isatty():
            print(json.dumps(summary, indent=1))
    if summary.get("stopped_by_signal"):  # preempted (checkpoint saved), or a signal at the last step
        return 128 + int(summary["stopped_by_signal"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
