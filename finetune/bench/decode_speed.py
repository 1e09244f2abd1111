"""Decode speed on one GPU: the time of one generated token for 1, 8, 32 and 64 sequences at Llama-2-70B shape
(random GPTQ weights, 4-bit, group 128, act-order by default), through `model.generate` as evaluation's generate
and sc modes run it (static key/value cache sized for the prompt plus --max-new-tokens, greedy). Three sides, each
model loaded once in its own process, all in the same run and card:

    fused     finetune.load_model as evaluate.py loads it: up to layer.FUSED_MAX_TOKENS tokens per forward multiply
              straight from the packed weights (finetune.gptq.triton_gemv)
    dequant   the same model with the fused kernel off: every forward dequantises each weight for cuBLAS
    peer      transformers + optimum + gptqmodel (--peer-backend: its fastest inference kernel that runs offline)

    python -m finetune.bench.decode_speed --layers 80 --out runs/decode-speed
    python -m finetune.bench.decode_speed --matmuls          # the matmuls alone: no checkpoint, no peer

`--matmuls` times one decoder layer's seven projections (random GPTQ tensors on the GPU, L2 flushed between runs,
triton.testing.do_bench) at each --tokens count, fused against dequantise + cuBLAS, and multiplies by --layers:
it is how the switch point layer.FUSED_MAX_TOKENS and the kernel tiles were chosen.

A step's time is (time to generate 1 + --steps tokens - time to generate 1) / --steps, so prefill drops out; the
stop comes from a stopping criterion while max_new_tokens stays at --max-new-tokens, so the cache and its attention
are as large as in a real evaluation. Also printed: prefill seconds per batch and the full MedQA-4-option
(1,273 questions) generate and sc (k=5) wall times extrapolated from them, as if every answer ran to
--max-new-tokens (an upper bound: generation stops once every row of a batch has written <|im_end|>).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .train_speed import worker

MEDQA4_QUESTIONS = 1273


def time_side(spec: dict) -> dict:
    """Load one side's model, then per batch size: prefill + one token, and prefill + 1 + steps tokens."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from ..gptq import layer as gptq_layer
    from .eval_speed import load_side

    class StopAt(StoppingCriteria):
        def __init__(self, length: int):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, device=input_ids.device)

    sync = torch.cuda.synchronize if spec["device"].startswith("cuda") else (lambda: None)
    start = time.perf_counter()
    model = load_side("ours" if spec["side"] in ("fused", "dequant") else "peer", spec)
    load_s = time.perf_counter() - start
    if spec["side"] == "dequant":
        gptq_layer.FUSED_MAX_TOKENS.clear()  # today's path: dequantise + cuBLAS at every token count
    generator = torch.Generator().manual_seed(0)
    results = {}
    for batch in spec["batch_sizes"]:
        ids = torch.randint(0, model.config.vocab_size, (batch, spec["prompt_len"]), generator=generator)
        ids = ids.to(spec["device"])

        def generate(new_tokens: int) -> float:
            sync()
            begin = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec["max_new_tokens"],
                           min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                           disable_compile=True, pad_token_id=0,
                           stopping_criteria=StoppingCriteriaList([StopAt(spec["prompt_len"] + new_tokens)]))
            sync()
            return time.perf_counter() - begin

        generate(2)  # warm-up: kernel compilation, cuBLAS heuristics
        prefill = generate(1)
        step_ms = (generate(1 + spec["steps"]) - prefill) / spec["steps"] * 1e3
        results[str(batch)] = {"step_ms": round(step_ms, 2), "prefill_s": round(prefill, 3),
                               "tokens_per_s": round(batch / step_ms * 1e3)}
    cuda = spec["device"].startswith("cuda")
    return {"load_s": round(load_s, 1), "batches": results,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None}


LLAMA2_70B_PROJECTIONS = {"q": (8192, 8192), "k": (8192, 1024), "v": (8192, 1024), "o": (8192, 8192),
                          "gate": (8192, 28672), "up": (8192, 28672), "down": (28672, 8192)}  # (in, out)


def time_matmuls(bits: int, group_size: int, tokens: list[int], layers: int) -> list[dict]:
    """ms per step for `layers` decoder layers' projections at each token count: fused and dequantise + cuBLAS."""
    from triton.testing import do_bench

    from ..gptq.format import GPTQConfig
    from ..gptq.layer import GPTQLinear
    from ..gptq.random_checkpoint import random_gptq_linear
    from ..gptq.triton_dequant import dequantize_triton
    from ..gptq.triton_gemv import fused_matmul
    config, generator = GPTQConfig(bits=bits, group_size=group_size, desc_act=True), torch.Generator("cuda")
    projections = []
    for in_features, out_features in LLAMA2_70B_PROJECTIONS.values():
        layer = GPTQLinear(in_features, out_features, config, device="cuda")
        layer.set_packed(**random_gptq_linear(in_features, out_features, config, generator, "cuda"))
        projections.append(layer)
    rows = []
    for count in tokens:
        xs = [torch.randn(count, p.in_features, dtype=torch.bfloat16, device="cuda") for p in projections]
        fused = sum(do_bench(lambda: fused_matmul(x, p), warmup=3, rep=12) for x, p in zip(xs, projections))
        dequant = sum(do_bench(lambda: x @ dequantize_triton(p, torch.bfloat16).t(), warmup=3, rep=12)
                      for x, p in zip(xs, projections))
        rows.append({"tokens": count, "fused_ms": round(fused * layers, 1), "dequant_ms": round(dequant * layers, 1)})
    return rows


def medqa4_minutes(side: dict, batch: int, max_new_tokens: int, samples: int) -> float | None:
    """Whole-benchmark minutes at `batch` sequences per generate call, every answer running to the budget."""
    r = side.get("batches", {}).get(str(batch))
    if r is None:
        return None
    calls = -(-MEDQA4_QUESTIONS * samples // batch)
    return calls * (r["prefill_s"] + max_new_tokens * r["step_ms"] / 1e3) / 60


def table(results: dict) -> str:
    sides, batches = results["sides"], results["batch_sizes"]
    lines = [f"{results['card']} · {results['date']} · llama2-70b shape ({results['layers']} layers), "
             f"{results['bits']}-bit g{results['group_size']} act-order, random weights · prompt {results['prompt_len']} "
             f"tokens, cache for +{results['max_new_tokens']} · `{results['command']}`", "",
             "| side | " + " | ".join(f"{b} seq: ms/step (tok/s)" for b in batches) + " | load s | peak GiB |",
             "|---|" + "---:|" * (len(batches) + 2)]
    for name, side in sides.items():
        if "error" in side:
            lines.append(f"| {name} | error: {side['error']} |")
            continue
        cells = [f"{side['batches'][str(b)]['step_ms']} ({side['batches'][str(b)]['tokens_per_s']})" for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {side['load_s']} | {side['peak_gib']} |")
    fused = sides.get("fused", {})
    for other in ("dequant", "peer"):
        if "batches" in fused and "batches" in sides.get(other, {}):
            lines.append(f"\n{other} / fused step time: " + ", ".join(
                f"{b} seq {sides[other]['batches'][str(b)]['step_ms'] / fused['batches'][str(b)]['step_ms']:.2f}x"
                for b in batches))
    biggest = max(batches)
    for name, side in sides.items():
        generate = medqa4_minutes(side, biggest, results["max_new_tokens"], 1)
        sc = medqa4_minutes(side, biggest, results["max_new_tokens"], 5)
        if generate is not None:
            lines.append(f"\n{name}: MedQA-4 at {biggest} sequences per batch, every answer {results['max_new_tokens']} "
                         f"tokens (extrapolated): generate {generate:.1f} min, sc k=5 {sc:.1f} min")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=512, help="the cache's room, as eval.max_new_tokens")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size")
    parser.add_argument("--sides", nargs="+", choices=("fused", "dequant", "peer"), default=["fused", "dequant", "peer"])
    parser.add_argument("--peer-backend", default="gptq_exllama_v2",
                        help="gptqmodel backend (auto picks machete, which downloads CUTLASS and fails offline)")
    parser.add_argument("--checkpoint", default=None, help="random checkpoint folder (written if missing)")
    parser.add_argument("--out", type=Path, default=Path("runs/decode-speed"))
    parser.add_argument("--matmuls", action="store_true", help="time the projections' matmuls alone")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128], help="--matmuls: token counts")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU: run this on the GPU machine")
    if args.matmuls:
        print(f"{torch.cuda.get_device_name(0)} · {time.strftime('%Y-%m-%d')} · {args.bits}-bit g{args.group_size} "
              f"act-order · ms per step, {args.layers} layers x 7 projections\n\n| tokens | fused | dequantise + cuBLAS |"
              "\n|---:|---:|---:|")
        for row in time_matmuls(args.bits, args.group_size, args.tokens, args.layers):
            print(f"| {row['tokens']} | {row['fused_ms']} | {row['dequant_ms']} |")
        return
    from ..gptq.format import GPTQConfig
    from ..gptq.random_checkpoint import write_random_gptq_checkpoint
    from .train_speed import llama2_70b_config, run_worker
    config = GPTQConfig(bits=args.bits, group_size=args.group_size, desc_act=True)
    checkpoint = Path(args.checkpoint or f"/tmp/gptq-llama2-70b-L{args.layers}-{args.bits}b-g{args.group_size}-act")
    if not (checkpoint / "model.safetensors.index.json").is_file():
        write_random_gptq_checkpoint(checkpoint, llama2_70b_config(args.layers), config, device="cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "layers": args.layers,
               "bits": args.bits, "group_size": args.group_size, "prompt_len": args.prompt_len,
               "max_new_tokens": args.max_new_tokens, "batch_sizes": args.batch_sizes,
               "command": " ".join(["python -m finetune.bench.decode_speed"] + (argv or sys.argv[1:])), "sides": {}}
    spec = {"checkpoint": str(checkpoint), "device": "cuda:0", "bits": args.bits, "peer_backend": args.peer_backend,
            "batch_sizes": args.batch_sizes, "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
            "steps": args.steps}
    with open(args.out / "log.txt", "a") as log:
        for side in args.sides:
            results["sides"][side] = run_worker("finetune.bench.decode_speed", [json.dumps(spec | {"side": side})], log)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))  # kept if a later side dies
    text = table(results)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(time_side)
    else:
        main()
