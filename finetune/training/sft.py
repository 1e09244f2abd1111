"""One LoRA SFT run on a GPTQ model, assembled from the libraries' own pieces:

    tokenizer        AutoTokenizer + chatml.prepare_tokenizer (ChatML template; adds <|im_start|>/<|im_end|>
                     where the vocabulary lacks them)
    model            finetune.load_model (GPTQLinear layers), embeddings resized for added tokens
    adapter          PEFT LoraConfig; added tokens train only their own embedding / lm_head rows
                     (trainable_token_indices), saved with the adapter
    trainer          TRL SFTTrainer on prompt-completion pairs: loss on the answer and its <|im_end|> only;
                     packing is padding-free (position_ids restart per example, so attention stays inside it)

Everything that can fail on a user's input (recipe values, model source and branch, LoRA targets, data, a memory
budget below the model) is checked in `prepare`, before any weight is loaded; a budget the fast path's recompute plan
cannot fit is known only once a layer is measured on the GPU, and fails then in one line naming the smallest that
fits.
"""

import json
import math
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState, init_empty_weights
from accelerate.utils import FullyShardedDataParallelPlugin
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig
from peft.utils.other import TrainableTokensWrapper
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_scheduler, set_seed
from trl import SFTConfig, SFTTrainer

from .. import load_model
from ..config.files import LockHeld, hold_lock
from ..config.recipe import (
    CHECKPOINTS,
    RUN_LOCK,
    RecipeError,
    check_gpu_settings,
    check_lora_settings,
    check_profile_step,
    check_run_dir,
)
from ..data import chatml
from ..data.registry import load_benchmark, resolve_options
from ..evaluation.benchmarks import eval_batch_size
from ..gptq.format import read_gptq_config
from ..gptq.loader import resolve_source, tensor_shapes, weight_files
from ..gptq.memory import GIB
from ..models.adapter import peft_without_gptqmodel
from ..models.source import model_source
from . import budget, fsdp
from .eval_callback import SliceAccuracyCallback, training_slice
from .host_steps import frozen_heap, skip_unchanged_mode_switch
from .profile import ProfileStep
from .run_report import RunReport, save_adapter, save_config

DATA_ENTRY_KEYS = ("benchmark", "split", "source", "explanation", "options")


@dataclass
class Prepared:
    """What `prepare` checked and loaded: everything a run needs except the model weights."""

    cfg: DictConfig
    model_source: str | Path
    model_dir: Path  # config and tokenizer files
    dataset: Dataset
    data_report: dict
    resume_from: Path | None
    eval_slice: tuple[str, list]  # eval.during_training: (benchmark, items), no items when off
    fsdp: FullyShardedDataParallelPlugin | None = None  # launched with accelerate_fsdp.yaml: weights sharded


def check_model(cfg: DictConfig, source: str | Path) -> Path:
    """Resolve the source (a wrong Hub branch fails here, before any weight is fetched), read a local model's
    safetensors headers (a truncated or corrupted shard fails here, naming it) and check each LoRA target against
    the linear layers of the model's skeleton, built on the meta device."""
    model_dir = resolve_source(source, cfg.model.revision, weights=False)
    read_gptq_config(model_dir)
    if Path(source).expanduser().is_dir():
        tensor_shapes(weight_files(model_dir))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    output = skeleton.get_output_embeddings()
    linears = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                      if isinstance(module, torch.nn.Linear) and module is not output})
    for target in cfg.lora.target_modules:
        if target not in linears:
            raise RecipeError(f"lora.target_modules: {target!r} is not a linear layer of {cfg.model.name}; "
                              f"pick from {', '.join(linears)}")
    return model_dir


def load_training_data(cfg: DictConfig) -> tuple[Dataset, dict]:
    """Every `data.train` entry as prompt-completion pairs (chatml.training_example), concatenated; and the
    report of what was read and skipped, for metrics.json."""
    if not cfg.data.train:
        raise RecipeError("data.train is empty; add an entry, e.g. "
                          "+data.train.medqa={benchmark:medqa4,split:train,source:hub}")
    examples, report = [], {}
    for label, entry in OmegaConf.to_container(cfg.data.train).items():
        unknown = sorted(set(entry) - set(DATA_ENTRY_KEYS)) if isinstance(entry, dict) else ["(not a mapping)"]
        if unknown or "benchmark" not in entry:
            raise RecipeError(f"data.train.{label}: {'unknown key ' + repr(unknown[0]) if unknown else 'no benchmark'};"
                              f" an entry has {', '.join(DATA_ENTRY_KEYS)}")
        options = resolve_options(entry.get("options"))
        try:
            split = load_benchmark(entry["benchmark"], entry.get("split"), source=entry.get("source", "local"),
                                   data_root=cfg.data.data_root, on_bad_row=cfg.data.on_bad_row, **options)
        except (ValueError, TypeError) as err:  # the loaders' one-line errors; TypeError: an unknown option
            raise RecipeError(f"data.train.{label}: {err}") from None
        examples += [chatml.training_example(item, system=cfg.data.system_prompt,
                                             with_explanation=bool(entry.get("explanation")))
                     for item in split]
        report[label] = {"benchmark": split.benchmark, "split": split.split, "source": split.source,
                         "examples": len(split), "skipped_rows": split.skipped, "skipped": split.bad_rows,
                         "dropped_without_explanation": split.dropped_without_explanation}
    if cfg.data.max_examples:
        examples = examples[: cfg.data.max_examples]
    if not examples:
        raise RecipeError("data.train yields no examples; check its splits and options")
    return Dataset.from_list(examples), report


def fast_path_runs(cfg: DictConfig) -> bool:
    """Whether finetune.gpu.fast_training plans this run: gpu.fast_path on, and this process on a CUDA GPU."""
    return bool(cfg.gpu.fast_path) and PartialState().device.type == "cuda"


def sft_config(cfg: DictConfig, output_dir: Path) -> SFTConfig:
    """`train` as TRL's SFTConfig, plus what the code decides: the seed, ChatML's end of turn, the
    completion-only loss, and (unless `train` says otherwise) bf16 and pinned memory on GPU only."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    train.pop("dry_run")
    on_gpu = PartialState().device.type == "cuda"
    if fast_path_runs(cfg):  # finetune.gpu.fast_training plans recompute per layer and applies liger itself
        train.update(activation_checkpointing=False, use_liger_kernel=False)
    try:
        # ddp_broadcast_buffers: the buffers (rotary tables) are identical on every GPU; no re-broadcast every step
        # (the GPTQ weights, once buffers re-broadcast at -6 % of 2-GPU speed, are now frozen parameters)
        return SFTConfig(**{"bf16": on_gpu, "dataloader_pin_memory": on_gpu, "ddp_broadcast_buffers": False, **train},
                         output_dir=str(output_dir),
                         run_name=Path(cfg.output_dir).name, seed=cfg.seed, eos_token=chatml.IM_END,
                         completion_only_loss=True)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"train: {' '.join(str(err).split())}") from None


def check_scheduler(args: SFTConfig) -> None:
    """The scheduler takes its kwargs (e.g. min_lr_rate is cosine_with_min_lr's, not cosine's); built on a
    dummy optimizer now rather than after the model has loaded."""
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    try:
        get_scheduler(args.lr_scheduler_type, dummy, num_warmup_steps=0, num_training_steps=10,
                      scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except TypeError as err:
        raise RecipeError(f"train.lr_scheduler_kwargs={args.lr_scheduler_kwargs} do not fit lr_scheduler_type="
                          f"{args.lr_scheduler_type.value} ({err}); change them, or drop them with "
                          "~train.lr_scheduler_kwargs") from None


def check_answers_fit(cfg: DictConfig, dataset: Dataset, model_dir: Path) -> int:
    """How many examples run past train.max_length, where the trainer cuts them and their answer with them (loss is
    only on the answer); an error when every answer is cut, since nothing would train. Tokenizer only: no weights."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chatml.prepare_tokenizer(tokenizer)
    prompts = list(dataset["prompt"])
    full = tokenizer([p + c for p, c in zip(prompts, dataset["completion"])])["input_ids"]
    prompts = tokenizer(prompts)["input_ids"]
    max_length = cfg.train.max_length
    cut = sum(len(ids) > max_length for ids in full)
    if all(len(ids) >= max_length for ids in prompts):
        longest = max(map(len, full))
        raise RecipeError(f"train.max_length={max_length} cuts every example before its answer, so nothing would "
                          f"train; raise it (the longest example is {longest} tokens)")
    if cut:
        print(f"note: {cut} of {len(full)} examples are longer than train.max_length={max_length} and lose the "
              "end of their answer; raise train.max_length to keep them whole")
    return cut


def prepare(cfg: DictConfig) -> Prepared:
    """All checks of a run, cheapest first; no weights are read and nothing is written."""
    resume_from = check_run_dir(cfg)
    check_lora_settings(cfg)
    check_profile_step(cfg)
    check_gpu_settings(cfg, on_gpu=PartialState().device.type == "cuda")
    plugin = fsdp.fsdp_plugin()
    if plugin is not None:
        fsdp.check_fsdp_setup(plugin)
        fsdp.check_all_gather(cfg.gpu.all_gather)
        if notice := fsdp.one_process_notice(PartialState().num_processes):
            PartialState().print(notice)
    check_scheduler(sft_config(cfg, Path(tempfile.gettempdir())))  # bad train.* fail now, not after loading 70B
    source = model_source(cfg)
    model_dir = check_model(cfg, source)
    if plugin is not None:
        budget.check_sharded_memory(cfg, source, PartialState().num_processes, fast_path=fast_path_runs(cfg))
    elif fast_path_runs(cfg):
        budget.check_one_gpu_memory(cfg, source)
    with PartialState().main_process_first():  # one process downloads and caches, the others read the cache
        dataset, data_report = load_training_data(cfg)
        check_answers_fit(cfg, dataset, model_dir)
        eval_slice = training_slice(cfg)
    return Prepared(cfg, source, model_dir, dataset, data_report, resume_from, eval_slice, plugin)


def load_model_and_tokenizer(prepared: Prepared):
    """The GPTQ model and its ChatML tokenizer; the ids of tokens the tokenizer had to add (maybe none)."""
    cfg = prepared.cfg
    tokenizer = AutoTokenizer.from_pretrained(prepared.model_dir)
    added_ids = chatml.prepare_tokenizer(tokenizer)
    # sharded: dense weights read to host memory, the GPTQ packed tensors left for fsdp.shard_model to read each
    # rank's rows of, straight to its GPU
    on_host = {"device": "cpu", "dtype": torch.bfloat16 if PartialState().device.type == "cuda" else None,
               "defer_packed": True}
    model = load_model(prepared.model_source, revision=cfg.model.revision, **(on_host if prepared.fsdp else {}))
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        set_seed(cfg.seed)  # the new rows start from a seeded draw around the mean embedding
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer, added_ids


def lora_config(cfg: DictConfig, model, added_ids: list[int]) -> LoraConfig:
    """LoRA on the target linears; added tokens train their embedding rows, and their lm_head rows too when the
    output layer is not tied to the embedding (Llama-2 / Meditron)."""
    trainable_tokens = None
    if added_ids:
        names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
        embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
        trainable_tokens = {names[embedding]: added_ids}
        if output.weight is not embedding.weight:
            trainable_tokens[names[output]] = added_ids
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM",
                      trainable_token_indices=trainable_tokens, revision=cfg.model.revision)


def build_trainer(prepared: Prepared, output_dir: Path, callbacks=()) -> SFTTrainer:
    cfg = prepared.cfg
    args = sft_config(cfg, output_dir)
    if "wandb" in args.report_to:
        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")  # no key: log locally, `wandb sync` later
        os.environ.setdefault("WANDB_DIR", cfg.output_dir)
        os.environ.setdefault("WANDB_PROJECT", "meditron-finetune")
    model, tokenizer, added_ids = load_model_and_tokenizer(prepared)
    with peft_without_gptqmodel():  # SFTTrainer wraps the model with LoRA
        trainer = SFTTrainer(model=model, args=args, train_dataset=prepared.dataset, processing_class=tokenizer,
                             peft_config=lora_config(cfg, model, added_ids), callbacks=list(callbacks))
    budget_gib = cfg.gpu.memory_budget_gib
    if prepared.fsdp is not None:  # sharded now, each rank reading its own rows; accelerate's prepare keeps it so
        fsdp.apply_memory_cap(budget_gib)
        fsdp.shard_model(trainer.accelerator, trainer.model, shard_adapters=cfg.gpu.shard_adapters)
        fsdp.gather_head_with_backbone(trainer.model)
        fsdp.prefetch_next_layer(trainer.model)
        if cfg.gpu.all_gather == "copy_engine":
            from ..gpu.copy_engine_gather import gather_with_copy_engines
            workspace_gib = gather_with_copy_engines(fsdp.sharded_decoder_layers(trainer.model)) / GIB
            if budget_gib is not None:  # the workspace is outside the caching allocator, so outside its cap
                budget_gib -= workspace_gib
                fsdp.apply_memory_cap(budget_gib)
            trainer.accelerator.print(
                f"sharded: decoder layers gathered by the GPUs' copy engines (a workspace of {workspace_gib:.2f} GiB "
                f"per GPU{', taken off gpu.memory_budget_gib' if budget_gib is not None else ''})")
    if fast_path_runs(cfg):
        from ..gpu.fast_training import enable_fast_training
        plan = enable_fast_training(trainer.model, seq_len=cfg.train.max_length, fused_loss=False,
                                    memory_budget_gib=budget_gib,
                                    host_memory_gib=cfg.gpu.host_memory_gib,
                                    packed=cfg.train.get("packing", False))
        trainer.accelerator.print(f"fast GPU path: {plan}")
        if plan["peft_lora_modules"]:  # also in metrics.json's fast_path
            trainer.accelerator.print("fast GPU path: " + "; ".join(
                f"{n} LoRA modules keep PEFT's slower forward: {why}" for why, n in plan["peft_lora_modules"].items()))
        if "host_memory_gib_to_recompute_fewer" in plan:  # also in metrics.json's fast_path
            gib, fewer = plan["host_memory_gib_to_recompute_fewer"]
            # one GPU: a recomputed layer costs its forward again; sharded, fewer host layers measured faster
            # (recompute_plan.SHARDED_HOST_SHARE), so no speed is promised there
            speed = "" if prepared.fsdp is not None else ", faster"
            trainer.accelerator.print(
                f"fast GPU path: {plan['recompute']} layers recompute because pinned host memory holds "
                f"{plan['host']} layers' activations ({plan['host_gib']} GiB); gpu.host_memory_gib={gib} (per process) "
                f"would recompute {fewer}{speed}, if this machine can pin it")
    skip_unchanged_mode_switch(trainer.model)
    head = trainer.model.get_output_embeddings()
    if isinstance(head, TrainableTokensWrapper):
        # TRL's fused loss reads lm_head.weight and lm_head.bias; PEFT's wrapper passes on only .weight (the
        # merged rows), so hand it the base layer's bias as a plain attribute (not a second parameter)
        object.__setattr__(head, "bias", head.token_adapter.base_layer.bias)
    return trainer


def is_final_checkpoint(checkpoint: Path, args: SFTConfig) -> bool:
    """Whether `checkpoint` is at the last step this run plans (train.max_steps, or the epochs it started with)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if args.max_steps > 0:
        return state["global_step"] >= args.max_steps
    return state["num_train_epochs"] == math.ceil(args.num_train_epochs) and state["global_step"] >= state["max_steps"]


def train(cfg: DictConfig, command: str = "", callbacks=()) -> SFTTrainer:
    """A full run into cfg.output_dir; resume=true continues from its last complete checkpoint. The main process
    holds the run directory's lock (RUN_LOCK) until the run ends: a second training on it is refused."""
    prepared = prepare(cfg)
    run_dir = Path(cfg.output_dir)
    state = PartialState()
    state.wait_for_everyone()  # every process has checked output_dir before the first one writes to it
    with ExitStack() as lock:
        if state.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                lock.enter_context(hold_lock(run_dir / RUN_LOCK))
            except LockHeld as held:  # started at the same moment as another run, which took it first
                raise RecipeError(f"output_dir {run_dir} is in use by a running training (process {held.holder}); "
                                  "wait for it to end, or pass another output_dir=...") from None
            save_config(cfg, run_dir, command)
        if cfg.resume and prepared.resume_from is None:
            state.print(f"resume=true: {run_dir} has no complete checkpoint yet, so the run starts at step 1")
        report = RunReport(run_dir, prepared.data_report, title=f"{run_dir.name}: {cfg.model.name}")
        trainer = build_trainer(prepared, run_dir / CHECKPOINTS, [report, *callbacks])
        benchmark, items = prepared.eval_slice
        if items:
            trainer.add_callback(SliceAccuracyCallback(trainer, benchmark, items,
                                                       cfg.eval.during_training.every_n_steps, eval_batch_size(cfg),
                                                       cfg.data.system_prompt))
        if cfg.profile_step is not None:
            trainer.add_callback(ProfileStep(cfg.profile_step, run_dir, state.process_index))
        if prepared.resume_from is not None and is_final_checkpoint(prepared.resume_from, trainer.args):
            # resumed at its last step, the Trainer would take one step more (it checks max_steps only after a
            # step): the run is done, and its final weights are the checkpoint's, loaded as the Trainer loads them
            if prepared.fsdp is not None:  # a sharded checkpoint: each rank reads its shard of the adapter
                fsdp.load_sharded_adapter(trainer, prepared.resume_from)
            else:
                trainer.model.load_adapter(str(prepared.resume_from), trainer.model.active_adapter, is_trainable=True)
        else:
            with frozen_heap() as freeze, report.timing_gc():
                trainer.add_callback(freeze)
                trainer.train(resume_from_checkpoint=str(prepared.resume_from) if prepared.resume_from else None)
        save_adapter(trainer, run_dir)
    return trainer
