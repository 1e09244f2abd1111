"""LoRA-A's matmuls with the dropout mask drawn inside them (CUDA; the CPU runs them under TRITON_INTERPRET=1).

With LoRA dropout, each projection's LoRA-A multiplies a dropped copy of its input x [T, K] (K is 8,192 or 28,672
at 70B): forward `drop(x) @ A.t()`; backward A's gradient `dxa.t() @ drop(x)` and `dx += drop(dxa @ A)`. Unfused,
`drop` writes the dropped copy and a skinny rank-16 cuBLAS matmul reads it back, in the forward and again in the
backward, and the input gradient is one more pass that draws the mask a third time. Here:
- `dropped_matmul`, the forward: one kernel that reads x once;
- `lora_a_backward`: both gradients in one kernel that reads x and dx once and writes dx once, drawing each tile
  of the mask once for both (x and dx's update drop the same elements);
- `swiglu_lora_a_backward`, the same for down_proj, whose input is act = silu(gate) * up: the kernel reads gate, up
  and act's gradient, computes act as liger's forward does (so the forward's act, bit for bit), and writes gate's
  and up's gradients over gate and up as liger's backward does, from act's gradient plus the dropped update rounded
  to the activation dtype (as the unfused path rounds it). act is never written; without dropout too.
Every mask is `drop`'s (`seeded_dropout.kept`, by the element's flat row-major offset in the contiguous [T, K]
tensor): the same elements as `drop` for the same seed and shape, so forward and backward agree.

On an H200 at 70B's shapes (bf16, 4,096 tokens, rank 16) a decoder layer's LoRA dropout and SwiGLU work took
2.45 ms with `drop` + cuBLAS, the input-gradient-only kernel and liger's SwiGLU, 2.32 ms with these kernels at
64 x 64 tiles and ~2.04 ms (by the kernels' timings) at the tuned `TILES`: ~33 ms of a ~2 s train.py step
(eval/BENCHMARKS.md; train.py with these tiles ran at 2,105 tok/s in the twelfth session, but a ~1.7 % gain is not
told apart from the order of the runs in a call). When the masks took one Philox call per four draws (sixth
session), the forward and A-gradient kernels were no faster than `drop` + cuBLAS; eight draws per call made the
masks cheap enough.

Products accumulate in fp32 (tl.dot; "ieee" for fp32 inputs, as torch's fp32 matmul, not TF32). The rank r is
padded to a power of two of at least 16 (tl.dot's smallest block) and masked. A rank-16 output has too few tiles to
fill the GPU, so each kernel also splits the dimension it sums over into chunks, one program each, and the chunks'
fp32 partial products (a few MB) are added after. `kept` needs each tile row to start at a multiple of 8: K % 8 == 0.
"""

import torch

from .seeded_dropout import Dropout

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only CUDA tensors use the kernels
    triton = None
else:
    from .seeded_dropout import drop_below, kept

# (rows, columns, warps, programs per SM) of each kernel's tiles, the backward's SwiGLU form apart: the fastest of 24
# timed at 70B's shapes on an H200 (eval/BENCHMARKS.md; 64, 64, 4, 4 took 4 to 25 % longer)
TILES = {"forward": (32, 128, 4, 4), "backward": (32, 128, 8, 16), "swiglu": (32, 128, 4, 16)}


def dropped_matmul(x: torch.Tensor, a: torch.Tensor, dropout: Dropout) -> torch.Tensor:
    """drop(x) @ a.t() for x [T, K] and a [r, K]: [T, r] in x's dtype. Programs over (row tiles, K chunks)."""
    x, a = x.contiguous(), a.contiguous()
    (t, k), r = x.shape, a.shape[0]
    block_t, block_k, warps, per_sm = TILES["forward"]
    splits, chunk = _splits(triton.cdiv(t, block_t), k, block_k, x.device, per_sm)
    partial = torch.empty(splits, t, r, dtype=torch.float32, device=x.device)
    _dropped_matmul_kernel[(triton.cdiv(t, block_t), splits)](x, a, partial, t, k, r, chunk, BLOCK_T=block_t,
                                                             BLOCK_K=block_k, num_warps=warps,
                                                             **_mask_options(k, dropout), **_options(x, r))
    return partial.sum(0).to(x.dtype)


def lora_a_backward(grad_x: torch.Tensor | None, x: torch.Tensor, grad_xa: torch.Tensor, a: torch.Tensor,
                    dropout: Dropout, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x + drop(grad_xa @ a), grad_xa.t() @ drop(x)) for x [T, K], grad_xa [T, r] and a [r, K], grad_x None
    counting as zero. The first is written into out: a new tensor where out is None, grad_x itself (contiguous) to
    add in place; the second, A's gradient, is [r, K] in x's dtype."""
    x = x.contiguous()
    if grad_x is not None:
        grad_x = grad_x.contiguous()
    if out is None:
        out = torch.empty_like(x if grad_x is None else grad_x)
    assert out.is_contiguous() and out.shape == x.shape
    grad_a = _backward(x, None, grad_x, grad_xa, a, dropout, out)
    return out, grad_a


def swiglu_lora_a_backward(gate: torch.Tensor, up: torch.Tensor, grad_act: torch.Tensor, grad_act_a: torch.Tensor,
                           a: torch.Tensor, dropout: Dropout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For act = silu(gate) * up, all [T, K], and down_proj's LoRA-A product drop(act) @ a.t(): (gate's gradient,
    up's gradient, a's gradient) given act's gradient from down_proj's base matmul (grad_act) and the LoRA-A
    product's (grad_act_a [T, r]). The first two are written over (contiguous copies of) gate and up."""
    gate, up = gate.contiguous(), up.contiguous()
    grad_a = _backward(gate, up, grad_act.contiguous(), grad_act_a, a, dropout, gate)
    return gate, up, grad_a


def _backward(x, up, grad_x, grad_xa, a, dropout, out) -> torch.Tensor:
    """Launch `_backward_kernel` (SwiGLU's form where up is given: x is gate); returns A's gradient."""
    grad_xa, a = grad_xa.contiguous(), a.contiguous()
    (t, k), r = x.shape, a.shape[0]
    block_t, block_k, warps, per_sm = TILES["backward" if up is None else "swiglu"]
    splits, chunk = _splits(triton.cdiv(k, block_k), t, block_t, x.device, per_sm)
    partial = torch.empty(splits, r, k, dtype=torch.float32, device=x.device)
    _backward_kernel[(triton.cdiv(k, block_k), splits)](
        x, x if up is None else up, out if grad_x is None else grad_x, grad_xa, a, out, partial, t, k, r, chunk,
        HAS_ADD=grad_x is not None, SWIGLU=up is not None, BLOCK_T=block_t, BLOCK_K=block_k, num_warps=warps,
        **_mask_options(k, dropout), **_options(x, r))
    return partial.sum(0).to(x.dtype)


def _mask_options(k: int, dropout: Dropout) -> dict:
    if dropout is not None and k % 8:
        raise ValueError(f"dropout_matmul needs rows a multiple of 8 long, got {k}: "
                         "use seeded_dropout.drop and a matmul")
    p, seed = dropout or (0.0, 0)
    return {"below": drop_below(p), "seed": seed, "DROP": dropout is not None}


def _options(x: torch.Tensor, r: int) -> dict:
    return {"BLOCK_R": max(16, triton.next_power_of_2(r)),
            "PRECISION": "ieee" if x.dtype == torch.float32 else "tf32"}  # tf32: unused by bf16 / fp16 inputs


def _splits(tiles: int, length: int, block: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    """(splits, chunk): the summed dimension of `length` cut into `splits` chunks of `chunk` (a multiple of block)
    so that tiles × splits programs are about `per_sm` for each of the GPU's multiprocessors."""
    wanted = triton.cdiv(per_sm * torch.cuda.get_device_properties(device).multi_processor_count, tiles) \
        if device.type == "cuda" else 2  # the interpreter: two, so the tests cross a chunk boundary
    chunk = triton.cdiv(triton.cdiv(length, max(1, min(wanted, triton.cdiv(length, block)))), block) * block
    return triton.cdiv(length, chunk), chunk


if triton is not None:
    @triton.jit
    def _dropped_matmul_kernel(x_ptr, a_ptr, partial_ptr, T, K, R, chunk, below, seed, DROP: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                               PRECISION: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        ranks = tl.arange(0, BLOCK_R)
        first_col = tl.program_id(1) * chunk
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for start in range(0, chunk, BLOCK_K):  # a bound not taken from program_id: Triton 3.6's interpreter
            cols = first_col + start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < T) & (cols[None, :] < K),
                        other=0.0)
            if DROP:
                x = tl.where(kept(seed, rows[:, None] * K + first_col + start, below, BLOCK_T, BLOCK_K), x,
                             0.0).to(x.dtype)
            a_t = tl.load(a_ptr + ranks[None, :] * K + cols[:, None], mask=(ranks[None, :] < R) & (cols[:, None] < K),
                          other=0.0)  # [BLOCK_K, BLOCK_R] of a.t()
            acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
        tl.store(partial_ptr + tl.program_id(1).to(tl.int64) * T * R + rows[:, None] * R + ranks[None, :], acc,
                 mask=(rows[:, None] < T) & (ranks[None, :] < R))

    @triton.jit
    def _backward_kernel(x_ptr, up_ptr, add_ptr, g_ptr, a_ptr, out_ptr, partial_ptr, T, K, R, chunk, below, seed,
                         DROP: tl.constexpr, HAS_ADD: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
        first_col = tl.program_id(0) * BLOCK_K
        cols = first_col + tl.arange(0, BLOCK_K)
        ranks = tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                    other=0.0)
        first_row = tl.program_id(1).to(tl.int64) * chunk
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for start in range(0, chunk, BLOCK_T):
            rows = first_row + start + tl.arange(0, BLOCK_T)
            offsets, inside = rows[:, None] * K + cols[None, :], (rows[:, None] < T) & (cols[None, :] < K)
            g = tl.load(g_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < T) & (ranks[None, :] < R),
                        other=0.0)
            update = tl.dot(g, a, input_precision=PRECISION)
            if SWIGLU:  # x is gate: act as liger's forward computes it
                gate = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
                up = tl.load(up_ptr + offsets, mask=inside, other=0.0)
                sig = tl.sigmoid(gate)
                silu = gate * sig
                x = silu.cast(up.dtype) * up
            else:
                x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
            if DROP:
                keep = kept(seed, rows[:, None] * K + first_col, below, BLOCK_T, BLOCK_K)
                x = tl.where(keep, x, 0.0).to(x.dtype)
                update = tl.where(keep, update, 0.0)
            acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
            if HAS_ADD:
                update += tl.load(add_ptr + offsets, mask=inside).to(tl.float32)
            if SWIGLU:  # liger's backward, in its order, on act's whole gradient rounded as the unfused path's
                grad_act = update.to(up.dtype)
                tl.store(up_ptr + offsets, grad_act * silu, mask=inside)
                tl.store(x_ptr + offsets, grad_act * (silu * (1 - sig) + sig) * up, mask=inside)
            else:
                tl.store(out_ptr + offsets, update.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(partial_ptr + tl.program_id(1).to(tl.int64) * R * K + ranks[:, None] * K + cols[None, :], acc,
                 mask=(ranks[:, None] < R) & (cols[None, :] < K))
