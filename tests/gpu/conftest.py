"""The tiny random GPTQ checkpoint (4-bit, g32, act-order) each tests/gpu module builds its models on (tiny_lora)."""

import pytest

from finetune.gptq.format import GPTQConfig
from finetune.gptq.random_checkpoint import write_random_gptq_checkpoint
from tests.gpu.tiny_lora import TINY


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gptq")
    write_random_gptq_checkpoint(path, TINY, GPTQConfig(bits=4, group_size=32, desc_act=True))
    return path
