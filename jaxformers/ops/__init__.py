"""Functional ops used by the layers (attention dispatch)."""
from .attention import (IMPLEMENTATIONS, attention, position_causal_attention, select_implementation,
                        xla_attention)
