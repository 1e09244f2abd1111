"""The fast GPU training path (`gpu.fast_path`): a per-layer plan of which layers keep their activations, which
keep them in pinned host memory (`host_offload`) and which recompute (`recompute_plan`); lean LoRA projections
that add the adapter inside the GPTQ matmul (`fast_lora`); liger's fused kernels and flex attention for packed rows
(`fast_training`). Imports only the GPTQ layer and the recipe's error type; trains on a GPU only (the plan, the
arena and the Functions' CPU references are tested on the CPU)."""
