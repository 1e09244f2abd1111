"""Write a random-weight GPTQ checkpoint of any Llama shape, in the v1 format of TheBloke's branches.

Values do not change speed, shapes and packing do: benchmarks use this to get a Llama-2-70B-shaped GPTQ
model onto a GPU machine that cannot download one, and tests use it for cheap loader checks. The weights
are scaled so activations keep a sane magnitude through many layers.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig

from .format import GPTQConfig, default_g_idx, pack

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def random_gptq_linear(in_features: int, out_features: int, config: GPTQConfig, generator: torch.Generator,
                       device: str = "cpu") -> dict[str, torch.Tensor]:
    """qweight/qzeros/scales/g_idx of one random quantised linear (symmetric zero points)."""
    groups = config.n_groups(in_features)
    q = torch.randint(0, 2 ** config.bits, (in_features, out_features), generator=generator, dtype=torch.int32,
                      device=device)
    zero = 2 ** (config.bits - 1)
    stored_zero = zero - 1 if config.checkpoint_format == "gptq" else zero
    zeros = torch.full((groups, out_features), stored_zero, dtype=torch.int32, device=device)
    # uniform q - zero has std ~ 2**bits / sqrt(12); aim for a weight std of 1 / sqrt(in_features)
    scale = math.sqrt(12) / (2 ** config.bits * math.sqrt(in_features))
    scales = (scale * (0.5 + torch.rand(groups, out_features, generator=generator, device=device))).half()
    g_idx = default_g_idx(in_features, config.group_size, device)
    if config.desc_act:
        g_idx = g_idx[torch.randperm(in_features, generator=generator, device=device)]
    return {"qweight": pack(q, config.bits), "qzeros": pack(zeros.t(), config.bits).t().contiguous(),
            "scales": scales, "g_idx": g_idx}


def write_random_gptq_checkpoint(out_dir: str | Path, model_config: PretrainedConfig, config: GPTQConfig,
                                 seed: int = 0, device: str = "cpu") -> Path:
    """One safetensors shard per decoder layer plus one for embeddings/norm/lm_head, with an index."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device).manual_seed(seed)
    hidden, ffn = model_config.hidden_size, model_config.intermediate_size
    head_dim = getattr(model_config, "head_dim", None) or hidden // model_config.num_attention_heads
    q_out, kv_out = model_config.num_attention_heads * head_dim, model_config.num_key_value_heads * head_dim
    shapes = {"self_attn.q_proj": (hidden, q_out), "self_attn.k_proj": (hidden, kv_out),
              "self_attn.v_proj": (hidden, kv_out), "self_attn.o_proj": (q_out, hidden),
              "mlp.gate_proj": (hidden, ffn), "mlp.up_proj": (hidden, ffn), "mlp.down_proj": (ffn, hidden)}
    weight_map = {}

    def save(tensors: dict[str, torch.Tensor], name: str) -> None:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, out_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    n_layers = model_config.num_hidden_layers
    for i in range(n_layers):
        tensors = {}
        for linear in LLAMA_LINEARS:
            for key, value in random_gptq_linear(*shapes[linear], config, generator, device).items():
                tensors[f"model.layers.{i}.{linear}.{key}"] = value
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(hidden, dtype=torch.float16, device=device)
        save(tensors, f"model-{i + 1:05d}-of-{n_layers + 1:05d}.safetensors")
    vocab = model_config.vocab_size
    rest = {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=generator, device=device) * 0.02).half(),
            "model.norm.weight": torch.ones(hidden, dtype=torch.float16, device=device)}
    if not model_config.tie_word_embeddings:
        rest["lm_head.weight"] = (torch.randn(vocab, hidden, generator=generator, device=device) * 0.02).half()
    save(rest, f"model-{n_layers + 1:05d}-of-{n_layers + 1:05d}.safetensors")
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    config_dict = model_config.to_dict()
    config_dict["quantization_config"] = {"quant_method": "gptq", "bits": config.bits, "group_size": config.group_size,
                                          "desc_act": config.desc_act, "sym": config.sym,
                                          "checkpoint_format": config.checkpoint_format}
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2))
    return out_dir
