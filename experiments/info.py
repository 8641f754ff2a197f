"""Presets of a model: parameters and training FLOPs per token; the fields you can set.

    python -m experiments.info --model llama [--seq-len 1024] [--json]
    python -m experiments.info --run runs/llama-tiny   # a run's model, at its seq_len and loss
    python -m experiments.info --fields llama     # model-config (--set) and train (--train-set) fields
    python -m experiments.info --import my_arch --model my-arch   # an architecture your module registers

``non-emb`` (``non_embedding_params``) is the parameter count less the token-embedding table
(``vocab_size * d_model``); an untied output head counts.  ``FLOPs/token`` is what the trainer
counts for the run's MFU (:func:`jaxformers.training.metrics.model_flops_per_token`): per token
of the data, with the positions the model's default loss runs (a landmark model's inserted
landmarks), or, for ``--run``, the run's own loss.
"""
import argparse
import json
import sys
from pathlib import Path

import jaxformers as jf
from jaxformers.utils import abstract_params, count_params


def config_row(config, seq_len: int, loss: str = None, **names) -> dict:
    """One table row of ``config`` at context ``seq_len``; FLOPs per token as the trainer counts
    them with loss ``loss`` (default: the config's ``default_loss``)."""
    from jaxformers.training.losses import get_loss
    from jaxformers.training.metrics import model_flops_per_token

    params = abstract_params(jf.build(config))  # shapes only, built once for both counts
    n = count_params(params)
    loss_fn = get_loss(loss or type(config).default_loss)
    return dict(**names, params=n, non_embedding_params=n - config.vocab_size * config.d_model,
                d_model=config.d_model, n_layer=config.n_layer,
                n_head=getattr(config, "n_head", None), n_kv_head=getattr(config, "kv_heads", None),
                attention_layers=config.n_attention_layers, vocab_size=config.vocab_size, seq_len=seq_len,
                flops_per_token=model_flops_per_token(config, seq_len, params, loss_fn=loss_fn))


def preset_table(model: str, seq_len=None):
    return [config_row(config, seq_len or config.max_seq_len, model=model, preset=preset)
            for preset, config in ((p, jf.get_config(model, p)) for p in jf.list_presets(model))]


def run_row(run_dir, seq_len=None) -> dict:
    """The row of a run directory's model (``config.json``: its model config, ``seq_len`` and
    loss -- ``train.loss``: a loss ``train()`` was given as a Python function is not recorded by
    name, its FLOPs are ``train.loss``'s; the modules the run recorded are imported first),
    ``preset`` = the run's path."""
    from jaxformers.training.rundir import run_configs

    try:
        config, train = run_configs(run_dir)
    except FileNotFoundError as e:
        raise ValueError(f"--run {e}") from None
    return config_row(config, seq_len or train.seq_len, train.loss, model=config.model,
                      preset=str(Path(run_dir).expanduser()))


def field_rows(model=None):
    """``[{"config", "field", "type", "default"}]``: the model config class's fields (with the
    ``tiny`` preset's values as defaults) when ``model`` is given, then :class:`TrainConfig`'s."""
    import dataclasses
    from jaxformers.registry import get_spec
    from jaxformers.training import TrainConfig

    rows = []
    if model is not None:
        spec = get_spec(model)
        preset = jf.get_config(model, "tiny")
        for f in dataclasses.fields(spec.config_cls):
            if f.name != "model":
                rows.append(dict(config=f"{spec.config_cls.__name__} (--set)", field=f.name,
                                 type=str(f.type), default=getattr(preset, f.name)))
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "out_dir":  # experiments.train's default (--out), not the library's
            default = "runs/<model>-<preset>"
        rows.append(dict(config="TrainConfig (--train-set)", field=f.name, type=str(f.type), default=default))
    return rows


def _human(n):
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"one of {jf.list_models()} (default: all)")
    p.add_argument("--run", default=None, metavar="DIR",
                   help="a run directory: its model at its seq_len (or --seq-len) and loss")
    p.add_argument("--seq-len", type=int, default=None, help="context length for FLOPs (default: preset's)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--fields", nargs="?", const="", metavar="MODEL",
                   help="list the config fields of MODEL (--set; defaults = its tiny preset) and of the "
                        "train config (--train-set); without MODEL only the train config")
    from experiments.common import add_import_flag, import_or_exit
    add_import_flag(p)
    args = p.parse_args(argv)
    import_or_exit(p, args)  # your own architecture: the module that registers it
    if args.seq_len is not None and args.seq_len < 1:
        p.exit(2, f"error: --seq-len must be a positive int, got {args.seq_len}\n")
    if args.fields is not None:
        for flag, value in (("--model", args.model), ("--seq-len", args.seq_len), ("--run", args.run)):
            if value is not None:  # silently ignored otherwise: --fields MODEL names the model
                p.error(f"--fields excludes {flag} (use --fields MODEL for a model's fields)")
        try:
            rows = field_rows(args.fields or None)
        except ValueError as e:
            p.exit(2, f"error: {e}\n")
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
            return rows
        last = None
        for r in rows:
            if r["config"] != last:
                print(("" if last is None else "\n") + r["config"])
                last = r["config"]
            print(f"  {r['field']:<22} {r['type']:<34} {r['default']!r}")
        return rows
    if args.run is not None and args.model is not None:
        p.error("--run excludes --model (the run names its model)")
    models = [args.model] if args.model else jf.list_models()
    try:
        if args.run is not None:
            rows = [run_row(args.run, args.seq_len)]
        else:
            rows = [r for m in models for r in preset_table(m, args.seq_len)]
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    if args.json:
        print(json.dumps(rows, indent=2))
        return rows
    wm = max([12] + [len(r["model"]) for r in rows])
    wp = max([13] + [len(r["preset"]) for r in rows])
    header = f"{'model':<{wm}} {'preset':<{wp}} {'params':>8} {'non-emb':>8} {'layers':>6} {'d_model':>7} " \
             f"{'heads':>7} {'seq':>6} {'FLOPs/token':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<{wm}} {r['preset']:<{wp}} {_human(r['params']):>8} {_human(r['non_embedding_params']):>8} "
              f"{r['n_layer']:>6} {r['d_model']:>7} {(str(r['n_head']) + '/' + str(r['n_kv_head'])) if r['attention_layers'] else '-':>7} "
              f"{r['seq_len']:>6} {_human(r['flops_per_token']):>12}")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
