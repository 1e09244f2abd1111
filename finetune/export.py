"""Export a training run: its LoRA adapter, merged dense weights, or merged weights re-quantised to GPTQ.

    python finetune/export.py run=runs/smoke export.kind=adapter output_dir=exports/smoke-adapter
    python finetune/export.py run=runs/medqa export.kind=merged output_dir=exports/medqa-bf16 export.dtype=bfloat16
    python finetune/export.py run=runs/medqa export.kind=gptq output_dir=exports/medqa-gptq \\
        export.bits=4 export.group_size=128 export.desc_act=true export.parity_prompts=32

Other options (key=value): export.overwrite, export.max_shard_size, export.sym, export.calibration_samples,
export.parity_max_tokens, export.device, export.eval_summary, export.repo_id (see finetune/release/exporter.py).
Merged and gptq exports get parity.json: KL and top-1 agreement against the adapter on its GPTQ base.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder must not shadow libraries (datasets, evaluate, ...)

from finetune.config.cli import compose_config  # noqa: E402
from finetune.config.recipe import RecipeError  # noqa: E402
from finetune.gptq import GPTQFormatError  # noqa: E402
from finetune.release.exporter import ExportConfig, export  # noqa: E402


def main(args: list[str]) -> int:
    if "--help" in args or "-h" in args:
        print(__doc__)
        return 0
    try:
        out = export(compose_config(ExportConfig, args))
    except (RecipeError, GPTQFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
