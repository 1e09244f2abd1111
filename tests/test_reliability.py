"""Reliability, as a new user and a long GPU run meet it.

Bad inputs: one table of what a user gets wrong with each of the five entry scripts -- config values and types,
paths, branches, data rows, adapters that do not match the base or are damaged, outputs that exist or are in use.
Each exits with code 2 and one line on stderr naming the cause and the fix, and leaves the output location exactly
as it was. They run through the scripts' main() in-process (fast); the ones marked `subprocess` as a user runs
them, to prove the exit code and that no traceback gets out.

Faults: a training SIGKILLed at a step, inside a checkpoint save, half way through the trainer state, or while
writing its final adapter resumes to the bit-identical adapter of an uninterrupted run; a second training on a
running one's directory is refused, and the lock dies with its process; an artifact-cache build killed part-way
leaves no entry, and the next build makes it. (A killed export: tests/release/test_export.py.)
"""

import json
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import signal
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from export_fixtures import make_base, make_run
from safetensors.torch import load_file

from finetune import describe, evaluate, export, publish, train
from finetune.config.files import hold_lock, lock_holder
from finetune.config.recipe import RUN_LOCK, compose_recipe, last_checkpoint
from finetune.models.cache import cache_key, cache_root, cached_dir
from finetune.training import sft
from tests.subprocesses import REPO, pythonpath_with

MAINS = {"train": train.main, "evaluate": evaluate.main, "export": export.main, "publish": publish.main,
         "describe": describe.main}


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny random GPTQ base and a finished run on it, and damaged copies of both."""
    root = tmp_path_factory.mktemp("reliability")
    base = make_base(root / "base", layers=2)
    run = make_run(root / "run", base)
    truncated_base = Path(shutil.copytree(base, root / "truncated-base"))
    shard = truncate(min(truncated_base.glob("*.safetensors")))
    corrupt_run = Path(shutil.copytree(run, root / "corrupt-run"))
    adapter_weights = truncate(corrupt_run / "adapter" / "adapter_model.safetensors")
    garbled_run = Path(shutil.copytree(run, root / "garbled-run"))
    adapter_config = garbled_run / "adapter" / "adapter_config.json"
    adapter_config.write_text(adapter_config.read_text()[:40])
    other_base_run = root / "other-base-run"  # its config names another model than its adapter was trained on
    other_base_run.mkdir()
    (other_base_run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(base), str(root)))
    (other_base_run / "adapter").symlink_to(run / "adapter")
    unfinished_run = root / "unfinished-run"  # killed before it saved adapter/
    unfinished_run.mkdir()
    shutil.copy(run / "config.yaml", unfinished_run)
    rows = json.loads((REPO / "data" / "smoke_pubmedqa.json").read_text())
    rows["90000003"]["final_decision"] = "perhaps"
    bad_rows = root / "bad_rows.json"
    bad_rows.write_text(json.dumps(rows))
    export_dir = Path(shutil.copytree(run / "adapter", root / "export"))
    (export_dir / "README.md").write_text("---\nlicense: llama2\n---\n# an export\n")
    return {"root": root, "base": base, "run": run, "truncated_base": truncated_base, "shard": shard,
            "corrupt_run": corrupt_run, "adapter_weights": adapter_weights, "garbled_run": garbled_run,
            "adapter_config": adapter_config, "other_base_run": other_base_run, "unfinished_run": unfinished_run,
            "bad_rows": bad_rows, "export": export_dir}


# --- setups: what exists at the output location before the command runs --------------------------------------------


def existing_run(out: Path, stack: ExitStack) -> None:
    out.mkdir()
    (out / "config.yaml").write_text("# a run\n")


def existing_evaluation(out: Path, stack: ExitStack) -> None:
    out.mkdir()
    (out / "summary.json").write_text("{}")


def a_file(out: Path, stack: ExitStack) -> None:
    out.write_text("not a directory")


def running_training(out: Path, stack: ExitStack) -> None:
    """A run in progress: config.yaml and a checkpoint, its lock held (here by this process, on its own file
    descriptor, which flock treats as another holder)."""
    (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    (out / "config.yaml").write_text("# a run\n")
    stack.enter_context(hold_lock(out / RUN_LOCK))


@dataclass
class Case:
    script: str
    args: list[str]
    message: str  # the whole stderr line after "error: "; a trailing "..." matches the start only
    setup: object = None  # setup(out, stack): what is at the output location beforehand
    subprocess: bool = False


TRAIN = ["recipe=smoke", "model.name={base}", "output_dir={out}"]
EVAL = ["recipe=smoke", "model.name={base}", "eval.benchmarks=[pubmedqa_smoke]", "output_dir={out}"]
EXPORT = ["run={run}", "output_dir={out}"]
LORA_TARGETS = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
REVISION_FIX = "drop model.revision (or point model.name at the Hub repo of that branch)"

CASES = {
    # train.py: recipe values and types
    "train-negative-rank": Case("train", [*TRAIN, "lora.r=-4"], "lora.r=-4 must be a rank of at least 1; pass e.g. "
                                "lora.r=16", subprocess=True),
    "train-zero-alpha": Case("train", [*TRAIN, "lora.alpha=0"], "lora.alpha=0 must be > 0 (LoRA scales its update "
                             "by alpha/r); pass e.g. lora.alpha=16"),
    "train-dropout": Case("train", [*TRAIN, "lora.dropout=1.5"], "lora.dropout=1.5 must be in [0, 1); pass e.g. "
                          "lora.dropout=0.05"),
    "train-profile-step-zero": Case("train", [*TRAIN, "profile_step=0"], "profile_step=0 should be an optimiser "
                                    "step number >= 1 (e.g. 5, after warm-up), or null for no profile"),
    "train-profile-after-end": Case("train", [*TRAIN, "train.max_steps=3", "profile_step=9"], "profile_step=9 is "
                                    "after the run's last step (train.max_steps=3); pass profile_step=3"),
    "train-no-targets": Case("train", [*TRAIN, "lora.target_modules=[]"], "lora.target_modules is empty; list the "
                             "linear layers to adapt, e.g. lora.target_modules=[q_proj,v_proj]"),
    "train-target-not-in-model": Case("train", [*TRAIN, "lora.target_modules=[q_proj,qkv_proj]"],
                                      "lora.target_modules: 'qkv_proj' is not a linear layer of {base}; pick from "
                                      + LORA_TARGETS),
    "train-unknown-key": Case("train", [*TRAIN, "lora.rr=3"], "unknown key 'lora.rr'; lora has: r, alpha, dropout, "
                              "target_modules (top-level keys: ..."),
    "train-wrong-type": Case("train", [*TRAIN, "train.learning_rate=fast"],
                             "train.learning_rate='fast' should be a number"),
    "train-scheduler": Case("train", [*TRAIN, "train.lr_scheduler_type=sideways"],
                            "train: sideways is not a valid SchedulerType, please select one of ..."),
    "train-gpu-memory": Case("train", [*TRAIN, "gpu.memory_budget_gib=-1"], "gpu.memory_budget_gib=-1 should be a "
                             "number of GiB >= 0, or null for the default"),
    "train-unknown-recipe": Case("train", ["recipe=medqaa", "output_dir={out}"], "no recipe 'medqaa'; pick one of: "
                                 "medmcqa, medqa, pubmedqa, smoke (or pass a path to a .yaml)"),
    "train-option": Case("train", [*TRAIN, "--lr", "3"], "unknown option '--lr'; options are key=value overrides "
                         "(see --help)"),
    # train.py: models, branches, damaged weights
    "train-no-model": Case("train", ["recipe=smoke", "model.name={root}/nowhere", "output_dir={out}"],
                           "{root}/nowhere: not a model directory nor a Hub repo id like 'owner/name'; check the path"),
    "train-branch-of-a-folder": Case("train", [*TRAIN, "model.revision=gptq-4bit-32g-actorder_True"],
                                     "model.revision=gptq-4bit-32g-actorder_True applies to Hub repos only, but "
                                     "model.name={base} is a local directory; " + REVISION_FIX),
    "train-branch-of-built-in": Case("train", ["recipe=smoke", "model.revision=gptq-3bit", "output_dir={out}"],
                                     "model.revision=gptq-3bit applies to Hub repos only, but model.name=smollm2-135m-"
                                     "instruct-gptq is a built-in model; " + REVISION_FIX),
    "train-truncated-shard": Case("train", ["recipe=smoke", "model.name={truncated_base}", "output_dir={out}"],
                                  "{shard} is truncated or corrupted (Error while deserializing header: incomplete "
                                  "metadata, file not fully covered); download or write it again"),
    # train.py: data
    "train-no-split": Case("train", [*TRAIN, "data.train.pubmedqa.split=bogus"],
                           "data.train.pubmedqa: pubmedqa has no split 'bogus'..."),
    "train-bad-row": Case("train", [*TRAIN, "data.train.pubmedqa.options.path={bad_rows}"],
                          "data.train.pubmedqa: {bad_rows} row 3 (PMID 90000003): final_decision 'perhaps' is not one "
                          "of yes/no/maybe; fix: correct or remove that row, or load with on_bad_row=skip"),
    "train-answers-cut": Case("train", [*TRAIN, "train.max_length=16"],
                              "train.max_length=16 cuts every example before its answer, so nothing would train; "
                              "raise it (the longest example is ..."),
    # train.py: the output directory
    "train-existing-run": Case("train", TRAIN, "output_dir {out} already holds a run; pass a new output_dir=... or "
                               "resume=true to continue it", existing_run),
    "train-resume-nothing": Case("train", [*TRAIN, "resume=true"], "resume=true but {out} holds no run (no "
                                 "config.yaml); pass the output_dir of an earlier run, or drop resume=true"),
    "train-output-is-a-file": Case("train", TRAIN, "output_dir {out} is a file; pass a directory path (it is created "
                                   "if missing)", a_file),
    "train-running": Case("train", [*TRAIN, "resume=true"], "output_dir {out} is in use by a running training "
                          "(process {pid}); wait for it to end, or pass another output_dir=...", running_training),
    # evaluate.py
    "eval-unknown-benchmark": Case("evaluate", [*EVAL[:2], "eval.benchmarks=[nope]", EVAL[3]],
                                   "unknown benchmark 'nope' in eval.benchmarks; pick from ...", subprocess=True),
    "eval-mode": Case("evaluate", [*EVAL, "eval.mode=beam"], "eval.mode='beam' is not one of loglik, generate, sc..."),
    "eval-limit": Case("evaluate", [*EVAL, "eval.limit=0"], "eval.limit=0 must be an integer of at least 1..."),
    "eval-batch-size": Case("evaluate", [*EVAL, "eval.batch_size=0"], "eval.batch_size=0 must be an integer of at "
                            "least 1..."),  # null (the default) picks one for the device
    "eval-batch-size-type": Case("evaluate", [*EVAL, "eval.batch_size=many"], "eval.batch_size='many' must be an "
                                 "integer of at least 1..."),
    "eval-temperature": Case("evaluate", [*EVAL, "eval.mode=sc", "eval.sc.temperature=0"],
                             "eval.sc.temperature=0 must be > 0..."),
    "eval-no-adapter": Case("evaluate", [*EVAL, "adapter={root}/nowhere"], "adapter={root}/nowhere: no such "
                            "directory, and not a Hub repo id like 'owner/name'"),
    "eval-adapter-of-another-base": Case("evaluate", ["recipe=medqa", "adapter={run}", "output_dir={out}"],
                                         "adapter {run} was trained on {base}@main, but the recipe's model is "
                                         "TheBloke/meditron-70B-GPTQ@gptq-4bit-128g-actorder_True; pass the recipe it "
                                         "was trained with (recipe=...), or model.name=... model.revision=..."),
    "eval-truncated-adapter": Case("evaluate", [*EVAL, "adapter={corrupt_run}"], "{adapter_weights} is truncated or "
                                   "corrupted (Error while deserializing header: incomplete metadata, file not fully "
                                   "covered); download or write it again"),
    "eval-garbled-adapter-config": Case("evaluate", [*EVAL, "adapter={garbled_run}"],
                                        "{adapter_config} is truncated or corrupted (...", ),
    "eval-missing-data": Case("evaluate", [*EVAL[:2], "eval.benchmarks=[medqa4]", "data.data_root=/nowhere",
                                           EVAL[3]],
                              "benchmark medqa4: medqa4 test: /nowhere/medqa/US/4_options/phrases_no_exclude_test.jsonl"
                              " not found..."),
    "eval-branch-of-a-folder": Case("evaluate", [*EVAL, "model.revision=main"], "model.revision=main applies to Hub "
                                    "repos only, but model.name={base} is a local directory; " + REVISION_FIX),
    "eval-finished-output": Case("evaluate", EVAL, "output_dir {out} already holds an evaluation (summary.json); "
                                 "pass a new output_dir=...", existing_evaluation),
    # export.py
    "export-kind": Case("export", [*EXPORT, "export.kind=lora"], "export.kind='lora' is not one of adapter, merged, "
                        "gptq"),
    "export-bits": Case("export", [*EXPORT, "export.kind=gptq", "export.bits=5"], "export.bits=5 is not one of 2, "
                        "3, 4, 8"),
    "export-bits-type": Case("export", [*EXPORT, "export.kind=gptq", "export.bits=four"], "export.bits: ..."),
    "export-shard-size": Case("export", [*EXPORT, "export.kind=merged", "export.max_shard_size=huge"],
                              "export.max_shard_size='huge': use a size such as 2GB or 500MB"),
    "export-unknown-key": Case("export", [*EXPORT, "export.kind=merged", "export.colour=red"],
                               "unknown key 'export.colour'; valid keys: run, output_dir, export.kind, ..."),
    "export-no-kind": Case("export", EXPORT, "export.kind is required; pass export.kind=..."),
    "export-no-run": Case("export", ["run={root}/nowhere", "output_dir={out}", "export.kind=adapter"],
                          "run={root}/nowhere has no config.yaml; pass a training run directory (train.py output_dir)"),
    "export-unfinished-run": Case("export", ["run={unfinished_run}", "output_dir={out}", "export.kind=merged"],
                                  "no adapter in run {unfinished_run}: {unfinished_run}/adapter/adapter_config.json is "
                                  "missing; let the training finish (it saves adapter/ at the end), or pass the run "
                                  "that holds one"),
    "export-adapter-of-another-base": Case("export", ["run={other_base_run}", "output_dir={out}", "export.kind=merged"],
                                           "the adapter in {other_base_run}/adapter was trained on {base}@main, but "
                                           "the run's config.yaml names {root}@main; pass the run that produced this "
                                           "adapter"),
    "export-truncated-adapter": Case("export", ["run={corrupt_run}", "output_dir={out}", "export.kind=adapter"],
                                     "{adapter_weights} is truncated or corrupted (Error while deserializing header: "
                                     "incomplete metadata, file not fully covered); download or write it again"),
    "export-existing-output": Case("export", [*EXPORT, "export.kind=adapter"], "output_dir {out} already exists; pass "
                                   "export.overwrite=true to replace it, or another output_dir", existing_run),
    "export-onto-the-run": Case("export", ["run={run}", "output_dir={root}", "export.kind=adapter",
                                           "export.overwrite=true"],
                                "output_dir {root} would replace the run itself; choose a directory outside {run}"),
    # publish.py
    "publish-no-path": Case("publish", ["repo=me/x"], "path is required; pass path=..."),
    "publish-missing-path": Case("publish", ["path={out}", "repo=me/x"], "path={out}: no such directory; pass the "
                                 "output_dir of finetune/export.py"),
    "publish-no-weights": Case("publish", ["path={out}", "repo=me/x"], "path={out} holds no exported weights "
                               "(adapter_model.safetensors or model.safetensors); pass the output_dir of "
                               "finetune/export.py", existing_run),
    "publish-repo-without-owner": Case("publish", ["path={export}", "repo=no-owner"], "repo='no-owner' is not a Hub "
                                       "repo id like 'user/name' (it needs the owner)"),
    "publish-unknown-key": Case("publish", ["path={export}", "repo=me/x", "visibility=public"],
                                "unknown key 'visibility'; valid keys: path, repo, private, dry_run, commit_message"),
    # describe.py
    "describe-missing": Case("describe", ["{out}"], "{out}: not a model directory nor a Hub repo id like "
                             "'owner/name'; check the path", subprocess=True),
    "describe-branch-of-a-folder": Case("describe", ["{base}", "--revision", "gptq-3bit"], "{base} is a local "
                                        "directory, but revision='gptq-3bit' names a Hub branch; drop the revision, "
                                        "or pass the Hub repo id"),
    "describe-seq-len-type": Case("describe", ["{base}", "--seq-len", "long"], "argument --seq-len: invalid int "
                                  "value: 'long'; see --help"),
    "describe-zero-gpus": Case("describe", ["{base}", "--gpus", "0"], "--gpus 0: give a number >= 1; see --help"),
    "describe-truncated-shard": Case("describe", ["{truncated_base}"], "{shard} is truncated or corrupted (Error "
                                     "while deserializing header: incomplete metadata, file not fully covered); "
                                     "download or write it again"),
}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` and its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_and_writes_nothing(name, world, tmp_path, capsys):
    case = CASES[name]
    out = tmp_path / "out"
    with ExitStack() as stack:
        if case.setup:
            case.setup(out, stack)
        places = {**world, "out": out, "pid": os.getpid()}
        args = [arg.format(**places) for arg in case.args]
        before = snapshot(world["root"]), snapshot(tmp_path)
        if case.subprocess:  # as a user runs it, from outside the repository
            result = subprocess.run([sys.executable, str(REPO / "finetune" / f"{case.script}.py"), *args],
                                    capture_output=True, text=True, cwd=tmp_path, check=False)
            code, err = result.returncode, result.stderr
            assert "Traceback" not in err, err[-3000:]
            err = err.strip().splitlines()[-1] + "\n"  # libraries' import-time warnings may come before it
        else:
            try:
                code = MAINS[case.script](args)
            except SystemExit as stop:  # argparse's way out
                code = stop.code
            err = capsys.readouterr().err
        assert (snapshot(world["root"]), snapshot(tmp_path)) == before  # nothing written, nothing removed
    assert code == 2
    assert err.count("\n") == 1, err
    message = "error: " + case.message.format(**places)
    if message.endswith("..."):
        assert err.startswith(message[:-3]), err
    else:
        assert err == message + "\n"


# --- faults: SIGKILL during training, then resume=true ------------------------------------------------------------


@pytest.fixture(scope="module")
def killer():
    """Child processes forked from a server that has imported torch, transformers and the toolkit once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["kill_points"])
    # The server is a fresh interpreter that imports its preload before it takes this process's sys.path (Python
    # 3.11), and skips a module it cannot find: started with tests/ on PYTHONPATH it finds kill_points, instead of
    # every child importing it again (~8 s each on two cores).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", pythonpath_with(Path(__file__).parent))
        multiprocessing.forkserver.ensure_running()
    return context


def run_overrides(base: Path, out: Path, *extra: str) -> list[str]:
    # three steps, a checkpoint after each; dropout on, so resuming must restore the RNG as well as weights,
    # optimizer, scheduler and data position
    return [f"model.name={base}", f"output_dir={out}", "train.max_steps=3", "train.save_steps=1",
            "train.learning_rate=1e-2", "lora.dropout=0.1", "train.save_total_limit=3", *extra]


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    sft.train(compose_recipe("smoke", run_overrides(world["base"], out)))
    return out, load_file(out / "adapter" / "adapter_model.safetensors")


def killed(killer, target, *args) -> None:
    child = killer.Process(target=target, args=args)
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL, f"the child ended with {child.exitcode}, not by SIGKILL"


def test_training_killed_at_every_point_resumes_to_the_identical_adapter(killer, world, uninterrupted, tmp_path,
                                                                          capsys):
    """One run killed again and again, each time continued with resume=true: before its first checkpoint; held at
    the end of step 2 (where another train.py on its directory is refused, even with resume=true) and SIGKILLed
    from outside; inside checkpoint-2's save; half way through checkpoint-2's trainer_state.json; while writing
    its final adapter. Its adapter and losses are an uninterrupted run's, bit for bit."""
    import kill_points
    out = tmp_path / "run"
    overrides = run_overrides(world["base"], out)
    killed(killer, kill_points.train_and_die, "step-1", overrides)
    assert (out / "config.yaml").is_file() and last_checkpoint(out) is None  # resume=true starts over

    overrides = run_overrides(world["base"], out, "resume=true")
    ready = killer.Event()
    child = killer.Process(target=kill_points.train_and_die, args=("hold-at-step-2", overrides, ready))
    child.start()
    try:
        assert ready.wait(timeout=300), "the run never reached step 2"
        for extra in ([], ["resume=true"]):
            assert train.main(["recipe=smoke", *run_overrides(world["base"], out, *extra)]) == 2
            assert capsys.readouterr().err == (f"error: output_dir {out} is in use by a running training (process "
                                               f"{child.pid}); wait for it to end, or pass another output_dir=...\n")
    finally:
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL
    assert (out / RUN_LOCK).exists() and lock_holder(out / RUN_LOCK) is None  # the dead run's lock blocks no one

    for kill_point, resumes_from in (("hold-at-step-2", "checkpoint-1"),  # checked here, after the kill above
                                     ("checkpoint-2", "checkpoint-1"),  # checkpoint-2 has no optimizer state
                                     ("trainer-state-2", "checkpoint-1"),  # its trainer_state.json is cut off
                                     ("final-adapter", "checkpoint-3")):  # all steps done, adapter/ half written
        if kill_point != "hold-at-step-2":
            killed(killer, kill_points.train_and_die, kill_point, overrides)
        assert last_checkpoint(out).name == resumes_from, kill_point
        assert not (out / "adapter").exists()

    sft.train(compose_recipe("smoke", overrides))
    reference_dir, reference = uninterrupted
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert reference.keys() == resumed.keys()  # LoRA matrices and the added tokens' rows
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)
    assert any(key.endswith("lora_B.weight") and resumed[key].abs().sum() > 0 for key in resumed)  # it trained
    # the report covers the whole run, the steps before each kill included
    losses = [e["loss"] for e in json.loads((out / "metrics.json").read_text())["loss"]]
    assert losses == [e["loss"] for e in json.loads((reference_dir / "metrics.json").read_text())["loss"]]
    assert len(losses) == 3
    assert not list(out.glob(".*")) and not list((out / "checkpoints").glob(".*"))  # no lock, no staging left


# --- faults: the artifact cache --------------------------------------------------------------------------------------


def test_killed_cache_build_leaves_no_entry_and_is_rebuilt(tmp_path, monkeypatch):
    import kill_points
    monkeypatch.setenv("MEDITRON_FINETUNE_CACHE", str(tmp_path))
    settings = {"case": "killed build"}
    # a plain fork: the child only writes files before it dies, and needs no imports of its own
    killed(multiprocessing.get_context("fork"), kill_points.build_and_die, str(tmp_path), settings)
    entry = cache_root() / f"killed-build-{cache_key(settings)}"
    staging = list(tmp_path.glob(".killed-build-*.building-*"))
    assert not entry.exists() and len(staging) == 1  # the half-built entry is visible only as staging

    def build(path):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"whole")

    assert cached_dir("killed-build", settings, build) == entry
    assert (entry / "model.safetensors").read_bytes() == b"whole"
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # the dead build's staging is cleared
