"""A GPTQ matmul for few tokens on CUDA with Triton: y = x @ W.t(), W unpacked tile by tile in registers.

Why a second kernel beside `triton_dequant`: decoding multiplies 1-64 tokens, so the matmul is bound by reading the
weights, and dequantise-then-cuBLAS reads the packed weights, writes a dense bf16 copy four times their size and
reads it back. Here each program reads its packed tile once, unpacks and scales it in registers, and multiplies it
into its accumulator; no dense weight exists anywhere. `layer.FUSED_MAX_TOKENS` holds, per bit width, the token
count up to which GPTQLinear uses it (measured, BENCHMARKS.md).

The values multiplied are the training path's exactly: (1024 + q) - (1024 + zero) is q - zero, exact in fp16, and
one fp16 multiply by the scale rounds the exact product once, as `format.dequantize` does; that fp16 weight is then
cast to the activations' dtype. Accumulation is fp32. Act-order needs no repacking and no second copy of the
weights: each input row's group comes from g_idx, and that group's scale and zero point are gathered per row (a
program's slice of them stays in L1). Gathering zero points from their packed words costs more than all the rest
(measured), so each layer keeps them unpacked, one byte per group and output (`unpacked_zeros`: 1/64 of the
weights' bytes at group 128).

Packing (format.py): 2/4/8-bit rows come 32/bits to an int32 word, so a tile's words are read once and expand
along a new axis into rows; 3-bit values may straddle two words, so each row reads its own word(s).
"""

import torch

from . import format as gptq_format
from .triton_dequant import triton

if triton is not None:
    import triton.language as tl

    from .triton_dequant import _bits_at

# Tiles per path (output columns, input rows, warps, pipeline stages), and the fewest programs to launch: the input
# rows are split until that many run, so that enough loads are in flight. Fastest of those tried at Llama-2-70B
# shapes, 4-bit g128 act-order, H100 (eval/BENCHMARKS.md).
ONE_TOKEN_TILE, ONE_TOKEN_MIN_PROGRAMS = (128, 64, 4, 2), 264  # one token: multiply and sum on the CUDA cores
DOT_TILE, DOT_MIN_PROGRAMS = (64, 64, 4, 4), 528  # 2+ tokens: tl.dot on the tensor cores (16 rows at least)


def unpacked_zeros(layer) -> torch.Tensor:
    """The layer's stored zero points [groups, out] as uint8 (v1's minus-one kept), unpacked once and cached on
    the layer for as long as its qzeros tensor is the same."""
    key = (layer.qzeros.data_ptr(), layer.qzeros._version)
    cached = getattr(layer, "_unpacked_zeros", None)
    if cached is None or cached[0] != key:
        zeros = gptq_format.unpack(layer.qzeros.t(), layer.bits, layer.out_features).t().to(torch.uint8).contiguous()
        cached = layer._unpacked_zeros = (key, zeros)
    return cached[1]


def fused_matmul(x: torch.Tensor, layer) -> torch.Tensor:
    """x [..., in] @ the layer's weight.t() -> [..., out] in x's dtype, reading only its packed tensors."""
    if triton is None:
        raise RuntimeError("Triton is needed to multiply GPTQ weights on a GPU; install it (pip install triton, "
                           "it ships with PyTorch's CUDA wheels)")
    in_features, out_features = layer.in_features, layer.out_features
    rows = x.reshape(-1, in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    tokens = rows.shape[0]
    if tokens == 1:
        (block_n, block_k, warps, stages), min_programs, block_m = ONE_TOKEN_TILE, ONE_TOKEN_MIN_PROGRAMS, 1
    else:
        (block_n, block_k, warps, stages), min_programs = DOT_TILE, DOT_MIN_PROGRAMS
        block_m = min(64, max(16, triton.next_power_of_2(tokens)))
    column_blocks, k_blocks = triton.cdiv(out_features, block_n), triton.cdiv(in_features, block_k)
    token_blocks = triton.cdiv(tokens, block_m)
    split = max(1, min(k_blocks, min_programs // (column_blocks * token_blocks)))
    blocks_per_split = triton.cdiv(k_blocks, split)
    split = triton.cdiv(k_blocks, blocks_per_split)  # no empty split
    # one split writes x's dtype directly; several write fp32 partial sums, added in a fixed order (deterministic)
    out = torch.empty((split, tokens, out_features), device=x.device,
                      dtype=x.dtype if split == 1 else torch.float32)
    _fused_matmul_kernel[(column_blocks, split, token_blocks)](
        rows, layer.qweight, unpacked_zeros(layer), layer.scales, layer.g_idx, out, tokens, in_features,
        out_features, rows.stride(0), blocks_per_split * block_k,
        BITS=layer.bits, ZERO_OFFSET=1 if layer.checkpoint_format == "gptq" else 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    out = out[0] if split == 1 else out.sum(0).to(x.dtype)
    return out.reshape(*x.shape[:-1], out_features)


if triton is not None:

    @triton.jit
    def _as_fp16(values):
        """Small non-negative int32 values (< 1024) as exact fp16 numbers plus 1024, without an int->float
        conversion: 0x6400 is fp16 1024.0, whose last 10 mantissa bits count ones."""
        return (values | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _unpack_rows(qweight_ptr, k0, ks, cols, mask, in_features, out_features, BITS: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """The BITS-bit values of input rows ks = k0 + arange(BLOCK_K) (k0 a multiple of 32) in columns `cols`."""
        if 32 % BITS == 0:  # each packed word read once, its 32 / BITS rows shifted out along a new axis
            PER_WORD: tl.constexpr = 32 // BITS
            words = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
            word_mask = (words * PER_WORD < in_features)[:, None] & (cols < out_features)[None, :]
            packed = tl.load(qweight_ptr + words[:, None] * out_features + cols[None, :], mask=word_mask,
                             other=0).to(tl.uint32, bitcast=True)
            shifts = (tl.arange(0, PER_WORD) * BITS).to(tl.uint32)
            values = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
            return tl.reshape(values, (BLOCK_K, BLOCK_N)).to(tl.int32)
        else:  # 3-bit: a row's value sits in word row * 3 // 32 at bit row * 3 % 32, maybe running into the next
            row_bits = ks * BITS
            q_words = (row_bits // 32)[:, None] * out_features + cols[None, :]
            return _bits_at(qweight_ptr, q_words, q_words + out_features, (row_bits % 32)[:, None], mask, BITS)

    @triton.jit
    def _fused_matmul_kernel(x_ptr, qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, out_ptr, tokens, in_features,
                             out_features, x_row_stride, rows_per_split,
                             BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
        split = tl.program_id(1)
        first_tok = tl.program_id(2) * BLOCK_M
        tok = first_tok + tl.arange(0, BLOCK_M)
        col_ok, tok_ok = cols < out_features, tok < tokens
        if BLOCK_M == 1:  # one token: products summed along the rows once, after the loop
            acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        start = split * rows_per_split
        for k0 in range(start, tl.minimum(start + rows_per_split, in_features), BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < in_features
            mask = k_ok[:, None] & col_ok[None, :]
            q = _unpack_rows(qweight_ptr, k0, ks, cols, mask, in_features, out_features, BITS, BLOCK_K, BLOCK_N)
            groups = tl.load(g_idx_ptr + ks, mask=k_ok, other=0)[:, None] * out_features + cols[None, :]
            zeros = tl.load(zeros_ptr + groups, mask=mask, other=0).to(tl.int32) + ZERO_OFFSET
            scales = tl.load(scales_ptr + groups, mask=mask, other=0.0)
            # rows past in_features: zero x, and weight (q - zero) * 0 = 0
            weight = ((_as_fp16(q) - _as_fp16(zeros)) * scales).to(x_ptr.dtype.element_ty)
            if BLOCK_M == 1:
                x = tl.load(x_ptr + first_tok * x_row_stride + ks, mask=k_ok, other=0.0)
                acc += x.to(tl.float32)[:, None] * weight.to(tl.float32)
            else:
                x = tl.load(x_ptr + tok[:, None] * x_row_stride + ks[None, :], mask=tok_ok[:, None] & k_ok[None, :],
                            other=0.0)
                acc = tl.dot(x, weight, acc, input_precision=DOT_PRECISION)
        if BLOCK_M == 1:
            result = tl.sum(acc, axis=0)[None, :]
        else:
            result = acc
        out = out_ptr + split * tokens * out_features + tok[:, None] * out_features + cols[None, :]
        tl.store(out, result.to(out_ptr.dtype.element_ty), mask=tok_ok[:, None] & col_ok[None, :])
