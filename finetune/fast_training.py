"""The fast GPU training path for a PEFT-LoRA model over GPTQ layers: `enable_fast_training(model, seq_len=...)`.

What it does, each kept because it measured faster (eval/BENCHMARKS.md):
- liger-kernel's fused RMSNorm, SwiGLU, RoPE and linear-cross-entropy (no [tokens, vocab] logits in memory);
- LoRA without wasted work: no dropout op, adapter math in the activation dtype (bf16, fp32 master weights, as
  autocast would), the adapter's output added by the base matmul itself (cuBLAS's epilogue, no extra pass), and
  the adapter computed *before* the base matmul. That order matters: non-reentrant checkpointing stops
  recomputing a layer once it has every tensor the backward needs, and nothing after down_proj's adapter is
  needed, so the recompute skips down_proj's base matmul, a quarter of a layer's FLOPs;
- packed rows (several examples per row, padding-free) attend through flex attention with a block mask per
  example: sdpa would run the full masked row (4x the attention time of train.py at 70B shape); a single sequence
  per row keeps sdpa's causal flash kernel;
- selective recompute: only as many decoder layers recompute as the memory budget requires; when even
  recomputing every layer does not fit (long contexts), layer inputs wait in pinned host memory, copied on a
  side stream so the copies overlap compute.
"""

import functools
import weakref
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .gptq.layer import GPTQLinear, dequantizer

GIB = 2 ** 30
MEASURE_TOKENS = 2048  # activations grow linearly with tokens: measure one layer at this length and scale
MARGIN_BYTES = 2 * GIB  # loss head, allocator slack
OFFLOAD_MIN_BYTES = 2 ** 20  # smaller saved tensors (position ids, checkpoint's dummy) stay where they are


def enable_fast_training(model: torch.nn.Module, *, seq_len: int, memory_budget_gib: float | None = None,
                         liger: bool = True, fused_loss: bool = True, packed: bool = False) -> dict:
    """Make a PEFT LoRA model over GPTQLinear layers train fast on its GPU; returns what was done.

    seq_len: tokens per step (the packed sequence length); memory_budget_gib: peak GPU memory to plan
    recompute for (default 90% of the card); fused_loss: liger's fused linear-cross-entropy (off when the trainer
    fuses lm_head and loss itself, as TRL's SFTTrainer does); packed: rows hold several examples told apart by
    their position_ids (flex attention). Call after `get_peft_model` and before the optimizer's first step;
    the plan assumes AdamW (two fp32 moments per trainable parameter). Calling again re-plans for a new length."""
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        raise ValueError("enable_fast_training needs the model on a CUDA GPU; on CPU train without it")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    if liger:
        apply_liger(base, fused_loss=fused_loss)
    report = {"liger": getattr(base, "_liger_applied", False), "fast_lora_modules": speed_up_lora(model)}

    layers = decoder_layers(base)
    base.config.use_cache = False  # training keeps no KV cache
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x: non-reentrant by default
        base.activation_checkpointing_enable()
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    budget = (memory_budget_gib * GIB if memory_budget_gib is not None
              else 0.9 * torch.cuda.get_device_properties(device).total_memory)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    static = torch.cuda.memory_allocated(device) + 3 * trainable  # + grads and AdamW's two moments
    hooks = getattr(base, "_host_offload", None) or HostOffload()
    base._host_offload = hooks
    apply_plan(layers, RecomputePlan(keep=len(layers), offload=0, bytes=0), hooks)  # measure the plain layer
    sizes = measure_layer(layers[len(layers) // 2], rotary_embedding(base), min(seq_len, MEASURE_TOKENS))
    scale = seq_len / min(seq_len, MEASURE_TOKENS)
    plan = plan_recompute(len(layers), *(round(s * scale) for s in sizes), free_bytes=budget - static - MARGIN_BYTES)
    apply_plan(layers, plan, hooks)
    if packed:  # after measuring: the layer was measured with sdpa, whose saved tensors flex's match
        base.set_attn_implementation("flex_attention")
    report.update(attention=base.config._attn_implementation, layers=len(layers), keep=plan.keep,
                  recompute=len(layers) - plan.keep, offload=plan.offload,
                  budget_gib=round(budget / GIB, 1),
                  planned_peak_gib=round((static + MARGIN_BYTES + plan.bytes) / GIB, 1),
                  layer_activations_mib=round(sizes[1] * scale / 2 ** 20),
                  layer_input_mib=round(sizes[0] * scale / 2 ** 20))
    return report


def apply_liger(base: torch.nn.Module, fused_loss: bool = False) -> None:
    """liger-kernel's fused RoPE, RMSNorm and SwiGLU (and, for training, its fused linear-cross-entropy) on a
    transformers Llama-family model, once."""
    if not getattr(base, "_liger_applied", False):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True,
                                        fused_linear_cross_entropy=fused_loss, cross_entropy=False)
        base._liger_applied = True


# ----------------------------------------------------------------------------------------------------- LoRA

def speed_up_lora(model: torch.nn.Module) -> int:
    """Give every PEFT LoRA linear over a GPTQLinear the lean forward; returns how many. Modules with dropout
    or a LoRA variant (DoRA, ...) keep PEFT's forward."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    count = 0
    for module in model.modules():
        if (isinstance(module, LoraLinear) and isinstance(module.get_base_layer(), GPTQLinear)
                and all(isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values())):
            module.forward = functools.partial(lean_lora_forward, module)
            count += 1
    return count


def lean_lora_forward(module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = module.active_adapters
    if (args or kwargs or module.disable_adapters or module.merged or len(adapters) != 1
            or adapters[0] not in module.lora_A or adapters[0] in module.lora_variant
            or module.base_layer.bias is not None):
        return type(module).forward(module, x, *args, **kwargs)  # PEFT's general path
    name = adapters[0]
    # the adapter first: see the module docstring (recompute stops before the base matmul of a layer's last linear)
    lora_b = module.lora_B[name].weight.to(x.dtype) * module.scaling[name]
    update = F.linear(F.linear(x, module.lora_A[name].weight.to(x.dtype)), lora_b)
    return _GPTQMatmulPlus.apply(x, update, module.base_layer)


class _GPTQMatmulPlus(torch.autograd.Function):
    """x @ W.t() + update in one cuBLAS call. Like GPTQLinear's own matmul it saves nothing (the backward
    dequantises again); the update's gradient is the output's, passed through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, update: torch.Tensor, layer: GPTQLinear) -> torch.Tensor:
        ctx.layer = layer
        weight = dequantizer(x.device)(layer, x.dtype)
        out = torch.addmm(update.reshape(-1, update.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
        return out.view(update.shape)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = dequantizer(grad_output.device)(ctx.layer, grad_output.dtype)
        return grad_output @ weight, grad_output, None


# -------------------------------------------------------------------------------------------------- recompute

@dataclass(frozen=True)
class RecomputePlan:
    keep: int  # the last `keep` layers keep their activations (no recompute)
    offload: int  # the first `offload` layers recompute from an input kept in host memory
    bytes: int  # planned peak of activation memory

    def mode(self, index: int, n_layers: int) -> str:
        if index >= n_layers - self.keep:
            return "keep"
        return "offload" if index < self.offload else "recompute"


def plan_recompute(n_layers: int, input_bytes: int, saved_bytes: int, backward_bytes: int,
                   free_bytes: float) -> RecomputePlan:
    """How many layers may skip recompute, or must hold their input on the host, within `free_bytes`.

    Per layer: `input_bytes` kept when it recomputes, `saved_bytes` when it does not, and `backward_bytes` of
    working memory while its backward runs. The backward visits the kept (last) layers first, so at any time
    at most one layer's recompute is live: the peak is at the end of the forward plus one backward."""
    extra = saved_bytes - input_bytes
    if n_layers * input_bytes + saved_bytes + backward_bytes <= free_bytes:
        keep = int((free_bytes - backward_bytes - n_layers * input_bytes) // max(extra, 1))
        keep = max(0, min(n_layers, keep))
        return RecomputePlan(keep, 0, n_layers * input_bytes + backward_bytes + max(keep * extra, saved_bytes))
    # every layer recomputes; inputs of the first ones go to the host (two on the GPU at a time: the one in use
    # and the one being fetched)
    on_gpu = int((free_bytes - saved_bytes - backward_bytes - 2 * input_bytes) // input_bytes)
    if on_gpu < 0:
        need = (saved_bytes + backward_bytes + 2 * input_bytes + MARGIN_BYTES) / GIB
        raise ValueError(f"one layer's recompute at this sequence length needs ~{need:.1f} GiB beyond the model, "
                         f"more than the memory budget leaves; shorten seq_len or raise memory_budget_gib")
    offload = n_layers - min(on_gpu, n_layers)
    return RecomputePlan(0, offload, (n_layers - offload + 2) * input_bytes + saved_bytes + backward_bytes)


def apply_plan(layers, plan: RecomputePlan, hooks: "HostOffload") -> None:
    for index, layer in enumerate(layers):
        mode = plan.mode(index, len(layers))
        layer.gradient_checkpointing = mode != "keep"
        layer.__dict__.pop("forward", None)
        if mode == "offload":
            layer.forward = functools.partial(_offloaded_forward, layer, hooks)


def _offloaded_forward(layer, hooks, *args, **kwargs):
    with hooks:  # applies to what the checkpoint saves: the layer's input; inside, the checkpoint's own hooks win
        return type(layer).forward(layer, *args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no checkpointable decoder layers; the fast path supports "
                         "transformers decoder models (Llama family)")
    return layers


def rotary_embedding(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))


def measure_layer(layer: torch.nn.Module, rotary: torch.nn.Module, tokens: int) -> tuple[int, int, int]:
    """(input, saved activations, backward working memory) in bytes for one decoder layer at `tokens` tokens,
    measured on the GPU with the layer as it will train (LoRA, liger)."""
    frozen = next(p for p in layer.parameters() if not p.requires_grad)  # a norm weight: the activation dtype
    hidden = torch.randn(1, tokens, rotary.config.hidden_size, device=frozen.device, dtype=frozen.dtype)
    position_ids = torch.arange(tokens, device=frozen.device)[None]
    kwargs = dict(position_embeddings=rotary(hidden, position_ids), position_ids=position_ids)
    checkpointing, layer.gradient_checkpointing = layer.gradient_checkpointing, False
    try:
        with torch.no_grad():
            layer(hidden, **kwargs)  # compiles kernels and sizes the dequantisation workspace first
        hidden.requires_grad_(True)
        saved = {}

        def pack(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(hidden, **kwargs)
        torch.autograd.grad(out, hidden, torch.randn_like(out))  # input grad only: leaves LoRA .grad alone
        peak = torch.cuda.max_memory_allocated() - before
    finally:
        layer.gradient_checkpointing = checkpointing
    input_bytes = hidden.numel() * hidden.element_size()
    saved_bytes = sum(saved.values())
    return input_bytes, saved_bytes, max(peak - saved_bytes, 0)


# ------------------------------------------------------------------------------------------------ host offload

class _HostCopy:
    __slots__ = ("host", "device", "on_device", "ready", "previous", "__weakref__")

    def __init__(self, host, device, previous):
        self.host, self.device, self.on_device, self.ready, self.previous = host, device, None, None, previous


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep large saved tensors in pinned host memory until the backward needs them.

    Copies run on a side stream: the copy out overlaps the rest of the forward, and fetching one layer's input in
    the backward starts the copy of the one saved before it, needed next. Pinned buffers are pooled and reused
    every step (allocating pinned memory is slow)."""

    def __init__(self):
        super().__init__(self._pack, self._unpack)
        self.stream = None
        self.pool = defaultdict(list)
        self.last = None

    def _pack(self, tensor):
        if not tensor.is_cuda or tensor.numel() * tensor.element_size() < OFFLOAD_MIN_BYTES:
            return tensor
        self.stream = self.stream or torch.cuda.Stream(tensor.device)
        free = self.pool[(tensor.shape, tensor.dtype)]
        host = free.pop() if free else torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.stream)  # its memory is reused only after the copy
        copy = _HostCopy(host, tensor.device, weakref.ref(self.last) if self.last is not None else None)
        self.last = copy
        return copy

    def _unpack(self, copy):
        if isinstance(copy, torch.Tensor):
            return copy
        if copy.host is None:
            raise RuntimeError("an offloaded activation was unpacked twice; backward with retain_graph=True is not "
                               "supported with host offload (raise memory_budget_gib or shorten seq_len)")
        self._fetch(copy)
        torch.cuda.current_stream(copy.device).wait_event(copy.ready)
        previous = copy.previous() if copy.previous is not None else None
        if previous is not None:
            self._fetch(previous)  # the layer before recomputes next
        tensor = copy.on_device
        self.pool[(copy.host.shape, copy.host.dtype)].append(copy.host)  # next written behind this read, same stream
        copy.host = copy.on_device = None
        return tensor

    def _fetch(self, copy):
        if copy.on_device is not None or copy.host is None:
            return
        compute = torch.cuda.current_stream(copy.device)
        copy.on_device = torch.empty(copy.host.shape, dtype=copy.host.dtype, device=copy.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            copy.on_device.copy_(copy.host, non_blocking=True)
        copy.ready = self.stream.record_event()


def linear_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the quantised linears: the FLOP count's P (lm_head and embeddings excluded)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, GPTQLinear))

