"""The fused few-token GPTQ matmul (triton_gemv): it multiplies with exactly the training path's weights.

An identity input makes the matmul's output the weight itself (each output is one weight times 1 plus zeros, exact
in fp32), so `torch.equal` against `format.dequantize` checks every unpacked value, zero point and scale. CI has no
GPU: there the kernel runs in Triton's interpreter (fp16 and fp32; the interpreter truncates to bf16 instead of
rounding, so bf16 is checked on the GPU only)."""

from importlib.metadata import version
from importlib.util import find_spec

import pytest
import torch
from transformers import LlamaConfig

from finetune.gptq import layer as gptq_layer
from finetune.gptq.format import GPTQConfig
from finetune.gptq.layer import reference_dequantize
from finetune.gptq.random_checkpoint import write_random_gptq_checkpoint
from tests.gptq.test_triton_dequant import random_layer
from tests.subprocesses import run_python

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Meditron-70B-GPTQ's branches (4- and 3-bit; group -1, 32, 128; act-order; v1 zero points), plus 2 and 8 bits
BRANCHES = [GPTQConfig(bits=bits, group_size=group, desc_act=group != -1 or bits == 3)
            for bits in (4, 3) for group in (-1, 128, 32)]
PACKINGS = BRANCHES + [GPTQConfig(bits=2, group_size=64, desc_act=True),
                       GPTQConfig(bits=8, group_size=128, checkpoint_format="gptq_v2")]


def name(config: GPTQConfig) -> str:
    return f"{config.bits}b-g{config.group_size}{'-act' if config.desc_act else ''}-{config.checkpoint_format}"


def triton_older_than(major: int, minor: int) -> bool:
    return tuple(int(part) for part in version("triton").split(".")[:2]) < (major, minor)


@pytest.mark.skipif(find_spec("triton") is None, reason="needs Triton (its interpreter runs on the CPU)")
@pytest.mark.skipif(find_spec("triton") is not None and triton_older_than(3, 8),
                    reason="Triton 3.6's interpreter cannot take a loop bound computed from tl.program_id (3.8's, "
                           "CI's, can); the kernel's CUDA tests below run on a GPU with any version")
def test_identity_input_gives_the_reference_weight_in_interpreter():
    result = run_python("""
        import torch
        from finetune.gptq.triton_gemv import fused_matmul
        from finetune.gptq.layer import reference_dequantize
        from tests.gptq.test_triton_gemv import PACKINGS
        from tests.gptq.test_triton_dequant import random_layer
        for seed, config in enumerate(PACKINGS[1::4] + PACKINGS[6:]):  # every bit width; groups 32, 64, 128
            layer = random_layer(160, 72, config, seed)  # 160 rows: a partial 128-row block, and a split
            for dtype in (torch.float32, torch.float16):
                weight, eye = reference_dequantize(layer, dtype), torch.eye(160, dtype=dtype)
                assert torch.equal(fused_matmul(eye, layer).t(), weight), (config, dtype)
                for row in (0, 159):  # one token takes the multiply-and-sum path, not tl.dot
                    assert torch.equal(fused_matmul(eye[row], layer), weight[:, row]), (config, dtype, row)
            x = torch.randn(2, 3, 160)
            want = x @ reference_dequantize(layer, torch.float32).t()
            assert (fused_matmul(x, layer) - want).abs().max() < 1e-5 * want.abs().max(), config
        print("ok")
        """, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok"]


@needs_cuda
@pytest.mark.parametrize("config", PACKINGS, ids=name)
def test_gpu_identity_input_gives_the_reference_weight(config):
    from finetune.gptq.triton_gemv import fused_matmul
    cpu = random_layer(1000, 600, config, seed=config.bits)  # 1000 rows: not a multiple of 128 (nor 32 for 3-bit)
    gpu = random_layer(1000, 600, config, seed=config.bits).to("cuda")
    for dtype in (torch.bfloat16, torch.float16):
        out = fused_matmul(torch.eye(1000, dtype=dtype, device="cuda"), gpu)
        assert torch.equal(out.t().cpu(), reference_dequantize(cpu, dtype)), dtype


@needs_cuda
@pytest.mark.parametrize("bits", (3, 4))
def test_gpu_layer_switches_to_cublas_above_fused_max_tokens(bits):
    """Up to FUSED_MAX_TOKENS[bits] tokens the layer returns the fused kernel's result, above it dequantise +
    cuBLAS's; both are the same product up to accumulation order."""
    from finetune.gptq.triton_dequant import dequantize_triton
    from finetune.gptq.triton_gemv import fused_matmul
    layer = random_layer(1024, 768, GPTQConfig(bits=bits, group_size=128, desc_act=True), seed=bits).to("cuda")
    limit = gptq_layer.FUSED_MAX_TOKENS[bits]
    small = torch.randn(1, limit, 1024, dtype=torch.bfloat16, device="cuda")
    large = torch.randn(1, limit + 1, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        assert torch.equal(layer(small), fused_matmul(small, layer))
        assert torch.equal(layer(large), large @ dequantize_triton(layer, torch.bfloat16).t())
        error = (layer(small).float() - small.float() @ dequantize_triton(layer, torch.bfloat16).float().t()).norm()
    assert error / (small.float() @ dequantize_triton(layer, torch.bfloat16).float().t()).norm() < 4e-3


@needs_cuda
@pytest.mark.parametrize("bits", (3, 4))
def test_gpu_greedy_generation_equals_the_dequantise_path(bits, tmp_path, monkeypatch):
    """A tiny random Llama decodes the same tokens through the fused kernel as through dequantise + cuBLAS."""
    from finetune.gptq.loader import load_model
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    write_random_gptq_checkpoint(tmp_path, config, GPTQConfig(bits=bits, group_size=32, desc_act=True))
    model = load_model(tmp_path, device="cuda", dtype=torch.float16)
    prompts = torch.randint(0, 512, (4, 12), generator=torch.Generator().manual_seed(bits)).cuda()

    def greedy() -> list[list[int]]:
        return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=24, min_new_tokens=24,
                              do_sample=False, cache_implementation="static", disable_compile=True,
                              pad_token_id=0)[:, 12:].tolist()
    monkeypatch.setitem(gptq_layer.FUSED_MAX_TOKENS, bits, 64)  # every forward here: the prompt is 48 tokens
    fused = greedy()
    monkeypatch.setitem(gptq_layer.FUSED_MAX_TOKENS, bits, 0)
    assert greedy() == fused
