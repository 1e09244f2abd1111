"""The fused few-token GPTQ matmul (triton_gemv): it multiplies with exactly the training path's weights.

An identity input makes the matmul's output the weight itself (each output is one weight times 1 plus zeros, exact
in fp32), so `torch.equal` against `format.dequantize` checks every unpacked value, zero point and scale. CI has no
GPU: there the kernel runs in Triton's interpreter (fp16 and fp32; the interpreter truncates to bf16 instead of
rounding, so bf16 is checked on the GPU only). The decode layout (rows reordered in place) is plain torch: its
round trips are checked on the CPU."""

from importlib.util import find_spec

import pytest
import torch
from transformers import LlamaConfig

from finetune.gptq import layer as gptq_layer
from finetune.gptq.format import GPTQConfig
from finetune.gptq.layer import reference_dequantize
from finetune.gptq.random_checkpoint import write_random_gptq_checkpoint
from finetune.gptq.triton_gemv import prepare, tile_rows
from tests.gptq.test_triton_dequant import random_layer, run_python

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(find_spec("triton") is None, reason="needs Triton (its interpreter runs on the CPU)")
# Meditron-70B-GPTQ's branches (4- and 3-bit; group -1, 32, 128; act-order; v1 zero points), plus 2 and 8 bits
BRANCHES = [GPTQConfig(bits=bits, group_size=group, desc_act=group != -1 or bits == 3)
            for bits in (4, 3) for group in (-1, 128, 32)]
PACKINGS = BRANCHES + [GPTQConfig(bits=2, group_size=64, desc_act=True),
                       GPTQConfig(bits=8, group_size=128, checkpoint_format="gptq_v2")]


def name(config: GPTQConfig) -> str:
    return f"{config.bits}b-g{config.group_size}{'-act' if config.desc_act else ''}-{config.checkpoint_format}"


@needs_triton
def test_identity_input_gives_the_reference_weight_in_interpreter():
    result = run_python("""
        import torch
        from finetune.gptq.triton_gemv import fused_matmul, tile_rows
        from finetune.gptq.layer import reference_dequantize
        from tests.gptq.test_triton_gemv import PACKINGS
        from tests.gptq.test_triton_dequant import random_layer
        # every bit width; groups 32 (several per tile), 128, 64; one and two tiles (then split over programs)
        for seed, config in enumerate([PACKINGS[2], PACKINGS[4], PACKINGS[6], PACKINGS[7]]):
            rows = tile_rows(config.bits) * (2 if config.bits != 3 else 1)
            layer = random_layer(rows, 72, config, seed)
            for dtype in (torch.float32, torch.float16):
                weight, eye = reference_dequantize(layer, dtype), torch.eye(rows, dtype=dtype)
                assert torch.equal(fused_matmul(eye, layer).t(), weight), (config, dtype)
                for row in (0, rows - 1):  # one token takes the multiply-and-sum path, not tl.dot
                    assert torch.equal(fused_matmul(eye[row], layer), weight[:, row]), (config, dtype, row)
            x = torch.randn(2, 3, rows)
            want = x @ reference_dequantize(layer, torch.float32).t()
            assert (fused_matmul(x, layer) - want).abs().max() < 1e-5 * want.abs().max(), config
        print("ok")
        """, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok"]


@needs_triton
def test_dequantise_kernel_puts_decode_layout_rows_back_in_interpreter():
    result = run_python("""
        import torch
        from finetune.gptq.triton_dequant import dequantize_triton
        from finetune.gptq.triton_gemv import prepare, tile_rows
        from finetune.gptq.layer import reference_dequantize
        from tests.gptq.test_triton_gemv import PACKINGS
        from tests.gptq.test_triton_dequant import random_layer
        for seed, config in enumerate([PACKINGS[2], PACKINGS[7]]):  # rows go back whatever the bit width
            layer = random_layer(tile_rows(config.bits), 24, config, seed)
            want = reference_dequantize(layer, torch.float32)
            assert prepare(layer) and layer.stored_rows is not None
            assert torch.equal(dequantize_triton(layer, torch.float32), want), config
        print("ok")
        """, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok"]


@pytest.mark.parametrize("config", PACKINGS + [GPTQConfig(bits=4, group_size=128)], ids=name)
def test_decode_layout_keeps_the_weight_and_gives_the_checkpoint_back(config):
    """On the CPU too (plain torch): reordered rows dequantise and multiply as before, and state_dict and
    load_state_dict speak the checkpoint's layout."""
    rows = tile_rows(config.bits) * 2
    layer = random_layer(rows, 40, config, seed=config.bits)
    checkpoint = {k: v.clone() for k, v in layer.state_dict().items()}
    weight, x = reference_dequantize(layer, torch.float32), torch.randn(3, rows)
    out = layer(x)
    assert prepare(layer) and layer.stored_rows is not None and layer.x_order is not None
    if config.desc_act:
        assert not torch.equal(layer.qweight, checkpoint["qweight"])  # the rows did move
    assert layer.qweight.shape == checkpoint["qweight"].shape and layer.g_idx.shape == checkpoint["g_idx"].shape
    assert torch.equal(reference_dequantize(layer, torch.float32), weight)
    assert torch.equal(layer.dequantize_weight(torch.float32), weight)
    assert torch.equal(layer(x), out)
    saved = layer.state_dict()
    assert saved.keys() == checkpoint.keys() and all(torch.equal(saved[k], checkpoint[k]) for k in checkpoint)
    assert prepare(layer)  # made once
    layer.load_state_dict(checkpoint)
    assert layer.stored_rows is None and layer.x_order is None
    assert torch.equal(layer.qweight, checkpoint["qweight"]) and torch.equal(layer.g_idx, checkpoint["g_idx"])


def test_layers_the_decode_layout_cannot_take_are_left_alone():
    config = GPTQConfig(bits=3, group_size=32, desc_act=True)
    odd = random_layer(tile_rows(3) - 32, 16, config, seed=0)  # in_features not a multiple of the 512-row tile
    uneven = random_layer(tile_rows(3), 16, config, seed=1)
    uneven.g_idx = torch.arange(tile_rows(3), dtype=torch.int32) % 16  # 16 groups of 32, but not row // 32 shuffled
    uneven.g_idx[:2] = torch.tensor([15, 15], dtype=torch.int32)
    sharded = random_layer(tile_rows(3), 16, config, seed=2)
    sharded.hold_ints_as_floats()  # as for FSDP2
    for layer in (odd, uneven, sharded):
        qweight, g_idx = layer.qweight.clone(), layer.g_idx.clone()
        assert not prepare(layer) and not prepare(layer)
        assert layer.stored_rows is None and torch.equal(layer.qweight, qweight) and torch.equal(layer.g_idx, g_idx)


@needs_cuda
@pytest.mark.parametrize("config", PACKINGS, ids=name)
def test_gpu_identity_input_gives_the_reference_weight(config):
    """bf16 (fp16 runs in the interpreter and in the greedy test below; each dtype and token tile is a compile)."""
    from finetune.gptq.triton_gemv import fused_matmul
    cpu = random_layer(1024, 608, config, seed=config.bits)  # 608 columns: not a multiple of the column tile
    gpu = random_layer(1024, 608, config, seed=config.bits).to("cuda")
    weight, eye = reference_dequantize(cpu, torch.bfloat16), torch.eye(1024, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(fused_matmul(eye, gpu).t().cpu(), weight)
    if config.group_size == 128:  # the Meditron main branches: every token tile (1, 16, 32 rows; 64 above)
        for tokens in (1, 8, 32):
            chosen = torch.arange(tokens) * (1024 // tokens) + tokens % 7  # spread: ones in many tiles
            assert torch.equal(fused_matmul(eye[chosen], gpu).cpu(), weight.t()[chosen]), tokens
    assert torch.equal(reference_dequantize(gpu, torch.bfloat16).cpu(), weight)


@needs_cuda
@pytest.mark.parametrize("bits", (3, 4))
def test_gpu_layer_switches_to_cublas_above_fused_max_tokens(bits):
    """Up to FUSED_MAX_TOKENS[bits] tokens the layer returns the fused kernel's result, above it dequantise +
    cuBLAS's; both are the same product up to accumulation order."""
    from finetune.gptq.triton_dequant import dequantize_triton
    from finetune.gptq.triton_gemv import fused_matmul
    cpu = random_layer(1024, 608, GPTQConfig(bits=bits, group_size=128, desc_act=True), seed=bits)
    layer = random_layer(1024, 608, GPTQConfig(bits=bits, group_size=128, desc_act=True), seed=bits).to("cuda")
    limit = gptq_layer.FUSED_MAX_TOKENS[bits]
    small = torch.randn(1, limit, 1024, dtype=torch.bfloat16, device="cuda")
    large = torch.randn(1, limit + 1, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        assert torch.equal(layer(small), fused_matmul(small, layer))
        assert layer.stored_rows is not None  # the decode layout, made by the first fused call
        weight = dequantize_triton(layer, torch.bfloat16)  # its rows put back: the checkpoint's weight
        assert torch.equal(weight.cpu(), reference_dequantize(cpu, torch.bfloat16))
        assert torch.equal(layer(large), large @ weight.t())
        error = (layer(small).float() - small.float() @ weight.float().t()).norm()
    assert error / (small.float() @ weight.float().t()).norm() < 4e-3


@needs_cuda
def test_gpu_layer_the_decode_layout_cannot_take_dequantises():
    from finetune.gptq.triton_dequant import dequantize_triton
    layer = random_layer(1000, 256, GPTQConfig(bits=4, group_size=128, desc_act=True), seed=0).to("cuda")
    x = torch.randn(3, 1000, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        assert torch.equal(layer(x), x @ dequantize_triton(layer, torch.bfloat16).t())
    assert layer.stored_rows is None


@needs_cuda
@pytest.mark.parametrize("bits", (3, 4))
def test_gpu_greedy_generation_equals_the_dequantise_path(bits, tmp_path, monkeypatch):
    """A tiny random Llama decodes the same tokens through the fused kernel as through dequantise + cuBLAS."""
    from finetune.gptq.loader import load_model
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    write_random_gptq_checkpoint(tmp_path, config, GPTQConfig(bits=bits, group_size=32, desc_act=True))
    model = load_model(tmp_path, device="cuda", dtype=torch.float16)
    prompts = torch.randint(0, 512, (4, 12), generator=torch.Generator().manual_seed(bits)).cuda()

    def greedy() -> list[list[int]]:
        return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=24, min_new_tokens=24,
                              do_sample=False, cache_implementation="static", disable_compile=True,
                              pad_token_id=0)[:, 12:].tolist()
    monkeypatch.setitem(gptq_layer.FUSED_MAX_TOKENS, bits, 0)
    dequantised = greedy()
    monkeypatch.setitem(gptq_layer.FUSED_MAX_TOKENS, bits, 64)  # every forward here: the prompt is 48 tokens
    assert greedy() == dequantised
    assert all(m.stored_rows is not None for m in model.modules() if isinstance(m, gptq_layer.GPTQLinear))
    monkeypatch.setitem(gptq_layer.FUSED_MAX_TOKENS, bits, 0)  # the dequantise path on the reordered rows
    assert greedy() == dequantised
