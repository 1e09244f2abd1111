"""bench.product_speed's summary of a run's per-step log (metrics.json's "speed"): what the speed figures and the
steadiness and host-memory checks in eval/BENCHMARKS.md are computed from."""

from finetune.bench.product_speed import summarise


def step(n, seconds, tokens, rss, pinned=30.0):
    return {"step": n, "seconds": seconds, "tokens_per_s": tokens / seconds, "host_rss_gib": rss,
            "pinned_gib": pinned, "gpu_peak_gib": 60.0 + n / 100}


def test_summary_leaves_out_warm_up_and_tells_checkpoint_saves_apart():
    speed = [step(1, 40.0, 4096, 39.0), step(2, 15.0, 4096, 39.1), step(3, 2.0, 4000, 39.1),
             step(4, 2.5, 4096, 39.2), step(5, 3.0, 2048, 39.2), step(6, 9.0, 4096, 39.2)]
    summary = summarise(speed, warmup=2, save_steps=6)
    # tok/s over the timed steps, the save step included: (4000 + 4096 + 2048 + 4096) / (2 + 2.5 + 3 + 9)
    assert summary["tokens_per_s"] == round(14240 / 16.5, 1)
    # slowest and median among steps that do not save: 2.0, 2.5, 3.0
    assert (summary["median_step_s"], summary["slowest_step"], summary["slowest_over_median"]) == (2.5, 5, 1.2)
    assert summary["save_steps_s"] == {6: 9.0}
    assert summary["host_rss_gib"] == [39.0, 39.2] and summary["pinned_gib"] == [30.0, 30.0]
    assert summary["gpu_peak_gib"] == 60.06 and (summary["steps"], summary["timed_steps"]) == (6, 4)
    assert "error" in summarise(speed[:2], warmup=2)
