"""Parity of an exported model with what was trained: the adapter on its GPTQ base.

On N held-out prompts in the run's template, both models' next-token distributions are compared at every
prompt position: mean (and max) KL(reference || export) and how often their top-1 tokens agree. The reference
runs first and its log-probabilities are kept on the CPU, then it is freed and the export loaded, so only one
model is in memory at a time.
"""

from collections.abc import Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ..data import chatml
from ..data.registry import get_benchmark, load_benchmark, resolve_options
from ..training.sft import load_training_data


def held_out_prompts(cfg: DictConfig, n: int) -> tuple[list[str], str]:
    """Up to `n` evaluation prompts (ChatML, ending in the opened answer turn) from the evaluation split of each
    benchmark the run trained on, taken in turn; and where they came from. Falls back to the run's own training
    prompts, saying so, when no evaluation split can be read (e.g. a Hub dataset offline)."""
    per_entry, sources, problems = [], [], []
    for label, entry in OmegaConf.to_container(cfg.data.train).items():
        benchmark = get_benchmark(entry["benchmark"])
        if entry.get("split", benchmark.default_split) == benchmark.default_split:
            problems.append(f"{label} trains on the evaluation split")
            continue
        # a path option naming one split's file (e.g. medmcqa/train.json) must not stand in for another split
        per_split = {key for key, template in benchmark.local_files.items() if "{split}" in template}
        options = resolve_options({k: v for k, v in (entry.get("options") or {}).items() if k not in per_split})
        try:
            split = load_benchmark(benchmark.name, benchmark.default_split, source=entry.get("source", "local"),
                                   data_root=cfg.data.data_root, on_bad_row="skip", **options)
        except (ValueError, TypeError, OSError) as err:
            problems.append(f"{label}: {err}")
            continue
        per_entry.append([chatml.evaluation_prompt(item, system=cfg.data.system_prompt) for item in split])
        sources.append(f"{split.benchmark} {split.split} ({split.source})")
    prompts = []  # one from each benchmark in turn
    for i in range(max(map(len, per_entry), default=0)):
        prompts += [group[i] for group in per_entry if i < len(group)]
    if prompts:
        return prompts[:n], "held-out: " + ", ".join(sources)
    dataset, _ = load_training_data(cfg)
    return list(dataset["prompt"][:n]), "training prompts (no held-out split: " + "; ".join(problems) + ")"


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: Sequence[str], max_tokens: int, desc: str) -> list[torch.Tensor]:
    """Per prompt, log-softmax of the next-token logits at every position, fp32 on the CPU. Prompts longer than
    `max_tokens` keep their end, where the answer is predicted."""
    out = []
    for prompt in tqdm(prompts, desc=desc, unit="prompt"):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"][:, -max_tokens:]
        logits = model(input_ids=ids.to(model.device)).logits[0].float()
        out.append(torch.log_softmax(logits, dim=-1).cpu())
    return out


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict:
    """Mean and max KL(reference || candidate) in nats per position, and top-1 agreement, over all positions."""
    kls, agree = [], []
    for ref, cand in zip(reference, candidate, strict=True):
        if ref.shape != cand.shape:
            raise ValueError(f"the exported model's logits have shape {tuple(cand.shape)}, the reference's "
                             f"{tuple(ref.shape)}: the export's vocabulary differs from the adapter's")
        kls.append(torch.nn.functional.kl_div(cand, ref, log_target=True, reduction="none").sum(-1))
        agree.append(ref.argmax(-1) == cand.argmax(-1))
    kl, same = torch.cat(kls), torch.cat(agree)
    return {"positions": int(kl.numel()), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float(same.float().mean())}


def parity_report(load_reference: Callable, load_candidate: Callable, tokenizer, prompts: Sequence[str],
                  max_tokens: int) -> dict:
    """Run the reference, free it, run the candidate; compare. The loaders return models in eval mode."""
    reference = load_reference()
    reference_logprobs = next_token_logprobs(reference, tokenizer, prompts, max_tokens, "parity: adapter on GPTQ")
    del reference
    candidate = load_candidate()
    candidate_logprobs = next_token_logprobs(candidate, tokenizer, prompts, max_tokens, "parity: export")
    del candidate
    return {"prompts": len(prompts), **compare(reference_logprobs, candidate_logprobs)}
