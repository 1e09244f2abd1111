"""Evaluation speed on one GPU: MedQA 4-option in full, log-likelihood, on Llama-2-70B shape (random GPTQ weights,
4-bit, group 128, act-order): our scorer as evaluate.py runs it on a GPU (one row per question: the prompt once, its
four answers after it under a tree attention mask; liger kernels; 64 questions per batch) against per-option full
sequences through the peer stack (transformers + optimum + gptqmodel, 16 questions per batch), in the same run and
card.

    # here, where the benchmark files and SmolLM2's tokenizer are (runs/ is git-ignored: carry it along)
    python -m finetune.bench.eval_speed tokens --out runs/eval-speed/medqa4.json
    # on the GPU machine
    python -m finetune.bench.eval_speed time --tokens runs/eval-speed/medqa4.json --out runs/eval-speed

The token ids are those of the evaluation's own prompts and answers (finetune.evaluation.loglik_requests) under
SmolLM2's tokenizer, Llama-2's being out of reach offline; ids beyond the model's vocabulary are folded into it.
Values do not change speed; lengths do. Each side runs in its own process (its own CUDA context and peak), first
scoring one batch untimed (kernel compilation, autotuning), then all questions timed. Prints seconds, the ratio and
how often both sides pick the same answer; writes results.json and table.md into --out. Where one command would
run too long, `--sides ours` and then `--sides peer` (same card, same day, same --out) fill one table.
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .train_speed import worker

GIB = 2 ** 30


def model_config(shape: str, layers: int):
    from transformers import LlamaConfig

    from .train_speed import llama2_70b_config
    if shape == "llama2-70b":
        return llama2_70b_config(layers)
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, torch_dtype="float16")


# ------------------------------------------------------------------------------------------- tokens (no GPU)

def write_tokens(out: Path, benchmark: str, limit: int | None, tokenizer_dir: Path | None) -> dict:
    """The benchmark's loglik requests as token ids: [{"prompt": [...], "options": [[...], ...]}, ...]."""
    from transformers import AutoTokenizer

    from ..data import chatml
    from ..data.registry import load_benchmark
    from ..evaluation.benchmarks import benchmark_specs
    from ..evaluation.harness import loglik_requests
    from ..models.builtin import resolve_builtin_model
    spec = benchmark_specs()[benchmark]
    items = load_benchmark(spec.loader, spec.split, source=spec.source, **spec.loader_options).items[:limit]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or resolve_builtin_model("smollm2-135m-instruct"))
    chatml.prepare_tokenizer(tokenizer)
    _, _, requests = loglik_requests(tokenizer, items)
    data = {"benchmark": benchmark, "tokenizer": tokenizer.name_or_path, "pad_id": tokenizer.pad_token_id,
            "requests": [{"prompt": r.prompt_ids, "options": r.option_ids} for r in requests]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data))
    return {"questions": len(requests), "prompt_tokens": sum(len(r.prompt_ids) for r in requests),
            "option_tokens": sum(len(o) for r in requests for o in r.option_ids)}


def load_requests(path: Path, vocab_size: int):
    from ..evaluation.scoring import OptionRequest
    data = json.loads(path.read_text())
    fold = lambda ids: [i % vocab_size for i in ids]  # noqa: E731
    requests = [OptionRequest(fold(r["prompt"]), [fold(o) for o in r["options"]]) for r in data["requests"]]
    return requests, data["pad_id"] % vocab_size


# ------------------------------------------------------------------------------------------- the two sides

def right_padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the matching 0/1 mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def full_sequence_logprobs(model, requests, pad_id: int) -> list[list[float]]:
    """The peer's way (lm-evaluation-harness's): every (question, option) as its own full sequence, prompt
    included, in one batch; logits only where an option token is predicted."""
    from ..evaluation.scoring import per_request
    device = next(model.parameters()).device
    rows = [(r.prompt_ids, o) for r in requests for o in r.option_ids]
    ids, mask = right_padded([p + o for p, o in rows], pad_id, device)
    predicts = torch.zeros_like(mask, dtype=torch.bool)
    targets = torch.zeros_like(ids)
    for i, (prompt, option) in enumerate(rows):
        predicts[i, len(prompt) - 1:len(prompt) + len(option) - 1] = True
        targets[i, len(prompt) - 1:len(prompt) + len(option) - 1] = torch.tensor(option)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=predicts).logits
    logprobs = logits.float().log_softmax(-1).gather(1, targets[predicts][:, None]).squeeze(1)
    sums = torch.zeros(len(rows), device=device).index_add(0, predicts.nonzero()[:, 0], logprobs).tolist()
    return per_request(sums, requests)


def load_side(side: str, spec: dict):
    if side == "ours":
        from ..gptq.loader import load_model
        model = load_model(spec["checkpoint"], device=spec["device"])
        if spec["device"].startswith("cuda"):  # as finetune.evaluation.harness does with gpu.fast_path (the default)
            from ..gpu.fast_training import apply_liger
            apply_liger(model)
        return model
    from transformers import AutoModelForCausalLM, GPTQConfig
    device_map = {"": 0} if spec["device"].startswith("cuda") else {"": "cpu"}
    dtype = torch.bfloat16 if spec["device"].startswith("cuda") else torch.float32
    return AutoModelForCausalLM.from_pretrained(
        spec["checkpoint"], quantization_config=GPTQConfig(bits=spec["bits"], backend=spec["peer_backend"]),
        device_map=device_map, dtype=dtype, attn_implementation="sdpa").eval()


def time_side(spec: dict) -> dict:
    """Load one side's model, score one batch untimed, then every question timed."""
    from ..evaluation.scoring import batches_by_length, option_logprobs
    from .train_speed import profile_gpu
    side, cuda = spec["side"], spec["device"].startswith("cuda")
    start = time.perf_counter()
    model = load_side(side, spec)
    load_s = time.perf_counter() - start
    requests, pad_id = load_requests(Path(spec["tokens"]), model.config.vocab_size)
    requests = requests[:spec["limit"]]
    score = option_logprobs if side == "ours" else full_sequence_logprobs
    batches = batches_by_length([len(r.prompt_ids) for r in requests], spec["batch_size"])
    with torch.inference_mode():
        score(model, [requests[i] for i in batches[0]], pad_id)  # warm-up: compile, autotune
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        scores = [None] * len(requests)
        for batch in batches:
            for i, s in zip(batch, score(model, [requests[i] for i in batch], pad_id)):
                scores[i] = s
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        profile = spec.get("profile") and cuda and profile_gpu(
            lambda: score(model, [requests[i] for i in batches[len(batches) // 2]], pad_id))
    tokens = sum(len(r.prompt_ids) * (1 if side == "ours" else len(r.option_ids)) + sum(map(len, r.option_ids))
                 for r in requests)
    return {"seconds": round(seconds, 2), "load_s": round(load_s, 1), "questions": len(requests),
            "tokens_through_model": tokens, "tokens_per_s": round(tokens / seconds),
            "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
            "argmax": [max(range(len(s)), key=s.__getitem__) for s in scores],
            "logprobs_head": scores[:8]} | ({"profile": profile} if profile else {})


# ------------------------------------------------------------------------------------------- orchestration

def run_side(spec: dict, log) -> dict:
    """One side in a fresh process."""
    from .train_speed import run_worker
    return run_worker("finetune.bench.eval_speed", [json.dumps(spec)], log)


def compare(results: dict) -> str:
    ours, peer = results["sides"].get("ours", {}), results["sides"].get("peer", {})
    questions = ours.get("questions", peer.get("questions"))
    lines = [f"{results['card']} · {results['date']} · {results['shape']} ({results['layers']} layers), 4-bit "
             f"g{results['group_size']} act-order, random weights · {questions} questions of {results['benchmark']} "
             f"· `{results['command']}`", "",
             "| side | questions per batch | seconds | tokens through the model | tok/s | peak GiB | load s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["sides"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['batch_size']} | error: {r['error']} | | | | |")
        else:
            lines.append(f"| {name} | {r['batch_size']} | {r['seconds']} | {r['tokens_through_model']} | "
                         f"{r['tokens_per_s']} | {r['peak_gib']} | {r['load_s']} |")
    for name, r in results["sides"].items():
        if "profile" in r:
            p = r["profile"]
            lines += ["", f"profile of one middle batch ({name}, {p['wall_ms']:.0f} ms): "
                          + ", ".join(f"{k} {v:.0%}" for k, v in p["share"].items())]
    if "seconds" in ours and "seconds" in peer:
        same = sum(a == b for a, b in zip(ours["argmax"], peer["argmax"])) / len(ours["argmax"])
        gap = max(abs(a - b) for x, y in zip(ours["logprobs_head"], peer["logprobs_head"]) for a, b in zip(x, y))
        lines += ["", f"peer / ours time: {peer['seconds'] / ours['seconds']:.2f}x; same answer on {same:.1%} of "
                      f"questions (random weights: near-ties can flip between kernels); largest log-prob gap on the "
                      f"first {len(ours['logprobs_head'])} questions {gap:.3g}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tokens = sub.add_parser("tokens", help="tokenise a benchmark's loglik requests into a JSON file (no GPU)")
    tokens.add_argument("--out", type=Path, required=True)
    tokens.add_argument("--benchmark", default="medqa4")
    tokens.add_argument("--limit", type=int, default=None)
    tokens.add_argument("--tokenizer", type=Path, default=None, help="default: SmolLM2-135M-Instruct's")
    timing = sub.add_parser("time", help="time ours and the peer on the token file")
    timing.add_argument("--tokens", type=Path, required=True)
    timing.add_argument("--out", type=Path, default=Path("runs/eval-speed"))
    timing.add_argument("--shape", choices=("llama2-70b", "tiny"), default="llama2-70b")
    timing.add_argument("--layers", type=int, default=80)
    timing.add_argument("--batch-size", type=int, default=64, help="ours: questions per batch")
    timing.add_argument("--peer-batch-size", type=int, default=16,
                        help="peer: questions per batch (x options sequences; 16 measured fastest, 64 slower)")
    timing.add_argument("--sides", nargs="+", choices=("ours", "peer"), default=["ours", "peer"])
    timing.add_argument("--peer-backend", default="auto", help="gptqmodel backend (auto: its fastest inference kernel)")
    timing.add_argument("--limit", type=int, default=None, help="only the first N questions of the token file")
    timing.add_argument("--profile", action="store_true", help="profile one batch of each side by kernel class")
    timing.add_argument("--device", default="cuda:0")
    timing.add_argument("--checkpoint", default=None, help="random checkpoint folder (written if missing)")
    args = parser.parse_args(argv)

    if args.command == "tokens":
        print(json.dumps(write_tokens(args.out, args.benchmark, args.limit, args.tokenizer)))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU: pass --device cpu (tiny shapes only) or run on the GPU machine")
    from ..gptq.format import GPTQConfig
    from ..gptq.random_checkpoint import write_random_gptq_checkpoint
    config = GPTQConfig(bits=4, group_size=128 if args.shape == "llama2-70b" else 32, desc_act=True)
    # the training speed benchmark's default path for the same shape: one random checkpoint serves both
    checkpoint = Path(args.checkpoint or f"/tmp/gptq-{args.shape}-L{args.layers}-4b-g{config.group_size}-act")
    args.out.mkdir(parents=True, exist_ok=True)
    if not (checkpoint / "model.safetensors.index.json").is_file():
        write_random_gptq_checkpoint(checkpoint, model_config(args.shape, args.layers), config,
                                     device="cuda" if args.device.startswith("cuda") else "cpu")
    results = {"card": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
               "date": time.strftime("%Y-%m-%d"), "shape": args.shape, "layers": args.layers,
               "group_size": config.group_size, "benchmark": json.loads(args.tokens.read_text())["benchmark"],
               "limit": args.limit,
               "command": " ".join(["python -m finetune.bench.eval_speed"] + (argv or sys.argv[1:])), "sides": {}}
    earlier = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else {}
    if all(earlier.get(k) == results[k] for k in ("card", "date", "shape", "layers", "benchmark", "limit")):
        results["sides"] = earlier["sides"]  # `--sides ours` then `--sides peer` (two commands) make one table
    spec = {"checkpoint": str(checkpoint), "tokens": str(args.tokens.resolve()), "device": args.device, "bits": 4,
            "peer_backend": args.peer_backend, "limit": args.limit, "profile": args.profile}
    with open(args.out / "log.txt", "a") as log:
        for side in args.sides:
            batch_size = args.batch_size if side == "ours" else args.peer_batch_size
            results["sides"][side] = run_side(spec | {"side": side, "batch_size": batch_size}, log) | {
                "batch_size": batch_size}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = compare(results)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(time_side)
    else:
        main()
