"""Pallas sparse causal flash attention (SCFA): hash-sparse and QK-sparse attention with
token reordering and tile skipping.  See :mod:`.kernel` for the design."""
from .kernel import (causal_tile_count, hash_attention, hash_tile_count, qk_sparse_attention,
                     qk_sparse_tile_count, tpu_vmem_bytes)
from .reference import hash_reference, masked_attention, qk_sparse_reference, sparse_mask

__all__ = ["causal_tile_count", "hash_attention", "hash_reference", "hash_tile_count",
           "masked_attention", "qk_sparse_attention", "qk_sparse_reference",
           "qk_sparse_tile_count", "sparse_mask", "tpu_vmem_bytes"]
