"""The lean LoRA forward (`fast_lora`) against PEFT's: gradients with every layer kept or recomputed, projections
sharing an input as one Function, dropout drawn again in the backward (on the CPU, in Triton's interpreter and on a
GPU), and the kernels that fuse the mask into LoRA-A's matmuls (`dropout_matmul`, `seeded_dropout`)."""

import functools
from importlib.util import find_spec

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.gpu.fast_lora import draw_seed, lean_qkv, speed_up_lora
from finetune.gpu.fast_training import apply_plan, decoder_layers
from finetune.gpu.recompute_plan import RecomputePlan
from finetune.gpu.seeded_dropout import dropout_mask
from tests.gpu.tiny_lora import TINY, lora_model, loss_and_grads, needs_cuda
from tests.subprocesses import run_python


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
        from tests.gpu.test_fast_lora import assert_lean_dropout_gives_peft_gradients
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
