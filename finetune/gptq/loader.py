"""`load_model`: any Llama-family GPTQ checkpoint (a Hub repo at a branch, or a local directory) as a
transformers model whose quantised linears are `GPTQLinear`, ready for PEFT.

Order of work: resolve the source, validate the config and every shard's header (cheap: no tensor data),
build the model skeleton on the meta device (no full-precision allocation), swap in GPTQLinear, then read
the safetensors straight onto the target device, shard by shard.
"""

import json
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from .format import GPTQConfig, GPTQFormatError, default_g_idx, expected_shapes, read_gptq_config
from .layer import PACKED_TENSORS, GPTQLinear

# Files worth fetching from a Hub repo before its weights: enough to validate and describe it.
METADATA_PATTERNS = ["*.json", "tokenizer.model", "*.txt", "*.md"]
MEDITRON_BRANCHES = ("main", "gptq-4bit-128g-actorder_True", "gptq-4bit-32g-actorder_True",
                     "gptq-3bit--1g-actorder_True", "gptq-3bit-128g-actorder_True", "gptq-3bit-32g-actorder_True")


def resolve_source(source: str | Path, revision: str | None = None, weights: bool = True) -> Path:
    """A local directory as is; a Hub repo id downloaded (at `revision`, i.e. the branch) with huggingface_hub.
    With weights=False only config, tokenizer and index files are fetched."""
    path = Path(source).expanduser()
    if path.is_dir():
        if revision is not None:  # a folder has no branches: reading it anyway would ignore the revision
            raise GPTQFormatError(f"{source} is a local directory, but revision={revision!r} names a Hub branch; "
                                  "drop the revision, or pass the Hub repo id")
        return path
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise GPTQFormatError(f"{source}: not a model directory nor a Hub repo id like 'owner/name'; "
                              "check the path")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    patterns = METADATA_PATTERNS + (["*.safetensors"] if weights else [])
    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError:
        hint = f" (Meditron's branches: {', '.join(MEDITRON_BRANCHES)})" if "meditron" in str(source).lower() else ""
        raise GPTQFormatError(f"{source}: no branch {revision!r} on the Hub; pick an existing revision{hint}") from None
    except RepositoryNotFoundError:
        raise GPTQFormatError(f"{source}: no such Hub repo (or it is private: run `hf auth login`)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise GPTQFormatError(f"{source}: cannot download from the Hub ({type(err).__name__}); check the "
                              "network, or download the repo elsewhere and pass its local directory") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, or the single file; each must exist."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not names:
            raise GPTQFormatError(f"{model_dir}: no .safetensors weights; download them (the loader reads "
                                  "safetensors only)")
    missing = [n for n in names if not (model_dir / n).is_file()]
    if missing:
        raise GPTQFormatError(f"{model_dir}: shard {missing[0]} listed in model.safetensors.index.json is missing "
                              f"({len(missing)} of {len(names)}); finish the download")
    return [model_dir / n for n in names]


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the safetensors headers only."""
    shapes = {}
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def open_safetensors(file: Path):
    """safe_open, which checks the header and that the tensors cover the file exactly: a truncated or corrupted
    file fails here, naming itself."""
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as err:
        raise GPTQFormatError(f"{file} is truncated or corrupted ({' '.join(str(err).split())}); download or write "
                              "it again") from None


def quantised_linears(model: torch.nn.Module, shapes: dict[str, tuple], config: GPTQConfig) -> dict[str, torch.nn.Linear]:
    """The model's linears that the checkpoint stores quantised, after checking each tensor's shape."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or f"{name}.qweight" not in shapes:
            continue
        for tensor, shape in expected_shapes(config, module.in_features, module.out_features).items():
            actual = shapes.get(f"{name}.{tensor}")
            if actual is None and tensor == "g_idx":
                continue  # some writers omit g_idx without act-order; the default applies
            if actual != shape:
                raise GPTQFormatError(f"{name}.{tensor} has shape {actual}, expected {shape} for bits={config.bits}, "
                                      f"group_size={config.group_size}: the quantization config does not match "
                                      "the weights (fix config.json or re-download)")
        found[name] = module
    if not found:
        raise GPTQFormatError("no quantised linear (*.qweight) matches the model's modules; the checkpoint is not "
                              "GPTQ or its module names differ from the transformers architecture")
    return found


def default_device() -> torch.device:
    from accelerate import PartialState
    return PartialState().device  # this process's GPU under `accelerate launch`, else cuda:0 or cpu


def build_skeleton(model_dir: Path, gptq_config: GPTQConfig, shapes: dict[str, tuple], device: torch.device,
                   dtype: torch.dtype) -> torch.nn.Module:
    """The transformers model with its quantised linears swapped for GPTQLinear, every weight still on the meta
    device (nothing allocated): `load_model` fills it whole, the streaming merge one decoder layer at a time."""
    config = AutoConfig.from_pretrained(model_dir)
    config.quantization_config = None  # we apply it ourselves; transformers must not route it to optimum
    del config.quantization_config
    with init_empty_weights():  # parameters on meta, buffers (rotary inv_freq) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, linear in quantised_linears(model, shapes, gptq_config).items():
        parent_name, _, child = name.rpartition(".")
        layer = GPTQLinear(linear.in_features, linear.out_features, gptq_config, bias=f"{name}.bias" in shapes,
                           device="meta", dtype=dtype)
        if f"{name}.g_idx" not in shapes:
            layer.set_packed(g_idx=default_g_idx(linear.in_features, gptq_config.group_size, device))
        setattr(model.get_submodule(parent_name), child, layer)
    return model


def load_model(source: str | Path, revision: str | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, defer_packed: bool = False) -> torch.nn.Module:
    """Load a GPTQ causal LM with the project's trainable GPTQ layers.

    source: Hub repo id (downloaded at `revision`) or local directory. device: default this process's
    accelerator, else CPU. dtype: compute dtype of activations and unquantised weights; default bf16 on GPU,
    fp32 on CPU. defer_packed: leave the GPTQ packed tensors unread (see `defer`): a sharded run reads each rank's
    rows of them after sharding (`read_rows`). `model.gptq_bytes_read` counts the tensor bytes read."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model_dir = resolve_source(source, revision, weights=False)
    gptq_config = read_gptq_config(model_dir)
    if revision is not None or not Path(source).expanduser().is_dir():
        model_dir = resolve_source(source, revision, weights=True)
    files = weight_files(model_dir)
    model = build_skeleton(model_dir, gptq_config, tensor_shapes(files), device, dtype)
    model.gptq_bytes_read = _load_tensors(model, files, device, dtype, defer_packed)
    model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise GPTQFormatError(f"{model_dir}: the checkpoint lacks {still_meta[0]} ({len(still_meta)} tensors "
                              "missing); the download is incomplete or the architecture differs")
    model.to(device)  # buffers built on the CPU (rotary inv_freq) join the weights
    model.requires_grad_(False).eval()
    model.gptq_config = gptq_config
    model.name_or_path = str(source)
    model.config.name_or_path = str(source)
    return model


def _load_tensors(model: torch.nn.Module, files: list[Path], device: torch.device, dtype: torch.dtype,
                  defer_packed: bool = False) -> int:
    """Read each shard straight to `device`; float tensors take `dtype`, except GPTQ scales (kept fp16,
    the dequantisation rounds once to the compute dtype). With defer_packed, GPTQ packed tensors are left to
    `defer`. Returns the bytes read."""
    from tqdm.auto import tqdm
    expected = set(model.state_dict())
    packed = {f"{name}.{tensor}": (module, tensor) for name, module in model.named_modules()
              if isinstance(module, GPTQLinear) for tensor in PACKED_TENSORS} if defer_packed else {}
    read = 0
    for file in tqdm(files, desc="loading shards", disable=len(files) < 2):
        state = {}
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key not in expected:
                    continue  # e.g. rotary inv_freq saved by old writers
                if key in packed:
                    defer(*packed[key], PackedSource(file, key, tuple(f.get_slice(key).get_shape())), device)
                    continue
                tensor = f.get_tensor(key)
                read += tensor.numel() * tensor.element_size()
                if tensor.is_floating_point() and not key.endswith(".scales"):
                    tensor = tensor.to(dtype)
                state[key] = tensor
        model.load_state_dict(state, strict=False, assign=True)
    return read


class PackedSource(NamedTuple):
    """Where a GPTQ packed tensor lies: its safetensors file, key and (whole) shape."""

    file: Path
    key: str
    shape: tuple[int, ...]


def defer(layer: GPTQLinear, name: str, source: PackedSource, device: torch.device) -> None:
    """Leave `layer.<name>` unread: a placeholder of its shape and dtype that holds no memory (one element, expanded),
    on `device` so that PEFT puts the LoRA weights beside it; `layer.packed_sources[name]` says where to read it.
    The placeholder is never computed with: a sharded run swaps it for the rows its rank reads (`read_rows`)."""
    dtype = layer._parameters[name].dtype
    layer.set_packed(**{name: torch.zeros((), dtype=dtype, device=device).expand(source.shape)})
    layer.__dict__.setdefault("packed_sources", {})[name] = source


def read_rows(opened, source: PackedSource, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a packed tensor, read from its file (`opened`: `open_safetensors(source.file)`) alone:
    safetensors maps the file and copies just those rows' bytes."""
    return opened.get_slice(source.key)[start:stop]
