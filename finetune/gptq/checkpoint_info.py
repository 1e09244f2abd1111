"""Describe a GPTQ checkpoint before anyone downloads it: quantisation settings, shards, quantised
modules, and the estimated GPU memory to LoRA-train it.

For a Hub repo only config.json and the safetensors headers are fetched (huggingface_hub reads headers
with ranged requests), never the weights; a local directory's headers are read from disk.
"""

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig

from .format import GPTQConfig, read_gptq_config
from .loader import open_safetensors, resolve_source, weight_files
from .memory import FAST_PATH_HEADROOM_BYTES, GIB, ModelShape, estimate_lora_training_memory

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class CheckpointInfo:
    source: str
    revision: str | None
    gptq: GPTQConfig
    shape: ModelShape
    shard_bytes: dict[str, int]
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)
    memory_gib: dict[str, float] = field(default_factory=dict)

    @property
    def quantised_modules(self) -> list[str]:
        return sorted(name[: -len(".qweight")] for name in self.tensors if name.endswith(".qweight"))

    def tensor_numel(self, name: str) -> int:
        return math.prod(self.tensors[name][1])

    def tensor_bytes(self, name: str) -> int:
        return self.tensor_numel(name) * DTYPE_BYTES.get(self.tensors[name][0], 2)


def _local_tensors(model_dir: Path) -> tuple[dict, dict]:
    tensors, sizes = {}, {}
    for file in weight_files(model_dir):
        sizes[file.name] = file.stat().st_size
        with open_safetensors(file) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                tensors[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return tensors, sizes


def _hub_tensors(repo_id: str, revision: str | None) -> tuple[dict, dict]:
    from huggingface_hub import HfApi
    meta = HfApi().get_safetensors_metadata(repo_id, revision=revision)
    tensors, sizes = {}, {}
    for name, file_meta in meta.files_metadata.items():
        sizes[name] = sum(t.data_offsets[1] - t.data_offsets[0] for t in file_meta.tensors.values())
        for key, info in file_meta.tensors.items():
            tensors[key] = (info.dtype, tuple(info.shape))
    return tensors, sizes


def describe_checkpoint(source: str, revision: str | None = None, seq_len: int = 4096, lora_r: int = 16,
                        gpus: int = 1, lora_targets: tuple[str, ...] | None = None) -> CheckpointInfo:
    """The checkpoint's settings, shards and modules; memory_gib per GPU when sharded over `gpus` (FSDP2), for LoRA
    on `lora_targets` (default: all seven projections)."""
    model_dir = resolve_source(source, revision, weights=False)
    gptq = read_gptq_config(model_dir)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    local = Path(source).expanduser().is_dir()
    tensors, sizes = _local_tensors(model_dir) if local else _hub_tensors(source, revision)
    info = CheckpointInfo(source, revision, gptq, shape, sizes, tensors)
    quantised_modules = set(info.quantised_modules)
    in_quantised = {n: n.rsplit(".", 1)[0] in quantised_modules for n in tensors}
    quantised = sum(info.tensor_bytes(n) for n, q in in_quantised.items() if q)
    dense_params = sum(info.tensor_numel(n) for n, q in in_quantised.items() if not q)
    info.memory_gib = estimate_lora_training_memory(shape, quantised, dense_params, seq_len, lora_r, lora_targets,
                                                    gpus=gpus)
    return info


def format_report(info: CheckpointInfo, seq_len: int, lora_r: int, gpus: int = 1) -> str:
    g = info.gptq
    group = "none (one group per column)" if g.group_size == -1 else str(g.group_size)
    fmt = {"gptq": "gptq (v1: zeros stored minus one)", "gptq_v2": "gptq_v2"}[g.checkpoint_format]
    lines = [f"{info.source}" + (f" @ {info.revision}" if info.revision else ""),
             f"  bits {g.bits} · group {group} · act-order {'yes' if g.desc_act else 'no'} · "
             f"{'symmetric' if g.sym else 'asymmetric'} · format {fmt}",
             f"  shape: {info.shape.layers} layers, hidden {info.shape.hidden}, FFN {info.shape.intermediate}, "
             f"{info.shape.heads} heads / {info.shape.kv_heads} KV heads, vocab {info.shape.vocab}",
             f"  shards ({len(info.shard_bytes)}, {_size(sum(info.shard_bytes.values()))}):"]
    lines += [f"    {name}  {_size(size)}" for name, size in sorted(info.shard_bytes.items())]
    kinds = Counter(re.sub(r"\.\d+\.", ".N.", m) for m in info.quantised_modules)
    lines.append(f"  quantised modules ({len(info.quantised_modules)}):")
    lines += [f"    {pattern} ×{count}" for pattern, count in sorted(kinds.items())]
    dense = sorted({n.rsplit(".", 1)[0] for n in info.tensors} - set(info.quantised_modules))
    dense_kinds = Counter(re.sub(r"\.\d+\.", ".N.", m) for m in dense)
    lines.append("  unquantised: " + ", ".join(f"{p} ×{c}" if c > 1 else p for p, c in sorted(dense_kinds.items())))
    plan = f", per GPU of {gpus} sharded with FSDP2" if gpus > 1 else ""
    lines.append(f"  estimated GPU memory to LoRA-train (r={lora_r}, seq {seq_len}, bf16, gradient checkpointing{plan}):")
    lines += [f"    {term:<28} {gib:7.2f} GiB" for term, gib in info.memory_gib.items() if term != "total"]
    lines.append(f"    {'total':<28} {info.memory_gib['total']:7.2f} GiB")
    if gpus > 1:  # the check before loading refuses a gpu.memory_budget_gib below this with the fast path on
        headroom = FAST_PATH_HEADROOM_BYTES / GIB
        lines.append(f"    {'with the fast GPU path':<28} {info.memory_gib['total'] + headroom:7.2f} GiB "
                     f"(+{headroom:g} GiB headroom; gpu.fast_path=false needs the total)")
    return "\n".join(lines)


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.2f} MB"
