"""Checkpoint interop: Hugging Face Llama / Mistral / Qwen2 / Qwen3 <-> jaxformers, and scanned/unscanned
layer layouts.

    config, params = jaxformers.convert.from_hf("path/to/llama")   # numpy + safetensors only
    jaxformers.convert.to_hf(config, params, "out_dir")            # LlamaForCausalLM-loadable
    jaxformers.convert.to_hf(config, params, "out_dir", dtype="bfloat16", max_shard_size="2GB")
    # bf16 / fp16 weights, save_pretrained-style shards + index; staged, moved in when complete
    # Mistral: a llama with window = sliding_window, both ways (a windowed llama -> MistralForCausalLM)
    # Qwen2 / Qwen3: a llama with qkv_bias / qk_norm, both ways (Qwen2ForCausalLM / Qwen3ForCausalLM)
    # mamba / mamba2 configs: MambaForCausalLM / Mamba2ForCausalLM both ways (from_hf / to_hf dispatch)
"""
from .hf_llama import config_from_hf, config_to_hf, from_hf, to_hf
from .hf_mamba import config_from_hf_mamba, config_to_hf_mamba, from_hf_mamba, to_hf_mamba
from .layers import stack_layers, unstack_layers

__all__ = ["from_hf", "to_hf", "stack_layers", "unstack_layers", "config_from_hf", "config_to_hf",
           "from_hf_mamba", "config_from_hf_mamba", "to_hf_mamba", "config_to_hf_mamba"]
