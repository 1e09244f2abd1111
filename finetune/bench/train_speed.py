"""Training speed on one GPU: this toolkit's step against the peer stack, in the same run, on Llama-2-70B shape.

    python -m finetune.bench.train_speed --layers 80 --bits 4 --group-size 128 --seq-len 4096 --out runs/speed

Writes a random-weight GPTQ checkpoint of the chosen shape (values do not change speed; shapes and packing do),
then runs each case in its own process so that each peak is its own:
  peer   transformers + optimum + gptqmodel (GPTQConfig(backend="auto_trainable")), PEFT LoRA, gradient
         checkpointing, AdamW: the configuration of shared/gpu/README.md
  ours   finetune.load_model + the same PEFT LoRA + enable_fast_training (per --budgets), the same AdamW
Prints tokens/s, peak GiB, model TFLOP/s (4.3 x linear params x tokens/s), the ratio to the peer, a profile of one
of our steps (GEMM, dequantise, attention, other), and the longest context that fits; writes results.json and
table.md into --out.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from finetune import REPO_ROOT

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2 ** 30


def llama2_70b_config(layers: int):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, torch_dtype="float16")


# ------------------------------------------------------------------------------------------- worker: the cases

def write_checkpoint(spec: dict) -> dict:
    from finetune.gptq.format import GPTQConfig
    from finetune.gptq.random_checkpoint import write_random_gptq_checkpoint
    start = time.perf_counter()
    config = GPTQConfig(bits=spec["bits"], group_size=spec["group_size"], desc_act=spec["act_order"])
    model_config, tokenizer = llama2_70b_config(spec["layers"]), None
    if spec.get("tokenizer"):  # a real tokenizer beside the weights, so that train.py can run on real text
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
        model_config.vocab_size = len(tokenizer)
    write_random_gptq_checkpoint(spec["checkpoint"], model_config, config,
                                 device="cuda" if torch.cuda.is_available() else "cpu")
    if tokenizer is not None:
        tokenizer.save_pretrained(spec["checkpoint"])
    return {"seconds": round(time.perf_counter() - start, 1)}


def build_model(side: str, spec: dict):
    """The model with LoRA as each stack sets it up; returns (model, description of the fast path or None)."""
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    if side == "peer":
        from transformers import AutoModelForCausalLM
        from transformers import GPTQConfig as HFGPTQConfig
        model = AutoModelForCausalLM.from_pretrained(
            spec["checkpoint"], quantization_config=HFGPTQConfig(bits=spec["bits"], backend="auto_trainable"),
            device_map={"": 0}, dtype=torch.bfloat16, attn_implementation="sdpa")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return get_peft_model(model, lora), None
    from finetune.gptq.loader import load_model
    from finetune.gpu.fast_training import enable_fast_training
    from finetune.models.adapter import peft_without_gptqmodel
    with peft_without_gptqmodel():
        model = get_peft_model(load_model(spec["checkpoint"]), lora)  # this process's GPU (cuda:0 alone)
    return model, enable_fast_training(model, seq_len=spec["seq_len"], memory_budget_gib=spec.get("budget"),
                                       host_memory_gib=spec.get("host_memory_gib"))


def training_step(model, optimizer, tokens: torch.Tensor) -> float:
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def time_training(model, seq_len: int, steps: int, warmup: int, data_parallel: bool = False) -> dict:
    """tokens/s over `steps` timed steps after `warmup` steps (of all processes together when data_parallel: each
    under `accelerate launch` trains on its own sequence, DDP averages the LoRA gradients, as SFTTrainer does);
    peak memory of the training steps (of this process)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    processes, device = 1, next(model.parameters()).device
    tokens = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    if data_parallel:
        from accelerate import Accelerator, DistributedDataParallelKwargs
        # no buffer re-broadcast every step (finetune.training.sft sets the same)
        accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        processes = accelerator.num_processes
        tokens = torch.roll(tokens, accelerator.process_index * 997)  # each process its own sequence
        model, optimizer = accelerator.prepare(model, optimizer)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(training_step(model, optimizer, tokens).item())  # .item() synchronises
        times.append(time.perf_counter() - start)
    timed = times[warmup:]
    return {"tokens_per_s": round(processes * seq_len * len(timed) / sum(timed), 1), "processes": processes,
            "step_s": [round(t, 3) for t in times],
            "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2), "losses": [round(x, 4) for x in losses],
            "optimizer": optimizer, "tokens": tokens}


KERNEL_CLASSES = [("host copy", re.compile(r"Memcpy (DtoH|HtoD)")),  # on a side stream, overlapping compute
                  ("dequantise", re.compile(r"dequant", re.I)),
                  ("attention", re.compile(r"flash|fmha|attention|attn", re.I)),
                  ("GEMM", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|matmul|gemv|splitk", re.I))]


def profile_gpu(work) -> dict:
    """Where `work()`'s GPU time goes, by kernel class; 'idle' is wall time with no kernel running."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        work()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    classes, kernels = {"GEMM": 0.0, "dequantise": 0.0, "attention": 0.0, "other": 0.0, "host copy": 0.0}, {}
    for event in prof.key_averages():
        ms = event.self_device_time_total / 1e3
        if ms <= 0:
            continue
        kind = next((name for name, pattern in KERNEL_CLASSES if pattern.search(event.key)), "other")
        classes[kind] += ms
        kernels[event.key[:90]] = kernels.get(event.key[:90], 0) + ms
    busy = sum(ms for kind, ms in classes.items() if kind != "host copy")  # compute; copies overlap it
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:10]
    return {"wall_ms": round(wall_ms, 1), "busy_ms": round(busy, 1),
            "share": {k: round(v / wall_ms, 3) for k, v in classes.items()} | {"idle": round(1 - busy / wall_ms, 3)},
            "ms": {k: round(v, 1) for k, v in classes.items()}, "top_kernels": [(k, round(v, 1)) for k, v in top]}


def train_case(spec: dict) -> dict:
    from finetune.gpu.fast_training import linear_parameter_count
    model, fast = build_model(spec["side"], spec)
    result = time_training(model, spec["seq_len"], spec["steps"], spec["warmup"],
                           data_parallel=spec.get("processes", 1) > 1)
    optimizer, tokens = result.pop("optimizer"), result.pop("tokens")
    params = linear_parameter_count(model) or spec["linear_params"]  # the peer's layers are gptqmodel's
    result |= {"fast_path": fast, "tflops": round(4.3 * params * result["tokens_per_s"] / 1e12, 1)}
    if spec.get("profile"):
        result["profile"] = profile_gpu(lambda: training_step(model, optimizer, tokens).item())
    return result


def longest_case(spec: dict) -> dict:
    """One training step at each length, longest last; stops at the first that does not fit."""
    from finetune.gpu.fast_training import enable_fast_training
    model, _ = build_model("ours", spec | {"seq_len": spec["lengths"][0]})
    fits = {}
    for seq_len in spec["lengths"]:
        try:
            plan = enable_fast_training(model, seq_len=seq_len, memory_budget_gib=spec.get("budget"),
                                        host_memory_gib=spec.get("host_memory_gib"))
            timing = time_training(model, seq_len, steps=1, warmup=0)
            fits[seq_len] = {"ok": True, "peak_gib": timing["peak_gib"], "step_s": timing["step_s"][0],
                             "plan": {k: plan[k] for k in ("keep", "host", "recompute", "offload",
                                                           "planned_peak_gib")}}
            del timing  # its optimizer's moments must not count as model memory in the next plan
        except torch.OutOfMemoryError as err:
            fits[seq_len] = {"ok": False, "error": str(err).splitlines()[0][:160]}
            break
        finally:
            torch.cuda.empty_cache()
    return {"fits": fits}


def dequant_case(spec: dict) -> dict:
    """Dequantisation time and bandwidth for one 70B linear of each shape (bytes: packed in + bf16 out)."""
    import triton.testing

    from finetune.gptq.format import GPTQConfig
    from finetune.gptq.layer import GPTQLinear
    from finetune.gptq.random_checkpoint import random_gptq_linear
    from finetune.gptq.triton_dequant import dequantize_triton
    generator, rows = torch.Generator("cuda").manual_seed(0), {}
    for bits in (2, 3, 4, 8):
        config = GPTQConfig(bits=bits, group_size=spec["group_size"], desc_act=spec["act_order"])
        for in_f, out_f in ((8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192)):
            layer = GPTQLinear(in_f, out_f, config, device="cuda")
            layer.set_packed(**random_gptq_linear(in_f, out_f, config, generator, "cuda"))
            ms = triton.testing.do_bench(lambda: dequantize_triton(layer, torch.bfloat16), return_mode="median")
            moved = sum(p.numel() * p.element_size() for p in layer.parameters()) + 2 * in_f * out_f
            rows[f"{bits}b {in_f}x{out_f}"] = {"ms": round(ms, 3), "GB_per_s": round(moved / ms / 1e6)}
    return rows


CASES = {"write": write_checkpoint, "train": train_case, "longest": longest_case, "dequant": dequant_case}


# ------------------------------------------------------------------------------------------------ orchestration

def run_worker(module: str, args: list[str], log, env: dict | None = None, launcher=(sys.executable,)) -> dict:
    """`python -m <module> --worker <args>` in a fresh process (its own CUDA context and peak); its result is the
    last `RESULT ` line it prints, or {"error": its last line on stderr}. The whole output goes to `log`."""
    env = os.environ | {"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        "TOKENIZERS_PARALLELISM": "false"} | (env or {})
    proc = subprocess.run([*launcher, "-m", module, "--worker", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True)
    log.write(f"\n===== {' '.join(args)}\n{proc.stdout}\n{proc.stderr}\n")
    log.flush()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1][len("RESULT "):])


def worker(case) -> None:
    """The other side of `run_worker`, in the `--worker ... SPEC` process: seeded, `case` runs on the JSON spec
    (the last argument) and its result is printed as the RESULT line (by the main process under accelerate)."""
    torch.manual_seed(0)
    result = case(json.loads(sys.argv[-1]))
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps(result), flush=True)


def run_case(kind: str, spec: dict, log) -> dict:
    """One case in its own process, timed."""
    # part of our path: no fragmentation at long lengths
    env = {} if spec.get("side") == "peer" else {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    launcher = (sys.executable,)
    if spec.get("processes", 1) > 1:  # data parallel, launched as users launch train.py
        launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                    "--num_processes", str(spec["processes"]), "--mixed_precision", "no", "--dynamo_backend", "no")
    start = time.perf_counter()
    result = run_worker("finetune.bench.train_speed", [kind, json.dumps(spec)], log, env, launcher)
    return result | {"seconds": round(time.perf_counter() - start)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    parser.add_argument("--group-size", type=int, default=128, help="-1: one group")
    parser.add_argument("--no-act-order", dest="act_order", action="store_false")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4, help="timed steps, after --warmup steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budgets", nargs="*", default=["auto"],
                        help="memory budgets (GiB) to run ours at; 'auto' = 90%% of the card")
    parser.add_argument("--host-memory-gib", type=float, default=None,
                        help="pinned host memory ours may keep activations in (default: the fast path's, "
                             "host_offload.default_host_memory; 0: none)")
    parser.add_argument("--longest", type=int, nargs="*", default=[], help="sequence lengths to try, ascending")
    parser.add_argument("--gpus", type=int, default=1,
                        help="also run ours at the first budget data-parallel on this many GPUs (accelerate launch)")
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--dequant", action="store_true", help="also time the dequantisation kernel alone")
    parser.add_argument("--checkpoint", default=None, help="where the random checkpoint goes (default /tmp/...)")
    parser.add_argument("--out", default="runs/speed")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU: the speed benchmark runs on a GPU machine")

    tag = f"L{args.layers}-{args.bits}b-g{args.group_size}{'-act' if args.act_order else ''}"
    checkpoint = args.checkpoint or f"/tmp/gptq-llama2-70b-{tag}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"checkpoint": checkpoint, "layers": args.layers, "bits": args.bits, "group_size": args.group_size,
              "act_order": args.act_order, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
              "host_memory_gib": args.host_memory_gib,
              "linear_params": args.layers * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)}
    results = {"card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "config": tag,
               "command": " ".join(["python -m finetune.bench.train_speed"] + (argv or sys.argv[1:])), "cases": {}}
    with open(out / "log.txt", "a") as log:
        def record(where: dict, name: str, kind: str, spec: dict) -> dict:
            where[name] = run_case(kind, spec, log)
            (out / "results.json").write_text(json.dumps(results, indent=1))  # after each case: partial runs count
            return where[name]

        if args.dequant:
            record(results, "dequant", "dequant", common)
        if not (Path(checkpoint) / "model.safetensors.index.json").is_file():
            if "error" in record(results, "write", "write", common):
                sys.exit(f"error: writing the random checkpoint failed: {results['write']['error']} "
                         f"(log: {out / 'log.txt'})")
        if args.peer:
            record(results["cases"], "peer", "train", common | {"side": "peer"})
        for i, budget in enumerate(args.budgets):
            spec = common | {"side": "ours", "budget": None if budget == "auto" else float(budget),
                             "profile": args.profile and i == 0}
            record(results["cases"], f"ours budget={budget}", "train", spec)
            if i == 0 and args.longest:  # right after the headline case: the longest context matters more
                record(results, "longest", "longest", common | {"lengths": args.longest})
            if i == 0 and args.gpus > 1:
                record(results["cases"], f"ours budget={budget}, {args.gpus} GPUs",
                       "train", spec | {"processes": args.gpus, "profile": False})
    table = format_table(results)
    (out / "table.md").write_text(table + "\n")
    print(table)


def format_table(results: dict) -> str:
    peer = results["cases"].get("peer", {}).get("tokens_per_s")
    lines = [f"{results['card']} · {results['date']} · {results['config']} · `{results['command']}`", "",
             "| case | tok/s | model TFLOP/s | peak GiB (reserved) | × peer | fast path |",
             "|---|---|---|---|---|---|"]
    for name, r in results["cases"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / peer:.2f}" if peer else "–"
        fast = r["fast_path"] and (f"keep {r['fast_path']['keep']}, host {r['fast_path']['host']}, "
                                   f"recompute {r['fast_path']['recompute']} (offload {r['fast_path']['offload']})")
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['tflops']} | {r['peak_gib']} ({r['reserved_gib']}) "
                     f"| {ratio} | {fast or 'peer config'} |")
    for name, r in results["cases"].items():
        one_gpu = results["cases"].get(name.rsplit(",", 1)[0], {}).get("tokens_per_s")
        if r.get("processes", 1) > 1 and one_gpu:
            lines += ["", f"data parallel: {name} = {r['tokens_per_s'] / one_gpu:.2f}x the same case on one GPU"]
    for name, r in results["cases"].items():
        if "profile" in r:
            p = r["profile"]
            shares = ", ".join(f"{k} {v:.0%}" for k, v in p["share"].items())
            lines += ["", f"profile of one step ({name}, {p['wall_ms']:.0f} ms): {shares}"]
    if "longest" in results:
        fits = results["longest"].get("fits", {})
        lines += ["", "longest context: " + ("; ".join(
            f"{n}: " + (f"fits, peak {f['peak_gib']} GiB, step {f['step_s']} s" if f.get("ok") else "does not fit")
            for n, f in fits.items()) or f"error: {results['longest'].get('error')}")]
    if "dequant" in results:
        lines += ["", "dequantise (median ms, GB/s): " + "; ".join(
            f"{k} {v['ms']} ms {v['GB_per_s']}" for k, v in results["dequant"].items() if isinstance(v, dict))]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(CASES[sys.argv[2]])
    else:
        main()
