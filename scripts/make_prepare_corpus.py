"""A synthetic .jsonl corpus and a GPT-2-style tokenizer.json, to measure ``experiments.prepare``
(BENCHMARKS.md, "Preparing a corpus of .jsonl shards"):

    python scripts/make_prepare_corpus.py /tmp/c200 200      # /tmp/c200/corpus (4 shards), /tmp/c200/tok
    /usr/bin/time -f "%e s %M KB" python -m experiments.prepare --data /tmp/c200/corpus \\
        --tokenizer hf:/tmp/c200/tok --out /tmp/c200-hf --force

Documents are 200-1200 words of a Zipf-distributed 20,000-word vocabulary with line breaks
(drawn from a pool of 3000, each with a distinct suffix); the tokenizer is a byte-level BPE of
8192 tokens trained on the pool, with ``<|endoftext|>``.  Deterministic (seed 0).
"""
import json
import sys
from pathlib import Path

import numpy as np


def main(root: str, megabytes: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = Path(root)
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(20000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()

    def doc():
        lines, line = [], []
        for w in rng.choice(len(words), int(rng.integers(200, 1200)), p=zipf):
            line.append(words[w])
            if rng.random() < 0.08:
                lines.append(" ".join(line) + ".")
                line = []
        lines.append(" ".join(line))
        return "\n".join(lines)

    pool = [doc() for _ in range(3000)]
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    for s in range(4):
        with open(root / "corpus" / f"shard{s}.jsonl", "w") as f:
            size = 0
            while size < megabytes * 1024 * 1024 // 4:
                line = json.dumps({"id": size, "text": pool[int(rng.integers(len(pool)))] + f" {size}"}) + "\n"
                f.write(line)
                size += len(line)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(pool, trainer=trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (root / "tok").mkdir(exist_ok=True)
    tok.save(str(root / "tok" / "tokenizer.json"))
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
