"""Export a trained run as a Hugging Face checkpoint (transformers loads it with ``AutoModelForCausalLM``).

    python -m experiments.export --run runs/llama-tiny --out hf/llama-tiny
    python -m experiments.export --run runs/mamba2-tiny --out hf/mamba2-tiny --step 200

Llama-style transformers (``llama``, or a ``gpt`` configured with RMSNorm, SwiGLU and RoPE)
become ``LlamaForCausalLM`` (``MistralForCausalLM`` with ``sliding_window`` when the model has a
sliding ``window``; ``Qwen2ForCausalLM`` with ``qkv_bias``, ``Qwen3ForCausalLM`` with ``qk_norm``),
``mamba`` / ``mamba2`` become
``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (``jaxformers.convert.to_hf``; a model HF cannot
express, e.g. ``gpt``'s LayerNorm + GELU MLP or DenseFormer's weights, is refused naming why).
``--dtype``: the weights' storage dtype, ``float32`` (default), ``bfloat16`` (what released
checkpoints use, half the bytes) or ``float16``; ``config.json``'s ``dtype`` / ``torch_dtype`` say
which; a float16 export of a weight beyond float16's range (|w| >= 65520) is refused naming it
(``--out`` untouched).  ``--max-shard-size`` (bytes, e.g. ``20000``, or ``5GB`` / ``500MB``,
default ``5GB``; ``to_hf(max_shard_size=)`` takes bytes as an int only, as ``save_pretrained``):
weights over that are split as ``save_pretrained`` splits them, ``model-00001-of-0000N.safetensors`` + a
``model.safetensors.index.json``; otherwise one ``model.safetensors``.  The run's tokenizer is
written beside them (``tokenizer.json`` + ``tokenizer_config.json``, ``AutoTokenizer``-loadable;
the byte tokenizer becomes an equivalent byte-level BPE) and ``config.json`` gets its end-of-text
id as ``eos_token_id`` / ``bos_token_id`` / ``pad_token_id``.  ``--step``: a checkpoint other than
the newest complete one.

Every file is written into a temporary folder beside ``--out`` (``.OUT.tmp-*``, same file system;
inside ``--out`` when that is a mount point, e.g. a container's volume) and fsync-ed; only when the whole export is complete are the files moved into ``--out``: an
export that fails or is interrupted leaves ``--out`` as it was (an earlier export intact).
``--force`` writes into a non-empty ``--out``: files there that a loader would read in place of
(or beside) the export -- ``model.safetensors`` beside a new sharded index, an earlier sharded
index and its shards that the new export does not overwrite, ``generation_config.json``,
``special_tokens_map.json``, ``added_tokens.json``, and the tokenizer files when the run has no
tokenizer -- are removed after the new files are in place (listed as ``removed``).
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


def _stale_names(has_tokenizer: bool) -> list:
    """Non-weight files of an earlier checkpoint in ``--out`` that loaders would read with (or
    instead of) this export: generation / special-token settings, and tokenizer files this
    export does not rewrite (stale weight files: ``hf_write.stale_weight_files``)."""
    return list(_STALE) + ([] if has_tokenizer else list(_TOKENIZER_FILES))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run directory written by experiments.train")
    ap.add_argument("--out", required=True, help="directory to write the HF checkpoint into")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    ap.add_argument("--force", action="store_true",
                    help="write into a non-empty --out (replacing an earlier export's files)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="storage dtype of the weights (default float32; bfloat16 halves the size; "
                         "float16 refuses a weight beyond its range, |w| >= 65520)")
    ap.add_argument("--max-shard-size", default="5GB",
                    help="largest weight file, in bytes or like 5GB / 500MB (default 5GB): a bigger "
                         "model is split into model-0000K-of-0000N.safetensors + an index")
    args = ap.parse_args(argv)
    # a "~" the shell left alone (quoted): as load_run reads --run, never a literal "~" folder
    args.run, args.out = os.path.expanduser(args.run), os.path.expanduser(args.out)

    from jaxformers.convert import to_hf
    from jaxformers.convert.hf_tokenizer import save_hf_tokenizer
    from jaxformers.convert.hf_write import parse_size, staged, write_json
    from jaxformers.data import Tokenizer, load_tokenizer, open_data
    from jaxformers.training import CheckpointError, load_run
    from jaxformers.training.rundir import TOKENIZER_DIR
    from jaxformers.utils import file_in_the_way, plain_int

    try:
        if not args.out.strip():  # Path("") is ".": the export would land in the current directory
            raise ValueError("--out: empty path (name the directory to write the checkpoint into)")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        blocker = file_in_the_way(out.parent)
        if blocker is not None:  # (was an "[Errno 17] File exists" naming no flag)
            raise ValueError(f"--out {out} cannot be created: {blocker} is a file, not a directory")
        if Path(args.run).is_dir() and (out.resolve() == Path(args.run).resolve()
                                         or out.resolve().is_relative_to(Path(args.run).resolve())):
            # config.json would overwrite the run's own (the run could no longer be loaded), and a
            # folder of the run (e.g. its tokenizer/) would get the export's files over its own
            where = "is" if out.resolve() == Path(args.run).resolve() else "is inside"
            raise ValueError(f"--out {out} {where} the run directory --run {args.run}: choose an --out "
                             "outside the run")
        if out.exists() and any(out.iterdir()) and not args.force:
            raise ValueError(f"--out {out} exists and is not an empty directory (--force writes into it)")
        # all digits: bytes (parse_size wants an int for those, as HF)
        size = plain_int(args.max_shard_size.strip())
        max_shard_size = parse_size(args.max_shard_size if size is None else size)
        if args.step is not None and args.step < 0:
            raise ValueError(f"--step must be >= 0, got {args.step}")
        model_config, train_config, params = load_run(args.run, step=args.step)
        tok_dir = Path(args.run) / TOKENIZER_DIR
        if tok_dir.is_dir():
            tok = Tokenizer.load(tok_dir)
        else:  # older runs: the dataset's tokenizer
            source = open_data(train_config.data, train_config.tokenizer)
            tok = None if source.ds_dir is None else load_tokenizer(source.ds_dir)
        summary = {"run": args.run, "out": str(out), "model": model_config.model, "tokenizer": None,
                   "dtype": args.dtype}
        # everything is written into a temporary folder beside --out and moved in when complete
        with staged(str(out), stale=_stale_names(has_tokenizer=tok is not None)) as stage:
            to_hf(model_config, params, stage.path, dtype=args.dtype,
                  max_shard_size=max_shard_size)  # checks the config before writing anything
            if tok is not None:
                save_hf_tokenizer(tok, stage.path, model_max_length=model_config.max_seq_len)
                cfg_path = Path(stage.path) / "config.json"
                cfg = json.loads(cfg_path.read_text())
                cfg.update(eos_token_id=tok.eos_id, bos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
                write_json(str(cfg_path), cfg)
                summary["tokenizer"] = tok.spec
            weights = sorted(n for n in os.listdir(stage.path) if n.startswith("model"))
            summary["weights"] = weights
            summary["bytes"] = sum(os.path.getsize(os.path.join(stage.path, n)) for n in weights
                                   if n.endswith(".safetensors"))
        if stage.removed:
            summary["removed"] = stage.removed
    except (CheckpointError, ValueError, OSError) as e:  # OSError: e.g. a path that cannot be read or written
        if os.environ.get("JAXFORMERS_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
