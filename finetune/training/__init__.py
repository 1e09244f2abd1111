"""One LoRA SFT run: the trainer assembled from TRL/PEFT/transformers (`sft`), what the run leaves in its directory
(`run_report`), and the slice accuracy scored during training (`eval_callback`)."""
