"""torchext: GGUF-quantized matmul (k-quants and the 32-value formats, Q8_1 activations, DP4A)
and GELU as PyTorch custom ops, usable from eager code, torch.compile and CUDA graphs."""

import logging

import torch  # noqa: F401  (torch must be loaded before the op library)

from . import _C  # noqa: F401  (loads the library: its static initialisers register torch.ops.torchext)
from . import ops
from .formats import QType, block_bytes, block_values, row_bytes
from .ops import (
    add_rms_norm_quantize_q8_1,
    bias_gelu,
    cached_attention,
    cached_attention_quantize_q8_1,
    dequantize,
    embedding,
    gelu,
    gelu_,
    gated_gelu_qmatmul,
    gated_gelu_quantize_q8_1,
    gated_silu_qmatmul,
    gated_silu_quantize_q8_1,
    q4k_gemv,
    q4k_q8_gemv,
    q4k_q8_gemv_packed,
    q5k_gemv,
    q6k_gemv,
    qmatmul,
    qmatmul_id,
    qmatmul_q8_1,
    quantize,
    quantize_q8_1,
    rms_norm_quantize_q8_1,
    rope_cache_write,
)
from .cache import WeightCache
from . import nn

# torch.compile on the CPU makes inductor import torch.utils.cpp_extension, which, in a CUDA build
# of torch on a machine without a GPU, warns "No CUDA runtime is found, using CUDA_HOME=..." while
# looking for a CUDA toolkit that CPU code never uses: nothing is wrong, so that one message is
# dropped (the logger's other messages pass).
logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: not record.getMessage().startswith("No CUDA runtime is found"))

__all__ = [
    "QType", "block_bytes", "block_values", "row_bytes", "ops",
    "quantize_q8_1", "rms_norm_quantize_q8_1", "add_rms_norm_quantize_q8_1", "gated_gelu_quantize_q8_1",
    "gated_silu_quantize_q8_1", "q4k_q8_gemv", "q4k_q8_gemv_packed", "q4k_gemv", "q5k_gemv", "q6k_gemv",
    "qmatmul", "qmatmul_id", "qmatmul_q8_1", "gated_gelu_qmatmul", "gated_silu_qmatmul", "gelu", "gelu_",
    "bias_gelu", "dequantize",
    "embedding", "quantize",
    "cached_attention", "cached_attention_quantize_q8_1", "rope_cache_write",
    "WeightCache", "nn",
]
