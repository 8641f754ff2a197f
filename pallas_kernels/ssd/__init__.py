"""Mamba-2 state-space duality (chunked SSD): Pallas kernels (see :mod:`.kernel`; Triton on
GPU, Mosaic on TPU), the sequential float32 oracle :func:`reference`, the decode step
:func:`ssd_state_update` and the TPU kernels' VMEM estimate :func:`tpu_vmem_bytes`."""
from .kernel import ssd, tpu_vmem_bytes
from .reference import reference, ssd_state_update

__all__ = ["reference", "ssd", "ssd_state_update", "tpu_vmem_bytes"]
