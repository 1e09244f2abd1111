"""Saved activations in pinned host memory: the saved-tensor hooks behind the fast path's host layers.

Run a decoder layer's forward inside `with hooks:` and every large tensor autograd saves for its backward is
copied to pinned host memory as it is saved, on a side stream, so the copy overlaps the rest of the forward; its
GPU memory is freed once the copy is done. The backward visits layers in reverse: when it needs one of a layer's
tensors it fetches the whole layer and starts fetching the layer before it, whose copy then overlaps this layer's
backward. For a checkpointed layer only its input is saved, so only that travels.

A tensor saved several times in one layer (the input of q, k and v) travels once. Pinned buffers are pooled and
reused every step: pinning memory runs at ~1 GB/s, so the pool is filled during the first step only.
"""

import weakref
from collections import defaultdict

import torch

OFFLOAD_MIN_BYTES = 2 ** 20  # smaller saved tensors (position ids, norms' statistics) stay where they are


class _Layer:
    """What one `with hooks:` block saved."""
    __slots__ = ("copies", "saved", "previous", "ready", "__weakref__")

    def __init__(self, previous):
        self.copies, self.saved, self.previous, self.ready = [], {}, previous, None


class _HostCopy:
    __slots__ = ("host", "pool_key", "device", "on_device", "layer", "unpacks_left")

    def __init__(self, host, pool_key, device, layer):
        self.host, self.pool_key, self.device, self.on_device = host, pool_key, device, None
        self.layer, self.unpacks_left = layer, 0


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self):
        super().__init__(self._pack, self._unpack)
        self.stream = None
        self.pool = defaultdict(list)  # (shape, stride, dtype) of the saved tensor -> free pinned buffers
        self.layer = None  # the block being run forward
        self.last = None  # the block run before it

    def __enter__(self):
        self.layer = _Layer(weakref.ref(self.last) if self.last is not None else None)
        self.last = self.layer
        return super().__enter__()

    def __exit__(self, *exc):
        self.layer.saved = {}  # the GPU tensors, held so far so that no new tensor reused their memory (see _pack)
        self.layer = None
        return super().__exit__(*exc)

    @property
    def pinned_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for free in self.pool.values() for b in free)

    def _pack(self, tensor):
        if self.layer is None or not tensor.is_cuda or tensor.numel() * tensor.element_size() < OFFLOAD_MIN_BYTES:
            return tensor
        # the same tensor saved again travels once; the tensor is held until the block ends, so no other tensor
        # of this block can take its address
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride(),
               tensor.dtype)
        copy = self.layer.saved.get(key, (None, None))[0]
        if copy is None:
            self.stream = self.stream or torch.cuda.Stream(tensor.device)
            # keyed by the saved tensor's layout, not the buffer's: empty_like keeps the strides of a dense tensor
            # (the backward gets the layout it saved) and makes others contiguous
            pool_key = (tensor.shape, tensor.stride(), tensor.dtype)
            free = self.pool[pool_key]
            host = free.pop() if free else torch.empty_like(tensor, device="cpu", pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # its memory is reused only after the copy
            copy = _HostCopy(host, pool_key, tensor.device, self.layer)
            self.layer.copies.append(copy)
            self.layer.saved[key] = (copy, tensor)
        copy.unpacks_left += 1
        return copy

    def _unpack(self, copy):
        if isinstance(copy, torch.Tensor):
            return copy
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
            self.pool[copy.pool_key].append(copy.host)
            copy.host = copy.on_device = None
        return tensor

    def _fetch(self, layer: _Layer):
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
