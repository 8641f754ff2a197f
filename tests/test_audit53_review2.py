"""Audit 53, second review: regressions found.

* ``parse_size`` dropped every space inside a size string, so ``"1 000KB"`` / ``"5 G B"`` were read
  as sizes although ``huggingface_hub.parse_size_to_int`` (what ``save_pretrained`` uses, and what
  the docs say ``max_shard_size`` is read as) refuses them.
* A bfloat16 export of a weight beyond bfloat16's range was refused with advice to "export with
  dtype 'bfloat16'" -- the dtype that had just failed; it now says float32.
"""
import numpy as np
import pytest


@pytest.mark.parametrize("size", ["1 000KB", "5 G B", "1 0MB"])
def test_a_size_with_spaces_inside_the_number_or_unit_is_refused_as_huggingface_hub_refuses_it(size):
    from jaxformers.convert.hf_write import parse_size
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)  # was: 1000000 / 5e9 / 10e6


@pytest.mark.parametrize("size", ["5GB", " 5 gb ", "5 GB", "\t0.5KB\n", "1e3 kb", "5\u00a0MB", "1.1GB", "7Tb"])
def test_the_sizes_huggingface_hub_reads_are_read_the_same(size):
    from jaxformers.convert.hf_write import parse_size
    want = {"5GB": 5 * 10 ** 9, " 5 gb ": 5 * 10 ** 9, "5 GB": 5 * 10 ** 9, "\t0.5KB\n": 500,
            "1e3 kb": 10 ** 6, "5\u00a0MB": 5 * 10 ** 6, "1.1GB": int(1.1 * 10 ** 9), "7Tb": 7 * 10 ** 12}[size]
    assert parse_size(size) == want
    hub = pytest.importorskip("huggingface_hub.serialization._base")
    assert hub.parse_size_to_int(size) == want


def test_a_bfloat16_overflow_does_not_suggest_bfloat16():
    from jaxformers.convert.hf_write import cast_all
    w = np.array([np.finfo(np.float32).max, 1.0], np.float32)  # rounds to inf in bfloat16
    with pytest.raises(ValueError, match=r"w has max \|value\| 3\.40282e\+38, which overflows bfloat16") as e:
        cast_all({"w": w}, "bfloat16")
    assert "dtype 'float32'" in str(e.value) and "'bfloat16' (" not in str(e.value)
    with pytest.raises(ValueError, match=r"overflows float16 .*dtype 'bfloat16' \(float32's range\) or 'float32'"):
        cast_all({"w": np.array([65520.0], np.float32)}, "float16")
    assert cast_all({"w": w}, "float32")["w"].dtype == np.float32


def test_parse_size_takes_a_float_of_bytes():
    """A float ``max_shard_size`` (``5e9``) is bytes, rounded down (an integer tensor size fits under
    ``1.5`` exactly when it fits under ``1``); nan / inf are refused."""
    from jaxformers.convert.hf_write import parse_size
    assert parse_size(5e9) == 5_000_000_000 and parse_size(np.float32(2048.0)) == 2048
    assert parse_size(1.5) == 1
    for bad in (float("nan"), float("inf"), -1.0, 0.5):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)
