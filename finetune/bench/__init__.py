"""The speed benchmarks, each timing ours against the peer stack (transformers + optimum + gptqmodel) in one run
on one card: training (`train_speed`) and log-likelihood evaluation (`eval_speed`). GPU only."""
