"""LoRA-A's input gradient with the dropout mask drawn inside the matmul (CUDA; the CPU runs it under
TRITON_INTERPRET=1).

With dropout, each projection's LoRA-A multiplies a dropped copy of its input, so its backward adds
`drop(dxa @ A)` to the input's gradient. Unfused, that is a full [tokens, in] matmul output (in is 8,192 or 28,672
at 70B), a dropout pass over it and an add; here one kernel computes the rank-16 product in registers, draws the
mask there as `drop` does (`seeded_dropout.kept`, by the element's flat row-major offset in the contiguous [T, K]
tensor) and adds it to the gradient in place: the gradient read once and written once. On an H200 at 70B's shapes
it takes 0.45 ms a layer (0.65 when `kept` drew four per Philox call) against 1.14 unfused (eval/BENCHMARKS.md).
The forward `drop(x) @ A.t()` and A's gradient stay `drop` + cuBLAS: kernels that drew the mask inside those skinny
matmuls measured no faster (with four draws per Philox call).

Products accumulate in fp32 (tl.dot; "ieee" for fp32 inputs, as torch's fp32 matmul, not TF32). The rank r is
padded to a power of two of at least 16 (tl.dot's smallest block) and masked. `kept` needs each tile row to start
at a multiple of 8: K % 8 == 0.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only CUDA tensors use the kernel
    triton = None
else:
    from .seeded_dropout import drop_below, kept

BLOCK_T, BLOCK_K = 64, 64  # the fastest of seven tiles timed at 70B's shapes on an H200


def add_dropped_input_grad(grad_x: torch.Tensor | None, grad_xa: torch.Tensor, a: torch.Tensor, p: float,
                           seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """grad_x + drop(grad_xa @ a, p, seed) for grad_xa [T, r] and a [r, K] (grad_x None: zero), written into out:
    a new tensor where out is None, grad_x itself (contiguous) to add in place."""
    grad_xa, a = grad_xa.contiguous(), a.contiguous()
    (t, r), k = grad_xa.shape, a.shape[1]
    if k % 8:
        raise ValueError(f"dropout_matmul needs rows a multiple of 8 long, got {k}: "
                         "use seeded_dropout.drop and a matmul")
    if grad_x is not None:
        grad_x = grad_x.contiguous()
    if out is None:
        out = torch.empty(t, k, dtype=grad_xa.dtype if grad_x is None else grad_x.dtype, device=grad_xa.device)
    assert out.is_contiguous() and out.shape == (t, k)
    _add_dropped_input_grad_kernel[(triton.cdiv(t, BLOCK_T), triton.cdiv(k, BLOCK_K))](
        out if grad_x is None else grad_x, grad_xa, a, out, t, k, r, drop_below(p), seed, HAS_ADD=grad_x is not None,
        BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, BLOCK_R=max(16, triton.next_power_of_2(r)),
        PRECISION="ieee" if grad_xa.dtype == torch.float32 else "tf32")  # tf32: unused by bf16 / fp16 inputs
    return out


if triton is not None:
    @triton.jit
    def _add_dropped_input_grad_kernel(add_ptr, g_ptr, a_ptr, out_ptr, T, K, R, below, seed, HAS_ADD: tl.constexpr,
                                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                                       PRECISION: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        first_col = tl.program_id(1) * BLOCK_K
        cols = first_col + tl.arange(0, BLOCK_K)
        ranks = tl.arange(0, BLOCK_R)
        g = tl.load(g_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < T) & (ranks[None, :] < R),
                    other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                    other=0.0)
        offsets, inside = rows[:, None] * K + cols[None, :], (rows[:, None] < T) & (cols[None, :] < K)
        keep = kept(seed, rows[:, None] * K + first_col, below, BLOCK_T, BLOCK_K)
        update = tl.where(keep, tl.dot(g, a, input_precision=PRECISION), 0.0)
        if HAS_ADD:
            update += tl.load(add_ptr + offsets, mask=inside).to(tl.float32)
        tl.store(out_ptr + offsets, update.to(out_ptr.dtype.element_ty), mask=inside)
