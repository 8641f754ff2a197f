"""Pallas fast Walsh-Hadamard transform (QuaRot's online rotations).  See :mod:`.kernel`."""
from .kernel import hadamard_transform, tpu_vmem_bytes
from .reference import factor_sizes, hadamard_factored, hadamard_matrix, hadamard_reference, split_size

__all__ = ["factor_sizes", "hadamard_factored", "hadamard_matrix", "hadamard_reference", "hadamard_transform",
           "split_size", "tpu_vmem_bytes"]
