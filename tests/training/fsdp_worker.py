"""One training step of a LoRA model on a tiny random GPTQ checkpoint, on the CPU, for tests/training/test_fsdp.py:

    python tests/training/fsdp_worker.py CHECKPOINT OUT                                  # one process, no FSDP
    python -m torch.distributed.run --nproc-per-node 2 tests/training/fsdp_worker.py CHECKPOINT OUT --fsdp [--resume]
        [--replicated-adapters]

With --fsdp the model is loaded without its GPTQ packed tensors and sharded as train.py shards it under
accelerate_fsdp.yaml (`fsdp.shard_model`: accelerate's own FSDP2 preparation, then each rank reads its rows of the
packed tensors; accelerate does not select FSDP on the CPU, so it is called directly, with the plugin that config
describes) over gloo. The batch is two rows of equal length: one
process trains on both, each of two ranks on its own row, so the ranks' mean loss and averaged (reduce-scattered)
gradient are the one-process ones up to fp32 rounding. Writes OUT/results-<rank>.pt (loss, LoRA gradients, the local and
global shape of every packed tensor, the tensor bytes this rank read from the checkpoint) and OUT/adapter (rank 0,
PEFT format). The same step again with the fast path's lean LoRA (`fast_lora.speed_up_lora`, dequantising from the
gathered tensors in forward and backward), after what `enable_fast_training` does first on shards (a short row through
the whole model, then one layer run alone and gathered whole, as its planner measures it), the last layer keeping its
activations but not its norm outputs (`norm_recompute`), the others recomputing: OUT/results-lean-<rank>.pt (loss,
LoRA gradients, the lone layer's input gradient and whether it stayed gathered through it).

--resume then runs train.py's own `sft.train` sharded as under accelerate_fsdp.yaml (CHECKPOINT needs a tokenizer):
OUT/whole trains 2 steps; OUT/cut, its directory as
after step 1 (killed after the step-1 checkpoint), resumes to step 2; OUT/whole, its adapter removed as by a kill after
the last checkpoint, is resumed and saves it again (OUT/whole-adapter keeps the first one). With
--replicated-adapters also OUT/accumulated-{replicated,sharded}: 2 steps of 2 accumulated rows, gpu.shard_adapters
false and true, and OUT/switched-from-accumulated-{replicated,sharded}: each cut after step 1, resumed under the
other setting.
"""

import os
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from finetune.gptq.layer import PACKED_TENSORS
from finetune.gptq.loader import load_model
from finetune.gpu.fast_lora import speed_up_lora
from finetune.gpu.fast_training import (
    RecomputePlan,
    apply_plan,
    decoder_layers,
    gathered_alone,
    gathered_layer_bytes,
    rotary_embedding,
    settle_sharded_root,
)
from finetune.gpu.norm_recompute import NormRecompute
from finetune.training.fsdp import full_adapter_state, prefetch_next_layer, shard_model


def lora_model(checkpoint: str, sharded: bool) -> torch.nn.Module:
    torch.manual_seed(0)  # the same adapter on every rank and in the one-process run
    model = get_peft_model(load_model(checkpoint, device="cpu", defer_packed=sharded),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapters matter
                param.normal_(std=0.1)
    model.activation_checkpointing_enable()  # the recipes' default: each layer recomputed inside its FSDP unit
    return model.train()


REPLICATED = "--replicated-adapters" in sys.argv[3:]  # gpu.shard_adapters=false: LoRA whole on each rank


def shard(accelerator: Accelerator, model: torch.nn.Module) -> int:
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT")
    read = shard_model(accelerator, model, shard_adapters=not REPLICATED)
    prefetch_next_layer(model)  # as train.py shards
    return read


def batch(model: torch.nn.Module, accelerator: Accelerator, sharded: bool) -> torch.Tensor:
    """Two rows of 48 tokens; sharded, each rank its own row."""
    tokens = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    return tokens[accelerator.process_index:][:1] if sharded else tokens


def gathered_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for name, p in model.named_parameters() if p.requires_grad}


def main(checkpoint: str, out: str, sharded: bool) -> None:
    out = Path(out)
    accelerator = Accelerator(cpu=True)  # under torchrun: gloo process group of WORLD_SIZE ranks
    model = lora_model(checkpoint, sharded)
    bytes_read = {"dense": model.get_base_model().gptq_bytes_read}
    if sharded:
        bytes_read["packed"] = shard(accelerator, model)
    # FSDP units: each decoder layer (LoRA inside), the embedding, the output tail, the root
    units = sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule))
    shapes = {name: (tuple(p.to_local().shape), tuple(p.shape)) for name, p in model.named_parameters()
              if name.rsplit(".", 1)[-1] in PACKED_TENSORS and isinstance(p, DTensor)}
    tokens = batch(model, accelerator, sharded)
    # SGD: a step in proportion to the gradient, so the adapters differ by its rounding only (AdamW's first step
    # divides by |gradient| and would magnify the rounding of near-zero gradients)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    grads = gathered_grads(model)
    optimizer.step()
    state = full_adapter_state(model) if sharded else None  # every rank gathers; rank 0 saves
    if accelerator.is_main_process:
        model.save_pretrained(out / "adapter", state_dict=state)
    mean_loss = accelerator.reduce(loss.detach(), reduction="mean") if sharded else loss.detach()
    torch.save({"loss": mean_loss.item(), "grads": grads, "shapes": shapes, "units": units, "bytes_read": bytes_read},
               out / f"results-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()


def lean_step(checkpoint: str, out: str, sharded: bool) -> None:
    accelerator = Accelerator(cpu=True)
    model = lora_model(checkpoint, sharded)
    speed_up_lora(model)
    if sharded:
        shard(accelerator, model)
        settle_sharded_root(model, torch.device("cpu"))
    # one layer alone, forward and input gradient, as fast_training.measure_layer runs it before training: gathered
    # whole throughout (FSDP2's hooks would reshard it after the forward), sharded again after
    layer, rotary = decoder_layers(model)[1], rotary_embedding(model)
    numbers = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 16, model.config.hidden_size, generator=numbers, requires_grad=True)
    position_ids = torch.arange(16)[None]
    with gathered_alone(layer) as forward:
        out_hidden = forward(hidden, position_embeddings=rotary(hidden, position_ids), position_ids=position_ids)
        input_grad, = torch.autograd.grad(out_hidden, hidden, torch.randn(out_hidden.shape, generator=numbers))
        gathered_throughout = not any(isinstance(p, DTensor) for p in layer.parameters())
    sharded_after = all(isinstance(p, DTensor) for p in layer.parameters() if not p.requires_grad)  # the weights
    layers, norms = decoder_layers(model), NormRecompute()
    for each in layers:
        norms.watch(each)
    apply_plan(layers, RecomputePlan(keep=1, offload=0, bytes=0), hooks=None, norms=norms)
    tokens = batch(model, accelerator, sharded)
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    mean_loss = accelerator.reduce(loss.detach(), reduction="mean") if sharded else loss.detach()
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())  # a DTensor's numel is the whole one
    adapter_bytes = sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)
    torch.save({"loss": mean_loss.item(), "grads": gathered_grads(model), "gathered_bytes": gathered_layer_bytes(layer),
                "layer_bytes": layer_bytes, "adapter_bytes": adapter_bytes, "input_grad": input_grad,
                "gathered_throughout": gathered_throughout, "sharded_after": sharded_after},
               Path(out) / f"results-lean-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()


def select_fsdp_on_cpu() -> None:
    """accelerate_fsdp.yaml's settings as `accelerate launch` passes them, and FSDP2 selected on the CPU as accelerate
    selects it on GPUs (it picks plain multi-CPU there)."""
    os.environ.update({"ACCELERATE_USE_CPU": "true", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                       "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_RESHARD_AFTER_FORWARD": "true",
                       "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"})
    init = AcceleratorState.__init__

    def init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = init_fsdp_on_cpu


def train_and_resume(checkpoint: str, out: str) -> None:
    from finetune.config.recipe import compose_recipe
    from finetune.training import sft

    def run(name: str, *overrides: str, shard_adapters: bool = not REPLICATED):
        sft.train(compose_recipe("smoke", [f"model.name={checkpoint}", f"output_dir={out}/{name}", "train.max_steps=2",
                                           "train.save_steps=1", "train.max_length=256", "train.learning_rate=1e-2",
                                           "lora.dropout=0.1", "train.activation_checkpointing=true",
                                           f"gpu.shard_adapters={str(shard_adapters).lower()}", *overrides]))

    def on_main_process(work, *args, **kwargs):
        state = PartialState()
        if state.is_main_process:
            work(*args, **kwargs)
        state.wait_for_everyone()

    def cut_after_step_1(source: str, name: str):  # the run directory as a kill after its step-1 checkpoint left it
        on_main_process(shutil.copytree, f"{out}/{source}", f"{out}/{name}",
                        ignore=shutil.ignore_patterns("checkpoint-2", "adapter", "loss_curve.png", "metrics.json"))

    run("whole")
    cut_after_step_1("whole", "cut")
    run("cut", "resume=true")
    # killed after its last checkpoint, before the adapter was saved
    on_main_process(os.replace, f"{out}/whole/adapter", f"{out}/whole-adapter")
    run("whole", "resume=true")
    if REPLICATED:  # the same run with two rows a step (gradients accumulated), the adapters replicated and sharded
        def accumulated(shard_adapters: bool) -> str:
            return f"accumulated-{'sharded' if shard_adapters else 'replicated'}"

        for shard_adapters in (False, True):
            run(accumulated(shard_adapters), "train.gradient_accumulation_steps=2", shard_adapters=shard_adapters)
        for shard_adapters in (False, True):  # each cut after step 1 and resumed under the other setting
            source = accumulated(not shard_adapters)
            cut_after_step_1(source, f"switched-from-{source}")
            run(f"switched-from-{source}", "train.gradient_accumulation_steps=2", "resume=true",
                shard_adapters=shard_adapters)


if __name__ == "__main__":
    if "--resume" in sys.argv[3:]:
        select_fsdp_on_cpu()
    main(sys.argv[1], sys.argv[2], "--fsdp" in sys.argv[3:])
    lean_step(sys.argv[1], sys.argv[2], "--fsdp" in sys.argv[3:])
    if "--resume" in sys.argv[3:]:  # in the same processes: the imports and the process group once
        train_and_resume(sys.argv[1], sys.argv[2])
    PartialState().destroy_process_group()
