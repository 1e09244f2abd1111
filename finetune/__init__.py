"""Fine-tune GPTQ-quantised medical LLMs (Meditron-70B) with LoRA, in plain Python."""

from .gptq import GPTQConfig, GPTQFormatError, GPTQLinear, load_model

__all__ = ["GPTQConfig", "GPTQFormatError", "GPTQLinear", "load_model"]
