"""LoRA dropout that keeps no mask: `drop(x, p, seed)` is x times a 0/1 mask that is a function of (seed, shape,
device) alone, so the backward draws the same mask again instead of keeping it.

On CUDA one Triton pass draws the mask and multiplies: x read once and written once. torch's `bernoulli_` +
multiply wrote the mask and read it back, three times per dropped tensor (forward, and the two uses in the
backward): ~0.2 s of a 2.3 s step at 70B. The mask (`kept`) takes four uniforms from each Philox call
(`tl.rand4x`), one per element of four neighbours, rather than one call per element as `tl.rand` would: the draws,
not the memory, bounded the pass, and four per call cut LoRA dropout's time at 70B's shapes by 40 % (4.20 to
2.47 ms a decoder layer on an H200, eval/BENCHMARKS.md). On the CPU the mask comes from torch's seeded
generator. The masks of the two devices differ; each device is self-consistent, which is all the backward needs.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only CUDA tensors use the kernel
    triton = None

BLOCK = 4096

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
    _drop_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), p, seed, BLOCK=BLOCK)
    return out


def dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The 0/1 mask `drop` applies to a tensor of like's shape, dtype and device (for tests and reference paths)."""
    return drop(torch.ones_like(like, memory_format=torch.contiguous_format), p, seed)


if triton is not None:
    @triton.jit
    def kept(seed, first, p, ROWS: tl.constexpr, COLS: tl.constexpr):
        """The [ROWS, COLS] tile of the mask whose row r starts at flat offset first[r] (first [ROWS, 1] int64, each
        a multiple of 4): element at offset o is kept where the uniform of Philox counter o // 4, lane o % 4, is
        >= p. Any kernel that draws a tile this way drops the same elements as `drop`."""
        counters = first // 4 + tl.arange(0, COLS // 4)[None, :]
        u0, u1, u2, u3 = tl.rand4x(seed, counters)
        return tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (ROWS, COLS)) >= p

    @triton.jit
    def _drop_kernel(x_ptr, out_ptr, n, p, seed, BLOCK: tl.constexpr):
        first = tl.full((1, 1), BLOCK, tl.int64) * tl.program_id(0)
        offsets = first + tl.arange(0, BLOCK)[None, :]
        inside = offsets < n
        x = tl.load(x_ptr + offsets, mask=inside)
        tl.store(out_ptr + offsets, tl.where(kept(seed, first, p, 1, BLOCK), x, 0.0).to(x.dtype), mask=inside)
