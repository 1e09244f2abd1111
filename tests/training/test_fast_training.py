"""The fast training path: the lean LoRA forward, selective recompute and the memory plan on the CPU; host offload
and the whole path against the CPU on a GPU (skipped without one; bench.train_speed times it there)."""

import functools
import itertools
import os
import weakref
from importlib.util import find_spec

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from finetune.config.recipe import RecipeError
from finetune.gptq.format import GPTQConfig
from finetune.gptq.loader import load_model
from finetune.gptq.memory import FAST_PATH_HEADROOM_BYTES
from finetune.gptq.random_checkpoint import write_random_gptq_checkpoint
from finetune.gpu import fast_training
from finetune.gpu.fast_lora import draw_seed, lean_qkv, speed_up_lora
from finetune.gpu.fast_training import apply_plan, decoder_layers
from finetune.gpu.host_offload import (
    PinnedArena,
    available_memory,
    copy_key,
    default_host_memory,
    memory_limit,
    pin_from_threads,
)
from finetune.gpu.norm_recompute import NormRecompute
from finetune.gpu.recompute_plan import (
    SHARDED_HOST_SHARE,
    BudgetTooSmall,
    RecomputePlan,
    host_memory_to_recompute_fewer,
    host_share_for,
    plan_for_budget,
    plan_recompute,
)
from finetune.gpu.seeded_dropout import dropout_mask
from tests.subprocesses import run_python

TINY = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)
MIB = 2 ** 20
GIB = 2 ** 30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gptq")
    write_random_gptq_checkpoint(path, TINY, GPTQConfig(bits=4, group_size=32, desc_act=True))
    return path


def lora_model(checkpoint, device="cpu", dropout=0.0, dtype=None):
    torch.manual_seed(0)  # same LoRA A init in every model
    model = get_peft_model(load_model(checkpoint, device=device, dtype=dtype),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters matter
            torch.nn.init.normal_(param, std=0.1)
    return model.train()


def loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class CountFFNMatmuls(TorchDispatchMode):
    """Counts matmuls (mm, addmm, addmm_) against a dense MLP weight: the GPTQ layers' dequantised [in, out] /
    [out, in]."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        weight = {aten.mm.default: 1, aten.addmm.default: 2, aten.addmm_.default: 2}.get(func)
        if weight is not None and tuple(args[weight].shape) in ((160, 64), (64, 160)):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_lean_lora_and_selective_recompute_give_peft_gradients(checkpoint):
    tokens = torch.randint(0, TINY.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    reference_loss, reference = loss_and_grads(lora_model(checkpoint), tokens)

    model = lora_model(checkpoint)
    assert speed_up_lora(model) == {"lean": 7 * TINY.num_hidden_layers}
    base = model.get_base_model()
    base.activation_checkpointing_enable()
    layers = decoder_layers(base)
    for keep in (0, 1, 3):
        apply_plan(layers, RecomputePlan(keep=keep, offload=0, bytes=0), hooks=None)
        assert [layer.gradient_checkpointing for layer in layers] == [i < 3 - keep for i in range(3)]
        loss, grads = loss_and_grads(model, tokens)
        assert loss == pytest.approx(reference_loss, rel=1e-6)
        for name, grad in grads.items():
            assert ((grad - reference[name]).norm() / reference[name].norm()).item() < 1e-5, name


def test_projections_sharing_an_input_run_as_one_function(checkpoint, monkeypatch):
    """Per decoder layer three lean Functions: q, k and v together, o alone, gate and up together (down_proj is
    _GPTQMatmulPlus after _SwiGLULora), with dropout too; whatever calls a projection with another input gets its own
    output."""
    from finetune.gpu import fast_lora
    groups = []
    apply = fast_lora._LoraGPTQ.apply
    monkeypatch.setattr(fast_lora._LoraGPTQ, "apply", lambda layers, *rest: groups.append(len(layers)) or
                        apply(layers, *rest))
    tokens = torch.randint(0, TINY.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    model = lora_model(checkpoint, dropout=0.1)
    speed_up_lora(model)
    speed_up_lora(model)  # again: still one hook
    model(input_ids=tokens, use_cache=False)
    assert groups == [3, 1, 2] * TINY.num_hidden_layers
    attention = decoder_layers(model.get_base_model())[0].self_attn
    x, other = torch.randn(2, 1, 4, TINY.hidden_size).unbind()
    model.eval()
    attention.k_proj(x)  # no output waiting: computed alone
    lean_qkv(attention, (x,), {})
    waiting = attention.v_proj.__dict__["_lean_output"][1]
    torch.testing.assert_close(waiting, type(attention.v_proj).forward(attention.v_proj, x))  # PEFT's forward
    assert attention.v_proj(x) is waiting and "_lean_output" not in attention.v_proj.__dict__
    torch.testing.assert_close(attention.k_proj(other), type(attention.k_proj).forward(attention.k_proj, other))


def test_adapter_weights_reach_the_lean_functions_with_no_cast_or_scale_recorded(checkpoint):
    """bf16 activations, fp32 adapters, dropout: each LoRA weight's gradient comes straight from a lean Function's
    backward (the Function casts and scales inside), not through a cast, 1/(1-p) or scaling node of its own."""
    tokens = torch.randint(0, TINY.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    model = lora_model(checkpoint, dropout=0.1, dtype=torch.bfloat16)
    speed_up_lora(model)
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    lora = {p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora)
    consumers, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and getattr(child, "variable", None) in lora:
                consumers[child.variable] = type(node).__name__
            stack.append(child)
    assert set(consumers) == lora
    assert set(consumers.values()) == {"_LoraGPTQBackward", "_SwiGLULoraBackward"}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_kept_layers_hold_no_norm_output_and_give_the_same_gradients(checkpoint, dropout):
    """With NormRecompute a kept layer holds neither RMSNorm's output after its forward (the backward runs the norm
    again on the input the norm's own backward holds): the same loss and LoRA gradients, bit for bit."""
    tokens = torch.randint(0, TINY.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    model = lora_model(checkpoint, dropout=dropout)
    speed_up_lora(model)
    layers = decoder_layers(model.get_base_model())
    norms = NormRecompute()
    assert [norms.watch(layer) for layer in layers] == [2] * TINY.num_hidden_layers
    outputs = []  # a weak reference to each norm output of a forward
    for layer in layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.register_forward_hook(lambda module, args, output: outputs.append(weakref.ref(output)))
    results = []
    for recompute in (None, norms):
        apply_plan(layers, RecomputePlan(keep=3, offload=0, bytes=0), hooks=None, norms=recompute)
        outputs.clear()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same dropout masks
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        held = sum(output() is not None for output in outputs)
        loss.backward()
        results.append((held, loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (held, loss, grads), (held_recomputing, loss_recomputing, grads_recomputing) = results
    assert (held, held_recomputing) == (2 * TINY.num_hidden_layers, 0)
    assert loss_recomputing == loss
    assert [n for n in grads if not torch.equal(grads[n], grads_recomputing[n])] == []


def test_the_planner_counts_a_kept_layer_without_its_norm_outputs(checkpoint):
    """What measure_layer counts of a layer's saved tensors (GPU memory held, and host copies): with norm outputs
    recomputed, exactly the two norm outputs less (their inputs are held by the norms' own backward anyway)."""
    model = lora_model(checkpoint)
    speed_up_lora(model)
    layer = decoder_layers(model.get_base_model())[1]
    norms = NormRecompute()
    norms.watch(layer)
    hidden = torch.randn(1, 48, TINY.hidden_size, requires_grad=True)
    position_ids = torch.arange(48)[None]
    kwargs = {"position_embeddings": fast_training.rotary_embedding(model)(hidden, position_ids),
              "position_ids": position_ids}
    counts = []
    for recompute in (None, norms):
        with fast_training.SavedTensorCount(recompute).counting() as saved:
            layer(hidden, **kwargs)
        counts.append((saved.bytes, sum(saved.copies.values())))
    norm_outputs = 2 * hidden.numel() * hidden.element_size()
    assert counts[1] == (counts[0][0] - norm_outputs, counts[0][1] - norm_outputs)


def test_a_norm_input_changed_in_place_after_the_forward_is_an_error():
    norm, norms = LlamaRMSNorm(8), NormRecompute()
    norms.watch(norm)
    hidden, weight = torch.randn(2, 8, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    with norms:
        normed_input = hidden * 1.0
        out = norm(normed_input) @ weight  # the matmul saves the norm output for weight's gradient
    normed_input.add_(1.0)
    with pytest.raises(RuntimeError, match="^a LlamaRMSNorm's input was modified in place after the forward, so its "
                                           "output cannot be recomputed in the backward$"):
        out.sum().backward()


class SameMaskDropout(torch.nn.Dropout):
    """PEFT's dropout module, drawing its mask as the lean path does: the same seeds in the same order."""

    def forward(self, x):
        return x * dropout_mask(x, self.p, draw_seed()) / (1 - self.p) if self.training else x


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_lean_lora_with_dropout_gives_peft_gradients_with_the_same_masks(checkpoint, device):
    """fp32: PEFT's own LoRA forward and backward, its dropout modules drawing the lean path's masks, against the
    lean path (which keeps no mask and draws it again in the backward: on CUDA inside LoRA-A's matmuls, the
    `dropout_matmul` kernels), with every layer kept and with every layer recomputed (the recompute draws its masks
    once more)."""
    assert_lean_dropout_gives_peft_gradients(checkpoint, device)


@pytest.mark.skipif(find_spec("triton") is None, reason="needs Triton (its interpreter runs on the CPU)")
def test_lean_lora_with_dropout_kernels_give_peft_gradients_in_interpreter(checkpoint):
    """The test above through the CUDA path's code, on the CPU: the `dropout_matmul` kernels in Triton's
    interpreter, both paths drawing `drop_triton`'s masks."""
    result = run_python(f"""
        from finetune.gpu import fast_lora, seeded_dropout
        from tests.training.test_fast_training import assert_lean_dropout_gives_peft_gradients
        seeded_dropout.drop = fast_lora.drop = seeded_dropout.drop_triton  # the CUDA masks, for PEFT's path too
        fast_lora.on_kernels = lambda x: True
        assert_lean_dropout_gives_peft_gradients({str(checkpoint)!r}, "cpu")
        """, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-2000:]


def assert_lean_dropout_gives_peft_gradients(checkpoint, device):
    tokens = torch.randint(0, TINY.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1)).to(device)
    reference_model = lora_model(checkpoint, device, dropout=0.1, dtype=torch.float32)
    for module in reference_model.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = SameMaskDropout(0.1)
    torch.manual_seed(7)
    reference_loss, reference = loss_and_grads(reference_model, tokens)
    no_dropout = loss_and_grads(reference_model.eval(), tokens)[1]
    for name, grad in no_dropout.items():  # the masks change every gradient
        assert ((reference[name] - grad).norm() / grad.norm()).item() > 0.1, name

    model = lora_model(checkpoint, device, dropout=0.1, dtype=torch.float32)
    assert speed_up_lora(model) == {"lean": 7 * TINY.num_hidden_layers}
    base = model.get_base_model()
    base.activation_checkpointing_enable()
    for keep in (3, 0):
        apply_plan(decoder_layers(base), RecomputePlan(keep=keep, offload=0, bytes=0), hooks=None)
        torch.manual_seed(7)
        loss, grads = loss_and_grads(model, tokens)
        assert loss == pytest.approx(reference_loss, rel=1e-6)
        for name, grad in grads.items():
            assert ((grad - reference[name]).norm() / reference[name].norm()).item() < 1e-5, (keep, name)


@pytest.mark.skipif(find_spec("triton") is None, reason="needs Triton (its interpreter runs on the CPU)")
def test_dropout_kernel_draws_the_same_mask_for_the_same_seed_in_interpreter():
    result = run_python("""
        import torch
        from finetune.gpu.seeded_dropout import drop_triton
        x = torch.randn(3, 5000)  # not a multiple of the kernel's block
        out = drop_triton(x, 0.25, 2 ** 40 + 7)
        mask = drop_triton(torch.ones_like(x), 0.25, 2 ** 40 + 7)
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(out, x * mask)  # the same elements, whatever the values
        assert torch.equal(drop_triton(x.t().contiguous().t(), 0.25, 2 ** 40 + 7), out)  # by element, not by layout
        other = drop_triton(torch.ones_like(x), 0.25, 2 ** 40 + 8)
        flat = mask.flatten()
        print(abs(mask.mean().item() - 0.75) < 0.015, (mask != other).float().mean().item() > 0.2,
              abs((flat[:-1] == flat[1:]).float().mean().item() - 0.625) < 0.015)
        """, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-2000:]
    # keeps 1 - p (within 4 standard deviations of 15,000 draws); another seed, another mask; neighbours (which
    # share a Philox call) agree as often as independent draws would: 0.75² + 0.25²
    assert result.stdout.split() == ["True", "True", "True"]


@pytest.mark.skipif(find_spec("triton") is None, reason="needs Triton (its interpreter runs on the CPU)")
def test_dropout_matmul_kernels_equal_the_unfused_dropout_in_interpreter():
    """fp32: LoRA-A's matmuls with the mask drawn inside them equal `drop_triton` and plain matmuls (the same
    elements dropped): the forward, both gradients (alone, added to a gradient, added in place) and the SwiGLU form
    (with and without dropout), on shapes that are not multiples of the blocks, for a rank of 16, a smaller one
    (padded to tl.dot's 16) and one not a power of two; another seed drops other elements; rows whose length is
    not a multiple of 8 are refused."""
    result = run_python("""
        import torch
        import torch.nn.functional as F
        from finetune.gpu.dropout_matmul import dropped_matmul, lora_a_backward, swiglu_lora_a_backward
        from finetune.gpu.seeded_dropout import drop_triton
        generator = torch.Generator().manual_seed(0)
        close = dict(rtol=1e-5, atol=1e-5)  # tl.dot sums in its own order
        p, seed = 0.25, 2 ** 40 + 7
        for t, k, r in ((137, 296, 16), (37, 296, 8), (150, 136, 12)):
            x, a, grad_x, gate, up = (torch.randn(shape, generator=generator)
                                      for shape in ((t, k), (r, k), (t, k), (t, k), (t, k)))
            grad_xa = torch.randn(t, r, generator=generator)
            x_dropped, update = drop_triton(x, p, seed), drop_triton(grad_xa @ a, p, seed)
            torch.testing.assert_close(dropped_matmul(x, a, (p, seed)), x_dropped @ a.t(), **close)
            got_grad_x, got_grad_a = lora_a_backward(None, x, grad_xa, a, (p, seed))
            torch.testing.assert_close(got_grad_x, update, **close)
            torch.testing.assert_close(got_grad_a, grad_xa.t() @ x_dropped, **close)
            summed = lora_a_backward(grad_x, x, grad_xa, a, (p, seed))[0]
            torch.testing.assert_close(summed, grad_x + update, **close)
            in_place = grad_x.clone()
            assert lora_a_backward(in_place, x, grad_xa, a, (p, seed), out=in_place)[0] is in_place
            assert torch.equal(in_place, summed)
            for dropout in (None, (p, seed)):
                act = F.silu(gate) * up
                act_dropped = act if dropout is None else drop_triton(act, p, seed)
                grad_act = grad_x + (grad_xa @ a if dropout is None else update)
                sigmoid = torch.sigmoid(gate)
                want = (grad_act * up * sigmoid * (1 + gate * (1 - sigmoid)), grad_act * F.silu(gate),
                        grad_xa.t() @ act_dropped)
                gate_, up_ = gate.clone(), up.clone()
                got = swiglu_lora_a_backward(gate_, up_, grad_x, grad_xa, a, dropout)
                assert got[0] is gate_ and got[1] is up_  # written over them
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, **close)
            others = (dropped_matmul(x, a, (p, seed + 1)), *lora_a_backward(grad_x, x, grad_xa, a, (p, seed + 1)))
            print(all((other - same).abs().max().item() > 1e-2 for other, same in
                      zip(others, (x_dropped @ a.t(), summed, grad_xa.t() @ x_dropped))))
        try:
            dropped_matmul(torch.ones(4, 30), torch.ones(16, 30), (p, seed))
        except ValueError as err:
            print(err)
        """, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-2000:]
    *other_elements, error = result.stdout.splitlines()
    assert other_elements == ["True"] * 3
    assert error == "dropout_matmul needs rows a multiple of 8 long, got 30: use seeded_dropout.drop and a matmul"


def test_lora_the_lean_path_cannot_take_is_counted_with_its_reason(checkpoint):
    model = lora_model(checkpoint, dropout=0.1)
    mlp = model.get_base_model().model.layers[0].mlp
    mlp.up_proj.lora_dropout["default"] = torch.nn.AlphaDropout(0.1)
    assert speed_up_lora(model) == {"lean": 7 * TINY.num_hidden_layers - 1, "a dropout other than torch.nn.Dropout": 1}
    assert not isinstance(mlp.forward, functools.partial)  # its MLP keeps the plain forward too


def test_recompute_skips_the_last_base_matmul_of_each_layer(checkpoint):
    """The adapter runs before the base matmul, so the checkpoint's early stop ends each layer's recompute
    before down_proj's base matmul: per layer the backward does 3 MLP matmuls (dX of gate, up, down) and the
    recompute 2 (gate, up), not 3."""
    model = lora_model(checkpoint)
    speed_up_lora(model)
    base = model.get_base_model()
    base.activation_checkpointing_enable()
    tokens = torch.randint(0, TINY.vocab_size, (1, 32))
    counts = {}
    for keep in (3, 0):
        apply_plan(decoder_layers(base), RecomputePlan(keep=keep, offload=0, bytes=0), hooks=None)
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        with CountFFNMatmuls() as counter:
            loss.backward()
        counts[keep] = counter.count
    assert counts == {3: 3 * 3, 0: 3 * (3 + 2)}


def test_plan_keeps_as_many_layers_as_the_budget_allows():
    # 80 layers, 64 MiB input, 1100 MiB saved per layer, 1500 MiB backward working memory
    plan = plan_recompute(80, 64 * MIB, 1100 * MIB, 1500 * MIB, free_bytes=30 * 1024 * MIB)
    assert (plan.keep, plan.offload) == ((30 * 1024 - 1500 - 80 * 64) // (1100 - 64), 0)
    assert plan.bytes <= 30 * 1024 * MIB
    assert [plan.mode(i, 80) for i in (0, 79 - plan.keep, 80 - plan.keep, 79)] == \
        ["recompute", "recompute", "keep", "keep"]
    everything = plan_recompute(80, 64 * MIB, 1100 * MIB, 1500 * MIB, free_bytes=200 * 1024 * MIB)
    assert (everything.keep, everything.offload) == (80, 0)


def test_plan_keeps_activations_on_the_host_as_the_link_and_pinned_memory_allow():
    free = 30 * 1024 * MIB
    plan = plan_recompute(80, 64 * MIB, 800 * MIB, 1500 * MIB, free_bytes=free, host_bytes=64 * 1024 * MIB,
                          host_share=0.5)
    def host_of(keep):  # host layers spread over the model: the link carries half of all 80 layers
        return min(40, 80 - keep)

    def peak(keep):  # MiB: recomputing layers hold their input, host layers nothing but the one in flight
        return (80 - host_of(keep)) * 64 + 1500 + keep * (800 - 64) + 800

    assert plan.host == host_of(plan.keep) and peak(plan.keep) * MIB == plan.bytes <= free < peak(plan.keep + 1) * MIB
    assert (plan.keep, plan.host) == (35, 40)  # 33 and 23 when host layers came only from those not kept
    modes = [plan.mode(i, 80) for i in range(80)]
    assert modes.count("host") == plan.host and modes.count("keep") == plan.keep
    # spread over the whole model: between two host layers another computes while the link carries one, host layers
    # among the kept ones too, the top layer kept (its backward frees room for the first host layer's activations)
    assert all(not (a == b == "host") for a, b in itertools.pairwise(modes)) and modes[-1] == "keep"
    top = modes[modes.index("keep"):]  # from the lowest kept layer up: 40 host layers over 80, so 34 among these 69
    assert (len(top), top.count("host"), top.count("recompute")) == (69, 34, 0)
    # pinned memory for 10 layers only; none when it cannot hold one layer or the link carries nothing
    assert plan_recompute(80, 64 * MIB, 800 * MIB, 1500 * MIB, free, 8000 * MIB, 0.5).host == 10
    for host_bytes, share in ((700 * MIB, 0.5), (64 * 1024 * MIB, 0.0)):
        none = plan_recompute(80, 64 * MIB, 800 * MIB, 1500 * MIB, free, host_bytes, share)
        assert none.host == 0 and none.keep == (30 * 1024 - 1500 - 80 * 64) // (800 - 64)


def test_the_plan_names_the_host_memory_that_would_spare_its_recomputes():
    """70B at 4,096 tokens under a 40 GiB cap: 32 GiB of pinned memory holds 44 layers' activations and 19 layers
    recompute; the plan names 44 GiB, with which none do (43 would leave 2). Where the link or the GPU's budget
    limits the plan, or nothing recomputes, it names nothing."""
    sizes = (64 * MIB, 734 * MIB, 1500 * MIB)
    limits = {"budget_bytes": 40 * GIB, "static_bytes": 22 * GIB, "seq_len": 4096, "host_share": 1.0}

    def recompute(host_gib, **more):
        plan = plan_for_budget(80, *sizes, host_bytes=host_gib * GIB, **limits | more)
        return plan, 80 - plan.keep - plan.host

    plan, recomputed = recompute(32)
    assert (plan.keep, plan.host, recomputed) == (17, 44, 19)
    assert host_memory_to_recompute_fewer(plan, 80, *sizes, **limits) == (44, 0)
    assert recompute(44)[1] == 0 and recompute(43)[1] == 2
    link = recompute(32, host_share=0.25)[0]  # the link carries 20 layers' activations: more memory changes nothing
    assert link.host == 20 and host_memory_to_recompute_fewer(link, 80, *sizes, **limits | {"host_share": 0.25}) is None
    assert host_memory_to_recompute_fewer(recompute(44)[0], 80, *sizes, **limits) is None


def test_sharded_plans_keep_at_most_three_eighths_of_the_layers_on_the_host():
    """The two plans measured sharded on 2 x H200 under a 40 GiB cap (70B, 4,096 tokens: 20.9 GiB of model on each
    GPU, 64 MiB input, 734 MiB saved, ~2.1 GiB backward per layer), from the plan's arithmetic: the link share alone
    kept 61 layers on the host (keep 19, planned 39.3 GiB), measured slower than 30 (keep 17, 33 recomputed, planned
    39.9), which the sharded share gives with the same host memory and names no more memory to spare recomputes."""
    sizes = (64 * MIB, 734 * MIB, 2100 * MIB)
    limits = {"budget_bytes": 40 * GIB, "static_bytes": 20.9 * GIB, "seq_len": 4096}
    fast_link = {"forward_s": 0.02, "link_bytes_per_s": 55e9, "saved_bytes": 734 * MIB}
    assert host_share_for(**fast_link, sharded=False) == 1.0
    assert host_share_for(**fast_link, sharded=True) == SHARDED_HOST_SHARE == 3 / 8
    assert host_share_for(**fast_link | {"forward_s": 0.002}, sharded=True) == pytest.approx(0.002 * 55e9 / (734 * MIB))
    assert host_share_for(**fast_link | {"link_bytes_per_s": 0.0}, sharded=True) == 0.0  # no host memory

    def planned(share):
        plan = plan_for_budget(80, *sizes, host_bytes=52 * GIB, host_share=share, **limits)
        peak = round((limits["static_bytes"] + FAST_PATH_HEADROOM_BYTES + plan.bytes) / GIB, 1)
        return (plan.keep, plan.host, 80 - plan.keep - plan.host, peak), plan

    assert planned(1.0)[0] == (19, 61, 0, 39.3)
    sharded, plan = planned(SHARDED_HOST_SHARE)
    assert sharded == (17, 30, 33, 39.9)
    assert host_memory_to_recompute_fewer(plan, 80, *sizes, host_share=SHARDED_HOST_SHARE, **limits) is None
    modes = [plan.mode(i, 80) for i in range(80)]
    assert all(not (a == b == "host") for a, b in itertools.pairwise(modes))  # each copy beside another's backward


def test_what_the_plan_pins_stays_within_its_host_memory():
    """The arena pins whole 4 GiB slabs, a little more than the host layers' activations (the H200 runs pinned 52 GiB
    for 43.7 GiB of them): the plan keeps fewer host layers until what it pins fits the host memory it was given, and
    the host memory it names to spare recomputes is what pinning that plan takes."""
    sizes = (64 * MIB, 734 * MIB, 1500 * MIB)
    per_layer = [224 * MIB, 224 * MIB, 112 * MIB, 64 * MIB, 64 * MIB, 46 * MIB]  # 734 MiB saved, as buffers
    arena = PinnedArena(pin=False)  # 4 GiB slabs; pinned_for allocates nothing

    def pinned_for(plan):
        return arena.pinned_for(per_layer * plan.host)

    limits = {"budget_bytes": 40 * GIB, "static_bytes": 22 * GIB, "seq_len": 4096, "host_share": 1.0}
    unbounded = plan_for_budget(80, *sizes, host_bytes=32 * GIB, **limits)
    assert unbounded.host == 44 and pinned_for(unbounded) == 36 * GIB  # 31.5 GiB of activations: 9 slabs
    plan = plan_for_budget(80, *sizes, host_bytes=32 * GIB, pinned_for=pinned_for, **limits)
    assert pinned_for(plan) <= 32 * GIB < pinned_for(RecomputePlan(plan.keep, 0, 0, plan.host + 1))
    assert plan.host == 43 and arena.pinned_bytes == 0
    gib, recomputed = host_memory_to_recompute_fewer(plan, 80, *sizes, pinned_for=pinned_for, **limits)
    roomy = plan_for_budget(80, *sizes, host_bytes=gib * GIB, pinned_for=pinned_for, **limits)
    assert (gib, recomputed) == (48, 0) and 80 - roomy.keep - roomy.host == 0 and pinned_for(roomy) <= gib * GIB


def test_plan_moves_inputs_to_the_host_only_as_needed():
    # 32k tokens: 512 MiB input and ~8.6 GiB saved per layer; 45 GiB free
    plan = plan_recompute(80, 512 * MIB, 8800 * MIB, 4000 * MIB, free_bytes=45 * 1024 * MIB)
    on_gpu = (45 * 1024 - 8800 - 4000 - 2 * 512) // 512
    assert (plan.keep, plan.offload) == (0, 80 - on_gpu)
    assert [plan.mode(i, 80) for i in (0, plan.offload - 1, plan.offload)] == ["offload", "offload", "recompute"]
    with pytest.raises(BudgetTooSmall, match="recompute needs 13.5 GiB beyond the model"):
        plan_recompute(80, 512 * MIB, 8800 * MIB, 4000 * MIB, free_bytes=10 * 1024 * MIB)


def test_budget_too_small_names_the_smallest_budget_that_fits():
    # 70B shape at 4,096 tokens: 64 MiB layer input, 862 MiB saved, 1.5 GiB backward; model, adapters and AdamW 37.5 GiB
    sizes = {"input_bytes": 64 * MIB, "saved_bytes": 862 * MIB, "backward_bytes": 1536 * MIB}
    with pytest.raises(RecipeError) as error:  # train.py prints it as one line
        plan_for_budget(80, **sizes, budget_bytes=40 * 1024 * MIB, static_bytes=37.5 * 1024 * MIB, seq_len=4096)
    # 37.5 + 2 (margin) + (862 + 1536 + 2 x 64) / 1024 = 41.97 GiB
    assert str(error.value) == ("memory_budget_gib=40 is too small for 4096 tokens per row: the model takes 37.5 GiB "
                                "and one layer's recompute needs 2.5 GiB beyond the model; the smallest budget that "
                                "fits is 42 GiB (raise gpu.memory_budget_gib to it, or shorten train.max_length)")
    plan = plan_for_budget(80, **sizes, budget_bytes=42 * 1024 * MIB, static_bytes=37.5 * 1024 * MIB, seq_len=4096)
    assert (plan.keep, plan.offload) == (0, 80)  # fits: every layer recomputes, its input waits on the host
    # a 48 GB card's budget with a smaller model (a 3-bit branch, ~29 GiB with adapters and AdamW): fits
    fits = plan_for_budget(80, **sizes, budget_bytes=40 * 1024 * MIB, static_bytes=29 * 1024 * MIB, seq_len=4096)
    assert fits.bytes <= (40 - 29 - 2) * 1024 * MIB


def saved_like(tokens: int, hidden: int = 64) -> list[torch.Tensor]:
    """What one layer saves at `tokens` tokens: dense, transposed (dense, other strides), and a strided view."""
    wide = torch.empty(1, tokens, 3 * hidden, dtype=torch.bfloat16)
    return [torch.empty(1, tokens, hidden), torch.empty(1, 4, tokens, hidden // 4).transpose(1, 2),
            wide, wide[..., ::3], torch.empty(tokens, dtype=torch.int64)]


def test_dense_shapes_of_the_same_bytes_travel_to_the_host_as_one_copy():
    hidden = torch.randn(1, 16, 8)
    assert copy_key(hidden.view(16, 8)) == copy_key(hidden) != copy_key(hidden[:, 8:])
    assert copy_key(hidden.transpose(1, 2)) != copy_key(hidden)  # not dense: its own layout


def test_packed_rows_mask_compiles_without_persistent_kernels():
    """The block mask of packed rows is compiled with inductor's persistent reductions off (their argsort of each row's
    key blocks took minutes of ptxas at 16,384 tokens), seen from inside the mask function as torch traces it, and is
    the mask transformers' own eager build gives: causal, each example attending to itself only, a row of 300 tokens
    (not a multiple of the 128-token block)."""
    import torch._inductor.config
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers import masking_utils

    fast_training.compile_flex_masks_without_persistent_kernels()
    examples = torch.tensor([[0] * 100 + [1] * 150 + [2] * 50])
    packed = masking_utils.and_masks(masking_utils.causal_mask_function,
                                     masking_utils.packed_sequence_mask_function(examples))
    persistent = []

    def mask_function(*index):
        persistent.append(torch._inductor.config.triton.persistent_reductions)
        return packed(*index)

    mask = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"](batch_size=1, q_length=300, kv_length=300,
                                                                        mask_function=mask_function, device="cpu")
    assert persistent and set(persistent) == {False}
    assert torch._inductor.config.triton.persistent_reductions  # only inside the mask's build
    expected = create_block_mask(packed, 1, None, 300, 300, device="cpu")
    assert torch.equal(mask.to_dense(), expected.to_dense())
    assert mask.to_dense()[0, 0].tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]


def test_this_torch_takes_the_threaded_pinning_setting():
    """The allocator setting the GPU path makes before pinning its slabs is one this torch parses (an unknown key or
    a missing setter raises); CPU builds parse it too."""
    pin_from_threads()
    with pytest.raises((ValueError, RuntimeError), match="no_such_setting"):  # the setter checks what it gets
        (getattr(torch._C, "_accelerator_setAllocatorSettings", None)
         or torch.cuda.memory._set_allocator_settings)("pinned_no_such_setting:True")


def test_host_memory_default_stays_within_the_cgroup_limit(tmp_path, monkeypatch):
    """A job scheduler's or a container's memory limit (cgroup v2 or v1, on the process's cgroup or one above it)
    bounds the pinned host memory the plan may use: the machine's figure would pin past it. Half of it, at most what
    the kernel says is available, shared by the machine's training processes."""
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    v2 = tmp_path / "v2"
    (v2 / "slurm" / "job_7" / "step_0").mkdir(parents=True)
    (v2 / "slurm" / "job_7" / "memory.max").write_text(f"{8 * 2 ** 30}\n")  # the job's allocation
    (v2 / "slurm" / "job_7" / "step_0" / "memory.max").write_text("max\n")
    (tmp_path / "cgroup_v2").write_text("0::/slurm/job_7/step_0\n")
    assert memory_limit(str(tmp_path / "cgroup_v2"), str(v2)) == min(machine, 8 * 2 ** 30)

    v1 = tmp_path / "v1" / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{3 * 2 ** 30}\n")
    (v1.parent / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    (tmp_path / "cgroup_v1").write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert memory_limit(str(tmp_path / "cgroup_v1"), str(tmp_path / "v1")) == min(machine, 3 * 2 ** 30)
    (tmp_path / "cgroup_none").write_text("0::/user.slice\n")  # no memory.max on the way up: the machine's
    assert memory_limit(str(tmp_path / "cgroup_none"), str(tmp_path / "v1")) == machine

    (tmp_path / "meminfo").write_text("MemTotal:       24684096 kB\nMemAvailable:   20000000 kB\n")
    assert available_memory(str(tmp_path / "meminfo")) == 20000000 * 1024
    one = default_host_memory()
    assert 0 < one <= min(memory_limit() / 2, available_memory() * 1.05)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_host_memory() == pytest.approx(one / 4, rel=0.05)


def test_pinned_arena_is_reused_for_rows_of_any_length(capsys):
    """The host layers' buffers come from one arena: sized once for the longest row (a progress bar while it
    pins, whose total is what it pins), no row adds to it; each buffer has the saved tensor's layout where that is
    dense, and no two buffers of a step overlap."""
    longest, layers = 512, 6
    arena = PinnedArena(pin=False, slab_bytes=2 ** 20)
    foreseen = arena.pinned_for([t.numel() * t.element_size() for t in saved_like(longest)] * layers)
    assert arena.pinned_bytes == 0
    arena.reserve([t.numel() * t.element_size() for t in saved_like(longest)] * layers)
    reserved = arena.pinned_bytes
    assert reserved == foreseen  # what the plan counts is what gets pinned
    bar = capsys.readouterr().err.split("\r")[-1]
    assert bar.startswith("pinning host memory for host layers: 100%") and f"{reserved // 2 ** 20}.00M/" in bar, bar
    arena.reserve([t.numel() * t.element_size() for t in saved_like(longest)] * layers)  # sized already: no bar
    assert arena.pinned_bytes == reserved and capsys.readouterr().err == ""
    assert reserved >= layers * sum(t.numel() * t.element_size() for t in saved_like(longest))
    for step, tokens in enumerate((300, 512, 17, 480, 512, 129, 4)):
        taken = []
        for layer in range(layers):
            for i, like in enumerate(saved_like(tokens)):
                host = arena.take(like)
                assert host.shape == like.shape and host.dtype == like.dtype
                if like.is_contiguous() or i == 1:  # dense: its own strides
                    assert host.stride() == like.stride()
                host.fill_(step * 100 + layer * 10 + i)
                taken.append((host, step * 100 + layer * 10 + i))
        assert all(bool((host == value).all()) for host, value in taken)  # nothing written over another
        for _ in taken:
            arena.give_back()
        assert arena.pinned_bytes == reserved, f"step {step} ({tokens} tokens) grew the arena"

    # without reserve: it grows until the longest row has run, and never after
    arena = PinnedArena(pin=False, slab_bytes=2 ** 20)
    sizes = []
    for tokens in (100, 512, 300, 512, 1, 511):
        for like in saved_like(tokens) * layers:
            arena.take(like)
        for _ in saved_like(tokens) * layers:
            arena.give_back()
        sizes.append(arena.pinned_bytes)
    assert sizes[0] < sizes[1] and sizes[1:] == [sizes[1]] * 5


def test_mlp_keeps_gate_and_up_but_not_their_product(checkpoint):
    """A layer that keeps its activations holds SwiGLU's inputs (its backward needs them) but not its output,
    which down_proj's LoRA-A would otherwise keep: it is recomputed in the backward."""
    model = lora_model(checkpoint)
    speed_up_lora(model)
    mlp = model.get_base_model().model.layers[0].mlp
    assert isinstance(mlp.forward, functools.partial)
    x = torch.randn(1, 32, TINY.hidden_size, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mlp(x)
    wide = {t.untyped_storage().data_ptr() for t in saved if t.shape == (1, 32, TINY.intermediate_size)}
    assert len(wide) == 2  # gate and up


def test_enable_fast_training_refuses_a_cpu_model(checkpoint):
    with pytest.raises(ValueError, match="needs the model on a CUDA GPU; on CPU train without it"):
        fast_training.enable_fast_training(lora_model(checkpoint), seq_len=64)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_gpu_fast_path_matches_cpu(checkpoint):
    """On the GPU (bf16, liger, Triton, the lean LoRA) one MLP and one attention projection give the CPU's fp32
    outputs and gradients within bf16 rounding, and the whole model its loss. (Whole-model gradients are no
    measure: on random weights bf16 rounding grows chaotically through the layers, as it does in PEFT's own path.)"""
    tokens = torch.randint(0, TINY.vocab_size, (1, 512), generator=torch.Generator().manual_seed(2))
    cpu_model = lora_model(checkpoint)
    cpu_loss = cpu_model(input_ids=tokens, labels=tokens, use_cache=False).loss.item()
    speed_up_lora(cpu_model)
    model = lora_model(checkpoint, device="cuda")  # bf16
    gpu_parameters = dict(model.named_parameters())
    with torch.no_grad():  # the same adapters (the GPU's random generator initialised its own)
        for name, parameter in cpu_model.named_parameters():
            if parameter.requires_grad:
                gpu_parameters[name].copy_(parameter)
    report = fast_training.enable_fast_training(model, seq_len=512, host_memory_gib=0)
    assert report["fast_lora_modules"] == 7 * TINY.num_hidden_layers
    assert model(input_ids=tokens.cuda(), labels=tokens.cuda(), use_cache=False).loss.item() == \
        pytest.approx(cpu_loss, rel=2e-2)
    generator = torch.Generator().manual_seed(3)
    for path in ("mlp", "self_attn.q_proj"):
        results = []
        for m in (cpu_model, model):
            module = m.get_base_model().model.layers[1].get_submodule(path)
            module.zero_grad(set_to_none=True)
            device, dtype = next(module.parameters()).device, (torch.float32 if m is cpu_model else torch.bfloat16)
            x = torch.randn(1, 512, TINY.hidden_size, generator=generator.manual_seed(4)).to(device, dtype)
            out = module(x.requires_grad_())
            out.backward(torch.randn(out.shape, generator=generator.manual_seed(5)).to(device, dtype))
            results.append([out, x.grad] + [p.grad for p in module.parameters() if p.requires_grad])
        for cpu, gpu in zip(*results):
            assert ((gpu.float().cpu() - cpu).norm() / cpu.norm()).item() < 2e-2, path


@needs_cuda
def test_host_layers_give_the_gradients_of_kept_layers(checkpoint, monkeypatch):
    from finetune.gpu import host_offload
    monkeypatch.setattr(host_offload, "OFFLOAD_MIN_BYTES", 0)  # this tiny model's tensors all travel too
    tokens = torch.randint(0, TINY.vocab_size, (1, 512), generator=torch.Generator().manual_seed(2)).cuda()
    model = lora_model(checkpoint, device="cuda")
    fast_training.enable_fast_training(model, seq_len=512, host_memory_gib=0)
    base = model.get_base_model()
    # the fast path's NormRecompute (its hooks on the norms), here with hooks of the test's own
    layers, norms = decoder_layers(base), base._host_offload.norms
    hooks, hooks_keeping_norms = host_offload.HostOffload(norms), host_offload.HostOffload()
    for pool in (hooks, hooks_keeping_norms):  # slabs of about one of this tiny model's tensors: bytes as carried
        pool.arena = PinnedArena(slab_bytes=2 ** 16)
    grads = {}
    for plan, norm_recompute in ((RecomputePlan(keep=3, offload=0, bytes=0), None),
                                 (RecomputePlan(keep=0, offload=0, bytes=0, host=3), None),
                                 (RecomputePlan(keep=3, offload=0, bytes=0), norms),
                                 (RecomputePlan(keep=0, offload=0, bytes=0, host=3), norms),
                                 (RecomputePlan(keep=1, offload=0, bytes=0, host=1), norms)):
        apply_plan(layers, plan, hooks if norm_recompute else hooks_keeping_norms, norm_recompute)
        grads[plan, norm_recompute] = loss_and_grads(model, tokens)[1]
    assert [plan.mode(i, 3) for i in range(3)] == ["host", "recompute", "keep"]
    first, *others = grads.values()
    for other in others:
        differing = [name for name in first if not torch.equal(first[name], other[name])]
        assert not differing, [(n, (first[n] - other[n]).abs().max().item()) for n in differing[:3]]
    # the host layers' buffers, back in the pool; with norm outputs recomputed (and the norm input that liger saves
    # as [tokens, hidden] travelling once), fewer of them
    assert 0 < hooks.pinned_bytes < hooks_keeping_norms.pinned_bytes


def test_host_layers_add_one_turn_hook_to_the_top_layer(checkpoint):
    """apply_plan hooks the top layer's output (to start fetching the last host layer as the backward begins) once
    however often it re-plans, and not when no layer goes to the host."""
    from finetune.gpu.host_offload import HostOffload
    layers = decoder_layers(lora_model(checkpoint).get_base_model())
    hooks = HostOffload()
    counts = []
    for plan in (RecomputePlan(keep=1, offload=0, bytes=0, host=1), RecomputePlan(keep=1, offload=0, bytes=0, host=2),
                 RecomputePlan(keep=3, offload=0, bytes=0), RecomputePlan(keep=0, offload=1, bytes=0, host=1)):
        apply_plan(layers, plan, hooks)
        counts.append([len(layer._forward_hooks) for layer in layers])
    assert counts == [[0, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 1]]


@needs_cuda
def test_the_last_host_layer_comes_back_as_the_backward_begins(checkpoint, monkeypatch):
    """With a kept layer above the host layer, the host layer's copies are fetched from the turn of the backward,
    before its own backward unpacks them (not by that first unpack, which would wait for all of them)."""
    from finetune.gpu import host_offload
    monkeypatch.setattr(host_offload, "OFFLOAD_MIN_BYTES", 0)

    class Logged(host_offload.HostOffload):
        def _unpack(self, copy):
            events.append("unpack")
            return super()._unpack(copy)

        def _fetch(self, layer):
            events.append("fetch" if layer.ready is None and layer.copies else "fetched")
            return super()._fetch(layer)

    events = []
    tokens = torch.randint(0, TINY.vocab_size, (1, 512), generator=torch.Generator().manual_seed(2)).cuda()
    model = lora_model(checkpoint, device="cuda")
    fast_training.enable_fast_training(model, seq_len=512, host_memory_gib=0)
    layers = decoder_layers(model.get_base_model())
    plan = RecomputePlan(keep=1, offload=0, bytes=0, host=1)
    assert [plan.mode(i, 3) for i in range(3)] == ["host", "recompute", "keep"]
    apply_plan(layers, plan, Logged())
    loss_and_grads(model, tokens)
    assert events[0] == "fetch" and events.index("unpack") > 0, events[:4]


@needs_cuda
def test_swiglu_lora_a_backward_kernel_gives_ligers_gradients_bit_for_bit():
    """bf16 at 70B's width: with a zero LoRA-A gradient the kernel's gate and up gradients equal liger's backward
    bit for bit (the same arithmetic in one pass), and A's gradient is the dropped product liger's forward gives,
    within bf16 rounding of an fp32 reference."""
    from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward

    from finetune.gpu.dropout_matmul import swiglu_lora_a_backward
    from finetune.gpu.seeded_dropout import drop
    generator = torch.Generator("cuda").manual_seed(0)
    gate, up, grad = (torch.randn(1000, 28672, generator=generator, device="cuda", dtype=torch.bfloat16)
                      for _ in range(3))
    grad_act_a = torch.randn(1000, 16, generator=generator, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(16, 28672, generator=generator, device="cuda", dtype=torch.bfloat16)
    product = swiglu_forward(gate, up)[2]
    want_gate, want_up = swiglu_backward(gate.clone(), up.clone(), grad)
    for dropout in (None, (0.05, 2 ** 40 + 7)):
        got_gate, got_up, _ = swiglu_lora_a_backward(gate.clone(), up.clone(), grad, torch.zeros_like(grad_act_a),
                                                     a, dropout)
        assert torch.equal(got_gate, want_gate) and torch.equal(got_up, want_up)
        grad_a = swiglu_lora_a_backward(gate.clone(), up.clone(), grad, grad_act_a, a, dropout)[2]
        dropped = product if dropout is None else drop(product, *dropout)
        want_a = grad_act_a.float().t() @ dropped.float()
        assert ((grad_a.float() - want_a).norm() / want_a.norm()).item() < 1e-2
