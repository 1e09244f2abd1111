"""A trained LoRA adapter put back on its GPTQ base, as evaluation, parity and export load it."""

import json
from pathlib import Path

from peft import PeftModel
from torch import nn
from transformers import AutoTokenizer

from ..config.recipe import RecipeError
from ..gptq.loader import open_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, after checking it and the weights' safetensors header: a truncated or corrupted
    adapter file fails here, naming itself, before any model is loaded."""
    path = adapter_dir / "adapter_config.json"
    try:
        adapter_config = json.loads(path.read_text())
    except ValueError as err:
        raise RecipeError(f"{path} is truncated or corrupted ({err}); copy or export the adapter again") from None
    if (adapter_dir / ADAPTER_WEIGHTS).is_file():
        with open_safetensors(adapter_dir / ADAPTER_WEIGHTS):
            pass
    return adapter_config


def adapter_vocab_size(adapter_dir: Path, base_vocab: int) -> int:
    """The vocabulary the adapter was trained with: the base's, grown to the tokenizer's length where training
    added tokens (the ChatML tokens on Llama-2); it is never shrunk."""
    return max(base_vocab, len(AutoTokenizer.from_pretrained(adapter_dir)))


def attach_adapter(model: nn.Module, adapter_dir: str | Path, **kwargs) -> PeftModel:
    """Plain PEFT on a GPTQ base, with the embeddings grown first if training added tokens."""
    vocab = adapter_vocab_size(Path(adapter_dir), model.get_input_embeddings().num_embeddings)
    if vocab != model.get_input_embeddings().num_embeddings:
        # the new rows are trainable token rows, saved in the adapter and loaded over whatever this initialises
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return PeftModel.from_pretrained(model, adapter_dir, **kwargs)
