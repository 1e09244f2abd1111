"""The Triton dequantisation kernel against the CPU reference (format.dequantize): bit-equal, every packing.

CI has no GPU: there the kernel runs in Triton's interpreter (fp32 and fp16 outputs; the interpreter truncates
to bf16 instead of rounding, so bf16 is checked on the GPU only)."""

from importlib.util import find_spec

import pytest
import torch

from finetune.gptq.format import GPTQConfig, pack
from finetune.gptq.layer import GPTQLinear, reference_dequantize
from finetune.gptq.random_checkpoint import random_gptq_linear
from finetune.gptq.triton_dequant import workspace
from tests.subprocesses import run_python

PACKINGS = [GPTQConfig(bits=bits, group_size=group, desc_act=act, checkpoint_format=fmt)
            for bits in (2, 3, 4, 8)
            for group, act, fmt in ((32, True, "gptq"), (-1, True, "gptq_v2"), (64, False, "gptq"))]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_layer(in_features: int, out_features: int, config: GPTQConfig, seed: int, device="cpu") -> GPTQLinear:
    """A GPTQLinear with random weights, scales and (unlike the random checkpoint) random zero points."""
    generator = torch.Generator(device).manual_seed(seed)
    layer = GPTQLinear(in_features, out_features, config, device=device)
    tensors = random_gptq_linear(in_features, out_features, config, generator, device)
    zeros = torch.randint(0, 2 ** config.bits, (config.n_groups(in_features), out_features), generator=generator,
                          dtype=torch.int32, device=device)
    tensors["qzeros"] = pack(zeros.t(), config.bits).t().contiguous()
    layer.set_packed(**tensors)
    return layer


def test_imports_without_triton_and_says_what_is_missing():
    result = run_python("""
        import sys
        sys.modules["triton"] = None  # as on a machine without Triton
        import torch
        from finetune.gptq import triton_dequant
        from finetune.gptq.format import GPTQConfig
        from finetune.gptq.layer import GPTQLinear
        try:
            triton_dequant.dequantize_triton(GPTQLinear(64, 32, GPTQConfig(bits=4, group_size=32)), torch.bfloat16)
        except RuntimeError as err:
            print(err)
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("Triton is needed to dequantise GPTQ weights on a GPU; install it "
                                     "(pip install triton, it ships with PyTorch's CUDA wheels)")


def test_workspace_is_reused_and_grows():
    first = workspace(torch.device("cpu"), torch.float64, 100)
    smaller = workspace(torch.device("cpu"), torch.float64, 40)
    assert smaller.data_ptr() == first.data_ptr() and smaller.numel() == 40
    larger = workspace(torch.device("cpu"), torch.float64, 1000)
    assert larger.numel() == 1000
    assert workspace(torch.device("cpu"), torch.float64, 100).data_ptr() == larger.data_ptr()


@pytest.mark.skipif(find_spec("triton") is None, reason="needs Triton (its interpreter runs on the CPU)")
def test_kernel_is_bit_equal_to_reference_in_interpreter():
    result = run_python("""
        import torch
        from finetune.gptq.triton_dequant import dequantize_triton
        from finetune.gptq.layer import reference_dequantize
        from tests.gptq.test_triton_dequant import PACKINGS, random_layer
        for seed, config in enumerate(PACKINGS):
            # 104 rows: three programs of 32 rows and one of 8 at 3-bit (its last packed word padded), 6.5 of 16 at
            # 2-bit, 13 of 8 at 4-bit; three groups of 32 and a partial one, or one group of 64 and a partial one;
            # 136 columns fill part of a tile
            layer = random_layer(104, 136, config, seed)
            for dtype in (torch.float32, torch.float16):
                out = dequantize_triton(layer, dtype)
                assert out.shape == (136, 104), out.shape
                assert torch.equal(out, reference_dequantize(layer, dtype)), (config, dtype)
        print("ok", len(PACKINGS))
        """, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", str(len(PACKINGS))]


@needs_cuda
@pytest.mark.parametrize("config", PACKINGS, ids=lambda c: f"{c.bits}b-g{c.group_size}-{c.checkpoint_format}")
def test_gpu_kernel_is_bit_equal_to_cpu_reference(config):
    from finetune.gptq.triton_dequant import dequantize_triton
    cpu = random_layer(1000, 600, config, seed=config.bits)
    gpu = random_layer(1000, 600, config, seed=config.bits).to("cuda")  # Module.to moves in place: a second copy
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize_triton(gpu, dtype).cpu(), reference_dequantize(cpu, dtype)), dtype


@needs_cuda
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_gpu_forward_and_backward_match_cpu_reference(bits):
    """GPTQLinear on the GPU (kernel + cuBLAS) against fp32 math on the CPU with the same bf16 inputs: the only
    differences are the matmul's accumulation order and the output's rounding to bf16."""
    config = GPTQConfig(bits=bits, group_size=128, desc_act=True)
    cpu, gpu = random_layer(1024, 768, config, seed=bits), random_layer(1024, 768, config, seed=bits).to("cuda")
    x = torch.randn(2, 64, 1024, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    grad = torch.randn(2, 64, 768, dtype=torch.bfloat16, device="cuda")
    out = gpu(x)
    out.backward(grad)
    weight = reference_dequantize(cpu, torch.bfloat16).float()
    expected_out = x.detach().float().cpu() @ weight.t()
    expected_dx = grad.float().cpu() @ weight
    for got, want in ((out.detach(), expected_out), (x.grad, expected_dx)):
        assert got.dtype == torch.bfloat16
        error = (got.float().cpu() - want).norm() / want.norm()
        assert error < 4e-3, error  # bf16 has 8 significant bits: rounding alone gives ~2e-3
