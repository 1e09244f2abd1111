"""`enable_fast_training` itself: what its planner counts of a layer, the packed rows' flex-attention mask, the
refusal of a CPU model, and on a GPU the whole path against the CPU's fp32."""


import pytest
import torch

from finetune.gpu import fast_training
from finetune.gpu.fast_lora import speed_up_lora
from finetune.gpu.fast_training import decoder_layers
from finetune.gpu.norm_recompute import NormRecompute
from tests.gpu.tiny_lora import TINY, lora_model, needs_cuda


def test_the_planner_counts_a_kept_layer_without_its_norm_outputs(checkpoint):
    """What measure_layer counts of a layer's saved tensors (GPU memory held, and host copies): with norm outputs
    recomputed, exactly the two norm outputs less (their inputs are held by the norms' own backward anyway)."""
    model = lora_model(checkpoint)
    speed_up_lora(model)
    layer = decoder_layers(model.get_base_model())[1]
    norms = NormRecompute()
    norms.watch(layer)
    hidden = torch.randn(1, 48, TINY.hidden_size, requires_grad=True)
    position_ids = torch.arange(48)[None]
    kwargs = {"position_embeddings": fast_training.rotary_embedding(model)(hidden, position_ids),
              "position_ids": position_ids}
    counts = []
    for recompute in (None, norms):
        with fast_training.SavedTensorCount(recompute).counting() as saved:
            layer(hidden, **kwargs)
        counts.append((saved.bytes, sum(saved.copies.values())))
    norm_outputs = 2 * hidden.numel() * hidden.element_size()
    assert counts[1] == (counts[0][0] - norm_outputs, counts[0][1] - norm_outputs)


def test_packed_rows_mask_compiles_without_persistent_kernels():
    """The block mask of packed rows is compiled with inductor's persistent reductions off (their argsort of each row's
    key blocks took minutes of ptxas at 16,384 tokens), seen from inside the mask function as torch traces it, and is
    the mask transformers' own eager build gives: causal, each example attending to itself only, a row of 300 tokens
    (not a multiple of the 128-token block)."""
    import torch._inductor.config
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers import masking_utils

    fast_training.compile_flex_masks_without_persistent_kernels()
    examples = torch.tensor([[0] * 100 + [1] * 150 + [2] * 50])
    packed = masking_utils.and_masks(masking_utils.causal_mask_function,
                                     masking_utils.packed_sequence_mask_function(examples))
    persistent = []

    def mask_function(*index):
        persistent.append(torch._inductor.config.triton.persistent_reductions)
        return packed(*index)

    mask = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"](batch_size=1, q_length=300, kv_length=300,
                                                                        mask_function=mask_function, device="cpu")
    assert persistent and set(persistent) == {False}
    assert torch._inductor.config.triton.persistent_reductions  # only inside the mask's build
    expected = create_block_mask(packed, 1, None, 300, 300, device="cpu")
    assert torch.equal(mask.to_dense(), expected.to_dense())
    assert mask.to_dense()[0, 0].tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]


def test_enable_fast_training_refuses_a_cpu_model(checkpoint):
    with pytest.raises(ValueError, match="needs the model on a CUDA GPU; on CPU train without it"):
        fast_training.enable_fast_training(lora_model(checkpoint), seq_len=64)


@needs_cuda
def test_gpu_fast_path_matches_cpu(checkpoint):
    """On the GPU (bf16, liger, Triton, the lean LoRA) one MLP and one attention projection give the CPU's fp32
    outputs and gradients within bf16 rounding, and the whole model its loss. (Whole-model gradients are no
    measure: on random weights bf16 rounding grows chaotically through the layers, as it does in PEFT's own path.)"""
    tokens = torch.randint(0, TINY.vocab_size, (1, 512), generator=torch.Generator().manual_seed(2))
    cpu_model = lora_model(checkpoint)
    cpu_loss = cpu_model(input_ids=tokens, labels=tokens, use_cache=False).loss.item()
    speed_up_lora(cpu_model)
    model = lora_model(checkpoint, device="cuda")  # bf16
    gpu_parameters = dict(model.named_parameters())
    with torch.no_grad():  # the same adapters (the GPU's random generator initialised its own)
        for name, parameter in cpu_model.named_parameters():
            if parameter.requires_grad:
                gpu_parameters[name].copy_(parameter)
    report = fast_training.enable_fast_training(model, seq_len=512, host_memory_gib=0)
    assert report["fast_lora_modules"] == 7 * TINY.num_hidden_layers
    assert model(input_ids=tokens.cuda(), labels=tokens.cuda(), use_cache=False).loss.item() == \
        pytest.approx(cpu_loss, rel=2e-2)
    generator = torch.Generator().manual_seed(3)
    for path in ("mlp", "self_attn.q_proj"):
        results = []
        for m in (cpu_model, model):
            module = m.get_base_model().model.layers[1].get_submodule(path)
            module.zero_grad(set_to_none=True)
            device, dtype = next(module.parameters()).device, (torch.float32 if m is cpu_model else torch.bfloat16)
            x = torch.randn(1, 512, TINY.hidden_size, generator=generator.manual_seed(4)).to(device, dtype)
            out = module(x.requires_grad_())
            out.backward(torch.randn(out.shape, generator=generator.manual_seed(5)).to(device, dtype))
            results.append([out, x.grad] + [p.grad for p in module.parameters() if p.requires_grad])
        for cpu, gpu in zip(*results):
            assert ((gpu.float().cpu() - cpu).norm() / cpu.norm()).item() < 2e-2, path
