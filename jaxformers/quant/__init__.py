"""QuaRot (Ashkboos et al., 2024): rotation-based 4-bit quantization of Llama weights,
activations and KV cache.  Entry point: :func:`quantize` (see :mod:`.api`)."""
from .api import LINEARS, QuantSpec, collect_stats, quant_config, quantize
from .model import IntLinear, OnlineQuant, QuaRotConfig, QuaRotTransformer
from .quantizers import (fake_quant, gptq_hinv, gptq_weight, gptq_weight_reference, int8_linear,
                         int_matmul, pack_int4, quantize_rows_int8, rtn_weight, rtn_weight_reference,
                         unpack_int4)
from .rotation import random_hadamard, rotate_params

__all__ = ["IntLinear", "LINEARS", "OnlineQuant", "QuaRotConfig", "QuaRotTransformer", "QuantSpec", "collect_stats",
           "fake_quant", "gptq_hinv", "gptq_weight", "gptq_weight_reference", "int8_linear", "int_matmul",
           "pack_int4", "quant_config", "quantize", "quantize_rows_int8", "random_hadamard", "rotate_params",
           "rtn_weight", "rtn_weight_reference", "unpack_int4"]
