"""The arithmetic of evaluation: option log-likelihoods with a shared prompt, generation, voting, intervals.

Log-likelihood scoring computes each question's prompt ONCE: a batch row holds the prompt followed by all its
options, and a tree-shaped attention mask lets every option token see the prompt and the earlier tokens of its own
option only, at the positions it would have right after the prompt. One forward pass scores every option of every
question in the batch -- a 4-option question costs its prompt plus four short answers instead of four full
sequences, with no key/value cache to copy per option. Rows are right-padded; a padding token sees the prompt, so
no query attends to nothing (which would put NaNs into the softmax).
"""

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer


@dataclass(frozen=True)
class OptionRequest:
    """One question for log-likelihood scoring: its prompt tokens and each option's continuation tokens."""

    prompt_ids: list[int]
    option_ids: list[list[int]]


def tree_rows(requests: Sequence[OptionRequest], pad_id: int, device):
    """Each request as one row: prompt, then its options one after another. Returns ids, positions and
    segments (0 prompt, k the k-th option, -1 padding), all [rows, width]."""
    width = max(len(r.prompt_ids) + sum(map(len, r.option_ids)) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(requests), width), dtype=torch.long)
    segments = torch.full((len(requests), width), -1, dtype=torch.long)
    for row, r in enumerate(requests):
        n = len(r.prompt_ids)
        ids[row, :n], positions[row, :n], segments[row, :n] = torch.tensor(r.prompt_ids), torch.arange(n), 0
        start = n
        for k, option in enumerate(r.option_ids, start=1):
            end = start + len(option)
            ids[row, start:end], segments[row, start:end] = torch.tensor(option), k
            positions[row, start:end] = torch.arange(n, n + len(option))  # as if right after the prompt
            start = end
    return ids.to(device), positions.to(device), segments.to(device)


def tree_mask(segments: torch.Tensor) -> torch.Tensor:
    """[rows, 1, width, width] boolean, True = may attend: earlier-or-same tokens that are real and belong to the
    prompt or to the query's own option."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    key, query = segments[:, None, :], segments[:, :, None]
    return (causal & (key >= 0) & ((key == 0) | (key == query)))[:, None]


@torch.inference_mode()
def option_logprobs(model, requests: Sequence[OptionRequest], pad_id: int = 0) -> list[list[float]]:
    """Sum of log p(option tokens | prompt) for every option of every request, in one forward pass."""
    device = next(model.parameters()).device
    ids, positions, segments = tree_rows(requests, pad_id, device)
    # an option's token j is predicted at the position before it: the prompt's last token for j = 0
    rows, predictors, targets, owners = [], [], [], []
    option_index = 0
    for row, r in enumerate(requests):
        start = len(r.prompt_ids)
        for option in r.option_ids:
            for j, token in enumerate(option):
                rows.append(row)
                predictors.append(start + j - 1 if j else len(r.prompt_ids) - 1)
                targets.append(token)
                owners.append(option_index)
            start += len(option)
            option_index += 1
    keep = torch.zeros_like(ids, dtype=torch.bool)
    rows, predictors = torch.tensor(rows, device=device), torch.tensor(predictors, device=device)
    keep[rows, predictors] = True
    logits = model(input_ids=ids, attention_mask=tree_mask(segments), position_ids=positions, use_cache=False,
                   logits_to_keep=keep).logits  # [kept positions, vocab], in row-major order of `keep`
    kept_index = keep.flatten().cumsum(0) - 1
    logprobs = logits.float().log_softmax(-1)[kept_index[rows * ids.shape[1] + predictors],
                                              torch.tensor(targets, device=device)]
    scores = torch.zeros(option_index, device=device, dtype=torch.float32)
    scores = scores.index_add(0, torch.tensor(owners, device=device), logprobs).tolist()
    return per_request(scores, requests)


def per_request(values: Sequence, requests: Sequence[OptionRequest]) -> list[list]:
    """A flat list with one value per option, in request order, back into one list per request."""
    result, start = [], 0
    for r in requests:
        result.append(list(values[start:start + len(r.option_ids)]))
        start += len(r.option_ids)
    return result


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped `batch_size` at a time, longest first: similar lengths share a batch (little
    padding), and the first batch is the largest, so running out of memory happens at once, not at the end."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def score_options(model, requests: Sequence[OptionRequest], batch_size: int, pad_id: int = 0,
                  desc: str = "loglik") -> list[list[float]]:
    """`option_logprobs` over all requests in length-sorted batches, with a progress bar; results in order."""
    results: list[list[float] | None] = [None] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit="q") as bar:
        for batch in batches_by_length([len(r.prompt_ids) for r in requests], batch_size):
            for i, scores in zip(batch, option_logprobs(model, [requests[i] for i in batch], pad_id)):
                results[i] = scores
            bar.update(len(batch))
    return results


class _TokenProgress(BaseStreamer):
    """Counts generated tokens into a tqdm bar (which shows their rate): `generate` hands it the prompt first,
    then each step's next token of every row; a row that has stopped gets `pad_id` and is not counted."""

    def __init__(self, bar: tqdm, pad_id: int):
        self.bar, self.pad_id, self.prompt_seen = bar, pad_id, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.bar.update(int((value != self.pad_id).sum()))
        self.prompt_seen = True

    def end(self) -> None:
        self.prompt_seen = False


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: Sequence[list[int]], batch_size: int, max_new_tokens: int,
                   stop_ids: Sequence[int], num_samples: int = 1, temperature: float = 0.0,
                   desc: str = "generate") -> list[list[str]]:
    """`num_samples` completions per prompt (greedy when temperature is 0), each cut at the first stop token;
    a completion that hits `max_new_tokens` first comes back as far as it got.

    A batch holds `batch_size` sequences: batch_size // num_samples prompts, each sampled num_samples times, so
    self-consistency needs no more memory than greedy decoding. The key/value cache is transformers' static
    cache, allocated once per batch for prompt + max_new_tokens: it is written in place each step, where the
    dynamic cache would copy all of itself (16 GiB at 70B for 64 rows of 800 tokens) with every new token."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    results: list[list[str] | None] = [None] * len(prompts)
    with tqdm(desc=desc, unit="tok", unit_scale=True) as bar:
        progress = _TokenProgress(bar, pad_id)
        for batch in batches_by_length([len(p) for p in prompts], max(1, batch_size // num_samples)):
            width = max(len(prompts[i]) for i in batch)  # left-padded: every row's next token is at the end
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=pad_id,
                                 num_return_sequences=num_samples, cache_implementation="static",
                                 disable_compile=True, streamer=progress, **sampling)
            new_tokens = out[:, width:].tolist()
            for row, i in enumerate(batch):
                samples = new_tokens[row * num_samples:(row + 1) * num_samples]
                results[i] = [tokenizer.decode(_cut(tokens, stop_ids), skip_special_tokens=False) for tokens in samples]
            bar.set_postfix_str(f"{sum(r is not None for r in results)}/{len(prompts)} questions")
    return results


def _cut(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    for j, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:j]
    return tokens


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent parsed answer; a tie goes to the answer that appeared first among the samples, and an
    unparseable sample (None) never wins: None only when no sample parsed."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1 and for small n, unlike p ± 1.96·se)."""
    if total == 0:
        return (0.0, 1.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))
