"""The checkpoint description and its training-memory estimate."""

import math

import pytest
from transformers import LlamaConfig

from finetune.gptq.checkpoint_info import describe_checkpoint, format_report
from finetune.gptq.format import GPTQConfig, expected_shapes
from finetune.gptq.memory import ModelShape, estimate_lora_training_memory
from finetune.gptq.random_checkpoint import write_random_gptq_checkpoint

LLAMA2_70B = ModelShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, head_dim=128, vocab=32000)


def test_70b_estimate_is_near_the_measured_peer_peak():
    """The peer stack measured 46.2 GiB training Llama-2-70B shape, 4-bit g128, seq 4096, LoRA r16 (H100,
    shared/gpu/README.md); the estimate models the same setup."""
    config = GPTQConfig(bits=4, group_size=128, desc_act=True)
    element_bytes = {"qweight": 4, "qzeros": 4, "scales": 2, "g_idx": 4}
    quantised = LLAMA2_70B.layers * sum(element_bytes[name] * math.prod(shape)
                                        for in_f, out_f in LLAMA2_70B.linear_shapes().values()
                                        for name, shape in expected_shapes(config, in_f, out_f).items())
    dense = 2 * 32000 * 8192 + (2 * 80 + 1) * 8192
    gib = estimate_lora_training_memory(LLAMA2_70B, quantised, dense, seq_len=4096, lora_r=16)
    assert 33.0 < gib["quantised weights"] < 34.5
    assert abs(gib["total"] - 46.2) / 46.2 < 0.08, gib["total"]
    longer = estimate_lora_training_memory(LLAMA2_70B, quantised, dense, seq_len=16384, lora_r=16)
    assert longer["total"] > gib["total"] + 15  # hidden states and logits grow with the sequence


def test_describe_local_checkpoint(tmp_path):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    write_random_gptq_checkpoint(tmp_path, config, GPTQConfig(bits=3, group_size=32, desc_act=True))
    info = describe_checkpoint(str(tmp_path), seq_len=1024)
    assert (info.gptq.bits, info.gptq.group_size, info.gptq.desc_act) == (3, 32, True)
    assert len(info.quantised_modules) == 14 and len(info.shard_bytes) == 3
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert sum(info.shard_bytes.values()) == on_disk
    # LoRA on q_proj alone: r (in + out) per layer, 16 * (64 + 64) * 2, an eighth of all seven projections'
    # (in + out summed: 1,024); sharded, each GPU holds half
    for gpus in (1, 2):
        q_only = describe_checkpoint(str(tmp_path), seq_len=1024, gpus=gpus, lora_targets=("q_proj",)).memory_gib
        every = describe_checkpoint(str(tmp_path), seq_len=1024, gpus=gpus).memory_gib
        assert q_only["LoRA + AdamW"] * 8 == pytest.approx(every["LoRA + AdamW"])
        assert every["total"] - q_only["total"] == pytest.approx(every["LoRA + AdamW"] * 7 / 8)
    assert every["LoRA + AdamW"] * 2 == pytest.approx(info.memory_gib["LoRA + AdamW"])
    report = format_report(info, 1024, 16)
    assert "bits 3 · group 32 · act-order yes" in report
    assert "model.layers.N.mlp.down_proj ×2" in report and "lm_head" in report
