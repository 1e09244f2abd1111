"""Training-run directories for the export and publish tests, made without training: a random GPTQ base (written
by finetune.gptq.random_checkpoint) with a byte-level BPE tokenizer that lacks the ChatML tokens, and a run
directory laid out as train.py leaves it -- config.yaml from the smoke recipe, metrics.json, and adapter/ saved
by PEFT with the training code's own LoraConfig (LoRA on all seven projections, the added ChatML tokens'
embedding and lm_head rows trainable). Its LoRA B matrices and token rows are non-zero, as after training."""

import json
from pathlib import Path

import torch
from peft import get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from finetune import load_model
from finetune.config.recipe import compose_recipe
from finetune.data import chatml
from finetune.gptq.format import GPTQConfig
from finetune.gptq.random_checkpoint import write_random_gptq_checkpoint
from finetune.training import sft
from finetune.training.run_report import save_config


def byte_bpe_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A Llama-2-like tokenizer for tiny models: no <|im_start|> / <|im_end|> in its vocabulary."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [chatml.training_example(item, with_explanation=True)["prompt"] for item in chatml.EXAMPLE_ITEMS.values()]
    tokenizer.train_from_iterator(text * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_base(path: Path, layers: int = 3, hidden: int = 64, intermediate: int = 128,
              gptq: GPTQConfig = GPTQConfig(bits=4, group_size=32, desc_act=True)) -> Path:
    tokenizer = byte_bpe_tokenizer()
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    write_random_gptq_checkpoint(path, config, gptq, seed=1)
    tokenizer.save_pretrained(path)
    return path


def make_run(path: Path, base: Path, use_rslora: bool = False, seed: int = 0) -> Path:
    """A finished run on `base`: config.yaml, metrics.json and adapter/ as sft.train writes them."""
    cfg = compose_recipe("smoke", [f"model.name={base}", f"output_dir={path}"])
    path.mkdir(parents=True)
    save_config(cfg, path, "tests/export_fixtures.py")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    added = chatml.prepare_tokenizer(tokenizer)
    model = load_model(str(base), device="cpu")
    torch.manual_seed(seed)
    model.resize_token_embeddings(len(tokenizer))
    lora = sft.lora_config(cfg, model, added)
    lora.init_lora_weights, lora.use_rslora = False, use_rslora  # B random, not zero: a trained-looking adapter
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)  # LoRA's change of the weights: a few percent, as after fine-tuning
            if "trainable_tokens_delta" in name:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(path / "adapter")
    tokenizer.save_pretrained(path / "adapter")
    metrics = {"loss": [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.75}], "summary": {}, "data": {}}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path
