"""Reading Hugging Face checkpoints: config.json + safetensors (single, sharded, bf16).

Only numpy and ``safetensors`` are needed (no torch): bf16 tensors, which
safetensors' numpy backend cannot read, are widened to float32 from the raw bytes.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np

from ..utils import is_int, read_json_object

#: ``config.json``'s special-token ids: unknown to a model config (the run's tokenizer defines
#: them; ``experiments.export`` writes its end-of-text id over these).  An omitted key would read
#: as transformers' class default (Llama bos 1 / eos 2, Mamba 0 / 0 / 0, Mamba-2 bos 0 / eos 2 /
#: pad 1): ordinary tokens of this vocabulary (or ids past a tiny one) that generation would stop
#: at; null says that there is none.
NO_SPECIAL_TOKENS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


# --------------------------------------------------------------------------- config.json values
def hf_int(hf: dict, key: str, default=None) -> int:
    """``hf[key]`` (``default`` when absent or null) as an int: a ``ValueError`` naming the key
    for anything but an integer (``int()`` read 16.7 as 16, ``true`` as 1 and ``"64"`` as 64)."""
    value = hf.get(key)
    value = default if value is None else value
    if not (is_int(value) or (isinstance(value, float) and value.is_integer())):
        raise ValueError(f"config.json {key}={value!r} must be an integer")
    return int(value)


def hf_float(hf: dict, key: str, default=None) -> float:
    """``hf[key]`` (``default`` when absent or null) as a float: a ``ValueError`` naming the key
    for anything but a number (``float()`` read ``"1e-5"`` and ``true`` as numbers, which
    transformers' configs refuse)."""
    value = hf.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.json {key}={value!r} must be a number")
    return float(value)


def hf_bool(hf: dict, key: str, default=None) -> bool:
    """``hf[key]`` (``default`` when absent or null) as a bool: a ``ValueError`` naming the key
    for anything but true / false (``bool()`` read ``"false"`` and ``0.5`` as true)."""
    value = hf.get(key)
    value = default if value is None else value
    if not isinstance(value, bool):
        raise ValueError(f"config.json {key}={value!r} must be true or false")
    return value


# --------------------------------------------------------------------------- safetensors I/O
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
             "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def read_header(path: str) -> Tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file; ``ValueError`` naming the file when it is not
    one (a Git LFS pointer, a truncated download, a tensor with an unsupported dtype or with byte
    offsets that do not fit its shape or the file)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        if raw.startswith(b"version"):
            raise ValueError(f"{path} is a Git LFS pointer, not the weights: fetch them (git lfs pull) "
                             "or download the checkpoint with huggingface_hub")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path} is not a safetensors file, or is truncated: its header claims {n} "
                             f"bytes, the file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file (unreadable header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (the header is not a JSON object)")
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if not all(type(v) is int and v >= 0 for v in [*shape, begin, end]):  # not "4", 2.5 or True
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {entry!r} (its shape "
                             "and data_offsets must be non-negative integers)")
        if dtype not in _ITEMSIZE:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which cannot be read (supported: "
                             f"{sorted(_ITEMSIZE)}; quantized checkpoints need dequantizing first)")
        if end - begin != _ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64)) or not begin <= end:
            raise ValueError(f"{path}: tensor {name!r} ({dtype}, shape {shape}) has data_offsets "
                             f"{[begin, end]} that do not match its size")
        if end > data_size:
            raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {end} of the data, "
                             f"which holds {data_size} bytes (download it again)")
    return header, 8 + n


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays (bf16 widened to float32).
    ``ValueError`` naming the file when it is not a complete safetensors file (:func:`read_header`)."""
    from safetensors import safe_open

    header, data_start = read_header(path)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    bf16 = [k for k, v in entries.items() if v["dtype"] == "BF16"]
    out = {}
    if len(bf16) < len(entries):
        with safe_open(path, framework="np") as f:
            for key in f.keys():
                if entries[key]["dtype"] != "BF16":
                    out[key] = f.get_tensor(key)
    if bf16:
        with open(path, "rb") as fh:
            for key in bf16:
                begin, end = entries[key]["data_offsets"]
                fh.seek(data_start + begin)
                words = np.frombuffer(fh.read(end - begin), dtype="<u2")
                out[key] = (words.astype(np.uint32) << 16).view(np.float32).reshape(entries[key]["shape"])
    return out


def weight_files(path: str) -> Tuple[str, list]:
    """(directory holding config.json, safetensors files to read) for a dir or a file in it.
    A directory's ``model.safetensors`` is read before a sharded ``model.safetensors.index.json``,
    as transformers' ``from_pretrained`` does (both present: e.g. a single-file export written
    over a sharded checkpoint)."""
    if os.path.isdir(path):
        directory = path
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(single):
            return directory, [single]
        if os.path.exists(index):
            return directory, files_from_index(index)
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        if not files:
            pickled = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth")))
            raise FileNotFoundError(
                f"no *.safetensors weights in {directory}" + (
                    f" (it has {pickled[:3]}: torch pickles, which are not read; convert them with "
                    "transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) "
                    "writes model.safetensors)" if pickled else ""))
        return directory, [os.path.join(directory, f) for f in files]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    directory = os.path.dirname(os.path.abspath(path))
    if path.endswith(".index.json"):
        return directory, files_from_index(path)
    if path.endswith(".safetensors"):
        return directory, [path]
    if os.path.basename(path) == "config.json":
        return weight_files(directory)
    raise ValueError(f"{path}: expected a model directory, config.json, *.safetensors or *.index.json")


def read_hf_config(directory: str) -> dict:
    """``directory``'s ``config.json`` as a dict: ``FileNotFoundError`` without one, ``ValueError``
    naming the file for bad JSON (a Git LFS pointer, a truncated download) or a non-object (was a
    bare ``JSONDecodeError`` / an ``AttributeError``)."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json next to the weights in {directory}")
    return read_json_object(path, "not a Hugging Face config")


def files_from_index(index_path: str):
    """The shard files named by a ``*.safetensors.index.json`` (``ValueError`` without a
    ``weight_map``, ``FileNotFoundError`` naming the index for a missing shard)."""
    with open(index_path) as fh:
        try:
            index = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_path}: bad JSON: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no 'weight_map' {{tensor name: shard file}}")
    directory = os.path.dirname(os.path.abspath(index_path))
    files = [os.path.join(directory, f) for f in sorted(set(weight_map.values()))]
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{index_path} lists shard(s) {missing} that are not in {directory}")
    return files


def read_checkpoint(path_or_dir: str, expected: Dict[str, Tuple[int, ...]], *,
                    rename: Optional[Callable[[str], str]] = None, drop: Iterable[str] = (),
                    ignored_suffixes: Tuple[str, ...] = ()) -> Dict[str, np.ndarray]:
    """Every tensor of the checkpoint at ``path_or_dir``, checked against ``expected``.

    ``rename`` maps stored names onto the expected ones (e.g. add a missing prefix);
    names in ``drop`` are discarded (e.g. a tied ``lm_head.weight``); names ending in
    ``ignored_suffixes`` are buffers that may be present.  Missing, unexpected,
    duplicated (in two files) or wrongly shaped tensors raise a ``ValueError`` listing them.
    """
    _, files = weight_files(path_or_dir)
    tensors, origin = {}, {}
    for f in files:
        for name, value in read_safetensors(f).items():
            name = rename(name) if rename else name
            if name in tensors:
                raise ValueError(f"tensor {name!r} is in both {origin[name]} and {f}: a directory without an "
                                 "index must hold one checkpoint (pass the file or the index to read)")
            tensors[name], origin[name] = value, f
    for name in drop:
        tensors.pop(name, None)
    unexpected = sorted(k for k in tensors if k not in expected and not k.endswith(tuple(ignored_suffixes)))
    missing = sorted(k for k in expected if k not in tensors)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, config implies {tuple(shape)}")
    return tensors
