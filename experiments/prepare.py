"""Prepare a tokenized dataset; prints a JSON summary.

    python -m experiments.prepare --data shakespeare --tokenizer byte
    python -m experiments.prepare --data path/to/folder --tokenizer bpe:8192 --out /tmp/ds
    python -m experiments.prepare --data my.txt --tokenizer hf:path/to/hf_llama   # its tokenizer.json
    python -m experiments.prepare --data shards/ --tokenizer hf:path/to/hf_llama --text-field content
        # a folder of .jsonl(.gz/.zst) / .parquet shards whose text is in "content"; then
        # python -m experiments.train --data <the printed out_dir> ...

A local corpus is read a document at a time (memory does not grow with it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jaxformers.data.corpus import list_corpora
from jaxformers.data.prepare import check_split_args, load_prepared, prepare


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="default",
                    help=f"built-in corpus ({', '.join(list_corpora())}; 'default' = shakespeare), "
                         "a folder of .txt/.jsonl files (also .txt.gz, .jsonl.gz, .txt.zst, .jsonl.zst, "
                         ".parquet), such a file, or hf:NAME[:SPLIT]")
    ap.add_argument("--tokenizer", default="byte", help="byte | bpe | bpe:VOCAB | hf:DIR (default: byte)")
    ap.add_argument("--out", default=None, help="output folder (default: <cache>/datasets/<data>-<tokenizer>, plus -val<F>-seed<S> for a split "
                                             "other than the default 0.05 / 0)")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if an up-to-date copy exists")
    ap.add_argument("--text-field", default="text",
                    help="the field of .jsonl records / the column of .parquet files and hf: datasets that "
                         "holds the text (default: text; another one is part of the dataset's identity and "
                         "adds -field-NAME to the default --out)")
    args = ap.parse_args(argv)
    from experiments.common import check_out
    check_out(ap, args.out)  # a file in the way: before any tokenizing (was an [Errno 17] at the end)
    try:  # prepare()'s rule, as a usage error naming the flag (not the parameter)
        check_split_args(args.val_fraction, args.seed)
    except ValueError as e:
        name, _, rest = str(e).partition(" ")  # "val_fraction must be ..." / "seed must be ..."
        ap.error(f"--{name.replace('_', '-')} {rest}")
    t0 = time.perf_counter()
    try:
        out = prepare(args.data, args.tokenizer, out_dir=args.out, val_fraction=args.val_fraction,
                      seed=args.seed, force=args.force, text_field=args.text_field)
    except (ValueError, RuntimeError, OSError) as e:  # OSError: e.g. an --out that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta, _, _ = load_prepared(out)
    summary = {"out_dir": str(out), "seconds": round(time.perf_counter() - t0, 2)}
    summary.update({k: meta[k] for k in ("source", "tokenizer", "vocab_size", "dtype", "n_tokens",
                                         "n_documents", "split_method")})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
