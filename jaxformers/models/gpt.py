"""GPT baseline (llm-baselines style): pre-LayerNorm, GELU 4x MLP, no biases, RoPE,
tied embeddings, GPT-2 scaled init of the output projections."""
from ..config import TransformerConfig
from ..registry import register
from .transformer import Transformer

GPT_PRESETS = {
    "tiny": dict(vocab_size=256, d_model=128, n_layer=2, n_head=4, max_seq_len=256),
    "small": dict(vocab_size=50304, d_model=768, n_layer=12, n_head=12, max_seq_len=1024),   # ~124M
    "medium": dict(vocab_size=50304, d_model=1024, n_layer=24, n_head=16, max_seq_len=1024),  # ~350M
}
_GPT_STYLE = dict(norm="layernorm", norm_eps=1e-5, mlp="gelu", tie_embeddings=True)

register("gpt", TransformerConfig, Transformer,
         {name: {**_GPT_STYLE, **values} for name, values in GPT_PRESETS.items()},
         description="GPT baseline: pre-LN, GELU MLP, RoPE, tied embeddings")
