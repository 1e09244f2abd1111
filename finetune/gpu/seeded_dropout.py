"""LoRA dropout that keeps no mask: `drop(x, p, seed)` is x times a 0/1 mask that is a function of (seed, shape,
device) alone, so the backward draws the same mask again instead of keeping it.

On CUDA one Triton pass draws the mask and multiplies: x read once and written once. torch's `bernoulli_` +
multiply wrote the mask and read it back, three times per dropped tensor (forward, and the two uses in the
backward): ~0.2 s of a 2.3 s step at 70B. The draws, not the memory, bounded the pass, so the mask (`kept`) takes
eight draws of 16 bits from each Philox call (its four 32-bit words cut in halves) where `tl.rand` would make one
call per element: the drop probability is p rounded to 2**-16 (`drop_below`). Eight per call instead of four made
the pass memory-bound (44 us for a 70B layer's average dropped input on an H200, against ~38 us to read and write
it). The lean LoRA draws its masks inside LoRA-A's matmuls instead (`dropout_matmul`, by `kept`: the same
elements); `drop` serves the paths those kernels do not take and the tests. On the CPU the mask comes from torch's
seeded generator. The masks of the two devices differ; each device is self-consistent, which is all the backward
needs.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only CUDA tensors use the kernel
    triton = None

BLOCK = 4096

Dropout = tuple[float, int] | None  # a tensor's dropout: (p, seed of the mask), or None: none

_generators: dict[torch.device, torch.Generator] = {}


def drop(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x with each element zeroed with probability p (no 1/(1-p): the caller folds it in), the same elements for
    the same seed, shape and device. Returns a new contiguous tensor."""
    if x.is_cuda:
        return drop_triton(x, p, seed)
    generator = _generators.setdefault(x.device, torch.Generator(x.device))
    mask = torch.empty_like(x, memory_format=torch.contiguous_format).bernoulli_(
        1 - p, generator=generator.manual_seed(seed))
    return x * mask


def drop_triton(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """`drop` by the Triton kernel (CUDA; on the CPU under TRITON_INTERPRET=1, as the tests run it)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _drop_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), drop_below(p), seed, BLOCK=BLOCK)
    return out


def drop_below(p: float) -> int:
    """The kernels' mask drops an element whose 16 random bits are below round(p * 2**16): a drop probability
    within 2**-17 of p (0.05 becomes 3277 / 65536 = 0.0500031)."""
    return round(p * 65536)


def dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The 0/1 mask `drop` applies to a tensor of like's shape, dtype and device (for tests and reference paths)."""
    return drop(torch.ones_like(like, memory_format=torch.contiguous_format), p, seed)


if triton is not None:
    @triton.jit
    def kept(seed, first, below, ROWS: tl.constexpr, COLS: tl.constexpr):
        """The [ROWS, COLS] tile of the mask whose row r starts at flat offset first[r] (first [ROWS, 1] int64, each
        a multiple of 8): element at offset o is kept where its 16 bits of Philox counter o // 8 (the call's four
        32-bit words cut in halves, eight draws) are >= below (`drop_below(p)`). Any kernel that draws a tile
        this way drops the same elements as `drop`."""
        counters = first // 8 + tl.arange(0, COLS // 8)[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, counters)
        halves = tl.join(tl.join(tl.join(w0 & 0xFFFF, w0 >> 16), tl.join(w1 & 0xFFFF, w1 >> 16)),
                         tl.join(tl.join(w2 & 0xFFFF, w2 >> 16), tl.join(w3 & 0xFFFF, w3 >> 16)))
        return tl.reshape(halves, (ROWS, COLS)).to(tl.int32, bitcast=True) >= below

    @triton.jit
    def _drop_kernel(x_ptr, out_ptr, n, below, seed, BLOCK: tl.constexpr):
        first = tl.full((1, 1), BLOCK, tl.int64) * tl.program_id(0)
        offsets = first + tl.arange(0, BLOCK)[None, :]
        inside = offsets < n
        x = tl.load(x_ptr + offsets, mask=inside)
        tl.store(out_ptr + offsets, tl.where(kept(seed, first, below, 1, BLOCK), x, 0.0).to(x.dtype), mask=inside)
