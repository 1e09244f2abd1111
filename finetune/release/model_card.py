"""The model card (README.md) of an export, through huggingface_hub's `ModelCard` / `ModelCardData`.

It states what the export is and how to load it, the base model and branch, the quantisation and LoRA settings,
the training data with its licences, the training hyper-parameters, the parity with the trained adapter, the
evaluation beside Meditron-70B's published numbers when an evaluation summary exists, and the Llama 2 licence
and Meditron's advisory notice. `validate_card` checks the metadata offline as far as huggingface_hub can
(the Hub's own YAML check, `RepoCard.validate`, needs the network and runs on upload).
"""

import json
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from omegaconf import DictConfig, OmegaConf

from ..data import chatml
from ..data.registry import BENCHMARKS
from ..evaluation.benchmarks import BENCHMARKS_FILE
from ..gptq.format import GPTQConfig

DATASET_LICENCES = {  # /work/shared/data/README.md and each source's LICENSE file
    "pubmedqa": "MIT (pubmedqa/pubmedqa)",
    "medmcqa": "MIT (its LICENSE file; the README badge says Apache-2.0)",
    "medqa": "MIT (jind11/MedQA)",
    "medqa4": "MIT (jind11/MedQA)",
}
KIND_TEXT = {
    "adapter": "a LoRA adapter (PEFT format) for the GPTQ base model below; load the base, then the adapter",
    "merged": "dense weights: the LoRA adapter merged into the dequantised GPTQ base — a plain transformers "
              "model, no quantisation library needed",
    "gptq": "the merged model re-quantised with GPTQ (gptqmodel); loads with transformers + optimum + gptqmodel",
}
ADVISORY = (
    "**Advisory notice (Meditron's, and it applies here).** This model is released for research and is **not** fit "
    "for clinical use. Meditron and models derived from it are not to be used in medical practice without thorough "
    "testing, including "
    "real-world evaluation in the intended setting and alignment with clinical guidelines; they may produce "
    "wrong, incomplete or harmful answers. Any use should be advisory only, under the supervision of a "
    "qualified professional.")
LICENCES = {  # Hub licence id and text of the weights' licence, by base family
    "llama2": "The weights derive from Llama 2 (through Meditron-70B) and are governed by the **Llama 2 Community "
              "Licence Agreement** (https://ai.meta.com/llama/license/) and its Acceptable Use Policy.",
    "apache-2.0": "The weights derive from SmolLM2-135M-Instruct (the toolkit's offline smoke model), released "
                  "under the Apache-2.0 licence.",
}
DATA_LICENCE_TEXT = ("PubMedQA, MedMCQA and MedQA are MIT-licensed; the table above gives each training source's "
                     "licence.")


def weights_licence(base_model: str) -> str:
    """The Hub licence id of the base's weights: Llama 2's for the Llama family this toolkit targets (Meditron),
    Apache-2.0 for SmolLM2."""
    return "apache-2.0" if "smollm" in base_model.lower() else "llama2"


def paper_results() -> dict[str, tuple[str, float]]:
    """Meditron-70B's published accuracy per benchmark (eval/benchmarks.yaml): name -> (title, percent)."""
    spec = yaml.safe_load(BENCHMARKS_FILE.read_text())
    rows = {name: (b["title"], b["paper"]) for name, b in spec["benchmarks"].items() if b.get("paper") is not None}
    rows.update((name, (b["title"], b["paper"])) for name, b in (spec.get("paper_only") or {}).items())
    return rows


def read_evaluation(summary_path: Path | None) -> dict[str, dict]:
    """benchmark -> its summary (accuracy, n, ci95, ...) from an evaluation's summary.json, or {}."""
    if summary_path is None or not summary_path.is_file():
        return {}
    summary = json.loads(summary_path.read_text())
    summary = summary.get("benchmarks", summary)
    return {name: entry for name, entry in summary.items() if isinstance(entry, dict) and "accuracy" in entry}


def _hub_dataset(entry: dict) -> str | None:
    """The Hub dataset a training entry is (its local files are the same data), or None for other files."""
    own_file = any(k.endswith("path") for k in (entry.get("options") or {})) and entry.get("source") != "hub"
    return None if own_file else BENCHMARKS[entry["benchmark"]].hub_options.get("hub_id")


def _data_row(label: str, entry: dict) -> list:
    hub_id = _hub_dataset(entry)
    files = ", ".join(Path(v).name for k, v in (entry.get("options") or {}).items() if k.endswith("path"))
    licence = DATASET_LICENCES.get(entry["benchmark"], "") if hub_id else "its file's licence (for the smoke " \
        "sample: this project's own invented questions, Apache-2.0)"
    return [label, entry["benchmark"], entry.get("split", ""), f"`{hub_id}`" if hub_id else files, licence]


def _metadata(kind: str, licence: str, base_model: str | None, datasets: list[str], evaluation: dict,
              name: str) -> ModelCardData:
    results = [EvalResult(task_type="question-answering", dataset_type=BENCHMARKS[b].hub_options.get("hub_id", b),
                          dataset_name=entry.get("title", b), dataset_split=entry.get("split"),
                          metric_type="accuracy", metric_value=round(100 * entry["accuracy"], 2))
               for b, entry in evaluation.items() if b in BENCHMARKS]
    return ModelCardData(
        license=licence, language="en", base_model=base_model, datasets=datasets or None,
        library_name="peft" if kind == "adapter" else "transformers", pipeline_tag="text-generation",
        tags=["medical", "meditron", "llama-2", "lora", "gptq", "chatml", "finetune"],
        base_model_relation="adapter" if kind == "adapter" else "finetune",
        model_name=name if results else None, eval_results=results or None)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _usage(kind: str, repo: str, base: str, revision: str | None) -> str:
    prompt = chatml.evaluation_prompt(chatml.EXAMPLE_ITEMS["medqa"])
    messages = chatml.to_messages(chatml.EXAMPLE_ITEMS["medqa"], with_answer=False)
    if kind == "adapter":
        load = (f"base = AutoModelForCausalLM.from_pretrained({base!r}"
                + (f", revision={revision!r}" if revision else "")
                + ", device_map=\"auto\")  # GPTQ: needs optimum + gptqmodel\n"
                f"tokenizer = AutoTokenizer.from_pretrained({repo!r})\n"
                "base.resize_token_embeddings(len(tokenizer))  # the ChatML tokens, if training added them\n"
                f"model = PeftModel.from_pretrained(base, {repo!r})\n")
        imports = "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
    else:
        load = (f"model = AutoModelForCausalLM.from_pretrained({repo!r}, device_map=\"auto\")"
                + ("  # needs optimum + gptqmodel" if kind == "gptq" else "") + "\n"
                f"tokenizer = AutoTokenizer.from_pretrained({repo!r})\n")
        imports = "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    code = (imports + "\n" + load + f"messages = {json.dumps(messages, indent=1, ensure_ascii=False)}\n"
            "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
            "inputs = tokenizer(prompt, return_tensors=\"pt\").to(model.device)\n"
            "end_of_turn = tokenizer.convert_tokens_to_ids(\"<|im_end|>\")\n"
            "output = model.generate(**inputs, max_new_tokens=64, eos_token_id=end_of_turn)\n"
            "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n")
    return (f"```python\n{code}```\n\nThe chat template renders the messages as (roles `system` / `question` / "
            f"`answer`; the model answers `The answer is X.` and ends its turn with `<|im_end|>`):\n\n"
            f"```text\n{prompt}\n```")


def build_model_card(*, kind: str, name: str, run_cfg: DictConfig, base_model: str, revision: str | None,
                     base_quantisation: GPTQConfig, adapter_config: dict, export_settings: dict,
                     parity: dict | None = None, evaluation: dict | None = None, final_loss: float | None = None,
                     repo_id: str | None = None) -> ModelCard:
    """The card of an export. `base_model` is the GPTQ repo (or local path) the adapter was trained on;
    `export_settings` what the export did (dtype, GPTQ settings); `evaluation` from `read_evaluation`."""
    evaluation, licence = evaluation or {}, weights_licence(base_model)
    hub_base = base_model if base_model.count("/") == 1 and not Path(base_model).exists() else None
    data = OmegaConf.to_container(run_cfg.data.train)
    datasets = sorted({d for e in data.values() if (d := _hub_dataset(e))})
    repo = repo_id or f"<your-user>/{name}"
    q = base_quantisation
    trainable_tokens = adapter_config.get("trainable_token_indices")
    lora_rows = [["r", adapter_config.get("r")], ["alpha", adapter_config.get("lora_alpha")],
                 ["dropout", adapter_config.get("lora_dropout")],
                 ["target modules", ", ".join(sorted(adapter_config.get("target_modules") or []))],
                 ["rsLoRA", adapter_config.get("use_rslora", False)],
                 ["trained token rows", json.dumps(trainable_tokens) if trainable_tokens else "none"]]
    train = OmegaConf.to_container(run_cfg.train, resolve=True)
    hyper_keys = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "max_length", "packing", "lr_scheduler_type", "warmup_steps",
                  "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm")
    hyper_rows = [[k, train[k]] for k in hyper_keys if k in train] + [["seed", run_cfg.seed]]
    if final_loss is not None:
        hyper_rows.append(["final training loss", f"{final_loss:.4f}"])

    sections = [
        f"# {name}", "", ADVISORY, "",
        f"This repository holds **{kind}** weights: {KIND_TEXT[kind]}. They come from a LoRA fine-tune of "
        f"`{base_model}`" + (f" (branch `{revision}`)" if revision else "") + " with the meditron-finetune toolkit, "
        "in a ChatML template with the roles system / question / answer.", "",
        "## Base model and quantisation", "",
        _table(["", ""], [["base model", f"`{base_model}`"], ["branch", f"`{revision or 'main'}`"],
                          ["bits", q.bits], ["group size", q.group_size], ["act-order", q.desc_act],
                          ["checkpoint format", q.checkpoint_format]]), "",
        "## Export", "", _table(["setting", "value"], [[k, v] for k, v in export_settings.items()]), "",
        "## LoRA", "", _table(["setting", "value"], lora_rows), "",
        "## Training data", "", _table(["name", "benchmark", "split", "data", "licence"],
                                            [_data_row(label, e) for label, e in data.items()]),
        "", "## Training hyper-parameters", "", _table(["hyper-parameter", "value"], hyper_rows), ""]
    if parity:
        sections += ["## Parity with the trained adapter", "",
                     f"Next-token distributions of this export against the adapter on its GPTQ base, at every "
                     f"position of {parity['prompts']} prompts ({parity['prompt_source']}):", "",
                     _table(["mean KL (nats)", "max KL (nats)", "top-1 agreement", "positions"],
                            [[f"{parity['mean_kl']:.3g}", f"{parity['max_kl']:.3g}",
                              f"{100 * parity['top1_agreement']:.2f}%", parity["positions"]]]), ""]
    if evaluation:
        paper = paper_results()
        rows = [[title, f"{100 * evaluation[b]['accuracy']:.1f}" if b in evaluation else "—", published]
                for b, (title, published) in paper.items()]
        rows += [[entry.get("title", b), f"{100 * entry['accuracy']:.1f}", "—"]  # e.g. the smoke sample
                 for b, entry in evaluation.items() if b not in paper]
        sections += ["## Evaluation", "", "Accuracy (%) beside Meditron-70B's published results:", "",
                     _table(["benchmark", "this model", "Meditron-70B (paper)"], rows), ""]
    sections += [
        "## Usage", "", _usage(kind, repo, base_model, revision), "",
        "## Intended use and limits", "",
        "- Research on medical question answering: benchmark studies, error analysis, method comparisons.",
        "- Not for diagnosis, treatment or any decision about a patient; not a substitute for a clinician.",
        "- Trained on exam-style multiple-choice and yes/no/maybe questions in English; answers outside that "
        "format, other languages and recent medical knowledge are out of scope.",
        "- Quantisation and merging change the outputs slightly (see the parity table); evaluate the exact "
        "weights you deploy.", "",
        "## Licence", "", LICENCES[licence], DATA_LICENCE_TEXT, ""]
    metadata = _metadata(kind, licence, hub_base, datasets, evaluation, name)
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(sections))


def validate_card(card: ModelCard) -> ModelCard:
    """The offline part of the Hub's card check: the YAML block parses with the Hub's own regex into valid
    `ModelCardData` (model-index and eval results included), and says what an upload needs."""
    parsed = ModelCard(str(card))  # raises ValueError on a malformed block or invalid eval results
    data = parsed.data.to_dict()
    for key in ("license", "library_name", "tags"):
        if not data.get(key):
            raise ValueError(f"model card metadata lacks {key!r}")
    return parsed
