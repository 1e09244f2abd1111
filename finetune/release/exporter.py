"""Export a training run as a LoRA adapter, as merged dense weights, or as merged weights re-quantised with GPTQ.

    adapter  the PEFT adapter (with its trained ChatML token rows), the tokenizer and its chat template, a card
    merged   the adapter merged into the dequantised GPTQ base (finetune.release.merge, one layer at a time), sharded
             bf16/fp16 safetensors that plain transformers loads; parity.json; a card
    gptq     the merged model re-quantised by gptqmodel (finetune.models.quantize), calibrated on the run's training
             data, in the GPTQ v1 format; parity.json; a card

Every check that can fail on the user's input runs first (the run, its adapter and base, the options, the free
disk for the estimated size, the data for calibration and parity); then the export is written into a hidden
sibling of output_dir and renamed into place at the end, so a failed or killed export leaves no partial target.
"""

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils.hub import convert_file_size_to_int

from .. import load_model
from ..config.files import remove_dead_staging
from ..config.recipe import RecipeError
from ..gptq.checkpoint_info import CheckpointInfo, describe_checkpoint
from ..gptq.format import SUPPORTED_BITS, read_gptq_config
from ..gptq.loader import resolve_source
from ..models.adapter import ADAPTER_WEIGHTS, adapter_vocab_size, attach_adapter, read_adapter_config
from ..models.builtin import BUILTIN_MODELS
from ..training.sft import load_training_data, model_source
from .merge import MergeError, stream_merge
from .model_card import build_model_card, read_evaluation, validate_card
from .parity import held_out_prompts, parity_report

KINDS = ("adapter", "merged", "gptq")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ADAPTER_FILES = ("adapter_config.json", ADAPTER_WEIGHTS)


class ExportError(RecipeError):
    """A bad export input, or a failure while writing; one line naming the cause and the fix."""


@dataclass
class ExportOptions:
    kind: str = MISSING  # adapter | merged | gptq
    overwrite: bool = False  # replace an existing output_dir
    dtype: str = "bfloat16"  # merged weights (and gptq's merged intermediate): bfloat16, float16 or float32
    max_shard_size: str = "2GB"  # bounds the merge's memory: one shard is held before it is written
    bits: int = 4  # gptq: 2, 3, 4 or 8
    group_size: int = 128  # gptq: rows per scale, -1 for one group
    desc_act: bool = True  # gptq: act-order
    sym: bool = True  # gptq: symmetric zero points
    calibration_samples: int = 128  # gptq: training examples the quantiser calibrates on
    parity_prompts: int = 16  # merged / gptq: held-out prompts of the parity check; 0 skips it
    parity_max_tokens: int = 512  # longer prompts keep their last tokens
    device: Optional[str] = None  # where layers are merged and parity runs; null: cuda if available, else cpu
    eval_summary: Optional[str] = None  # an evaluation's summary.json for the card; null: the run's newest
    repo_id: Optional[str] = None  # the Hub repo named in the card's usage example (publish.py fills it in)


@dataclass
class ExportConfig:
    run: str = MISSING  # the training run directory (config.yaml, adapter/)
    output_dir: str = MISSING
    export: ExportOptions = field(default_factory=ExportOptions)


@dataclass
class Run:
    path: Path
    cfg: DictConfig  # its resolved recipe
    adapter_dir: Path
    adapter_config: dict
    source: str | Path  # the GPTQ base: Hub id or local directory
    revision: str | None


def read_run(run: str) -> Run:
    """The run's recipe and adapter, after checking the adapter was trained on the recipe's model."""
    path = Path(run).expanduser()
    if not (path / "config.yaml").is_file():
        raise ExportError(f"run={run} has no config.yaml; pass a training run directory (train.py output_dir)")
    adapter_dir = path / "adapter"
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise ExportError(f"no adapter in run {run}: {adapter_dir / missing[0]} is missing; let the training "
                          "finish (it saves adapter/ at the end), or pass the run that holds one")
    cfg = OmegaConf.load(path / "config.yaml")
    adapter_config = read_adapter_config(adapter_dir)
    trained_on = adapter_config.get("base_model_name_or_path")
    if cfg.model.name in BUILTIN_MODELS and trained_on and Path(trained_on).is_dir() and \
            Path(trained_on).name.startswith(f"{cfg.model.name}-"):
        source = Path(trained_on)  # the very build of the built-in model it was trained on, still in the cache
    else:
        source = model_source(cfg)  # a built-in model is built (once) if the cache lacks it
    same = trained_on in (str(source), cfg.model.name) or (
        trained_on and Path(str(source)).is_dir() and Path(trained_on).expanduser().resolve() == Path(source).resolve())
    if not same or adapter_config.get("revision") not in (None, cfg.model.revision):
        raise ExportError(f"the adapter in {adapter_dir} was trained on {trained_on}"
                          f"@{adapter_config.get('revision') or 'main'}, but the run's config.yaml names "
                          f"{source}@{cfg.model.revision or 'main'}; pass the run that produced this adapter")
    return Run(path, cfg, adapter_dir, adapter_config, source, cfg.model.revision)


def check_options(cfg: DictConfig) -> None:
    opts = cfg.export
    if opts.kind not in KINDS:
        raise ExportError(f"export.kind={opts.kind!r} is not one of {', '.join(KINDS)}")
    if opts.dtype not in DTYPES:
        raise ExportError(f"export.dtype={opts.dtype!r} is not one of {', '.join(DTYPES)}")
    if opts.bits not in SUPPORTED_BITS:
        raise ExportError(f"export.bits={opts.bits} is not one of {', '.join(map(str, SUPPORTED_BITS))}")
    if opts.group_size != -1 and opts.group_size < 1:
        raise ExportError(f"export.group_size={opts.group_size}: use -1 (one group) or a row count such as 128")
    for key, minimum in (("parity_prompts", 0), ("calibration_samples", 1), ("parity_max_tokens", 1)):
        if opts[key] < minimum:
            raise ExportError(f"export.{key}={opts[key]} must be at least {minimum}")
    try:
        convert_file_size_to_int(opts.max_shard_size)
    except ValueError:
        raise ExportError(f"export.max_shard_size={opts.max_shard_size!r}: use a size such as 2GB or 500MB") from None
    if opts.kind == "gptq":
        from ..models.quantize import import_gptqmodel
        try:
            import_gptqmodel()
        except ModuleNotFoundError as err:
            raise ExportError(str(err)) from None


def check_output_dir(out: Path, run: Run, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"output_dir {out} already exists; pass export.overwrite=true to replace it, or "
                          "another output_dir")
    if out.resolve() == run.path.resolve() or out.resolve() in run.path.resolve().parents:
        raise ExportError(f"output_dir {out} would replace the run itself; choose a directory outside {run.path}")


def estimate_bytes(info: CheckpointInfo, kind: str, opts: DictConfig, added_rows: int, adapter_bytes: int) -> int:
    """Disk the export needs: the adapter; the dense merged weights; or the merged intermediate plus the GPTQ
    weights (estimated from the checkpoint's tensor shapes)."""
    if kind == "adapter":
        return adapter_bytes
    quantised, dense_numel, gptq_bytes = set(info.quantised_modules), 0, 0
    for module in quantised:
        rows, out_features = info.tensors[f"{module}.qweight"][1]
        in_features = rows * 32 // info.gptq.bits
        groups = 1 if opts.group_size == -1 else -(-in_features // opts.group_size)
        dense_numel += in_features * out_features
        gptq_bytes += in_features * out_features * opts.bits // 8 + groups * out_features * 3 + 4 * in_features
    for name, (_, shape) in info.tensors.items():
        if name.rsplit(".", 1)[0] not in quantised or name.endswith(".bias"):
            dense_numel += info.tensor_numel(name)
            gptq_bytes += 2 * info.tensor_numel(name)
    added = added_rows * info.shape.hidden * 2
    merged_bytes = (dense_numel + added) * DTYPES[opts.dtype].itemsize
    return merged_bytes if kind == "merged" else merged_bytes + gptq_bytes + 2 * added


def check_free_disk(path: Path, needed: int, what: str) -> None:
    existing = next(p for p in [path, *path.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ExportError(f"not enough free disk for {what}: it needs about {needed / 1e9:.2f} GB, {existing} has "
                          f"{free / 1e9:.2f} GB free; free some space or choose an output_dir on a larger disk")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _device(opts: DictConfig) -> torch.device:
    return torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _save_tokenizer(run: Run, out: Path):
    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
    tokenizer.save_pretrained(out)
    return tokenizer


def _write_merged(run: Run, base_dir: Path, out: Path, opts: DictConfig) -> None:
    """Merged weights, config.json (no quantization_config), generation config and tokenizer into `out`."""
    out.mkdir(parents=True)
    dtype = DTYPES[opts.dtype]
    merged = stream_merge(base_dir, read_gptq_config(base_dir), run.adapter_dir, out, dtype,
                          convert_file_size_to_int(opts.max_shard_size), _device(opts))
    config = merged.config
    config.dtype, config.architectures = dtype, [type(merged).__name__]
    config.name_or_path = ""
    config.save_pretrained(out)
    if (base_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(base_dir).save_pretrained(out)
    _save_tokenizer(run, out)


def _parity(run: Run, out: Path, kind: str, opts: DictConfig, prompts: tuple[list[str], str]) -> dict:
    device = _device(opts)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: the weights' rounding only

    def reference():
        return attach_adapter(load_model(run.source, run.revision, device=device, dtype=dtype), run.adapter_dir).eval()

    def candidate():
        if kind == "gptq":
            return load_model(out, device=device, dtype=dtype)
        # a dense 70B does not fit one GPU: accelerate spreads it over the GPUs and host memory
        device_map = "auto" if device.type == "cuda" else str(device)
        return AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map=device_map).eval()

    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
    report = parity_report(reference, candidate, tokenizer, prompts[0], opts.parity_max_tokens)
    report.update(prompt_source=prompts[1], reference=f"adapter on {run.source}@{run.revision or 'main'}",
                  export=kind, device=str(device), compute_dtype=str(dtype).removeprefix("torch."))
    (out / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _evaluation_summary(run: Run, opts: DictConfig) -> Path | None:
    if opts.eval_summary:
        path = Path(opts.eval_summary).expanduser()
        if not path.is_file():
            raise ExportError(f"export.eval_summary={opts.eval_summary}: no such file; pass an evaluation's "
                              "summary.json or leave it unset")
        return path
    found = [p for p in run.path.rglob("summary.json") if "checkpoints" not in p.parts]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def _write_card(run: Run, out: Path, cfg: DictConfig, parity: dict | None, summary: Path | None) -> None:
    opts = cfg.export
    settings = {"kind": opts.kind}
    if opts.kind != "adapter":
        settings["dtype"] = opts.dtype
    if opts.kind == "gptq":
        settings.update(bits=opts.bits, group_size=opts.group_size, desc_act=opts.desc_act, sym=opts.sym,
                        checkpoint_format="gptq (v1)", calibration=f"{opts.calibration_samples} training examples")
    metrics_path = run.path / "metrics.json"
    losses = json.loads(metrics_path.read_text()).get("loss", []) if metrics_path.is_file() else []
    card = build_model_card(
        kind=opts.kind, name=Path(cfg.output_dir).name, run_cfg=run.cfg, base_model=str(run.cfg.model.name),
        revision=run.revision,
        base_quantisation=read_gptq_config(resolve_source(run.source, run.revision, weights=False)),
        adapter_config=run.adapter_config, export_settings=settings, parity=parity,
        evaluation=read_evaluation(summary), final_loss=losses[-1]["loss"] if losses else None, repo_id=opts.repo_id)
    validate_card(card).save(out / "README.md")


def _write_adapter(run: Run, out: Path) -> None:
    out.mkdir(parents=True)
    shutil.copy2(run.adapter_dir / ADAPTER_WEIGHTS, out)
    adapter_config = dict(run.adapter_config, revision=run.adapter_config.get("revision") or run.revision)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    _save_tokenizer(run, out)


def export(cfg: DictConfig) -> Path:
    """Check everything, then write the export into output_dir; returns it."""
    check_options(cfg)
    opts, out = cfg.export, Path(cfg.output_dir).expanduser()
    run = read_run(cfg.run)
    check_output_dir(out, run, opts.overwrite)
    info = describe_checkpoint(str(run.source), run.revision)
    added_rows = adapter_vocab_size(run.adapter_dir, info.shape.vocab) - info.shape.vocab
    needed = estimate_bytes(info, opts.kind, opts, added_rows, _dir_bytes(run.adapter_dir))
    check_free_disk(out.parent, needed, f"the {opts.kind} export")
    summary = _evaluation_summary(run, opts)
    calibration = None
    if opts.kind == "gptq":
        dataset, _ = load_training_data(run.cfg)
        dataset = dataset.shuffle(seed=run.cfg.seed).select(range(min(opts.calibration_samples, len(dataset))))
        calibration = [example["prompt"] + example["completion"] for example in dataset]
    prompts = held_out_prompts(run.cfg, opts.parity_prompts) if opts.kind != "adapter" and opts.parity_prompts \
        else None

    remove_dead_staging(out.parent, f".{out.name}.export-*")  # left by killed exports
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    intermediate = out.parent / f".{out.name}.export-merged-{os.getpid()}"
    try:
        if opts.kind == "adapter":
            _write_adapter(run, staging)
        else:
            base_dir = resolve_source(run.source, run.revision, weights=True)
            if opts.kind == "merged":
                _write_merged(run, base_dir, staging, opts)
            else:
                from ..models.quantize import quantize_to_gptq
                _write_merged(run, base_dir, intermediate, opts)
                tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
                quantize_to_gptq(intermediate, staging, bits=opts.bits, group_size=opts.group_size,
                                 desc_act=opts.desc_act, sym=opts.sym, checkpoint_format="gptq",
                                 calibration_texts=calibration, tokenizer=tokenizer)
                shutil.rmtree(intermediate)
                tokenizer.save_pretrained(staging)  # the chat template, whatever the quantiser saved
        parity = _parity(run, staging, opts.kind, opts, prompts) if prompts else None
        _write_card(run, staging, cfg, parity, summary)
        if out.exists():  # overwrite=true, checked above: the old export goes only once the new one is whole
            old = out.parent / f".{out.name}.export-old-{os.getpid()}"
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except MergeError as err:
        raise ExportError(f"{err}; nothing was written to {out}") from None
    except (OSError, SafetensorError) as err:
        raise ExportError(f"the export failed while writing ({' '.join(str(err).split())}); nothing was written "
                          f"to {out}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(intermediate, ignore_errors=True)
    return out
