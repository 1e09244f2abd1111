"""A sweep: one training run per combination of recipe values, from one command.

    python finetune/sweep.py recipe=smoke lora.r=8,16 train.learning_rate=1e-4,3e-4 output_dir=runs/sweep-r-lr

A key given several values uses Hydra's multirun grammar (`a,b`, `range(1,4)`, `choice(a,b)`), read by Hydra's
override parser; every combination is composed and checked before the first run starts. output_dir is the sweep
directory:

    sweep.json           every combination: its overrides, run directory, status, exit code, last error line, time
    logs/<name>.log      each run's output
    <name>/              each run directory, named by the swept keys' values (lora.r-8_train.learning_rate-0.0001)
    evaluation/          with --evaluate: the base model and every finished run on the same questions
    comparison.md/.csv/.png   the runs side by side (finetune.evaluation.compare)

Each run is its own `finetune/train.py` process, so one that fails does not stop the others; they run one after
another, or one per GPU at a time (CUDA_VISIBLE_DEVICES), on the GPUs visible or the ones --gpus names.
"""

import json
import os
import queue
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException

from .. import REPO_ROOT
from ..config.files import write_atomic
from ..config.recipe import RecipeError, compose_recipe
from ..evaluation.compare import compare

TRAIN_SCRIPT = REPO_ROOT / "finetune" / "train.py"
EVALUATE_SCRIPT = REPO_ROOT / "finetune" / "evaluate.py"
FIXED_KEYS = ("output_dir", "resume")  # the sweep sets them per run
EVALUATION_KEYS = ("model.", "data.system_prompt", "eval.", "adapter")  # --evaluate scores every run with one setting


@dataclass
class Run:
    name: str
    overrides: list[str]  # the swept keys' values, as key=value
    output_dir: str
    status: str = "pending"  # pending, running, ok, failed
    exit_code: int | None = None
    error: str | None = None  # the last line the run printed, when it failed
    seconds: float | None = None
    device: str = "cpu"


@dataclass
class Sweep:
    recipe: str
    fixed: list[str]  # the overrides every run shares
    swept: list[str]  # the keys given several values
    directory: Path
    runs: list[Run] = field(default_factory=list)


def run_name(overrides: list[str]) -> str:
    """`lora.r-8_train.learning_rate-0.0001`: readable, and a plain value for adapter=... (no `=` or `,`)."""
    parts = []
    for override in overrides:
        key, value = override.lstrip("+").split("=", 1)
        parts.append(f"{key}-{re.sub(r'[^A-Za-z0-9._-]+', '-', value).strip('-') or 'none'}")
    return "_".join(parts)


def plan(args: list[str]) -> Sweep:
    """Every combination, checked: the grammar, each swept key, and each run's composed recipe; nothing written."""
    recipe = next((a.split("=", 1)[1] for a in args if a.startswith("recipe=")), "smoke")
    overrides = [a for a in args if not a.startswith("recipe=")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise RecipeError(f"{str(err).splitlines()[0]}; sweep values are key=a,b (see --help)") from None
    fixed, axes, where = [], [], []  # where: the output_dir=... given, the sweep directory
    for override in parsed:
        key = override.get_key_element()
        if key.lstrip("+~") in FIXED_KEYS and override.is_sweep_override():
            raise RecipeError(f"{key} cannot be swept: the sweep sets each run's {key}")
        if key.lstrip("+~") == "resume":
            raise RecipeError("resume=... is not for sweeps; continue a failed run with train.py resume=true")
        if not override.is_sweep_override():
            (where if key == "output_dir" else fixed).append(override.input_line)
            continue
        try:
            values = list(override.sweep_string_iterator())
        except HydraException:
            raise RecipeError(f"{override.input_line}: only lists of values sweep (a,b or range(...) or choice(...)), "
                              "not intervals") from None
        axes.append([f"{key}={value}" for value in values])
    if not axes:
        raise RecipeError("nothing to sweep: give a key several values, e.g. lora.r=8,16 train.learning_rate=1e-4,3e-4")
    sweep_dir = Path(compose_recipe(recipe, [*fixed, *where]).output_dir)  # also checks the fixed overrides once
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise RecipeError(f"output_dir {sweep_dir} already holds files; pass a new output_dir=... for the sweep")
    sweep = Sweep(recipe, fixed, [axis[0].split("=", 1)[0] for axis in axes], sweep_dir)
    names = set()
    for combination in product(*axes):
        name = run_name(list(combination))
        name = name if name not in names else f"{name}-{len(sweep.runs)}"
        names.add(name)
        try:
            compose_recipe(recipe, [*fixed, *combination, f"output_dir={sweep_dir / name}"])
        except RecipeError as err:
            raise RecipeError(f"sweep run {name}: {err}") from None
        sweep.runs.append(Run(name, list(combination), str(sweep_dir / name)))
    return sweep


def check_evaluation(sweep: Sweep) -> None:
    """--evaluate scores every run in one evaluation: the swept keys must leave the evaluation's settings alone."""
    varied = [key for key in sweep.swept if key.lstrip("+~").startswith(EVALUATION_KEYS)]
    if varied:
        raise RecipeError(f"--evaluate scores every run with one model, prompt and eval settings, but the sweep varies "
                          f"{varied[0]}; drop --evaluate and run evaluate.py per run")


def devices(gpus: str | None) -> list[str | None]:
    """One slot per GPU (its CUDA_VISIBLE_DEVICES value), or one CPU/default slot when there is no GPU."""
    import torch
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    available = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else \
        [str(i) for i in range(torch.cuda.device_count())]
    if gpus is None:
        return available or [None]
    asked = [g.strip() for g in gpus.split(",") if g.strip()]
    unknown = [g for g in asked if g not in available]
    if not asked or unknown:
        raise RecipeError(f"--gpus {gpus}: {'GPU ' + unknown[0] + ' is not visible' if unknown else 'no GPU named'}; "
                          f"visible: {', '.join(available) or 'none (drop --gpus to run on the CPU)'}")
    return asked


def write_summary(sweep: Sweep) -> None:
    data = {"recipe": sweep.recipe, "fixed": sweep.fixed, "swept": sweep.swept, "runs": [asdict(r) for r in sweep.runs]}
    write_atomic(sweep.directory / "sweep.json", lambda p: p.write_text(json.dumps(data, indent=1) + "\n"))


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def run_process(command: list[str], log: Path, device: str | None) -> int:
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    with open(log, "w") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode


def train_all(sweep: Sweep, slots: list[str | None]) -> None:
    """Each run as a train.py process on a free slot; sweep.json rewritten as each one starts and ends."""
    free = queue.Queue()
    for slot in slots:
        free.put(slot)
    logs = sweep.directory / "logs"

    def one(index: int, run: Run) -> None:
        device = free.get()
        try:
            run.status, run.device = "running", "cpu" if device is None else f"cuda:{device}"
            write_summary(sweep)
            print(f"[{index + 1}/{len(sweep.runs)}] {run.name} on {run.device} (log: {logs / run.name}.log)",
                  flush=True)
            start = time.monotonic()
            command = [sys.executable, str(TRAIN_SCRIPT), f"recipe={sweep.recipe}", *sweep.fixed, *run.overrides,
                       f"output_dir={run.output_dir}"]
            run.exit_code = run_process(command, logs / f"{run.name}.log", device)
            run.seconds = round(time.monotonic() - start, 1)
            run.status = "ok" if run.exit_code == 0 else "failed"
            run.error = None if run.exit_code == 0 else last_line(logs / f"{run.name}.log")
            write_summary(sweep)
            print(f"[{index + 1}/{len(sweep.runs)}] {run.name}: {run.status} in {run.seconds:.0f} s"
                  + (f" (exit {run.exit_code}: {run.error})" if run.error else ""), flush=True)
        finally:
            free.put(device)

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        for future in [pool.submit(one, i, run) for i, run in enumerate(sweep.runs)]:
            future.result()


def evaluate_runs(sweep: Sweep, device: str | None) -> Path | None:
    """The base model and every finished run on the same questions, in one evaluate.py process."""
    finished = [run.output_dir for run in sweep.runs if run.status == "ok"]
    if not finished:
        return None
    out = sweep.directory / "evaluation"
    print(f"evaluating the base model and {len(finished)} runs into {out} (log: {sweep.directory}/logs/evaluation.log)",
          flush=True)
    command = [sys.executable, str(EVALUATE_SCRIPT), f"recipe={sweep.recipe}", *sweep.fixed,
               f"adapter=[none,{','.join(repr(path) for path in finished)}]", f"output_dir={out}"]
    code = run_process(command, sweep.directory / "logs" / "evaluation.log", device)
    if code != 0:
        print(f"evaluation failed (exit {code}): {last_line(sweep.directory / 'logs' / 'evaluation.log')}")
        return None
    return out


def run_sweep(sweep: Sweep, slots: list[str | None], evaluate: bool = False) -> int:
    """Train every run (then evaluate them), write the comparison; returns how many runs failed."""
    (sweep.directory / "logs").mkdir(parents=True, exist_ok=True)
    write_summary(sweep)
    print(f"sweep of {len(sweep.runs)} runs over {', '.join(sweep.swept)} into {sweep.directory}, "
          f"{len(slots)} at a time", flush=True)
    train_all(sweep, slots)
    if evaluate:
        evaluate_runs(sweep, slots[0])
    failed = [run for run in sweep.runs if run.status != "ok"]
    if len(failed) < len(sweep.runs):
        compare([sweep.directory], sweep.directory)
        print(f"comparison: {sweep.directory / 'comparison.md'}")
    print(f"{len(sweep.runs) - len(failed)} of {len(sweep.runs)} runs finished; summary: "
          f"{sweep.directory / 'sweep.json'}")
    for run in failed:
        print(f"FAILED {run.name} (exit {run.exit_code}): {run.error}; log: {sweep.directory}/logs/{run.name}.log")
    return len(failed)
