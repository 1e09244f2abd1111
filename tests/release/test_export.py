"""Export of a training run: adapter, merged (streamed, layer by layer) and re-quantised GPTQ weights, their parity
with the adapter on its GPTQ base, the model card, and what a failed or killed export leaves behind (nothing)."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from export_fixtures import make_base, make_run
from gptq_fixtures import gptq_dir
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune import load_model
from finetune.config.cli import compose_config
from finetune.config.recipe import compose_recipe
from finetune.data import chatml
from finetune.export import main as export_main
from finetune.gptq import read_gptq_config
from finetune.gptq.checkpoint_info import describe_checkpoint
from finetune.gptq.format import GPTQConfig
from finetune.models.adapter import attach_adapter
from finetune.release.exporter import ExportConfig, ExportError, check_free_disk, estimate_bytes, export
from finetune.release.merge import stream_merge
from finetune.release.model_card import build_model_card, paper_results, validate_card

REPO = Path(__file__).resolve().parents[2]
EXPORT = str(REPO / "finetune" / "export.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = make_base(root / "base")
    return base, make_run(root / "run", base)


def run_export(run: Path, out: Path, kind: str, *extra: str) -> Path:
    cfg = compose_config(ExportConfig, [f"run={run}", f"output_dir={out}", f"export.kind={kind}", *extra])
    return export(cfg)


def prompt_ids(run: Path, n: int = 2) -> list[torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    return [tokenizer(chatml.evaluation_prompt(item), return_tensors="pt")["input_ids"]
            for item in list(chatml.EXAMPLE_ITEMS.values())[:n]]


@torch.no_grad()
def reference_logits(base: Path, run: Path) -> list[torch.Tensor]:
    """What training computed: the adapter on the GPTQ base, fp32."""
    model = attach_adapter(load_model(str(base), device="cpu", dtype=torch.float32), run / "adapter").eval()
    return [model(ids).logits[0] for ids in prompt_ids(run)]


@pytest.fixture(scope="module")
def merged(tiny, tmp_path_factory):
    base, run = tiny
    return run_export(run, tmp_path_factory.mktemp("exports") / "merged-bf16", "merged", "export.parity_prompts=4",
                      "export.max_shard_size=100KB")


@pytest.mark.parametrize("checkpoint, use_rslora", [("random", False), ("random", True),
                                                    ("3bit-g128-actorder", False), ("8bit-g128", True)])
def test_fp32_merge_equals_adapter_on_gptq(tiny, tmp_path, checkpoint, use_rslora):
    """Dequantised with the project's layer, merged through PEFT (alpha/r, or alpha/sqrt(r) with rsLoRA): the
    same logits as training's forward within fp32 rounding. The random base lacks the ChatML tokens, so the
    trained token rows are merged too; the others are gptqmodel's own checkpoints (conftest's fixtures)."""
    base = tiny[0] if checkpoint == "random" else gptq_dir(checkpoint)
    run = make_run(tmp_path / "run", base, use_rslora=use_rslora, seed=3)
    out = tmp_path / "merged"
    out.mkdir()
    model = stream_merge(base, read_gptq_config(base), run / "adapter", out, torch.float32, 10**9)
    model.config.save_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.vocab_size == len(AutoTokenizer.from_pretrained(run / "adapter"))  # random: 320 + 2 ChatML
    with torch.no_grad():
        for ids, want in zip(prompt_ids(run), reference_logits(base, run)):
            got = merged(ids).logits[0]
            assert torch.allclose(got, want, atol=2e-5 * want.abs().max(), rtol=0), (got - want).abs().max()


def test_merged_bf16_is_the_fp32_merge_rounded_once(tiny, merged, tmp_path):
    base, run = tiny
    fp32 = run_export(run, tmp_path / "merged-fp32", "merged", "export.dtype=float32", "export.parity_prompts=0")
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded at export.max_shard_size
    exact = {}
    with safe_open(fp32 / "model.safetensors", "pt") as f:
        exact = {k: f.get_tensor(k) for k in f.keys()}
    assert set(exact) == set(index["weight_map"])
    for name, shard in index["weight_map"].items():
        with safe_open(merged / shard, "pt") as f:
            stored = f.get_tensor(name)
        assert stored.dtype == torch.bfloat16
        assert torch.equal(stored, exact[name].to(torch.bfloat16)), name  # one rounding, from the exact fp32 merge
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    parity = json.loads((merged / "parity.json").read_text())
    assert parity["prompts"] == 4 and parity["prompt_source"].startswith("held-out: pubmedqa test")
    assert parity["mean_kl"] < 1e-3 and parity["top1_agreement"] > 0.9  # bf16 rounding only


def test_merged_export_loads_without_the_toolkit(tiny, merged):
    """A fresh interpreter with transformers alone reproduces the adapter-on-GPTQ logits (bf16 weights)."""
    base, run = tiny
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(merged)!r}, dtype=torch.float32).eval()\n"
        "ids = torch.load(sys.argv[1])\n"
        "torch.save([model(i).logits[0].detach() for i in ids], sys.argv[2])\n"
        "assert 'finetune' not in sys.modules, 'the toolkit was imported'\n"
        "print('ok', 'finetune' in sys.modules)\n")
    ids = prompt_ids(run)
    torch.save(ids, merged.parent / "ids.pt")
    result = subprocess.run([sys.executable, "-c", script, str(merged.parent / "ids.pt"),
                             str(merged.parent / "out.pt")], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok False")
    for got, want in zip(torch.load(merged.parent / "out.pt"), reference_logits(base, run)):
        assert (got - want).abs().max() < 0.02 * want.abs().max()  # bf16 weights
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_adapter_export_loads_with_plain_peft(tiny, tmp_path):
    base, run = tiny
    out = run_export(run, tmp_path / "adapter", "adapter")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"} <= \
        {p.name for p in out.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == chatml.CHAT_TEMPLATE
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert any("trainable_tokens_delta" in k for k in f.keys())  # the trained ChatML rows travel along
    ours = load_model(str(base), device="cpu", dtype=torch.float32)
    theirs = hf_gptq_model(base)  # the card's usage example: transformers + optimum + gptqmodel, no toolkit
    for model in (ours, theirs):
        model.resize_token_embeddings(len(tokenizer))
    ours, theirs = PeftModel.from_pretrained(ours, out).eval(), PeftModel.from_pretrained(theirs, out).eval()
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        for ids, want in zip(prompt_ids(run), reference_logits(base, run)):
            assert torch.equal(ours(ids).logits[0], want)
            torch.testing.assert_close(theirs(ids).logits[0], want)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model_relation == "adapter"


def hf_gptq_model(path: Path):
    """The export as transformers + optimum + gptqmodel load it (gptqmodel's TorchLinear on the CPU)."""
    from transformers import GPTQConfig as HFGPTQConfig
    quantization = HFGPTQConfig(bits=read_gptq_config(path).bits, backend="gptq_torch")
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32,
                                                device_map="cpu").eval()


def test_gptq_export_loads_both_ways_and_reports_parity(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    base, run = tiny
    out = run_export(run, tmp_path / "gptq", "gptq", "export.bits=4", "export.group_size=32", "export.desc_act=true",
                     "export.calibration_samples=16", "export.parity_prompts=3")
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (quant["bits"], quant["group_size"], quant["desc_act"], quant["checkpoint_format"]) == (4, 32, True, "gptq")
    ours = load_model(str(out), device="cpu", dtype=torch.float32)
    theirs = hf_gptq_model(out)
    # gptqmodel torch.compiles its dequantisation; its eager code is the reference and needs no compile time
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        for ids in prompt_ids(run):
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)  # fp32 tolerances
    parity = json.loads((out / "parity.json").read_text())
    assert parity["export"] == "gptq" and parity["prompts"] == 3 and parity["positions"] > 100
    assert 0 < parity["mean_kl"] < 0.05 and parity["top1_agreement"] > 0.5
    card = (out / "README.md").read_text()
    assert "## Parity with the trained adapter" in card and f"{100 * parity['top1_agreement']:.2f}%" in card
    assert "| bits | 4 |" in card and "| group_size | 32 |" in card
    assert AutoTokenizer.from_pretrained(out).chat_template == chatml.CHAT_TEMPLATE
    assert not list(out.parent.glob(".gptq.*"))  # no staging or merged intermediate left


def test_card_content_and_metadata(tmp_path):
    """The card of a Meditron MedQA run: base and branch, quantisation, LoRA, data and licences, training
    settings, parity, the evaluation beside the paper, licence and advisory; metadata valid offline."""
    cfg = compose_recipe("medqa", [f"output_dir={tmp_path}"])
    evaluation = {"medqa4": {"accuracy": 0.6512, "n": 1273, "title": "MedQA (4 options)", "split": "test"},
                  "pubmedqa": {"accuracy": 0.774, "n": 500, "title": "PubMedQA", "split": "test"},
                  "pubmedqa_smoke": {"accuracy": 0.6, "n": 30, "title": "PubMedQA-format smoke sample"}}
    parity = {"prompts": 16, "positions": 4000, "mean_kl": 0.0012, "max_kl": 0.03, "top1_agreement": 0.991,
              "prompt_source": "held-out: medqa4 test"}
    card = build_model_card(
        kind="adapter", name="meditron-70b-medqa-lora", run_cfg=cfg, base_model="TheBloke/meditron-70B-GPTQ",
        revision="gptq-4bit-128g-actorder_True", base_quantisation=GPTQConfig(bits=4, group_size=128, desc_act=True),
        adapter_config={"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                        "trainable_token_indices": {"embed_tokens": [32000, 32001], "lm_head": [32000, 32001]}},
        export_settings={"kind": "adapter"}, parity=parity, evaluation=evaluation, final_loss=0.8123,
        repo_id="me/meditron-70b-medqa-lora")
    parsed = validate_card(card)
    data = parsed.data.to_dict()
    assert data["license"] == "llama2" and data["library_name"] == "peft"
    assert data["base_model"] == "TheBloke/meditron-70B-GPTQ" and data["datasets"] == ["GBaker/MedQA-USMLE-4-options"]
    assert "medical" in data["tags"] and data["model-index"][0]["results"]
    results = {r.dataset_type: r.metric_value for r in parsed.data.eval_results}
    assert results == {"GBaker/MedQA-USMLE-4-options": 65.12, "qiaojin/PubMedQA": 77.4}
    text = parsed.text
    for expected in ("branch `gptq-4bit-128g-actorder_True`", "| group size | 128 |", "| r | 16 |", "| alpha | 32 |",
                     '{"embed_tokens": [32000, 32001]', "`GBaker/MedQA-USMLE-4-options`", "MIT (jind11/MedQA)",
                     "| learning_rate | 0.0001 |", "| final training loss | 0.8123 |",
                     "| 0.0012 | 0.03 | 99.10% | 4000 |",
                     "| MedQA (4 options) | 65.1 | 70.2 |", "| PubMedQA (reasoning-required) | 77.4 | 81.6 |",
                     "| MedMCQA | — | 66.0 |", "| MMLU-Medical | — | 77.6 |", "| PubMedQA-format smoke sample | 60.0 | — |",
                     "Llama 2 Community Licence Agreement",
                     "not** fit for clinical use", "advisory only", "## Intended use and limits",
                     "PeftModel.from_pretrained(base, 'me/meditron-70b-medqa-lora')",
                     chatml.evaluation_prompt(chatml.EXAMPLE_ITEMS["medqa"])):
        assert expected in text, expected
    assert set(paper_results()) == {"pubmedqa", "medmcqa", "medqa", "medqa4", "mmlu_medical"}
    with pytest.raises(ValueError, match="model card metadata lacks 'license'"):
        validate_card(ModelCard(str(card).replace("license: llama2\n", "")))


def test_merged_card_of_the_tiny_run(merged):
    card = ModelCard.load(merged / "README.md")
    assert card.data.license == "llama2" and card.data.library_name == "transformers"
    assert card.data.base_model is None  # a local base has no Hub id to link
    assert "## Parity with the trained adapter" in card.text and "| dtype | bfloat16 |" in card.text


def test_overwrite_replaces_an_export_whole(tiny, tmp_path):
    _, run = tiny
    out = run_export(run, tmp_path / "export", "adapter")
    (out / "from-before.txt").write_text("old")
    assert run_export(run, out, "adapter", "export.overwrite=true") == out
    assert (out / "adapter_model.safetensors").is_file() and not (out / "from-before.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging or old copy left beside it


def test_disk_estimate_and_free_space_check(tiny, merged, tmp_path):
    base, run = tiny
    info = describe_checkpoint(str(base))
    cfg = compose_config(ExportConfig, ["run=x", "output_dir=y", "export.kind=merged"])
    estimate = estimate_bytes(info, "merged", cfg.export, added_rows=2, adapter_bytes=0)
    actual = sum(p.stat().st_size for p in merged.glob("model-*.safetensors"))
    assert 0.97 < estimate / actual < 1.03  # tensor bytes; the files add only their headers
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    check_free_disk(tmp_path / "new", free // 2, "the merged export")
    with pytest.raises(ExportError, match=r"^not enough free disk for the merged export: it needs about "
                                          r"[\d.]+ GB, .* GB free; free some space or choose an output_dir"):
        check_free_disk(tmp_path / "new", free + 10**12, "the merged export")


# --- streaming memory, and failures part-way ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mid_size(tmp_path_factory):
    """24 layers, hidden 512: 76M parameters, 151 MB dense in bf16, one layer 12.6 MB in fp32."""
    root = tmp_path_factory.mktemp("mid")
    base = make_base(root / "base", layers=24, hidden=512, intermediate=1536)
    return base, make_run(root / "run", base)


MEMORY_PROBE = r"""
import json, sys, threading, time, os
import torch
from finetune.gptq import read_gptq_config
from finetune.release.merge import stream_merge
from transformers import AutoModelForCausalLM

page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

def peak_during(fn):
    peak, done = [rss()], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)
    thread = threading.Thread(target=sample)
    start = rss()
    thread.start()
    result = fn()
    done.set(); thread.join()
    return max(peak[0], rss()) - start, result

warm_base, warm_adapter, base, adapter, out = map(__import__("pathlib").Path, sys.argv[1:6])
# a first merge of a tiny model: what gets imported and initialised lazily is not the merge's memory
(out.parent / "warm-up").mkdir()
stream_merge(warm_base, read_gptq_config(warm_base), warm_adapter, out.parent / "warm-up", torch.bfloat16, 2**20)
out.mkdir()
merge_peak, merged = peak_during(
    lambda: stream_merge(base, read_gptq_config(base), adapter, out, torch.bfloat16, 8 * 2**20))
merged.config.save_pretrained(out)
def load_and_run():  # the dense model, every weight touched
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        model(torch.arange(8)[None])
    return model
dense_peak, _ = peak_during(load_and_run)
print(json.dumps({"merge_peak": merge_peak, "dense_load_peak": dense_peak}))
"""


def test_merge_peak_memory_stays_near_one_layer(tiny, mid_size, tmp_path):
    base, run = mid_size
    config = json.loads((base / "config.json").read_text())
    hidden, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    layer_params = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn
    dense_bf16 = 2 * (layers * layer_params + 2 * config["vocab_size"] * hidden)
    # glibc keeps freed blocks below its mmap threshold, which it raises up to 32 MiB as blocks are freed, so RSS
    # would count memory the merge no longer holds; a fixed threshold makes RSS follow what is live (a 70B model's
    # tensors, hundreds of MiB each, are above any threshold anyway)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tiny[0]), str(tiny[1] / "adapter"), str(base),
                             str(run / "adapter"), str(tmp_path / "m")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    mib = {k: round(v / 2**20, 1) for k, v in {**peaks, "dense_bf16": dense_bf16,
                                               "one_layer_fp32": 4 * layer_params}.items()}
    print(f"merge memory (MiB): {mib}")
    assert peaks["dense_load_peak"] > 0.9 * dense_bf16  # the measurement sees a dense model
    # held while merging: one linear's weight and LoRA delta in fp32 (of a 12 MiB layer), an 8 MiB shard and its
    # serialisation, the adapter: measured 41-48 MiB
    assert peaks["merge_peak"] < 0.5 * dense_bf16, mib


def test_killed_export_leaves_no_partial_target(mid_size, tmp_path):
    base, run = mid_size
    out = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, EXPORT, f"run={run}", f"output_dir={out}", "export.kind=merged",
                             "export.max_shard_size=8MB", "export.parity_prompts=0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not list(tmp_path.glob(".merged.export-*/model-00002.safetensors")):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    staging = list(tmp_path.glob(".merged.export-*"))
    assert staging, "the export never reached its second shard"
    assert not out.exists()
    # the next export clears the dead process's staging folder and completes
    assert export_main([f"run={run}", f"output_dir={out}", "export.kind=adapter"]) == 0
    assert out.is_dir() and not any(p.exists() for p in staging)


def test_export_failing_on_a_full_disk_leaves_nothing(tiny, tmp_path):
    """A file-size limit makes every write past 64 KiB fail with EFBIG, as a full disk fails with ENOSPC."""
    base, run = tiny

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "merged"
    result = subprocess.run([sys.executable, EXPORT, f"run={run}", f"output_dir={out}", "export.kind=merged",
                             "export.parity_prompts=0"], capture_output=True, text=True, preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the export failed while writing (") and "File too large" in last
    assert last.endswith(f"nothing was written to {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
