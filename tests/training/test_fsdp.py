"""FSDP2 sharding of the GPTQ weights (accelerate_fsdp.yaml): two ranks on the CPU (gloo) against one process, the
checks that refuse a bad setup before loading, and the per-GPU memory estimate of the sharded plan."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint
from gptq_fixtures import llama_style_tokenizer
from safetensors.torch import load_file
from transformers import LlamaConfig

from finetune.config.recipe import RecipeError, compose_recipe
from finetune.gptq.format import GPTQConfig
from finetune.gptq.layer import PACKED_TENSORS
from finetune.gptq.loader import weight_files
from finetune.gptq.random_checkpoint import write_random_gptq_checkpoint
from finetune.training import fsdp, sft
from tests.subprocesses import REPO, pythonpath_with

WORKER = REPO / "tests" / "training" / "fsdp_worker.py"
# Meditron-like: a Llama-2-style tokenizer without ChatML's tokens (train.py adds them, and trains their rows of the
# embedding and of the untied output layer)
TOKENIZER = llama_style_tokenizer()
# down_proj's 160 inputs make 5 groups of 32: an uneven split (3 + 2 rows) as well as even ones
TINY = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=len(TOKENIZER), tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gptq-fsdp")
    write_random_gptq_checkpoint(path, TINY, GPTQConfig(bits=4, group_size=32, desc_act=True))
    TOKENIZER.save_pretrained(path)
    return path


@pytest.mark.parametrize("adapters", ["sharded", "replicated"])
def test_two_ranks_train_as_one_process_and_resume(checkpoint, tmp_path, adapters):
    """One step of the same batch (split between the ranks) sharded and not, with PEFT's LoRA forward and with the
    fast path's lean one (one layer kept without its norm outputs, the others recomputed); then train.py's own run
    sharded, cut and resumed (same processes: the imports and the process group paid once). With
    `gpu.shard_adapters=false` the adapters are whole on each rank, outside the units, their gradients all-reduced:
    the same results; then train.py with accumulated rows trains the same adapter under either setting, and a run cut
    under one resumes under the other."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    env = {**os.environ, "PYTHONPATH": pythonpath_with(REPO), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, str(WORKER), str(checkpoint), str(one)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
            subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", "29571", str(WORKER), str(checkpoint), str(two), "--fsdp", "--resume",
                              *(["--replicated-adapters"] if adapters == "replicated" else [])],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    for run in runs:
        output = run.communicate(timeout=300)[0]
        assert run.returncode == 0, output[-3000:]
    single, ranks = torch.load(one / "results-0.pt"), [torch.load(two / f"results-{r}.pt") for r in (0, 1)]
    assert ranks[0]["loss"] == pytest.approx(single["loss"], rel=1e-6)
    for rank in ranks:
        assert rank["grads"].keys() == single["grads"].keys() and len(single["grads"]) == 2 * 7 * TINY.num_hidden_layers
        for name, grad in single["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-5, atol=1e-7)
    # the fast path's lean LoRA on the shards, after its planner's one-layer measurement: the same loss and gradients
    lean_single, lean_ranks = torch.load(one / "results-lean-0.pt"), [torch.load(two / f"results-lean-{r}.pt")
                                                                      for r in (0, 1)]
    assert lean_ranks[0]["loss"] == pytest.approx(lean_single["loss"], rel=1e-6)
    assert lean_single["loss"] == pytest.approx(single["loss"], rel=1e-5)  # the lean forward is PEFT's LoRA
    # what the fast path's plan adds per gathered layer: the layer whole when sharded (its adapters are whole on each
    # rank already when replicated), nothing on one process
    assert lean_single["gathered_bytes"] == 0
    gathered = lean_single["layer_bytes"] - (lean_single["adapter_bytes"] if adapters == "replicated" else 0)
    assert [rank["gathered_bytes"] for rank in lean_ranks] == [gathered] * 2 and 0 < gathered
    # the planner's layer measured alone (`gathered_alone`): gathered whole through its forward and backward, no
    # FSDP2 hook in between, sharded again after, its input gradient the one process's
    assert [(rank["gathered_throughout"], rank["sharded_after"]) for rank in lean_ranks] == [(True, True)] * 2
    for rank in lean_ranks:
        torch.testing.assert_close(rank["input_grad"], lean_single["input_grad"], rtol=1e-5, atol=1e-7)
    for rank in lean_ranks:
        assert rank["grads"].keys() == single["grads"].keys()
        for name, grad in lean_single["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-5, atol=1e-7)
    layers = [f"base_model.model.model.layers.{i}" for i in range(TINY.num_hidden_layers)]
    assert ranks[0]["units"] == sorted(["", "base_model.model.lm_head", "base_model.model.model.embed_tokens",
                                        *layers])
    # every packed tensor of every GPTQ layer is sharded along its rows: each rank holds its half (rounded up first)
    assert len(ranks[0]["shapes"]) == 4 * 7 * TINY.num_hidden_layers
    for name, (local, full) in ranks[0]["shapes"].items():
        rows = -(-full[0] // 2)
        assert local == (rows, *full[1:]) and ranks[1]["shapes"][name][0] == (full[0] - rows, *full[1:]), name
    # each rank read its own rows of the packed tensors from the checkpoint, nothing more (about half of them),
    # and the dense tensors whole; the one process read everything
    packed_bytes = {name: t.numel() * t.element_size() for file in weight_files(checkpoint)
                    for name, t in load_file(file).items() if name.rsplit(".", 1)[-1] in PACKED_TENSORS}
    assert len(packed_bytes) == 4 * 7 * TINY.num_hidden_layers
    for rank in ranks:
        own = sum(packed_bytes[name.removeprefix("base_model.model.").replace(".base_layer", "")] * local[0] // full[0]
                  for name, (local, full) in rank["shapes"].items())
        assert rank["bytes_read"]["packed"] == own < 0.55 * sum(packed_bytes.values())
        assert rank["bytes_read"]["dense"] == single["bytes_read"]["dense"] - sum(packed_bytes.values())
    assert sum(rank["bytes_read"]["packed"] for rank in ranks) == sum(packed_bytes.values())
    # the adapter after the same optimiser step, saved in PEFT's format as one process saves it
    single_adapter, sharded_adapter = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (one, two))
    assert sharded_adapter.keys() == single_adapter.keys() and len(single_adapter) == 2 * 7 * TINY.num_hidden_layers
    for name, tensor in single_adapter.items():
        torch.testing.assert_close(sharded_adapter[name], tensor, rtol=1e-5, atol=1e-7)
    configs = [json.loads((d / "adapter" / "adapter_config.json").read_text()) for d in (one, two)]
    for config in configs:
        config["target_modules"] = sorted(config["target_modules"])  # a set: its order varies between processes
    assert configs[0] == configs[1]
    # train.py sharded: its checkpoints hold each rank's shard of the adapter and optimiser state (not the GPTQ
    # weights); resumed from step 1, and resumed after its last checkpoint with its adapter lost, it saves the adapter
    # of the run that was not stopped, bit for bit
    checkpoint_1 = two / "cut" / "checkpoints" / "checkpoint-1"
    assert {"pytorch_model_fsdp_0", "optimizer_0", "rng_state_0.pth", "rng_state_1.pth"} <= {
        p.name for p in checkpoint_1.iterdir()}
    saved = torch.distributed.checkpoint.FileSystemReader(checkpoint_1 / "pytorch_model_fsdp_0").read_metadata()
    assert not [key for key in saved.state_dict_metadata if key.rsplit(".", 1)[-1] in PACKED_TENSORS]
    assert len([key for key in saved.state_dict_metadata if "lora_" in key]) == 2 * 7 * TINY.num_hidden_layers
    losses = [json.loads((two / run / "metrics.json").read_text())["loss"] for run in ("whole", "cut")]
    assert [entry["step"] for entry in losses[1]] == [1, 2] and losses[1] == losses[0]
    whole = load_file(two / "whole-adapter" / "adapter_model.safetensors")
    assert any("trainable_tokens_delta" in name for name in whole)

    def started_at_step_2(resumed: str, source: str) -> bool:  # checkpoint-1 as copied: resumed, not started over
        state = Path("checkpoints", "checkpoint-1", "trainer_state.json")
        return (two / resumed / state).stat().st_mtime_ns == (two / source / state).stat().st_mtime_ns

    assert started_at_step_2("cut", "whole")
    for resumed in ("cut", "whole"):
        adapter = load_file(two / resumed / "adapter" / "adapter_model.safetensors")
        assert adapter.keys() == whole.keys()
        for name, tensor in whole.items():
            assert torch.equal(adapter[name], tensor), (resumed, name)
    if adapters == "replicated":  # train.py's own step (accumulation, clipping, AdamW) as with the adapters sharded
        runs = {kind: two / f"accumulated-{kind}" for kind in ("replicated", "sharded")}
        losses = {kind: json.loads((run / "metrics.json").read_text())["loss"] for kind, run in runs.items()}
        assert [entry["step"] for entry in losses["replicated"]] == [1, 2]
        for got, expected in zip(losses["replicated"], losses["sharded"], strict=True):
            assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        replicated, sharded = (load_file(run / "adapter" / "adapter_model.safetensors") for run in runs.values())
        assert replicated.keys() == sharded.keys() == whole.keys()
        for name, tensor in sharded.items():
            torch.testing.assert_close(replicated[name], tensor, rtol=1e-5, atol=1e-6)  # 1e-4 of a step
        assert all(not torch.equal(tensor, whole[name]) for name, tensor in sharded.items() if "lora_B" in name)
        # a run's checkpoints resume under the other setting: the same adapter (step 2 averaged the other way)
        for source in runs.values():
            switched = two / f"switched-from-{source.name}"
            adapter = load_file(switched / "adapter" / "adapter_model.safetensors")
            assert started_at_step_2(switched.name, source.name) and adapter.keys() == sharded.keys()
            for name, tensor in sharded.items():
                torch.testing.assert_close(adapter[name], tensor, rtol=1e-5, atol=1e-6)


FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
         "FSDP_RESHARD_AFTER_FORWARD": "true"}


@pytest.mark.parametrize("setting, message", [
    ({"FSDP_VERSION": "1"}, r"^fsdp_version 1 \(FSDP1\) .* set fsdp_version: 2 \(see accelerate_fsdp.yaml\)$"),
    ({"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, (r"^fsdp_sharding_strategy HYBRID_SHARD is not supported .*"
                                                  r"fsdp_reshard_after_forward: true")),
    ({"FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP"}, r"^accelerate's FSDP settings: .*see accelerate_fsdp.yaml$"),
    ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, r"^fsdp_auto_wrap_policy must be TRANSFORMER_BASED_WRAP"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, r"^fsdp_offload_params: true is not supported"),
])
def test_bad_fsdp_setups_fail_before_loading(checkpoint, tmp_path, monkeypatch, setting, message):
    for key, value in {**FSDP2, **setting}.items():
        monkeypatch.setenv(key, value)
    cfg = compose_recipe("smoke", [f"model.name={checkpoint}", f"output_dir={tmp_path}/run"])
    with pytest.raises(RecipeError, match=message):
        sft.prepare(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("choice, message", [
    ("copy_engines", r"^gpu.all_gather='copy_engines' should be nccl or copy_engine$"),
    ("copy_engine", r"^gpu.all_gather=copy_engine needs CUDA GPUs; use gpu.all_gather=nccl$"),
])
def test_an_all_gather_that_cannot_run_fails_before_loading(checkpoint, tmp_path, monkeypatch, choice, message):
    for key, value in FSDP2.items():
        monkeypatch.setenv(key, value)
    cfg = compose_recipe("smoke", [f"model.name={checkpoint}", f"output_dir={tmp_path}/run",
                                   f"gpu.all_gather={choice}"])
    with pytest.raises(RecipeError, match=message):
        sft.prepare(cfg)
    assert not (tmp_path / "run").exists()


def test_a_sharded_launch_of_one_process_is_told_it_shards_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    for key, value in FSDP2.items():
        monkeypatch.setenv(key, value)
    sft.prepare(compose_recipe("smoke", [f"model.name={checkpoint}", f"output_dir={tmp_path}/run"]))
    assert ("accelerate_fsdp.yaml with one process shards nothing and trains slower than without FSDP (0.86x on one "
            "H200): on one GPU launch with accelerate_config.yaml; to shard, set num_processes to the GPUs"
            ) in capsys.readouterr().out.splitlines()
    assert fsdp.one_process_notice(2) is None


def test_a_cap_below_the_sharded_plan_fails_before_loading(checkpoint, tmp_path, monkeypatch):
    for key, value in FSDP2.items():
        monkeypatch.setenv(key, value)
    cfg = compose_recipe("smoke", [f"model.name={checkpoint}", f"output_dir={tmp_path}/run",
                                   "gpu.memory_budget_gib=0.5", "train.max_length=4096"])
    with pytest.raises(RecipeError, match=r"^gpu.memory_budget_gib=0.5 is below the ~1\.\d GiB per GPU this model "
                                          r"needs sharded over 1 GPUs at train.max_length=4096 \(estimate\); use more "
                                          "GPUs, a shorter train.max_length or a lower-bit branch, or raise the cap$"):
        sft.prepare(cfg)


def test_a_cap_that_fits_only_the_plain_path_names_it_before_loading():
    """The fast path keeps 2 GiB of headroom beyond the estimate (its plan's margin): a cap between the two names
    gpu.fast_path=false, which fits; a cap above both passes."""
    from finetune.training.budget import check_memory_cap
    check_memory_cap(23.5, 24, 2, 1024)  # the plain path: fits
    with pytest.raises(RecipeError, match=r"^gpu.memory_budget_gib=24 is below the ~25\.5 GiB per GPU the fast path "
                                          r"plans for sharded over 2 GPUs at train.max_length=1024 \(estimate\); pass "
                                          r"gpu.fast_path=false \(every layer recomputed, ~23\.5 GiB\) or raise the "
                                          r"cap$"):
        check_memory_cap(23.5, 24, 2, 1024, fast_path=True)
    check_memory_cap(28.3, 40, 2, 4096, fast_path=True)


@pytest.mark.parametrize("setting, extra_gib", [
    # its workspace: one decoder layer's shard per GPU, outside the allocator
    ("gpu.all_gather=copy_engine", lambda memory: memory["quantised weights"] / TINY.num_hidden_layers),
    # the adapters and their AdamW state whole on every GPU: the other GPU's share more
    ("gpu.shard_adapters=false", lambda memory: memory["LoRA + AdamW"]),
])
def test_settings_that_hold_more_per_gpu_count_against_the_cap(checkpoint, tmp_path, setting, extra_gib):
    """A cap that fits the sharded plan by less than what `setting` adds per GPU fits it with the default only."""
    from finetune.gptq.checkpoint_info import describe_checkpoint
    from finetune.training.budget import check_sharded_memory
    lora = compose_recipe("smoke").lora
    memory = describe_checkpoint(str(checkpoint), seq_len=512, lora_r=lora.r, gpus=2,
                                 lora_targets=tuple(lora.target_modules)).memory_gib
    cap = memory["total"] + extra_gib(memory) / 2
    overrides = [f"model.name={checkpoint}", f"output_dir={tmp_path}/run", "train.max_length=512",
                 f"gpu.memory_budget_gib={cap}"]
    check_sharded_memory(compose_recipe("smoke", overrides), checkpoint, gpus=2, fast_path=False)
    with pytest.raises(RecipeError, match=rf"^gpu.memory_budget_gib={cap} is below"):
        check_sharded_memory(compose_recipe("smoke", [*overrides, setting]), checkpoint, gpus=2, fast_path=False)


class TwoLoraLayers(torch.nn.Module):
    """Named as a decoder stack (`model.layers.N.`): each layer's two adapters are one all-reduce bucket."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"lora_A": torch.nn.Linear(3, 2, bias=False),
                                                                     "lora_B": torch.nn.Linear(2, 3, bias=False)})
                                                for _ in range(2))


def test_replicated_adapters_average_whole_layers_and_name_a_partial_one(monkeypatch):
    """ReplicatedAdapters in one gloo process: gradients come back as autograd made them (the average over one rank),
    accumulated over two backwards, of which only the one the trainer marks as the step's last (accelerate's
    GradientState) all-reduces, one call per layer; a backward that reaches only some of a layer's adapters (no bucket
    complete) fails with the cause and the fix instead of leaving the ranks' gradients unaveraged."""
    import torch.distributed as dist
    from accelerate.state import GradientState
    model, x = TwoLoraLayers(), torch.randn(4, 3)

    def loss(layers):
        return sum(layer["lora_B"](layer["lora_A"](x)).square().sum() for layer in layers)

    loss(model.model.layers).backward()
    expected = {name: 2 * p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        replicated = fsdp.ReplicatedAdapters(model)
        assert [len(bucket) for bucket in replicated.buckets] == [2, 2]
        replicated.start(torch.device("cpu"))
        all_reduce, reduced = dist.all_reduce, []  # counted, then run as they are
        monkeypatch.setattr(dist, "all_reduce", lambda *args, **kw: reduced.append(1) or all_reduce(*args, **kw))
        for last_row in (False, True):
            GradientState()._set_sync_gradients(last_row)
            loss(model.model.layers).backward()
        assert len(reduced) == 2
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=0)
        with pytest.raises(RuntimeError, match=r"^the adapters of 2 decoder layer\(s\) got gradients for only some "
                                               r"of their parameters .* set gpu.shard_adapters=true$"):
            sum(layer["lora_A"](x).sum() for layer in model.model.layers).backward()
    finally:
        GradientState()._set_sync_gradients(True)
        dist.destroy_process_group()


def test_replicated_adapters_refuse_a_module_holding_frozen_parameters_too():
    """Trainable parameters leave the FSDP units by whole modules: one that also holds a frozen parameter (which the
    units must shard) is named, with the fix."""
    model = TwoLoraLayers()
    model.model.layers[1]["lora_B"].register_parameter("frozen", torch.nn.Parameter(torch.zeros(3),
                                                                                     requires_grad=False))
    with pytest.raises(RuntimeError, match=r"^model\.layers\.1\.lora_B holds trainable and frozen parameters "
                                           r"\(frozen\); gpu\.shard_adapters=false can only leave whole modules out "
                                           r"of the FSDP units$"):
        fsdp.ReplicatedAdapters(model)


def test_the_sharded_plan_splits_the_weights_per_gpu(checkpoint):
    """describe.py --gpus 2: per GPU, half the weights and LoRA state, plus the two layers and the output layer
    gathered whole."""
    from finetune.gptq.checkpoint_info import describe_checkpoint
    one, two = (describe_checkpoint(str(checkpoint), seq_len=512, gpus=n).memory_gib for n in (1, 2))
    assert "two gathered layers" not in one
    for term in ("quantised weights", "dense weights", "LoRA + AdamW"):
        assert two[term] == pytest.approx(one[term] / 2)
    assert two["two gathered layers"] == pytest.approx(one["quantised weights"] / TINY.num_hidden_layers)
    assert two["gathered output layer"] == pytest.approx(TINY.vocab_size * TINY.hidden_size * 2 / 2 / 1024 ** 3)
    report = subprocess.run([sys.executable, str(REPO / "finetune" / "describe.py"), str(checkpoint), "--gpus", "2",
                             "--seq-len", "512"], capture_output=True, text=True, check=True).stdout
    assert "gradient checkpointing, per GPU of 2 sharded with FSDP2):" in report
    assert f"{'total':<28} {two['total']:7.2f} GiB" in report
    assert (f"{'with the fast GPU path':<28} {two['total'] + 2:7.2f} GiB (+2 GiB headroom; gpu.fast_path=false needs "
            "the total)") in report


def test_integers_held_as_float_bits_read_back_unchanged(checkpoint):
    """What fully_shard takes on any torch: the packed integers as float tensors of the same bits."""
    from finetune.gptq.layer import GPTQLinear
    from finetune.gptq.loader import load_model
    from finetune.training.fsdp import prepare_gptq_for_sharding
    model = load_model(checkpoint, device="cpu")
    layer = next(m for m in model.modules() if isinstance(m, GPTQLinear))
    before = {name: getattr(layer, name).clone() for name in ("qweight", "qzeros", "scales", "g_idx")}
    weight = layer.dequantize_weight()
    prepare_gptq_for_sharding(model)
    stored = dict(layer.named_parameters())
    assert {name: t.dtype for name, t in stored.items()} == {"qweight": torch.float32, "qzeros": torch.float32,
                                                             "scales": torch.float16, "g_idx": torch.float32}
    for name, tensor in before.items():
        assert torch.equal(getattr(layer, name), tensor) and getattr(layer, name).dtype == tensor.dtype
    assert layer.qweight.data_ptr() == stored["qweight"].data_ptr()  # a view: no copy
    assert torch.equal(layer.dequantize_weight(), weight)


def test_fsdp2_swaps_the_packed_tensors_on_its_fast_path(checkpoint):
    """FSDP2 swaps every parameter in and out at each gather and free; with a __setattr__ of the module's own it takes
    its slow path (nn.Module.__setattr__, ~18 us a parameter on the host, 112 times a decoder layer a step). So
    GPTQLinear has none and its packed tensors are set with set_packed, as frozen parameters."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import unsafe_setattr_param

    from finetune.gptq.layer import GPTQLinear
    from finetune.gptq.loader import load_model
    layer = next(m for m in load_model(checkpoint, device="cpu").modules() if isinstance(m, GPTQLinear))
    assert getattr(layer.__setattr__, "__func__", None) is torch.nn.Module.__setattr__  # FSDP2's own test
    swapped = torch.nn.Parameter(torch.zeros_like(layer.qweight), requires_grad=False)
    unsafe_setattr_param(layer, "qweight", swapped)
    assert layer.qweight is swapped
    layer.set_packed(scales=torch.ones_like(layer.scales))
    assert isinstance(layer.scales, torch.nn.Parameter) and not layer.scales.requires_grad
    assert torch.equal(layer.scales, torch.ones_like(layer.scales))
    with pytest.raises(ValueError, match="bias is not a GPTQ packed tensor"):
        layer.set_packed(bias=torch.zeros(3))


COPY_ENGINE_WORKER = """
import os, sys
import torch, torch.distributed as dist
from finetune.gpu.copy_engine_gather import CopyEngineAllGather
rank = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
gather, equal = CopyEngineAllGather(), []
for numel, dtype in [(1000, torch.bfloat16), (3_000_001, torch.uint8), (1000, torch.float32)]:  # the workspace grows
    out = gather.allocate((2 * numel,), dtype=dtype, device=torch.device("cuda", rank))
    shard = out[rank * numel:(rank + 1) * numel]  # in place, as FSDP2 copies a rank's shards in
    shard.copy_(torch.randn(numel, generator=torch.Generator().manual_seed(rank)).mul(100).to(dtype))
    reference = torch.empty_like(out)
    dist.all_gather_into_tensor(reference, shard)
    gather(out, shard, dist.group.WORLD)
    equal.append(torch.equal(out, reference))
print("RESULT", rank, equal)
dist.destroy_process_group()
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the copy engines gather between two CUDA GPUs")
def test_copy_engine_all_gather_equals_nccls(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(COPY_ENGINE_WORKER)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(worker)],
                            capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
                            env=os.environ | {"PYTHONPATH": pythonpath_with(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    results = sorted(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    assert results == ["RESULT 0 [True, True, True]", "RESULT 1 [True, True, True]"]
