"""Audit 54: tokenizers and data loader regressions."""
import warnings

import pytest

from jaxformers.data.tokenizer import BPETokenizer

CORPUS = ["hello world hello world the quick brown fox " * 4]


def test_bpe_train_refuses_a_single_string():
    # a str is an iterable of characters: trained on one-character texts, no merges (vocab 257)
    with pytest.raises(ValueError, match="iterable of texts"):
        BPETokenizer(300).train(CORPUS[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert BPETokenizer(300).train(CORPUS).vocab_size > 257
