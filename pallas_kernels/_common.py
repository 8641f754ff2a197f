"""Small Pallas helpers shared by every kernel package.

Everything that depends on the jax version lives here: the squeezed block
dimension marker and the Triton / Mosaic TPU compiler-params spelling.  Also the
input checks and the packed-sequence reset flags shared by the two scans (selective_scan, ssd).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

SQ = getattr(pl, "squeezed", None)  # squeezed block dim (None on older jax)


def resolve_interpret(interpret):
    """``None`` -> interpret mode exactly when the default backend is the CPU.

    A ``pltpu.InterpretParams`` (Pallas' TPU interpreter) is passed through
    unchanged; anything else becomes a bool.
    """
    if interpret is None:
        return jax.default_backend() == "cpu"
    if is_tpu_interpret(interpret):
        return interpret
    return bool(interpret)


def is_tpu_interpret(interpret) -> bool:
    """True for a ``pltpu.InterpretParams`` (run the TPU variant in TPU interpret mode)."""
    try:
        from jax.experimental.pallas import tpu as pltpu
    except ImportError:  # pragma: no cover
        return False
    cls = getattr(pltpu, "InterpretParams", None)
    return cls is not None and isinstance(interpret, cls)


def tpu_compiler_params(dimension_semantics) -> dict:
    """``pallas_call`` kwargs selecting the Mosaic TPU lowering.

    ``dimension_semantics``: one of ``"parallel"`` / ``"arbitrary"`` per grid
    axis (parallel axes may be split across TensorCores / megacore).
    """
    from jax.experimental.pallas import tpu as pltpu

    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics))}


def compiler_params(num_warps: int, num_stages: int, *, platform: str = "gpu",
                    dimension_semantics=None) -> dict:
    """``pallas_call`` kwargs selecting the Triton lowering with these knobs.

    jax >= 0.5 spells it ``pallas.triton.CompilerParams`` (older:
    ``TritonCompilerParams``; oldest: a ``{"triton": {...}}`` dict).  Naming the
    Triton class explicitly keeps newer jax from picking Mosaic GPU.

    ``platform="tpu"`` returns Mosaic TPU params instead (``num_warps`` /
    ``num_stages`` are ignored; ``dimension_semantics`` defaults to all
    ``"parallel"`` and must then be given the grid rank).
    """
    if platform == "tpu":
        return tpu_compiler_params(dimension_semantics)
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:  # pragma: no cover - very old / stripped jax
        pltriton = None
    for mod, name in ((pltriton, "CompilerParams"), (pltriton, "TritonCompilerParams"),
                      (pl, "TritonCompilerParams")):
        cls = getattr(mod, name, None) if mod is not None else None
        if cls is not None:
            return {"compiler_params": cls(num_warps=num_warps, num_stages=num_stages)}
    # pragma: no cover - oldest jax
    return {"compiler_params": {"triton": {"num_warps": num_warps, "num_stages": num_stages}}}


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ----------------------------------------------------------------------------- scan validation
LAYOUT_HINT = ("this library is length-major; mamba_ssm's [B, D, L] (channels-first) layout "
               "must be transposed, e.g. x.transpose(0, 2, 1)")


def shape_of(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def check_float(name: str, x, expected: str) -> None:
    """``ValueError`` unless ``x`` is a real floating-point array (``expected``: its shape)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a real floating-point array of shape {expected}, "
                         f"got dtype {dtype} (shape {shape_of(x)})")


def check_segment_ids(segment_ids, b: int, l: int) -> None:
    """``segment_ids`` must be an integer ``[B, L]`` array."""
    dtype = getattr(segment_ids, "dtype", None)
    if shape_of(segment_ids) != (b, l):
        raise ValueError(f"segment_ids must have shape [B, L] = {(b, l)}, got {shape_of(segment_ids)}")
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"segment_ids must be an integer [B, L] array, got dtype {dtype}")


def segment_resets(segment_ids):
    """``[B, L]`` int -> ``[B, L]`` bool, True at every ``t > 0`` with ``ids[t] != ids[t-1]``
    (where the scans' state restarts from zero)."""
    first = jnp.zeros(segment_ids.shape[:1] + (1,), bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


# ----------------------------------------------------------------------------- Mosaic TPU VMEM
def tpu_tile_bytes(shape, itemsize: int) -> int:
    """VMEM bytes of one block on TPU: the last two dims padded to the ``(8, 128)`` tile
    (16 rows for 16-bit types, 32 for 8-bit); a 1-D block is one row."""
    shape = tuple(shape)
    if len(shape) < 2:
        shape = (1,) * (2 - len(shape)) + shape
    *lead, r, c = shape
    sub = 8 * max(1, 4 // itemsize)
    count = 1
    for d in lead:
        count *= int(d)
    return count * round_up(r, sub) * round_up(c, 128) * itemsize
