"""Benchmark evaluation of a GPTQ model, alone or with a LoRA adapter, in three modes:

    loglik    each answer choice ("The answer is B.<|im_end|>") scored as the continuation of the question's
              ChatML prompt; the prompt runs once per question, all its choices after it in the same row under a
              tree attention mask (finetune.evaluation.scoring);
              the prediction is the argmax (also reported length-normalised, per character as lm-eval does)
    generate  greedy decoding up to eval.max_new_tokens, stopped at <|im_end|>, read by finetune.evaluation.answers
    sc        self-consistency: eval.sc.k samples at eval.sc.temperature, majority vote of the parsed answers
              (first-seen answer wins a tie; an unparseable sample never wins)

Everything a user can get wrong -- mode, benchmark names, data files and splits, the adapter and the base it
was trained on -- is checked in `prepare` before any weight is loaded.

`adapter=[none,runs/a,runs/b]` evaluates the base model and each adapter on the same questions, loading the base
once (each adapter is put on and taken off again with PEFT), one evaluation folder each under output_dir, and
writes their comparison (finetune.evaluation.compare) beside them.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import AutoTokenizer, set_seed

from .. import load_model
from ..config.recipe import check_gpu_settings
from ..data import chatml
from ..data.records import QAItem, QASplit
from ..gptq.format import read_gptq_config
from ..gptq.loader import resolve_source
from ..models.adapter import attach_adapter, read_adapter_config
from ..models.source import model_source
from .answers import parse_answer
from .benchmarks import BenchmarkSpec, EvalError, check_settings, eval_batch_size, load_items, paper_only
from .compare import COMPARISON_FILES, compare
from .report import build_manifest, reference_rates, write_results
from .scoring import OptionRequest, generate_texts, majority_vote, score_options, wilson_interval

# --- the adapter and its base ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    path: Path  # the PEFT folder (adapter_config.json, weights, maybe the tokenizer)
    given: str  # as the user passed it
    trained_on: str | None  # adapter_config.json's base_model_name_or_path
    trained_revision: str | None  # adapter_config.json's revision (exports record the branch there)
    run_config: DictConfig | None  # the training run's resolved recipe, where the adapter is a run's adapter/


def resolve_adapter(adapter: str) -> Adapter:
    """A training run directory (its adapter/), a PEFT adapter folder (an export), or a Hub repo id."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        if (path / "adapter" / "adapter_config.json").is_file():
            path = path / "adapter"
        elif not (path / "adapter_config.json").is_file():
            what = "a full model, not an adapter: evaluate it as model.name=" if (path / "config.json").is_file() \
                else "no adapter_config.json (nor the adapter/ of a training run): pass a run directory, an " \
                     "exported adapter or a Hub id instead of "
            raise EvalError(f"adapter={adapter} holds {what}{adapter}")
    elif adapter.count("/") == 1 and not adapter.startswith((".", "/", "~")):
        path = _download_adapter(adapter)
    else:
        raise EvalError(f"adapter={adapter}: no such directory, and not a Hub repo id like 'owner/name'")
    adapter_config = read_adapter_config(path)
    run_config = path.parent / "config.yaml"
    run_config = OmegaConf.load(run_config) if path.name == "adapter" and run_config.is_file() else None
    return Adapter(path, adapter, adapter_config.get("base_model_name_or_path"), adapter_config.get("revision"),
                   run_config)


def _download_adapter(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["adapter_*", "*.json", "*.model", "*.txt", "*.md"]))
    except Exception as err:  # not found, private, offline: the user gets one line and a fix
        raise EvalError(f"adapter={repo_id}: cannot download it from the Hub ({type(err).__name__}); check the id "
                        "and network, or pass a local adapter folder") from None


def check_base(adapter: Adapter, cfg: DictConfig, source: str | Path) -> None:
    """The adapter must have been trained on the recipe's model and branch, and be asked with the system prompt
    it was trained with: its training run's config says so exactly; without one, adapter_config.json's base
    model must name the same model."""
    fix = "pass the recipe it was trained with (recipe=...), or model.name=... model.revision=..."
    if adapter.run_config is not None:
        run = adapter.run_config
        trained = (run.model.name, run.model.revision or "main")
        wanted = (cfg.model.name, cfg.model.revision or "main")
        if trained != wanted:
            raise EvalError(f"adapter {adapter.given} was trained on {trained[0]}@{trained[1]}, but the recipe's model "
                            f"is {wanted[0]}@{wanted[1]}; {fix}")
        if run.data.system_prompt != cfg.data.system_prompt:
            raise EvalError(f"adapter {adapter.given} was trained with data.system_prompt={run.data.system_prompt!r}, "
                            f"but this evaluation asks with {cfg.data.system_prompt!r}; "
                            "pass the same data.system_prompt")
        return
    trained_on = adapter.trained_on
    same = trained_on is None or trained_on in (cfg.model.name, str(source)) or (
        Path(trained_on).name == Path(str(source)).name and Path(str(source)).is_dir())  # a moved cache folder
    if not same:
        raise EvalError(f"adapter {adapter.given} was trained on {trained_on} (adapter_config.json), but the "
                        f"recipe's model is {cfg.model.name}; {fix}")
    if adapter.trained_revision and adapter.trained_revision != (cfg.model.revision or "main"):
        raise EvalError(f"adapter {adapter.given} was trained on branch {adapter.trained_revision} (adapter_config"
                        f".json), but the recipe's model.revision is {cfg.model.revision or 'main'}; {fix}")


def load_base_model(cfg: DictConfig, source: str | Path):
    dtype = getattr(torch, cfg.eval.dtype) if cfg.eval.dtype else None
    model = load_model(source, revision=cfg.model.revision, dtype=dtype)
    if model.device.type == "cuda" and cfg.gpu.fast_path:
        from ..gpu.fast_training import apply_liger
        apply_liger(model)  # fused RoPE/RMSNorm/SwiGLU: 10 % less time at 70B shape (eval/BENCHMARKS.md)
    return model


def with_adapter(model, model_dir: Path, adapter: Adapter | None):
    """The base model with the adapter on it, in eval mode, and the ChatML tokenizer it was trained with."""
    has_tokenizer = adapter is not None and (adapter.path / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter.path if has_tokenizer else model_dir)
    chatml.prepare_tokenizer(tokenizer)  # a no-op on a tokenizer saved by training
    if adapter is not None:
        model = attach_adapter(model, adapter.path)
    elif len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # the base alone, asked in ChatML it never learned
    return model.eval(), tokenizer


# --- predictions ----------------------------------------------------------------------------------------------------


def _record(item: QAItem, prompt: str, output, answer: str | None) -> dict:
    return {"id": item.id, "group": item.subject,
            "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(), "output": output, "answer": answer,
            "gold": item.answer, "correct": answer == item.answer, "choices": chatml.answer_choices(item)}


def loglik_requests(tokenizer, items: list[QAItem], system: str | None = None
                    ) -> tuple[list[str], list[dict[str, str]], list[OptionRequest]]:
    """Each item's prompt, its choices (choice -> completion text) and their tokens, split as training splits
    prompt and completion (chatml.prompt_completion_ids)."""
    prompts, choices, requests = [], [], []
    for item in items:
        prompt = chatml.evaluation_prompt(item, system=system)
        completions = {c: chatml.render_answer(item, c) + chatml.IM_END for c in chatml.answer_choices(item)}
        ids = [chatml.prompt_completion_ids(tokenizer, prompt, completion) for completion in completions.values()]
        prompts.append(prompt)
        choices.append(completions)
        requests.append(OptionRequest(ids[0][0], [completion_ids for _, completion_ids in ids]))
    return prompts, choices, requests


def predict_loglik(model, tokenizer, items: list[QAItem], batch_size: int, system: str | None = None,
                   desc: str = "loglik") -> list[dict]:
    prompts, choices, requests = loglik_requests(tokenizer, items, system)
    scores = score_options(model, requests, batch_size, tokenizer.pad_token_id, desc=desc)
    records = []
    for item, prompt, options, logprobs in zip(items, prompts, choices, scores):
        best = max(range(len(logprobs)), key=logprobs.__getitem__)
        per_char = [lp / len(text) for lp, text in zip(logprobs, options.values())]
        best_norm = list(options)[max(range(len(per_char)), key=per_char.__getitem__)]
        record = _record(item, prompt, list(options.values())[best], list(options)[best])
        record.update(logprobs=dict(zip(options, logprobs)), answer_norm=best_norm,
                      correct_norm=best_norm == item.answer)
        records.append(record)
    return records


def predict_generate(model, tokenizer, items: list[QAItem], batch_size: int, max_new_tokens: int,
                     system: str | None = None, k: int = 1, temperature: float = 0.0,
                     desc: str = "generate") -> list[dict]:
    """Greedy (k=1, temperature 0) or sampled self-consistency (k samples, majority vote)."""
    prompts = [chatml.evaluation_prompt(item, system=system) for item in items]
    stop_ids = [tokenizer.convert_tokens_to_ids(chatml.IM_END)] + \
        ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    texts = generate_texts(model, tokenizer, [tokenizer(p)["input_ids"] for p in prompts], batch_size,
                           max_new_tokens, stop_ids, num_samples=k, temperature=temperature, desc=desc)
    records = []
    for item, prompt, samples in zip(items, prompts, texts):
        parsed = [parse_answer(text, item.options or None) for text in samples]
        if temperature > 0:
            record = _record(item, prompt, samples, majority_vote(parsed))
            record["votes"] = parsed
        else:
            record = _record(item, prompt, samples[0], parsed[0])
        records.append(record)
    return records


def predict(model, tokenizer, items: list[QAItem], cfg: DictConfig, desc: str) -> list[dict]:
    ev, system, batch_size = cfg.eval, cfg.data.system_prompt, eval_batch_size(cfg)
    with torch.inference_mode():
        if ev.mode == "loglik":
            return predict_loglik(model, tokenizer, items, batch_size, system, desc=desc)
        if ev.mode == "generate":
            return predict_generate(model, tokenizer, items, batch_size, ev.max_new_tokens, system, desc=desc)
        set_seed(ev.seed)  # per benchmark: its samples do not depend on which benchmarks ran before
        return predict_generate(model, tokenizer, items, batch_size, ev.max_new_tokens, system,
                                k=ev.sc.k, temperature=ev.sc.temperature, desc=desc)


# --- summary --------------------------------------------------------------------------------------------------------


def accuracy(correct: int, total: int) -> dict:
    low, high = wilson_interval(correct, total)
    return {"n": total, "correct": correct, "accuracy": correct / total if total else 0.0, "ci95": [low, high]}


def summarise(records: list[dict], spec: BenchmarkSpec, mode: str) -> dict:
    """Accuracy with its 95% Wilson interval, the unparseable rate, chance and the majority class of these
    questions, and per-group accuracy where asked."""
    summary = accuracy(sum(r["correct"] for r in records), len(records))
    unparseable = sum(r["answer"] is None for r in records)
    summary.update(unparseable=unparseable, unparseable_rate=unparseable / len(records) if records else 0.0,
                   title=spec.title, split=spec.split, paper=spec.paper, **reference_rates(records))
    if mode == "loglik":
        summary["length_normalised"] = accuracy(sum(r["correct_norm"] for r in records), len(records))
    if spec.group_by:
        groups = sorted({r["group"] for r in records})
        summary[f"by_{spec.group_by}"] = {
            g: accuracy(sum(r["correct"] for r in records if r["group"] == g), sum(r["group"] == g for r in records))
            for g in groups}
    return summary


# --- a whole evaluation ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What `prepare` checked and loaded: everything but the model weights."""

    cfg: DictConfig
    benchmarks: list[tuple[BenchmarkSpec, QASplit, list[QAItem]]]
    adapter: Adapter | None
    source: str | Path
    model_dir: Path


def prepare(cfg: DictConfig) -> Prepared:
    """Every check, cheapest first; reads config and data files only, writes nothing."""
    specs = check_settings(cfg)
    check_gpu_settings(cfg, on_gpu=torch.cuda.is_available())
    out_dir = Path(cfg.output_dir)
    if (out_dir / "summary.json").exists():
        raise EvalError(f"output_dir {out_dir} already holds an evaluation (summary.json); pass a new output_dir=...")
    adapter = resolve_adapter(cfg.adapter) if cfg.adapter else None
    if adapter is not None and adapter.run_config is not None:
        check_base(adapter, cfg, cfg.model.name)  # exact, from the run's config: before resolving the model
    benchmarks = [(spec, *load_items(spec, cfg, cfg.eval.limit)) for spec in specs]
    source = model_source(cfg)
    if adapter is not None and adapter.run_config is None:
        check_base(adapter, cfg, source)  # adapter_config.json may name the resolved directory
    model_dir = resolve_source(source, cfg.model.revision, weights=False)
    read_gptq_config(model_dir)
    return Prepared(cfg, benchmarks, adapter, source, model_dir)


def run_benchmarks(prepared: Prepared, model, tokenizer, command: str) -> dict:
    """Predict every benchmark and write the results into output_dir; returns summary.json's content."""
    cfg = prepared.cfg
    records, summary = [], {}
    for spec, _, items in prepared.benchmarks:
        predictions = [{"benchmark": spec.name, **record}
                       for record in predict(model, tokenizer, items, cfg, desc=f"{spec.name} ({cfg.eval.mode})")]
        records += predictions
        summary[spec.name] = summarise(predictions, spec, cfg.eval.mode)
    model_label = cfg.model.name + (f"@{cfg.model.revision}" if cfg.model.revision else "")
    heading = f"{model_label}" + (f" + {cfg.adapter}" if cfg.adapter else "") + f", {cfg.eval.mode}"
    write_results(Path(cfg.output_dir), cfg, records, summary,
                  build_manifest(prepared, model, eval_batch_size(cfg), command), heading,
                  paper_only())
    return summary


def evaluate(cfg: DictConfig, command: str = "") -> dict:
    """The whole evaluation of one model (cfg.adapter: one adapter or null) into cfg.output_dir; returns
    summary.json's content."""
    prepared = prepare(cfg)
    model, tokenizer = with_adapter(load_base_model(cfg, prepared.source), prepared.model_dir, prepared.adapter)
    return run_benchmarks(prepared, model, tokenizer, command)


def adapter_list(cfg: DictConfig) -> list[str | None] | None:
    """adapter=[none,runs/a,...] as a list (None: the base model alone); None when adapter= is a single one."""
    if not isinstance(cfg.adapter, ListConfig):
        return None
    adapters = [None if a is None or str(a).lower() == "none" else str(a) for a in cfg.adapter]
    if not adapters:
        raise EvalError("adapter=[] is empty; pass adapter=[none,runs/a] (none: the base model) or drop adapter=")
    if len(set(adapters)) < len(adapters):
        raise EvalError(f"adapter={list(cfg.adapter)} names one adapter twice; list each once")
    return adapters


def adapter_labels(adapters: list[str | None]) -> list[str]:
    """A folder name per adapter: `base` for the base model, else its run or folder name (a Hub id's name)."""
    labels = []
    for adapter in adapters:
        path = Path(adapter) if adapter else None
        name = "base" if path is None else (path.parent.name if path.name == "adapter" else path.name)
        labels.append(name if name not in labels else f"{name}-{len(labels)}")
    return labels


def evaluate_many(cfg: DictConfig, command: str = "") -> dict[str, dict]:
    """adapter=[none,runs/a,...]: each on the same questions into output_dir/<label> (every check first, the base
    loaded once), then their comparison in output_dir; returns {label: summary}."""
    adapters, out = adapter_list(cfg), Path(cfg.output_dir)
    done = [name for name in COMPARISON_FILES if (out / name).exists()]
    if done:
        raise EvalError(f"output_dir {out} already holds a comparison ({done[0]}); pass a new output_dir=...")
    runs = {}
    for label, adapter in zip(adapter_labels(adapters), adapters):
        one = cfg.copy()
        one.adapter, one.output_dir = adapter, str(out / label)
        runs[label] = prepare(one)
    first = next(iter(runs.values()))
    model = load_base_model(cfg, first.source)
    summaries = {}
    for label, prepared in runs.items():
        print(f"evaluating {label} ({prepared.adapter.given if prepared.adapter else 'the base model alone'})")
        with_it, tokenizer = with_adapter(model, prepared.model_dir, prepared.adapter)
        summaries[label] = run_benchmarks(prepared, with_it, tokenizer, command)
        if prepared.adapter is not None:
            model = with_it.unload()  # PEFT takes its layers off again: the next one sees the bare base
    compare([out / label for label in runs], out)
    return summaries
