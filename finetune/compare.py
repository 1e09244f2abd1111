"""Compare training runs, evaluations and sweeps (finetune/evaluation/compare.py).

    python finetune/compare.py runs/sweep-r-lr                      # a sweep: its runs (and its evaluation)
    python finetune/compare.py runs/base-eval runs/a-eval runs/b-eval --output runs/compare-ab

Each folder is a training run, an evaluation, or a folder of them. Writes comparison.md, comparison.csv and
comparison.png into --output (default: the first folder): the settings that differ, final and best training
loss, accuracy per benchmark with its 95% interval, how often each answer was chosen, and McNemar's exact test
against the reference (the base model where evaluated, else the first folder) on the questions both answered;
the chart has lines for chance, the majority class, the base model and the paper.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder must not shadow libraries (datasets, evaluate, ...)

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from finetune.evaluation.benchmarks import EvalError  # noqa: E402
from finetune.evaluation.compare import compare  # noqa: E402


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="finetune/compare.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="training runs, evaluations, sweeps")
    parser.add_argument("--output", type=Path, help="where the comparison goes (default: the first folder)")
    options = parser.parse_args(args)
    out = options.output or options.folders[0]
    try:
        entries = compare(options.folders, out)
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((out / "comparison.md").read_text())
    print(f"{len(entries)} compared; {out / 'comparison.md'}, comparison.csv, comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
