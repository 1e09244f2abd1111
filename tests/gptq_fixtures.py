"""GPTQ checkpoints made by the reference quantiser (gptqmodel), for testing our format layer against it.

A tiny random Llama with grouped-query attention, quantised in the settings of every Meditron branch (and
8-bit), plus SmolLM2-135M-Instruct at 4-bit g128 act-order: all in the v1 format TheBloke's branches use.
Built once into the artifact cache (keyed on settings and library versions); a second run reads them back.
"""

import hashlib
import json
from pathlib import Path

import torch

from finetune import REPO_ROOT
from finetune.models.cache import cached_dir

# Every in/out feature count is a multiple of 32 so that all bit widths pack whole words; hidden 256 gives
# g128 two groups (four in down_proj) and g32 eight.
TINY_LLAMA = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512,
              "tie_word_embeddings": False}
# name -> (bits, group_size, desc_act): Meditron's six branches (main is 4-bit g-1), and 8-bit
TINY_GPTQ = {"4bit-g-1": (4, -1, False), "4bit-g128-actorder": (4, 128, True), "4bit-g32-actorder": (4, 32, True),
             "3bit-g-1-actorder": (3, -1, True), "3bit-g128-actorder": (3, 128, True),
             "3bit-g32-actorder": (3, 32, True), "8bit-g128": (8, 128, False)}
SMOLLM2_GPTQ = "smollm2-4bit-g128-actorder"
ALL_GPTQ = [*TINY_GPTQ, SMOLLM2_GPTQ]
CALIBRATION = {"texts": 64, "tokens": 64, "seed": 0, "block_size": 512}


def _tiny_tokenizer(texts: list[str]):
    """A byte-level BPE with the tiny model's 512-token vocabulary and ChatML specials, trained in a moment."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=TINY_LLAMA["vocab_size"], special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def _build_tiny_llama(out_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.models.builtin import BUILTIN_CALIBRATION
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(torch.float16)
    model.save_pretrained(out_dir)
    _tiny_tokenizer(BUILTIN_CALIBRATION).save_pretrained(out_dir)


def tiny_llama_dir() -> Path:
    """The tiny random Llama in fp16, with its tokenizer."""
    return cached_dir("test-tiny-llama", TINY_LLAMA, _build_tiny_llama)


def tiny_calibration_texts(tokenizer) -> list[str]:
    """Random token sequences as text: they excite every input direction, which a random model needs."""
    generator = torch.Generator().manual_seed(CALIBRATION["seed"])
    ids = torch.randint(3, len(tokenizer), (CALIBRATION["texts"], CALIBRATION["tokens"]), generator=generator)
    return tokenizer.batch_decode(ids)


def tiny_gptq_dir(name: str) -> Path:
    from transformers import AutoTokenizer

    from finetune.models.quantize import compute_dtype, quantize_to_gptq
    bits, group_size, desc_act = TINY_GPTQ[name]
    source = tiny_llama_dir()
    texts = tiny_calibration_texts(AutoTokenizer.from_pretrained(source))
    settings = {"bits": bits, "group_size": group_size, "desc_act": desc_act, "source": source.name,
                "calibration": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
                "block_size": CALIBRATION["block_size"], "compute_dtype": str(compute_dtype(torch.float16))}
    return cached_dir(f"test-tiny-llama-gptq-{name}", settings, lambda out: quantize_to_gptq(
        source, out, bits=bits, group_size=group_size, desc_act=desc_act, calibration_texts=texts,
        block_size=CALIBRATION["block_size"]))


def gptq_dir(name: str) -> Path:
    """The checkpoint of one of ALL_GPTQ, built on first use."""
    if name == SMOLLM2_GPTQ:
        from finetune.models.builtin import smollm2_gptq_dir
        return smollm2_gptq_dir()
    return tiny_gptq_dir(name)


def llama_style_tokenizer():
    """A small Llama-2-style tokenizer (BPE with byte fallback, Metaspace, BOS) trained here on the smoke sample's
    text, so it has no ChatML tokens -- like Meditron's -- and no newline token either (newlines are <0x0A>)."""
    sample = json.loads((REPO_ROOT / "data" / "smoke_pubmedqa.json").read_text())
    corpus = [text for row in sample.values() for text in [row["QUESTION"], *row["CONTEXTS"]]]
    corpus.append("system question answer The answer is A. B. C. D. E. yes no maybe")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = model["vocab"] | {f"<0x{b:02X}>": len(model["vocab"]) + b for b in range(256)}
    return LlamaTokenizer(vocab=vocab, merges=[tuple(merge) for merge in model["merges"]], add_bos_token=True)
