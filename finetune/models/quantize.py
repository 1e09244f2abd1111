"""Quantise a full-precision transformers model directory to GPTQ with gptqmodel (the `quantize` extra).

Builds the `smoke` recipe's SmolLM2 and the test fixtures, and re-quantises merged weights on export. The
default output is the v1 checkpoint format of TheBloke's Meditron branches (checkpoint_format "gptq":
zero points stored minus one), which every GPTQ loader reads, this toolkit's included.
"""

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from ..gptq.format import GPTQConfig, GPTQFormatError, read_gptq_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def import_gptqmodel():
    """gptqmodel, imported with at least two CPU workers: its default, one per two cores, stalls quantisation
    on a 2-core machine. Set GPTQMODEL_CPU_WORKERS to override."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(12, max(2, os.cpu_count() or 2))))
    try:
        import gptqmodel
    except ModuleNotFoundError:
        raise ModuleNotFoundError("gptqmodel is not installed; quantising needs the extra: "
                                  "pip install -e '.[quantize]'") from None
    return gptqmodel


def compute_dtype(checkpoint_dtype: torch.dtype) -> torch.dtype:
    """The dtype gptqmodel computes in while quantising: the checkpoint's own on a GPU; float32 on the CPU, where
    half-precision matmuls run without native support (on the 2-core AVX-512 CI machine fp16 is ~90x and bf16 ~3x
    slower than fp32; SmolLM2-135M took ~7 min in fp16). Either way the saved checkpoint keeps its own dtype:
    fp16 and bf16 weights go through fp32 and back unchanged."""
    return checkpoint_dtype if torch.cuda.is_available() else torch.float32


def _cast_saved(out_dir: Path, dtype: torch.dtype) -> None:
    """Give a checkpoint that gptqmodel saved in float32 back its own dtype: every float32 tensor (the weights left
    dense; GPTQ's scales are fp16 already) and config.json's dtype, and the index's total size if it is sharded."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    total = 0
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        tensors = {name: t.to(dtype) if t.dtype == torch.float32 else t for name, t in load_file(path).items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, path, metadata=metadata)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    index_path = out_dir / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index.setdefault("metadata", {})["total_size"] = total
        index_path.write_text(json.dumps(index, indent=2) + "\n")


def _check_source(model_dir: Path) -> dict:
    """The source model's config.json, after checking it is a full-precision model gptqmodel can load."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a transformers model directory "
                                "(save_pretrained output)")
    config = json.loads(config_path.read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{model_dir} is already quantised ({method}); pass the full-precision model "
                         "(merge or dequantise first)")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise FileNotFoundError(f"{model_dir}: no weights (*.safetensors or *.bin); save the model there first")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{model_dir}: no tokenizer (gptqmodel loads it with the weights); "
                                "save it there with tokenizer.save_pretrained")
    return config


def quantize_to_gptq(model_dir: str | Path, out_dir: str | Path, *, bits: int, group_size: int, desc_act: bool,
                     calibration_texts: Sequence[str], sym: bool = True, checkpoint_format: str = "gptq",
                     tokenizer=None, block_size: int = 512, **gptqmodel_options) -> Path:
    """Quantise the model in `model_dir` with GPTQ and save it to `out_dir` (which must not exist).

    bits: 2, 3, 4 or 8. group_size: rows sharing a scale, -1 for one group. desc_act: act-order (rows
    quantised by decreasing activation; g_idx saved). calibration_texts: text the model runs on to measure
    activations; as in GPTQ's reference calibration they are tokenised (by `tokenizer`, default the model's),
    concatenated and cut into blocks of `block_size` tokens, so short texts cost no per-sample overhead.
    checkpoint_format: "gptq" (v1, zeros stored minus one) or "gptq_v2". gptqmodel_options: further
    gptqmodel QuantizeConfig fields (e.g. mse=2.4 to search each group's clipping range).
    Saves weights, config.json (with quantization_config) and tokenizer; returns `out_dir`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    target = GPTQConfig.from_dict({"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
                                   "checkpoint_format": checkpoint_format}, origin="quantize_to_gptq")
    source_config = _check_source(model_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another output directory")
    texts = [t for t in calibration_texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("calibration_texts is empty; pass some text in the model's domain (a few hundred "
                         "paragraphs is plenty)")

    gptqmodel = import_gptqmodel()
    if tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = [token for text in texts for token in tokenizer(text).input_ids]
    blocks = [stream[start:start + block_size] for start in range(0, len(stream), block_size)]
    calibration = [{"input_ids": block, "attention_mask": [1] * len(block)} for block in blocks]

    quantize_config = gptqmodel.QuantizeConfig(
        bits=target.bits, group_size=target.group_size, desc_act=target.desc_act, sym=target.sym,
        format=target.checkpoint_format,
        # gptqmodel's default group-aware reordering is neither v1 act-order nor supported without groups;
        # the Meditron branches were made with classic act-order (desc_act) or none.
        act_group_aware=False, **gptqmodel_options)
    # Saved in the checkpoint's own precision (gptqmodel would pick bf16 on CPU, which rounds fp16 weights);
    # computed in it on a GPU, in float32 on the CPU (see compute_dtype).
    dtype = getattr(torch, source_config.get("dtype") or source_config.get("torch_dtype") or "float16")
    model = gptqmodel.GPTQModel.load(str(model_dir), quantize_config, dtype=compute_dtype(dtype))
    model.quantize(calibration, calibration_data_min_length=1)

    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save(str(staging))
        if compute_dtype(dtype) != dtype:
            _cast_saved(staging, dtype)
        saved = read_gptq_config(staging)
        if (saved.bits, saved.group_size, saved.desc_act, saved.sym, saved.checkpoint_format) != \
                (target.bits, target.group_size, target.desc_act, target.sym, target.checkpoint_format):
            raise GPTQFormatError(f"gptqmodel {gptqmodel.__version__} saved {saved}, not the requested {target}; "
                                  "install the pinned version: pip install -e '.[quantize]'")
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
