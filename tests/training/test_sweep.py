"""Sweeps: bad specs refused before any run, in one line; a real sweep of the `smoke` recipe (on a tiny random GPTQ
Llama: the sweep is plumbing, and each run is its own train.py process; one optimiser step a run) whose two good
runs train although a third fails, evaluated with the base model on the same questions and compared."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaConfig

from finetune.config.recipe import RecipeError
from finetune.gptq.format import GPTQConfig
from finetune.gptq.random_checkpoint import write_random_gptq_checkpoint
from finetune.training.sweep import check_evaluation, devices, plan, run_name

REPO = Path(__file__).resolve().parents[2]


def test_combinations_and_their_names(tmp_path):
    sweep = plan(["recipe=smoke", "lora.r=8,16", "train.learning_rate=1e-4,3e-4", "train.max_steps=2",
                  f"output_dir={tmp_path / 'sweep'}"])
    assert sweep.swept == ["lora.r", "train.learning_rate"] and sweep.fixed == ["train.max_steps=2"]
    assert [run.name for run in sweep.runs] == [
        "lora.r-8_train.learning_rate-0.0001", "lora.r-8_train.learning_rate-0.0003",
        "lora.r-16_train.learning_rate-0.0001", "lora.r-16_train.learning_rate-0.0003"]
    assert sweep.runs[3].overrides == ["lora.r=16", "train.learning_rate=0.0003"]
    assert sweep.runs[0].output_dir == str(tmp_path / "sweep" / "lora.r-8_train.learning_rate-0.0001")
    assert run_name(["lora.target_modules=[q_proj,v_proj]", "+train.optim=adafactor"]) == \
        "lora.target_modules-q_proj-v_proj_train.optim-adafactor"
    assert not (tmp_path / "sweep").exists()  # planning writes nothing


@pytest.mark.parametrize("args, message", [
    (["lora.r=8"], "nothing to sweep: give a key several values"),
    (["lora.r=8,16", "nokey=1,2"], "sweep run lora.r-8_nokey-1: unknown key 'nokey'"),
    (["lora.r=8,sixteen"], "sweep run lora.r-sixteen: lora.r='sixteen' should be an integer"),
    (["lora.r=8,16", "output_dir=a,b"], "output_dir cannot be swept"),
    (["lora.r=interval(1,2)"], "only lists of values sweep"),
    (["lora.r=8,,16"], "Error parsing override 'lora.r=8,,16'; sweep values are key=a,b"),
])
def test_bad_sweep_specs_fail_before_any_run(tmp_path, args, message):
    with pytest.raises(RecipeError, match=message):
        plan(["recipe=smoke", f"output_dir={tmp_path / 'sweep'}", *args])
    assert not (tmp_path / "sweep").exists()


def test_evaluate_and_gpus_are_checked_too(tmp_path):
    sweep = plan(["recipe=smoke", "eval.limit=2,4", f"output_dir={tmp_path / 'sweep'}"])
    with pytest.raises(RecipeError, match="--evaluate scores every run with one .* but the sweep varies eval.limit"):
        check_evaluation(sweep)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "old").write_text("")
    with pytest.raises(RecipeError, match="already holds files; pass a new output_dir"):
        plan(["recipe=smoke", "lora.r=8,16", f"output_dir={tmp_path / 'sweep'}"])
    with pytest.raises(RecipeError, match="--gpus 7: GPU 7 is not visible"):
        devices("7")


def test_a_sweep_trains_every_good_run_lists_the_failed_one_and_compares_them(tiny_llama, tmp_path):
    model = tmp_path / "tiny-gptq"  # 2 layers, 4-bit g32 act-order, random weights; the tiny fixture's ChatML BPE
    write_random_gptq_checkpoint(model, LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                                    tie_word_embeddings=False),
                                 GPTQConfig(bits=4, group_size=32, desc_act=True), seed=1)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(model)
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(REPO / "finetune" / "sweep.py"), "recipe=smoke", "lora.r=4,8,-1", f"model.name={model}",
         "train.max_steps=1", "lora.target_modules=[q_proj,v_proj]", "train.save_steps=100",
         "eval.benchmarks=[pubmedqa_smoke]", "eval.limit=2",
         f"output_dir={sweep_dir}", "--evaluate"], capture_output=True, text=True, check=False)
    print(result.stdout)
    assert result.returncode == 1, result.stderr[-3000:]  # one run failed
    assert "FAILED lora.r-1 (exit 2): error: lora.r=-1" in result.stdout
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(r["name"], r["status"]) for r in summary["runs"]] == [("lora.r-4", "ok"), ("lora.r-8", "ok"),
                                                                   ("lora.r-1", "failed")]
    assert summary["runs"][2]["error"].startswith("error: lora.r=-1")
    for name, r in (("lora.r-4", 4), ("lora.r-8", 8)):
        assert f"r: {r}\n" in (sweep_dir / name / "config.yaml").read_text()
        assert json.loads((sweep_dir / name / "adapter" / "adapter_config.json").read_text())["r"] == r
    # the base model and both runs, on the same two questions
    rows = {row["run"]: row for row in csv.DictReader((sweep_dir / "comparison.csv").open())}
    assert list(rows) == ["base", "lora.r-4", "lora.r-8"]
    assert [rows[k]["lora.r"] for k in rows] == ["–", "4", "8"]
    for name in ("base", "lora.r-4", "lora.r-8"):
        evaluated = json.loads((sweep_dir / "evaluation" / name / "summary.json").read_text())["pubmedqa_smoke"]
        assert float(rows[name]["pubmedqa_smoke.accuracy"]) == evaluated["accuracy"] and evaluated["n"] == 2
    assert rows["lora.r-8"]["pubmedqa_smoke.p_vs_reference"] != "" and float(rows["lora.r-8"]["final_loss"]) > 0
    assert (sweep_dir / "evaluation" / "comparison.md").read_text() == (sweep_dir / "comparison.md").read_text()
