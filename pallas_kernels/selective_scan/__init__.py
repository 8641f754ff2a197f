"""Mamba-1 selective scan: Pallas forward/backward kernels (see :mod:`.kernel`),
the sequential float32 oracle :func:`reference` and the decode step
:func:`selective_state_update` (all length-major ``[B, L, D]``, state ``[B, D, N]``)."""
from .kernel import selective_scan
from .reference import reference, selective_state_update

__all__ = ["reference", "selective_scan", "selective_state_update"]
