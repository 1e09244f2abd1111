"""Hydra recipes: composition, overrides, and the one-line errors for bad overrides and values."""

import importlib.util
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.config.recipe import (
    RecipeError,
    available_recipes,
    check_gpu_settings,
    check_run_dir,
    compose_recipe,
    split_args,
    usage,
)
from finetune.training import sft

REPO = Path(__file__).resolve().parents[2]
# the entry script's main(), in-process (test_train.py runs it as a script under accelerate launch)
_spec = importlib.util.spec_from_file_location("train_script", REPO / "finetune" / "train.py")
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)


def test_every_recipe_composes_onto_base():
    assert available_recipes() == ["medmcqa", "medqa", "pubmedqa", "smoke"]
    for name in ("medqa", "medmcqa", "pubmedqa"):
        cfg = compose_recipe(name)
        assert cfg.model.name == "TheBloke/meditron-70B-GPTQ"
        assert cfg.model.revision == "gptq-4bit-128g-actorder_True"
        assert cfg.output_dir == f"runs/{name}"
        assert cfg.train.packing is True and cfg.train.activation_checkpointing is True
        assert cfg.train.adam_beta2 == 0.95 and cfg.train.weight_decay == 0.1  # from base.yaml
    assert compose_recipe("medqa").data.train.medqa.benchmark == "medqa4"
    medmcqa = compose_recipe("medmcqa").data.train.medmcqa
    assert medmcqa.explanation is True and medmcqa.options.require_explanation is True
    assert set(compose_recipe("pubmedqa").data.train) == {"pqa_a", "pqa_l"}
    smoke = compose_recipe("smoke")
    assert smoke.model.name == "smollm2-135m-instruct-gptq" and smoke.train.report_to == "none"


def test_overrides_reach_every_level():
    cfg = compose_recipe("medqa", ["model.revision=gptq-4bit-32g-actorder_True", "lora.r=32", "train.max_steps=100",
                                   "output_dir=/tmp/x", "lora.target_modules=[q_proj,v_proj]", "train.packing=false",
                                   "+train.optim=adafactor", "data.on_bad_row=skip",
                                   "+data.train.extra={benchmark:medmcqa,split:train,source:hub}"])
    assert cfg.model.revision == "gptq-4bit-32g-actorder_True" and cfg.lora.r == 32 and cfg.train.max_steps == 100
    assert list(cfg.lora.target_modules) == ["q_proj", "v_proj"] and cfg.train.packing is False
    assert cfg.output_dir == "/tmp/x" and cfg.data.on_bad_row == "skip"
    assert cfg.data.train.extra.benchmark == "medmcqa" and set(cfg.data.train) == {"medqa", "extra"}
    assert OmegaConf.is_struct(cfg)


def test_recipe_given_as_a_path_builds_on_base(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("defaults:\n  - base\n  - _self_\noutput_dir: runs/mine\nmodel:\n  name: me/my-gptq\n")
    cfg = compose_recipe(str(mine), ["lora.r=4"])
    assert cfg.model.name == "me/my-gptq" and cfg.lora.r == 4 and cfg.train.max_length == 2048
    with pytest.raises(RecipeError, match=r"^unknown key 'lora.rank'; lora has: r, alpha"):
        compose_recipe(str(mine), ["lora.rank=4"])


@pytest.mark.parametrize("overrides, message", [
    (["lora.rr=3"], "); fix the name, or add it with +lora.rr=..."),
    (["epochs=3"], "unknown key 'epochs' (top-level keys: output_dir, resume, seed, profile_step, model, data, lora, train,"),
    (["lora.r=abc"], "lora.r='abc' should be an integer"),
    (["train.packing=maybe"], "train.packing='maybe' should be true or false"),
    (["lora.target_modules=q_proj"], "lora.target_modules='q_proj' should be a list like [a,b]"),
    (["lora=3"], "lora=3 should be a mapping"),
    (["output_dir=null"], "output_dir must be set; pass output_dir=..."),
    (["~lora.r"], "lora.r was removed; every key of recipes/base.yaml stays (set it instead)"),
    (["lora.r"], "Error parsing override 'lora.r': overrides are key=value (see --help)"),
])
def test_bad_overrides_fail_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(RecipeError) as err:
        compose_recipe("smoke", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_recipe_file_and_argument_order():  # bad recipe names and options: tests/test_reliability.py
    with pytest.raises(RecipeError, match=r"recipe file nowhere/mine.yaml not found"):
        compose_recipe("nowhere/mine.yaml")
    assert split_args(["lora.r=2", "recipe=medqa"]) == ("medqa", ["lora.r=2"])
    assert split_args([]) == ("smoke", [])


def test_bad_training_arguments_fail_before_any_model_is_loaded(tmp_path):
    cfg = compose_recipe("smoke", ["train.lr_scheduler_type=sideways", f"output_dir={tmp_path}/run"])
    with pytest.raises(RecipeError, match=r"^train: sideways is not a valid SchedulerType, please select one of"):
        sft.prepare(cfg)
    cfg = compose_recipe("smoke", ["+train.not_an_argument=1", f"output_dir={tmp_path}/run"])
    with pytest.raises(RecipeError, match=r"^train: .*unexpected keyword argument 'not_an_argument'"):
        sft.prepare(cfg)
    cfg = compose_recipe("smoke", ["train.lr_scheduler_type=cosine", f"output_dir={tmp_path}/run"])
    with pytest.raises(RecipeError) as err:
        sft.prepare(cfg)
    assert str(err.value) == (
        "train.lr_scheduler_kwargs={'min_lr_rate': 0.1} do not fit lr_scheduler_type=cosine "
        "(get_cosine_schedule_with_warmup() got an unexpected keyword argument 'min_lr_rate'); change them, or drop "
        "them with ~train.lr_scheduler_kwargs")
    # train.* keys go to SFTConfig, which has a default for each: they may be dropped; the code's own may not
    assert "lr_scheduler_kwargs" not in compose_recipe("smoke", ["~train.lr_scheduler_kwargs"]).train
    with pytest.raises(RecipeError, match=r"^train.max_length was removed"):
        compose_recipe("smoke", ["~train.max_length"])


def test_multi_gpu_runs_do_not_rebroadcast_the_gptq_weights(tmp_path):
    # the packed GPTQ weights are buffers: DDP's default broadcast would send the whole model every step
    cfg = compose_recipe("smoke", [f"output_dir={tmp_path}/run"])
    assert sft.sft_config(cfg, tmp_path).ddp_broadcast_buffers is False
    cfg = compose_recipe("smoke", ["+train.ddp_broadcast_buffers=true", f"output_dir={tmp_path}/run"])
    assert sft.sft_config(cfg, tmp_path).ddp_broadcast_buffers is True  # the recipe may still ask for it


def test_without_a_gpu_the_recipe_keeps_its_own_checkpointing(tmp_path):
    # the fast path replaces train.activation_checkpointing only where it runs (a CUDA GPU); on the CPU the
    # recipe's value stands, gpu.fast_path=true or not
    cfg = compose_recipe("medqa", [f"output_dir={tmp_path}/run"])
    assert cfg.gpu.fast_path and not sft.fast_path_runs(cfg)
    assert sft.sft_config(cfg, tmp_path).activation_checkpointing is True


def test_the_step_loop_does_not_wait_for_the_gpu_to_filter_the_logged_loss(tmp_path):
    # the Trainer's NaN/inf filter reads the loss after every backward, so the GPU idles while the host clips and
    # steps; the recipes log the loss as it is
    cfg = compose_recipe("medqa", [f"output_dir={tmp_path}/run"])
    assert sft.sft_config(cfg, tmp_path).logging_nan_inf_filter is False


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_gpu_fast_path_without_the_gpu_extra_fails_before_loading():
    cfg = compose_recipe("smoke")
    with pytest.raises(RecipeError, match=r"^gpu.fast_path=true needs liger-kernel on a GPU machine: pip install "
                                          r"-e '.\[gpu\]' \(or gpu.fast_path=false"):
        check_gpu_settings(cfg, on_gpu=True)
    check_gpu_settings(cfg, on_gpu=False)  # the CPU path needs no extra
    check_gpu_settings(compose_recipe("smoke", ["gpu.fast_path=false"]), on_gpu=True)


def test_gpu_memory_sizes_are_checked_before_loading():  # memory_budget_gib=-1: tests/test_reliability.py
    with pytest.raises(RecipeError, match=r"^gpu\.host_memory_gib='lots' should be a number of GiB >= 0, or null"):
        check_gpu_settings(compose_recipe("smoke", ["gpu.host_memory_gib=lots"]), on_gpu=False)
    check_gpu_settings(compose_recipe("smoke", ["gpu.host_memory_gib=24", "gpu.memory_budget_gib=24"]), on_gpu=False)


def test_unreachable_hub_model_fails_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no Hub: fail at once instead of timing out
    cfg = compose_recipe("medqa", ["model.revision=gptq-4bit-32g-actorder_True", f"output_dir={tmp_path}/run"])
    with pytest.raises(Exception) as err:
        sft.prepare(cfg)
    assert "TheBloke/meditron-70B-GPTQ: cannot download from the Hub" in str(err.value)
    assert "pass its local directory" in str(err.value)


def test_data_errors_name_the_entry():
    cases = {"data.train.pubmedqa.options.path=/nowhere.json": "data.train.pubmedqa: /nowhere.json not found",
             "+data.train.x={benchmark:medqa4,split:train,sorce:hub}": "data.train.x: unknown key 'sorce'",
             "data.on_bad_row=ignore": "data.train.pubmedqa: on_bad_row='ignore' is not one of error, skip"}
    for override, message in cases.items():
        with pytest.raises(RecipeError) as err:
            sft.load_training_data(compose_recipe("smoke", [override]))
        assert str(err.value).startswith(message), str(err.value)


def test_smoke_data_is_the_projects_own_sample():
    dataset, report = sft.load_training_data(compose_recipe("smoke"))
    assert len(dataset) == 30 and report["pubmedqa"]["examples"] == 30 and report["pubmedqa"]["skipped_rows"] == 0
    assert dataset[0]["prompt"].startswith("<|im_start|>system\n")
    assert dataset[0]["prompt"].endswith("<|im_start|>answer\n")
    assert dataset[0]["completion"] in {f"The answer is {a}.<|im_end|>" for a in ("yes", "no", "maybe")}


def test_output_dir_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    assert check_run_dir(compose_recipe("smoke", [f"output_dir={run}"])) is None  # fresh
    run.mkdir()
    (run / "config.yaml").write_text("x")
    with pytest.raises(RecipeError, match=rf"output_dir {run} already holds a run; pass a new output_dir=... or "
                                          "resume=true to continue it"):
        check_run_dir(compose_recipe("smoke", [f"output_dir={run}"]))
    resume = compose_recipe("smoke", [f"output_dir={run}", "resume=true"])
    assert check_run_dir(resume) is None  # killed before its first checkpoint: it starts over
    for step in (2, 4, 6):
        (run / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    # killed while saving: checkpoint-4 has no trainer_state.json yet, checkpoint-6 only the start of one
    (run / "checkpoints" / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6, "log_hi')
    assert check_run_dir(resume).name == "checkpoint-2"


def test_help_shows_usage_recipes_and_resolved_config(capsys):
    assert train_script.main(["recipe=medqa", "lora.r=64", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: accelerate launch finetune/train.py")
    assert "recipes: medmcqa, medqa, pubmedqa, smoke" in out
    assert "resolved config (recipe=medqa lora.r=64):" in out and "  r: 64\n" in out
    assert "revision: gptq-4bit-128g-actorder_True" in out
    assert "error: unknown key 'lora.bad'" in usage(["lora.bad=1", "--help"])


def test_saved_config_is_itself_a_recipe(tmp_path):
    from finetune.training.run_report import save_config
    cfg = compose_recipe("smoke", ["lora.r=4", f"output_dir={tmp_path / 'run'}"])
    save_config(cfg, tmp_path, "finetune/train.py recipe=smoke lora.r=4")
    assert (tmp_path / "config.yaml").read_text().startswith("# finetune/train.py recipe=smoke lora.r=4\n")
    again = compose_recipe(str(tmp_path / "config.yaml"))
    assert again == cfg
    assert not list(tmp_path.glob(".*.tmp"))
    assert os.listdir(tmp_path) == ["config.yaml"]
