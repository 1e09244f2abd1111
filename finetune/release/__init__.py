"""After training: the adapter, merged bf16 weights streamed shard by shard (`merge`) or re-quantised GPTQ
(`exporter`), their parity with what was trained (`parity`), the model card (`model_card`) and publishing to the
Hub (`hub`)."""
