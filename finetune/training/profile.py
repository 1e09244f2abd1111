"""`profile_step=N`: one optimiser step of a training run under torch.profiler, to see where its time goes.

The window is one step as the run's metrics count it, boundary included: from the end of step N-1's optimiser
step (its logging, any evaluation or checkpoint after it, loading step N's batch) to the end of step N's (from
step N's start when N is 1). Writes into the run directory (each process of a multi-GPU run its own, `-rank<R>`
added after the first):

    profile.txt          the window's wall time, device time by kind of kernel (matmul, GPTQ dequantise, attention,
                         communication, host copies, other), where the GPU sat idle (main process: the longest
                         holes in its timeline and the host op that launched the kernel ending each; and how long
                         only host copies ran, the kernels waiting on the host link; the "other" kernels and
                         copies by kernel and the host op that launched them), then torch's table of the ops that
                         took most time
    profile_trace.json   the timeline, for chrome://tracing or https://ui.perfetto.dev (main process only)

Kernels on different streams (NCCL, host copies) overlap the compute stream, so the kinds can add up to more than
the wall time; the holes are where no stream ran anything: the GPU waiting for the host.
"""

import bisect
import collections
import json
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


def _holes(device: list[dict], origin: float) -> tuple[list[tuple[float, float, dict]], float]:
    """The gaps in which none of `device` (sorted by start) ran, as (length, start after `origin`, the event ending
    it), and the time in which some ran."""
    holes, busy_until = [], device[0]["ts"]
    for event in device:
        if event["ts"] > busy_until:
            holes.append((event["ts"] - busy_until, busy_until - origin, event))
        busy_until = max(busy_until, event["ts"] + event["dur"])
    return holes, busy_until - device[0]["ts"] - sum(hole[0] for hole in holes)


def _device_events(trace: dict) -> tuple[list[dict], list[dict]]:
    """(all complete events, the GPU's kernels, copies and memsets sorted by start) of a torch.profiler chrome trace."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
    return events, device


def _launcher(events: list[dict]):
    """launched_by(device event): the host ops (innermost first, up to three) running when its launch was made."""
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
    host_ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation")), key=lambda e: e["ts"])
    op_starts = [e["ts"] for e in host_ops]

    def launched_by(event) -> str:
        launch = launches.get(event.get("args", {}).get("correlation"))
        if launch is None:
            return "?"
        end = bisect.bisect_right(op_starts, launch["ts"])  # the ops started by the launch; the last 2,000 suffice
        inside = [op for op in host_ops[max(0, end - 2000):end]
                  if op["tid"] == launch["tid"] and op["ts"] + op["dur"] >= launch["ts"]]
        return " < ".join(op["name"] for op in reversed(inside[-3:])) or "?"

    return launched_by


def _ms(length_us: float) -> str:
    return f"{length_us / 1e3:.1f} ms"


def idle_holes(trace: dict, top: int = 8) -> list[str]:
    """Where no kernel or copy ran, from a chrome trace of torch.profiler: total, by length, and the `top` longest
    holes with the host op (innermost first) that launched the kernel ending each; then the time in which only host
    copies ran (the compute waiting on the host link: layers whose activations live in host memory). Empty without
    GPU events."""
    events, device = _device_events(trace)
    if not device:
        return []
    launched_by = _launcher(events)
    holes, busy = _holes(device, device[0]["ts"])
    compute = [e for e in device if kernel_kind(e["name"]) != "host copies"]
    compute_holes, computing = _holes(compute, device[0]["ts"]) if compute else ([], 0.0)

    lengths = [hole[0] for hole in holes]
    summary = (f"GPU idle: {_ms(sum(lengths))} of {_ms(busy + sum(lengths))} in {len(holes)} holes "
               f"({_ms(sum(x for x in lengths if x < 5))} in holes under 5 us, "
               f"{_ms(sum(x for x in lengths if x >= 1000))} in holes of 1 ms or more)")
    lines = [summary, f"the {top} longest (ms, at ms into the window, the host op that launched the kernel after it):"]
    lines += [f"  {length / 1e3:8.1f} {at / 1e3:9.1f}  {launched_by(event)[:100]}"
              for length, at, event in sorted(holes, key=lambda hole: -hole[0])[:top]]
    if busy > computing:
        longest = sorted(compute_holes, key=lambda hole: -hole[0])[:top]
        lines.append(f"only host copies ran: {_ms(busy - computing)}; the longest gaps between kernels (ms at ms into "
                     "the window): " + ", ".join(f"{length / 1e3:.1f} at {at / 1e3:.1f}" for length, at, _ in longest))
    return lines


def other_device_time(trace: dict, top: int = 8) -> list[str]:
    """The device time of the kernels of kind "other" (elementwise passes, device-to-device copies, memsets, custom
    kernels), by kernel and the host op that launched it, the `top` largest: where the passes beside the matmuls
    come from. Empty without GPU events."""
    events, device = _device_events(trace)
    others = [e for e in device if kernel_kind(e["name"]) == "other"]
    if not others:
        return []
    launched_by = _launcher(events)
    time, count = collections.Counter(), collections.Counter()
    for event in others:
        key = f"{event['name'][:60]}  <  {launched_by(event)[:100]}"
        time[key] += event["dur"]
        count[key] += 1
    header = (f"'other' on the GPU: {_ms(sum(time.values()))} in {len(others)} kernels and copies; the {top} largest "
              "by kernel and the host op that launched it (ms, count):")
    return [header, *(f"  {length / 1e3:8.1f} {count[key]:6d}  {key}" for key, length in time.most_common(top))]


def profile_report(wall_s: float, events, trace: dict | None = None) -> str:
    by_kind = device_time_by_kind(events)
    lines = [f"one optimiser step: {wall_s:.3f} s wall", "", "device time by kind (seconds, share of the wall time):"]
    lines += [f"  {kind:32s} {seconds:8.3f}  {seconds / wall_s:6.1%}" for kind, seconds in
              sorted(by_kind.items(), key=lambda item: -item[1])]
    sections = [idle_holes(trace), other_device_time(trace)] if trace is not None else []
    sort_by = "self_device_time_total" if any(by_kind.values()) else "self_cpu_time_total"
    return "\n".join([*lines, *(line for section in sections if section for line in ["", *section]), "",
                      events.table(sort_by=sort_by, row_limit=40, max_name_column_width=70)])


class ProfileStep(TrainerCallback):
    """Profiles optimiser step `step` (1-based, as the Trainer counts) from the end of the step before it and
    writes profile.txt (+ the trace)."""

    def __init__(self, step: int, run_dir: Path, rank: int = 0):
        self.step, self.run_dir, self.rank = step, Path(run_dir), rank
        self.profiler, self.start, self.cuda = None, 0.0, False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            self.begin()
        elif state.global_step == self.step and self.profiler is not None:
            self.end()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and self.profiler is None:  # step 1 has no step before it
            self.begin()

    def begin(self):
        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self.cuda:
            torch.cuda.synchronize()
        self.profiler = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if self.cuda else [])])
        self.profiler.__enter__()
        self.start = time.perf_counter()

    def end(self):
        if self.cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - self.start
        self.profiler.__exit__(None, None, None)
        suffix = f"-rank{self.rank}" if self.rank else ""
        trace = None
        if not self.rank:
            trace_path = self.run_dir / "profile_trace.json"
            write_atomic(trace_path, lambda p: self.profiler.export_chrome_trace(str(p)))
            trace = json.loads(trace_path.read_text())
        report = profile_report(wall_s, self.profiler.key_averages(), trace)
        write_atomic(self.run_dir / f"profile{suffix}.txt", lambda p: p.write_text(report + "\n"))
        self.profiler = None
