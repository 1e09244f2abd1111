"""Evaluation: the one-pass option scorer (prompt once, options under a tree mask) against plain full-sequence
forwards, voting and intervals, the three modes end to end on a tiny random GPTQ model (same seed, same samples),
every bad input refused before a weight is read, the eval-speed benchmark's CPU path, and the real thing: a few
questions of each shared benchmark's real files with SmolLM2-135M-Instruct GPTQ, alone and with an adapter from a
short `smoke` training run that also scores a slice during training."""

import hashlib
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

from finetune import load_model
from finetune.bench import eval_speed
from finetune.config.recipe import compose_recipe
from finetune.data import chatml
from finetune.data.registry import default_data_root
from finetune.evaluation.benchmarks import EvalError, benchmark_specs, load_items
from finetune.evaluation.harness import evaluate, evaluate_many, loglik_requests, prepare
from finetune.evaluation.scoring import OptionRequest, generate_texts, majority_vote, option_logprobs, wilson_interval
from finetune.gptq.format import GPTQConfig
from finetune.gptq.random_checkpoint import write_random_gptq_checkpoint
from finetune.training.eval_callback import sdpa_attention

REPO = Path(__file__).resolve().parents[2]
SHARED = ["pubmedqa", "medmcqa", "medqa", "medqa4"]


@pytest.fixture(scope="module")
def tiny_gptq(tiny_llama, tmp_path_factory) -> Path:
    """A 2-layer random-weight GPTQ Llama (4-bit g32 act-order) with the tiny fixture's ChatML BPE tokenizer."""
    out = tmp_path_factory.mktemp("tiny-gptq")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    write_random_gptq_checkpoint(out, config, GPTQConfig(bits=4, group_size=32, desc_act=True), seed=1)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


def tiny_cfg(model_dir: Path, output_dir: Path, *overrides: str):
    return compose_recipe("smoke", [f"model.name={model_dir}", f"output_dir={output_dir}",
                                    "eval.benchmarks=[pubmedqa_smoke]", *overrides])


# --- the scorer, by hand --------------------------------------------------------------------------------------------


def full_sequence_logprob(model, prompt_ids: list[int], option_ids: list[int]) -> float:
    """log p(option | prompt) from one plain forward of prompt + option: no cache, no padding, no batch."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + option_ids]), use_cache=False).logits[0].double()
    logprobs = logits.log_softmax(-1)
    return sum(logprobs[len(prompt_ids) - 1 + j, token].item() for j, token in enumerate(option_ids))


def test_tree_batch_equals_full_sequence_forwards(tiny_gptq):
    model = load_model(tiny_gptq, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gptq)
    chatml.prepare_tokenizer(tokenizer)
    cfg = tiny_cfg(tiny_gptq, "unused")
    specs = benchmark_specs()
    # one batch mixing 3-choice PubMedQA and 4-choice MedQA questions, prompts of different lengths
    items = load_items(specs["pubmedqa_smoke"], cfg, 3)[1] + load_items(specs["medqa4"], cfg, 2)[1]
    _, _, requests = loglik_requests(tokenizer, items)
    assert len({len(r.prompt_ids) for r in requests}) == 5 and {len(r.option_ids) for r in requests} == {3, 4}
    batched = option_logprobs(model, requests, pad_id=tokenizer.pad_token_id)
    for request, scores in zip(requests, batched):
        by_hand = [full_sequence_logprob(model, request.prompt_ids, option) for option in request.option_ids]
        assert scores == pytest.approx(by_hand, abs=2e-4)
    # one-token options: each scored by the prompt's last position alone
    single = [OptionRequest(requests[0].prompt_ids, [[7], [9], [11]])]
    assert option_logprobs(model, single, tokenizer.pad_token_id)[0] == pytest.approx(
        [full_sequence_logprob(model, requests[0].prompt_ids, [t]) for t in (7, 9, 11)], abs=2e-4)


def test_majority_vote_and_wilson_interval():
    assert majority_vote(["B", "C", "B", None]) == "B"
    assert majority_vote(["C", "B", "B", "C"]) == "C"  # tie: the answer sampled first
    assert majority_vote([None, None, "A"]) == "A"  # unparseable samples never win, however many
    assert majority_vote([None, None]) is None
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 10)[0] == 0.0 and round(wilson_interval(0, 10)[1], 4) == 0.2775
    assert wilson_interval(50, 50)[1] == pytest.approx(1.0) and round(wilson_interval(50, 50)[0], 4) == 0.9287


# --- the modes end to end on the tiny model -------------------------------------------------------------------------


def read_predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def check_summary_matches_predictions(out: Path) -> dict:
    summary, records = json.loads((out / "summary.json").read_text()), read_predictions(out)
    assert set(summary) == {r["benchmark"] for r in records}
    for name, s in summary.items():
        mine = [r for r in records if r["benchmark"] == name]
        assert s["n"] == len(mine) and s["correct"] == sum(r["correct"] for r in mine)
        assert s["unparseable"] == sum(r["answer"] is None for r in mine)
        assert s["accuracy"] == pytest.approx(s["correct"] / s["n"])
        assert s["ci95"][0] <= s["accuracy"] <= s["ci95"][1]
        for group_key in [k for k in s if k.startswith("by_")]:
            groups = s[group_key]
            assert sum(g["n"] for g in groups.values()) == s["n"]
            assert sum(g["correct"] for g in groups.values()) == s["correct"]
            assert Counter(r["group"] for r in mine) == {g: v["n"] for g, v in groups.items()}
    return summary


def test_loglik_run_writes_every_output(tiny_gptq, tmp_path):
    out = tmp_path / "loglik"
    summary = evaluate(tiny_cfg(tiny_gptq, out, "eval.benchmarks=[pubmedqa_smoke,medqa]", "eval.limit=6"),
                       command="test")
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "eval_config.yaml", "manifest.json",
                                                     "predictions.jsonl", "results.md", "summary.json"]
    check_summary_matches_predictions(out)
    records = read_predictions(out)
    assert [r["benchmark"] for r in records] == ["pubmedqa_smoke"] * 6 + ["medqa"] * 6
    first = records[0]
    assert set(first["logprobs"]) == {"yes", "no", "maybe"} and first["answer"] == max(first["logprobs"],
                                                                                      key=first["logprobs"].get)
    assert first["output"] == f"The answer is {first['answer']}.<|im_end|>"
    assert set(records[-1]["logprobs"]) == set("ABCDE") and summary["medqa"]["by_step"]
    assert "length_normalised" in summary["medqa"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["template_sha256"] == chatml.template_hash() and manifest["adapter"] is None
    assert manifest["decoding"] == {"mode": "loglik", "batch_size": 8}  # null: 8 on the CPU
    medqa_file = default_data_root() / "medqa" / "US" / "test.jsonl"
    assert manifest["data"]["medqa"]["files"] == {str(medqa_file): hashlib.sha256(medqa_file.read_bytes()).hexdigest()}
    assert manifest["data"]["medqa"]["evaluated"] == 6 and manifest["data"]["medqa"]["of"] == 1273
    assert "| MedQA (5 options) (test) | 6 |" in (out / "results.md").read_text()
    assert "| MMLU-Medical | – | not evaluated | – | 77.6 |" in (out / "results.md").read_text()
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_parses_and_counts_unparseable(tiny_gptq, tmp_path):
    out = tmp_path / "generate"
    evaluate(tiny_cfg(tiny_gptq, out, "eval.mode=generate", "eval.limit=4", "eval.max_new_tokens=5"), command="t")
    summary = check_summary_matches_predictions(out)
    for record in read_predictions(out):
        assert isinstance(record["output"], str) and record["answer"] in (None, "yes", "no", "maybe")
    assert summary["pubmedqa_smoke"]["unparseable_rate"] == summary["pubmedqa_smoke"]["unparseable"] / 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decoding"]["max_new_tokens"] == 5 and manifest["decoding"]["greedy"] is True


def test_generation_stops_at_the_stop_token_and_keeps_to_the_budget(tiny_gptq):
    """Greedy text without a stop, then with its third token as the stop: the text ends just before it."""
    model = load_model(tiny_gptq, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gptq)
    chatml.prepare_tokenizer(tokenizer)
    items = load_items(benchmark_specs()["medqa4"], tiny_cfg(tiny_gptq, "unused"), 2)[1]
    prompts = [tokenizer(chatml.evaluation_prompt(item))["input_ids"] for item in items]
    never = [len(tokenizer) - 1]  # a token the random model does not produce here
    free = generate_texts(model, tokenizer, prompts, batch_size=2, max_new_tokens=6, stop_ids=never)
    with torch.no_grad():
        first = model.generate(torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False, eos_token_id=never,
                               pad_token_id=tokenizer.pad_token_id)[0, len(prompts[0]):].tolist()
    assert free[0] == [tokenizer.decode(first)]  # batched left-padded greedy == one prompt alone
    stop = first[2]
    stopped = generate_texts(model, tokenizer, prompts[:1], batch_size=1, max_new_tokens=6, stop_ids=[stop])
    assert stopped[0] == [tokenizer.decode(first[:first.index(stop)])]


def test_self_consistency_same_seed_same_predictions(tiny_gptq, tmp_path):
    sc = ["eval.mode=sc", "eval.limit=3", "eval.max_new_tokens=4", "eval.sc.k=3", "eval.sc.temperature=1.0"]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        evaluate(tiny_cfg(tiny_gptq, tmp_path / name, *sc, f"eval.seed={seed}"), command="t")
        runs[name] = read_predictions(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert [r["output"] for r in runs["a"]] != [r["output"] for r in runs["c"]]
    for record in runs["a"]:
        assert len(record["output"]) == 3 and len(record["votes"]) == 3
        assert record["answer"] == majority_vote(record["votes"])
    check_summary_matches_predictions(tmp_path / "a")


def test_missing_split_and_finished_output_dir(tiny_gptq, tmp_path):
    spec = benchmark_specs()["medmcqa"]
    with pytest.raises(EvalError, match="benchmark medmcqa: medmcqa has no split 'test'; fix: use one of train, dev"):
        load_items(type(spec)(**{**vars(spec), "split": "test"}), tiny_cfg(tiny_gptq, tmp_path), None)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text("{}")
    with pytest.raises(EvalError, match="already holds an evaluation"):
        prepare(tiny_cfg(tiny_gptq, tmp_path / "done"))


# --- the speed benchmark's CPU path ---------------------------------------------------------------------------------


def test_eval_speed_benchmark_on_a_tiny_shape(tiny_llama, tmp_path, capsys):
    """Token file from real MedQA-4 prompts, then ours and the peer (transformers + optimum + gptqmodel, per-option
    full sequences), each in its own process, on a tiny random checkpoint: the same model, the same answers."""
    tokens = tmp_path / "tokens.json"
    eval_speed.main(["tokens", "--out", str(tokens), "--limit", "6", "--tokenizer", str(tiny_llama)])
    eval_speed.main(["time", "--tokens", str(tokens), "--out", str(tmp_path / "out"), "--shape", "tiny",
                               "--layers", "2", "--device", "cpu", "--batch-size", "4", "--peer-backend", "gptq_torch",
                               "--checkpoint", str(tmp_path / "ckpt")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    ours, peer = results["sides"]["ours"], results["sides"]["peer"]
    assert "error" not in ours and "error" not in peer, (tmp_path / "out" / "log.txt").read_text()[-3000:]
    assert ours["questions"] == peer["questions"] == 6
    assert ours["argmax"] == peer["argmax"]
    for a, b in zip(ours["logprobs_head"], peer["logprobs_head"]):
        assert a == pytest.approx(b, abs=1e-3)
    assert peer["tokens_through_model"] > 3 * ours["tokens_through_model"]  # four full sequences vs one prompt
    assert "peer / ours time:" in capsys.readouterr().out


# --- the real thing: SmolLM2-135M-Instruct GPTQ, alone and with a `smoke` adapter -----------------------------------


@pytest.fixture(scope="module")
def smoke_run(smoke_training) -> tuple[Path, list[dict]]:
    """conftest's real `smoke` training: three optimiser steps, scoring 3 questions of its sample every second step
    (at step 2 only). Shared with tests/training: tests that write into the run copy it first."""
    run_dir, trainer = smoke_training
    return run_dir, trainer.state.log_history


def test_slice_scoring_switches_to_sdpa_and_back(tiny_gptq):
    # packed GPU training attends through flex attention, which takes no 4D tree mask: scoring runs under sdpa
    model = load_model(tiny_gptq)
    requests = [OptionRequest([1, 2, 3, 4], [[5], [6, 7]])]
    reference = option_logprobs(model, requests)  # sdpa: the loader's default
    model.set_attn_implementation("eager")  # stands for flex: another implementation, which reads the mask otherwise
    with sdpa_attention(model):
        assert model.config._attn_implementation == "sdpa"
        inside = option_logprobs(model, requests)
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(torch.tensor(inside), torch.tensor(reference))


def test_training_logs_slice_accuracy_every_n_steps(smoke_run):
    run_dir, log_history = smoke_run
    logged = {e["step"]: e["eval/pubmedqa_smoke_accuracy"] for e in log_history if "eval/pubmedqa_smoke_accuracy" in e}
    assert list(logged) == [2] and logged[2] in (0.0, 1 / 3, 2 / 3, 1.0)
    # the evaluated step keeps its own loss log, and metrics.json carries both
    assert [e["step"] for e in log_history if "loss" in e] == [1, 2, 3]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["step"] for e in metrics["loss"]] == [1, 2, 3]
    assert [(e["step"], e["eval/pubmedqa_smoke_accuracy"]) for e in metrics["eval"]] == [(2, logged[2])]
    assert set(metrics["eval"][0]) == {"step", "epoch", "eval/pubmedqa_smoke_accuracy", "eval/seconds"}
    # the evaluated step's tokens/s too (TRL hands its token count to the eval's log, which comes first)
    assert [e["step"] for e in metrics["speed"] if e["tokens_per_s"] > 0] == [1, 2, 3]


def test_adapter_of_another_base_is_refused_before_loading(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    with pytest.raises(EvalError, match="adapter .* was trained on smollm2-135m-instruct-gptq@main, but the "
                       "recipe's model is TheBloke/meditron-70B-GPTQ@gptq-4bit-128g-actorder_True; pass the recipe"):
        prepare(compose_recipe("medqa", [f"adapter={run_dir}", f"output_dir={tmp_path / 'out'}"]))
    with pytest.raises(EvalError, match="trained with data.system_prompt=None, but this evaluation asks with 'Brief'"):
        prepare(compose_recipe("smoke", [f"adapter={run_dir}", "data.system_prompt=Brief",
                                         f"output_dir={tmp_path / 'out'}"]))
    # an exported adapter folder: only adapter_config.json says what it was trained on
    export = tmp_path / "export"
    shutil.copytree(run_dir / "adapter", export)
    adapter_config = json.loads((export / "adapter_config.json").read_text())
    for change, message in (({"base_model_name_or_path": "someone/other-GPTQ"}, "was trained on someone/other-GPTQ"),
                            ({"revision": "gptq-3bit-32g-actorder_True"}, "trained on branch gptq-3bit-32g")):
        (export / "adapter_config.json").write_text(json.dumps({**adapter_config, **change}))
        with pytest.raises(EvalError, match=message):
            prepare(compose_recipe("smoke", [f"adapter={export}", f"output_dir={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()


# Four questions a benchmark: enough for what is checked (the seeded sample of PubMedQA's label-sorted test file
# holds yes, no and maybe), and a CPU without AMX takes ~2 s a MedQA question in bf16.
REAL_N = 4
REAL = ["recipe=smoke", f"eval.benchmarks=[{','.join(SHARED)}]", f"eval.limit={REAL_N}", "eval.batch_size=16",
        "eval.dtype=bfloat16"]  # bf16: the GPU's dtype, and twice as fast on a CPU with AMX


@pytest.fixture(scope="module")
def real_runs(smoke_run, tmp_path_factory) -> dict[str, Path]:
    """REAL_N questions of each shared benchmark, loglik: the base through the entry script, then with the adapter."""
    run_dir, _ = smoke_run
    out = tmp_path_factory.mktemp("real")
    result = subprocess.run([sys.executable, str(REPO / "finetune" / "evaluate.py"), *REAL,
                             f"output_dir={out / 'base'}"], capture_output=True, text=True, cwd=REPO,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    evaluate(compose_recipe("smoke", [*REAL[1:], f"adapter={run_dir}", f"output_dir={out / 'adapter'}"]),
             command="test")
    print((out / "adapter" / "results.md").read_text())
    return {"base": out / "base", "adapter": out / "adapter"}


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_real_questions_of_each_benchmark(real_runs, which):
    out = real_runs[which]
    summary = check_summary_matches_predictions(out)
    assert list(summary) == SHARED and all(s["n"] == REAL_N and s["unparseable"] == 0 for s in summary.values())
    records = read_predictions(out)
    pubmedqa_gold = Counter(r["gold"] for r in records if r["benchmark"] == "pubmedqa")
    assert set(pubmedqa_gold) == {"yes", "no", "maybe"}  # the slice is drawn across the label-sorted file
    assert set(summary["medmcqa"]["by_subject"]) == {r["group"] for r in records if r["benchmark"] == "medmcqa"}
    assert set(summary["medqa4"]["by_step"]) <= {"step1", "step2&3"}
    manifest = json.loads((out / "manifest.json").read_text())
    listed = (default_data_root() / "SHA256SUMS").read_text().splitlines()
    sums = {name.removeprefix("./"): digest for digest, name in (line.split() for line in listed)}
    for data in manifest["data"].values():
        for path, digest in data["files"].items():
            assert sums[str(Path(path).relative_to(default_data_root()))] == digest
    assert manifest["model"]["name"] == "smollm2-135m-instruct-gptq" and manifest["model"]["dtype"] == "torch.bfloat16"
    table = (out / "results.md").read_text()
    for s in summary.values():
        assert f"| {s['title']} ({s['split']}) | {REAL_N} | {100 * s['accuracy']:.1f} (" in table


def test_adapter_changes_the_scores(real_runs, smoke_run):
    base, adapted = (read_predictions(real_runs[k]) for k in ("base", "adapter"))
    assert [(r["benchmark"], r["id"], r["prompt_sha256"]) for r in base] == \
        [(r["benchmark"], r["id"], r["prompt_sha256"]) for r in adapted]  # the same questions, the same prompts
    assert any(a["logprobs"] != b["logprobs"] for a, b in zip(base, adapted))
    manifest = json.loads((real_runs["adapter"] / "manifest.json").read_text())
    from finetune.evaluation.report import folder_sha256
    assert manifest["adapter"]["sha256"] == folder_sha256(smoke_run[0] / "adapter")
    assert manifest["adapter"]["run_model"] == {"name": "smollm2-135m-instruct-gptq", "revision": None}


def test_evaluation_inside_the_training_run_keeps_its_config(smoke_run, tmp_path):
    """recipe=smoke adapter=<run> with the recipe's own output_dir: results land beside the adapter, and the
    run's config.yaml (which resume and export read) is left alone."""
    run_dir = Path(shutil.copytree(smoke_run[0], tmp_path / "run"))  # a copy: the shared run stays as trained
    before = (run_dir / "config.yaml").read_text()
    evaluate(compose_recipe("smoke", [f"adapter={run_dir}", f"output_dir={run_dir}", "eval.benchmarks=[pubmedqa_smoke]",
                                      "eval.limit=2"]), command="test")
    assert (run_dir / "config.yaml").read_text() == before
    assert json.loads((run_dir / "summary.json").read_text())["pubmedqa_smoke"]["n"] == 2
    assert "adapter: " + str(run_dir) in (run_dir / "eval_config.yaml").read_text()


def test_several_adapters_in_one_call_score_as_each_alone(smoke_run, tmp_path):
    """adapter=[<run>,none]: the adapter first, then the base with the adapter taken off again -- each scores as
    it does alone, and the comparison is written beside them."""
    run_dir, _ = smoke_run
    settings = ["eval.benchmarks=[pubmedqa_smoke]", "eval.limit=2"]
    summaries = evaluate_many(compose_recipe("smoke", [*settings, f"adapter=[{run_dir},none]",
                                                       f"output_dir={tmp_path / 'both'}"]), command="test")
    assert list(summaries) == ["run", "base"]
    evaluate(compose_recipe("smoke", [*settings, f"output_dir={tmp_path / 'base'}"]), command="test")
    alone, after = read_predictions(tmp_path / "base"), read_predictions(tmp_path / "both" / "base")
    for a, b in zip(after, alone, strict=True):
        assert a["logprobs"] == pytest.approx(b["logprobs"])
    assert [r["logprobs"] for r in read_predictions(tmp_path / "both" / "run")] != [r["logprobs"] for r in alone]
    table = (tmp_path / "both" / "comparison.md").read_text()
    assert "Reference: `base` (the base model)" in table and "| run | 2 |" in table
    with pytest.raises(EvalError, match="already holds a comparison"):
        evaluate_many(compose_recipe("smoke", [*settings, "adapter=[none]", f"output_dir={tmp_path / 'both'}"]))
