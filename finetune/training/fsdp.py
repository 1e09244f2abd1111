"""FSDP2 runs: the GPTQ weights sharded across GPUs, so a model larger than one card trains on several.

    accelerate launch --config_file accelerate_fsdp.yaml finetune/train.py recipe=medqa

accelerate's FSDP2 plugin (`fsdp_version: 2`) does the sharding: each decoder layer, its LoRA inside, becomes one
`fully_shard` unit; GPTQLinear's packed tensors are frozen parameters, so each GPU keeps its slice of them and
gathers a layer only while it computes. Only the adapters have gradients, so only they are reduce-scattered; or,
with `gpu.shard_adapters=false`, they stay whole on every GPU outside the units and are all-reduced
(`ReplicatedAdapters`).
Loading streams: the model is sharded before any packed tensor is read (`shard_model`), then each rank reads only
the rows of its slices from the safetensors files, straight to its GPU; no rank holds the whole model in host or GPU
memory (each reads the dense weights whole: embeddings, norms, output layer, ~1 GB at 70B).

The fast GPU path (`gpu.fast_path`, finetune.gpu) runs on the shards: its lean LoRA dequantises from the gathered
tensors in forward and backward alike, and its recompute plan is made per GPU for this GPU's slice of the model.

Checkpoints (`fsdp_state_dict_type: SHARDED_STATE_DICT`) hold each rank's shard of the adapter and optimiser state,
not the GPTQ weights; `resume=true` reads them back into the sharded model. The adapter is saved gathered, in PEFT's
format, as on one GPU.

Here also: the checks that the launch's FSDP settings can shard a GPTQ model (before any weight is read), and the
mixed-precision policy that keeps the weights in their stored dtypes.
"""

import itertools
import os
import re

import torch
from accelerate import PartialState
from accelerate.state import GradientState
from accelerate.utils import FullyShardedDataParallelPlugin

from ..config.recipe import RecipeError

FIX = "see accelerate_fsdp.yaml"


def fsdp_plugin() -> FullyShardedDataParallelPlugin | None:
    """The FSDP settings `accelerate launch` passed this process (as accelerate itself reads them), or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    try:
        return FullyShardedDataParallelPlugin()
    except (ValueError, KeyError) as err:
        raise RecipeError(f"accelerate's FSDP settings: {' '.join(str(err).split())}; {FIX}") from None


def check_fsdp_setup(plugin: FullyShardedDataParallelPlugin) -> None:
    """Settings that cannot shard a GPTQ model fail here, before loading, with the fix."""
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    if plugin.fsdp_version != 2:
        raise RecipeError(f"fsdp_version {plugin.fsdp_version} (FSDP1) flattens each unit into one tensor and cannot "
                          f"shard the int32 GPTQ weights beside the trainable LoRA; set fsdp_version: 2 ({FIX})")
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    if strategy not in ("FULL_SHARD", "1"):
        raise RecipeError(f"fsdp_sharding_strategy {strategy} is not supported for GPTQ models: FSDP2 shards fully; "
                          f"drop it and set fsdp_reshard_after_forward: true (or false to keep a layer gathered "
                          f"from forward to backward) ({FIX})")
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if policy is not transformer_auto_wrap_policy:
        raise RecipeError("fsdp_auto_wrap_policy must be TRANSFORMER_BASED_WRAP: each decoder layer is one FSDP unit, "
                          f"gathered only while it computes ({FIX})")
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise RecipeError(f"fsdp_offload_params: true is not supported for GPTQ models yet; set it to false ({FIX})")
    if plugin.cpu_ram_efficient_loading:
        raise RecipeError("fsdp_cpu_ram_efficient_loading: true broadcasts rank 0's whole model; set it to false: "
                          f"each rank reads only its shard of the checkpoint, straight to its GPU ({FIX})")


def one_process_notice(num_processes: int) -> str | None:
    """What a sharded launch of one process is told at start: it shards nothing and pays FSDP2's hooks (measured
    0.86x the unsharded run's tok/s on one H200, eval/BENCHMARKS.md, thirteenth session). Not an error: it trains."""
    if num_processes != 1:
        return None
    return ("accelerate_fsdp.yaml with one process shards nothing and trains slower than without FSDP (0.86x on one "
            "H200): on one GPU launch with accelerate_config.yaml; to shard, set num_processes to the GPUs")


def check_all_gather(choice: str) -> None:
    """gpu.all_gather=copy_engine needs GPUs that read each other's memory: CUDA GPUs of one machine."""
    if choice != "copy_engine":
        return
    state = PartialState()
    if state.device.type != "cuda":
        raise RecipeError("gpu.all_gather=copy_engine needs CUDA GPUs; use gpu.all_gather=nccl")
    machines = state.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    if machines > 1:
        raise RecipeError(f"gpu.all_gather=copy_engine gathers between GPUs of one machine and this launch spans "
                          f"{machines}; use gpu.all_gather=nccl")
    devices = range(torch.cuda.device_count())
    if not all(torch.cuda.can_device_access_peer(a, b) for a in devices for b in devices if a != b):
        raise RecipeError("gpu.all_gather=copy_engine needs GPUs that read each other's memory (NVLink or PCIe "
                          "peer access), which these cannot; use gpu.all_gather=nccl")


def apply_memory_cap(cap_gib: float | None) -> None:
    """Hold this process to the cap: the CUDA allocator raises out-of-memory rather than pass it."""
    if cap_gib is not None and torch.cuda.is_available():
        device = PartialState().device
        total = torch.cuda.get_device_properties(device).total_memory / 1024 ** 3
        torch.cuda.set_per_process_memory_fraction(min(cap_gib / total, 1.0), device)


def prepare_gptq_for_sharding(model: torch.nn.Module) -> None:
    """Every GPTQLinear holds its integer tensors as float bits (GPTQLinear.hold_ints_as_floats), which any
    `fully_shard` takes; keep_stored_dtypes makes sure FSDP never casts them."""
    from ..gptq.layer import GPTQLinear
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            module.hold_ints_as_floats()


def shard_rows(rows: int, ranks: int, rank: int) -> tuple[int, int]:
    """The rows [start, stop) that `fully_shard` keeps on `rank` of a tensor of `rows` rows: torch.chunk's split
    along dim 0 (ceil(rows / ranks) each, the last ones shorter or empty), as FSDP2 cuts Shard(0)."""
    size = -(-rows // ranks)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def shard_model(accelerator, model: torch.nn.Module, *, shard_adapters: bool = True) -> int:
    """Shard `model` (PEFT applied) with accelerate's own FSDP2 preparation, reading each rank's rows of the GPTQ
    packed tensors from the checkpoint straight into its shard. Returns the bytes this rank read.

    The model comes from `load_model(..., defer_packed=True)`: its packed tensors are placeholders that hold no
    memory. They go to the meta device, `fully_shard` cuts every parameter into its ranks' slices (the meta ones stay
    meta), and each rank then reads the rows of its slices alone (`loader.read_rows`) onto its device. Dense weights
    (embeddings, norms, output layer) and LoRA are real from the start and sharded as usual, or with
    `shard_adapters=False` left whole on every rank (`ReplicatedAdapters`). Sharded in place: `Accelerator.prepare`
    finds an FSDP module and leaves it as it is."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    from ..gptq.layer import GPTQLinear
    prepare_gptq_for_sharding(model)
    keep_stored_dtypes(accelerator.state.fsdp_plugin)
    deferred = {module: module.__dict__.get("packed_sources", {}) for module in model.modules()
                if isinstance(module, GPTQLinear)}
    for module, sources in deferred.items():
        for name in sources:
            placeholder = module._parameters[name]
            module._parameters[name] = torch.nn.Parameter(
                torch.empty(placeholder.shape, dtype=placeholder.dtype, device="meta"), requires_grad=False)
    replicated = None if shard_adapters else ReplicatedAdapters(model)
    if replicated is not None:
        accelerator.state.fsdp_plugin.ignored_modules = replicated.owners
    if fsdp2_prepare_model(accelerator, model) is not model:
        raise RuntimeError("accelerate's fsdp2_prepare_model returned another model than it was given; this "
                           "accelerate version shards differently: see finetune/training/fsdp.py")
    if replicated is not None:
        replicated.start(accelerator.device)
    return _read_packed_shards(deferred, accelerator.device)


class ReplicatedAdapters:
    """`gpu.shard_adapters=false`: every trainable parameter (LoRA, added-token rows) stays whole on every rank,
    outside the FSDP units (accelerate's `ignored_modules`), and its gradient is averaged over the ranks as the
    backward of an optimiser step's last accumulated row accumulates it, one all-reduce per decoder layer's adapters
    (per other module's), as data parallel buckets them and skips the rows before (`no_sync`); the units then gather
    and free only the frozen GPTQ weights and reduce-scatter nothing. FSDP2's per-unit work grows with the
    parameters in the unit, the trainable ones most (their gradients' copy-in, reduce-scatter and copy-out): on the
    CPU with gloo, 80 units of 28 frozen and 14 trainable tensors cost 8.6 ms a unit a step with the adapters
    inside, 4.9 ms outside; on two H200s at 70B under a 40 GiB cap, train.py's steps were 1.9 % and 3.5 % shorter
    than with the adapters inside (eval/BENCHMARKS.md, seventeenth and eighteenth sessions). Costs each GPU the
    adapters' AdamW state whole (~1.5 GiB at 70B r16, in the sharded estimate: `budget.check_sharded_memory`)."""

    def __init__(self, model: torch.nn.Module):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        owners = sorted({name.rsplit(".", 1)[0] for name in trainable})
        self.owners = [model.get_submodule(name) for name in owners]
        buckets = {}
        for name, owner in zip(owners, self.owners):
            frozen = [n for n, p in owner.named_parameters() if not p.requires_grad]
            if frozen:
                raise RuntimeError(f"{name} holds trainable and frozen parameters ({frozen[0]}); "
                                   "gpu.shard_adapters=false can only leave whole modules out of the FSDP units")
            layer = re.search(r"\.layers\.\d+\.", name)
            buckets.setdefault(layer.group() if layer else name, []).extend(owner.parameters())
        self.buckets = list(buckets.values())
        self.bucket_of = {p: bucket for bucket in self.buckets for p in bucket}
        self.ready = {id(bucket): 0 for bucket in self.buckets}
        self.pending = []
        self.queued = False  # _finish queued to run at the end of this backward

    def start(self, device: torch.device) -> None:
        """On `device`, every gradient averaged over the ranks as autograd accumulates it; the backward ends
        once every average is in."""
        for owner in self.owners:
            owner.to(device)
        for p in self.bucket_of:
            p.register_post_accumulate_grad_hook(self._accumulated)

    def _accumulated(self, param: torch.nn.Parameter) -> None:
        import torch.distributed as dist
        from torch.autograd import Variable
        if not self.queued:  # at the first gradient, so that a backward completing no bucket is caught too
            Variable._execution_engine.queue_callback(self._finish)
            self.queued = True
        bucket = self.bucket_of[param]
        self.ready[id(bucket)] += 1
        if self.ready[id(bucket)] < len(bucket):
            return
        self.ready[id(bucket)] = 0
        if not GradientState().sync_gradients:  # a row accumulated before the step's last (the trainer says which):
            return  # the average of the accumulated sums at the last row is the sum of the rows' averages
        # a sum, then divided: gloo has no average
        flat = torch.cat([p.grad.flatten() for p in bucket])
        self.pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))

    def _finish(self) -> None:
        import torch.distributed as dist
        self.queued = False
        partial = sum(map(bool, self.ready.values()))
        if partial:  # their all-reduce was never issued: the ranks would wait on each other or not average
            raise RuntimeError(f"the adapters of {partial} decoder layer(s) got gradients for only some of their "
                               "parameters in this backward, which gpu.shard_adapters=false cannot average: set "
                               "gpu.shard_adapters=true")
        world = dist.get_world_size()
        for bucket, flat, work in self.pending:
            work.wait()
            flat.div_(world)
            grads = [p.grad for p in bucket]
            torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]),
                                                                           grads)])
        self.pending.clear()


def _read_packed_shards(deferred: dict, device: torch.device) -> int:
    """Fill every GPTQLinear's meta shards with its rank's rows from the checkpoint; the bytes read."""
    from contextlib import ExitStack

    from torch.distributed.tensor import DTensor

    from ..gptq.loader import open_safetensors, read_rows
    read = 0
    with ExitStack() as files:
        opened = {}
        for module, sources in deferred.items():
            state = {}
            for name, source in sources.items():
                shard = module._parameters[name]
                if not isinstance(shard, DTensor):
                    raise RecipeError(f"{source.key} was not sharded by fully_shard (its decoder layer is not an FSDP "
                                      f"unit); check fsdp_auto_wrap_policy ({FIX})")
                mesh = shard.device_mesh
                start, stop = shard_rows(shard.shape[0], mesh.size(), mesh.get_local_rank())
                if (stop - start, *shard.shape[1:]) != tuple(shard.to_local().shape):
                    raise RuntimeError(f"{source.key}: fully_shard keeps {tuple(shard.to_local().shape)} on this rank, "
                                       f"not rows {start}:{stop} of {tuple(shard.shape)}; this torch splits "
                                       "Shard(0) differently from torch.chunk")
                if source.file not in opened:
                    opened[source.file] = files.enter_context(open_safetensors(source.file))
                rows = read_rows(opened[source.file], source, start, stop)
                read += rows.numel() * rows.element_size()
                local = rows.view(shard.dtype).to(device)  # integers as the float bits the layer holds them in
                state[name] = DTensor.from_local(local, mesh, shard.placements, run_check=False, shape=shard.shape,
                                                 stride=shard.stride())
            # load_state_dict(assign=True) is how FSDP2 takes new shards: its hook re-pads them and re-points its
            # parameter at each; it looks the parameter up by name, which must give the float tensor itself
            held = module.__dict__.pop("int_dtypes", None)
            try:
                module.load_state_dict(state, strict=False, assign=True)
            finally:
                if held is not None:
                    module.int_dtypes = held
            module.__dict__.pop("packed_sources", None)
    return read


def keep_stored_dtypes(plugin: FullyShardedDataParallelPlugin) -> None:
    """Gather every weight in the dtype it is stored in, gradients reduced in fp32: the default policy would cast
    the fp16 GPTQ scales to bf16 (a rounding one GPU never makes) and the integers held as floats (garbage)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def gather_head_with_backbone(model: torch.nn.Module) -> None:
    """TRL's loss reads the output layer's weight straight after the backbone instead of calling the layer, so FSDP2
    never gathers it: the weight is still this rank's shard (a DTensor), which PEFT's added-token rows cannot be
    merged into (mixed Tensor and DTensor). Gather the output layer's unit as the backbone finishes: its weight reads
    whole, the added rows' gradients are reduce-scattered at the end of backward like every other unit's."""
    from torch.distributed.fsdp import FSDPModule

    def gather(module, args, output):
        head = model.get_output_embeddings()
        if isinstance(head, FSDPModule):
            head.unshard()
        return output

    model.get_base_model().base_model.register_forward_hook(gather)


def prefetch_next_layer(model: torch.nn.Module) -> None:
    """FSDP2 issues a unit's all-gather when the CPU reaches the unit's forward, so where the CPU is not ahead of the
    GPU (the sharded fast path's step is bound by the host: eval/BENCHMARKS.md, twelfth session) the GPU waits for
    every decoder layer's gather in the forward. Each decoder layer's forward now starts the next one's gather (the
    backward already gathers the layer below ahead); the fast path's plan counts that layer (`gathered` twice)."""
    for layer, following in itertools.pairwise(sharded_decoder_layers(model)):
        layer.set_modules_to_forward_prefetch([following])


def sharded_decoder_layers(model: torch.nn.Module) -> list:
    """The decoder layers, each its own FSDP2 unit (`FSDPModule`) once `shard_model` has run."""
    from torch.distributed.fsdp import FSDPModule

    from ..gpu.fast_training import decoder_layers
    return [layer for layer in decoder_layers(model) if isinstance(layer, FSDPModule)]


def load_sharded_adapter(trainer, checkpoint) -> None:
    """The adapter of a sharded checkpoint (what the Trainer writes under accelerate_fsdp.yaml: each rank its shard,
    no PEFT files) into the sharded model, as the Trainer reads it when it resumes. A collective."""
    from accelerate.utils import load_fsdp_model
    load_fsdp_model(trainer.accelerator.state.fsdp_plugin, trainer.accelerator, trainer.model, str(checkpoint),
                    adapter_only=True)


def full_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter PEFT may save (all but the GPTQ packed tensors), gathered whole on every rank, on the host.
    A collective: every rank calls it."""
    from torch.distributed.tensor import DTensor

    from ..gptq.layer import PACKED_TENSORS
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] not in PACKED_TENSORS}
