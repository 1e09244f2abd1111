"""One training step of a LoRA model on a tiny random GPTQ checkpoint, on the CPU, for tests/training/test_fsdp.py:

    python tests/training/fsdp_worker.py CHECKPOINT OUT                                  # one process, no FSDP
    python -m torch.distributed.run --nproc-per-node 2 tests/training/fsdp_worker.py CHECKPOINT OUT --fsdp

With --fsdp the model is sharded by accelerate's own FSDP2 preparation (`fsdp2_prepare_model`, what
`Accelerator.prepare` runs under accelerate_fsdp.yaml on GPUs; accelerate does not select FSDP on the CPU, so it
is called directly, with the plugin that config describes) over gloo. The batch is two rows of equal length: one
process trains on both, each of two ranks on its own row, so the ranks' mean loss and averaged (reduce-scattered)
gradient are the one-process ones up to fp32 rounding. Writes OUT/results-<rank>.pt (loss, LoRA gradients, the local and
global shape of every packed tensor) and OUT/adapter (rank 0, PEFT format).
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from finetune.gptq.layer import PACKED_TENSORS
from finetune.gptq.loader import load_model
from finetune.training.fsdp import (
    full_adapter_state,
    keep_stored_dtypes,
    prepare_gptq_for_sharding,
)


def lora_model(checkpoint: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same adapter on every rank and in the one-process run
    model = get_peft_model(load_model(checkpoint, device="cpu"),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapters matter
                param.normal_(std=0.1)
    model.activation_checkpointing_enable()  # the recipes' default: each layer recomputed inside its FSDP unit
    return model.train()


def main(checkpoint: str, out: str, sharded: bool) -> None:
    out = Path(out)
    accelerator = Accelerator(cpu=True)  # under torchrun: gloo process group of WORLD_SIZE ranks
    model = lora_model(checkpoint)
    if sharded:
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT")
        prepare_gptq_for_sharding(model)
        keep_stored_dtypes(plugin)
        accelerator.state.fsdp_plugin = plugin
        model = fsdp2_prepare_model(accelerator, model)
    # FSDP units: each decoder layer (LoRA inside), the embedding, the output tail, the root
    units = sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule))
    shapes = {name: (tuple(p.to_local().shape), tuple(p.shape)) for name, p in model.named_parameters()
              if name.rsplit(".", 1)[-1] in PACKED_TENSORS and isinstance(p, DTensor)}
    tokens = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    if sharded:
        tokens = tokens[accelerator.process_index:][:1]
    # SGD: a step in proportion to the gradient, so the adapters differ by its rounding only (AdamW's first step
    # divides by |gradient| and would magnify the rounding of near-zero gradients)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for name, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    state = full_adapter_state(model) if sharded else None  # every rank gathers; rank 0 saves
    if accelerator.is_main_process:
        model.save_pretrained(out / "adapter", state_dict=state)
    mean_loss = accelerator.reduce(loss.detach(), reduction="mean") if sharded else loss.detach()
    torch.save({"loss": mean_loss.item(), "grads": grads, "shapes": shapes, "units": units},
               out / f"results-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--fsdp" in sys.argv[3:])
