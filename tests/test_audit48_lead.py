"""Audit 48 (lead): regression tests for the fixes made outside the helpers' scopes."""
import json
import struct

import numpy as np
import pytest

from jaxformers.convert.hf_io import read_header, read_safetensors


def _safetensors(path, entry, data=b"\0" * 16):
    header = json.dumps({"w": entry}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def test_read_header_accepts_a_well_formed_entry(tmp_path):
    path = _safetensors(tmp_path / "ok.safetensors", {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]})
    header, start = read_header(path)
    assert header["w"]["shape"] == [2, 2] and start > 8
    pytest.importorskip("safetensors")
    np.testing.assert_array_equal(read_safetensors(path)["w"], np.zeros((2, 2), np.float32))


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", "16"]},   # was a bare TypeError
    {"dtype": "F32", "shape": [2, 2], "data_offsets": [0.0, 16.0]},   # was accepted, then seek(float)
    {"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 16]},     # was read as shape [2, 2]
    {"dtype": "F32", "shape": ["2", 2], "data_offsets": [0, 16]},     # was read as shape [2, 2]
    {"dtype": "F32", "shape": [2, 2], "data_offsets": [False, 16]},   # a bool is not an offset
])
def test_read_header_refuses_non_integer_shapes_and_offsets(tmp_path, entry):
    path = _safetensors(tmp_path / "bad.safetensors", entry)
    with pytest.raises(ValueError, match="'w'.*non-negative integers"):
        read_header(path)
