"""Functional ops used by the layers (attention dispatch)."""
from .attention import IMPLEMENTATIONS, attention, select_implementation, xla_attention
