"""Evaluate a trained run: prints {"val_loss", "val_ppl", "val_tokens", "stride"} as JSON.

    python -m experiments.evaluate --run runs/gpt-tiny
    python -m experiments.evaluate --run runs/gpt-tiny --max-batches 0      # the whole val split
    python -m experiments.evaluate --run runs/gpt-tiny --data path/to/texts --split val
    python -m experiments.evaluate --run hf/llama-tiny --data shakespeare   # a HF checkpoint directory
    python -m experiments.evaluate --run runs/landmark-tiny --seq-len 4096 --memory-chunk 96
    python -m experiments.evaluate --run runs/gpt-tiny --stride 64          # sliding-window perplexity

Defaults (batch size, sequence length, number of batches, data) are the run's,
so the result matches the run's final ``val_loss`` in ``summary.json``.
``--run`` may also be a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Mamba / Mamba-2 checkpoint directory
(e.g. one written by ``experiments.export``): then ``--data`` is required, the tokenizer is
``--tokenizer`` or the directory's ``tokenizer.json``, and the defaults are batch size 8,
``min(max_position_embeddings, 1024)`` tokens per sequence (1024 for Mamba, which has no
position limit) and the whole split.
A run trained here evaluates ``--data`` with its own tokenizer (its saved ``tokenizer/``
vocabulary, not a new BPE trained on ``--data``) unless ``--tokenizer`` says otherwise; a
tokenizer whose vocabulary is larger than the model's is refused (its ids would give NaN).
``--memory-chunk C`` (landmark models, as ``experiments.generate --memory-chunk``): the loss is
read through the retrieval memory (each token attends to its chunk of ``C`` positions and the
``--memory-top-k`` blocks it retrieves from everything before it; the model's ``mem_chunk_len`` /
``mem_top_k``), so ``--seq-len`` may exceed the trained length: long-context perplexity.
``--stride S`` (``1 <= S <= --seq-len``; default: the sequence length, non-overlapping windows,
the run's ``val_loss``): strided ("sliding-window") perplexity, computed as Hugging Face's
"Perplexity of fixed-length models": windows of ``--seq-len`` tokens start every ``S`` tokens and
each scores only the tokens the previous window did not, so every token after the first window is
predicted from at least ``seq_len - S`` tokens of context (a lower, comparable perplexity; ``S``
times fewer tokens per forward pass).  The tokens scored are the same as without ``--stride``: the
split's tokens up to its last full ``--seq-len`` window (the shorter tail is skipped, as always;
the last strided window is moved back to end there), each scored exactly once (``val_tokens``).
``--max-batches N`` counts the strided batches (more windows per token); the default ``-1`` scores
the run's evaluation tokens, in as many batches as they take.  Text data only (not ``synthetic:``
rows); windows cross end-of-text tokens as without ``--stride``; with ``--memory-chunk`` every
window is read through the memory on its own (any ``S`` fits).  The overlapping context is masked
through the batch's ``loss_mask``: a loss of your own that ignores it is refused (an error naming it),
as it is when ``--batch-size`` does not divide the evaluation windows (the last batch's rows past
them weigh 0 through ``loss_mask`` only).
``--import MODULE`` (repeatable): a run of your own architecture, registered by that module.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _run_seq_len(run):
    """The sequence length a run directory trained with (what ``evaluate`` defaults ``--seq-len`` to), or
    ``None`` when its config cannot be read (``evaluate`` then says why)."""
    from jaxformers.training import TrainConfig
    from jaxformers.training.rundir import read_config

    try:
        return TrainConfig.from_dict(read_config(run)["train"]).seq_len
    except Exception:  # noqa: BLE001 - not a run directory / a broken config: evaluate() names the problem
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run directory written by experiments.train, or a HF "
                    "Llama/Mistral/Qwen2/Qwen3/Mamba/Mamba-2 checkpoint directory")
    ap.add_argument("--data", help="corpus / prepared dataset dir (default: the run's)")
    ap.add_argument("--tokenizer", help="tokenizer for --data (default: the run's; for a HF checkpoint "
                                        "its tokenizer.json)")
    ap.add_argument("--split", default="val", choices=["val", "train"])
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--max-batches", type=int, default=-1,
                    help="-1: the run's validation set (its eval_batches full batches, whatever its "
                         "grad_accum and whatever --batch-size reads them); 0: all")
    ap.add_argument("--stride", type=int, metavar="S",
                    help="sliding-window perplexity: windows of --seq-len tokens every S tokens, each scoring "
                         "only its last S tokens (the first window all), 1 <= S <= --seq-len (default: "
                         "--seq-len, non-overlapping windows as the run's val_loss); the run's loss must weight "
                         "its targets by loss_mask (checked)")
    ap.add_argument("--mesh", help="e.g. data=2 (default: all devices on data)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                    help="compute dtype (default: the run's)")
    ap.add_argument("--memory-chunk", type=int, metavar="C",
                    help="landmark models: read the loss through the retrieval memory in chunks of C model "
                         "positions (a multiple of the landmark block); --seq-len may then exceed the trained length")
    ap.add_argument("--memory-top-k", type=int, metavar="K",
                    help="with --memory-chunk: blocks retrieved per token and head (default: the model's mem_top_k)")
    from experiments.common import add_import_flag, import_or_exit
    add_import_flag(ap)
    args = ap.parse_args(argv)
    import_or_exit(ap, args)  # your own architecture: the module that registers it
    if args.memory_top_k is not None and args.memory_chunk is None:
        ap.error("--memory-top-k needs --memory-chunk")
    # usage errors name the flag (evaluate() would name its parameter: batch_size, max_batches)
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--stride", args.stride)):
        if value is not None and value < 1:
            ap.error(f"{flag} must be >= 1, got {value}" + (" (stride: 1 <= S <= --seq-len)"
                                                            if flag == "--stride" else ""))
    if args.stride is not None and args.seq_len is not None and args.stride > args.seq_len:
        ap.error(f"--stride must be 1 <= S <= --seq-len = {args.seq_len}, got {args.stride}")
    if args.max_batches < -1:
        ap.error(f"--max-batches must be -1 (the run's validation set), 0 (all) or >= 1, got {args.max_batches}")
    from experiments.common import is_hf_checkpoint, run_tokenizer
    from jaxformers.training import CheckpointError, evaluate

    args.run = os.path.expanduser(args.run)  # as load_run reads it (a "~" the shell left alone)
    run = args.run
    overrides = None
    seq_len_given = args.seq_len
    try:
        if is_hf_checkpoint(args.run):
            if not args.data:
                ap.error("--run with a Hugging Face checkpoint needs --data (text to evaluate on)")
            args.tokenizer = run_tokenizer(ap, args.run, "hf", args.tokenizer)
            from jaxformers.convert import from_hf
            from experiments.generate import hf_position_limit
            model_config, params = from_hf(args.run)
            limit = hf_position_limit(args.run, model_config)
            if args.seq_len is None:
                args.seq_len = min(limit or 1024, 1024)
            if limit is None:  # Mamba: no position limit (max_seq_len is only the preset's)
                model_config = model_config.replace(max_seq_len=max(args.seq_len, model_config.max_seq_len))
            run = (model_config, params)
            if args.max_batches == -1:  # no run: the whole split
                args.max_batches = 0
        if args.stride is not None and seq_len_given is None:  # the default --seq-len: the range named by the flag
            seq_len = args.seq_len if args.seq_len is not None else _run_seq_len(args.run)  # HF: set above
            if seq_len is not None and args.stride > seq_len:
                ap.error(f"--stride must be 1 <= S <= --seq-len = {seq_len} (the default: "
                         f"{'the checkpoint' if args.seq_len is not None else 'the run'}'s; pass a longer --seq-len "
                         f"for a larger stride), got {args.stride}")
        data = args.data
        if not is_hf_checkpoint(args.run) and (args.data or args.tokenizer):
            from pathlib import Path
            from jaxformers.training.init_from import source_config, source_kind
            source_kind(args.run, name="--run")
            model_config, run_tok = source_config(args.run)
            if args.tokenizer is None:  # other text: the run's own vocabulary, not a new BPE on it
                args.tokenizer = run_tok
            data = data or json.loads((Path(args.run) / "config.json").read_text())["train"].get("data")
        if args.memory_chunk is not None:
            from experiments.generate import with_memory_decoding
            from jaxformers.training.init_from import source_config
            base = run[0] if isinstance(run, tuple) else source_config(args.run)[0]
            memory = with_memory_decoding(base, args.memory_chunk, args.memory_top_k)
            overrides = {"mem_chunk_len": memory.mem_chunk_len, "mem_top_k": memory.mem_top_k}
        if data and args.tokenizer:
            from jaxformers.data import open_data
            vocab = getattr(open_data(data, args.tokenizer), "vocab_size", None)
            if vocab is not None and vocab > model_config.vocab_size:
                raise ValueError(f"--data {data} tokenized with --tokenizer {args.tokenizer} has "
                                 f"vocab_size={vocab}, larger than the model's vocab_size={model_config.vocab_size} "
                                 "(ids past it have no embedding): pass the model's tokenizer")
        result = evaluate(run, args.data, tokenizer=args.tokenizer, split=args.split,
                          batch_size=args.batch_size, seq_len=args.seq_len,
                          max_batches=None if args.max_batches == 0 else args.max_batches,
                          mesh=args.mesh, dtype=args.dtype, model_overrides=overrides, stride=args.stride)
    except Exception as e:  # noqa: BLE001 - the expected failures become one line, exit 2
        from experiments.common import is_out_of_memory
        expected = isinstance(e, (CheckpointError, ValueError, OSError))  # OSError: a path unreadable, ...
        # an allocation failure from XLA (an expected error naming, say, a run "runs/oom" is not one)
        oom = not expected and is_out_of_memory(e)
        if not (expected or oom) or os.environ.get("JAXFORMERS_DEBUG", "") not in ("", "0"):
            raise
        if oom:  # e.g. full attention over a long --seq-len: [batch, heads, T, T] scores per layer
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            batch, seq = (args.batch_size or "(the run's)"), (args.seq_len or "(the run's)")
            e = (f"out of memory evaluating --batch-size {batch} x --seq-len {seq} ({first}): lower "
                 "--batch-size or --seq-len (a landmark run evaluates any length through its memory: "
                 "--memory-chunk C)")
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax
    if jax.process_index() == 0:  # several processes (a multi-host launch): one report
        print(json.dumps({"run": args.run, "split": args.split, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
