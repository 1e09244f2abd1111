"""Estimated peak GPU memory of LoRA training on a GPTQ checkpoint, from its shapes alone.

An estimate for planning ("does 70B fit my 48 GB card at 4k tokens?"), not a measurement: it models the
terms that dominate — the quantised weights as stored, the dense tensors (embeddings, norms) in the compute
dtype, LoRA parameters with fp32 master copy, gradient and AdamW moments, one saved hidden state per layer
under gradient checkpointing, one layer's activations while it is recomputed, the dequantised-weight
workspace, the logits and their loss, and a fixed runtime overhead. Checked against measured peaks in
eval/BENCHMARKS.md.

With `gpus` > 1 it is the per-GPU memory of the FSDP2 plan (accelerate_fsdp.yaml): every weight and the LoRA
optimiser state are split across the GPUs, and two decoder layers are gathered whole at a time (the one computing
and the one prefetched), plus the output layer, which stays gathered from the last forward to the first backward.
"""

from dataclasses import dataclass

GIB = 1024 ** 3
LORA_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight, its gradient, AdamW's two moments
RUNTIME_OVERHEAD_BYTES = 1.0 * GIB  # CUDA context, cuBLAS workspaces, allocator slack
# What the fast GPU path (finetune.gpu.fast_training) keeps free beyond its measured plan: loss head, allocator slack
# (under FSDP2 the all-gather stream's own cache and the default stream's free blocks: on 2 x H200 under a 40 GiB cap
# a plan with 0.6 GiB or none kept 2 or 3 more layers, and the allocator freed its cache and retried every step, the
# step 6-7 % longer: eval/BENCHMARKS.md, twenty-first session). Here, with the estimate, so that the checks before
# loading and describe.py can add it.
FAST_PATH_HEADROOM_BYTES = 2 * GIB


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each decoder-layer projection."""
        q, kv, h, f = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def estimate_lora_training_memory(shape: ModelShape, quantised_bytes: int, dense_params: int, seq_len: int,
                                  lora_r: int = 16, lora_targets: tuple[str, ...] | None = None,
                                  dtype_bytes: int = 2, gpus: int = 1) -> dict[str, float]:
    """GiB per term and in total, for one sequence of `seq_len` tokens with gradient checkpointing, on each of
    `gpus` GPUs (more than one: the FSDP2 plan)."""
    linears = shape.linear_shapes()
    targets = lora_targets or tuple(linears)
    lora_params = shape.layers * sum(lora_r * (linears[t][0] + linears[t][1]) for t in targets if t in linears)
    kv = shape.kv_heads * shape.head_dim
    # inside one recomputed layer: norm outputs, q/k/v, attention output, gate, up and their product
    layer_activations = seq_len * (5 * shape.hidden + 2 * kv + 3 * shape.intermediate) * dtype_bytes
    largest_weight = max(i * o for i, o in linears.values())
    terms = {
        "quantised weights": quantised_bytes / gpus,
        "dense weights": dense_params * dtype_bytes / gpus,
        "LoRA + AdamW": lora_params * LORA_BYTES_PER_PARAM / gpus,
        "checkpointed hidden states": shape.layers * seq_len * shape.hidden * dtype_bytes,
        "one layer's activations": layer_activations,
        "dequantise workspace": 2 * largest_weight * dtype_bytes,
        "logits + loss": seq_len * shape.vocab * (dtype_bytes + 4 + 4),
        "runtime overhead": RUNTIME_OVERHEAD_BYTES,
    }
    if gpus > 1:
        terms["two gathered layers"] = 2 * quantised_bytes / shape.layers * (1 - 1 / gpus)
        terms["gathered output layer"] = shape.vocab * shape.hidden * dtype_bytes * (1 - 1 / gpus)
    gib = {name: value / GIB for name, value in terms.items()}
    gib["total"] = sum(gib.values())
    return gib
