"""`profile_step=N`: one optimiser step of a training run under torch.profiler, to see where its time goes.

Writes into the run directory (each process of a multi-GPU run its own, `-rank<R>` added after the first):

    profile.txt          the step's wall time, device time by kind of kernel (matmul, GPTQ dequantise, attention,
                         communication, host copies, other), then torch's table of the ops that took most time
    profile_trace.json   the timeline, for chrome://tracing or https://ui.perfetto.dev (main process only)

Kernels on different streams (NCCL, host copies) overlap the compute stream, so the kinds can add up to more than
the wall time; the gap between the compute kinds' sum and the wall time is the GPU waiting for the host.
"""

import re
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from ..config.files import write_atomic

# the first pattern a kernel's name matches gives its kind
KERNEL_KINDS = (
    ("communication", re.compile(r"nccl|gloo", re.IGNORECASE)),
    ("host copies", re.compile(r"memcpy (htod|dtoh)", re.IGNORECASE)),
    ("GPTQ dequantise / fused matmul", re.compile(r"dequant|gemv", re.IGNORECASE)),
    ("attention", re.compile(r"flex|attention|fmha|flash|cudnn", re.IGNORECASE)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|cublas|nvjet|sm\d+_", re.IGNORECASE)),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def device_time_by_kind(events) -> dict[str, float]:
    """Seconds of device time per kind of kernel, from a profiler's key_averages()."""
    totals = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for event in events:
        if event.device_type == DeviceType.CUDA:  # kernels and copies; CPU ops would count them twice
            totals[kernel_kind(event.key)] += event.self_device_time_total / 1e6
    return totals


def profile_report(wall_s: float, events) -> str:
    by_kind = device_time_by_kind(events)
    lines = [f"one optimiser step: {wall_s:.3f} s wall", "", "device time by kind (seconds, share of the wall time):"]
    lines += [f"  {kind:32s} {seconds:8.3f}  {seconds / wall_s:6.1%}" for kind, seconds in
              sorted(by_kind.items(), key=lambda item: -item[1])]
    sort_by = "self_device_time_total" if any(by_kind.values()) else "self_cpu_time_total"
    return "\n".join([*lines, "", events.table(sort_by=sort_by, row_limit=40, max_name_column_width=70)])


class ProfileStep(TrainerCallback):
    """Profiles optimiser step `step` (1-based, as the Trainer counts) and writes profile.txt (+ the trace)."""

    def __init__(self, step: int, run_dir: Path, rank: int = 0):
        self.step, self.run_dir, self.rank = step, Path(run_dir), rank
        self.profiler, self.start, self.cuda = None, 0.0, False

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 != self.step:
            return
        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self.cuda:
            torch.cuda.synchronize()
        self.profiler = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if self.cuda else [])])
        self.profiler.__enter__()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - self.start
        self.profiler.__exit__(None, None, None)
        suffix = f"-rank{self.rank}" if self.rank else ""
        report = profile_report(wall_s, self.profiler.key_averages())
        write_atomic(self.run_dir / f"profile{suffix}.txt", lambda p: p.write_text(report + "\n"))
        if not self.rank:
            write_atomic(self.run_dir / "profile_trace.json", lambda p: self.profiler.export_chrome_trace(str(p)))
        self.profiler = None
