"""Lean LoRA over GPTQ layers for training: `speed_up_lora(model)` gives PEFT's LoRA linears a leaner forward.

PEFT computes `base(x) + B(A(dropout(x))) * scaling` as separate ops, adapters in fp32. Here, for the common case
(one active adapter, no DoRA), each projection is one autograd Function that
- does the adapter math in the activation dtype (bf16; fp32 master weights, as autocast would), casting and scaling
  the weights inside the Function: autograd records no cast or scale per weight (with them, a layer's seven adapters
  were 28 more autograd nodes, each tens of microseconds of the host's time in forward and again in backward);
- applies LoRA dropout as PEFT does (a mask of its own per projection, 1/(1-p) folded into A), keeping no mask:
  it draws a seed from torch's CPU generator (which checkpointing and resume restore) and draws the mask again
  from that seed in the backward (`seeded_dropout`); on CUDA the mask is drawn inside LoRA-A's matmuls, the
  forward's one kernel, the backward's (A's gradient and the input's) another (`dropout_matmul`), so no dropped
  copy of the input is written;
- adds the adapter's update inside the base matmul (cuBLAS's addmm epilogue, in place over the update), and in
  the backward adds the adapter's input gradient the same way (dx = (dxa @ A).addmm_(grad, W)): no separate bf16
  add passes, no copies;
- dequantises the GPTQ weight again in the backward rather than keeping it (as GPTQLinear does).
Projections that share an input run as one autograd Function (q, k and v; gate and up), with no dropout their LoRA-A
as one matmul ([A_q; A_k; A_v]): per projection the host launches less (a sharded run is bound by the host's time).

The MLP is one more step lean. SwiGLU's output (tokens x 28672 at 70B) is what down_proj's LoRA-A would keep for
its weight gradient; `_SwiGLULora` (SwiGLU and down_proj's whole adapter) keeps gate and up instead (needed by
SwiGLU's backward anyway) and recomputes the product in the backward, so a layer that keeps its activations holds a
fifth less. On CUDA that backward is one kernel (`dropout_matmul.swiglu_lora_a_backward`): the product, its LoRA-A
gradients and SwiGLU's in one pass.
down_proj's adapter runs *before* its base matmul, which saves nothing: a recomputed layer's checkpoint has every
tensor the backward needs before that matmul, and non-reentrant checkpointing stops there, skipping a quarter of the
layer's FLOPs.
"""

import functools

import torch
import torch.nn.functional as F

from ..gptq.layer import GPTQLinear, dequantizer
from . import dropout_matmul
from .seeded_dropout import Dropout, drop

QKV = ("q_proj", "k_proj", "v_proj")  # projections of the attention's one input, run as one Function (`lean_qkv`)


def speed_up_lora(model: torch.nn.Module) -> dict[str, int]:
    """Give every eligible PEFT LoRA linear over a GPTQLinear the lean forward, and every MLP whose three
    projections are all eligible the lean MLP. Returns how many LoRA linears went lean ("lean") and how many
    keep PEFT's forward, by reason."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    lean, counts = set(), {"lean": 0}
    for module in model.modules():
        if isinstance(module, LoraLinear):
            reason = not_lean_reason(module)
            if reason is None:
                module.forward = functools.partial(lean_lora_forward, module)
                lean.add(module)
            counts["lean" if reason is None else reason] = counts.get(reason or "lean", 0) + 1
    for module in model.modules():
        if (all(getattr(module, name, None) in lean for name in ("gate_proj", "up_proj", "down_proj"))
                and getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish")):
            module.forward = functools.partial(lean_mlp_forward, module)
        if all(getattr(module, name, None) in lean for name in QKV):
            handle = module.__dict__.pop("_lean_qkv", None)
            if handle is not None:  # made lean again: one hook
                handle.remove()
            module._lean_qkv = module.register_forward_pre_hook(lean_qkv, with_kwargs=True)
    return counts


def not_lean_reason(module) -> str | None:
    """Why a PEFT LoRA linear keeps PEFT's own forward, or None when the lean one takes it."""
    if not isinstance(module.get_base_layer(), GPTQLinear):
        return "base layer not GPTQ"
    if module.get_base_layer().bias is not None:
        return "base layer with a bias"
    if module.lora_variant:
        return "a LoRA variant (DoRA, ...)"
    if not all(isinstance(d, (torch.nn.Identity, torch.nn.Dropout)) for d in module.lora_dropout.values()):
        return "a dropout other than torch.nn.Dropout"
    return None


def adapter(module) -> tuple[torch.Tensor, torch.Tensor, float, Dropout] | None:
    """(A, B, scaling, dropout) of a LoRA linear's one active adapter, A and B the trainable weights themselves, or
    None where the lean path does not apply at this call (adapters disabled or merged, several active, a variant, a
    bias). In training with p > 0 this draws the mask's seed."""
    names = module.active_adapters
    if (module.disable_adapters or module.merged or len(names) != 1 or names[0] not in module.lora_A
            or names[0] in module.lora_variant or module.base_layer.bias is not None):
        return None
    name = names[0]
    dropout_module = module.lora_dropout[name]
    p = dropout_module.p if isinstance(dropout_module, torch.nn.Dropout) and dropout_module.training else 0.0
    dropout = (p, draw_seed()) if p > 0 else None
    return module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name], dropout


def used_a(a: torch.Tensor, dropout: Dropout, dtype: torch.dtype) -> torch.Tensor:
    """A as LoRA-A's matmul uses it: dropout's 1/(1-p) folded in, in the activations' dtype."""
    return (a / (1 - dropout[0]) if dropout is not None else a).to(dtype)


def used_b(b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """B as LoRA-B's matmul uses it: in the activations' dtype, the LoRA scaling folded in."""
    return b.to(dtype) * scaling


def master_grad_a(grad: torch.Tensor, dropout: Dropout, dtype: torch.dtype) -> torch.Tensor:
    """A's gradient from that of `used_a(A)`."""
    grad = grad.to(dtype)
    return grad / (1 - dropout[0]) if dropout is not None else grad


def master_grad_b(grad: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """B's gradient from that of `used_b(B)`."""
    return grad.to(dtype) * scaling


def draw_seed() -> int:
    """A mask's seed from torch's CPU generator: seeded by the run, restored by checkpointing's recompute (so the
    recompute draws the same) and by a resumed run."""
    return int(torch.randint(2 ** 62, (1,)).item())


def dropped(x: torch.Tensor, dropout: Dropout) -> torch.Tensor:
    """x with the mask applied (the 1/(1-p) is in A), or x itself."""
    return x if dropout is None else drop(x, *dropout)


def on_kernels(x: torch.Tensor) -> bool:
    """Whether `dropout_matmul`'s kernels take x: on CUDA, rows a multiple of 8 long (their mask tiles); a test runs
    them on the CPU in Triton's interpreter by patching this."""
    return x.is_cuda and x.shape[-1] % 8 == 0


def dropped_matmul(x: torch.Tensor, a: torch.Tensor, dropout: Dropout) -> torch.Tensor:
    """dropped(x, dropout) @ a.t() for x [tokens, in]."""
    if dropout is not None and on_kernels(x):
        return dropout_matmul.dropped_matmul(x, a, dropout)
    return dropped(x, dropout) @ a.t()


def lora_a_backward(grad_x: torch.Tensor | None, x: torch.Tensor, grad_xa: torch.Tensor, a: torch.Tensor,
                    dropout: Dropout) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x + dropped(grad_xa @ a, dropout), grad_xa.t() @ dropped(x, dropout)) for x [tokens, in], grad_x None
    counting as zero; grad_x is the caller's own: the kernel adds in place."""
    if dropout is not None and on_kernels(x):
        return dropout_matmul.lora_a_backward(grad_x, x, grad_xa, a, dropout, out=grad_x)
    update = dropped(grad_xa @ a, dropout)
    return update if grad_x is None else grad_x + update, grad_xa.t() @ dropped(x, dropout)


def lean_lora_forward(module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    ready = module.__dict__.pop("_lean_output", None)  # computed with its neighbours by `lean_qkv`
    if ready is not None and ready[0] is x and not args and not kwargs:
        return ready[1]
    weights = None if args or kwargs else adapter(module)
    if weights is None:
        return type(module).forward(module, x, *args, **kwargs)  # PEFT's general path
    a, b, scaling, dropout = weights
    return _LoraGPTQ.apply((module.base_layer,), ((scaling, dropout),), x, a, b)[0]


def lean_qkv(attention, args, kwargs) -> None:
    """Before the attention runs: q, k and v of its input in one _LoraGPTQ, each projection's output left for its
    own forward to return (when called with that same input)."""
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    projections = [getattr(attention, name) for name in QKV]
    weights = [adapter(p) for p in projections]  # in PEFT's order: the same masks
    if None in weights:
        return
    (a_q, b_q, *fold_q), (a_k, b_k, *fold_k), (a_v, b_v, *fold_v) = weights
    outputs = _LoraGPTQ.apply(tuple(p.base_layer for p in projections), (fold_q, fold_k, fold_v), x, a_q, a_k, a_v,
                              b_q, b_k, b_v)
    for projection, output in zip(projections, outputs):
        projection.__dict__["_lean_output"] = (x, output)


def lean_mlp_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    weights = [adapter(p) for p in (gate, up, down)]  # in PEFT's order: the same masks
    if None in weights:
        return type(mlp).forward(mlp, x)
    (a_gate, b_gate, *fold_gate), (a_up, b_up, *fold_up), (a_down, b_down, scaling_down, drop_down) = weights
    gate_out, up_out = _LoraGPTQ.apply((gate.base_layer, up.base_layer), (fold_gate, fold_up), x, a_gate, a_up,
                                       b_gate, b_up)
    act, update = _SwiGLULora.apply(gate_out, up_out, a_down, b_down, scaling_down, drop_down)
    # the adapter first, then the base matmul that saves nothing (see the module docstring)
    return _GPTQMatmulPlus.apply(act, update, down.base_layer)


class _LoraGPTQ(torch.autograd.Function):
    """x -> (x @ W_i.t() + (dropout_i(x) @ A_i.t()) @ B_i.t() * scaling_i for each GPTQ layer i sharing the input x).

    `weights` are the A matrices, then the B matrices (the trainable weights themselves); `folds` one (scaling,
    dropout) per layer. Without dropout x meets the stacked A matrices in one matmul. Saves x, the small x @ A.t()
    and the weights as used (`used_a`, `used_b`), never a dense weight or a mask."""

    @staticmethod
    def forward(ctx, layers: tuple[GPTQLinear, ...], folds: tuple[tuple[float, Dropout], ...], x: torch.Tensor,
                *weights: torch.Tensor):
        dropouts = [dropout for _, dropout in folds]
        ctx.layers, ctx.folds, ctx.dtypes = layers, folds, [w.dtype for w in weights]
        a_s = [used_a(a, dropout, x.dtype) for a, dropout in zip(weights, dropouts)]
        bs = [used_b(b, scaling, x.dtype) for b, (scaling, _) in zip(weights[len(layers):], folds)]
        flat = x.reshape(-1, x.shape[-1])
        if any(dropouts):
            xa = torch.cat([dropped_matmul(flat, a, d) for d, a in zip(dropouts, a_s)], dim=1)
        else:
            xa = flat @ (torch.cat(a_s) if len(a_s) > 1 else a_s[0]).t()
        outputs = []
        for layer, xa_i, b in zip(layers, xa.split([b.shape[1] for b in bs], dim=1), bs):
            weight = dequantizer(x.device)(layer, x.dtype)  # [out, in]; valid until the next dequantise
            # in place: torch.addmm(c, ...) would first copy c into a new output (a device-to-device copy)
            outputs.append((xa_i @ b.t()).addmm_(flat, weight.t()).view(*x.shape[:-1], -1))
        ctx.save_for_backward(x, xa, *a_s, *bs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x, xa, *weights = ctx.saved_tensors
        n = len(ctx.layers)
        a_s, bs = weights[:n], weights[n:]
        dropouts = [dropout for _, dropout in ctx.folds]
        flat = x.reshape(-1, x.shape[-1])
        grads = [g.reshape(-1, g.shape[-1]) for g in grads]
        grad_xas = [g @ b for g, b in zip(grads, bs)]
        if any(dropouts):
            grad_x, grad_as = None, []
            for grad_xa, a, dropout in zip(grad_xas, a_s, dropouts):  # the forward's masks, drawn again
                grad_x, grad_a = lora_a_backward(grad_x, flat, grad_xa, a, dropout)
                grad_as.append(grad_a)
        else:
            grad_xa = torch.cat(grad_xas, dim=1)
            grad_x = grad_xa @ torch.cat(a_s)
            grad_as = (grad_xa.t() @ flat).split([a.shape[0] for a in a_s])
        for layer, g in zip(ctx.layers, grads):  # grad_x is this backward's own: add in place, no copy
            grad_x = grad_x.addmm_(g, dequantizer(g.device)(layer, g.dtype))
        grad_bs = [g.t() @ xa_i for g, xa_i in zip(grads, xa.split([b.shape[1] for b in bs], dim=1))]
        grad_as = [master_grad_a(g, dropout, dtype) for g, dropout, dtype in zip(grad_as, dropouts, ctx.dtypes)]
        grad_bs = [master_grad_b(g, scaling, dtype)
                   for g, (scaling, _), dtype in zip(grad_bs, ctx.folds, ctx.dtypes[n:])]
        return None, None, grad_x.view_as(x), *grad_as, *grad_bs


class _SwiGLULora(torch.autograd.Function):
    """(gate, up, A, B) -> (act = silu(gate) * up, (dropout(act) @ A.t()) @ B.t() * scaling): SwiGLU and down_proj's
    adapter, keeping gate and up but not act. The update is fresh and contiguous, for `_GPTQMatmulPlus` to add the
    base matmul over."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                dropout: Dropout):
        ctx.dropout, ctx.scaling, ctx.dtypes = dropout, scaling, (a.dtype, b.dtype)
        a, b = used_a(a, dropout, gate.dtype), used_b(b, scaling, gate.dtype)
        act = swiglu(gate, up)
        act_a = dropped_matmul(act.view(-1, act.shape[-1]), a, dropout)
        ctx.save_for_backward(gate, up, a, b, act_a)
        return act, act_a.view(*act.shape[:-1], -1) @ b.t()  # matmul's own fold: not a view, so writable

    @staticmethod
    def backward(ctx, grad_act: torch.Tensor, grad_update: torch.Tensor):
        gate, up, a, b, act_a = ctx.saved_tensors
        grad_update = grad_update.reshape(-1, grad_update.shape[-1])
        grad_b = master_grad_b(grad_update.t() @ act_a, ctx.scaling, ctx.dtypes[1])
        grad_act_a = grad_update @ b
        flat = [t.reshape(-1, t.shape[-1]) for t in (gate, up, grad_act)]
        if on_kernels(gate):  # one pass; gate's and up's gradients written over them
            grad_gate, grad_up, grad_a = dropout_matmul.swiglu_lora_a_backward(*flat, grad_act_a, a, ctx.dropout)
            grad_gate, grad_up = grad_gate.view_as(gate), grad_up.view_as(up)
        else:
            flat_gate, flat_up, flat_grad_act = flat
            act = swiglu(flat_gate, flat_up)  # recomputed: an elementwise pass costs far less than keeping it
            grad_act, grad_a = lora_a_backward(flat_grad_act, act, grad_act_a, a, ctx.dropout)  # not in place
            del act
            grad_gate, grad_up = swiglu_backward(gate, up, grad_act.view_as(gate))
        return grad_gate, grad_up, master_grad_a(grad_a, ctx.dropout, ctx.dtypes[0]), grad_b, None, None


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
    """x @ W.t() + update in one cuBLAS call, written over `update` (a fresh contiguous product the caller made for
    this: in place, so no copy of it into a new output). Like GPTQLinear's own matmul it saves nothing (the
    backward dequantises again); the update's gradient is the output's, passed through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, update: torch.Tensor, layer: GPTQLinear) -> torch.Tensor:
        ctx.layer = layer
        ctx.mark_dirty(update)
        weight = dequantizer(x.device)(layer, x.dtype)
        update.view(-1, update.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
        return update

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = dequantizer(grad_output.device)(ctx.layer, grad_output.dtype)
        return grad_output @ weight, grad_output, None
