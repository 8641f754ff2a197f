"""Export a trained run as a Hugging Face checkpoint (transformers loads it with ``AutoModelForCausalLM``).

    python -m experiments.export --run runs/llama-tiny --out hf/llama-tiny
    python -m experiments.export --run runs/mamba2-tiny --out hf/mamba2-tiny --step 200

Llama-style transformers (``llama``, or a ``gpt`` configured with RMSNorm, SwiGLU and RoPE)
become ``LlamaForCausalLM`` (``MistralForCausalLM`` with ``sliding_window`` when the model has a
sliding ``window``; ``Qwen2ForCausalLM`` with ``qkv_bias``, ``Qwen3ForCausalLM`` with ``qk_norm``),
``mamba`` / ``mamba2`` become
``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (``jaxformers.convert.to_hf``; a model HF cannot
express, e.g. ``gpt``'s LayerNorm + GELU MLP or DenseFormer's weights, is refused naming why).
Weights are float32 ``model.safetensors``.  The run's tokenizer is written beside them
(``tokenizer.json`` + ``tokenizer_config.json``, ``AutoTokenizer``-loadable; the byte
tokenizer becomes an equivalent byte-level BPE) and ``config.json`` gets its end-of-text id
as ``eos_token_id`` / ``bos_token_id`` / ``pad_token_id``.  ``--step``: a checkpoint other than
the newest complete one.  ``--force`` writes into a non-empty ``--out``: files there that a
loader would read in place of (or beside) the export -- a sharded ``model.safetensors.index.json``
and its shards, ``generation_config.json``, ``special_tokens_map.json``, ``added_tokens.json``,
and the tokenizer files when the run has no tokenizer -- are removed (listed as ``removed``).
Prints a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


_STALE = ("generation_config.json", "special_tokens_map.json", "added_tokens.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _remove_stale(out: Path, has_tokenizer: bool) -> list:
    """Remove what an earlier checkpoint in ``out`` left that loaders would read with (or instead
    of) this export: a sharded index and its shards (stale weights beside ``model.safetensors``),
    generation / special-token settings, and tokenizer files this export does not rewrite.
    Returns the names."""
    names = list(_STALE) + ([] if has_tokenizer else list(_TOKENIZER_FILES))
    index = out / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, AttributeError):
            shards = set()
        names += sorted(s for s in shards if isinstance(s, str) and s.endswith(".safetensors")
                        and s != "model.safetensors" and "/" not in s) + [index.name]
    removed = []
    for name in names:
        path = out / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    return removed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run directory written by experiments.train")
    ap.add_argument("--out", required=True, help="directory to write the HF checkpoint into")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    ap.add_argument("--force", action="store_true", help="write into a non-empty --out")
    args = ap.parse_args(argv)
    # a "~" the shell left alone (quoted): as load_run reads --run, never a literal "~" folder
    args.run, args.out = os.path.expanduser(args.run), os.path.expanduser(args.out)

    from jaxformers.convert import to_hf
    from jaxformers.convert.hf_tokenizer import save_hf_tokenizer
    from jaxformers.data import Tokenizer, load_tokenizer, open_data
    from jaxformers.training import CheckpointError, load_run
    from jaxformers.training.rundir import TOKENIZER_DIR

    try:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        if Path(args.run).is_dir() and (out.resolve() == Path(args.run).resolve()
                                         or out.resolve().is_relative_to(Path(args.run).resolve())):
            # config.json would overwrite the run's own (the run could no longer be loaded), and a
            # folder of the run (e.g. its tokenizer/) would get the export's files over its own
            where = "is" if out.resolve() == Path(args.run).resolve() else "is inside"
            raise ValueError(f"--out {out} {where} the run directory --run {args.run}: choose an --out "
                             "outside the run")
        if out.exists() and any(out.iterdir()) and not args.force:
            raise ValueError(f"--out {out} exists and is not an empty directory (--force writes into it)")
        if args.step is not None and args.step < 0:
            raise ValueError(f"--step must be >= 0, got {args.step}")
        model_config, train_config, params = load_run(args.run, step=args.step)
        tok_dir = Path(args.run) / TOKENIZER_DIR
        if tok_dir.is_dir():
            tok = Tokenizer.load(tok_dir)
        else:  # older runs: the dataset's tokenizer
            source = open_data(train_config.data, train_config.tokenizer)
            tok = None if source.ds_dir is None else load_tokenizer(source.ds_dir)
        to_hf(model_config, params, str(out))  # checks the config before writing anything
        summary = {"run": args.run, "out": str(out), "model": model_config.model, "tokenizer": None}
        removed = _remove_stale(out, has_tokenizer=tok is not None)
        if removed:
            summary["removed"] = removed
        if tok is not None:
            save_hf_tokenizer(tok, str(out), model_max_length=model_config.max_seq_len)
            cfg_path = out / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg.update(eos_token_id=tok.eos_id, bos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
            summary["tokenizer"] = tok.spec
    except (CheckpointError, ValueError, OSError) as e:  # OSError: e.g. a path that cannot be read or written
        if os.environ.get("JAXFORMERS_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
