"""The GPTQ format layer against the reference implementation, gptqmodel, on checkpoints gptqmodel itself made.

- dequantised weights equal gptqmodel's exactly, every module of every fixture;
- `load_model` logits equal transformers + optimum + gptqmodel's within fp32 rounding;
- GPTQLinear's input gradient equals autograd through the dense weight, and it saves nothing for backward;
- PEFT wraps GPTQLinear with LoRA without importing gptqmodel (~4 s, and it sets PYTORCH_ALLOC_CONF);
- SmolLM2 stays a working model after quantisation (perplexity on real PubMedQA abstracts);
- every malformed checkpoint or quantisation request fails with its one-line message, before heavy work.
"""

import functools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from gptq_fixtures import SMOLLM2_GPTQ, TINY_GPTQ, gptq_dir
from subprocesses import run_python
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from finetune import load_model
from finetune.data.registry import default_data_root
from finetune.gptq import GPTQConfig, GPTQFormatError, GPTQLinear, read_gptq_config
from finetune.gptq.random_checkpoint import write_random_gptq_checkpoint
from finetune.models.builtin import GPTQ_SETTINGS, smollm2_dir
from finetune.models.quantize import import_gptqmodel, quantize_to_gptq

PROMPT = "Does aspirin lower the risk of stroke in patients with atrial fibrillation? Answer yes, no or maybe."


def eager():
    """gptqmodel torch.compiles its dequantisation; its eager code is the reference, and needs no compile time."""
    return torch._dynamo.config.patch(disable=True)


@functools.lru_cache(maxsize=1)  # tests are grouped by checkpoint, so one model at a time is enough
def reference_model(path: Path) -> torch.nn.Module:
    """The checkpoint as transformers loads it through optimum and gptqmodel (its TorchLinear, on the CPU;
    gptqmodel converts the v1 zero points to v2 on the way)."""
    import_gptqmodel()
    from transformers import GPTQConfig as HFGPTQConfig
    quantization = HFGPTQConfig(bits=read_gptq_config(path).bits, backend="gptq_torch")
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32,
                                                device_map="cpu").eval()


@functools.lru_cache(maxsize=1)
def our_model(path: Path) -> torch.nn.Module:
    return load_model(path, device="cpu", dtype=torch.float32)


def prompt_ids(path: Path) -> torch.Tensor:
    return AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids


def test_fixture_is_a_v1_gptq_checkpoint(gptq_checkpoint):
    name, path = gptq_checkpoint
    bits, group_size, desc_act = TINY_GPTQ[name] if name != SMOLLM2_GPTQ else \
        (GPTQ_SETTINGS["bits"], GPTQ_SETTINGS["group_size"], GPTQ_SETTINGS["desc_act"])
    saved = json.loads((path / "config.json").read_text())["quantization_config"]
    assert {key: saved[key] for key in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")} \
        == {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": True,
            "checkpoint_format": "gptq"}


def test_dequantised_weights_equal_gptqmodel_exactly(gptq_checkpoint):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    _, path = gptq_checkpoint
    reference = {n: m for n, m in reference_model(path).named_modules() if isinstance(m, BaseQuantLinear)}
    ours = {n: m for n, m in our_model(path).named_modules() if isinstance(m, GPTQLinear)}
    assert reference and ours.keys() == reference.keys()
    with eager():
        for name, layer in ours.items():
            # ours is [out, in] like nn.Linear, gptqmodel's [in, out]
            assert torch.equal(layer.dequantize_weight(torch.float16), reference[name].dequantize_weight().t()), name


def test_logits_equal_transformers_optimum_gptqmodel(gptq_checkpoint):
    _, path = gptq_checkpoint
    ids = prompt_ids(path)
    with torch.no_grad(), eager():
        expected = reference_model(path)(ids).logits
    with torch.no_grad():
        actual = our_model(path)(ids).logits
    torch.testing.assert_close(actual, expected)  # fp32 tolerances: rtol 1.3e-6, atol 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_equals_autograd_through_dense_weight(gptq_checkpoint, dtype):
    _, path = gptq_checkpoint
    for layer in (our_model(path).model.layers[0].self_attn.k_proj, our_model(path).model.layers[-1].mlp.down_proj):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, 7, layer.in_features, generator=generator).to(dtype).requires_grad_()
        grad_output = torch.randn(2, 7, layer.out_features, generator=generator).to(dtype)
        out = layer(x)
        out.backward(grad_output)

        dense_x = x.detach().clone().requires_grad_()
        dense_out = torch.nn.functional.linear(dense_x, layer.dequantize_weight(dtype))
        dense_out.backward(grad_output)
        torch.testing.assert_close(out, dense_out)
        torch.testing.assert_close(x.grad, dense_x.grad)


def record_saved_tensors():
    """A context that lists every tensor autograd saves for backward, and the list."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), saved


def test_gptq_linear_saves_nothing_for_backward(gptq_checkpoint):
    _, path = gptq_checkpoint
    layer = our_model(path).model.layers[0].mlp.down_proj
    hooks, saved = record_saved_tensors()
    x = torch.randn(3, layer.in_features, requires_grad=True)
    with hooks:
        out = layer(x)
    out.sum().backward()
    assert [tuple(t.shape) for t in saved] == []
    assert x.grad is not None


def test_lora_on_gptq_layers_leaves_gptqmodel_unimported():
    """Where gptqmodel is installed PEFT imports it for every LoRA target (to ask whether the layer is gptqmodel's),
    and that import sets PYTORCH_ALLOC_CONF; train.py, evaluation and export wrap our layers with it hidden."""
    checkpoint = gptq_dir("4bit-g128-actorder")
    result = run_python(f"""
        import os, sys
        from peft import LoraConfig, get_peft_model
        from finetune import load_model
        from finetune.models.adapter import peft_without_gptqmodel
        def wrapped():
            lora = LoraConfig(r=4, target_modules=["q_proj", "down_proj"])
            return get_peft_model(load_model({str(checkpoint)!r}, device="cpu"), lora)
        with peft_without_gptqmodel():
            model = wrapped()
        print("RESULT", type(model.base_model.model.model.layers[0].mlp.down_proj).__name__,
              "gptqmodel" in sys.modules, repr(os.environ["PYTORCH_ALLOC_CONF"]))
        wrapped()  # PEFT's own behaviour, which the test would miss if PEFT stopped importing gptqmodel
        print("RESULT", "gptqmodel" in sys.modules, "garbage_collection_threshold" in os.environ["PYTORCH_ALLOC_CONF"])
        """, PYTORCH_ALLOC_CONF="")
    assert result.returncode == 0, result.stderr[-3000:]
    results = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]  # gptqmodel prints too
    assert results == ["RESULT Linear False ''", "RESULT True True"]


def test_model_backward_keeps_no_weight_sized_tensor():
    """Through a whole decoder, what autograd keeps is activations and the model's own parameters, never a
    dequantised weight."""
    path = gptq_dir("3bit-g32-actorder")
    model = load_model(path, device="cpu", dtype=torch.float32)
    ids = prompt_ids(path)[:, :8]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    own = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    smallest_weight = min(m.in_features * m.out_features for m in model.modules() if isinstance(m, GPTQLinear))
    hooks, saved = record_saved_tensors()
    with hooks:
        logits = model(inputs_embeds=embeds).logits
    logits[0, -1].logsumexp(-1).backward()
    # activations are [batch, tokens, ...]; a dense weight (or its transpose) would be a 2-D matrix
    kept = [tuple(t.shape) for t in saved if t.data_ptr() not in own and t.is_floating_point() and t.dim() == 2
            and t.numel() >= smallest_weight]
    assert saved and kept == []
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def pubmedqa_abstracts(count: int = 20) -> list[str]:
    """The first `count` abstracts (contexts, conclusion excluded) of PubMedQA's expert-labelled set."""
    records = json.loads((default_data_root() / "pubmedqa" / "ori_pqal.json").read_text())
    return [" ".join(record["CONTEXTS"]) for record in list(records.values())[:count]]


def perplexity(model: torch.nn.Module, tokenizer, texts: list[str], max_tokens: int = 128) -> float:
    """Token-level perplexity over the first `max_tokens` of each text, in one padded batch (a GPTQ model
    dequantises every weight once per forward)."""
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1]
    labels = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
    return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item())


def test_smollm2_gptq_perplexity_stays_close_to_fp16(record_property):
    texts = pubmedqa_abstracts()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    fp16 = perplexity(AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32), tokenizer, texts)
    gptq = perplexity(our_model(gptq_dir(SMOLLM2_GPTQ)), tokenizer, texts)
    record_property("perplexity", {"fp16": fp16, "gptq": gptq})
    print(f"SmolLM2-135M-Instruct perplexity on {len(texts)} PubMedQA abstracts (first 128 tokens): "
          f"fp16 {fp16:.3f}, GPTQ 4-bit g128 act-order {gptq:.3f} ({gptq / fp16 - 1:+.1%})")
    assert 5 < fp16 < 60  # a working language model on biomedical text
    # A 135M model loses far more to 4-bit g128 than a 70B one: gptqmodel 7.7 gives +29% here (32.7 -> 42.1;
    # +23% on whole abstracts). Measured levers: mse=2.4 +16% (twice the build time); calibrating on 100 real
    # PubMedQA abstracts outside these 20 +26% (3x the build time); that and sym=False +23%. Our dequantisation
    # equals gptqmodel's exactly (above), so the loss is the quantiser's. A wrong unpacking or zero point gives
    # hundreds.
    assert gptq <= 1.32 * fp16  # measured 1.290 quantised in fp32 on the CPU (1.285 in fp16), deterministically


# --- malformed checkpoints and requests ---

def random_checkpoint(root: Path) -> Path:
    """A cheap 1-layer GPTQ checkpoint (4-bit, g32, act-order, v1), two shards and an index."""
    model_config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=64)
    return write_random_gptq_checkpoint(root / "ckpt", model_config, GPTQConfig(bits=4, group_size=32, desc_act=True))


def set_quantization(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def drop_quantization(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))


BAD_CHECKPOINTS = {
    "bits-5": (lambda p: set_quantization(p, bits=5),
               "{p}/config.json: bits=5 is not supported; GPTQ bits must be one of 2, 3, 4, 8"),
    "awq": (lambda p: set_quantization(p, quant_method="awq"),
            "{p}/config.json: quant_method is 'awq'; this toolkit loads GPTQ checkpoints only (pick a GPTQ branch, "
            "e.g. TheBloke/meditron-70B-GPTQ)"),
    "group-size-0": (lambda p: set_quantization(p, group_size=0),
                     "{p}/config.json: group_size=0 is invalid; use -1 (one group) or a positive row count "
                     "such as 128"),
    "marlin": (lambda p: set_quantization(p, checkpoint_format="marlin"),
               "{p}/config.json: checkpoint_format='marlin' is not supported; use one of gptq, gptq_v2 (convert others "
               "with gptqmodel first)"),
    "qweight-not-matching-bits": (
        lambda p: set_quantization(p, bits=8),  # the tensors are packed 4-bit
        "model.layers.0.self_attn.q_proj.qweight has shape (8, 64), expected (16, 64) for bits=8, group_size=32: "
        "the quantization config does not match the weights (fix config.json or re-download)"),
    "missing-shard": (lambda p: (p / "model-00001-of-00002.safetensors").unlink(),
                      "{p}: shard model-00001-of-00002.safetensors listed in model.safetensors.index.json is missing "
                      "(1 of 2); finish the download"),
    "no-config": (lambda p: (p / "config.json").unlink(),
                  "{p}: no config.json; point to a model directory or Hub repo id"),
    "not-gptq": (drop_quantization,
                 "{p}: no quantization_config in config.json and no quantize_config.json; this is not a GPTQ "
                 "checkpoint (load it with transformers directly)"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_fails_with_its_message(case, tmp_path):
    path = random_checkpoint(tmp_path)
    load_model(path, device="cpu")  # the intact checkpoint loads
    corrupt, message = BAD_CHECKPOINTS[case]
    corrupt(path)
    with pytest.raises(GPTQFormatError) as err:
        load_model(path, device="cpu")
    assert str(err.value) == message.format(p=path)


BAD_REQUESTS = {
    "bits-5": ({"bits": 5}, GPTQFormatError,
               "quantize_to_gptq: bits=5 is not supported; GPTQ bits must be one of 2, 3, 4, 8"),
    "group-size-0": ({"group_size": 0}, GPTQFormatError,
                     "quantize_to_gptq: group_size=0 is invalid; use -1 (one group) or a positive row count "
                     "such as 128"),
    "format-marlin": ({"checkpoint_format": "marlin"}, GPTQFormatError,
                      "quantize_to_gptq: checkpoint_format='marlin' is not supported; use one of gptq, gptq_v2 "
                      "(convert others with gptqmodel first)"),
    "no-calibration": ({"calibration_texts": []}, ValueError,
                       "calibration_texts is empty; pass some text in the model's domain (a few hundred paragraphs "
                       "is plenty)"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_quantisation_request_fails_before_any_work(case, tiny_llama, tmp_path):
    changes, error, message = BAD_REQUESTS[case]
    request = {"bits": 4, "group_size": 128, "desc_act": True, "calibration_texts": ["a short medical text"]}
    with pytest.raises(error) as err:
        quantize_to_gptq(tiny_llama, tmp_path / "out", **{**request, **changes})
    assert str(err.value) == message
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a staging directory


def test_quantise_refuses_sources_it_cannot_use(tiny_llama, tmp_path):
    request = {"bits": 4, "group_size": 128, "desc_act": True, "calibration_texts": ["a short medical text"]}
    quantised = random_checkpoint(tmp_path)
    with pytest.raises(ValueError) as err:
        quantize_to_gptq(quantised, tmp_path / "out", **request)
    assert str(err.value) == f"{quantised} is already quantised (gptq); pass the full-precision model (merge or " \
                             "dequantise first)"

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_llama, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(FileNotFoundError) as err:
        quantize_to_gptq(no_tokenizer, tmp_path / "out", **request)
    assert str(err.value) == f"{no_tokenizer}: no tokenizer (gptqmodel loads it with the weights); save it there " \
                             "with tokenizer.save_pretrained"

    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(FileExistsError) as err:
        quantize_to_gptq(tiny_llama, existing, **request)
    assert str(err.value) == f"{existing} already exists; remove it or choose another output directory"
