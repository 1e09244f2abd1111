"""What a training run leaves in its directory, each file written whole or not at all (temp path + rename):

    config.yaml        the resolved recipe, written before training starts
    metrics.json       loss per step, accuracies on the eval.during_training slice, the run's summary, the data
                       report (examples per entry, skipped bad rows and their messages), the GPU fast path's plan
                       (what it could not take included) and, per logged step of this process, its training
                       seconds and tokens/s, the seconds it spent beside training (eval.during_training, saving a
                       checkpoint, Python's garbage collector), host memory (RSS and pinned), GPU peak and the
                       allocator's retries so far
    loss_curve.png     the loss per step
    adapter/           the final LoRA adapter in PEFT format, with the tokenizer it was trained with
    checkpoints/       the Trainer's checkpoint-N folders, for resume=true

metrics.json is rewritten at every log, so a run killed at any moment leaves every step it logged; loss_curve.png at
the first log, then at most every PLOT_EVERY_S seconds, at each checkpoint and when training ends: at
logging_steps=1, drawing it every step (~0.1 s, after the loss's .item() has emptied the GPU's queue) left a 70B
step's GPU idle for 5 % of it.
"""

import gc
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from matplotlib.figure import (
    Figure,  # the Figure API renders with Agg: no display, no pyplot state
)
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from ..config.files import write_atomic
from .fsdp import full_adapter_state

PLOT_EVERY_S = 30.0


def save_config(cfg: DictConfig, run_dir: Path, command: str) -> None:
    header = f"# {command}\n# resolved recipe; rerun with: recipe=<this file>\n"
    write_atomic(run_dir / "config.yaml", lambda p: p.write_text(header + OmegaConf.to_yaml(cfg)))


def plot_loss(steps: list[int], losses: list[float], path: Path, title: str) -> None:
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
    ax.set(xlabel="step", ylabel="training loss (answer tokens)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png"))


class RunReport(TrainerCallback):
    """Rewrites metrics.json and loss_curve.png from the Trainer's own log history, which a resumed run restores
    from its checkpoint: the files always cover the whole run (the plot up to PLOT_EVERY_S behind while it trains).

    A step's "seconds" run from the end of the previous step's log (or checkpoint save) to its own loss log, less
    the evaluation logged in between ("eval_s"); a checkpoint saved after the log is the step's "save_s". So the
    steps' seconds compare training with training, and seconds + eval_s + save_s add up to the wall time."""

    def __init__(self, run_dir: Path, data_report: dict, title: str, plot_every_s: float = PLOT_EVERY_S):
        self.run_dir, self.data_report, self.title = Path(run_dir), data_report, title
        self.plot_every_s, self.last_plot = plot_every_s, None  # perf_counter() of the last plot
        self.fast_path, self.speed = None, []
        self.last_log = (time.perf_counter(), 0)  # (when, tokens so far) at the previous log
        self.tokens = None  # TRL's token count, from whichever log carried it last
        self.eval_s = 0.0  # evaluation logged since the previous step log
        self.gc_s, self.gc_start = 0.0, None  # Python's garbage collection since the previous step log

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.fast_path = getattr(base, "fast_training_report", None)
        self.last_log = (time.perf_counter(), 0)

    @contextmanager
    def timing_gc(self):
        """Around `trainer.train()`: each step's "gc_s" is the collector's time in it. The timer leaves
        gc.callbacks when training ends, however it ends (the Trainer's on_train_end does not run after an error)."""
        gc.callbacks.append(self.time_gc)
        try:
            yield
        finally:
            gc.callbacks.remove(self.time_gc)

    def time_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.gc_start = time.perf_counter()
        elif self.gc_start is not None:
            self.gc_s += time.perf_counter() - self.gc_start

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        # TRL adds its step metrics to the next log of any kind: an eval.during_training log can take num_tokens
        self.tokens = logs.get("num_tokens", self.tokens)
        self.eval_s += logs.get("eval/seconds", 0.0)
        if "loss" in logs:  # a training step's log (the loss .item() has waited for the GPU)
            self.speed.append(self.step_speed(state.global_step, self.tokens))
        self.write(state, plot=self.last_plot is None or time.perf_counter() - self.last_plot >= self.plot_every_s)

    def on_save(self, args, state, control, **kwargs):
        self.write(state, plot=True)  # the plot as current as the checkpoint (drawing it counts in save_s)
        now = time.perf_counter()
        if self.speed and self.speed[-1]["step"] == state.global_step:
            self.speed[-1]["save_s"] = round(now - self.last_log[0], 3)
        self.last_log = (now, self.last_log[1])

    def on_train_end(self, args, state, control, **kwargs):
        self.write(state, plot=True)

    def step_speed(self, step: int, tokens: float | None) -> dict:
        """Since the previous log: training seconds, tokens/s (from TRL's token count), the seconds beside
        training, and memory now."""
        now, last_tokens = time.perf_counter(), self.last_log[1]
        entry = {"step": step, "seconds": round(now - self.last_log[0] - self.eval_s, 3)}
        if tokens is not None:
            entry["tokens_per_s"] = round((tokens - last_tokens) / max(entry["seconds"], 1e-9), 1)
        if self.eval_s:
            entry["eval_s"] = round(self.eval_s, 3)
        entry["gc_s"] = round(self.gc_s, 3)
        self.last_log = (now, tokens if tokens is not None else last_tokens)
        self.eval_s = self.gc_s = 0.0
        entry["host_rss_gib"] = round(psutil.Process().memory_info().rss / 2 ** 30, 2)
        if torch.cuda.is_initialized():
            pinned = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)  # torch's pinned allocator
            entry["pinned_gib"] = round(pinned / 2 ** 30, 2)
            entry["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            # the allocator freed its cache and retried (a synchronising cudaFree): a step's time near a memory cap
            entry["gpu_alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        return entry

    def write(self, state, plot: bool) -> None:
        if plot:
            self.last_plot = time.perf_counter()
        if not state.is_world_process_zero:
            return
        log_history = state.log_history
        steps = [entry for entry in log_history if "loss" in entry]
        summary = next((entry for entry in reversed(log_history) if "train_runtime" in entry), {})
        # an eval log entry also carries what TRL adds to every log (entropy, token accuracy): keep the eval's own
        evals = [{k: v for k, v in entry.items() if k.startswith("eval/") or k in ("step", "epoch")}
                 for entry in log_history if any(key.startswith("eval/") for key in entry)]
        metrics = {"loss": [{k: entry[k] for k in ("step", "epoch", "loss", "learning_rate", "grad_norm")
                             if k in entry} for entry in steps],
                   "eval": evals, "summary": summary, "data": self.data_report, "fast_path": self.fast_path,
                   "speed": self.speed}
        write_atomic(self.run_dir / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=1)))
        if steps and plot:
            plot_loss([e["step"] for e in steps], [e["loss"] for e in steps], self.run_dir / "loss_curve.png",
                      self.title)


def save_adapter(trainer, run_dir: Path) -> Path:
    """The trained adapter (and tokenizer) as `run_dir/adapter`, in PEFT's format, via a temp folder."""
    final, tmp = run_dir / "adapter", run_dir / ".adapter.tmp"
    model = trainer.accelerator.unwrap_model(trainer.model)
    # sharded (FSDP2): every rank gathers the adapter whole, rank 0 saves it as one process would
    state = full_adapter_state(model) if trainer.is_fsdp_enabled else None
    if trainer.accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state)
        trainer.processing_class.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)  # present only if a finished run was resumed and finished again
        os.replace(tmp, final)
    trainer.accelerator.wait_for_everyone()
    return final
