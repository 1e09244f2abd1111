"""The tiny random GPTQ Llama the tests/gpu modules build LoRA models on (CPU or GPU), and the step they compare:
loss and LoRA gradients."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig

from finetune.gptq.loader import load_model

TINY = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def lora_model(checkpoint, device="cpu", dropout=0.0, dtype=None):
    torch.manual_seed(0)  # same LoRA A init in every model
    model = get_peft_model(load_model(checkpoint, device=device, dtype=dtype),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters matter
            torch.nn.init.normal_(param, std=0.1)
    return model.train()


def loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
