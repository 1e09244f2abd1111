"""The fast path's memory plan (`recompute_plan`), pure arithmetic: which layers keep their activations, go to the
host or recompute for a budget, the host memory it names, and the one-line error for a budget too small."""

import itertools

import pytest

from finetune.config.recipe import RecipeError
from finetune.gptq.memory import FAST_PATH_HEADROOM_BYTES
from finetune.gpu.host_offload import PinnedArena
from finetune.gpu.recompute_plan import (
    SHARDED_HOST_SHARE,
    BudgetTooSmall,
    RecomputePlan,
    host_memory_to_recompute_fewer,
    host_share_for,
    plan_for_budget,
    plan_recompute,
)

MIB = 2 ** 20
GIB = 2 ** 30


def test_plan_keeps_as_many_layers_as_the_budget_allows():
    # 80 layers, 64 MiB input, 1100 MiB saved per layer, 1500 MiB backward working memory
    plan = plan_recompute(80, 64 * MIB, 1100 * MIB, 1500 * MIB, free_bytes=30 * 1024 * MIB)
    assert (plan.keep, plan.offload) == ((30 * 1024 - 1500 - 80 * 64) // (1100 - 64), 0)
    assert plan.bytes <= 30 * 1024 * MIB
    assert [plan.mode(i, 80) for i in (0, 79 - plan.keep, 80 - plan.keep, 79)] == \
        ["recompute", "recompute", "keep", "keep"]
    everything = plan_recompute(80, 64 * MIB, 1100 * MIB, 1500 * MIB, free_bytes=200 * 1024 * MIB)
    assert (everything.keep, everything.offload) == (80, 0)


def test_plan_keeps_activations_on_the_host_as_the_link_and_pinned_memory_allow():
    free = 30 * 1024 * MIB
    plan = plan_recompute(80, 64 * MIB, 800 * MIB, 1500 * MIB, free_bytes=free, host_bytes=64 * 1024 * MIB,
                          host_share=0.5)

    def host_of(keep):  # host layers spread over the model: the link carries half of all 80 layers
        return min(40, 80 - keep)

    def peak(keep):  # MiB: recomputing layers hold their input, host layers nothing but the one in flight
        return (80 - host_of(keep)) * 64 + 1500 + keep * (800 - 64) + 800

    assert plan.host == host_of(plan.keep) and peak(plan.keep) * MIB == plan.bytes <= free < peak(plan.keep + 1) * MIB
    assert (plan.keep, plan.host) == (35, 40)  # 33 and 23 when host layers came only from those not kept
    modes = [plan.mode(i, 80) for i in range(80)]
    assert modes.count("host") == plan.host and modes.count("keep") == plan.keep
    # spread over the whole model: between two host layers another computes while the link carries one, host layers
    # among the kept ones too, the top layer kept (its backward frees room for the first host layer's activations)
    assert all(not (a == b == "host") for a, b in itertools.pairwise(modes)) and modes[-1] == "keep"
    top = modes[modes.index("keep"):]  # from the lowest kept layer up: 40 host layers over 80, so 34 among these 69
    assert (len(top), top.count("host"), top.count("recompute")) == (69, 34, 0)
    # pinned memory for 10 layers only; none when it cannot hold one layer or the link carries nothing
    assert plan_recompute(80, 64 * MIB, 800 * MIB, 1500 * MIB, free, 8000 * MIB, 0.5).host == 10
    for host_bytes, share in ((700 * MIB, 0.5), (64 * 1024 * MIB, 0.0)):
        none = plan_recompute(80, 64 * MIB, 800 * MIB, 1500 * MIB, free, host_bytes, share)
        assert none.host == 0 and none.keep == (30 * 1024 - 1500 - 80 * 64) // (800 - 64)


def test_the_plan_names_the_host_memory_that_would_spare_its_recomputes():
    """70B at 4,096 tokens under a 40 GiB cap: 32 GiB of pinned memory holds 44 layers' activations and 19 layers
    recompute; the plan names 44 GiB, with which none do (43 would leave 2). Where the link or the GPU's budget
    limits the plan, or nothing recomputes, it names nothing."""
    sizes = (64 * MIB, 734 * MIB, 1500 * MIB)
    limits = {"budget_bytes": 40 * GIB, "static_bytes": 22 * GIB, "seq_len": 4096, "host_share": 1.0}

    def recompute(host_gib, **more):
        plan = plan_for_budget(80, *sizes, host_bytes=host_gib * GIB, **limits | more)
        return plan, 80 - plan.keep - plan.host

    plan, recomputed = recompute(32)
    assert (plan.keep, plan.host, recomputed) == (17, 44, 19)
    assert host_memory_to_recompute_fewer(plan, 80, *sizes, **limits) == (44, 0)
    assert recompute(44)[1] == 0 and recompute(43)[1] == 2
    link = recompute(32, host_share=0.25)[0]  # the link carries 20 layers' activations: more memory changes nothing
    assert link.host == 20 and host_memory_to_recompute_fewer(link, 80, *sizes, **limits | {"host_share": 0.25}) is None
    assert host_memory_to_recompute_fewer(recompute(44)[0], 80, *sizes, **limits) is None


def test_sharded_plans_keep_at_most_three_eighths_of_the_layers_on_the_host():
    """The two plans measured sharded on 2 x H200 under a 40 GiB cap (70B, 4,096 tokens: 20.9 GiB of model on each
    GPU, 64 MiB input, 734 MiB saved, ~2.1 GiB backward per layer), from the plan's arithmetic: the link share alone
    kept 61 layers on the host (keep 19, planned 39.3 GiB), measured slower than 30 (keep 17, 33 recomputed, planned
    39.9), which the sharded share gives with the same host memory and names no more memory to spare recomputes."""
    sizes = (64 * MIB, 734 * MIB, 2100 * MIB)
    limits = {"budget_bytes": 40 * GIB, "static_bytes": 20.9 * GIB, "seq_len": 4096}
    fast_link = {"forward_s": 0.02, "link_bytes_per_s": 55e9, "saved_bytes": 734 * MIB}
    assert host_share_for(**fast_link, sharded=False) == 1.0
    assert host_share_for(**fast_link, sharded=True) == SHARDED_HOST_SHARE == 3 / 8
    assert host_share_for(**fast_link | {"forward_s": 0.002}, sharded=True) == pytest.approx(0.002 * 55e9 / (734 * MIB))
    assert host_share_for(**fast_link | {"link_bytes_per_s": 0.0}, sharded=True) == 0.0  # no host memory

    def planned(share):
        plan = plan_for_budget(80, *sizes, host_bytes=52 * GIB, host_share=share, **limits)
        peak = round((limits["static_bytes"] + FAST_PATH_HEADROOM_BYTES + plan.bytes) / GIB, 1)
        return (plan.keep, plan.host, 80 - plan.keep - plan.host, peak), plan

    assert planned(1.0)[0] == (19, 61, 0, 39.3)
    sharded, plan = planned(SHARDED_HOST_SHARE)
    assert sharded == (17, 30, 33, 39.9)
    assert host_memory_to_recompute_fewer(plan, 80, *sizes, host_share=SHARDED_HOST_SHARE, **limits) is None
    modes = [plan.mode(i, 80) for i in range(80)]
    assert all(not (a == b == "host") for a, b in itertools.pairwise(modes))  # each copy beside another's backward


def test_what_the_plan_pins_stays_within_its_host_memory():
    """The arena pins whole 4 GiB slabs, a little more than the host layers' activations (the H200 runs pinned 52 GiB
    for 43.7 GiB of them): the plan keeps fewer host layers until what it pins fits the host memory it was given, and
    the host memory it names to spare recomputes is what pinning that plan takes."""
    sizes = (64 * MIB, 734 * MIB, 1500 * MIB)
    per_layer = [224 * MIB, 224 * MIB, 112 * MIB, 64 * MIB, 64 * MIB, 46 * MIB]  # 734 MiB saved, as buffers
    arena = PinnedArena(pin=False)  # 4 GiB slabs; pinned_for allocates nothing

    def pinned_for(plan):
        return arena.pinned_for(per_layer * plan.host)

    limits = {"budget_bytes": 40 * GIB, "static_bytes": 22 * GIB, "seq_len": 4096, "host_share": 1.0}
    unbounded = plan_for_budget(80, *sizes, host_bytes=32 * GIB, **limits)
    assert unbounded.host == 44 and pinned_for(unbounded) == 36 * GIB  # 31.5 GiB of activations: 9 slabs
    plan = plan_for_budget(80, *sizes, host_bytes=32 * GIB, pinned_for=pinned_for, **limits)
    assert pinned_for(plan) <= 32 * GIB < pinned_for(RecomputePlan(plan.keep, 0, 0, plan.host + 1))
    assert plan.host == 43 and arena.pinned_bytes == 0
    gib, recomputed = host_memory_to_recompute_fewer(plan, 80, *sizes, pinned_for=pinned_for, **limits)
    roomy = plan_for_budget(80, *sizes, host_bytes=gib * GIB, pinned_for=pinned_for, **limits)
    assert (gib, recomputed) == (48, 0) and 80 - roomy.keep - roomy.host == 0 and pinned_for(roomy) <= gib * GIB


def test_plan_moves_inputs_to_the_host_only_as_needed():
    # 32k tokens: 512 MiB input and ~8.6 GiB saved per layer; 45 GiB free
    plan = plan_recompute(80, 512 * MIB, 8800 * MIB, 4000 * MIB, free_bytes=45 * 1024 * MIB)
    on_gpu = (45 * 1024 - 8800 - 4000 - 2 * 512) // 512
    assert (plan.keep, plan.offload) == (0, 80 - on_gpu)
    assert [plan.mode(i, 80) for i in (0, plan.offload - 1, plan.offload)] == ["offload", "offload", "recompute"]
    with pytest.raises(BudgetTooSmall, match="recompute needs 13.5 GiB beyond the model"):
        plan_recompute(80, 512 * MIB, 8800 * MIB, 4000 * MIB, free_bytes=10 * 1024 * MIB)


def test_budget_too_small_names_the_smallest_budget_that_fits():
    # 70B shape at 4,096 tokens: 64 MiB layer input, 862 MiB saved, 1.5 GiB backward; model, adapters and AdamW 37.5 GiB
    sizes = {"input_bytes": 64 * MIB, "saved_bytes": 862 * MIB, "backward_bytes": 1536 * MIB}
    with pytest.raises(RecipeError) as error:  # train.py prints it as one line
        plan_for_budget(80, **sizes, budget_bytes=40 * 1024 * MIB, static_bytes=37.5 * 1024 * MIB, seq_len=4096)
    # 37.5 + 2 (margin) + (862 + 1536 + 2 x 64) / 1024 = 41.97 GiB
    assert str(error.value) == ("memory_budget_gib=40 is too small for 4096 tokens per row: the model takes 37.5 GiB "
                                "and one layer's recompute needs 2.5 GiB beyond the model; the smallest budget that "
                                "fits is 42 GiB (raise gpu.memory_budget_gib to it, or shorten train.max_length)")
    plan = plan_for_budget(80, **sizes, budget_bytes=42 * 1024 * MIB, static_bytes=37.5 * 1024 * MIB, seq_len=4096)
    assert (plan.keep, plan.offload) == (0, 80)  # fits: every layer recomputes, its input waits on the host
    # a 48 GB card's budget with a smaller model (a 3-bit branch, ~29 GiB with adapters and AdamW): fits
    fits = plan_for_budget(80, **sizes, budget_bytes=40 * 1024 * MIB, static_bytes=29 * 1024 * MIB, seq_len=4096)
    assert fits.bytes <= (40 - 29 - 2) * 1024 * MIB
