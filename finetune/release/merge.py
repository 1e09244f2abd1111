"""Merge a LoRA adapter into its GPTQ base and write dense safetensors shards, one decoder layer at a time.

Only one decoder layer of the quantised checkpoint is ever materialised: the model is built on the meta device,
PEFT wraps it there, and each layer in turn gets its GPTQ tensors from the checkpoint and its adapter tensors,
is dequantised with the project's own layer (`GPTQLinear.dequantize_weight`: exactly the weights training saw),
merged by PEFT's own `merge` (so rsLoRA, rank/alpha patterns and DoRA scale as in training), cast once to the
output dtype, appended to the current shard, and sent back to meta. Peak host memory is about one layer's
linears in fp32 plus one output shard, plus the dense embeddings — a 70B merge fits in a few GB.
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from peft import load_peft_weights, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..gptq import GPTQLinear
from ..gptq.format import GPTQConfig
from ..gptq.loader import build_skeleton, tensor_shapes, weight_files
from ..models.adapter import attach_adapter

MERGE_DTYPE = torch.float32  # dequantise, add the LoRA delta and round to the output dtype once
LAYER_KEY = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.")


class MergeError(ValueError):
    """A merge that would write non-finite weights; the message names the tensor."""


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes` (a bigger tensor gets its own), named
    and indexed as transformers' `save_pretrained` names them, so any loader of HF checkpoints reads them."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out_dir / f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, give the shards their final names and write the index (none for a single shard)."""
        self.flush()
        if len(self.shards) == 1:
            path = self.shards[0][0].rename(self.out_dir / "model.safetensors")
            return [path]
        weight_map, paths = {}, []
        for number, (path, names) in enumerate(self.shards, start=1):
            final = path.rename(self.out_dir / f"model-{number:05d}-of-{len(self.shards):05d}.safetensors")
            weight_map.update(dict.fromkeys(names, final.name))
            paths.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return paths


def _tensor_files(files: list[Path]) -> dict[str, Path]:
    names = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def _materialise(model: nn.Module, names: list[str], tensor_files: dict[str, Path], device: torch.device) -> None:
    """Read checkpoint tensors `names` onto `device` into `model` (a PEFT-wrapped one too: a wrapped module's tensors
    live in its base layer). Floats take the skeleton's dtype, except GPTQ scales, which stay fp16 as the loader
    keeps them."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(tensor_files[name], []).append(name)
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in file_names:
                module_name, _, tensor_name = name.rpartition(".")
                try:
                    module = model.get_submodule(module_name)
                except AttributeError:
                    continue  # e.g. rotary inv_freq saved by old writers
                while hasattr(module, "base_layer") or hasattr(module, "token_adapter"):
                    module = module.token_adapter if hasattr(module, "token_adapter") else module.base_layer
                set_module_tensor_to_device(module, tensor_name, device, value=f.get_tensor(name))


def _is_tuner(module: nn.Module) -> bool:
    return hasattr(module, "unload_and_optionally_merge_module") or hasattr(module, "base_layer")


def _dense_linear(layer: GPTQLinear) -> nn.Linear:
    with torch.device("meta"):
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    dense.weight = nn.Parameter(layer.dequantize_weight(MERGE_DTYPE), requires_grad=False)
    if layer.bias is not None:
        dense.bias = nn.Parameter(layer.bias.to(MERGE_DTYPE), requires_grad=False)
    return dense


def _merged_tensors(tuner: nn.Module) -> dict[str, torch.Tensor]:
    """The dense tensors of a PEFT-wrapped module with its adapter merged, through PEFT's own merge."""
    if hasattr(tuner, "unload_and_optionally_merge_module"):  # trainable token rows, modules_to_save
        return tuner.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None).state_dict()
    quantised = tuner.get_base_layer()
    if not isinstance(quantised, GPTQLinear):
        tuner.merge()
        return tuner.get_base_layer().state_dict()
    holder = tuner
    while holder.base_layer is not quantised:
        holder = holder.base_layer
    holder.base_layer = _dense_linear(quantised)
    try:
        tuner.merge()  # not safe_merge, which clones the weight: `stream_merge` checks what it writes
        return dict(tuner.get_base_layer().state_dict())
    finally:
        holder.base_layer = quantised  # the dense copy is dropped as soon as its tensors are written
        tuner.merged_adapters.clear()


def dense_tensors(root: nn.Module, prefix: str = "", skip: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every persistent tensor under `root` as a plain dense model has it: LoRA merged, GPTQ
    linears dequantised, PEFT's wrapper names gone. Modules named `skip` (and below) are left out."""
    modules = dict(root.named_modules())
    tuners = [name for name, module in modules.items() if _is_tuner(module)]

    def inside(name: str, parents) -> bool:
        return any(name.startswith(f"{parent}.") for parent in parents)

    for name, module in modules.items():
        if (skip and (name == skip or inside(name, [skip]))) or inside(name, tuners):
            continue
        if name in tuners:
            tensors = _merged_tensors(module)
        elif isinstance(module, GPTQLinear):
            tensors = {"weight": module.dequantize_weight(MERGE_DTYPE), "bias": module.bias}
        else:
            tensors = {k: v for k, v in module.named_parameters(recurse=False)}
            tensors.update((k, v) for k, v in module.named_buffers(recurse=False)
                           if k not in module._non_persistent_buffers_set)
        for tensor_name, tensor in tensors.items():
            if tensor is not None:
                yield f"{prefix}{name}.{tensor_name}" if name else f"{prefix}{tensor_name}", tensor


def stream_merge(base_dir: Path, gptq_config: GPTQConfig, adapter_dir: Path, out_dir: Path, dtype: torch.dtype,
                 max_shard_bytes: int, device: str | torch.device = "cpu") -> nn.Module:
    """Write the merged model's weights into `out_dir` as sharded safetensors in `dtype`; returns the (meta)
    model, whose config — vocabulary grown by added tokens — is the merged model's. Each decoder layer is
    dequantised and merged on `device` (a GPU is much faster); host memory holds one shard."""
    files = weight_files(base_dir)
    tensor_files = _tensor_files(files)
    model = build_skeleton(base_dir, gptq_config, tensor_shapes(files), torch.device(device), MERGE_DTYPE)
    layers: dict[int, list[str]] = {}
    for name in tensor_files:
        match = LAYER_KEY.match(name)
        if match:
            layers.setdefault(int(match["index"]), []).append(name)
    layers_prefix = next(LAYER_KEY.match(n)["prefix"] for n in tensor_files if LAYER_KEY.match(n))
    _materialise(model, [n for n in tensor_files if not LAYER_KEY.match(n)], tensor_files, torch.device("cpu"))

    peft_model = attach_adapter(model, adapter_dir, low_cpu_mem_usage=True)
    # in fp32, as PEFT's loader upcasts a half-precision adapter (autocast_adapter_dtype)
    adapter_weights = {k: v.to(MERGE_DTYPE) if v.is_floating_point() else v
                       for k, v in load_peft_weights(str(adapter_dir), device="cpu").items()}
    base = peft_model.get_base_model()
    tied = set(getattr(base, "_tied_weights_keys", None) or {}) if base.config.tie_word_embeddings else set()
    writer = ShardWriter(out_dir, max_shard_bytes)
    in_a_layer = re.compile(rf"{re.escape(layers_prefix)}\.\d+\.")

    def write(items):
        for name, tensor in items:
            if name in tied:
                continue
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
                if not torch.isfinite(tensor).all():
                    raise MergeError(f"the merged {name} holds NaN or inf (in {dtype}): the adapter in {adapter_dir} "
                                     "is broken (a diverged training?) or its values overflow this dtype")
            writer.add(name, tensor.cpu())

    for index in tqdm(sorted(layers), desc="merging layers", unit="layer"):
        _materialise(base, layers[index], tensor_files, torch.device(device))
        # this layer's adapter tensors (and the few outside any layer, which PEFT expects every time), through
        # PEFT's own key mapping; every other layer's stay on meta
        layer_keys = f"{layers_prefix}.{index}."
        set_peft_model_state_dict(peft_model, {k: v for k, v in adapter_weights.items()
                                               if layer_keys in k or not in_a_layer.search(k)}, low_cpu_mem_usage=True)
        layer = base.get_submodule(f"{layers_prefix}.{index}")
        write(dense_tensors(layer, prefix=f"{layers_prefix}.{index}."))
        layer.to("meta")  # this layer's quantised and adapter tensors are freed before the next one is read
    write(dense_tensors(base, skip=layers_prefix))  # embeddings (token rows loaded by attach_adapter), norm, head
    writer.close()
    return base
