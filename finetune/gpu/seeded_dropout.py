"""LoRA dropout that keeps no mask: `drop(x, p, seed)` is x times a 0/1 mask that is a function of (seed, shape,
device) alone, so the backward draws the same mask again instead of keeping it.

On CUDA one Triton pass draws the mask (Philox, `tl.rand(seed, element offset)`) and multiplies: x read once and
written once. torch's `bernoulli_` + multiply wrote the mask and read it back, and did so three times per dropped
tensor (forward, and the two uses in the backward): at 70B that was ~0.2 s of a 2.3 s step (profile_step on an
H200, eval/BENCHMARKS.md). On the CPU the mask comes from torch's seeded generator. The masks of the two devices
differ; each device is self-consistent, which is all the backward needs.
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
    def _drop_kernel(x_ptr, out_ptr, n, p, seed, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        x = tl.load(x_ptr + offsets, mask=inside)
        keep = tl.rand(seed, offsets) >= p
        tl.store(out_ptr + offsets, tl.where(keep, x, 0.0).to(x.dtype), mask=inside)
