"""The fast GPU training path for a PEFT-LoRA model over GPTQ layers: `enable_fast_training(model, seq_len=...)`.

What it does, each kept because it measured faster (eval/BENCHMARKS.md):
- liger-kernel's fused RMSNorm, SwiGLU, RoPE and linear-cross-entropy (no [tokens, vocab] logits in memory);
- LoRA without wasted work (`fast_lora`): dropout without a kept mask, bf16 adapter math, the adapter's update
  and its input gradient added inside the base matmuls, projections sharing an input (q, k, v; gate, up) in one
  Function, an MLP that keeps no SwiGLU output, and a recompute that stops before down_proj's base matmul;
- packed rows (several examples per row, padding-free) attend through flex attention with a block mask per
  example: sdpa would run the full masked row (4x the attention time of train.py at 70B shape); a single sequence
  per row keeps sdpa's causal flash kernel. The mask compiles without inductor's persistent kernels (minutes of
  compile at 16,384 tokens with them);
- selective recompute: as many decoder layers as fit keep their activations on the GPU; of the others, as many
  as the host link can carry while the GPU computes keep them in pinned host memory (`host_offload`), and only
  the rest recompute. When even recomputing every layer does not fit (long contexts), layer inputs wait in
  pinned host memory. Layers that keep their activations, on the GPU or the host, keep no RMSNorm output: the
  backward recomputes it from the norm's input (`norm_recompute`; 15 % of a layer's activations at 70B shape).

Under FSDP2 (accelerate_fsdp.yaml) the same path runs on each GPU's shard: the plan counts this GPU's slice of the
weights and adapters plus the layers gathered whole while they compute, and is made per process.
"""

import contextlib
import functools
from dataclasses import dataclass

import torch

from ..gptq.layer import FUSED_MAX_TOKENS, GPTQLinear
from ..gptq.memory import FAST_PATH_HEADROOM_BYTES, GIB
from .fast_lora import speed_up_lora
from .host_offload import OFFLOAD_MIN_BYTES, HostOffload, copy_key, default_host_memory
from .norm_recompute import NormRecompute
from .recompute_plan import RecomputePlan, host_memory_to_recompute_fewer, host_share_for, plan_for_budget

MEASURE_TOKENS = 2048  # activations grow linearly with tokens: measure one layer at this length and scale


def enable_fast_training(model: torch.nn.Module, *, seq_len: int, memory_budget_gib: float | None = None,
                         host_memory_gib: float | None = None, liger: bool = True, fused_loss: bool = True,
                         packed: bool = False) -> dict:
    """Make a PEFT LoRA model over GPTQLinear layers train fast on its GPU; returns what was done.

    seq_len: tokens per step (the packed sequence length); memory_budget_gib: peak GPU memory to plan
    recompute for (default 90% of the card); host_memory_gib: the most pinned host memory that layers may keep
    their activations in instead of recomputing (default half of the machine's memory or of its cgroup's limit, at
    most what is available now, shared among the processes on it: `host_offload.default_host_memory`; 0: none);
    fused_loss: liger's fused linear-cross-entropy (off when the trainer fuses lm_head and loss itself, as TRL's
    SFTTrainer does); packed: rows hold several examples told apart by their position_ids (flex attention). Call
    after `get_peft_model` and before the optimizer's first step; the plan assumes AdamW (two fp32 moments per
    trainable parameter). Calling again re-plans for a new length."""
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        raise ValueError("enable_fast_training needs the model on a CUDA GPU; on CPU train without it")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    if liger:
        apply_liger(base, fused_loss=fused_loss)
    lora = speed_up_lora(model)
    # what keeps PEFT's slower forward, and why: said at start and kept in the run's metrics
    report = {"liger": getattr(base, "_liger_applied", False), "fast_lora_modules": lora.pop("lean"),
              "peft_lora_modules": lora}

    layers = decoder_layers(base)
    gathered = gathered_layer_bytes(layers[0])
    if gathered:
        settle_sharded_root(model, device)
    base.config.use_cache = False  # training keeps no KV cache
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x: non-reentrant by default
        base.activation_checkpointing_enable()
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    budget = (memory_budget_gib * GIB if memory_budget_gib is not None
              else 0.9 * torch.cuda.get_device_properties(device).total_memory)
    trainable = sum(local(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # + grads and AdamW's two moments; sharded, the layer computing and the next one's all-gather ahead of it
    # (`prefetch_next_layer`): the measured layer below is measured gathered, without FSDP2's gathers
    static = torch.cuda.memory_allocated(device) + 3 * trainable + 2 * gathered
    if getattr(base, "_host_offload", None) is None:  # once: enabling again re-plans with the same hooks
        norms = NormRecompute()
        for layer in layers:
            norms.watch(layer)
        base._host_offload = HostOffload(norms)
    hooks = base._host_offload
    apply_plan(layers, RecomputePlan(keep=len(layers), offload=0, bytes=0), hooks=None)  # measure the plain layer
    cost = measure_layer(layers[len(layers) // 2], rotary_embedding(base), min(seq_len, MEASURE_TOKENS),
                         hooks.norms)
    scale = seq_len / min(seq_len, MEASURE_TOKENS)
    sizes = [round(b * scale) for b in (cost.input_bytes, cost.saved_bytes, cost.backward_bytes)]
    host_bytes = default_host_memory() if host_memory_gib is None else host_memory_gib * GIB
    link = host_link_bytes_per_s(device) if host_bytes > 0 else 0.0  # no host memory, no link (measuring pins 64 MiB)
    host_share = host_share_for(cost.forward_s * scale, link, sizes[1], sharded=bool(gathered))
    # what the host buffers of a plan take at the longest row: pinned for it now, not during step 1, so that every
    # shorter row reuses them
    offloaded = [n for n in (round(b * scale) for b in cost.tensor_bytes) if n >= OFFLOAD_MIN_BYTES]

    def host_buffers(plan: RecomputePlan) -> list[int]:
        return offloaded * plan.host + [sizes[0]] * plan.offload

    limits = {"budget_bytes": budget, "static_bytes": static, "seq_len": seq_len, "host_share": host_share,
              "pinned_for": lambda plan: hooks.arena.pinned_for(host_buffers(plan))}
    plan = plan_for_budget(len(layers), *sizes, host_bytes=host_bytes, **limits)
    apply_plan(layers, plan, hooks, hooks.norms)
    hooks.arena.reserve(host_buffers(plan))
    if packed:  # after measuring: the layer was measured with sdpa, whose saved tensors flex's match
        compile_flex_masks_without_persistent_kernels()
        base.set_attn_implementation("flex_attention")
    report.update(attention=base.config._attn_implementation, layers=len(layers), keep=plan.keep, host=plan.host,
                  recompute=len(layers) - plan.keep - plan.host, offload=plan.offload,
                  budget_gib=round(budget / GIB, 1), model_gib=round(static / GIB, 1),
                  sharded_layer_gib=round(gathered / GIB, 2),
                  planned_peak_gib=round((static + FAST_PATH_HEADROOM_BYTES + plan.bytes) / GIB, 1),
                  host_gib=round(plan.host * sizes[1] / GIB, 1), pinned_gib=round(hooks.pinned_bytes / GIB, 1),
                  host_share=round(host_share, 2),
                  layer_activations_mib=round(sizes[1] / 2 ** 20), layer_input_mib=round(sizes[0] / 2 ** 20))
    roomier = host_memory_to_recompute_fewer(plan, len(layers), *sizes, **limits)
    if roomier is not None:  # said at start (training.sft) and kept in the run's metrics
        report["host_memory_gib_to_recompute_fewer"] = roomier
    base.fast_training_report = report  # for the run's metrics (training.run_report)
    return report


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This GPU's part of a parameter: its shard under FSDP2 (a DTensor), else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def gathered_layer_bytes(layer: torch.nn.Module) -> int:
    """Bytes of a decoder layer's parameters gathered whole, when FSDP2 shards them (DTensors); 0 when not sharded."""
    return sum(p.numel() * p.element_size() for p in layer.parameters() if hasattr(p, "to_local"))


@contextlib.contextmanager
def gathered_alone(layer: torch.nn.Module):
    """Yields the layer's forward without its module hooks, its parameters gathered whole until the block ends when
    FSDP2 shards it. Measured so, a layer's memory is its own (saved tensors, backward workspace), which grows with
    its tokens; the gathers FSDP2's hooks would add (this layer's twice, its all-gather buffers, the next layer's
    prefetch) do not, and the plan counts them apart (`gathered_layer_bytes`)."""
    from torch.distributed.fsdp import FSDPModule
    sharded = isinstance(layer, FSDPModule)
    if sharded:
        layer.unshard()
    try:
        yield layer.forward
    finally:
        if sharded:
            layer.reshard()


def settle_sharded_root(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 makes the first module to run a forward its root, so measuring one layer first would make that layer
    the root and the model's own forward then fails. A short row through the whole model first (every rank at once,
    no gradients, torch's CPU generator untouched: LoRA dropout seeds come from it), longer than the fused decode
    matmul takes: a GPTQ layer outside the lean LoRA would otherwise keep its zero points unpacked, whole, on every
    GPU (`triton_gemv.unpacked_zeros`)."""
    tokens = max(FUSED_MAX_TOKENS.values()) + 1
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        model(input_ids=torch.zeros(1, tokens, dtype=torch.long, device=device), use_cache=False)


def host_link_bytes_per_s(device: torch.device, nbytes: int = 64 * 2 ** 20) -> float:
    """GPU-to-pinned-host copy rate, measured."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        host.copy_(source, non_blocking=True)
    end.record()
    end.synchronize()
    return 3 * nbytes / (start.elapsed_time(end) / 1e3)


def compile_flex_masks_without_persistent_kernels() -> None:
    """transformers builds flex attention's block mask with a compiled `create_block_mask`, and inductor lowers its
    argsort of each row's key blocks (and the sums over 128 x 128 tiles) to persistent Triton kernels whose compile
    time explodes with the blocks in a row (pytorch#182060): at 16,384 tokens train.py's first step took ~200 s, most
    of it in ptxas on that kernel (eval/BENCHMARKS.md). Without persistent reductions inductor sorts with ATen's
    kernel and loops over the tiles. Only the mask's compile is changed: flex attention's kernels are compiled
    outside it (templates either way). Registered for the process, once is enough."""
    import torch._inductor.config
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    def flex_mask(*args, **kwargs):
        with torch._inductor.config.patch({"triton.persistent_reductions": False}):
            return flex_attention_mask(*args, **kwargs)

    AttentionMaskInterface.register("flex_attention", flex_mask)


def apply_liger(base: torch.nn.Module, fused_loss: bool = False) -> None:
    """liger-kernel's fused RoPE, RMSNorm and SwiGLU (and, for training, its fused linear-cross-entropy) on a
    transformers Llama-family model, once."""
    if not getattr(base, "_liger_applied", False):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True,
                                        fused_linear_cross_entropy=fused_loss, cross_entropy=False)
        base._liger_applied = True


def apply_plan(layers, plan: RecomputePlan, hooks: HostOffload | None, norms: NormRecompute | None = None) -> None:
    """Set each layer's mode: host and offload layers save through `hooks` (what they save goes to the host:
    everything, or for a checkpointed layer only its input, inside the checkpoint its own hooks win), kept layers
    through `norms` (no norm output kept); recompute layers checkpoint. With host or offload layers, the gradient of
    the top layer's output starts bringing the last of them back (`HostOffload.fetch_last_layer`)."""
    for index, layer in enumerate(layers):
        mode = plan.mode(index, len(layers))
        layer.gradient_checkpointing = mode in ("recompute", "offload")
        layer.__dict__.pop("forward", None)
        saving = hooks if mode in ("offload", "host") else norms if mode == "keep" else None
        if saving is not None:
            layer.forward = functools.partial(_forward_saving_through, layer, saving)
    top = layers[-1]
    handle = top.__dict__.pop("_fetch_at_turn", None)
    if handle is not None:
        handle.remove()
    if hooks is not None and (plan.host or plan.offload):
        top._fetch_at_turn = top.register_forward_hook(functools.partial(_fetch_at_turn, hooks))


def _fetch_at_turn(hooks: HostOffload, layer, args, output) -> None:
    """The backward starts with the gradient of the top layer's output: from then on the last host layer's copies
    come back while the layers above it run backward."""
    hidden = output[0] if isinstance(output, tuple) else output
    if torch.is_grad_enabled() and hidden.requires_grad:
        hidden.register_hook(lambda grad: hooks.fetch_last_layer())  # None: the gradient passes unchanged


def _forward_saving_through(layer, saved_tensors_hooks, *args, **kwargs):
    with saved_tensors_hooks:
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


@dataclass(frozen=True)
class LayerCost:
    input_bytes: int  # the layer's input
    saved_bytes: int  # what autograd saves for its backward (input included)
    backward_bytes: int  # working memory of its backward
    forward_s: float  # one forward
    tensor_bytes: tuple[int, ...] = ()  # each saved tensor, in order, as a host layer copies them


def measure_layer(layer: torch.nn.Module, rotary: torch.nn.Module, tokens: int,
                  norms: NormRecompute | None = None) -> LayerCost:
    """One decoder layer at `tokens` tokens, measured on the GPU as it will train (LoRA, liger, and with `norms`
    no norm output kept); sharded, gathered beforehand (`gathered_alone`)."""
    # a norm weight gives the activation dtype (the GPTQ tensors are frozen parameters too, but int32/fp16)
    frozen = next(p for n, p in layer.named_parameters() if not p.requires_grad and n.endswith("norm.weight"))
    hidden = torch.randn(1, tokens, rotary.config.hidden_size, device=frozen.device, dtype=frozen.dtype)
    position_ids = torch.arange(tokens, device=frozen.device)[None]
    kwargs = {"position_embeddings": rotary(hidden, position_ids), "position_ids": position_ids}
    checkpointing, layer.gradient_checkpointing = layer.gradient_checkpointing, False
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        with gathered_alone(layer) as forward:
            with torch.no_grad():
                forward(hidden, **kwargs)  # compiles kernels and sizes the dequantisation workspace first
                start.record()
                forward(hidden, **kwargs)
                end.record()
            hidden.requires_grad_(True)
            saved = SavedTensorCount(norms)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with saved.counting():
                out = forward(hidden, **kwargs)
            torch.autograd.grad(out, hidden, torch.randn_like(out))  # input grad only: leaves LoRA .grad alone
            peak = torch.cuda.max_memory_allocated() - before
    finally:
        layer.gradient_checkpointing = checkpointing
    return LayerCost(hidden.numel() * hidden.element_size(), saved.bytes, max(peak - saved.bytes, 0),
                     start.elapsed_time(end) / 1e3, tuple(saved.copies.values()))


class SavedTensorCount:
    """What a forward saves for its backward, counted by saved-tensor hooks: `bytes` of distinct storages held, and
    `copies` (bytes each, in order) as a host layer's `HostOffload` would copy them. With `norms`, norm outputs are
    recomputed as in a kept layer: each holds the norm's input instead."""

    def __init__(self, norms: NormRecompute | None = None):
        self.norms, self.storages, self.copies = norms, {}, {}

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def pack(self, tensor: torch.Tensor):
        packed = self.norms.pack(tensor) if self.norms is not None else tensor
        held = tensor if packed is tensor else packed.input
        self.storages[held.untyped_storage().data_ptr()] = held.untyped_storage().nbytes()
        self.copies[copy_key(held)] = held.numel() * held.element_size()
        return packed

    def unpack(self, packed):
        return self.norms.unpack(packed) if self.norms is not None else packed

    @contextlib.contextmanager
    def counting(self):
        with (torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack),
              self.norms.recording() if self.norms is not None else contextlib.nullcontext()):
            yield self


def linear_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the quantised linears: the FLOP count's P (lm_head and embeddings excluded)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, GPTQLinear))

