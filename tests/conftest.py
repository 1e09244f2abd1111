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
