"""Session fixtures shared by the test modules. Heavy imports stay inside the fixtures, so modules that use none
of them collect fast."""

from pathlib import Path

import pytest
from gptq_fixtures import ALL_GPTQ, gptq_dir, tiny_llama_dir


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    """A tiny random Llama (GQA, 2 layers, hidden 256) in fp16 with a 512-token BPE tokenizer."""
    return tiny_llama_dir()


@pytest.fixture(scope="session", params=ALL_GPTQ)
def gptq_checkpoint(request) -> tuple[str, Path]:
    """(name, directory) of each reference checkpoint made by gptqmodel in the v1 format: the tiny Llama in
    every Meditron branch's settings and 8-bit, and SmolLM2-135M-Instruct at 4-bit g128 act-order."""
    return request.param, gptq_dir(request.param)


# Three optimiser steps of one 256-token row each, one checkpoint at the end, and 3 questions of the smoke sample
# scored at step 2 (eval.during_training).
SMOKE_TRAINING = ["recipe=smoke", "train.max_steps=3", "train.save_steps=3", "train.max_length=256",
                  "eval.during_training.every_n_steps=2", "eval.during_training.benchmark=pubmedqa_smoke",
                  "eval.during_training.n_items=3"]


@pytest.fixture(scope="session")
def smoke_training(tmp_path_factory) -> tuple:
    """(run directory, trainer) of one short real `smoke` training (SmolLM2-135M-Instruct GPTQ, SMOKE_TRAINING),
    shared by the training and evaluation tests, which only read the run: copy it before writing into it."""
    from finetune.config.recipe import compose_recipe
    from finetune.training import sft
    run_dir = tmp_path_factory.mktemp("smoke-training") / "run"
    cfg = compose_recipe("smoke", [*SMOKE_TRAINING[1:], f"output_dir={run_dir}"])
    return run_dir, sft.train(cfg, command="finetune/train.py " + " ".join(SMOKE_TRAINING))
