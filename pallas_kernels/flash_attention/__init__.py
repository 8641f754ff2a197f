"""Pallas FlashAttention-2 (forward + backward) with causal / sliding-window /
segment masks, GQA and block skipping.  See :mod:`.kernel` for the design."""
from .kernel import BlockSizes, flash_attention, forward_with_stats, tpu_vmem_bytes
from .reference import attention_mask, reference

__all__ = ["BlockSizes", "attention_mask", "flash_attention", "forward_with_stats", "reference",
           "tpu_vmem_bytes"]
