"""Training speed of the product: `train.py recipe=medqa` itself on real packed MedQA rows, and the peer stack on the
same rows, in the same run.

    MEDQA_DATA_ROOT=../shared/data python -m finetune.bench.product_speed --layers 80 --steps 150 --out runs/product

Writes a random-weight GPTQ checkpoint of Llama-2-70B shape with a real tokenizer beside it (SmolLM2's by default:
values do not change speed; shapes and packing do), then runs, each in its own process:
  peer     transformers + optimum + gptqmodel (GPTQConfig(backend="auto_trainable"), sdpa) with the recipe's PEFT
           LoRA, under TRL's SFTTrainer with the recipe's SFTConfig and activation checkpointing: the same packed
           rows in the same order (same tokenizer, data and seed), for --peer-steps steps
  product  `accelerate launch finetune/train.py recipe=medqa model.name=<checkpoint> ...` with the recipe's
           defaults except: MedQA-4 from the local test file (the training split is on the Hub only), one row per
           optimiser step (gradient_accumulation_steps=1), no wandb
Both log every step (training.run_report: training seconds, tokens/s from TRL's token count, seconds spent on
evaluation, checkpoint saves and garbage collection, host RSS, pinned bytes, GPU peak). Prints and writes
(results.json, table.md in --out) tokens/s after the warm-up steps (over training time, and over the wall time),
the slowest step after warm-up against the median, host memory at the first and last step. A run still going at
--deadline-s is stopped and reported on the steps it logged. --synthetic also runs the benchmark loop
(bench.train_speed) on the same checkpoint. --baseline DIR (another revision's checkout) also runs that
checkout's train.py before and after this one's, A B A: two trees compared in one call, with the drift of the
machine over the call in plain view. --warm-up-run N first runs this checkout's train.py for N steps, not compared:
in the eleventh session's calls whichever train.py ran first in a call was ~2.4 % slower on the same rows than
the one after it, whatever the tree. --launch gives accelerate's own arguments for train.py instead of one process:
'--config_file accelerate_fsdp.yaml --num_processes 2' times the sharded run, '--multi_gpu --num_processes 2' data
parallel (tok/s over every GPU's tokens).
"""

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from finetune import REPO_ROOT
from finetune.bench.train_speed import run_worker, worker

TOKENIZER = "smollm2-135m-instruct"  # the built-in model's tokenizer (has <|im_start|>, <|im_end|>)
ONE_PROCESS = "--num_processes 1"  # accelerate launch's arguments for train.py unless --launch gives others


def recipe_overrides(checkpoint: str, steps: int) -> list[str]:
    """What the product run changes in recipe=medqa, and nothing else."""
    return [f"model.name={checkpoint}", "model.revision=null", "data.train.medqa.source=local",
            "data.train.medqa.split=test", f"train.max_steps={steps}", "train.gradient_accumulation_steps=1",
            "train.report_to=none"]


def summarise(speed: list[dict], warmup: int, profiled: int | None = None) -> dict:
    """tokens/s over the steps after `warmup` (training seconds; and over the wall time, evaluations and
    checkpoint saves included), the median and slowest step, the seconds the garbage collector took, and memory at
    the first and last logged step (training.run_report's per-step entries). The `profiled` step (profile_step=N,
    slowed by the profiler and the trace it writes) and the one before it (the profiler starts at its end, before
    its log) are left out of the figures."""
    left_out = {profiled - 1, profiled} if profiled else set()
    timed = [s for s in speed[warmup:] if s["step"] not in left_out]
    if not timed:
        return {"error": f"{len(speed)} steps logged, none after the {warmup} warm-up steps"}
    seconds = [s["seconds"] for s in timed]
    wall = sum(s["seconds"] + s.get("eval_s", 0) + s.get("save_s", 0) for s in timed)
    median = statistics.median(seconds)
    slowest = max(timed, key=lambda s: s["seconds"])
    tokens = sum(s["tokens_per_s"] * s["seconds"] for s in timed)
    first, last = speed[0], speed[-1]
    return {"steps": len(speed), "timed_steps": len(timed), "tokens_per_s": round(tokens / sum(seconds), 1),
            "wall_tokens_per_s": round(tokens / wall, 1),
            "median_step_s": round(median, 3), "slowest_step": slowest["step"],
            "slowest_step_s": slowest["seconds"], "slowest_over_median": round(slowest["seconds"] / median, 3),
            "slowest_gc_s": slowest.get("gc_s"), "gc_s": round(sum(s.get("gc_s", 0) for s in timed), 3),
            "beside_training_s": {s["step"]: {k: s[k] for k in ("eval_s", "save_s") if k in s}
                                  for s in timed if "eval_s" in s or "save_s" in s},
            "host_rss_gib": [first.get("host_rss_gib"), last.get("host_rss_gib")],
            "pinned_gib": [first.get("pinned_gib"), last.get("pinned_gib")],
            "gpu_peak_gib": max(s.get("gpu_peak_gib", 0) for s in speed),
            "alloc_retries": alloc_retries(speed, warmup),
            "tokens_per_s_by_step": [s.get("tokens_per_s") for s in speed]}


def alloc_retries(speed: list[dict], warmup: int) -> int | None:
    """How often the CUDA allocator ran out and freed its cache to retry (each a device-wide synchronisation) in the
    steps after `warmup`: the difference of the cumulative count logged per step."""
    counts = [s.get("gpu_alloc_retries") for s in speed]
    if None in counts or len(counts) <= warmup:
        return None
    return counts[-1] - (counts[warmup - 1] if warmup else 0)


# ------------------------------------------------------------------------------------------------ the peer

def peer_case(spec: dict) -> dict:
    """The peer stack through TRL's SFTTrainer on recipe=medqa's rows (run as a worker process)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import GPTQConfig as HFGPTQConfig
    from trl import SFTTrainer

    from finetune.config.recipe import compose_recipe, split_args
    from finetune.data import chatml
    from finetune.training import sft
    from finetune.training.run_report import RunReport

    out = Path(spec["out"]) / "peer"
    cfg = compose_recipe(*split_args(["recipe=medqa", *recipe_overrides(spec["checkpoint"], spec["steps"]),
                                      "gpu.fast_path=false", "train.save_strategy=no", f"output_dir={out}"]))
    prepared = sft.prepare(cfg)
    tokenizer = AutoTokenizer.from_pretrained(spec["checkpoint"])
    added = chatml.prepare_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        spec["checkpoint"], quantization_config=HFGPTQConfig(bits=spec["bits"], backend="auto_trainable"),
        device_map={"": 0} if torch.cuda.is_available() else "cpu",
        dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32, attn_implementation="sdpa")
    report = RunReport(out, prepared.data_report, title="peer")
    trainer = SFTTrainer(model=model, args=sft.sft_config(cfg, out), train_dataset=prepared.dataset,
                         processing_class=tokenizer, peft_config=sft.lora_config(cfg, model, added),
                         callbacks=[report])
    with report.timing_gc():
        trainer.train()
    return {"speed": report.speed}


# ------------------------------------------------------------------------------------------------ the product

def launch_command(launch: str, checkpoint: str, steps: int, run_dir: Path, extra: list[str]) -> list[str]:
    """`accelerate launch <launch> finetune/train.py recipe=medqa ...`: `launch` is accelerate's own arguments
    ("--num_processes 1", or e.g. "--config_file accelerate_fsdp.yaml --num_processes 2" for the sharded run)."""
    return [sys.executable, "-m", "accelerate.commands.launch", *shlex.split(launch), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "finetune/train.py", "recipe=medqa",
            *recipe_overrides(checkpoint, steps), f"output_dir={run_dir}", *extra]


def product_case(checkpoint: str, steps: int, out: Path, deadline: float, log, extra: list[str],
                 repo: Path = REPO_ROOT, name: str = "product", launch: str = ONE_PROCESS) -> dict:
    """`accelerate launch finetune/train.py recipe=medqa ...` from the checkout `repo` in its own process group,
    stopped at `deadline` (time.monotonic()), into out/`name`; its metrics.json holds every step it logged."""
    run_dir = out / name
    command = launch_command(launch, checkpoint, steps, run_dir, extra)
    env = os.environ | {"PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        "PYTHONUNBUFFERED": "1"}
    with open(out / f"{name}.log", "w") as output:
        proc = subprocess.Popen(command, cwd=repo, env=env, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            returncode = "stopped at the deadline"
            proc.wait()
    text = (out / f"{name}.log").read_text()
    log.write(f"\n===== {name}\n{text}\n")
    result = {"command": shlex.join(["accelerate", "launch", *command[3:]]), "returncode": returncode,
              "fast_path_lines": [line for line in text.splitlines() if line.startswith("fast GPU path")]}
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        return result | {"error": failure(returncode, text)}
    metrics = json.loads(metrics.read_text())
    profiled = OmegaConf.load(run_dir / "config.yaml").get("profile_step")  # the run's resolved recipe
    return result | {"speed": metrics["speed"], "fast_path": metrics["fast_path"], "profiled": profiled}


def failure(returncode, log: str) -> str:
    """Why a train.py run logged no step: the deadline, or the last line it wrote (its error)."""
    if returncode == "stopped at the deadline":
        return "stopped at the deadline before its first step was logged (raise --deadline-s or lower --steps)"
    return (log.strip().splitlines() or ["no output"])[-1][:300]


def train_runs(steps: int, baseline: str | None, warm_up_steps: int) -> list[tuple[str, Path, str, int]]:
    """The train.py runs in order: (label, checkout, run folder name, steps). A baseline runs before and after this
    checkout (A B A: a machine that speeds up or slows down during the call shows as A != A)."""
    runs = [("train.py", REPO_ROOT, "product", steps)]
    if baseline:
        baseline = Path(baseline).resolve()
        runs = [("baseline (first)", baseline, "baseline-1", steps), *runs,
                ("baseline (again)", baseline, "baseline-2", steps)]
    if warm_up_steps:
        runs.insert(0, ("warm-up run (not compared)", REPO_ROOT, "warm-up", warm_up_steps))
    return runs


def format_table(results: dict) -> str:
    header = ("| case | steps (timed) | tok/s (wall) | × peer | median step s | slowest after warm-up (× median; "
              "GC s in it) | host RSS GiB first → last | pinned GiB first → last | GPU peak GiB | allocator retries "
              "after warm-up |")
    lines = [f"{results['card']} · {results['date']} · {results['config']} · `{results['command']}`", "", header,
             "|---|---|---|---|---|---|---|---|---|---|"]
    peer = results["cases"].get("peer", {}).get("tokens_per_s")
    for name, r in results["cases"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / peer:.2f}" if peer else "–"
        lines.append(f"| {name} | {r['steps']} ({r['timed_steps']}) | {r['tokens_per_s']:.0f} "
                     f"({r['wall_tokens_per_s']:.0f}) | {ratio} | {r['median_step_s']} | step {r['slowest_step']}: "
                     f"{r['slowest_step_s']} s ({r['slowest_over_median']}; {r['slowest_gc_s']}) "
                     f"| {' → '.join(map(str, r['host_rss_gib']))} "
                     f"| {' → '.join(map(str, r['pinned_gib']))} | {r['gpu_peak_gib']} "
                     f"| {'–' if r.get('alloc_retries') is None else r['alloc_retries']} |")
    for name, r in results["cases"].items():
        if r.get("beside_training_s"):
            beside = r["beside_training_s"]
            lines += ["", f"{name}: seconds beside training (evaluation, checkpoint save) by step: {beside}"]
        for line in r.get("fast_path_lines", []):
            lines += ["", f"{name}: {line}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=150, help="train.py's steps (one packed row each)")
    parser.add_argument("--peer-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing (flex attention "
                                                                 "compiles during the first two)")
    parser.add_argument("--tokenizer", default=None, help="folder of the tokenizer put beside the random weights "
                                                          "(default: the built-in SmolLM2's)")
    parser.add_argument("--checkpoint", default=None, help="where the random checkpoint goes (default /tmp/...)")
    parser.add_argument("--deadline-s", type=float, default=None, help="stop train.py after this many seconds "
                                                                        "of the whole benchmark")
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--baseline", default=None, help="a checkout of another revision (git worktree add DIR REV): "
                                                         "its train.py runs before and after this one's, on the same "
                                                         "rows, so the order of the runs shows in the figures")
    parser.add_argument("--warm-up-run", type=int, default=0, metavar="STEPS",
                        help="first a train.py run of this many steps, left out of the comparison (the first run "
                             "in a call is slower)")
    parser.add_argument("--launch", default=ONE_PROCESS,
                        help="accelerate launch's arguments for train.py (default one process; e.g. "
                             "'--config_file accelerate_fsdp.yaml --num_processes 2': FSDP2 over two GPUs, "
                             "'--multi_gpu --num_processes 2': data parallel). tok/s counts every GPU's tokens")
    parser.add_argument("--synthetic", action="store_true", help="also the benchmark loop (bench.train_speed)")
    parser.add_argument("--out", default="runs/product")
    parser.add_argument("overrides", nargs="*", help="more key=value for train.py (e.g. eval.during_training...)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + (args.deadline_s or float("inf"))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tag = f"L{args.layers}-{args.bits}b-g{args.group_size}-act"
    checkpoint = args.checkpoint or f"/tmp/gptq-llama2-70b-{tag}-tok"
    if args.tokenizer is None:
        from finetune.models.builtin import resolve_builtin_model
        args.tokenizer = str(resolve_builtin_model(TOKENIZER))
    spec = {"checkpoint": checkpoint, "layers": args.layers, "bits": args.bits, "group_size": args.group_size,
            "act_order": True, "tokenizer": args.tokenizer, "out": str(out), "steps": args.peer_steps}
    card = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
    results = {"card": card,
               "date": time.strftime("%Y-%m-%d"), "config": tag,
               "command": "python -m finetune.bench.product_speed " + shlex.join(argv or sys.argv[1:]),
               "cases": {}}
    with open(out / "log.txt", "a") as log:
        def record(name: str, result: dict, warmup: int) -> None:
            speed, profiled = result.pop("speed", None), result.pop("profiled", None)
            results["cases"][name] = result | (summarise(speed, warmup, profiled) if speed else {})
            (out / "results.json").write_text(json.dumps(results, indent=1))

        if not (Path(checkpoint) / "config.json").is_file():
            results["write"] = run_worker("finetune.bench.train_speed", ["write", json.dumps(spec)], log)
            if "error" in results["write"]:
                sys.exit(f"error: writing the random checkpoint failed: {results['write']['error']}")
        if args.peer:
            record("peer", run_worker("finetune.bench.product_speed", ["peer", json.dumps(spec)], log), warmup=1)
        for label, repo, name, steps in train_runs(args.steps, args.baseline, args.warm_up_run):
            warmup = 0 if name == "warm-up" else args.warmup  # the warm-up run is all warm-up: every step shown
            record(label, product_case(checkpoint, steps, out, deadline, log, args.overrides, repo, name,
                                       args.launch), warmup)
        if args.synthetic:
            subprocess.run([sys.executable, "-m", "finetune.bench.train_speed", "--layers", str(args.layers),
                            "--checkpoint", checkpoint, "--no-peer", "--out", str(out / "synthetic")],
                           cwd=REPO_ROOT, check=False)
    table = format_table(results)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(peer_case)
    else:
        main()
