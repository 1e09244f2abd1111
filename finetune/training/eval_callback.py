"""Evaluation during training: every N optimiser steps, the log-likelihood accuracy of the model in training on a
fixed slice of a benchmark, logged through the trainer."""

import time
from contextlib import contextmanager

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

from ..data.records import QAItem
from ..evaluation.benchmarks import EvalError, benchmark_specs, load_items
from ..evaluation.harness import predict_loglik


def training_slice(cfg: DictConfig) -> tuple[str, list[QAItem]]:
    """The benchmark name and the fixed slice that eval.during_training scores (no items when it is off);
    loaded now, so that a bad benchmark or file fails before the model loads."""
    during = cfg.eval.during_training
    if during.every_n_steps < 0 or during.n_items < 1:
        raise EvalError(f"eval.during_training: every_n_steps={during.every_n_steps} must be >= 0 (0: off) and "
                        f"n_items={during.n_items} >= 1")
    if not during.every_n_steps:
        return during.benchmark, []
    specs = benchmark_specs()
    if during.benchmark not in specs:
        raise EvalError(f"eval.during_training.benchmark={during.benchmark!r} is unknown; pick from {', '.join(specs)}")
    return during.benchmark, load_items(specs[during.benchmark], cfg, during.n_items)[1]


@contextmanager
def sdpa_attention(model):
    """The model attends through sdpa inside the block: scoring passes a 4D tree mask, which the flex attention
    that packed training uses (finetune.gpu.fast_training) does not take."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    if previous != "sdpa":
        base.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        if previous != "sdpa":
            base.set_attn_implementation(previous)


class SliceAccuracyCallback(TrainerCallback):
    """Every `every_n_steps` optimiser steps, the log-likelihood accuracy of the model in training on a fixed
    slice, logged through the trainer as `eval/<benchmark>_accuracy` (so wandb and the log history get it)."""

    def __init__(self, trainer, benchmark: str, items: list[QAItem], every_n_steps: int, batch_size: int = 8,
                 system: str | None = None):
        self.trainer, self.benchmark, self.items = trainer, benchmark, items
        self.every_n_steps, self.batch_size, self.system = every_n_steps, batch_size, system

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps or not state.is_world_process_zero:
            return
        model = self.trainer.model
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the step's queued kernels belong to the step's time, not the evaluation's
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        with torch.inference_mode(), sdpa_attention(model):
            records = predict_loglik(model, self.trainer.processing_class, self.items, self.batch_size,
                                     self.system, desc=f"eval {self.benchmark}")
        model.train(was_training)
        should_log = control.should_log  # trainer.log clears it, which would drop this step's loss log
        self.trainer.log({f"eval/{self.benchmark}_accuracy": sum(r["correct"] for r in records) / len(records),
                          "eval/seconds": round(time.perf_counter() - start, 3)})
        control.should_log = should_log
