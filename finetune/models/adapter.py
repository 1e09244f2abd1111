"""A trained LoRA adapter put back on its GPTQ base, as evaluation, parity and export load it."""

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peft import PeftModel
from peft.import_utils import is_gptqmodel_available
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


@contextmanager
def peft_without_gptqmodel() -> Iterator[None]:
    """Wrap GPTQ layers with LoRA without importing gptqmodel. Where gptqmodel is installed (the `quantize` extra,
    or beside the peer stack), PEFT imports it for every LoRA target only to ask whether the layer is one of
    gptqmodel's (`peft.tuners.lora.awq.dispatch_awq`); ours never is. The import takes ~4 s, prints gptqmodel's
    banner and sets PYTORCH_ALLOC_CONF (garbage_collection_threshold:0.7, max_split_size_mb:256) and
    CUDA_DEVICE_ORDER for the process's children (this process's CUDA allocator has started by then and keeps its
    settings: checked on an H200). While hidden, `import gptqmodel` fails and PEFT's check answers no (its cached
    answer is cleared after, so later PEFT calls see gptqmodel again); a process that imported gptqmodel already
    keeps it."""
    if "gptqmodel" in sys.modules:
        yield
        return
    sys.modules["gptqmodel"] = None  # importlib's marker for a module that cannot be imported
    try:
        yield
    finally:
        if sys.modules.get("gptqmodel", 0) is None:
            del sys.modules["gptqmodel"]
        is_gptqmodel_available.cache_clear()


def attach_adapter(model: nn.Module, adapter_dir: str | Path, **kwargs) -> PeftModel:
    """Plain PEFT on a GPTQ base, with the embeddings grown first if training added tokens."""
    vocab = adapter_vocab_size(Path(adapter_dir), model.get_input_embeddings().num_embeddings)
    if vocab != model.get_input_embeddings().num_embeddings:
        # the new rows are trainable token rows, saved in the adapter and loaded over whatever this initialises
        model.resize_token_embeddings(vocab, mean_resizing=False)
    with peft_without_gptqmodel():
        return PeftModel.from_pretrained(model, adapter_dir, **kwargs)
