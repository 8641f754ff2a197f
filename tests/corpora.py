"""Small text corpora written for tests."""
import numpy as np

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()


def word_corpus(folder, n_docs: int = 4, n_words: int = 1500, seed: int = 0):
    """``folder`` (created) with ``doc{i}.txt`` files of random words from a 14-word vocabulary
    (repetitive: a tiny model learns it in a few steps, and context helps); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_docs):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, size=n_words)) + ".\n")
    return folder
