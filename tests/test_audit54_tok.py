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


@pytest.mark.parametrize("vocab", [2.5, "300", True, 0, -5])
def test_bpe_vocab_must_be_an_int(vocab):
    # 300.7 was truncated to 300, "300" parsed, -5 kept as spec 'bpe:-5'
    with pytest.raises(ValueError, match="vocab"):
        BPETokenizer(vocab)


@pytest.mark.parametrize("vocab", [100, 257])
def test_bpe_train_refuses_a_vocab_below_the_byte_alphabet(vocab):
    # trained silently to 257 tokens (only a warning, 'a larger text gives more')
    with pytest.raises(ValueError, match=r"vocab must be in \[258"):
        BPETokenizer(vocab).train(CORPUS)


def test_bpe_small_tokenizer_json_still_loads(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = BPETokenizer(258).train(["ab"])
    assert tok.vocab_size == 257
    tok._require().save(str(tmp_path / "tokenizer.json"))  # a bare tokenizer.json, no config
    assert BPETokenizer.from_file(tmp_path / "tokenizer.json").encode("abc") == tok.encode("abc")


@pytest.mark.parametrize("n_tokens", [100.5, -3, True, "100"])
def test_strided_windows_n_tokens_must_be_a_count(n_tokens):
    # 100.5 was truncated to 100, -3 / True gave no windows, "100" was parsed
    from jaxformers.data.loader import strided_windows
    with pytest.raises(ValueError, match="n_tokens"):
        strided_windows(n_tokens, 10, 5)


def test_strided_windows_numpy_count_still_accepted():
    import numpy as np
    from jaxformers.data.loader import strided_windows
    starts, first = strided_windows(np.int64(21), 10, 5)
    assert starts.tolist() == [0, 5, 10] and first.tolist() == [1, 6, 6]


def _three_tokenizers(tmp_path):
    from jaxformers.data.tokenizer import ByteTokenizer, HFTokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bpe = BPETokenizer(300).train(CORPUS)
    bpe.save(tmp_path)
    return [ByteTokenizer(), bpe, HFTokenizer(tmp_path)]


def test_encode_arrays_refuses_a_single_string(tmp_path):
    # "hello world" was encoded as 11 one-character texts (BPE: no merges, other ids than encode)
    for tok in _three_tokenizers(tmp_path):
        with pytest.raises(ValueError, match="encode_arrays expects an iterable of texts"):
            tok.encode_arrays("hello world")
        assert tok.encode_arrays(["hello world"])[0].tolist() == tok.encode("hello world")


@pytest.mark.parametrize("bad", [2.5, True, 0, "abc"])
def test_save_hf_tokenizer_model_max_length_checked(tmp_path, bad):
    # 2.5 was written as 2, True as 1, 0 kept, "abc" an int() error not naming the argument
    from jaxformers.convert.hf_tokenizer import save_hf_tokenizer
    from jaxformers.data.tokenizer import ByteTokenizer
    with pytest.raises(ValueError, match="model_max_length"):
        save_hf_tokenizer(ByteTokenizer(), str(tmp_path / "out"), model_max_length=bad)
    assert not (tmp_path / "out").exists()


def test_save_hf_tokenizer_model_max_length_written(tmp_path):
    import json

    import numpy as np
    from jaxformers.convert.hf_tokenizer import save_hf_tokenizer
    from jaxformers.data.tokenizer import ByteTokenizer
    save_hf_tokenizer(ByteTokenizer(), str(tmp_path), model_max_length=np.int64(128))
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 128


@pytest.mark.parametrize("spec", ["hf:", "hf: ", " hf:  "])
def test_hf_spec_without_a_directory_is_refused(tmp_path, monkeypatch, spec):
    # "hf:" (e.g. hf:$DIR with DIR unset) silently loaded the working directory's tokenizer.json
    from jaxformers.data.tokenizer import get_tokenizer, parse_tokenizer_spec
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BPETokenizer(300).train(CORPUS).save(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="hf:DIR needs a directory"):
        parse_tokenizer_spec(spec)
    with pytest.raises(ValueError, match="hf:DIR needs a directory"):
        get_tokenizer(spec)
    assert get_tokenizer("hf:.").spec == f"hf:{tmp_path.resolve()}"


@pytest.mark.parametrize("flag", ["False", "no", 1, None])
def test_decode_skip_special_must_be_a_bool(tmp_path, flag):
    # byte / bpe: "False" (truthy) silently dropped the end-of-text marker; hf: a TypeError
    for tok in _three_tokenizers(tmp_path):
        ids = tok.encode("ab") + [tok.eos_id] + tok.encode("cd")
        with pytest.raises(ValueError, match=r"skip_special must be a bool \(True/False\)"):
            tok.decode(ids, skip_special=flag)
        assert tok.decode(ids, skip_special=True) == "abcd"
        assert tok.decode(ids) == "ab<|endoftext|>cd"


@pytest.mark.parametrize("eos_id", [True, 10 ** 6, -1, "0", 1.0])
def test_hf_config_eos_id_must_be_a_token_id(tmp_path, eos_id):
    # True was read as id 1, 10**6 / -1 as end-of-text ids with no token (then put between documents)
    import json

    from jaxformers.data.tokenizer import HFTokenizer
    _three_tokenizers(tmp_path)  # a saved BPE directory: tokenizer.json + tokenizer_config.json
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert HFTokenizer(tmp_path).eos_id == cfg["eos_id"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(cfg, eos_id=eos_id)))
    with pytest.raises(ValueError, match="eos_id"):
        HFTokenizer(tmp_path)


def test_load_config_without_type_or_tokenizer_json(tmp_path):
    # a HF directory with only tokenizer_config.json (+ tokenizer.model): "unknown tokenizer type None"
    import json

    from jaxformers.data.tokenizer import load_tokenizer
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="has no 'type' .* has no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"type": "wordpiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer type 'wordpiece'; allowed: 'byte', 'bpe', 'hf'"):
        load_tokenizer(tmp_path)
