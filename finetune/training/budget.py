"""gpu.memory_budget_gib against what a run needs, checked before any weight is read, from the checkpoint's headers
(finetune.gptq.memory's estimate). Sharded (accelerate_fsdp.yaml), the budget is a hard cap per process, checked
against the sharded plan's per-GPU estimate. On one GPU it is what the fast path's recompute plan aims for, which
that plan checks once the model is loaded and a layer measured; here, only that it holds the model itself.
"""

import torch
from accelerate import PartialState
from omegaconf import DictConfig

from ..config.recipe import RecipeError
from ..gptq.checkpoint_info import describe_checkpoint
from ..gptq.memory import FAST_PATH_HEADROOM_BYTES, GIB


def check_memory_cap(per_gpu_gib: float, cap_gib: float | None, gpus: int, max_length: int,
                     fast_path: bool = False) -> None:
    """A cap (gpu.memory_budget_gib) below the sharded plan's estimated per-GPU peak fails before loading; with the
    fast path, below that peak plus the headroom its recompute plan keeps (FAST_PATH_HEADROOM_BYTES), which the
    plain path does without."""
    if cap_gib is None:
        return
    if per_gpu_gib > cap_gib:
        raise RecipeError(f"gpu.memory_budget_gib={cap_gib} is below the ~{per_gpu_gib:.1f} GiB per GPU this model "
                          f"needs sharded over {gpus} GPUs at train.max_length={max_length} (estimate); use more "
                          "GPUs, a shorter train.max_length or a lower-bit branch, or raise the cap")
    with_margin = per_gpu_gib + FAST_PATH_HEADROOM_BYTES / GIB
    if fast_path and with_margin > cap_gib:
        raise RecipeError(f"gpu.memory_budget_gib={cap_gib} is below the ~{with_margin:.1f} GiB per GPU the fast path "
                          f"plans for sharded over {gpus} GPUs at train.max_length={max_length} (estimate); pass "
                          f"gpu.fast_path=false (every layer recomputed, ~{per_gpu_gib:.1f} GiB) or raise the cap")


def check_sharded_memory(cfg: DictConfig, source, gpus: int, fast_path: bool) -> None:
    """gpu.memory_budget_gib against the sharded plan's estimate (finetune.gptq.memory), from the checkpoint's
    headers alone; fast_path: the fast GPU path will plan the run."""
    if cfg.gpu.memory_budget_gib is None:
        return
    info = describe_checkpoint(str(source), cfg.model.revision, cfg.train.max_length, cfg.lora.r, gpus=gpus,
                               lora_targets=tuple(cfg.lora.target_modules))
    per_gpu_gib = info.memory_gib["total"]
    if cfg.gpu.all_gather == "copy_engine":  # its workspace: one decoder layer's shard, outside the allocator
        per_gpu_gib += info.memory_gib["quantised weights"] / info.shape.layers
    if not cfg.gpu.shard_adapters:  # the adapters and their AdamW state whole on every GPU, not its share
        per_gpu_gib += info.memory_gib["LoRA + AdamW"] * (gpus - 1)
    check_memory_cap(per_gpu_gib, cfg.gpu.memory_budget_gib, gpus, cfg.train.max_length, fast_path)


def check_one_gpu_memory(cfg: DictConfig, source) -> None:
    """Before loading: the fast path's budget (gpu.memory_budget_gib, or 90 % of the card) against what the model
    alone takes on one GPU: its quantised and dense weights and the adapter with AdamW's state, estimated from the
    checkpoint's headers (finetune.gptq.memory)."""
    budget = cfg.gpu.memory_budget_gib
    if budget is None:
        budget = 0.9 * torch.cuda.get_device_properties(PartialState().device).total_memory / GIB
    memory = describe_checkpoint(str(source), cfg.model.revision, cfg.train.max_length, cfg.lora.r,
                                 lora_targets=tuple(cfg.lora.target_modules)).memory_gib
    model_gib = memory["quantised weights"] + memory["dense weights"] + memory["LoRA + AdamW"]
    check_model_fits(model_gib, budget, default_budget=cfg.gpu.memory_budget_gib is None)


def check_model_fits(model_gib: float, budget_gib: float, default_budget: bool) -> None:
    """A budget below the model plus the fast path's headroom fails before loading (activations only add to it);
    one above it that the plan still cannot fit fails after loading, naming the smallest budget that does."""
    needed = model_gib + FAST_PATH_HEADROOM_BYTES / GIB
    if needed > budget_gib:
        budget = (f"90% of this GPU ({budget_gib:.1f} GiB)" if default_budget
                  else f"gpu.memory_budget_gib={budget_gib:g}")
        raise RecipeError(f"{budget} cannot hold this model on one GPU: its weights, adapter and AdamW state take "
                          f"~{needed:.1f} GiB with the fast path's headroom, before any activation (estimate); "
                          "shard it over several GPUs (accelerate launch --config_file accelerate_fsdp.yaml), pick a "
                          "lower-bit model.revision, or use a larger card")
