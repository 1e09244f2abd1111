"""GPTQ dequantisation on CUDA with Triton: packed int32 weights -> a dense bf16/fp16 weight that cuBLAS multiplies.

Why dequantise-then-cuBLAS rather than a fused quantised matmul: training multiplies thousands of tokens at once,
so the matmul is compute-bound (an 8192 x 28672 weight times 4096 tokens is ~2.4 ms on an H100) while writing the
dense weight is pure memory traffic (~0.5 GB, ~0.2 ms). cuBLAS is the fastest matmul there is; the kernel's job is
only to make the weight quickly and exactly.

One program writes the rows of whole packed words (8 rows for 4-bit, 16 for 2-bit, 4 for 8-bit, 32 for 3-bit:
three words, since 3-bit values straddle words) by BLOCK_O columns, in [in, out] layout, the layout qweight is
packed in: loads and stores are contiguous along `out`, and each packed word is loaded once and unpacked by shifts
in registers. (A program per row loaded each word again for every row it holds, through L2: 1.6 times as long at
70B's 4-bit shapes, twice at 3-bit; eval/BENCHMARKS.md.) Each element is (q - zero) * scale, an exact product in
fp32 (a small integer times an fp16) rounded to fp16, then cast to the output dtype, the same as
`format.dequantize`: the results are bit-equal to the CPU reference. Act-order needs nothing special: each row's
group comes from g_idx, and that group's scales and zeros are gathered (a layer's scales are a few MiB, so the
gathers hit L2).

The dense weight goes into one workspace per (device, dtype), reused by every call: `GPTQLinear` reads it once
in its matmul and never keeps it, so a 70B model needs one weight-sized buffer, not one per layer.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): the kernel is needed only for tensors on a CUDA device
    triton = None

BLOCK_O, NUM_WARPS = 1024, 4  # columns per program: the fastest measured for every width at 70B shapes (BENCHMARKS.md)

_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def workspace(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat buffer of `numel` elements: one per (device, dtype), grown to the largest request and reused.

    Valid until the next request for the same device and dtype; every use is on the current stream, so stream
    order keeps a matmul's read of it ahead of the next dequantisation's write."""
    key = (torch.device(device), dtype)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < numel:
        _workspaces.pop(key, None)  # let the smaller buffer go before allocating the larger one
        buffer = _workspaces[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def dequantize_triton(layer, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [out, in] of a GPTQLinear on CUDA, bit-equal to `format.dequantize`.

    It is a transposed view of the shared workspace: use it before the next call on this device and dtype."""
    if triton is None:
        raise RuntimeError("Triton is needed to dequantise GPTQ weights on a GPU; install it (pip install triton, "
                           "it ships with PyTorch's CUDA wheels)")
    in_features, out_features, bits = layer.in_features, layer.out_features, layer.bits
    weight = workspace(layer.qweight.device, dtype, in_features * out_features).view(in_features, out_features)
    rows = 32 // math.gcd(32, bits)  # the rows of a whole number of packed words
    grid = (triton.cdiv(in_features, rows), triton.cdiv(out_features, BLOCK_O))
    _dequantize_kernel[grid](
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx, weight, in_features, out_features,
        layer.qzeros.shape[1], BITS=bits, ROWS=rows, ZERO_OFFSET=1 if layer.checkpoint_format == "gptq" else 0,
        BLOCK_O=BLOCK_O, num_warps=NUM_WARPS)
    return weight.t()


if triton is not None:

    @triton.jit
    def _bits_at(words_ptr, word_offsets, next_word_offsets, shift, mask, BITS: tl.constexpr):
        """The BITS-bit values that start at bit `shift` of the int32 words at `word_offsets`; a 3-bit value
        that does not fit continues in the low bits of the words at `next_word_offsets`."""
        words = tl.load(words_ptr + word_offsets, mask=mask, other=0).to(tl.uint32, bitcast=True)
        values = words >> shift.to(tl.uint32)  # logical shift: no sign bits to mask off
        if 32 % BITS != 0:
            straddles = shift > 32 - BITS
            high = tl.load(words_ptr + next_word_offsets, mask=mask & straddles, other=0).to(tl.uint32, bitcast=True)
            values = tl.where(straddles, values | (high << ((32 - shift) % 32).to(tl.uint32)), values)
        return (values & ((1 << BITS) - 1)).to(tl.int32)

    @triton.jit
    def _word(index: tl.constexpr, first, second, third):
        """The index-th of a program's packed word rows (three at most: 3-bit)."""
        if index == 0:
            return first
        if index == 1:
            return second
        return third

    @triton.jit
    def _dequantize_kernel(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, in_features, out_features,
                           zero_words_per_group, BITS: tl.constexpr, ROWS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                           BLOCK_O: tl.constexpr):
        cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # output features
        col_ok = cols < out_features

        # qweight [ceil(I * BITS / 32), O]: each output column is a bit stream along the input rows, its last word
        # padded; this program's rows are ROWS * BITS / 32 words of it (those past the stream's end not loaded)
        first_word = tl.program_id(0) * (ROWS * BITS // 32)
        stream_bits = in_features * BITS
        words = tl.load(qweight_ptr + first_word * out_features + cols, mask=col_ok, other=0).to(tl.uint32,
                                                                                                  bitcast=True)
        second, third = words, words
        if ROWS * BITS // 32 > 1:
            second = tl.load(qweight_ptr + (first_word + 1) * out_features + cols,
                             mask=col_ok & ((first_word + 1) * 32 < stream_bits), other=0).to(tl.uint32, bitcast=True)
            third = tl.load(qweight_ptr + (first_word + 2) * out_features + cols,
                            mask=col_ok & ((first_word + 2) * 32 < stream_bits), other=0).to(tl.uint32, bitcast=True)

        # qzeros [G, O * BITS / 32]: each group's row is a bit stream along the output columns
        col_bits = cols * BITS
        zero_words, zero_shifts = col_bits // 32, col_bits % 32
        for j in tl.static_range(ROWS):  # unrolled: the word and shift of each row are constants
            values = _word(j * BITS // 32, words, second, third) >> (j * BITS % 32)
            if j * BITS % 32 > 32 - BITS:  # a 3-bit value that continues in the low bits of the next word
                values = values | (_word(j * BITS // 32 + 1, words, second, third) << (32 - j * BITS % 32))
            q = (values & ((1 << BITS) - 1)).to(tl.int32)
            row = tl.program_id(0) * ROWS + j  # input feature
            row_ok = row < in_features
            inside = col_ok & row_ok
            group = tl.load(g_idx_ptr + row, mask=row_ok, other=0)
            z_words = group * zero_words_per_group + zero_words
            zeros = _bits_at(qzeros_ptr, z_words, z_words + 1, zero_shifts, inside, BITS) + ZERO_OFFSET
            scales = tl.load(scales_ptr + group * out_features + cols, mask=inside, other=0.0)
            weight = (q - zeros).to(tl.float32) * scales.to(tl.float32)  # exact; rounded to fp16 as format.dequantize
            tl.store(out_ptr + row * out_features + cols, weight.to(tl.float16).to(out_ptr.dtype.element_ty),
                     mask=inside)
