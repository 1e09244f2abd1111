"""The GPTQ format layer: checkpoint format, the trainable GPTQLinear and its kernels, the loader, and what a
checkpoint holds and needs to train (`checkpoint_info`, `memory`) before any weight is fetched."""

from .format import GPTQConfig, GPTQFormatError, dequantize, pack, read_gptq_config, unpack
from .layer import GPTQLinear
from .loader import load_model

__all__ = ["GPTQConfig", "GPTQFormatError", "GPTQLinear", "dequantize", "load_model", "pack",
           "read_gptq_config", "unpack"]
