"""The one prompt format of the toolkit: ChatML with the roles system / question / answer.

    <|im_start|>system
    {system}<|im_end|>
    <|im_start|>question
    {question}<|im_end|>
    <|im_start|>answer
    {answer}<|im_end|>

Training, evaluation, the tokenizer's `chat_template` and the model card all render through this module, so what
the model is trained on is what it is asked. Training examples are TRL prompt-completion pairs: the prompt ends
with `<|im_start|>answer\\n` and the loss falls only on the completion, the answer text and its `<|im_end|>`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from .pubmedqa import PUBMEDQA_LABELS
from .records import QAItem

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TOKENS = (IM_START, IM_END)
ROLES = ("system", "question", "answer")

SYSTEM_PROMPTS = {
    "pubmedqa": (
        "You are a biomedical researcher. Read the abstract and answer the research question with yes, no or maybe."
    ),
    "medmcqa": "You are a medical doctor answering a medical entrance exam question. Choose the one correct option.",
    "medqa": "You are a medical doctor taking the US Medical Licensing Examination. Choose the one correct option.",
}
SYSTEM_PROMPTS["medqa4"] = SYSTEM_PROMPTS["medqa"]

# The same text as `render_chatml`, for `tokenizer.apply_chat_template` (and so for TRL, vLLM, TGI, ...).
# Written with explicit '\n' strings so that transformers' trim_blocks / lstrip_blocks cannot change it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'question', 'answer'] %}"
    "{{ raise_exception('ChatML roles are system, question and answer, not ' + message['role']) }}"
    "{% endif %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{% if messages %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>answer\\n' }}"
    "{% endif %}"
)


def render_question(item: QAItem) -> str:
    """PubMedQA: the abstract without its conclusion, then the question; multiple choice: question, lettered options."""
    if not item.options:
        return f"Context: {item.context}\n\nQuestion: {item.question}" if item.context else item.question
    options = "\n".join(f"{letter}. {text}" for letter, text in item.options.items())
    return f"{item.question}\n\n{options}"


def answer_choices(item: QAItem) -> list[str]:
    """What the answer can be: the option letters, or yes / no / maybe."""
    return list(item.options) if item.options else list(PUBMEDQA_LABELS)


def render_answer(item: QAItem, answer: str | None = None, *, with_explanation: bool = False) -> str:
    """`The answer is B.` for `answer` (default: the gold one), after MedMCQA's explanation if asked and present."""
    final = f"The answer is {item.answer if answer is None else answer}."
    return f"{item.explanation}\n\n{final}" if with_explanation and item.explanation else final


def to_messages(
    item: QAItem, *, system: str | None = None, with_answer: bool = True, with_explanation: bool = False
) -> list[dict[str, str]]:
    """The item as chat messages; `system` defaults to the benchmark's prompt in SYSTEM_PROMPTS."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPTS[item.benchmark] if system is None else system},
        {"role": "question", "content": render_question(item)},
    ]
    if with_answer:
        messages.append({"role": "answer", "content": render_answer(item, with_explanation=with_explanation)})
    return messages


def render_chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The ChatML text of `messages`; with `add_generation_prompt` it ends in `<|im_start|>answer\\n`."""
    turns = []
    for message in messages:
        if message["role"] not in ROLES:
            raise ValueError(f"ChatML role {message['role']!r} is not one of {', '.join(ROLES)}; fix: use one of them")
        turns.append(f"{IM_START}{message['role']}\n{message['content']}{IM_END}")
    text = "\n".join(turns)
    if add_generation_prompt:
        text += ("\n" if turns else "") + f"{IM_START}answer\n"
    return text


def evaluation_prompt(item: QAItem, *, system: str | None = None) -> str:
    """What the model is asked: system and question turns, then the opened answer turn."""
    return render_chatml(to_messages(item, system=system, with_answer=False), add_generation_prompt=True)


def training_example(item: QAItem, *, system: str | None = None, with_explanation: bool = False) -> dict[str, str]:
    """A TRL prompt-completion pair; prompt + completion is the item's full ChatML text."""
    return {
        "prompt": evaluation_prompt(item, system=system),
        "completion": render_answer(item, with_explanation=with_explanation) + IM_END,
    }


def prompt_completion_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(masked prompt ids, trained completion ids), split as TRL's SFTTrainer does: prompt + completion tokenized
    together, the completion being what follows the tokenized prompt. Raises if the prompt's tokens are not a prefix
    (tokens merging across the boundary), which this template avoids by ending the prompt on a newline."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + completion)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            f"the tokenized prompt is not a prefix of prompt + completion for {type(tokenizer).__name__}; "
            "fix: end the prompt on a token boundary"
        )
    return prompt_ids, full_ids[len(prompt_ids) :]


def prepare_tokenizer(tokenizer) -> list[int]:
    """Set the ChatML chat template and a pad token; add `<|im_start|>` / `<|im_end|>` as special tokens where the
    vocabulary lacks them (Llama-2, Meditron). Returns the ids of the added tokens -- the embedding and lm_head rows
    that training must make trainable and save with the adapter -- or [] when they exist already (SmolLM2)."""
    vocabulary = tokenizer.get_vocab()
    # a token that is in the vocabulary but not atomic (split into pieces) is registered as special, not new
    unsplit = [t for t in CHATML_TOKENS if tokenizer(t, add_special_tokens=False)["input_ids"] != [vocabulary.get(t)]]
    if unsplit:
        tokenizer.add_special_tokens({"extra_special_tokens": unsplit}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:  # padding is masked out of the loss; unk never appears in our text
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return [tokenizer.convert_tokens_to_ids(t) for t in CHATML_TOKENS if t not in vocabulary]


# Invented items (not benchmark rows) that pin down the rendering; used by template_hash and for model cards.
EXAMPLE_ITEMS = {
    "pubmedqa": QAItem(
        id="example",
        benchmark="pubmedqa",
        question="Does daily walking lower resting heart rate in older adults?",
        answer="yes",
        context="Resting heart rate predicts cardiovascular risk.\n"
        "In 120 adults aged over 65, twelve weeks of daily walking lowered resting heart rate by 6 beats per minute "
        "compared with controls (p<0.001).",
    ),
    "medqa": QAItem(
        id="example",
        benchmark="medqa",
        question="A 30-year-old woman has fatigue and a low serum ferritin. Which finding is most likely?",
        answer="B",
        options={"A": "Macrocytosis", "B": "Microcytic anaemia", "C": "Target cells only", "D": "Basophilia"},
        explanation="Iron deficiency causes a microcytic, hypochromic anaemia.",
    ),
}


def template_hash() -> str:
    """sha256 of the chat template, the system prompts and the rendered example items, for run manifests:
    any change to what the model sees changes it."""
    rendered = {name: training_example(item, with_explanation=True) for name, item in EXAMPLE_ITEMS.items()}
    payload = json.dumps([CHAT_TEMPLATE, SYSTEM_PROMPTS, rendered], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
