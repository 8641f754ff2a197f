"""Sample text from a trained run with KV-cache decoding.

    python -m experiments.generate --run runs/gpt-tiny --prompt "ROMEO:" --max-new-tokens 200
    python -m experiments.generate --run runs/gpt-tiny --prompt "To be" --top-k 40 --num-samples 3
    python -m experiments.generate --run runs/gpt-tiny --prompt "ROMEO:" --stop-at-eos
    python -m experiments.generate --run runs/gpt-tiny --prompt-file prompts.txt --json
    python -m experiments.generate --run hf/llama-tiny --prompt "ROMEO:"   # a HF checkpoint directory
    python -m experiments.generate --run runs/landmark-tiny --prompt-file long.txt --memory-chunk 96

``--run`` may be a run directory or a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Mamba / Mamba-2 checkpoint directory
with a ``tokenizer.json`` (e.g. one written by ``experiments.export``).  ``--import MODULE``
(repeatable): a run of your own architecture, registered by that module.

``--prompt-file``: one prompt per line (LF or CRLF line ends only; blank lines skipped), all sampled in one batch
(``generate(prompt_lengths=...)``: prompts of different lengths, each row decoded as if alone);
the JSON output then has ``prompts`` and ``samples`` (a list of ``--num-samples`` texts per prompt).

An empty prompt starts from the end-of-text token (the start of a document).
``--stop-at-eos`` ends each sample at the tokenizer's end-of-text token (not printed);
decoding stops once every sample has reached it.
The prompt is cut from the left if prompt + new tokens exceed the model's
``max_seq_len`` (a HF checkpoint's ``max_position_embeddings``; none for HF Mamba / Mamba-2;
for a landmark model, ``max_seq_len`` less its landmark positions: ``jf.generate`` inserts the
landmarks itself, and they never appear in the samples).
``--mesh SPEC`` (e.g. ``tensor=2``, ``data=2,tensor=2``): decode on several devices
(:func:`jaxformers.generate`'s ``mesh``: the params split as in training, the prompts' rows over
the batch axes, the KV cache with them); the samples are those of one device.
``--memory-chunk C`` (landmark models): decode through the retrieval memory (the model's
``mem_chunk_len``; ``--memory-top-k`` its ``mem_top_k``): each token attends to its chunk of
``C`` model positions and the top-k blocks retrieved from everything before it, at positions
below ``top_k * landmark_block + C``, which must fit ``max_seq_len``; prompt and samples then
have no length limit and are never cut (also for a run whose config sets ``mem_chunk_len``).
Samples are decoded together with the prompt's ids (then cut after the
prompt's text), so SentencePiece-style ``hf:`` tokenizers keep the space after the prompt;
prompt bytes that are not UTF-8 become U+FFFD.
A model whose logits cannot be sampled from (NaN or +inf: a diverged or broken run) is an error
naming the prompt and the new token (exit status 1), never a sample of arbitrary tokens.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path


def _continuation(tok, prompt_ids, new_ids, has_prompt: bool) -> str:
    """The text of ``new_ids`` as it reads after the prompt: decoded together with the prompt ids
    and cut after the prompt's text, since some tokenizers decode a token differently at the start
    of a text (SentencePiece-style ``hf:`` tokenizers drop the space of a leading ``▁``, so
    "hello" + "▁world" alone would read "helloworld").  With no prompt the samples start a
    document, decoded on their own."""
    new_ids = [int(i) for i in new_ids]
    if not has_prompt:
        return tok.decode(new_ids)
    head = tok.decode(list(prompt_ids))
    full = tok.decode(list(prompt_ids) + new_ids)
    return full[len(head):] if full.startswith(head) else tok.decode(new_ids)


def _prompt_text(prompt: str) -> str:
    """``--prompt`` as valid text: bytes that are not UTF-8 (which Python keeps as lone surrogates
    in ``sys.argv``) become U+FFFD, with a warning, as in ``.txt`` corpora."""
    try:
        prompt.encode("utf-8")
        return prompt
    except UnicodeEncodeError:
        try:
            fixed = prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
            fixed = re.sub("[\ud800-\udfff]", "\ufffd", prompt)
        print("warning: --prompt is not valid UTF-8; invalid bytes were replaced by U+FFFD", file=sys.stderr)
        return fixed


def hf_position_limit(directory, model_config):
    """The position limit of a HF checkpoint converted to ``model_config``: its ``max_seq_len``
    (``max_position_embeddings``), or None for Mamba / Mamba-2, which have none (the converted
    config's ``max_seq_len`` is only a preset's)."""
    cfg = json.loads((Path(directory) / "config.json").read_text())
    return None if cfg.get("model_type") in ("mamba", "mamba2") else int(model_config.max_seq_len)


def with_memory_decoding(model_config, chunk, top_k):
    """``model_config`` decoding through its retrieval memory (``--memory-chunk`` /
    ``--memory-top-k``); ``ValueError`` naming the option for a model without one, a chunk that is
    not a multiple of its block, or chunk + retrieved blocks beyond ``max_seq_len``."""
    from jaxformers.models.landmark import LandmarkConfig
    if not isinstance(model_config, LandmarkConfig):
        raise ValueError(f"--memory-chunk needs a landmark model (a retrieval memory), got model "
                         f"{model_config.model!r}")
    L = model_config.landmark_block
    if chunk < L or chunk % L:
        raise ValueError(f"--memory-chunk must be a positive multiple of landmark_block={L}, got {chunk}")
    top_k = model_config.mem_top_k if top_k is None else top_k
    if top_k < 1:
        raise ValueError(f"--memory-top-k must be >= 1, got {top_k}")
    if top_k * L + chunk > model_config.max_seq_len:
        raise ValueError(f"--memory-chunk {chunk} + {top_k} retrieved blocks of landmark_block={L} use "
                         f"{top_k * L + chunk} positions, more than max_seq_len={model_config.max_seq_len}: "
                         "use a smaller --memory-chunk or --memory-top-k")
    return model_config.replace(mem_chunk_len=chunk, mem_top_k=top_k)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run directory written by experiments.train, or a HF "
                    "Llama/Mistral/Qwen2/Qwen3/Mamba/Mamba-2 checkpoint directory")
    ap.add_argument("--prompt", default="", help="text to continue")
    ap.add_argument("--prompt-file", help="a text file with one prompt per line (blank lines skipped), "
                                          "sampled together in one batch; excludes --prompt")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="end each sample at the end-of-text token (the end of a document)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of plain text")
    ap.add_argument("--memory-chunk", type=int, metavar="C",
                    help="landmark models: decode through the retrieval memory in chunks of C model positions "
                         "(a multiple of landmark_block): no length limit")
    ap.add_argument("--memory-top-k", type=int, metavar="K",
                    help="with --memory-chunk: blocks retrieved per token and head (default: the model's mem_top_k)")
    ap.add_argument("--mesh", help="decode on several devices, e.g. tensor=2 or data=2,tensor=2: the params "
                                   "split as in training, the prompts' rows over data/fsdp/expert "
                                   "(default: one device)")
    from experiments.common import add_import_flag, import_or_exit
    add_import_flag(ap)
    args = ap.parse_args(argv)
    import_or_exit(ap, args)  # your own architecture: the module that registers it
    args.run = os.path.expanduser(args.run)  # as load_run reads it (a "~" the shell left alone)
    if args.memory_top_k is not None and args.memory_chunk is None:
        ap.error("--memory-top-k needs --memory-chunk")
    # usage errors name the flag (jf.generate would name its parameter: top_k, max_new_tokens)
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        ap.error(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        ap.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        ap.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.seed < 2**32:  # jax.random.PRNGKey wraps: PRNGKey(2**32) == PRNGKey(0)
        ap.error(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.prompt_file is not None:
        if args.prompt:
            ap.error("--prompt and --prompt-file exclude each other")
        try:
            raw = Path(args.prompt_file).read_bytes().decode("utf-8", "surrogateescape")
        except OSError as e:
            print(f"error: --prompt-file: {e}", file=sys.stderr)
            return 2
        # lines end at "\n" (or "\r\n") only: str.splitlines would also split a prompt at a form
        # feed, U+2028, U+0085, ... inside it
        lines = [line.removesuffix("\r") for line in raw.split("\n")]
        prompts = [_prompt_text(line) for line in lines if line.strip()]
        if not prompts:
            print(f"error: --prompt-file {args.prompt_file} has no prompt (every line is blank)", file=sys.stderr)
            return 2
    else:
        prompts = [_prompt_text(args.prompt)]

    import jax
    import numpy as np
    import jaxformers as jf
    from jaxformers.data import Tokenizer, load_tokenizer
    from jaxformers.decoding import NonFiniteLogitsError, max_raw_tokens
    from jaxformers.training import CheckpointError, load_run
    from jaxformers.data import open_data
    from jaxformers.training.rundir import TOKENIZER_DIR
    from experiments.common import is_hf_checkpoint

    try:
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        mesh = None
        if args.mesh and args.mesh.strip():  # a blank --mesh is none, as in training
            from jaxformers.training import make_mesh
            mesh = make_mesh(args.mesh, devices=jax.local_devices())  # decoding runs in this process
        if is_hf_checkpoint(args.run):  # a HF checkpoint directory (e.g. from experiments.export)
            from jaxformers.convert import from_hf
            from jaxformers.data.tokenizer import HFTokenizer
            if not (Path(args.run) / "tokenizer.json").is_file():
                raise ValueError(f"--run {args.run} is a Hugging Face checkpoint without a tokenizer.json "
                                 "to encode the prompt")
            model_config, params = from_hf(args.run)
            tok = HFTokenizer(args.run)
            limit = hf_position_limit(args.run, model_config)
        else:
            model_config, train_config, params = load_run(args.run, mesh=mesh)
            tok_dir = Path(args.run) / TOKENIZER_DIR
            if tok_dir.is_dir():
                tok = Tokenizer.load(tok_dir)
            else:  # older runs: the dataset's tokenizer
                source = open_data(train_config.data, train_config.tokenizer)
                if source.ds_dir is None:
                    raise ValueError(f"{args.run} was trained on {train_config.data!r}, which has no "
                                     "tokenizer to encode a prompt or decode samples")
                tok = load_tokenizer(source.ds_dir)
            limit = model_config.max_seq_len
        if args.memory_chunk is not None:  # positions stay below top_k * L + chunk, whatever the length
            model_config = with_memory_decoding(model_config, args.memory_chunk, args.memory_top_k)
        if getattr(model_config, "mem_chunk_len", None) is not None:  # the option's, or the run's config's
            limit = None
        module = jf.build(model_config.replace(dtype="float32", param_dtype="float32"))
        raw = None if limit is None else max_raw_tokens(module, limit)  # e.g. landmarks take positions
        what = (f"max_seq_len={limit}" if raw == limit
                else f"{raw} (max_seq_len={model_config.max_seq_len} less the landmark positions)")
        limit = raw
        if limit is not None and args.max_new_tokens >= limit:
            raise ValueError(f"--max-new-tokens must be < {what}, got {args.max_new_tokens}")
        # each prompt cut from the left so that it and the new tokens fit max_seq_len (if any)
        keep = None if limit is None else limit - args.max_new_tokens
        ids = [(tok.encode(text) if text else [tok.eos_id]) for text in prompts]
        for text, prompt_ids in zip(prompts, ids):
            if not len(prompt_ids):  # (a tokenizer that drops every character of it)
                raise ValueError(f"--prompt {text!r} encodes to no tokens with the tokenizer of {args.run}")
        ids = [i if keep is None else i[-keep:] for i in ids]
        eos_id = None
        if args.stop_at_eos:
            eos_id = getattr(tok, "eos_id", None)
            if eos_id is None:
                raise ValueError(f"--stop-at-eos: the tokenizer of {args.run} has no end-of-text token")
        lengths = np.asarray([len(i) for i in ids], np.int32)
        prompt = np.zeros((len(ids), int(lengths.max())), np.int32)  # right-padded; the padding is never read
        for row, prompt_ids in zip(prompt, ids):
            row[:len(prompt_ids)] = prompt_ids
        # a model vocab padded above the tokenizer's: never sample the padding ids (they have no text)
        vocab_limit = tok.vocab_size if tok.vocab_size < model_config.vocab_size else None
        sampled = model_config.vocab_size if vocab_limit is None else vocab_limit
        if args.top_k is not None and args.top_k > sampled:
            raise ValueError(f"--top-k must be <= {sampled} (the ids the model samples from: its "
                             f"{'tokenizer' if vocab_limit is not None else 'model'} vocab_size), got {args.top_k}")
        out = jf.generate(module, {"params": params}, prompt, args.max_new_tokens,  # one shared prefill
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          rng=jax.random.PRNGKey(args.seed), num_samples=args.num_samples,
                          vocab_limit=vocab_limit, eos_id=eos_id,
                          prompt_lengths=None if len(ids) == 1 else lengths, mesh=mesh)
        out = np.asarray(out)
        k = args.num_samples
        texts = []
        for r, row in enumerate(out):  # rows r // k continue prompt r // k
            n = len(ids[r // k])
            row = row[n:n + args.max_new_tokens]
            if eos_id is not None and (row == eos_id).any():  # each sample ends before its first end-of-text
                row = row[:int(np.argmax(row == eos_id))]
            texts.append(_continuation(tok, ids[r // k], row, bool(prompts[r // k])))
    except (CheckpointError, ValueError, OSError) as e:  # OSError: e.g. a path that cannot be read or written
        if os.environ.get("JAXFORMERS_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLogitsError as e:  # the model, not the command: NaN / inf logits
        if os.environ.get("JAXFORMERS_DEBUG", "") not in ("", "0"):
            raise
        k = args.num_samples
        where = f"prompt {e.row // k}" + (f", sample {e.row % k}" if k > 1 else "")
        print(f"error: {e} (row {e.row} is {where}; the run {args.run} cannot be sampled from)",
              file=sys.stderr)
        return 1
    if args.prompt_file is None:
        if args.json:
            print(json.dumps({"prompt": prompts[0], "samples": texts}))
        else:
            for i, text in enumerate(texts):
                if k > 1:
                    print(f"--- sample {i}")
                print(prompts[0] + text)
    elif args.json:
        print(json.dumps({"prompts": prompts, "samples": [texts[i * k:(i + 1) * k] for i in range(len(prompts))]}))
    else:
        for r, text in enumerate(texts):
            print(f"--- prompt {r // k}" + (f" sample {r % k}" if k > 1 else ""))
            print(prompts[r // k] + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
