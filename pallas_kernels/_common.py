"""Small Pallas helpers shared by every kernel package.

Everything that depends on the jax version lives here: the squeezed block
dimension marker and the Triton compiler-params spelling.
"""
from __future__ import annotations

import jax
from jax.experimental import pallas as pl

SQ = getattr(pl, "squeezed", None)  # squeezed block dim (None on older jax)


def resolve_interpret(interpret) -> bool:
    """``None`` -> interpret mode exactly when the default backend is the CPU."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def compiler_params(num_warps: int, num_stages: int) -> dict:
    """``pallas_call`` kwargs selecting the Triton lowering with these knobs.

    jax >= 0.5 spells it ``pallas.triton.CompilerParams`` (older:
    ``TritonCompilerParams``; oldest: a ``{"triton": {...}}`` dict).  Naming the
    Triton class explicitly keeps newer jax from picking Mosaic GPU.
    """
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
