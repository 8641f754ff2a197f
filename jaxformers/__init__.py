"""jaxformers: efficient-transformer research in JAX/Flax, one paper per module.

    import jaxformers as jf
    config = jf.get_config("llama", "tiny")
    module = jf.build(config)
    params = module.init(rng, tokens)          # or jf.init_params(module, rng)
    logits = module.apply(params, tokens)      # [B, T, vocab] float32
"""
from .config import ModelConfig
from .registry import build, config_from_dict, get_config, list_models, list_presets
from .decoding import generate, init_cache, sample_logits
from .utils import count_params, flops_per_token, init_params, logical_axes

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "build", "config_from_dict", "get_config", "list_models", "list_presets",
    "generate", "init_cache", "sample_logits", "count_params", "flops_per_token", "init_params",
    "logical_axes", "convert",
]


def __getattr__(name):  # lazy: the HF converter imports safetensors only when used
    if name == "convert":
        import importlib
        return importlib.import_module(".convert", __name__)
    raise AttributeError(name)
