"""profile_step's window and its account of where the GPU sat idle (training/profile.py)."""

import json

import torch
from transformers import TrainerControl, TrainerState

from finetune.training.profile import ProfileStep, idle_holes, other_device_time


def test_the_window_runs_from_the_end_of_the_step_before_to_the_end_of_the_profiled_step(tmp_path):
    """What ran between steps 1 and 2 (a step's logging, loading the next batch) is in step 2's profile; step 1,
    with no step before it, is profiled from its start."""
    control = TrainerControl()
    for step, boundary_op in ((2, torch.cumsum), (1, None)):
        run_dir = tmp_path / f"step{step}"
        run_dir.mkdir()
        callback = ProfileStep(step, run_dir)
        for global_step in range(step):  # steps before the profiled one, then the profiled one
            callback.on_step_begin(None, TrainerState(global_step=global_step), control)
            torch.mm(torch.ones(8, 8), torch.ones(8, 8))
            callback.on_step_end(None, TrainerState(global_step=global_step + 1), control)
            if global_step + 1 < step:
                boundary_op(torch.ones(8), dim=0)  # between the steps: after step 1's end, before step 2's begin
        ops = {event.get("name") for event in json.loads((run_dir / "profile_trace.json").read_text())["traceEvents"]}
        assert "aten::mm" in ops and ("aten::cumsum" in ops) == (step == 2)
        assert (run_dir / "profile.txt").read_text().startswith("one optimiser step: ")
        assert callback.profiler is None


def trace_of(kernels: list[tuple[float, float, int]], host_ops: list[tuple[str, float, float]]) -> dict:
    """A chrome trace as torch.profiler writes it: kernels (start, duration, correlation id) on one stream, each
    launched at its start minus 2 us from thread 1, and host ops (name, start, duration) on thread 1."""
    events = [{"ph": "X", "cat": "kernel", "name": f"k{i}", "tid": 7, "ts": start, "dur": dur,
               "args": {"correlation": i}} for start, dur, i in kernels]
    events += [{"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": start - 2, "dur": 1,
                "args": {"correlation": i}} for start, _, i in kernels]
    events += [{"ph": "X", "cat": "cpu_op", "name": name, "tid": 1, "ts": start, "dur": dur, "args": {}}
               for name, start, dur in host_ops]
    return {"traceEvents": events}


def test_idle_holes_measure_the_gaps_and_name_the_host_op_that_ended_each():
    # kernels at 0-100, 103-200 (a 3 us hole), 150-1200 (overlaps: no hole), 3200-3300 (a 2 ms hole)
    trace = trace_of([(0, 100, 1), (103, 97, 2), (150, 1050, 3), (3200, 100, 4)],
                     [("aten::mm", 90, 20), ("Optimizer.step", 1000, 2500), ("aten::_foreach_norm", 3190, 20)])
    lines = idle_holes(trace, top=2)
    assert lines[0] == ("GPU idle: 2.0 ms of 3.3 ms in 2 holes (0.0 ms in holes under 5 us, 2.0 ms in holes of "
                        "1 ms or more)")
    assert lines[2].split() == ["2.0", "1.2", "aten::_foreach_norm", "<", "Optimizer.step"]
    assert lines[3].split() == ["0.0", "0.1", "aten::mm"]
    assert idle_holes({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 0,
                                        "dur": 5}]}) == []  # a CPU-only run: no GPU to be idle


def test_the_time_in_which_only_host_copies_ran_is_the_compute_waiting_on_the_link():
    # kernels at 0-100 and 1100-1200, a host-to-GPU copy at 50-1150 (the compute waits 1 ms for it), and a kernel
    # at 1300-1400 after a 0.1 ms idle hole
    trace = trace_of([(0, 100, 1), (1100, 100, 2), (1300, 100, 3)], [])
    trace["traceEvents"].append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "tid": 8,
                                 "ts": 50, "dur": 1100, "args": {}})
    lines = idle_holes(trace, top=2)
    assert lines[0].startswith("GPU idle: 0.1 ms of 1.4 ms in 1 holes")
    assert lines[-1] == ("only host copies ran: 1.0 ms; the longest gaps between kernels (ms at ms into the window): "
                         "1.0 at 0.1, 0.1 at 1.2")
    assert not any(line.startswith("only host copies") for line in idle_holes(trace_of([(0, 100, 1)], [])))


def test_other_device_time_names_each_pass_beside_the_matmuls_and_what_launched_it():
    # a GEMM (not "other"), two device-to-device copies launched inside aten::addmm under a LoRA forward, and a
    # Triton kernel launched outside any recorded op
    trace = trace_of([(0, 900, 1), (1000, 300, 2), (1400, 200, 3), (1700, 50, 4)],
                     [("_LoraGPTQ", 990, 700), ("aten::addmm", 995, 10), ("aten::addmm", 1395, 10)])
    names = {1: "nvjet_sm90_tst_128x256_TNN", 2: "Memcpy DtoD (Device -> Device)", 3: "Memcpy DtoD (Device -> Device)",
             4: "_drop_kernel"}
    for event in trace["traceEvents"]:
        if event["cat"] == "kernel":
            event["name"] = names[event["args"]["correlation"]]
    lines = other_device_time(trace, top=2)
    assert lines[0] == ("'other' on the GPU: 0.6 ms in 3 kernels and copies; the 2 largest by kernel and the host op "
                        "that launched it (ms, count):")
    assert [line.split() for line in lines[1:]] == [
        ["0.5", "2", "Memcpy", "DtoD", "(Device", "->", "Device)", "<", "aten::addmm", "<", "_LoraGPTQ"],
        ["0.1", "1", "_drop_kernel", "<", "?"]]
    assert other_device_time(trace_of([], [])) == []
