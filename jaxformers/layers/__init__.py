"""Shared building blocks: norms, rotary embeddings, MLPs, embeddings, attention, block."""
from .norms import LayerNorm, RMSNorm, make_norm
from .rotary import apply_rotary, rotary_angles
from .mlp import GeluMLP, SwiGLU, make_mlp
from .embeddings import Embed, LMHead
from .attention import Attention, init_attention_cache
from .block import Block
