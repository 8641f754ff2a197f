"""Llama baseline: RMSNorm, SwiGLU, RoPE (configurable theta), grouped-query attention,
untied output head (optional).

Initialisation follows the GPT baseline, not HF: the attention and MLP output projections start at
std 0.02/sqrt(2 n_layer) (``scale_residual_init=True``; HF Llama uses 0.02 everywhere). An imported
HF checkpoint is unaffected: this only changes a fresh model's init."""
from ..config import TransformerConfig
from ..registry import register
from .transformer import Transformer

LLAMA_PRESETS = {
    "tiny": dict(vocab_size=256, d_model=128, n_layer=2, n_head=4, n_kv_head=2, d_ff=352, max_seq_len=256),
    "small": dict(vocab_size=32000, d_model=768, n_layer=12, n_head=12, n_kv_head=4, d_ff=2048,
                  max_seq_len=1024),  # ~125M with untied head
    "medium": dict(vocab_size=32000, d_model=1024, n_layer=24, n_head=16, n_kv_head=8, d_ff=2816,
                   max_seq_len=2048),  # ~349M
}
_LLAMA_STYLE = dict(norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", tie_embeddings=False, rope_theta=10000.0,
                    scale_residual_init=True)

register("llama", TransformerConfig, Transformer,
         {name: {**_LLAMA_STYLE, **values} for name, values in LLAMA_PRESETS.items()},
         description="Llama baseline: RMSNorm, SwiGLU, RoPE, GQA")
