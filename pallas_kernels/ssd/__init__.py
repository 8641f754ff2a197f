"""Mamba-2 state-space duality (chunked SSD): Pallas kernels (see :mod:`.kernel`),
the sequential float32 oracle :func:`reference` and the decode step
:func:`ssd_state_update`."""
from .kernel import ssd
from .reference import reference, ssd_state_update

__all__ = ["reference", "ssd", "ssd_state_update"]
