"""Host layers (`host_offload`): the pinned arena sized once and reused for rows of any length, the host memory
default within the machine's or the cgroup's limit, and on a GPU the gradients of kept layers and the fetch that
starts as the backward begins."""

import os

import pytest
import torch

from finetune.gpu import fast_training
from finetune.gpu.fast_training import apply_plan, decoder_layers
from finetune.gpu.host_offload import (
    PinnedArena,
    available_memory,
    copy_key,
    default_host_memory,
    memory_limit,
    pin_from_threads,
)
from finetune.gpu.recompute_plan import RecomputePlan
from tests.gpu.tiny_lora import TINY, lora_model, loss_and_grads, needs_cuda


def saved_like(tokens: int, hidden: int = 64) -> list[torch.Tensor]:
    """What one layer saves at `tokens` tokens: dense, transposed (dense, other strides), and a strided view."""
    wide = torch.empty(1, tokens, 3 * hidden, dtype=torch.bfloat16)
    return [torch.empty(1, tokens, hidden), torch.empty(1, 4, tokens, hidden // 4).transpose(1, 2),
            wide, wide[..., ::3], torch.empty(tokens, dtype=torch.int64)]


def test_dense_shapes_of_the_same_bytes_travel_to_the_host_as_one_copy():
    hidden = torch.randn(1, 16, 8)
    assert copy_key(hidden.view(16, 8)) == copy_key(hidden) != copy_key(hidden[:, 8:])
    assert copy_key(hidden.transpose(1, 2)) != copy_key(hidden)  # not dense: its own layout


def test_this_torch_takes_the_threaded_pinning_setting():
    """The allocator setting the GPU path makes before pinning its slabs is one this torch parses (an unknown key or
    a missing setter raises); CPU builds parse it too."""
    pin_from_threads()
    with pytest.raises((ValueError, RuntimeError), match="no_such_setting"):  # the setter checks what it gets
        (getattr(torch._C, "_accelerator_setAllocatorSettings", None)
         or torch.cuda.memory._set_allocator_settings)("pinned_no_such_setting:True")


def test_host_memory_default_stays_within_the_cgroup_limit(tmp_path, monkeypatch):
    """A job scheduler's or a container's memory limit (cgroup v2 or v1, on the process's cgroup or one above it)
    bounds the pinned host memory the plan may use: the machine's figure would pin past it. Half of it, at most what
    the kernel says is available, shared by the machine's training processes."""
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    v2 = tmp_path / "v2"
    (v2 / "slurm" / "job_7" / "step_0").mkdir(parents=True)
    (v2 / "slurm" / "job_7" / "memory.max").write_text(f"{8 * 2 ** 30}\n")  # the job's allocation
    (v2 / "slurm" / "job_7" / "step_0" / "memory.max").write_text("max\n")
    (tmp_path / "cgroup_v2").write_text("0::/slurm/job_7/step_0\n")
    assert memory_limit(str(tmp_path / "cgroup_v2"), str(v2)) == min(machine, 8 * 2 ** 30)

    v1 = tmp_path / "v1" / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{3 * 2 ** 30}\n")
    (v1.parent / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    (tmp_path / "cgroup_v1").write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert memory_limit(str(tmp_path / "cgroup_v1"), str(tmp_path / "v1")) == min(machine, 3 * 2 ** 30)
    (tmp_path / "cgroup_none").write_text("0::/user.slice\n")  # no memory.max on the way up: the machine's
    assert memory_limit(str(tmp_path / "cgroup_none"), str(tmp_path / "v1")) == machine

    (tmp_path / "meminfo").write_text("MemTotal:       24684096 kB\nMemAvailable:   20000000 kB\n")
    assert available_memory(str(tmp_path / "meminfo")) == 20000000 * 1024
    one = default_host_memory()
    assert 0 < one <= min(memory_limit() / 2, available_memory() * 1.05)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_host_memory() == pytest.approx(one / 4, rel=0.05)


def test_pinned_arena_is_reused_for_rows_of_any_length(capsys):
    """The host layers' buffers come from one arena: sized once for the longest row (a progress bar while it
    pins, whose total is what it pins), no row adds to it; each buffer has the saved tensor's layout where that is
    dense, and no two buffers of a step overlap."""
    longest, layers = 512, 6
    arena = PinnedArena(pin=False, slab_bytes=2 ** 20)
    foreseen = arena.pinned_for([t.numel() * t.element_size() for t in saved_like(longest)] * layers)
    assert arena.pinned_bytes == 0
    arena.reserve([t.numel() * t.element_size() for t in saved_like(longest)] * layers)
    reserved = arena.pinned_bytes
    assert reserved == foreseen  # what the plan counts is what gets pinned
    bar = capsys.readouterr().err.split("\r")[-1]
    assert bar.startswith("pinning host memory for host layers: 100%") and f"{reserved // 2 ** 20}.00M/" in bar, bar
    arena.reserve([t.numel() * t.element_size() for t in saved_like(longest)] * layers)  # sized already: no bar
    assert arena.pinned_bytes == reserved and capsys.readouterr().err == ""
    assert reserved >= layers * sum(t.numel() * t.element_size() for t in saved_like(longest))
    for step, tokens in enumerate((300, 512, 17, 480, 512, 129, 4)):
        taken = []
        for layer in range(layers):
            for i, like in enumerate(saved_like(tokens)):
                host = arena.take(like)
                assert host.shape == like.shape and host.dtype == like.dtype
                if like.is_contiguous() or i == 1:  # dense: its own strides
                    assert host.stride() == like.stride()
                host.fill_(step * 100 + layer * 10 + i)
                taken.append((host, step * 100 + layer * 10 + i))
        assert all(bool((host == value).all()) for host, value in taken)  # nothing written over another
        for _ in taken:
            arena.give_back()
        assert arena.pinned_bytes == reserved, f"step {step} ({tokens} tokens) grew the arena"

    # without reserve: it grows until the longest row has run, and never after
    arena = PinnedArena(pin=False, slab_bytes=2 ** 20)
    sizes = []
    for tokens in (100, 512, 300, 512, 1, 511):
        for like in saved_like(tokens) * layers:
            arena.take(like)
        for _ in saved_like(tokens) * layers:
            arena.give_back()
        sizes.append(arena.pinned_bytes)
    assert sizes[0] < sizes[1] and sizes[1:] == [sizes[1]] * 5


@needs_cuda
def test_host_layers_give_the_gradients_of_kept_layers(checkpoint, monkeypatch):
    from finetune.gpu import host_offload
    monkeypatch.setattr(host_offload, "OFFLOAD_MIN_BYTES", 0)  # this tiny model's tensors all travel too
    tokens = torch.randint(0, TINY.vocab_size, (1, 512), generator=torch.Generator().manual_seed(2)).cuda()
    model = lora_model(checkpoint, device="cuda")
    fast_training.enable_fast_training(model, seq_len=512, host_memory_gib=0)
    base = model.get_base_model()
    # the fast path's NormRecompute (its hooks on the norms), here with hooks of the test's own
    layers, norms = decoder_layers(base), base._host_offload.norms
    hooks, hooks_keeping_norms = host_offload.HostOffload(norms), host_offload.HostOffload()
    for pool in (hooks, hooks_keeping_norms):  # slabs of about one of this tiny model's tensors: bytes as carried
        pool.arena = PinnedArena(slab_bytes=2 ** 16)
    grads = {}
    for plan, norm_recompute in ((RecomputePlan(keep=3, offload=0, bytes=0), None),
                                 (RecomputePlan(keep=0, offload=0, bytes=0, host=3), None),
                                 (RecomputePlan(keep=3, offload=0, bytes=0), norms),
                                 (RecomputePlan(keep=0, offload=0, bytes=0, host=3), norms),
                                 (RecomputePlan(keep=1, offload=0, bytes=0, host=1), norms)):
        apply_plan(layers, plan, hooks if norm_recompute else hooks_keeping_norms, norm_recompute)
        grads[plan, norm_recompute] = loss_and_grads(model, tokens)[1]
    assert [plan.mode(i, 3) for i in range(3)] == ["host", "recompute", "keep"]
    first, *others = grads.values()
    for other in others:
        differing = [name for name in first if not torch.equal(first[name], other[name])]
        assert not differing, [(n, (first[n] - other[n]).abs().max().item()) for n in differing[:3]]
    # the host layers' buffers, back in the pool; with norm outputs recomputed (and the norm input that liger saves
    # as [tokens, hidden] travelling once), fewer of them
    assert 0 < hooks.pinned_bytes < hooks_keeping_norms.pinned_bytes


def test_host_layers_add_one_turn_hook_to_the_top_layer(checkpoint):
    """apply_plan hooks the top layer's output (to start fetching the last host layer as the backward begins) once
    however often it re-plans, and not when no layer goes to the host."""
    from finetune.gpu.host_offload import HostOffload
    layers = decoder_layers(lora_model(checkpoint).get_base_model())
    hooks = HostOffload()
    counts = []
    for plan in (RecomputePlan(keep=1, offload=0, bytes=0, host=1), RecomputePlan(keep=1, offload=0, bytes=0, host=2),
                 RecomputePlan(keep=3, offload=0, bytes=0), RecomputePlan(keep=0, offload=1, bytes=0, host=1)):
        apply_plan(layers, plan, hooks)
        counts.append([len(layer._forward_hooks) for layer in layers])
    assert counts == [[0, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 1]]


@needs_cuda
def test_the_last_host_layer_comes_back_as_the_backward_begins(checkpoint, monkeypatch):
    """With a kept layer above the host layer, the host layer's copies are fetched from the turn of the backward,
    before its own backward unpacks them (not by that first unpack, which would wait for all of them)."""
    from finetune.gpu import host_offload
    monkeypatch.setattr(host_offload, "OFFLOAD_MIN_BYTES", 0)

    class Logged(host_offload.HostOffload):
        def _unpack(self, copy):
            events.append("unpack")
            return super()._unpack(copy)

        def _fetch(self, layer):
            events.append("fetch" if layer.ready is None and layer.copies else "fetched")
            return super()._fetch(layer)

    events = []
    train_step_on_gpu(checkpoint, RecomputePlan(keep=1, offload=0, bytes=0, host=1), Logged(),
                      modes=["host", "recompute", "keep"])
    assert events[0] == "fetch" and events.index("unpack") > 0, events[:4]


@needs_cuda
def test_a_host_layer_frees_its_gpu_memory_after_its_copies_without_the_cpu_waiting(checkpoint, monkeypatch):
    """A host layer's GPU tensors are freed at the next host layer's end (and as the backward begins, for the last
    one), ordered after their copies to the host on the GPU, not by the CPU waiting. The copy stream runs late here
    (~10 ms asleep after each copy) while the compute stream gets the freed memory for the layers after at once: the
    gradients still equal those of the step with every layer kept, and only the latest host layer holds GPU tensors
    once the next one has ended (the one in flight the plan counts)."""
    from finetune.gpu import host_offload
    monkeypatch.setattr(host_offload, "OFFLOAD_MIN_BYTES", 0)

    class Late(host_offload.HostOffload):
        def _pack(self, tensor):
            packed = super()._pack(tensor)
            if self.stream is not None:
                with torch.cuda.stream(self.stream):
                    torch.cuda._sleep(20_000_000)  # clock cycles
            return packed

        def __exit__(self, *exc):
            ended.append(self.layer)
            exited = super().__exit__(*exc)
            holding.append([bool(layer.saved) for layer in ended])
            return exited

    ended, holding = [], []
    _, kept = train_step_on_gpu(checkpoint, RecomputePlan(keep=3, offload=0, bytes=0), None,
                                modes=["keep", "keep", "keep"])
    _, hosted = train_step_on_gpu(checkpoint, RecomputePlan(keep=1, offload=0, bytes=0, host=2), Late(),
                                  modes=["host", "host", "keep"])
    assert holding == [[True], [False, True]]
    for name in kept:
        torch.testing.assert_close(hosted[name], kept[name], msg=name)


def train_step_on_gpu(checkpoint, plan: RecomputePlan, hooks, modes: list[str]) -> tuple[float, dict]:
    """One forward and backward of the tiny LoRA model on the GPU, its three layers set by `plan` (in `modes`: the
    test's reading of the plan, checked) with `hooks` for the host layers: the loss and LoRA gradients."""
    tokens = torch.randint(0, TINY.vocab_size, (1, 512), generator=torch.Generator().manual_seed(2)).cuda()
    model = lora_model(checkpoint, device="cuda")
    fast_training.enable_fast_training(model, seq_len=512, host_memory_gib=0)
    assert [plan.mode(i, 3) for i in range(3)] == modes
    apply_plan(decoder_layers(model.get_base_model()), plan, hooks)
    return loss_and_grads(model, tokens)
