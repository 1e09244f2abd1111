"""Saved activations in pinned host memory: the saved-tensor hooks behind the fast path's host layers.

Run a decoder layer's forward inside `with hooks:` and every large tensor autograd saves for its backward is
copied to pinned host memory as it is saved, on a side stream, so the copy overlaps the rest of the forward; its
GPU memory is freed at the end of the next host layer, ordered after the copy on the GPU. The backward visits
layers in reverse: when it needs one of a layer's tensors it fetches the whole layer and starts fetching the layer
before it, whose copy then overlaps this layer's backward; the last layer run forward starts coming back as the
backward begins (`fetch_last_layer`). For a checkpointed layer only its input is saved, so only that travels.

A tensor saved several times in one layer (the input of q, k and v), or as several dense shapes of the same bytes,
travels once; an RMSNorm output does not travel at all when `norms` (a `NormRecompute`) is given: its input travels
and the backward recomputes it. Pinned memory comes from a `PinnedArena`: slabs allocated once (pinned from
several threads at ~6 GB/s, `pin_from_threads`) and carved anew every step, whatever the shapes, so packed rows of
any length reuse the same bytes: sized up front for the longest row (`reserve`), it never grows.
"""

import os
import weakref
from pathlib import Path, PurePosixPath

import torch
from tqdm.auto import tqdm

from .norm_recompute import NormRecompute, RecomputedNorm, storage_key

OFFLOAD_MIN_BYTES = 2 ** 20  # smaller saved tensors (position ids, norms' statistics) stay where they are


def default_host_memory() -> float:
    """Bytes of pinned host memory a training process may plan with when the recipe names none: half of what the
    machine lets this process use (`memory_limit`), no more than is available now (`available_memory`), shared among
    the training processes on the machine (accelerate sets LOCAL_WORLD_SIZE). Only what the plan's host layers take
    is pinned; the process needs a few GiB besides. (Half rather than a quarter: a recomputed layer costs its forward
    again where the GPU bounds the step; at 70B shape, 16,384 tokens, an 80 GB card's plan on a 128 GiB machine kept
    10 layers on the host with a quarter, 21 with half: eval/BENCHMARKS.md.)"""
    return min(memory_limit() / 2, available_memory()) / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def memory_limit(cgroups: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int:
    """The machine's memory, or less where this process's cgroup caps it (a container's limit, a job scheduler's
    allocation: the machine's figure would pin past it and the kernel would kill the run). cgroup v2
    (`memory.max`) and v1 (`memory.limit_in_bytes`), the cgroup and every one above it."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        lines = Path(cgroups).read_text().splitlines()
    except OSError:  # not Linux
        return limit
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # the v2 hierarchy
            folder, name = Path(root), "memory.max"
        elif "memory" in controllers.split(","):
            folder, name = Path(root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        parts = PurePosixPath(path).parts[1:]
        for depth in range(len(parts) + 1):
            try:
                value = (folder.joinpath(*parts[:depth]) / name).read_text().strip()
            except OSError:  # not this controller's hierarchy, or a cgroup above the namespace's root
                continue
            if value.isdigit():  # v2 writes "max" when unlimited
                limit = min(limit, int(value))
    return limit


def available_memory(meminfo: str = "/proc/meminfo") -> float:
    """Bytes the kernel says it can give without swapping (MemAvailable: free memory and the page cache it can
    drop); infinite where it does not say."""
    try:
        fields = dict(line.split(":", 1) for line in Path(meminfo).read_text().splitlines())
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return float("inf")


class _Layer:
    """What one `with hooks:` block saved."""
    __slots__ = ("__weakref__", "copied", "copies", "previous", "ready", "saved")

    def __init__(self, previous):
        self.copies, self.saved, self.previous, self.ready = [], {}, previous, None
        self.copied = None  # an event on the copy stream after the block's copies out


class PinnedArena:
    """Host buffers for one step's saved tensors, carved one after another from equal slabs of pinned memory.

    The backward returns every buffer of a step before the next step takes any, so once none is out the next
    `take` starts again at the first slab: the slabs are reused for shapes of any size. A step that needs more than
    the slabs hold adds one, which later steps reuse; filling slabs in order (next fit) never needs more slabs for
    smaller tensors, so once the longest row has run (or `reserve` sized the arena for it), nothing is added.
    Slabs are a power of two in size, as torch's pinned-memory allocator rounds them. `pin=False` gives ordinary
    memory: the CPU reference (pinning needs CUDA)."""

    ALIGN = 512  # bytes; every buffer aligned for any dtype and for DMA
    # slab_bytes: a 4 GiB slab wastes at most one buffer at its end (<= 224 MiB at 70B shape, 4,096 tokens)

    def __init__(self, pin: bool = True, slab_bytes: int = 4 * 2 ** 30):
        self.pin, self.slab_bytes = pin, slab_bytes
        self.sizes: list[int] = []  # bytes of each slab: placed buffers decide them, `_allocate` makes them
        self.slabs: list[torch.Tensor] = []
        self.slab, self.offset, self.out = 0, 0, 0  # where the next buffer goes; buffers not yet given back

    @property
    def pinned_bytes(self) -> int:
        return sum(slab.numel() for slab in self.slabs)

    def reserve(self, step: list[int]) -> None:
        """Add the slabs that a step taking buffers of these sizes (bytes, in order) needs, now rather than during
        the first step: the fast path passes what its plan saves at the longest row. Pinning tens of GiB takes
        seconds: a progress bar (bytes pinned, on each machine's first process only) shows it."""
        self._fit(step, self.sizes)
        self._allocate(progress=True)

    def pinned_for(self, step: list[int]) -> int:
        """Bytes this arena pins once `reserve(step)` has run: whole slabs, a little more than the buffers (the
        fast path's plan keeps this within its host memory). Nothing is allocated."""
        sizes = list(self.sizes)
        self._fit(step, sizes)
        return sum(sizes)

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised host tensor of `like`'s shape and dtype, with its strides where `like` is dense (as
        empty_like chooses: the backward gets the layout it saved)."""
        if self.out == 0:
            self.slab, self.offset = 0, 0
        layout = torch.empty_like(like, device="meta")
        span = (1 + sum((size - 1) * stride for size, stride in zip(layout.shape, layout.stride()))
                if like.numel() else 0)
        nbytes = self._aligned(span * like.element_size())
        self.slab, start = self._place(nbytes, self.slab, self.offset, self.sizes)
        if self.slab == len(self.slabs):
            self._allocate()
        self.offset = start + nbytes
        self.out += 1
        raw = self.slabs[self.slab][start:start + nbytes]
        return raw.view(like.dtype)[:span].as_strided(layout.shape, layout.stride())

    def _aligned(self, nbytes: int) -> int:
        return -(-nbytes // self.ALIGN) * self.ALIGN

    def _fit(self, step: list[int], sizes: list[int]) -> None:
        """Add to the slab sizes `sizes` the slabs a step taking buffers of these sizes needs, placed in order."""
        slab, offset = 0, 0
        for nbytes in map(self._aligned, step):
            slab, offset = self._place(nbytes, slab, offset, sizes)
            offset += nbytes

    def _place(self, nbytes: int, slab: int, offset: int, sizes: list[int]) -> tuple[int, int]:
        """(slab, offset) where `nbytes` go when the last buffer ended at (slab, offset) of slabs of `sizes`: there,
        else at the start of the next slab that holds them, adding one at the end if none does."""
        while slab < len(sizes) and offset + nbytes > sizes[slab]:
            slab, offset = slab + 1, 0
        if slab == len(sizes):
            sizes.append(max(self.slab_bytes, 1 << max(nbytes - 1, 0).bit_length()))
        return slab, offset

    def _allocate(self, progress: bool = False) -> None:
        """Make the slabs `_place` added: all of them are known first, so the bar's total is what gets pinned."""
        added = self.sizes[len(self.slabs):]
        if not added:
            return
        if self.pin and not self.slabs:
            pin_from_threads()
        with tqdm(total=sum(added), unit="B", unit_scale=True, unit_divisor=1024,
                  desc="pinning host memory for host layers",
                  disable=not progress or os.environ.get("LOCAL_RANK", "0") != "0") as bar:
            for size in added:
                self.slabs.append(torch.empty(size, dtype=torch.uint8, pin_memory=self.pin))
                bar.update(size)

    def give_back(self) -> None:
        """A buffer from `take` is no longer needed (the copy out of it is queued on the stream that fills it)."""
        self.out -= 1


PINNING_THREADS = 8


def pin_from_threads() -> None:
    """torch pins host memory with cudaHostAlloc, which faults and locks the pages on one thread (~1 GB/s: tens of
    seconds for the fast path's slabs). Its allocator can instead fault them on several threads and register them
    with CUDA after (`pinned_use_cuda_host_register`): 4.3x as fast on an H200 machine (12 GiB in 1.7 s against 7.4 s;
    in train.py 52 GiB in 8 s against 36 GiB in 23 s), copies to and from the GPU as fast (51 GiB/s), and the GPU
    allocator's own options (expandable segments) unchanged: eval/BENCHMARKS.md. Left to the user where
    PYTORCH_ALLOC_CONF (or the older PYTORCH_CUDA_ALLOC_CONF) sets pinned-memory options itself."""
    configured = os.environ.get("PYTORCH_ALLOC_CONF", "") + os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "pinned_" not in configured:  # older torch has only the setter that newer torch deprecates
        set_allocator = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        (set_allocator or torch.cuda.memory._set_allocator_settings)(
            f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{PINNING_THREADS}")


def copy_key(tensor: torch.Tensor) -> tuple:
    """Saved tensors with the same key travel as one copy: the same bytes of a storage as any dense shape (liger's
    RMSNorm saves its input as [tokens, hidden]; `NormRecompute` holds it as [1, tokens, hidden]), else one layout."""
    if tensor.is_contiguous():
        return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel(), tensor.dtype
    return storage_key(tensor)


class _Reshaped:
    """A copy saved again as another dense shape of its bytes."""
    __slots__ = ("copy", "shape")

    def __init__(self, copy, shape):
        self.copy, self.shape = copy, shape


class _HostCopy:
    __slots__ = ("arena", "device", "host", "layer", "on_device", "unpacks_left")

    def __init__(self, host, arena, device, layer):
        self.host, self.arena, self.device, self.on_device = host, arena, device, None
        self.layer, self.unpacks_left = layer, 0

    def release(self):
        if self.host is not None:
            self.arena.give_back()
            self.host = self.on_device = None

    def __del__(self):  # a graph freed without its backward (an exception, no backward) returns its buffers too
        self.release()


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, norms: NormRecompute | None = None):
        super().__init__(self._pack, self._unpack)
        self.norms = norms
        self.stream = None
        self.arena = PinnedArena()
        self.layer = None  # the block being run forward
        self.last = None  # the block run before it
        self.held = None  # the last block whose GPU tensors wait for their copies out (`_free_copied`)

    def __enter__(self):
        self.layer = _Layer(weakref.ref(self.last) if self.last is not None else None)
        self.last = self.layer
        if self.norms is not None:
            self.norms.start()
        return super().__enter__()

    def __exit__(self, *exc):
        layer, self.layer = self.layer, None
        if layer.copies:
            layer.copied = self.stream.record_event()
            self._free_copied(self.held)
            self.held = layer  # a block without copies saved no GPU tensor either (`_pack` records them together)
        if self.norms is not None:
            self.norms.stop()
        return super().__exit__(*exc)

    @property
    def pinned_bytes(self) -> int:
        return self.arena.pinned_bytes

    def _pack(self, tensor):
        if self.layer is None or not tensor.is_cuda or tensor.numel() * tensor.element_size() < OFFLOAD_MIN_BYTES:
            return tensor
        if self.norms is not None:
            recipe = self.norms.pack(tensor, store=self._pack)  # its input travels (once: the norm saved it too)
            if recipe is not tensor:
                return recipe
        # the same tensor saved again travels once; the tensor is held until the block ends, so no other tensor
        # of this block can take its address
        key = copy_key(tensor)
        copy = self.layer.saved.get(key, (None, None))[0]
        if copy is None:
            self.stream = self.stream or torch.cuda.Stream(tensor.device)
            host = self.arena.take(tensor)
            self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
            copy = _HostCopy(host, self.arena, tensor.device, self.layer)
            self.layer.copies.append(copy)
            self.layer.saved[key] = (copy, tensor)
        copy.unpacks_left += 1
        return copy if copy.host.shape == tensor.shape else _Reshaped(copy, tensor.shape)

    def _unpack(self, copy):
        if isinstance(copy, torch.Tensor):
            return copy
        if isinstance(copy, RecomputedNorm):
            return self.norms.unpack(copy, load=self._unpack)
        if isinstance(copy, _Reshaped):
            return self._unpack(copy.copy).view(copy.shape)
        if copy.host is None:
            raise RuntimeError("an offloaded activation was unpacked twice; backward with retain_graph=True is not "
                               "supported with host offload (raise memory_budget_gib, or host_memory_gib=0)")
        self._fetch(copy.layer)
        torch.cuda.current_stream(copy.device).wait_event(copy.layer.ready)
        previous = copy.layer.previous() if copy.layer.previous is not None else None
        if previous is not None:
            self._fetch(previous)  # the block before runs its backward next
        tensor = copy.on_device
        copy.unpacks_left -= 1
        if copy.unpacks_left == 0:  # the buffer's next copy-in is queued behind this copy-out, same stream
            copy.release()
        return tensor

    def fetch_last_layer(self) -> None:
        """Start bringing back what the block run forward last saved: for `apply_plan`'s hook as the backward
        begins. Otherwise the top host layer's copy starts only when its own backward needs it, which then waits
        for all of it (the longest gap in a 70B train.py step on an H200: 14.9 ms) while the kept layers above it
        could have hidden it; the memory is the one layer in flight the plan counts."""
        if self.last is not None:
            self._fetch(self.last)

    def _free_copied(self, layer: _Layer | None) -> None:
        """Free the GPU tensors `layer` has copied to the host, ordered after those copies on the GPU: the compute
        stream waits for them, the CPU does not. The allocator can then give the memory to the next tensor at once,
        and however far the CPU runs ahead, one host layer's memory is in flight besides the one running forward,
        as the plan counts. (`record_stream` frees it only once the allocator, on the CPU's timeline, finds the
        copies done: with the CPU layers ahead, several host layers' memory pending, and under a memory cap the
        allocator freeing its whole cache and retrying once a step. A CPU wait for the copies instead cost 5 % of
        the step: eval/BENCHMARKS.md, twenty-first session.) Called at the end of the next host layer, whose forward
        the copies overlap, and as the backward's first fetch begins."""
        if layer is not None:
            torch.cuda.current_stream(layer.copies[0].device).wait_event(layer.copied)
            layer.saved = {}

    def _fetch(self, layer: _Layer):
        self._free_copied(self.held)  # the backward has begun: every forward copy is queued
        self.held = None
        if layer.ready is not None:
            return
        pending = [c for c in layer.copies if c.host is not None]  # not yet unpacked for good
        if not pending:
            return
        device = pending[0].device
        for copy in pending:  # allocated on the compute stream, which uses and frees them
            copy.on_device = torch.empty_like(copy.host, device=device)
        self.stream.wait_stream(torch.cuda.current_stream(device))  # their memory's earlier users are done
        with torch.cuda.stream(self.stream):
            for copy in pending:
                copy.on_device.copy_(copy.host, non_blocking=True)
        layer.ready = self.stream.record_event()
