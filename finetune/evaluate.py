"""Evaluate a GPTQ model, alone or with a LoRA adapter, on PubMedQA, MedMCQA and MedQA; the recipe and its
Hydra overrides are training's (eval.* in recipes/base.yaml), so an adapter is evaluated as it was trained.

    python finetune/evaluate.py recipe=smoke adapter=runs/smoke eval.benchmarks=[pubmedqa_smoke] \
        output_dir=runs/smoke-eval
    python finetune/evaluate.py recipe=medqa adapter=runs/medqa eval.benchmarks=[medqa4] output_dir=runs/medqa-eval
    python finetune/evaluate.py recipe=medqa eval.mode=sc eval.limit=200 output_dir=runs/base-sc   # the base alone
    python finetune/evaluate.py recipe=medqa adapter=you/meditron-medqa-lora eval.benchmarks=[pubmedqa,medqa4] \
        eval.mode=loglik eval.limit=50 output_dir=runs/hub-eval
    python finetune/evaluate.py recipe=smoke adapter=[none,runs/a,runs/b] output_dir=runs/ab-eval   # side by side

adapter=[none,runs/a,...] scores the base model (none) and each adapter on the same questions, loading the base
once: output_dir/<base|a|b>/ each hold a whole evaluation, and output_dir/comparison.md, .csv and .png compare them
(as finetune/compare.py does: accuracy with intervals, answers chosen, McNemar's test against the base model).
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder (with evaluate.py in it!) must not shadow libraries: evaluate, datasets, ...

import shlex  # noqa: E402

from finetune.config.recipe import RecipeError, compose_recipe, split_args, usage  # noqa: E402
from finetune.evaluation.harness import adapter_list, evaluate, evaluate_many  # noqa: E402
from finetune.gptq import GPTQFormatError  # noqa: E402


def main(args: list[str]) -> int:
    if "--help" in args or "-h" in args:
        print(__doc__.strip() + "\n\n" + usage(args).split("\n\n", 1)[1])  # + the recipes and resolved config
        return 0
    try:
        cfg = compose_recipe(*split_args(args))
        command = shlex.join(["finetune/evaluate.py", *args])
        several = adapter_list(cfg) is not None
        summaries = evaluate_many(cfg, command) if several else {"": evaluate(cfg, command)}
    except (RecipeError, GPTQFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for label, summary in summaries.items():
        for name, s in summary.items():
            low, high = s["ci95"]
            print(f"{label + ' ' if label else ''}{name:>15}: {100 * s['accuracy']:5.1f}% ({100 * low:.1f}-"
                  f"{100 * high:.1f}) of {s['n']}, unparseable {100 * s['unparseable_rate']:.1f}%, majority class "
                  f"{100 * s['majority']['rate']:.1f}%")
    print(f"results in {cfg.output_dir}" + (f", compared in {cfg.output_dir}/comparison.md" if several else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
