"""How many decoder layers keep their activations on the GPU, keep them in pinned host memory, or recompute: the
fast path's plan for a memory budget, from one layer's measured sizes (`fast_training.measure_layer`). Pure
arithmetic, tested on the CPU; `fast_training.apply_plan` puts a plan on the model."""

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..config.recipe import RecipeError
from ..gptq.memory import FAST_PATH_HEADROOM_BYTES, GIB


@dataclass(frozen=True)
class RecomputePlan:
    keep: int  # layers that keep their activations on the GPU: the top `keep` of those not on the host
    offload: int  # the first `offload` layers recompute from an input kept in host memory
    bytes: int  # planned peak of activation memory on the GPU
    host: int = 0  # layers, spread evenly over the model, whose activations wait in host memory

    def mode(self, index: int, n_layers: int) -> str:
        """Host layers are spread over all layers, the top one not among them (unless all are): the link carries a
        host layer's activations out while the layers after it run forward and back in while the layers above it
        run backward, and the top kept layer's backward frees room for the first host layer's. (Host layers all
        below the kept ones came back one per host layer's backward, each waiting on the link.) Kept layers are the
        top ones of the rest, so that the backward reaches a recomputing layer only once every kept layer has freed
        its activations."""
        if index < self.offload:
            return "offload"
        from_top = n_layers - 1 - index
        hosts_above = from_top * self.host // n_layers
        if (from_top + 1) * self.host // n_layers > hosts_above:
            return "host"
        return "keep" if from_top - hosts_above < self.keep else "recompute"


# Sharded runs keep at most this share of their layers on the host. On 2 x H200 under a 40 GiB cap, of 0, 15, 30, 40
# and 61 host layers out of 80 (the rest recomputed, but for ~17 kept) 30 trained fastest: ~5 % shorter steps than
# 15 or 40, 8 % than 0, 15 % than 61 (0 and 15 measured in another call than 30, whose steps varied 2 % over three),
# while on one GPU more host layers cost nothing (eval/BENCHMARKS.md, fourteenth, sixteenth and seventeenth
# sessions): a rank whose backward waits for a host layer's copy stalls the other at the next all-gather, and a
# recomputed layer costs its forward again.
SHARDED_HOST_SHARE = 3 / 8


def host_share_for(forward_s: float, link_bytes_per_s: float, saved_bytes: int, *, sharded: bool) -> float:
    """The share of layers that may keep their activations on the host: those whose `saved_bytes` the link
    moves while the GPU runs layers forward (`forward_s` each), at most all of them, and when `sharded` at most
    SHARDED_HOST_SHARE; none without a link (no host memory: 0 bytes/s)."""
    share = min(1.0, forward_s * link_bytes_per_s / saved_bytes)
    return min(share, SHARDED_HOST_SHARE) if sharded else share


class BudgetTooSmall(ValueError):
    def __init__(self, free_bytes_needed: float):
        super().__init__(f"one layer's recompute needs {free_bytes_needed / GIB:.1f} GiB beyond the model")
        self.free_bytes_needed = free_bytes_needed


def plan_for_budget(n_layers: int, input_bytes: int, saved_bytes: int, backward_bytes: int, *, budget_bytes: float,
                    static_bytes: float, seq_len: int, host_bytes: float = 0, host_share: float = 0,
                    pinned_for: Callable[[RecomputePlan], int] | None = None) -> RecomputePlan:
    """`plan_recompute` within a peak of `budget_bytes`, of which the model, adapters, gradients and optimizer
    state take `static_bytes`; a budget that fits no plan is an error naming the smallest one that does.
    `pinned_for(plan)`: the bytes pinning the plan's host buffers takes (`PinnedArena.pinned_for`: whole slabs, a
    little more than the host layers' activations); host layers are fewer until that fits `host_bytes`."""
    free_bytes = budget_bytes - static_bytes - FAST_PATH_HEADROOM_BYTES
    try:
        plan = plan_recompute(n_layers, input_bytes, saved_bytes, backward_bytes, free_bytes, host_bytes, host_share)
        while plan.host and pinned_for is not None and pinned_for(plan) > host_bytes:
            plan = plan_recompute(n_layers, input_bytes, saved_bytes, backward_bytes, free_bytes,
                                  (plan.host - 1) * saved_bytes, host_share)
        return plan
    except BudgetTooSmall as err:
        smallest = math.ceil((static_bytes + FAST_PATH_HEADROOM_BYTES + err.free_bytes_needed) / GIB * 10) / 10
        raise RecipeError(f"memory_budget_gib={budget_bytes / GIB:g} is too small for {seq_len} tokens per row: the "
                          f"model takes {static_bytes / GIB:.1f} GiB and {err}; the smallest budget that fits is "
                          f"{smallest:g} GiB (raise gpu.memory_budget_gib to it, or shorten train.max_length)"
                          ) from None


def host_memory_to_recompute_fewer(plan: RecomputePlan, n_layers: int, input_bytes: int, saved_bytes: int,
                                   backward_bytes: int, **limits) -> tuple[int, int] | None:
    """When pinned host memory, not the GPU's budget or the link, made `plan` recompute layers: (GiB of host
    memory with which fewer recompute, how many recompute then); else None. `limits`: plan_for_budget's keyword
    arguments other than host_bytes."""
    recompute = n_layers - plan.keep - plan.host
    # room for every layer's activations, and the arena's slack beyond them
    roomy = plan_for_budget(n_layers, input_bytes, saved_bytes, backward_bytes, host_bytes=2 * n_layers * saved_bytes,
                            **limits)
    fewer = n_layers - roomy.keep - roomy.host
    pinned_for = limits.get("pinned_for") or (lambda plan: plan.host * saved_bytes)
    return (math.ceil(pinned_for(roomy) / GIB), fewer) if fewer < recompute else None


def plan_recompute(n_layers: int, input_bytes: int, saved_bytes: int, backward_bytes: int, free_bytes: float,
                   host_bytes: float = 0, host_share: float = 0) -> RecomputePlan:
    """How many layers may skip recompute, keep their activations in host memory, or must hold their input on
    the host, within `free_bytes` of GPU memory.

    Per layer: `input_bytes` kept when it recomputes, `saved_bytes` when it does not, and `backward_bytes` of
    working memory while its backward runs. The backward visits the kept (top) layers first, so at any time
    at most one layer's recompute is live: the peak is at the end of the forward plus one backward. Of the layers
    that do not keep, up to `host_share` of all layers (`host_share_for`: the link moves one layer's activations in
    the forward time of 1 / host_share layers; host layers are spread over the whole model, `RecomputePlan.mode`)
    keep their activations in `host_bytes` of pinned memory instead of recomputing: such a layer holds nothing on
    the GPU (its input goes to the host with the rest), but the last one still in flight costs one layer of GPU
    memory. (Counting their inputs as well over-planned by one input per host layer: 2.3 GiB for 37 host layers at
    4,096 tokens, the gap between planned and allocated peaks in the runs of eval/BENCHMARKS.md.)"""
    extra = saved_bytes - input_bytes
    in_flight = saved_bytes if host_share > 0 and host_bytes >= saved_bytes else 0
    for keep in range(n_layers, -1, -1):  # fewer kept layers, more host ones: the peak only falls
        host = min(int(host_share * n_layers), n_layers - keep, int(host_bytes // saved_bytes)) if in_flight else 0
        peak = ((n_layers - host) * input_bytes + backward_bytes + max(keep * extra, saved_bytes)
                + (in_flight if host else 0))
        if peak <= free_bytes:
            return RecomputePlan(keep, 0, peak, host)
    # every layer recomputes; inputs of the first ones go to the host (two on the GPU at a time: the one in use
    # and the one being fetched)
    on_gpu = int((free_bytes - saved_bytes - backward_bytes - 2 * input_bytes) // input_bytes)
    if on_gpu < 0:
        raise BudgetTooSmall(saved_bytes + backward_bytes + 2 * input_bytes)
    offload = n_layers - min(on_gpu, n_layers)
    return RecomputePlan(0, offload, (n_layers - offload + 2) * input_bytes + saved_bytes + backward_bytes)
