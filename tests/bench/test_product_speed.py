"""bench.product_speed's summary of a run's per-step log (metrics.json's "speed"): what the speed figures and the
steadiness and host-memory checks in eval/BENCHMARKS.md are computed from."""

from finetune import REPO_ROOT
from finetune.bench.product_speed import (
    failure,
    format_table,
    launch_command,
    recipe_overrides,
    summarise,
    train_runs,
)


def step(n, seconds, tokens, rss, pinned=30.0, **beside):
    return {"step": n, "seconds": seconds, "tokens_per_s": tokens / seconds, "gc_s": 0.01 * n, "host_rss_gib": rss,
            "pinned_gib": pinned, "gpu_peak_gib": 60.0 + n / 100, **beside}


def test_summary_leaves_out_warm_up_and_counts_evaluation_and_saves_only_in_the_wall_time():
    speed = [step(1, 40.0, 4096, 39.0), step(2, 15.0, 4096, 39.1), step(3, 2.0, 4000, 39.1),
             step(4, 2.5, 4096, 39.2, eval_s=4.0), step(5, 3.0, 2048, 39.2), step(6, 2.5, 4096, 39.2, save_s=6.5)]
    summary = summarise(speed, warmup=2)
    # tok/s over the timed steps' training seconds: (4000 + 4096 + 2048 + 4096) / (2 + 2.5 + 3 + 2.5)
    assert summary["tokens_per_s"] == round(14240 / 10.0, 1)
    # ... and over the wall time, the evaluation and the checkpoint save included
    assert summary["wall_tokens_per_s"] == round(14240 / 20.5, 1)
    assert summary["beside_training_s"] == {4: {"eval_s": 4.0}, 6: {"save_s": 6.5}}
    # median and slowest over the training seconds 2.0, 2.5, 3.0, 2.5; the collector's time in the slowest
    assert (summary["median_step_s"], summary["slowest_step"], summary["slowest_over_median"]) == (2.5, 5, 1.2)
    assert summary["slowest_gc_s"] == 0.05 and summary["gc_s"] == 0.18
    assert summary["host_rss_gib"] == [39.0, 39.2] and summary["pinned_gib"] == [30.0, 30.0]
    assert summary["gpu_peak_gib"] == 60.06 and (summary["steps"], summary["timed_steps"]) == (6, 4)
    assert "error" in summarise(speed[:2], warmup=2)
    # a profiled step and the one before it (where the profiler starts) are left out: steps 4 and 5
    assert summarise(speed, warmup=2, profiled=5)["tokens_per_s"] == round(8096 / 4.5, 1)
    assert summary["alloc_retries"] is None  # not logged (a CPU run)


def test_allocator_retries_are_counted_after_the_warm_up():
    """metrics.json logs the allocator's cumulative retry count per step; the summary gives those of the timed steps."""
    speed = [step(n, 2.0, 4096, 39.0, gpu_alloc_retries=count) for n, count in enumerate([0, 1, 1, 2, 2, 4], 1)]
    assert summarise(speed, warmup=2)["alloc_retries"] == 3
    assert summarise(speed, warmup=0)["alloc_retries"] == 4
    table = format_table({"card": "2 × GPU", "date": "2026-11-29", "config": "L80", "command": "c",
                          "cases": {"train.py": summarise(speed, warmup=2)}})
    assert table.splitlines()[-1].startswith("| train.py | 6 (4) | 2048 (2048) | – |") and table.endswith("| 3 |")


def test_a_run_without_a_logged_step_says_why():
    """A run stopped at the deadline says so (not its last log line, a library's warning); another names its error."""
    log = "Loading...\nWARNING:liger_kernel.backends.registry:Backend impl 'rope' could not be imported\n"
    assert failure("stopped at the deadline", log) == ("stopped at the deadline before its first step was logged "
                                                       "(raise --deadline-s or lower --steps)")
    assert failure(1, "Traceback ...\nRecipeError: memory_budget_gib=40 is too small\n") == \
        "RecipeError: memory_budget_gib=40 is too small"
    assert failure(-9, "") == "no output"


def test_train_runs_put_a_baseline_around_this_checkout_and_a_warm_up_run_first(tmp_path):
    assert train_runs(8, None, 0) == [("train.py", REPO_ROOT, "product", 8)]
    assert train_runs(8, str(tmp_path), 3) == [
        ("warm-up run (not compared)", REPO_ROOT, "warm-up", 3), ("baseline (first)", tmp_path, "baseline-1", 8),
        ("train.py", REPO_ROOT, "product", 8), ("baseline (again)", tmp_path, "baseline-2", 8)]


def test_launch_arguments_reach_accelerate_launch(tmp_path):
    """--launch goes to accelerate's own parser ahead of train.py: the sharded run's config file and process count."""
    from accelerate.commands.launch import launch_command_parser

    command = launch_command("--config_file accelerate_fsdp.yaml --num_processes 2", "/ck", 8, tmp_path / "run",
                             ["gpu.memory_budget_gib=40"])
    args = launch_command_parser().parse_args(command[3:])
    assert (args.config_file, args.num_processes, args.training_script) == ("accelerate_fsdp.yaml", 2,
                                                                            "finetune/train.py")
    assert args.training_script_args == ["recipe=medqa", *recipe_overrides("/ck", 8), f"output_dir={tmp_path / 'run'}",
                                         "gpu.memory_budget_gib=40"]
    assert launch_command_parser().parse_args(launch_command("--num_processes 1", "/ck", 8, tmp_path, [])[3:]) \
        .num_processes == 1
