"""RMSNorm outputs recomputed in the backward instead of kept: saved-tensor hooks for the fast path's layers.

A Llama decoder layer's autograd graph holds each RMSNorm's input (for the norm's own backward) and its output
(for the projections that read it: q, k and v, gate and up, whose LoRA-A weight gradients need their input). The
output is one elementwise pass away from the input, so a layer need not hold both: at 70B shape and 4,096 tokens
the two outputs are 128 of the 862 MiB a layer that keeps its activations holds, and 128 MiB less for a host
layer's copies to carry.

`NormRecompute.watch` hooks the norms; while a layer runs its forward inside `with norm_recompute:`, each norm's
output is recorded with its input, and a recorded output that autograd saves is saved as a `RecomputedNorm` (the
norm and its input) instead. The backward's first unpack runs the norm again on the same input (the same kernel:
the same bits) and shares the result among the projections that saved it. `HostOffload` asks the same object
first, so a host layer carries the input but not the output.
"""

import contextlib

import torch


def storage_key(tensor: torch.Tensor) -> tuple:
    """The same tensor saved again has the same key (as long as the first one is alive)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype)


class RecomputedNorm:
    """A norm's output as autograd saved it: the norm and its input (or how `pack`'s `store` kept the input)."""
    __slots__ = ("input", "norm", "output", "unpacks_left", "version")

    def __init__(self, norm: torch.nn.Module, stored_input, version: int):
        self.norm, self.input, self.version = norm, stored_input, version
        self.output, self.unpacks_left = None, 0


class NormRecompute(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self):
        super().__init__(self.pack, self.unpack)
        # storage key -> (norm, input, output) in the layer running forward now, None outside one; the output is held
        # until the layer ends, so that no later tensor of the layer can take its address (and its key)
        self.outputs = None
        self.recipes = None  # storage key -> RecomputedNorm, so a norm output saved three times is one recipe

    def watch(self, layer: torch.nn.Module) -> int:
        """Record the outputs of the layer's RMSNorms (inside `with self:`); returns how many it has."""
        norms = [m for m in layer.modules() if type(m).__name__.endswith("RMSNorm")]
        for norm in norms:
            norm.register_forward_hook(self._record)
        return len(norms)

    def start(self) -> None:
        self.outputs, self.recipes = {}, {}

    def stop(self) -> None:
        self.outputs = self.recipes = None

    @contextlib.contextmanager
    def recording(self):
        """Record without installing the hooks: for a caller whose own saved-tensor hooks ask `pack` first."""
        self.start()
        try:
            yield
        finally:
            self.stop()

    def __enter__(self):
        self.start()
        return super().__enter__()

    def __exit__(self, *exc):
        self.stop()
        return super().__exit__(*exc)

    def _record(self, norm, args, output):
        if self.outputs is not None and torch.is_grad_enabled():
            self.outputs[storage_key(output)] = (norm, args[0], output)

    def pack(self, tensor: torch.Tensor, store=lambda t: t):
        """A recorded norm output as its `RecomputedNorm` (the input kept as `store` gives it), else the tensor."""
        if not self.outputs:
            return tensor
        key = storage_key(tensor)
        source = self.outputs.get(key)
        if source is None:
            return tensor
        recipe = self.recipes.get(key)
        if recipe is None:
            norm, norm_input, _ = source
            recipe = self.recipes[key] = RecomputedNorm(norm, store(norm_input), norm_input._version)
        recipe.unpacks_left += 1
        return recipe

    def unpack(self, saved, load=lambda t: t) -> torch.Tensor:
        if not isinstance(saved, RecomputedNorm):
            return saved
        if saved.output is None:
            if isinstance(saved.input, torch.Tensor) and saved.input._version != saved.version:
                raise RuntimeError(f"a {type(saved.norm).__name__}'s input was modified in place after the "
                                   "forward, so its output cannot be recomputed in the backward")
            with torch.no_grad():
                saved.output = saved.norm(load(saved.input))
        output = saved.output
        saved.unpacks_left -= 1
        if saved.unpacks_left <= 0:  # a backward with retain_graph=True recomputes again
            saved.output = None
        return output
