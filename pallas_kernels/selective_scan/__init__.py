"""Mamba-1 selective scan: Pallas forward/backward kernels (see :mod:`.kernel`; Triton on
GPU, Mosaic on TPU), the sequential float32 oracle :func:`reference` and the decode step
:func:`selective_state_update` (all length-major ``[B, L, D]``, state ``[B, D, N]``);
:func:`tpu_vmem_bytes`: the VMEM the TPU kernels' blocks take per grid step."""
from .kernel import selective_scan, tpu_vmem_bytes
from .reference import reference, selective_state_update

__all__ = ["reference", "selective_scan", "selective_state_update", "tpu_vmem_bytes"]
