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
    python -m finetune.bench.decode_speed --in-memory --bits 3 --old-kernel old_triton_gemv.py

`--in-memory` builds the random model straight on the GPU (no checkpoint on disk, seconds instead of minutes) and
times every side in one process, one after the other: old (with --old-kernel: an earlier triton_gemv.py, its own
FUSED_MAX_TOKENS {4: 64, 3: 1}, on the checkpoint layout), dequant, then fused (whose first call reorders the
rows: `triton_gemv.prepare`, done in the warm-up). No peer.

`--matmuls` times one decoder layer's seven projections (random GPTQ tensors on the GPU, L2 flushed between runs,
triton.testing.do_bench) at each --tokens count, fused against dequantise + cuBLAS, and multiplies by --layers:
it is how the switch point layer.FUSED_MAX_TOKENS and the kernel tiles were chosen. With --old-kernel it times that
file's fused_matmul too; `--sweep` tries triton_gemv.TILES candidates per token count and prints the fastest.

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
    from ..gptq import layer as gptq_layer
    from .eval_speed import load_side

    start = time.perf_counter()
    model = load_side("ours" if spec["side"] in ("fused", "dequant") else "peer", spec)
    load_s = time.perf_counter() - start
    if spec["side"] == "dequant":
        gptq_layer.FUSED_MAX_TOKENS.clear()  # today's path: dequantise + cuBLAS at every token count
    return {"load_s": round(load_s, 1)} | time_batches(model, spec)


def time_batches(model, spec: dict) -> dict:
    """Per batch size: prefill + one token, and prefill + 1 + steps tokens, through model.generate."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAt(StoppingCriteria):
        def __init__(self, length: int):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, device=input_ids.device)

    cuda = spec["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
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

        generate(2)  # warm-up: kernel compilation, cuBLAS heuristics, the fused side's decode layout
        prefill = generate(1)
        step_ms = (generate(1 + spec["steps"]) - prefill) / spec["steps"] * 1e3
        results[str(batch)] = {"step_ms": round(step_ms, 2), "prefill_s": round(prefill, 3),
                               "tokens_per_s": round(batch / step_ms * 1e3)}
    return {"batches": results,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None}


def load_module(path: str):
    """A Python file as a module (--old-kernel: an earlier triton_gemv.py, with absolute imports)."""
    import importlib.util
    module_spec = importlib.util.spec_from_file_location("old_triton_gemv", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def random_gptq_words(in_features: int, out_features: int, config, generator: torch.Generator,
                      device: str) -> dict[str, torch.Tensor]:
    """Random packed words straight away (any bit pattern is valid packing; no pack(), which is slow at 70B), the
    random checkpoint's symmetric zero points and scales, act-order g_idx."""
    import math

    from ..gptq.format import default_g_idx, pack
    bits, groups = config.bits, config.n_groups(in_features)
    qweight = torch.empty((in_features * bits // 32, out_features), dtype=torch.int32, device=device)
    qweight.random_(generator=generator)
    stored_zero = 2 ** (bits - 1) - (1 if config.checkpoint_format == "gptq" else 0)
    zero_run = pack(torch.full((32, 1), stored_zero, dtype=torch.int32), bits).t()  # 32 columns' zeros: bits words
    qzeros = zero_run.repeat(groups, out_features // 32).to(device)
    scale = math.sqrt(12) / (2 ** bits * math.sqrt(in_features))
    scales = (scale * (0.5 + torch.rand(groups, out_features, generator=generator, device=device))).half()
    g_idx = default_g_idx(in_features, config.group_size, device)
    if config.desc_act:
        g_idx = g_idx[torch.randperm(in_features, generator=generator, device=device)]
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}


def random_model(layers: int, config, device: str = "cuda"):
    """A Llama-2-70B-shaped model of `layers` decoder layers whose linears are GPTQLinear with random words, built
    on `device` without a checkpoint (embeddings and norms random too), in bf16 as load_model gives it."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..gptq.layer import GPTQLinear
    from .train_speed import llama2_70b_config
    with init_empty_weights():  # parameters on meta, buffers (rotary inv_freq) real
        model = AutoModelForCausalLM.from_config(llama2_70b_config(layers), dtype=torch.bfloat16)
    generator = torch.Generator(device).manual_seed(0)
    for name, linear in list(model.model.layers.named_modules()):
        if isinstance(linear, torch.nn.Linear):
            layer = GPTQLinear(linear.in_features, linear.out_features, config, device=device, dtype=torch.bfloat16)
            for key, tensor in random_gptq_words(linear.in_features, linear.out_features, config, generator,
                                                 device).items():
                setattr(layer, key, tensor)
            parent, _, child = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), child, layer)
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                value = torch.ones if "norm" in type(module).__name__.lower() else torch.randn
                tensor = value(param.shape, device=device, dtype=torch.bfloat16)
                module._parameters[key] = torch.nn.Parameter(tensor if value is torch.ones else tensor * 0.02,
                                                             requires_grad=False)
    return model.to(device).eval()


def time_in_memory(args) -> dict:
    """Every side on one random model in this process: old (with --old-kernel), dequant, fused."""
    from ..gptq import layer as gptq_layer
    from ..gptq import triton_gemv
    from ..gptq.format import GPTQConfig
    from ..gptq.layer import GPTQLinear
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the plumbing only (no fused path there)
    start = time.perf_counter()
    model = random_model(args.layers, GPTQConfig(bits=args.bits, group_size=args.group_size, desc_act=True), device)
    if device == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    try:  # as finetune.evaluation.harness does with gpu.fast_path (the default)
        from ..gpu.fast_training import apply_liger
        apply_liger(model)
    except Exception as err:  # noqa: BLE001 - the timing stands without it; say so
        print(f"apply_liger skipped: {err}", file=sys.stderr)
    spec = {"device": device, "batch_sizes": args.batch_sizes, "prompt_len": args.prompt_len,
            "max_new_tokens": args.max_new_tokens, "steps": args.steps}
    sides, saved = {}, dict(gptq_layer.FUSED_MAX_TOKENS)
    with torch.inference_mode():
        if args.old_kernel:
            old = load_module(args.old_kernel)
            prepare, fused = triton_gemv.prepare, triton_gemv.fused_matmul
            triton_gemv.prepare, triton_gemv.fused_matmul = (lambda layer: True), old.fused_matmul
            gptq_layer.FUSED_MAX_TOKENS.clear()
            gptq_layer.FUSED_MAX_TOKENS.update({4: 64, 3: 1})
            try:
                sides["old"] = time_batches(model, spec)
            finally:
                triton_gemv.prepare, triton_gemv.fused_matmul = prepare, fused
                for module in model.modules():
                    module.__dict__.pop("_unpacked_zeros", None)
        gptq_layer.FUSED_MAX_TOKENS.clear()
        sides["dequant"] = time_batches(model, spec)
        gptq_layer.FUSED_MAX_TOKENS.update(saved)
        sides["fused"] = time_batches(model, spec)
    moved = sum(m.stored_rows is not None for m in model.modules() if isinstance(m, GPTQLinear))
    return {"build_s": round(build_s, 1), "decode_layout_layers": moved, "sides": sides}


LLAMA2_70B_PROJECTIONS = {"q": (8192, 8192), "k": (8192, 1024), "v": (8192, 1024), "o": (8192, 8192),
                          "gate": (8192, 28672), "up": (8192, 28672), "down": (28672, 8192)}  # (in, out)


def time_matmuls(bits: int, group_size: int, tokens: list[int], layers: int, old=None, sweep=None) -> list[dict]:
    """ms per step for `layers` decoder layers' projections at each token count: fused, dequantise + cuBLAS, and
    `old` (an earlier triton_gemv module) on its own copy of the checkpoint layout. sweep: TILES candidates
    (block_n, warps, stages, programs per SM) tried per token count; the fastest is reported."""
    from triton.testing import do_bench

    from ..gptq import triton_gemv
    from ..gptq.format import GPTQConfig
    from ..gptq.layer import GPTQLinear
    from ..gptq.triton_dequant import dequantize_triton
    config, generator = GPTQConfig(bits=bits, group_size=group_size, desc_act=True), torch.Generator("cuda")
    projections, checkpoint_layout = [], []
    for in_features, out_features in LLAMA2_70B_PROJECTIONS.values():
        tensors = random_gptq_words(in_features, out_features, config, generator, "cuda")
        for kept in (projections, checkpoint_layout) if old else (projections,):
            layer = GPTQLinear(in_features, out_features, config, device="cuda")
            for name, tensor in tensors.items():
                setattr(layer, name, tensor.clone())
            kept.append(layer)
    assert all(triton_gemv.prepare(p) for p in projections)

    def total(fn, pairs) -> float:  # ms for `layers` layers
        return round(sum(do_bench(lambda x=x, p=p: fn(x, p), warmup=5, rep=20) for x, p in pairs) * layers, 2)

    rows = []
    for count in tokens:
        xs = [torch.randn(count, p.in_features, dtype=torch.bfloat16, device="cuda") for p in projections]
        row = {"tokens": count, "fused_ms": total(triton_gemv.fused_matmul, zip(xs, projections)),
               "dequant_ms": total(lambda x, p: x @ dequantize_triton(p, torch.bfloat16).t(), zip(xs, projections))}
        if old:
            row["old_ms"] = total(old.fused_matmul, zip(xs, checkpoint_layout))
        if sweep:
            block_m = 1 if count == 1 else min(64, max(16, 1 << (count - 1).bit_length()))
            default, tried = triton_gemv.TILES[block_m], {}
            try:
                for candidate in sweep:
                    triton_gemv.TILES[block_m] = candidate
                    tried[candidate] = total(triton_gemv.fused_matmul, zip(xs, projections))
            finally:
                triton_gemv.TILES[block_m] = default
            best = min(tried, key=tried.get)
            row |= {"best_tile": best, "best_ms": tried[best], "tried": {str(k): v for k, v in tried.items()}}
        rows.append(row)
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
    parser.add_argument("--old-kernel", default=None, help="an earlier triton_gemv.py to time beside (absolute imports)")
    parser.add_argument("--sweep", nargs="+", default=None, metavar="N,WARPS,STAGES,PER_SM",
                        help="--matmuls: triton_gemv.TILES candidates to try per token count, e.g. 128,4,3,4")
    parser.add_argument("--in-memory", action="store_true", help="random model built on the GPU; sides in-process")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU: run this on the GPU machine")
    old = load_module(args.old_kernel) if args.old_kernel and args.matmuls else None
    sweep = [tuple(int(v) for v in c.split(",")) for c in args.sweep] if args.sweep else None
    if args.matmuls:
        print(f"{torch.cuda.get_device_name(0)} · {time.strftime('%Y-%m-%d')} · {args.bits}-bit g{args.group_size} "
              f"act-order · ms per step, {args.layers} layers x 7 projections (do_bench, L2 flushed)\n\n"
              f"| tokens | fused | dequantise + cuBLAS |{' old fused |' if old else ''}"
              f"{' best tile (n, warps, stages, per SM) | its ms |' if sweep else ''}"
              f"\n|---:|---:|---:|{'---:|' if old else ''}{'---|---:|' if sweep else ''}", flush=True)
        for row in time_matmuls(args.bits, args.group_size, args.tokens, args.layers, old, sweep):
            print(f"| {row['tokens']} | {row['fused_ms']} | {row['dequant_ms']} |"
                  + (f" {row['old_ms']} |" if old else "")
                  + (f" {row['best_tile']} | {row['best_ms']} |" if sweep else ""), flush=True)
            if sweep:
                print(json.dumps({"tokens": row["tokens"], "tried": row["tried"]}), file=sys.stderr)
        return
    if args.in_memory:
        result = time_in_memory(args)
        print(f"{torch.cuda.get_device_name(0)} · {time.strftime('%Y-%m-%d')} · llama2-70b shape ({args.layers} "
              f"layers), {args.bits}-bit g{args.group_size} act-order, random weights built on the GPU in "
              f"{result['build_s']} s · prompt {args.prompt_len}, cache for +{args.max_new_tokens}, {args.steps} "
              f"steps timed · decode layout on {result['decode_layout_layers']} linears\n\n| side | "
              + " | ".join(f"{b} seq ms/step (tok/s)" for b in args.batch_sizes) + " | peak GiB |\n|---|"
              + "---:|" * (len(args.batch_sizes) + 1))
        for name, side in result["sides"].items():
            cells = [f"{side['batches'][str(b)]['step_ms']} ({side['batches'][str(b)]['tokens_per_s']})"
                     for b in args.batch_sizes]
            print(f"| {name} | " + " | ".join(cells) + f" | {side['peak_gib']} |")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"in-memory-{args.bits}b.json").write_text(json.dumps(result, indent=1))
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
