"""Evaluate a trained run: prints {"val_loss", "val_ppl", "val_tokens"} as JSON.

    python -m experiments.evaluate --run runs/gpt-tiny
    python -m experiments.evaluate --run runs/gpt-tiny --max-batches 0      # the whole val split
    python -m experiments.evaluate --run runs/gpt-tiny --data path/to/texts --split val
    python -m experiments.evaluate --run hf/llama-tiny --data shakespeare   # a HF checkpoint directory

Defaults (batch size, sequence length, number of batches, data) are the run's,
so the result matches the run's final ``val_loss`` in ``summary.json``.
``--run`` may also be a Hugging Face Llama / Mamba / Mamba-2 checkpoint directory (e.g. one
written by ``experiments.export``): then ``--data`` is required, the tokenizer is
``--tokenizer`` or the directory's ``tokenizer.json``, and the defaults are batch size 8,
``min(max_position_embeddings, 1024)`` tokens per sequence and the whole split.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run directory written by experiments.train")
    ap.add_argument("--data", help="corpus / prepared dataset dir (default: the run's)")
    ap.add_argument("--tokenizer", help="tokenizer for --data (default: the run's; for a HF checkpoint "
                                        "its tokenizer.json)")
    ap.add_argument("--split", default="val", choices=["val", "train"])
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--max-batches", type=int, default=-1,
                    help="-1: the run's validation set (its eval_batches full batches, whatever its "
                         "grad_accum); 0: all")
    ap.add_argument("--mesh", help="e.g. data=2 (default: all devices on data)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                    help="compute dtype (default: the run's)")
    args = ap.parse_args(argv)
    from experiments.common import is_hf_checkpoint, run_tokenizer
    from jaxformers.training import CheckpointError, evaluate

    run = args.run
    try:
        if is_hf_checkpoint(args.run):
            if not args.data:
                ap.error("--run with a Hugging Face checkpoint needs --data (text to evaluate on)")
            args.tokenizer = run_tokenizer(ap, args.run, "hf", args.tokenizer)
            from jaxformers.convert import from_hf
            run = from_hf(args.run)
            if args.seq_len is None:
                args.seq_len = min(run[0].max_seq_len, 1024)
            if args.max_batches == -1:  # no run: the whole split
                args.max_batches = 0
        result = evaluate(run, args.data, tokenizer=args.tokenizer, split=args.split,
                          batch_size=args.batch_size, seq_len=args.seq_len,
                          max_batches=None if args.max_batches == 0 else args.max_batches,
                          mesh=args.mesh, dtype=args.dtype)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        if os.environ.get("JAXFORMERS_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax
    if jax.process_index() == 0:  # several processes (a multi-host launch): one report
        print(json.dumps({"run": args.run, "split": args.split, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
