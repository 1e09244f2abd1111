"""`train.dry_run=true`: the recipe, data and model checked, two examples shown with the tokens in the loss, the
memory estimate, and a couple of optimiser steps in a temporary folder; nothing is written into output_dir."""

import tempfile
from dataclasses import replace
from pathlib import Path

from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf
from trl import SFTTrainer

from ..gptq import GPTQLinear
from ..gptq.memory import ModelShape, estimate_lora_training_memory
from . import fsdp
from .sft import build_trainer, prepare


def trained_spans(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[bool, str]]:
    """(trained?, text) for each run of consecutive tokens that are, or are not, in the loss."""
    spans = []
    for token, label in zip(input_ids, labels):
        trained = label != -100
        if spans and spans[-1][0] == trained:
            spans[-1][1].append(token)
        else:
            spans.append((trained, [token]))
    return [(trained, tokenizer.decode(tokens)) for trained, tokens in spans]


def first_examples(trainer: SFTTrainer, n: int = 2) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of the first n examples as the trainer prepared them; a packed row is cut back
    into its examples by its seq_lengths."""
    examples = []
    for row in trainer.train_dataset:
        lengths = row.get("seq_lengths") or [len(row["input_ids"])]
        start = 0
        for length in lengths:
            examples.append((row["input_ids"][start:start + length], row["labels"][start:start + length]))
            start += length
        if len(examples) >= n:
            return examples[:n]
    return examples


def estimate_memory(model, cfg: DictConfig) -> dict[str, float]:
    """GiB to train this model at train.max_length (finetune.gptq.memory's model), from the loaded model's sizes."""
    quantised = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    quantised_bytes = sum(t.numel() * t.element_size() for m in quantised
                          for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
    quantised_ids = {id(p) for m in quantised for p in m.parameters(recurse=False)}
    dense_params = sum(p.numel() for name, p in model.named_parameters()
                       if "lora_" not in name and id(p) not in quantised_ids)
    dtype_bytes = 2 if PartialState().device.type == "cuda" else 4
    gpus = PartialState().num_processes if fsdp.fsdp_plugin() else 1  # sharded: per GPU
    return estimate_lora_training_memory(ModelShape.from_config(model.config), quantised_bytes, dense_params,
                                         cfg.train.max_length, cfg.lora.r, tuple(cfg.lora.target_modules),
                                         dtype_bytes, gpus)


def dry_run(cfg: DictConfig, steps: int = 2) -> list[float]:
    """Check config and data, show two examples with their trained spans and the memory estimate, run `steps`
    optimiser steps in a temporary folder; writes nothing into output_dir. Returns the losses."""
    prepared = prepare(cfg)
    print = PartialState().print  # once, not once per process
    print(f"config ok; data: {sum(r['examples'] for r in prepared.data_report.values())} examples "
          + ", ".join(f"{label}={r['examples']} (skipped {r['skipped_rows']})"
                      for label, r in prepared.data_report.items()))
    overrides = {"max_steps": steps, "save_strategy": "no", "report_to": "none", "logging_steps": 1}
    cfg = OmegaConf.merge(cfg, {"train": overrides})
    with tempfile.TemporaryDirectory(prefix="dry-run-") as tmp:
        trainer = build_trainer(replace(prepared, cfg=cfg), Path(tmp))
        for i, (input_ids, labels) in enumerate(first_examples(trainer), start=1):
            trained = sum(label != -100 for label in labels)
            print(f"\nexample {i}: {len(input_ids)} tokens, {trained} in the loss")
            for in_loss, text in trained_spans(trainer.processing_class, input_ids, labels):
                print(f"  {'TRAINED' if in_loss else 'masked '} {text!r}")
        memory = estimate_memory(trainer.model, cfg)
        per_gpu = f" per GPU of {PartialState().num_processes} (FSDP2)" if prepared.fsdp else ""
        print(f"\nestimated memory at max_length={cfg.train.max_length}{per_gpu}: {memory['total']:.2f} GiB ("
              + ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if k != "total") + ")")
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"dry run ok: {len(losses)} steps, loss " + " -> ".join(f"{x:.4f}" for x in losses))
    return losses
