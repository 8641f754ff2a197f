"""Pallas landmark attention (grouped softmax over landmark blocks, Mohtashami & Jaggi 2023).
See :mod:`.kernel` for the design and :mod:`.reference` for the semantics."""
from .kernel import landmark_attention, tpu_vmem_bytes
from .reference import landmark_attention_reference, landmark_masks

__all__ = ["landmark_attention", "landmark_attention_reference", "landmark_masks",
           "tpu_vmem_bytes"]
