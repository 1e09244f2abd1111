"""LoRA-A's three matmuls with the dropout mask drawn inside them (CUDA; the CPU runs them under TRITON_INTERPRET=1).

With dropout, each projection's LoRA-A multiplies a dropped copy of its input: forward `drop(x) @ A.t()`, backward
`dx += drop(dxa @ A)` and `dA = dxa.t() @ drop(x)`. Unfused, each `drop` writes a full [tokens, in] tensor (in is
8,192 or 28,672 at 70B) that the skinny rank-16 matmul then reads again, and `dx` adds a full matmul output, a
dropout pass and an add: ~0.2 s of a 2.4 s step at 70B. Here each is one kernel that reads the wide tensor once
and draws the mask in registers as `drop` does (`seeded_dropout.kept`, by the element's flat row-major offset in
the contiguous [T, K] tensor). So every kernel drops the same elements as `drop` for the same seed and shape, and
the forward and backward agree with each other. `kept` needs each tile row to start at a multiple of 4: K % 4 == 0.

Products accumulate in fp32 (tl.dot; "ieee" for fp32 inputs, as torch's fp32 matmul, not TF32). The rank r is
padded to a power of two of at least 16 (tl.dot's smallest block) and masked. A rank-16 output has too few tiles
to fill the GPU, so the forward and A's gradient also split the dimension they sum over into chunks, one program
each, and add the chunks' fp32 partial products after (a few MB).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only CUDA tensors use the kernels
    triton = None
else:
    from .seeded_dropout import kept


def _options(x: torch.Tensor, r: int) -> dict:
    return {"BLOCK_R": max(16, triton.next_power_of_2(r)),
            "PRECISION": "ieee" if x.dtype == torch.float32 else "tf32"}  # tf32: unused by bf16 / fp16 inputs


# (rows, columns, warps) of each kernel's tile; timed at 70B's shapes on an H200 (eval/BENCHMARKS.md).
FORWARD_TILE = (64, 64, 4)
WEIGHT_GRAD_TILE = (64, 64, 4)
INPUT_GRAD_TILE = (64, 64, 4)


def _check_rows(k: int) -> None:
    if k % 4:
        raise ValueError(f"dropout_matmul needs rows a multiple of 4 long, got {k}: use seeded_dropout.drop and a matmul")


def _splits(tiles: int, length: int, block: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunk): the reduced dimension of `length` cut into `splits` chunks of `chunk` (a multiple of block)
    so that tiles × splits programs fill the GPU about four times over; rank-16 outputs give too few tiles alone."""
    wanted = triton.cdiv(4 * torch.cuda.get_device_properties(device).multi_processor_count, tiles) \
        if device.type == "cuda" else 2  # the interpreter: two, so the tests cross a chunk boundary
    chunk = triton.cdiv(triton.cdiv(length, max(1, min(wanted, triton.cdiv(length, block)))), block) * block
    return triton.cdiv(length, chunk), chunk


def dropped_matmul(x: torch.Tensor, p: float, seed: int, a: torch.Tensor) -> torch.Tensor:
    """drop(x, p, seed) @ a.t() for x [T, K] and a [r, K]: [T, r] in x's dtype. Programs over (row tiles, K
    chunks), their fp32 partial products summed after."""
    x, a = x.contiguous(), a.contiguous()
    (t, k), r = x.shape, a.shape[0]
    _check_rows(k)
    block_t, block_k, warps = FORWARD_TILE
    splits, chunk = _splits(triton.cdiv(t, block_t), k, block_k, x.device)
    partial = torch.empty(splits, t, r, dtype=torch.float32, device=x.device)
    _dropped_matmul_kernel[(triton.cdiv(t, block_t), splits)](x, a, partial, t, k, r, p, seed, chunk,
                                                             BLOCK_T=block_t, BLOCK_K=block_k, num_warps=warps,
                                                             **_options(x, r))
    return partial.sum(0).to(x.dtype)


def dropped_weight_grad(grad_xa: torch.Tensor, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """grad_xa.t() @ drop(x, p, seed) for grad_xa [T, r] and x [T, K]: A's gradient, [r, K] in x's dtype.
    Programs over (column tiles, T chunks), their fp32 partial products summed after."""
    grad_xa, x = grad_xa.contiguous(), x.contiguous()
    (t, k), r = x.shape, grad_xa.shape[1]
    _check_rows(k)
    block_t, block_k, warps = WEIGHT_GRAD_TILE
    splits, chunk = _splits(triton.cdiv(k, block_k), t, block_t, x.device)
    partial = torch.empty(splits, r, k, dtype=torch.float32, device=x.device)
    _dropped_weight_grad_kernel[(triton.cdiv(k, block_k), splits)](grad_xa, x, partial, t, k, r, p, seed, chunk,
                                                                   BLOCK_T=block_t, BLOCK_K=block_k,
                                                                   num_warps=warps, **_options(x, r))
    return partial.sum(0).to(x.dtype)


def add_dropped_input_grad(grad_x: torch.Tensor | None, grad_xa: torch.Tensor, a: torch.Tensor, p: float,
                           seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """grad_x + drop(grad_xa @ a, p, seed) for grad_xa [T, r] and a [r, K] (grad_x None: zero), written into out:
    a new tensor where out is None, grad_x itself (contiguous) to add in place. One program per tile."""
    grad_xa, a = grad_xa.contiguous(), a.contiguous()
    (t, r), k = grad_xa.shape, a.shape[1]
    _check_rows(k)
    if grad_x is not None:
        grad_x = grad_x.contiguous()
    if out is None:
        out = torch.empty(t, k, dtype=grad_xa.dtype if grad_x is None else grad_x.dtype, device=grad_xa.device)
    assert out.is_contiguous() and out.shape == (t, k)
    block_t, block_k, warps = INPUT_GRAD_TILE
    _add_dropped_input_grad_kernel[(triton.cdiv(t, block_t), triton.cdiv(k, block_k))](
        out if grad_x is None else grad_x, grad_xa, a, out, t, k, r, p, seed, HAS_ADD=grad_x is not None,
        BLOCK_T=block_t, BLOCK_K=block_k, num_warps=warps, **_options(grad_xa, r))
    return out


if triton is not None:
    @triton.jit
    def _tile(rows, cols, T, K):
        """(flat offsets, inside) of the [rows, cols] tile of a contiguous [T, K] tensor; rows int64."""
        return rows[:, None] * K + cols[None, :], (rows[:, None] < T) & (cols[None, :] < K)

    @triton.jit
    def _dropped_tile(x_ptr, rows, start, T, K, p, seed, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        """x[rows, start:start + BLOCK_K] with `drop`'s mask."""
        offsets, inside = _tile(rows, start + tl.arange(0, BLOCK_K), T, K)
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        return tl.where(kept(seed, rows[:, None] * K + start, p, BLOCK_T, BLOCK_K), x, 0.0).to(x.dtype)

    @triton.jit
    def _dropped_matmul_kernel(x_ptr, a_ptr, partial_ptr, T, K, R, p, seed, chunk, BLOCK_T: tl.constexpr,
                               BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        first = tl.program_id(1) * chunk
        for start in range(first, tl.minimum(first + chunk, K), BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            a_t = tl.load(a_ptr + ranks[None, :] * K + cols[:, None], mask=(ranks[None, :] < R) & (cols[:, None] < K),
                          other=0.0)  # [BLOCK_K, BLOCK_R] of a.t()
            acc = tl.dot(_dropped_tile(x_ptr, rows, start, T, K, p, seed, BLOCK_T, BLOCK_K), a_t, acc,
                         input_precision=PRECISION)
        tl.store(partial_ptr + tl.program_id(1).to(tl.int64) * T * R + rows[:, None] * R + ranks[None, :], acc,
                 mask=(rows[:, None] < T) & (ranks[None, :] < R))

    @triton.jit
    def _dropped_weight_grad_kernel(g_ptr, x_ptr, partial_ptr, T, K, R, p, seed, chunk, BLOCK_T: tl.constexpr,
                                    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
        first_col = tl.program_id(0) * BLOCK_K
        cols = first_col + tl.arange(0, BLOCK_K)
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        first = tl.program_id(1) * chunk
        for start in range(first, tl.minimum(first + chunk, T), BLOCK_T):
            rows = (start + tl.arange(0, BLOCK_T)).to(tl.int64)
            g_t = tl.load(g_ptr + rows[None, :] * R + ranks[:, None], mask=(ranks[:, None] < R) & (rows[None, :] < T),
                          other=0.0)  # [BLOCK_R, BLOCK_T] of grad_xa.t()
            acc = tl.dot(g_t, _dropped_tile(x_ptr, rows, first_col, T, K, p, seed, BLOCK_T, BLOCK_K), acc,
                         input_precision=PRECISION)
        tl.store(partial_ptr + tl.program_id(1).to(tl.int64) * R * K + ranks[:, None] * K + cols[None, :], acc,
                 mask=(ranks[:, None] < R) & (cols[None, :] < K))

    @triton.jit
    def _add_dropped_input_grad_kernel(add_ptr, g_ptr, a_ptr, out_ptr, T, K, R, p, seed, HAS_ADD: tl.constexpr,
                                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                                       PRECISION: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        ranks = tl.arange(0, BLOCK_R)
        g = tl.load(g_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < T) & (ranks[None, :] < R),
                    other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                    other=0.0)
        offsets, inside = _tile(rows, cols, T, K)
        keep = kept(seed, rows[:, None] * K + tl.program_id(1) * BLOCK_K, p, BLOCK_T, BLOCK_K)
        update = tl.where(keep, tl.dot(g, a, input_precision=PRECISION), 0.0)
        if HAS_ADD:
            update += tl.load(add_ptr + offsets, mask=inside).to(tl.float32)
        tl.store(out_ptr + offsets, update.to(out_ptr.dtype.element_ty), mask=inside)
