"""Which model a recipe names, and what is built from it: the built-in SmolLM2-135M-Instruct (converted from its
GGUF and quantised to GPTQ once, then cached), the build cache itself, re-quantising with gptqmodel, and a trained
adapter put back on its base."""
