"""Host work at every training step, made cheap, since the GPU waits while the host does it: the Trainer's walk over
the modules at each step's start, and Python's garbage collector's full passes over the long-lived heap.
"""

import gc
import types
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel, TrainerCallback

# train() overrides that do nothing more than nn.Module.train when the mode does not change
PLAIN_TRAIN = (torch.nn.Module.train, PreTrainedModel.train)


def skip_unchanged_mode_switch(model: torch.nn.Module) -> None:
    """Make model.train(mode) / model.eval() return at once when every module is in that mode already.

    The Trainer calls model.train() at every step. On a 70B LoRA model that sets `training` on ~6,600 modules
    through nn.Module.__setattr__ (~15 ms of host time, ~30 ms with the rest of the step's start, in which the GPU
    waits: profile_step shows it as the hole before the embedding); reading the flags takes a third of that. A model
    holding a module whose own train() does more (PEFT's DoRA clears a cache) keeps the full walk every time."""
    if all(type(module).train in PLAIN_TRAIN for module in model.modules()):
        model.train = types.MethodType(_train_unless_unchanged, model)  # bound: a deep copy binds to the copy


def _train_unless_unchanged(self, mode: bool = True):
    if any(module.training != mode for module in self.modules()):
        type(self).train(self, mode)
    return self


class FreezeHeap(TrainerCallback):
    """Python's garbage collector leaves long-lived objects out of its full passes: those alive when training starts
    (model, data, tokenizer) and those the first `warmup_steps` make and keep (optimizer state, compiled kernels,
    caches). Each full pass would otherwise walk them all in the middle of some step: ~0.16 s every ~14 steps at 70B
    with only the start frozen. Use it through `frozen_heap`, which undoes the freeze when training ends."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step <= self.warmup_steps:
            gc.collect()
            gc.freeze()


@contextmanager
def frozen_heap(warmup_steps: int = 2):
    """Yields the FreezeHeap callback for the Trainer, with the heap alive now frozen; unfreezes everything when
    training ends, however it ends."""
    gc.collect()
    gc.freeze()
    try:
        yield FreezeHeap(warmup_steps)
    finally:
        gc.unfreeze()
