"""A jaxformers tokenizer as a Hugging Face tokenizer directory (``AutoTokenizer``-loadable).

``save_hf_tokenizer(tok, out_dir)`` writes ``tokenizer.json`` (the ``tokenizers`` format) and
``tokenizer_config.json`` (``PreTrainedTokenizerFast`` with the end-of-text token as eos):

* ``bpe`` / ``hf:`` tokenizers already are ``tokenizers`` pipelines: their ``tokenizer.json``
  is written as is.
* ``byte``: ids 0..255 are the UTF-8 bytes, 256 the end-of-text token.  It becomes a
  byte-level BPE with no merges whose vocabulary puts byte ``b`` (as the byte-level alphabet
  writes it) at id ``b``, so ``encode`` gives the same ids.

Special tokens are never added around a text (no BOS), as jaxformers encodes for training: the
post-processor of a ``hf:`` tokenizer.json (e.g. Llama's ``<s>`` prefix) is dropped.
The literal text of a special token inside a document (``<|endoftext|>``, and a ``hf:``
tokenizer's ``</s>``, ``<unk>``, ...) is plain text to jaxformers (``encode_special_tokens``);
``tokenizer_config.json`` sets ``split_special_tokens`` so that ``AutoTokenizer`` encodes it so
too: every text encodes to the same ids.
"""
from __future__ import annotations

import json
import os

from ..data.tokenizer import EOS_TEXT, BPETokenizer, ByteTokenizer, HFTokenizer
from ..utils import int_arg

_CONFIG = "tokenizer_config.json"
_FILE = "tokenizer.json"


def _byte_level_chars() -> list:
    """The byte-level alphabet's character for each byte 0..255 (GPT-2's reversible map:
    printable Latin-1 bytes stand for themselves, the others shift to U+0100 and up)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _byte_pipeline():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in enumerate(_byte_level_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TEXT, special=True)])
    if tok.token_to_id(EOS_TEXT) != 256:  # pragma: no cover - tokenizers assigns the next id
        raise RuntimeError("the byte tokenizer's end-of-text token did not get id 256")
    return tok


def save_hf_tokenizer(tok, out_dir: str, *, model_max_length=None) -> str:
    """Write ``tok`` (a ``byte``, ``bpe`` or ``hf:`` tokenizer) as an ``AutoTokenizer``
    directory into ``out_dir``; returns the eos token's text."""
    if isinstance(tok, ByteTokenizer):
        pipeline = _byte_pipeline()
    elif isinstance(tok, (BPETokenizer, HFTokenizer)):
        from tokenizers import Tokenizer

        source = tok._require() if isinstance(tok, BPETokenizer) else tok._tok
        pipeline = Tokenizer.from_str(source.to_str())  # a copy: the live tokenizer stays as it is
        # jaxformers never adds special tokens when it encodes (no BOS: training and evaluation
        # saw none), so the export's AutoTokenizer must not either (a Llama tokenizer.json's
        # post-processor would prepend <s>)
        pipeline.post_processor = None
    else:
        raise ValueError(f"tokenizer {tok!r} has no Hugging Face form (expected byte, bpe or hf:)")
    if model_max_length is not None:  # checked before anything is written (2.5 is not read as 2)
        model_max_length = int_arg("model_max_length", model_max_length, lo=1, where="save_hf_tokenizer")
    eos = pipeline.id_to_token(tok.eos_id)
    if eos is None:  # pragma: no cover - every tokenizer here has its eos in the vocabulary
        raise ValueError(f"tokenizer {tok!r}: eos id {tok.eos_id} has no token")
    os.makedirs(out_dir, exist_ok=True)
    pipeline.save(os.path.join(out_dir, _FILE))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
           "pad_token": eos, "clean_up_tokenization_spaces": False, "split_special_tokens": True}
    if model_max_length is not None:
        cfg["model_max_length"] = model_max_length
    with open(os.path.join(out_dir, _CONFIG), "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
    return eos


__all__ = ["save_hf_tokenizer"]
