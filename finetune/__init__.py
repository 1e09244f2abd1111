"""Fine-tune GPTQ-quantised medical LLMs (Meditron-70B) with LoRA, in plain Python.

The subpackages are the pipeline, each importing only from those above it in this list:

    gptq/        the GPTQ format, the trainable GPTQLinear and its kernels, the loader, checkpoint description
    data/        the benchmarks (one module each), their registry, the ChatML template
    config/      Hydra recipes and command-line configs, the run directory's rules
    models/      which model a recipe names: the built-in SmolLM2, the build cache, re-quantising, adapters
    gpu/         the fast GPU training path: lean LoRA, host layers, flex attention
    evaluation/  benchmark evaluation: scoring, answer parsing, the report, comparisons of runs and evaluations
    training/    one SFT run: the trainer, its report, evaluation during training; sweeps of runs
    export/      merged / re-quantised weights, parity, model card, publishing
    bench/       the speed benchmarks against the peer stack

The entry scripts beside them (train.py, sweep.py, evaluate.py, compare.py, export.py, publish.py, describe.py)
are thin commands over these.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # recipes/, data/ and eval/ live here

from .gptq import GPTQConfig, GPTQFormatError, GPTQLinear, load_model

__all__ = ["GPTQConfig", "GPTQFormatError", "GPTQLinear", "load_model"]
