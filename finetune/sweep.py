"""Train one run per combination of recipe values, then compare them (finetune/training/sweep.py).

    python finetune/sweep.py recipe=smoke lora.r=8,16 train.learning_rate=1e-4,3e-4 output_dir=runs/sweep-r-lr
    python finetune/sweep.py recipe=medqa lora.r=16,32 train.max_steps=100 output_dir=runs/medqa-r --gpus 0,1
    python finetune/sweep.py recipe=smoke seed=range(1,4) eval.limit=50 output_dir=runs/smoke-seeds --evaluate

  key=a,b          a key given several values is swept (Hydra's multirun grammar: a,b  range(1,4)  choice(a,b));
                   every other key=value applies to every run; output_dir is the sweep directory
  --gpus 0,1       the GPUs to spread the runs over, one run per GPU at a time (default: every visible GPU; none
                   visible: one run at a time on the CPU)
  --evaluate       afterwards, evaluate the base model and every finished run on the same questions (eval.* keys)

Writes sweep.json (each combination: overrides, run directory, status, exit code, last error line, seconds),
logs/<run>.log, one run directory per combination named by its swept values, and comparison.md/.csv/.png.
A failed run does not stop the others; the sweep exits with 1 if any failed, listing them.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder must not shadow libraries (datasets, evaluate, ...)

import argparse  # noqa: E402

from finetune.config.recipe import RecipeError  # noqa: E402
from finetune.training.sweep import check_evaluation, devices, plan, run_sweep  # noqa: E402


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--gpus")
    parser.add_argument("--evaluate", action="store_true")
    parser.add_argument("--help", "-h", action="store_true")
    options, overrides = parser.parse_known_args(args)
    if options.help:
        print(__doc__.strip())
        return 0
    try:
        unknown = next((a for a in overrides if a.startswith("-")), None)
        if unknown:
            raise RecipeError(f"unknown option {unknown!r}; options are --gpus and --evaluate (see --help)")
        sweep = plan(overrides)
        if options.evaluate:
            check_evaluation(sweep)
        slots = devices(options.gpus)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if run_sweep(sweep, slots, evaluate=options.evaluate) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
