"""Lean LoRA over GPTQ layers for training: `speed_up_lora(model)` gives PEFT's LoRA linears a leaner forward.

PEFT computes `base(x) + B(A(dropout(x))) * scaling` as separate ops, adapters in fp32. Here, for the common case
(one active adapter, no dropout, no DoRA), each projection is one autograd Function that
- does the adapter math in the activation dtype (bf16; fp32 master weights, as autocast would);
- adds the adapter's update inside the base matmul (cuBLAS's addmm epilogue), and in the backward adds the
  adapter's input gradient the same way (dx = addmm(dxa @ A, grad, W)): no separate bf16 add passes;
- dequantises the GPTQ weight again in the backward rather than keeping it (as GPTQLinear does).
Projections that share an input run their LoRA-A as one matmul (gate and up: [A_gate; A_up]).

The MLP is one more step lean. SwiGLU's output (tokens x 28672 at 70B) is what down_proj's LoRA-A would keep for
its weight gradient; `_SwiGLULoraA` keeps gate and up instead (needed by SwiGLU's backward anyway) and recomputes
the product in the backward, so a layer that keeps its activations holds a fifth less. down_proj's adapter runs
*before* its base matmul, which saves nothing: a recomputed layer's checkpoint has every tensor the backward needs
before that matmul, and non-reentrant checkpointing stops there, skipping a quarter of the layer's FLOPs.
"""

import functools

import torch
import torch.nn.functional as F

from ..gptq.layer import GPTQLinear, dequantizer


def speed_up_lora(model: torch.nn.Module) -> int:
    """Give every eligible PEFT LoRA linear over a GPTQLinear the lean forward, and every MLP whose three
    projections are all eligible the lean MLP; returns how many projections. Modules with dropout or a LoRA
    variant (DoRA, ...) keep PEFT's forward."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    lean = set()
    for module in model.modules():
        if (isinstance(module, LoraLinear) and isinstance(module.get_base_layer(), GPTQLinear)
                and all(isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values())):
            module.forward = functools.partial(lean_lora_forward, module)
            lean.add(module)
    for module in model.modules():
        if (all(getattr(module, name, None) in lean for name in ("gate_proj", "up_proj", "down_proj"))
                and getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish")):
            module.forward = functools.partial(lean_mlp_forward, module)
    return len(lean)


def adapter(module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B * scaling) of a LoRA linear's one active adapter in `dtype`, or None where the lean path does not
    apply at this call (adapters disabled or merged, several active, a variant, a bias)."""
    names = module.active_adapters
    if (module.disable_adapters or module.merged or len(names) != 1 or names[0] not in module.lora_A
            or names[0] in module.lora_variant or module.base_layer.bias is not None):
        return None
    name = names[0]
    return module.lora_A[name].weight.to(dtype), module.lora_B[name].weight.to(dtype) * module.scaling[name]


def lean_lora_forward(module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    weights = None if args or kwargs else adapter(module, x.dtype)
    if weights is None:
        return type(module).forward(module, x, *args, **kwargs)  # PEFT's general path
    return _LoraGPTQ.apply((module.base_layer,), x, *weights)[0]


def lean_mlp_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    weights = [adapter(p, x.dtype) for p in (gate, up, down)]
    if None in weights:
        return type(mlp).forward(mlp, x)
    (a_gate, b_gate), (a_up, b_up), (a_down, b_down) = weights
    gate_out, up_out = _LoraGPTQ.apply((gate.base_layer, up.base_layer), x, torch.cat([a_gate, a_up]), b_gate, b_up)
    act, act_a = _SwiGLULoraA.apply(gate_out, up_out, a_down)
    # the adapter first, then the base matmul that saves nothing (see the module docstring)
    return _GPTQMatmulPlus.apply(act, act_a @ b_down.t(), down.base_layer)


class _LoraGPTQ(torch.autograd.Function):
    """x -> (x @ W_i.t() + (x @ A_i.t()) @ B_i.t() for each GPTQ layer i sharing the input x).

    `a` stacks the layers' A matrices ([sum of ranks, in]) so that x meets them in one matmul; `bs` are the B
    matrices with the LoRA scaling folded in. Saves x and the small x @ A.t(), never a dense weight."""

    @staticmethod
    def forward(ctx, layers: tuple[GPTQLinear, ...], x: torch.Tensor, a: torch.Tensor, *bs: torch.Tensor):
        ctx.layers = layers
        flat = x.reshape(-1, x.shape[-1])
        xa = flat @ a.t()
        outputs = []
        for layer, xa_i, b in zip(layers, xa.split([b.shape[1] for b in bs], dim=1), bs):
            weight = dequantizer(x.device)(layer, x.dtype)  # [out, in]; valid until the next dequantise
            outputs.append(torch.addmm(xa_i @ b.t(), flat, weight.t()).view(*x.shape[:-1], -1))
        ctx.save_for_backward(x, a, xa, *bs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x, a, xa, *bs = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1])
        grads = [g.reshape(-1, g.shape[-1]) for g in grads]
        grad_xa = torch.cat([g @ b for g, b in zip(grads, bs)], dim=1)
        grad_x = grad_xa @ a
        for layer, g in zip(ctx.layers, grads):
            grad_x = torch.addmm(grad_x, g, dequantizer(g.device)(layer, g.dtype))
        grad_bs = [g.t() @ xa_i for g, xa_i in zip(grads, xa.split([b.shape[1] for b in bs], dim=1))]
        return None, grad_x.view_as(x), grad_xa.t() @ flat, *grad_bs


class _SwiGLULoraA(torch.autograd.Function):
    """(gate, up, A) -> (act = silu(gate) * up, act @ A.t()), keeping gate and up but not act."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, a: torch.Tensor):
        act = swiglu(gate, up)
        ctx.save_for_backward(gate, up, a)
        return act, act @ a.t()

    @staticmethod
    def backward(ctx, grad_act: torch.Tensor, grad_act_a: torch.Tensor):
        gate, up, a = ctx.saved_tensors
        act = swiglu(gate, up)  # recomputed: an elementwise pass costs far less than keeping it
        flat_grad_act_a = grad_act_a.reshape(-1, grad_act_a.shape[-1])
        grad_a = flat_grad_act_a.t() @ act.reshape(-1, act.shape[-1])
        del act
        grad_act = torch.addmm(grad_act.reshape(-1, grad_act.shape[-1]), flat_grad_act_a, a).view_as(gate)
        return *swiglu_backward(gate, up, grad_act), grad_a


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.is_cuda:
        from liger_kernel.ops.swiglu import swiglu_forward
        return swiglu_forward(gate, up)[2]
    return F.silu(gate) * up


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor):
    """(d gate, d up) of silu(gate) * up; on CUDA liger's kernel, which writes them over gate and up."""
    if gate.is_cuda:
        from liger_kernel.ops.swiglu import swiglu_backward as liger_swiglu_backward
        return liger_swiglu_backward(gate, up, grad)
    sigmoid = torch.sigmoid(gate)
    silu = gate * sigmoid
    return grad * up * sigmoid * (1 + gate * (1 - sigmoid)), grad * silu


class _GPTQMatmulPlus(torch.autograd.Function):
    """x @ W.t() + update in one cuBLAS call. Like GPTQLinear's own matmul it saves nothing (the backward
    dequantises again); the update's gradient is the output's, passed through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, update: torch.Tensor, layer: GPTQLinear) -> torch.Tensor:
        ctx.layer = layer
        weight = dequantizer(x.device)(layer, x.dtype)
        out = torch.addmm(update.reshape(-1, update.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
        return out.view(update.shape)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = dequantizer(grad_output.device)(ctx.layer, grad_output.dtype)
        return grad_output @ weight, grad_output, None
