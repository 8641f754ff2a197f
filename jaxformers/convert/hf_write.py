"""Writing Hugging Face checkpoints: storage dtype, sharded safetensors, an atomic publish.

Shared by :func:`~jaxformers.convert.hf_llama.to_hf`, :func:`~jaxformers.convert.hf_mamba.to_hf_mamba`
and ``experiments.export``:

* ``dtype``: ``"float32"`` (default), ``"bfloat16"`` (what released checkpoints use: half the
  bytes) or ``"float16"``; every tensor is stored in it (float32 values rounded to nearest even)
  and ``config.json``'s ``dtype`` / ``torch_dtype`` (transformers >= 5 reads ``dtype``, older
  ones ``torch_dtype``) say so.  A finite weight that the storage dtype cannot hold (float16: |w| of
  65520 or more rounds to inf, its largest finite value being 65504) is a ``ValueError`` naming the
  tensor and its max |value| before anything is written (:func:`cast_all`); so is a weight that
  is NaN or +-inf already (a diverged run), in every dtype.  Only weights are
  exported; the activations of a float16 model are transformers' business at inference
  (bfloat16 has float32's range for both).
* ``max_shard_size`` (an int of bytes, or a string ``"5GB"`` / ``"500MB"`` / ``"10KB"`` with
  transformers' decimal units; default ``"5GB"``): as ``huggingface_hub``'s ``parse_size_to_int``
  (what ``save_pretrained`` uses), a string needs one of the units -- a bare ``"123"`` is refused,
  not read as bytes (``experiments.export``'s ``--max-shard-size``, always a string, reads an
  all-digit value as bytes itself); tensors are packed in order into files of at most that many
  bytes of tensor data, as ``huggingface_hub.split_torch_state_dict_into_shards`` (which
  ``save_pretrained`` uses) packs them -- a tensor that would tip the current file over the limit
  starts a new one, a tensor larger than the limit gets a file of its own.  One file is
  ``model.safetensors``; several are ``model-00001-of-0000N.safetensors`` + a
  ``model.safetensors.index.json`` (``{"metadata": {"total_parameters": N, "total_size": BYTES},
  "weight_map": {tensor: file}}``, as transformers 5 writes it).
* :func:`staged`: everything is written into a temporary folder beside the destination (same
  file system), each file ``fsync``-ed; only when all are complete are they renamed into the
  destination (a destination that does not exist yet: one rename of the whole folder), the
  folder ``fsync``-ed, and then the weight files of an earlier checkpoint there that the new
  one does not overwrite (``model.safetensors`` beside a new index, an old index and its
  shards, ``model-XXXXX-of-YYYYY.safetensors`` shards) are removed, with any names the caller
  adds.  A failure or a kill before that leaves the destination as it was, and the temporary
  folder is removed on any failure the process sees (a ``SIGKILL`` leaves a ``.NAME.tmp-*``
  folder beside the destination, never a file inside it).  An existing destination that is a
  mount point or a bind mount (renames from its parent fail with EXDEV) or whose parent is not
  writable is staged in a ``.NAME.tmp-*`` folder inside it instead.  Over an earlier checkpoint
  the renames are per file (config.json last): a kill between two renames can mix the two
  exports' files, never leave a torn one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from typing import Dict, Iterable, List, Union

import numpy as np

from ..training.checkpoint import fsync_dir
from ..utils import plain_int

#: The storage dtypes of an export.
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
#: transformers' / huggingface_hub's units (decimal, as ``parse_size_to_int``).
_UNITS = {"TB": 10 ** 12, "GB": 10 ** 9, "MB": 10 ** 6, "KB": 10 ** 3}
#: The default ``max_shard_size``: huggingface_hub's default (one file up to 5 GB).
DEFAULT_MAX_SHARD_SIZE = 5 * 10 ** 9
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def check_dtype(dtype) -> str:
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
    return dtype


def parse_size(size: Union[int, float, str]) -> int:
    """``max_shard_size`` in bytes: an int (bytes), a finite float (bytes, e.g. ``5e9``; rounded
    down, which splits integer tensor sizes as the float does), or a string of a number with a unit
    ``KB`` / ``MB`` / ``GB`` / ``TB`` (powers of 1000), as ``huggingface_hub.parse_size_to_int``
    reads it; ``ValueError`` otherwise (a digit string without a unit too, as there)."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a number of bytes or a size like '5GB', got {size!r}")
    if isinstance(size, (int, np.integer)):
        value = int(size)
    elif isinstance(size, (float, np.floating)):
        if not np.isfinite(size):
            raise ValueError(f"max_shard_size must be a finite number of bytes or a size like '5GB', got {size!r}")
        value = int(np.floor(size))
    elif isinstance(size, str):
        s = size.strip()  # as parse_size_to_int: the last two characters are the unit, the rest a float
        if plain_int(s) is not None:
            raise ValueError(f"max_shard_size={size!r} has no unit: give a string with KB / MB / GB / TB "
                             f"(e.g. '{s}KB'), or an int of bytes ({int(s)}), as huggingface_hub requires")
        unit = s[-2:].upper() if s[-2:].upper() in _UNITS else None
        try:
            value = None if unit is None else int(float(s[:-2].strip()) * _UNITS[unit])
        except (ValueError, OverflowError):  # "nanGB" / "infGB", "1e999KB"
            value = None
        if value is None:
            raise ValueError(f"max_shard_size must be a number of bytes or a size like '5GB' / '500MB' "
                             f"(units KB, MB, GB, TB), got {size!r}")
    else:
        raise ValueError(f"max_shard_size must be a number of bytes or a size like '5GB', got {size!r}")
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def cast(x, dtype: str) -> np.ndarray:
    """``x`` (any float array) as a contiguous numpy array of the storage ``dtype`` (via float32:
    round to nearest even, as ``torch`` / ``jnp`` ``astype``)."""
    x = np.asarray(x).astype(np.float32)
    if dtype == "bfloat16":
        import ml_dtypes
        x = x.astype(ml_dtypes.bfloat16)
    elif dtype == "float16":
        x = x.astype(np.float16)
    return np.ascontiguousarray(x)


def cast_all(tensors: Dict[str, np.ndarray], dtype: str) -> Dict[str, np.ndarray]:
    """Every tensor :func:`cast` to the storage ``dtype``; ``ValueError`` naming the first tensor
    that holds a NaN or +-inf (a diverged run: the exported model would output NaN), or with a
    finite value that becomes +-inf in ``dtype`` (float16: |w| >= 65520, its largest finite value
    being 65504; bfloat16: beyond ~3.39e38), with its max |value|."""
    out = {}
    for name, t in tensors.items():
        with np.errstate(over="ignore"):  # (found below, with a clearer message than numpy's warning)
            out[name] = y = cast(t, dtype)
        if np.all(np.isfinite(y)):  # the common case: no second float32 copy
            continue
        x = np.asarray(t).astype(np.float32)
        finite = np.isfinite(x)
        if not np.all(finite):
            raise ValueError(f"{name} holds {int(np.sum(np.isnan(x)))} NaN and {int(np.sum(np.isinf(x)))} "
                             f"+-inf values of {x.size} (a diverged run?); the exported model would output "
                             "NaN: export an earlier checkpoint")
        peak = float(np.max(np.abs(x)))
        raise ValueError(f"{name} has max |value| {peak:.6g}, which overflows {dtype} (largest finite "
                         f"{float(np.finfo(y.dtype).max):.6g}) and would be stored as inf; export with "
                         + ("dtype 'bfloat16' (float32's range) or 'float32'" if dtype == "float16"
                            else "dtype 'float32'"))
    return out


def shard_names(tensors: Dict[str, np.ndarray], max_shard_size) -> Dict[str, List[str]]:
    """``{file name: [tensor names]}`` in ``tensors``' order, packed as huggingface_hub does."""
    limit = parse_size(max_shard_size)
    shards, current, size = [], [], 0
    for name, t in tensors.items():
        n = int(t.nbytes)
        if n > limit:  # its own file, bigger than the limit; the current one stays open
            shards.append([name])
            continue
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        shards.append(current)
    if len(shards) <= 1:
        return {SINGLE_FILE: list(tensors)}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": names for i, names in enumerate(shards)}


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON into a staged folder (:func:`publish` fsyncs every file of it)."""
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)


def write_weights(tensors: Dict[str, np.ndarray], folder: str, max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> List[str]:
    """Write ``tensors`` (already in their storage dtype) as ``model.safetensors`` or shards + an
    index into ``folder`` (a staged folder: :func:`publish` fsyncs them); returns the file names
    written."""
    from safetensors.numpy import save_file

    files = shard_names(tensors, max_shard_size)
    for fname, names in files.items():
        path = os.path.join(folder, fname)
        save_file({k: tensors[k] for k in names}, path, metadata={"format": "pt"})
    written = list(files)
    if len(files) > 1:
        total = sum(int(t.nbytes) for t in tensors.values())
        write_json(os.path.join(folder, INDEX_FILE),
                   {"metadata": {"total_parameters": sum(int(t.size) for t in tensors.values()),
                                 "total_size": total},
                    "weight_map": {k: f for f, names in files.items() for k in names}})
        written.append(INDEX_FILE)
    return written


def stale_weight_files(out_dir: str, new_names: Iterable[str]) -> List[str]:
    """Weight files in ``out_dir`` (an earlier checkpoint) that a loader would read with or instead
    of the new files ``new_names``: ``model.safetensors`` / the index when the new export does not
    write it, the old index's shards and ``model-XXXXX-of-YYYYY.safetensors`` files not rewritten."""
    new = set(new_names)
    if not os.path.isdir(out_dir):
        return []
    stale = set()
    index = os.path.join(out_dir, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as fh:
                shards = set(json.load(fh).get("weight_map", {}).values())
        except (ValueError, AttributeError, OSError):
            shards = set()
        stale |= {s for s in shards if isinstance(s, str) and s.endswith(".safetensors") and "/" not in s
                  and s != SINGLE_FILE}
        stale.add(INDEX_FILE)
    for name in os.listdir(out_dir):
        if _SHARD_RE.fullmatch(name):
            stale.add(name)
    stale.add(SINGLE_FILE)
    return sorted(n for n in stale - new if os.path.isfile(os.path.join(out_dir, n)))


class Staged:
    """The temporary folder of :func:`staged` (``path``) and, after publishing, the names removed
    from the destination (``removed``)."""

    def __init__(self, path: str):
        self.path = path
        self.removed: List[str] = []


def publish(tmp: str, out_dir: str, stale: Iterable[str] = ()) -> List[str]:
    """Move every file of ``tmp`` into ``out_dir`` (``config.json`` last), then remove the stale
    weight files (:func:`stale_weight_files`) and the names in ``stale`` that the new export did not
    write; ``tmp`` is gone afterwards.  Returns the removed names."""
    names = sorted(os.listdir(tmp), key=lambda n: (n == "config.json", n))
    for name in names:  # on disk before a rename publishes them: the one fsync of each staged file
        if os.path.isfile(os.path.join(tmp, name)):
            _fsync_file(os.path.join(tmp, name))
    fsync_dir(tmp)
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)  # one atomic step
        fsync_dir(parent)
        return []
    doomed = sorted(set(stale_weight_files(out_dir, names))
                    | {n for n in stale if n not in names and os.path.isfile(os.path.join(out_dir, n))})
    for name in names:
        src, dst = os.path.join(tmp, name), os.path.join(out_dir, name)
        if os.path.isdir(src):  # (an export writes files only; a folder replaces a folder whole)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.rename(src, dst)
        else:
            os.replace(src, dst)
    fsync_dir(out_dir)
    for name in doomed:
        os.unlink(os.path.join(out_dir, name))
    fsync_dir(out_dir)
    os.rmdir(tmp)
    fsync_dir(parent)
    return doomed


def _renames_into(parent: str, out_dir: str, base: str) -> bool:
    """Whether a folder made in ``parent`` can be renamed into the existing folder ``out_dir``: not
    when ``out_dir`` is a mount point (a container's volume) or a bind mount -- renames across
    mounts fail with EXDEV even on one file system, so ``st_dev`` cannot tell -- nor when
    ``parent`` is not writable.  Found by trying (an empty folder, moved in and back out)."""
    probe = os.path.join(parent, f"{base}.probe-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    inside = os.path.join(out_dir, os.path.basename(probe))
    try:
        os.rename(probe, inside)
    except OSError:
        os.rmdir(probe)
        return False
    os.rmdir(inside)
    return True


@contextlib.contextmanager
def staged(out_dir: str, stale: Iterable[str] = ()):
    """``with staged(out) as s:`` write the files into ``s.path``; on a normal exit they are
    published into ``out`` (:func:`publish`, ``s.removed``), on an exception (``KeyboardInterrupt``
    too) ``s.path`` is removed and ``out`` is left untouched."""
    if not os.fspath(out_dir):  # (realpath("") is the working directory: never export into it unasked)
        raise ValueError("the output directory is an empty path; give a folder (\".\" for the current one)")
    # beside the real folder (an --out that is a symlink to another file system: renames work)
    out_dir = os.path.realpath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    base = f".{os.path.basename(out_dir)}"[:200]
    where = parent
    if os.path.isdir(out_dir) and not _renames_into(parent, out_dir, base):
        where = out_dir  # a mount point, or a parent we may not write: stage inside it instead
    while True:
        tmp = os.path.join(where, f"{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp)  # 0o777 & ~umask: the export folder's mode when renamed into place
            break
        except FileExistsError:
            continue
    s = Staged(tmp)
    try:
        yield s
        s.removed = publish(tmp, out_dir, stale)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(out_dir: str, hf_config: dict, tensors: Dict[str, np.ndarray], *, dtype: str,
                     max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> str:
    """``config.json`` (``dtype`` / ``torch_dtype`` set) + the weights (cast to ``dtype``, sharded
    by ``max_shard_size``) written atomically into ``out_dir`` (:func:`staged`).  Returns ``out_dir``."""
    check_dtype(dtype)
    parse_size(max_shard_size)  # refused before anything is written
    tensors = cast_all(tensors, dtype)  # ... as a weight that would overflow to inf is
    hf_config = dict(hf_config, torch_dtype=dtype, dtype=dtype)
    with staged(out_dir) as s:
        write_weights(tensors, s.path, max_shard_size)
        write_json(os.path.join(s.path, "config.json"), hf_config)
    return out_dir


__all__ = ["EXPORT_DTYPES", "DEFAULT_MAX_SHARD_SIZE", "check_dtype", "parse_size", "cast", "cast_all",
           "shard_names", "write_weights", "stale_weight_files", "publish", "staged", "write_checkpoint"]
