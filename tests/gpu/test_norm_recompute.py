"""Kept layers without their RMSNorm outputs (`norm_recompute`): the same gradients bit for bit, and an input changed
in place after the forward named as an error."""

import weakref

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from finetune.gpu.fast_lora import speed_up_lora
from finetune.gpu.fast_training import apply_plan, decoder_layers
from finetune.gpu.norm_recompute import NormRecompute
from finetune.gpu.recompute_plan import RecomputePlan
from tests.gpu.tiny_lora import TINY, lora_model


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_kept_layers_hold_no_norm_output_and_give_the_same_gradients(checkpoint, dropout):
    """With NormRecompute a kept layer holds neither RMSNorm's output after its forward (the backward runs the norm
    again on the input the norm's own backward holds): the same loss and LoRA gradients, bit for bit."""
    tokens = torch.randint(0, TINY.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    model = lora_model(checkpoint, dropout=dropout)
    speed_up_lora(model)
    layers = decoder_layers(model.get_base_model())
    norms = NormRecompute()
    assert [norms.watch(layer) for layer in layers] == [2] * TINY.num_hidden_layers
    outputs = []  # a weak reference to each norm output of a forward
    for layer in layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.register_forward_hook(lambda module, args, output: outputs.append(weakref.ref(output)))
    results = []
    for recompute in (None, norms):
        apply_plan(layers, RecomputePlan(keep=3, offload=0, bytes=0), hooks=None, norms=recompute)
        outputs.clear()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same dropout masks
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        held = sum(output() is not None for output in outputs)
        loss.backward()
        results.append((held, loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (held, loss, grads), (held_recomputing, loss_recomputing, grads_recomputing) = results
    assert (held, held_recomputing) == (2 * TINY.num_hidden_layers, 0)
    assert loss_recomputing == loss
    assert [n for n in grads if not torch.equal(grads[n], grads_recomputing[n])] == []


def test_a_norm_input_changed_in_place_after_the_forward_is_an_error():
    norm, norms = LlamaRMSNorm(8), NormRecompute()
    norms.watch(norm)
    hidden, weight = torch.randn(2, 8, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    with norms:
        normed_input = hidden * 1.0
        out = norm(normed_input) @ weight  # the matmul saves the norm output for weight's gradient
    normed_input.add_(1.0)
    with pytest.raises(RuntimeError, match="^a LlamaRMSNorm's input was modified in place after the forward, so its "
                                           "output cannot be recomputed in the backward$"):
        out.sum().backward()
