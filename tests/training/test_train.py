"""Training end to end on the CPU.

On SmolLM2-135M-Instruct as 4-bit GPTQ (the smoke recipe's model): a short run (conftest's, shared with the evaluation
tests) whose loss on the answers falls and whose adapter, reloaded with plain PEFT on a freshly loaded GPTQ base,
gives the trained model's logits, and the run directory it leaves. On a tiny random GPTQ Llama shaped like Meditron
where it matters (lm_head untied, a tokenizer without ChatML tokens), cheap enough to train several times: the dry
run under `accelerate launch`, the added tokens' own rows, and packing without attention across examples. (Runs
killed and resumed: tests/test_reliability.py.)
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gptq_fixtures import llama_style_tokenizer
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig

import finetune
from finetune.config.recipe import RecipeError, compose_recipe
from finetune.gptq import GPTQConfig
from finetune.gptq.random_checkpoint import write_random_gptq_checkpoint
from finetune.models.source import model_source
from finetune.training import budget, host_steps, sft

REPO = Path(__file__).resolve().parents[2]


def logits(model, input_ids, position_ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0]


def forward(model, batch):
    """Logits and loss (on the answer tokens) of a packed batch."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                     use_cache=False)


# --- SmolLM2-135M-Instruct GPTQ ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_run(smoke_training):
    """conftest's short `smoke` training (three steps of one 256-token row, a slice scored at step 2)."""
    run_dir, trainer = smoke_training
    trainer.model.eval()
    # two training examples as the trainer's collator packs them: one row, position_ids restarting at 0
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    return run_dir, trainer, batch, forward(trainer.model, batch)


def test_run_directory(smollm2_run):
    run_dir = smollm2_run[0]
    assert sorted(p.name for p in run_dir.iterdir()) == ["adapter", "checkpoints", "config.yaml", "loss_curve.png",
                                                         "metrics.json"]
    assert (run_dir / "config.yaml").read_text().startswith("# finetune/train.py recipe=smoke train.max_steps=3")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in (run_dir / "adapter").iterdir()}
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["peft_type"] == "LORA"
    assert sorted(adapter_config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                        "up_proj", "v_proj"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [entry["step"] for entry in metrics["loss"]] == [1, 2, 3] and [e["step"] for e in metrics["eval"]] == [2]
    assert all(0 < entry["loss"] < 10 for entry in metrics["loss"])
    assert metrics["summary"]["step"] == 3
    # this process's steps: time, tokens/s from TRL's token count, host memory; no GPU fast path on the CPU
    assert [entry["step"] for entry in metrics["speed"]] == [1, 2, 3] and metrics["fast_path"] is None
    assert all(entry["seconds"] > 0 and entry["tokens_per_s"] > 0 and entry["host_rss_gib"] > 0.1
               and entry["gc_s"] >= 0 for entry in metrics["speed"])
    # the time beside training, each on its step: the slice scored at step 2, the checkpoint saved at step 3
    assert [sorted(set(entry) & {"eval_s", "save_s"}) for entry in metrics["speed"]] == [[], ["eval_s"], ["save_s"]]
    assert metrics["speed"][1]["eval_s"] == metrics["eval"][0]["eval/seconds"] > 0
    assert metrics["speed"][2]["save_s"] > 0
    assert metrics["data"]["pubmedqa"] == {"benchmark": "pubmedqa", "split": "train_dev",
                                           "source": str(REPO / "data" / "smoke_pubmedqa.json"), "examples": 30,
                                           "skipped_rows": 0, "skipped": [], "dropped_without_explanation": 0}
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()
    assert not list(run_dir.glob(".*"))  # no temp files left behind
    with pytest.raises(RecipeError, match="already holds a run"):  # and it is never overwritten
        sft.prepare(compose_recipe("smoke", [f"output_dir={run_dir}"]))


def test_training_lowers_the_loss_on_the_answers(smollm2_run):
    _, trainer, batch, trained = smollm2_run
    with trainer.model.disable_adapter():
        before = forward(trainer.model, batch).loss.item()
    assert trained.loss.item() < 0.7 * before, (before, trained.loss.item())


def test_saved_adapter_reloads_with_plain_peft(smollm2_run):
    run_dir, _, batch, trained = smollm2_run
    base = finetune.load_model(model_source(compose_recipe("smoke")), device="cpu")
    reloaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    assert torch.equal(forward(reloaded, batch).logits, trained.logits)


# --- a tiny Meditron-shaped GPTQ checkpoint --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meditron_like(tmp_path_factory):
    """A tiny random GPTQ Llama (4-bit, g32, act-order) with lm_head untied from the embedding and a Llama-2-style
    tokenizer that lacks <|im_start|> / <|im_end|>, as Meditron's does."""
    tokenizer = llama_style_tokenizer()
    model_dir = tmp_path_factory.mktemp("meditron-like")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=False)
    write_random_gptq_checkpoint(model_dir, config, GPTQConfig(bits=4, group_size=32, desc_act=True))
    tokenizer.save_pretrained(model_dir)
    return model_dir


def tiny_run(model_dir: Path, output_dir: Path, *overrides: str):
    # three steps at a high learning rate: the added tokens' rows and the LoRA matrices move far from their start
    return compose_recipe("smoke", [f"model.name={model_dir}", f"output_dir={output_dir}", "train.max_steps=3",
                                    "train.save_steps=1", "train.learning_rate=1e-2", "lora.dropout=0.1",
                                    *overrides])


@pytest.fixture(scope="module")
def tiny_trained(meditron_like, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    trainer = sft.train(tiny_run(meditron_like, run_dir, "profile_step=2"))
    trainer.model.eval()
    return run_dir, trainer


def test_profile_step_writes_where_the_time_went(tiny_trained):
    run_dir = tiny_trained[0]
    report = (run_dir / "profile.txt").read_text().splitlines()
    wall = float(report[0].split()[3])
    assert report[0] == f"one optimiser step: {wall:.3f} s wall" and 0 < wall < 60
    # no GPU here: every device-time kind is zero, and the op table is sorted by CPU time instead
    assert [line.split()[-2] for line in report[3:9]] == ["0.000"] * 6
    assert any("aten::mm" in line for line in report) and any("Self CPU" in line for line in report)
    trace = json.loads((run_dir / "profile_trace.json").read_text())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])


def test_dry_run_under_accelerate_launch(meditron_like, tmp_path):
    out = tmp_path / "never-written"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_config.yaml"),
         str(REPO / "finetune" / "train.py"), "recipe=smoke", "train.dry_run=true", f"model.name={meditron_like}",
         f"output_dir={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)  # cwd outside the repo: finds data/
    assert result.returncode == 0, result.stderr[-3000:]
    stdout = result.stdout
    assert "config ok; data: 30 examples pubmedqa=30 (skipped 0)" in stdout
    assert "example 1: " in stdout and "example 2: " in stdout and "example 3: " not in stdout
    assert "  masked  '<s><|im_start|>system\\nYou are a biomedical researcher." in stdout
    assert "<|im_start|>answer\\n'\n  TRAINED 'The answer is " in stdout
    assert "estimated memory at max_length=512: " in stdout and "quantised weights" in stdout
    assert "dry run ok: 2 steps, loss " in stdout
    assert not out.exists()


def test_added_chatml_tokens_train_only_their_rows_and_travel_with_the_adapter(meditron_like, tiny_trained):
    run_dir, trainer = tiny_trained
    vocab = len(AutoTokenizer.from_pretrained(meditron_like))
    assert trainer.processing_class.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [vocab, vocab + 1]
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    embed_key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    head_key = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"
    assert sorted(key for key in saved if "trainable_tokens" in key) == [head_key, embed_key]
    model = trainer.model.base_model.model
    for key, layer in ((embed_key, model.model.embed_tokens), (head_key, model.lm_head)):
        adapter = layer.token_adapter
        assert adapter.token_indices["default"] == [vocab, vocab + 1]
        trained = adapter.trainable_tokens_delta["default"].detach()
        assert trained.shape == (2, 64) and not torch.equal(trained, adapter.trainable_tokens_original["default"])
        assert torch.equal(saved[key], trained)

    # a user's reload: the adapter's tokenizer, the fresh GPTQ base resized to it, plain PEFT
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    base = finetune.load_model(meditron_like, device="cpu")
    base.resize_token_embeddings(len(tokenizer))
    reloaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    ids = tokenizer("<|im_start|>question\nIs it?<|im_end|>\n<|im_start|>answer\n", return_tensors="pt")["input_ids"]
    assert torch.equal(logits(reloaded, ids), logits(trainer.model, ids))


def test_packed_examples_do_not_attend_to_each_other(tiny_trained):
    _, trainer = tiny_trained
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3  # packed rows of 512 tokens hold several ~200-token examples
    second = slice(starts[1], starts[2])
    packed = logits(trainer.model, batch["input_ids"], batch["position_ids"])
    alone = logits(trainer.model, batch["input_ids"][:, second])
    torch.testing.assert_close(packed[second], alone, atol=1e-5, rtol=1e-5)
    # the same row read as one long sequence mixes the examples: the check above can see contamination
    mixed = logits(trainer.model, batch["input_ids"])
    assert (mixed[second] - alone).abs().max() > 1e-3


def test_gc_timer_counts_collections_and_leaves_when_training_raises(tmp_path):
    """RunReport.timing_gc: the collector's seconds go into the next step's gc_s, and the timer is gone from
    gc.callbacks after a training that raised (the Trainer's on_train_end does not run then)."""
    import gc

    from finetune.training.run_report import RunReport
    report = RunReport(tmp_path, {}, title="t")
    with pytest.raises(RuntimeError, match="stopped"), report.timing_gc():
        assert report.time_gc in gc.callbacks
        for _ in range(3):
            gc.collect()
        raise RuntimeError("stopped")
    assert report.time_gc not in gc.callbacks
    collected = report.gc_s
    assert collected > 0 and report.step_speed(1, None)["gc_s"] == round(collected, 3)
    gc.collect()  # the timer is off: nothing more is counted
    assert report.gc_s == 0


def test_metrics_are_rewritten_at_every_log_and_the_plot_at_most_every_interval_at_saves_and_at_the_end(tmp_path):
    """Drawing loss_curve.png at every log left the GPU idle (~0.1 s a step at logging_steps=1): between its
    redraws the plot waits, and a checkpoint or the end of training brings it up to date. metrics.json never
    waits: a run killed at any moment leaves every step it logged."""
    from transformers import TrainerControl, TrainerState

    from finetune.training.run_report import RunReport
    report, state, control = RunReport(tmp_path, {}, title="t", plot_every_s=3600), TrainerState(), TrainerControl()
    plot = tmp_path / "loss_curve.png"

    def log(step: int, loss: float) -> None:
        state.global_step = step
        state.log_history.append({"loss": loss, "step": step})
        report.on_log(None, state, control, logs=state.log_history[-1])
        assert [entry["step"] for entry in json.loads((tmp_path / "metrics.json").read_text())["loss"]] == list(
            range(1, step + 1))

    log(1, 2.0)
    first_plot = plot.read_bytes()
    assert first_plot[:8] == b"\x89PNG\r\n\x1a\n"
    log(2, 1.5)
    log(3, 1.0)
    assert plot.read_bytes() == first_plot  # within the interval
    report.on_save(None, state, control)
    saved_plot = plot.read_bytes()
    assert saved_plot != first_plot
    log(4, 0.5)
    assert plot.read_bytes() == saved_plot
    report.on_train_end(None, state, control)
    assert plot.read_bytes() != saved_plot and [entry["step"] for entry in report.speed] == [1, 2, 3, 4]


def test_frozen_heap_freezes_what_the_warmup_steps_keep_and_unfreezes_at_the_end():
    """The collector's full passes skip the heap alive at training start and after each warm-up step; objects
    made later stay collectable; nothing stays frozen once training ends, even when it ends in an error."""
    import gc

    from transformers import TrainerControl, TrainerState

    kept = []
    with pytest.raises(RuntimeError, match="stopped"), host_steps.frozen_heap(warmup_steps=2) as freeze:
        assert gc.get_freeze_count() > 0
        for step in (1, 2, 3):
            kept.append([[] for _ in range(1000)])  # what a step makes and keeps
            freeze.on_step_end(None, TrainerState(global_step=step), TrainerControl())
        # the collector's generations (frozen objects are outside them); by identity, not by counts, which any
        # object another thread frees or makes in the meantime would move
        collectable = {id(obj) for obj in gc.get_objects()}
        frozen = [id(lists) not in collectable and id(lists[0]) not in collectable for lists in kept]
        raise RuntimeError("stopped")
    assert frozen == [True, True, False]  # the warm-up steps' objects frozen, the third step's not
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("use_dora", [False, True])
def test_train_and_eval_walk_the_modules_only_when_one_changes_mode(monkeypatch, use_dora):
    """The Trainer calls model.train() at every step: after skip_unchanged_mode_switch the walk over the modules
    runs only when some module is in the other mode, and train() / eval() still reach every module. A model with
    DoRA (whose train() clears a cache) keeps the walk."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_dropout=0.1, use_dora=use_dora,
                                                                target_modules=["q_proj", "down_proj"]))
    host_steps.skip_unchanged_mode_switch(model)
    assert ("train" in vars(model)) is not use_dora
    walks = []
    walk = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda module, mode=True: walks.append(mode) or walk(module, mode))
    modes = []
    one_module = model.base_model.model.model.layers[1].mlp.down_proj
    for switch in (model.eval, model.eval, model.train, model.train, one_module.eval, model.train):
        walks.clear()
        switch()
        modes.append(({m.training for m in model.modules()}, bool(walks)))
    assert modes == [({False}, True), ({False}, use_dora), ({True}, True), ({True}, use_dora), ({True, False}, True),
                     ({True}, True)]
    twin = copy.deepcopy(model)  # its train() switches the copy, not the original
    twin.eval()
    assert {m.training for m in twin.modules()} == {False} and {m.training for m in model.modules()} == {True}


def test_a_one_gpu_budget_below_the_model_fails_before_loading(meditron_like, tmp_path):
    """The fast path's check before loading (budget.check_one_gpu_memory, from the checkpoint's headers): a budget
    below the model, its adapter with AdamW's state and the plan's 2 GiB of headroom is refused in one line;
    a budget above it passes on to the plan."""
    for gib in (1.0, 2.5):
        cfg = tiny_run(meditron_like, tmp_path / "run", f"gpu.memory_budget_gib={gib}")
        if gib == 1.0:
            with pytest.raises(RecipeError) as error:
                budget.check_one_gpu_memory(cfg, meditron_like)
        else:
            budget.check_one_gpu_memory(cfg, meditron_like)
    assert str(error.value) == (
        "gpu.memory_budget_gib=1 cannot hold this model on one GPU: its weights, adapter and AdamW state take ~2.0 GiB "
        "with the fast path's headroom, before any activation (estimate); shard it over several GPUs (accelerate "
        "launch --config_file accelerate_fsdp.yaml), pick a lower-bit model.revision, or use a larger card")
    with pytest.raises(RecipeError, match=r"^90% of this GPU \(36\.0 GiB\) cannot hold this model on one GPU: .* "
                                          r"take ~39\.7 GiB"):
        budget.check_model_fits(37.7, 36.0, default_budget=True)  # 70B 4-bit on a 40 GB card
    budget.check_model_fits(37.7, 40.0, default_budget=False)  # a 48 GB card's: the plan decides after loading
