"""LoRA fine-tuning of a GPTQ medical LLM with TRL's SFTTrainer, configured by a Hydra recipe.

    accelerate launch finetune/train.py recipe=smoke                        # offline, minutes on a CPU
    accelerate launch finetune/train.py recipe=medqa lora.r=32 train.max_steps=100 output_dir=runs/medqa-r32
    accelerate launch finetune/train.py recipe=medqa output_dir=runs/medqa-r32 resume=true
    python finetune/train.py recipe=pubmedqa train.dry_run=true             # check, show, run two steps
    python finetune/train.py recipe=medmcqa --help                          # recipes and the resolved config
"""

import os
import sys

# packed rows change length every step: expandable segments keep the CUDA allocator from fragmenting (the speed
# benchmarks run with it too); set before torch starts
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder must not shadow libraries (datasets, evaluate, ...)

import shlex  # noqa: E402

from finetune.config.recipe import RecipeError, compose_recipe, split_args, usage  # noqa: E402
from finetune.gptq import GPTQFormatError  # noqa: E402
from finetune.training import dry_run, sft  # noqa: E402


def main(args: list[str]) -> int:
    if "--help" in args or "-h" in args:
        print(usage(args))
        return 0
    try:
        cfg = compose_recipe(*split_args(args))
        if cfg.train.dry_run:
            dry_run.dry_run(cfg)
        else:
            trainer = sft.train(cfg, command=shlex.join(["finetune/train.py", *args]))
            trainer.accelerator.print(f"adapter saved to {cfg.output_dir}/adapter")
            trainer.end()  # finish the trackers (wandb) and the process group
    except (RecipeError, GPTQFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
