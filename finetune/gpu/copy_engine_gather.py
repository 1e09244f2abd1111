"""FSDP2's all-gather carried out by the GPUs' copy engines, for GPUs of one machine that can read each other's memory.

NCCL's all-gather is a kernel on many SMs, and the rank that reaches it first spins in it until the other arrives: on
two H200s the matmuls beside a waiting gather ran ~2.5x longer (eval/BENCHMARKS.md, twelfth session). Here each rank
copies its shard into a buffer every rank can read (torch's symmetric memory), meets the others at a barrier (one
small kernel), and pulls their shards with cudaMemcpy, which the copy engines carry out over NVLink: no SM copies or
spins beyond the barrier's one block. It is torch's `symm_mem._low_contention_all_gather` into the output FSDP2
allocates (`FSDPModule.set_custom_all_gather`), on FSDP2's all-gather stream, so FSDP2's own events order it.
"""

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather


class CopyEngineAllGather(AllGather):
    """One per sharded module (FSDP2 takes one per unit); all share the process group's symmetric workspace, which
    grows to the largest shard gathered (a collective: every rank gathers the same shards in the same order)."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> None:
        from torch.distributed._symmetric_memory import get_symm_mem_workspace
        workspace = get_symm_mem_workspace(group.group_name, input_tensor.numel() * input_tensor.element_size())
        rank, shape, dtype = workspace.rank, input_tensor.shape, input_tensor.dtype
        workspace.get_buffer(rank, shape, dtype).copy_(input_tensor)
        workspace.barrier()  # every rank's shard is readable
        chunks = output_tensor.view(workspace.world_size, -1)
        for step in range(workspace.world_size):
            peer = (rank - step) % workspace.world_size
            if chunks[peer].data_ptr() != input_tensor.data_ptr():  # FSDP2 copies this rank's shard in place
                chunks[peer].copy_(workspace.get_buffer(peer, shape, dtype).view(-1))
        workspace.barrier()  # every rank has read the workspace: the next gather may overwrite it


def gather_with_copy_engines(layers: list) -> int:
    """Give every decoder layer's FSDP2 unit (`layers`: `FSDPModule`s) the copy-engine all-gather and size the
    symmetric workspace for the largest layer shard now (GPU memory outside the caching allocator, so outside any
    per-process cap: the bytes are returned for the caller to count). The root unit (embeddings, output layer) keeps
    NCCL's: gathered once a step, and its shard would make the workspace ~2.5x larger at 70B."""
    from torch.distributed._symmetric_memory import get_symm_mem_workspace
    if not layers:
        return 0
    # FSDP2 gathers a unit's shards as one flat tensor, each padded to whole rows: a little over their sum
    largest = max(sum(p.to_local().nbytes + 1024 for p in layer.parameters()) for layer in layers)
    group = next(layers[0].parameters()).device_mesh.get_group()
    get_symm_mem_workspace(group.group_name, largest)
    gather = CopyEngineAllGather()
    for layer in layers:
        layer.set_custom_all_gather(gather)
    return largest
