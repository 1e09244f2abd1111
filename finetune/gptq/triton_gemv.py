"""A GPTQ matmul for few tokens on CUDA with Triton: y = x @ W.t(), W unpacked tile by tile in registers.

Why a second kernel beside `triton_dequant`: decoding multiplies 1-64 tokens, so the matmul is bound by reading the
weights, and dequantise-then-cuBLAS reads the packed weights, writes a dense bf16 copy four times their size and
reads it back. Here each program reads its packed tile once, unpacks and scales it in registers, and multiplies it
into its accumulator; no dense weight exists anywhere. `layer.FUSED_MAX_TOKENS` holds, per bit width, the token
count up to which GPTQLinear uses it.

The decode layout (`prepare`, once per layer at its first fused call). Gathering each input row's scale and zero
point through act-order's shuffled g_idx, and unpacking each row from its own word, made the first version of this
kernel instruction-bound at ~10 % of the memory bandwidth. So the layer's rows are reordered in place, once:
  * sorted by group: any 16 consecutive sorted rows share one group (group sizes are multiples of 16), whose
    scales and zero points are loaded, unpacked and converted once per 16 rows; the activations are permuted to the
    same order per call (`x_order`: tokens x in_features, nothing next to the weights);
  * interleaved within tiles of 16 packed blocks (a block: the 32 / bits values of one int32 word, or 32 values in
    three words at 3 bits): value j of block r holds sorted row 16 j + r. Sub-tile j, 16 consecutive sorted rows,
    is then one constant shift of the tile's 16 loaded words per column: no per-row word gather, no reshape, and at
    3 bits the two values that straddle words do so at compile-time positions.
The packing is format.pack's, of the rows in their new order, and qweight and g_idx keep their shapes: the layout
replaces the checkpoint's, no second copy. `stored_rows` (stored position -> checkpoint row) lets the dequantise
kernel and format.dequantize put every row back, so all other callers see the same dense weight; GPTQLinear's
state_dict gives the checkpoint layout back. Layers it cannot take (in_features not a multiple of the tile, e.g. 3-bit
with in_features % 512 != 0; a g_idx that is not a shuffled row // group_size; FSDP-sharded) keep the dequant path.

The values multiplied are the training path's exactly: (1024 + q) - (1024 + zero) is q - zero, exact in fp16, and
one fp16 multiply by the scale rounds the exact product once, as `format.dequantize` does; that fp16 weight is then
cast to the activations' dtype. Accumulation is fp32. Few tokens leave few output tiles, so the tiles along
in_features are split over programs (to fill the SMs); each writes fp32 partial sums, and the last program of an
output tile (an atomic counter) adds them in split order (deterministic) and writes the output: one launch.
"""

import torch

from . import format as gptq_format
from .triton_dequant import triton

if triton is not None:
    import triton.language as tl

    from .triton_dequant import _bits_at

SUB_ROWS = 16  # sorted rows per sub-tile: one tl.dot's K, the least a bf16 tensor-core dot takes
# Per BLOCK_M (1: multiply and sum on the CUDA cores; 16-64: tl.dot): output columns per program, warps, pipeline
# stages, and programs per SM wanted (the split along in_features is chosen to launch about that many).
TILES = {1: (128, 4, 2, 4), 16: (128, 4, 3, 4), 32: (128, 4, 3, 4), 64: (128, 8, 3, 4)}
_partials: dict[torch.device, torch.Tensor] = {}
_counters: dict[torch.device, torch.Tensor] = {}


def values_per_block(bits: int) -> int:
    return 32 // bits if 32 % bits == 0 else 32


def tile_rows(bits: int) -> int:
    """Input rows per tile of the decode layout: 128 at 4 bits, 512 at 3."""
    return SUB_ROWS * values_per_block(bits)


def _can_take(layer) -> bool:
    tile, group = tile_rows(layer.bits), layer.group_size
    return (layer.in_features % tile == 0 and not layer.__dict__.get("int_dtypes")  # int_dtypes: held for FSDP2
            and type(layer.qweight.data) is torch.Tensor  # not a DTensor shard
            and (group == -1 or group % SUB_ROWS == 0 and (group % tile == 0 or tile % group == 0)))


def _stored_rows(g_idx: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(stored position -> checkpoint row, sorted row -> checkpoint row), or None if g_idx is not a permutation of
    row // group_size."""
    in_features = g_idx.shape[0]
    order = torch.sort(g_idx, stable=True).indices
    if not torch.equal(g_idx[order].long(), gptq_format.default_g_idx(in_features, group_size, g_idx.device).long()):
        return None
    values = values_per_block(bits)
    position = torch.arange(in_features, device=g_idx.device)
    block, value = position // values, position % values
    sorted_row = block // SUB_ROWS * SUB_ROWS * values + value * SUB_ROWS + block % SUB_ROWS
    return order[sorted_row], order


def _move_rows(qweight: torch.Tensor, source_rows: torch.Tensor, bits: int) -> None:
    """In place: row i of the packed weight becomes row source_rows[i], a slab of columns at a time."""
    in_features = source_rows.shape[0]
    step = max(1, 2 ** 25 // in_features)
    for first in range(0, qweight.shape[1], step):
        values = gptq_format.unpack(qweight[:, first:first + step], bits, in_features)
        qweight[:, first:first + step] = gptq_format.pack(values[source_rows], bits)


def prepare(layer) -> bool:
    """Whether the fused kernel can multiply this layer; the first call puts the layer into the decode layout."""
    if getattr(layer, "stored_rows", None) is not None:
        return True
    if layer.__dict__.get("_no_decode_layout") or not _can_take(layer):
        return False
    with torch.inference_mode(False), torch.no_grad():  # plain tensors: the layer may train afterwards
        rows = _stored_rows(layer.g_idx, layer.bits, layer.group_size)
        if rows is None:
            layer._no_decode_layout = True
            return False
        _move_rows(layer.qweight.data, rows[0], layer.bits)
        layer.g_idx = layer.g_idx[rows[0]]
        layer.stored_rows, layer.x_order = rows[0].int(), rows[1].int()
    return True


def checkpoint_layout(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's qweight and g_idx in the checkpoint's row order (copies)."""
    back = torch.argsort(layer.stored_rows.long())  # checkpoint row -> stored position
    qweight = layer.qweight.detach().clone()
    _move_rows(qweight, back, layer.bits)
    return qweight, layer.g_idx.detach()[back]


def fused_matmul(x: torch.Tensor, layer) -> torch.Tensor:
    """x [..., in] @ the layer's weight.t() -> [..., out] in x's dtype, reading only its packed tensors."""
    if triton is None:
        raise RuntimeError("Triton is needed to multiply GPTQ weights on a GPU; install it (pip install triton, "
                           "it ships with PyTorch's CUDA wheels)")
    if not prepare(layer):
        raise ValueError(f"{layer}: not in a layout the fused kernel reads (see triton_gemv's docstring)")
    in_features, out_features, device = layer.in_features, layer.out_features, x.device
    rows = x.reshape(-1, in_features).index_select(1, layer.x_order)  # sorted row order, contiguous
    tokens = rows.shape[0]
    block_m = 1 if tokens == 1 else min(64, max(16, triton.next_power_of_2(tokens)))
    block_n, warps, stages, per_sm = TILES[block_m]
    column_tiles, token_tiles = triton.cdiv(out_features, block_n), triton.cdiv(tokens, block_m)
    tiles = in_features // tile_rows(layer.bits)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    splits = max(1, min(tiles, round(per_sm * sms / (column_tiles * token_tiles))))
    per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, per_split)  # no empty split
    out = torch.empty((tokens, out_features), device=device, dtype=x.dtype)
    partials = _buffer(_partials, device, torch.float32, splits * tokens * out_features if splits > 1 else 1)
    counters = _buffer(_counters, device, torch.int32, column_tiles * token_tiles)
    group = layer.group_size if layer.group_size != -1 else 1 << 30
    _decode_kernel[(column_tiles, splits, token_tiles)](
        rows, layer.qweight, layer.qzeros, layer.scales, partials, counters, out, tokens, in_features,
        out_features, layer.qzeros.shape[1], per_split, splits, BITS=layer.bits, VALUES=values_per_block(layer.bits),
        GROUP=group, ZERO_OFFSET=1 if layer.checkpoint_format == "gptq" else 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages)
    return out.reshape(*x.shape[:-1], out_features)


def _buffer(cache: dict, device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """One buffer per device, grown on demand (zeros: the counters reset themselves after each use). Every use is
    on the current stream, which orders one call's use before the next's."""
    buffer = cache.get(device)
    if buffer is None or buffer.numel() < numel:
        cache.pop(device, None)
        buffer = cache[device] = torch.zeros(numel, dtype=dtype, device=device)
    return buffer


if triton is not None:

    @triton.jit
    def _as_fp16(values):
        """Small non-negative int32 values (< 1024) as exact fp16 numbers plus 1024, without an int->float
        conversion: 0x6400 is fp16 1024.0, whose last 10 mantissa bits count ones."""
        return (values | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)

    # token count, split sizes, zero-point words: no recompile per value (in/out_features keep Triton's divisibility
    # specialisation, which lets the weight loads vectorise)
    @triton.jit(do_not_specialize=["tokens", "zero_words", "tiles_per_split", "splits"])
    def _decode_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, part_ptr, count_ptr, out_ptr, tokens,
                       in_features, out_features, zero_words, tiles_per_split, splits,
                       BITS: tl.constexpr, VALUES: tl.constexpr, GROUP: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
        split = tl.program_id(1)
        tok = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok, tok_ok = cols < out_features, tok < tokens
        sub = tl.arange(0, 16)
        zero_word, zero_shift = cols * BITS // 32, cols * BITS % 32  # each column's zero point in a group's words
        if BLOCK_M == 1:  # one token: products summed along the rows once, after the loop
            acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = split * tiles_per_split
        for tile in range(first, tl.minimum(first + tiles_per_split, in_features // (16 * VALUES))):
            # the tile's 16 blocks, each VALUES * BITS / 32 words (1, or 3 at 3 bits): "planes" of 16 words per column
            words = qweight_ptr + ((tile * 16 + sub) * (VALUES * BITS // 32))[:, None] * out_features + cols[None, :]
            plane0 = tl.load(words, mask=col_ok[None, :], other=0).to(tl.uint32, bitcast=True)
            if VALUES * BITS > 32:
                plane1 = tl.load(words + out_features, mask=col_ok[None, :], other=0).to(tl.uint32, bitcast=True)
                plane2 = tl.load(words + 2 * out_features, mask=col_ok[None, :], other=0).to(tl.uint32, bitcast=True)
            for j in tl.static_range(VALUES):  # sub-tile j: sorted rows tile * 16 * VALUES + 16 j + sub
                row0 = tile * 16 * VALUES + 16 * j
                if (16 * j) % GROUP == 0:  # a new group starts (or the tile does): its scales and zero points
                    group = row0 // GROUP
                    zero_at = group * zero_words + zero_word
                    zeros = _as_fp16(_bits_at(qzeros_ptr, zero_at, zero_at + 1, zero_shift, col_ok, BITS) + ZERO_OFFSET)
                    scales = tl.load(scales_ptr + group * out_features + cols, mask=col_ok, other=0.0)
                if BITS * j // 32 == 0:  # value j's word in its block (compile time, as its shift)
                    q = plane0 >> (BITS * j % 32)
                elif BITS * j // 32 == 1:
                    q = plane1 >> (BITS * j % 32)
                else:
                    q = plane2 >> (BITS * j % 32)
                if BITS * j % 32 + BITS > 32:  # straddles into the next word (3-bit values 10 and 21)
                    if BITS * j // 32 == 0:
                        q = q | (plane1 << (32 - BITS * j % 32))
                    else:
                        q = q | (plane2 << (32 - BITS * j % 32))
                q = (q & ((1 << BITS) - 1)).to(tl.int32, bitcast=True)
                weight = ((_as_fp16(q) - zeros[None, :]) * scales[None, :]).to(x_ptr.dtype.element_ty)
                rows = row0 + sub
                if BLOCK_M == 1:
                    x = tl.load(x_ptr + tl.program_id(2) * in_features + rows)
                    acc += x.to(tl.float32)[:, None] * weight.to(tl.float32)
                else:
                    x = tl.load(x_ptr + tok[:, None] * in_features + rows[None, :], mask=tok_ok[:, None], other=0.0)
                    acc = tl.dot(x, weight, acc, input_precision=DOT_PRECISION)
        if BLOCK_M == 1:
            result = tl.sum(acc, axis=0)[None, :]
        else:
            result = acc
        mask = tok_ok[:, None] & col_ok[None, :]
        at = tok[:, None] * out_features + cols[None, :]
        if splits == 1:
            tl.store(out_ptr + at, result.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(part_ptr + split * tokens * out_features + at, result, mask=mask)
            tl.debug_barrier()  # every thread's partial sums stored before the counter moves (acq_rel, gpu scope)
            counter = count_ptr + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
            if tl.atomic_add(counter, 1) == splits - 1:  # the output tile's last split: add them all, in order
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for other in range(splits):
                    total += tl.load(part_ptr + other * tokens * out_features + at, mask=mask, other=0.0,
                                     cache_modifier=".cg")  # from L2: another SM wrote it
                tl.store(out_ptr + at, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(counter, 0)
