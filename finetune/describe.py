"""Describe a GPTQ checkpoint before downloading it: bits, group, act-order, format, shards, quantised
modules, and the estimated GPU memory to LoRA-train it.

    python finetune/describe.py TheBloke/meditron-70B-GPTQ --revision gptq-4bit-32g-actorder_True --seq-len 8192
    python finetune/describe.py path/to/local/gptq-dir
    python finetune/describe.py TheBloke/meditron-70B-GPTQ --revision gptq-4bit-128g-actorder_True --gpus 2
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder must not shadow libraries (evaluate, datasets, ...)

import argparse  # noqa: E402

from finetune.gptq.checkpoint_info import describe_checkpoint, format_report  # noqa: E402
from finetune.gptq.format import GPTQFormatError  # noqa: E402


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as the other scripts give them: one line naming the cause, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see --help\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="Hub repo id (only config and safetensors headers are fetched) or local directory")
    parser.add_argument("--revision", default=None, help="Hub branch, e.g. gptq-4bit-128g-actorder_True (default: main)")
    parser.add_argument("--seq-len", type=int, default=4096, help="training sequence length for the memory estimate")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank on all seven projections for the estimate")
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs the model is sharded over with FSDP2 (accelerate_fsdp.yaml): memory per GPU")
    args = parser.parse_args(argv)
    for option, value in (("--seq-len", args.seq_len), ("--lora-r", args.lora_r), ("--gpus", args.gpus)):
        if value < 1:
            parser.error(f"{option} {value}: give a number >= 1")
    try:
        info = describe_checkpoint(args.source, args.revision, args.seq_len, args.lora_r, args.gpus)
    except GPTQFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(info, args.seq_len, args.lora_r, args.gpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
