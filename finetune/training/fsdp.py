"""FSDP2 runs: the GPTQ weights sharded across GPUs, so a model larger than one card trains on several.

    accelerate launch --config_file accelerate_fsdp.yaml finetune/train.py recipe=medqa gpu.fast_path=false

accelerate's FSDP2 plugin (`fsdp_version: 2`) does the sharding: each decoder layer, its LoRA inside, becomes one
`fully_shard` unit; GPTQLinear's packed tensors are frozen parameters, so each GPU keeps its slice of them and
gathers a layer only while it computes. Only the adapters have gradients, so only they are reduce-scattered.
Every rank reads the checkpoint into host memory and `fully_shard` moves each layer's slice to its GPU, so no GPU
ever holds the whole model (the host does, once per rank, until sharding frees it).

Here: the checks that the launch's FSDP settings can shard a GPTQ model (before any weight is read), and the
mixed-precision policy that keeps the weights in their stored dtypes.
"""

import os

import torch
from accelerate import PartialState
from accelerate.utils import FullyShardedDataParallelPlugin

from ..config.recipe import RecipeError

FIX = "see accelerate_fsdp.yaml"


def fsdp_plugin() -> FullyShardedDataParallelPlugin | None:
    """The FSDP settings `accelerate launch` passed this process (as accelerate itself reads them), or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    try:
        return FullyShardedDataParallelPlugin()
    except (ValueError, KeyError) as err:
        raise RecipeError(f"accelerate's FSDP settings: {' '.join(str(err).split())}; {FIX}") from None


def check_fsdp_setup(plugin: FullyShardedDataParallelPlugin, fast_path: bool) -> None:
    """Settings that cannot shard a GPTQ model fail here, before loading, with the fix."""
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    if plugin.fsdp_version != 2:
        raise RecipeError(f"fsdp_version {plugin.fsdp_version} (FSDP1) flattens each unit into one tensor and cannot "
                          f"shard the int32 GPTQ weights beside the trainable LoRA; set fsdp_version: 2 ({FIX})")
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    if strategy not in ("FULL_SHARD", "1"):
        raise RecipeError(f"fsdp_sharding_strategy {strategy} is not supported for GPTQ models: FSDP2 shards fully; "
                          f"drop it and set fsdp_reshard_after_forward: true (or false to keep a layer gathered "
                          f"from forward to backward) ({FIX})")
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if policy is not transformer_auto_wrap_policy:
        raise RecipeError("fsdp_auto_wrap_policy must be TRANSFORMER_BASED_WRAP: each decoder layer is one FSDP unit, "
                          f"gathered only while it computes ({FIX})")
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise RecipeError(f"fsdp_offload_params: true is not supported for GPTQ models yet; set it to false ({FIX})")
    if plugin.cpu_ram_efficient_loading:
        raise RecipeError("fsdp_cpu_ram_efficient_loading: true broadcasts rank 0's whole model; set it to false: "
                          f"every rank reads the checkpoint and keeps only its shard on the GPU ({FIX})")
    if fast_path and PartialState().device.type == "cuda":
        raise RecipeError("gpu.fast_path=true plans recompute for whole layers on one GPU and does not run under "
                          "FSDP2 yet; pass gpu.fast_path=false")


def check_memory_cap(per_gpu_gib: float, cap_gib: float | None, gpus: int, max_length: int) -> None:
    """A cap (gpu.memory_budget_gib) below the sharded plan's estimated per-GPU peak fails before loading."""
    if cap_gib is not None and per_gpu_gib > cap_gib:
        raise RecipeError(f"gpu.memory_budget_gib={cap_gib} is below the ~{per_gpu_gib:.1f} GiB per GPU this model "
                          f"needs sharded over {gpus} GPUs at train.max_length={max_length} (estimate); use more "
                          "GPUs, a shorter train.max_length or a lower-bit branch, or raise the cap")


def apply_memory_cap(cap_gib: float | None) -> None:
    """Hold this process to the cap: the CUDA allocator raises out-of-memory rather than pass it."""
    if cap_gib is not None and torch.cuda.is_available():
        device = PartialState().device
        total = torch.cuda.get_device_properties(device).total_memory / 1024 ** 3
        torch.cuda.set_per_process_memory_fraction(min(cap_gib / total, 1.0), device)


def prepare_gptq_for_sharding(model: torch.nn.Module) -> None:
    """Every GPTQLinear holds its integer tensors as float bits (GPTQLinear.hold_ints_as_floats), which any
    `fully_shard` takes; keep_stored_dtypes makes sure FSDP never casts them."""
    from ..gptq.layer import GPTQLinear
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            module.hold_ints_as_floats()


def keep_stored_dtypes(plugin: FullyShardedDataParallelPlugin) -> None:
    """Gather every weight in the dtype it is stored in, gradients reduced in fp32: the default policy would cast
    the fp16 GPTQ scales to bf16 (a rounding one GPU never makes) and the integers held as floats (garbage)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def check_sharded_memory(cfg, source, gpus: int) -> None:
    """gpu.memory_budget_gib against the sharded plan's estimate (finetune.gptq.memory), from the checkpoint's
    headers alone."""
    if cfg.gpu.memory_budget_gib is None:
        return
    from ..gptq.checkpoint_info import describe_checkpoint
    info = describe_checkpoint(str(source), cfg.model.revision, cfg.train.max_length, cfg.lora.r, gpus=gpus)
    check_memory_cap(info.memory_gib["total"], cfg.gpu.memory_budget_gib, gpus, cfg.train.max_length)


def full_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter PEFT may save (all but the GPTQ packed tensors), gathered whole on every rank, on the host.
    A collective: every rank calls it."""
    from torch.distributed.tensor import DTensor

    from ..gptq.layer import PACKED_TENSORS
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] not in PACKED_TENSORS}
