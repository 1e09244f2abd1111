"""GPTQLinear: a frozen GPTQ-quantised linear layer that passes gradients to its input.

The autograd Function saves nothing but references to the packed tensors the layer already holds: its
backward dequantises the weight again instead of keeping a dense copy alive between forward and backward.
That is what lets a 70B model train with LoRA in the memory of its 4-bit weights. The weight gets no
gradient (it is frozen; LoRA trains beside it), so the input activation need not be saved either.

The packed tensors are frozen parameters (requires_grad=False), not buffers: FSDP2 shards parameters, so under
`fully_shard` each GPU keeps its slice and the layer reads the gathered tensors through the same attributes
during forward and backward. DDP all-reduces only parameters that need a gradient, so it leaves them alone.

Dequantisation goes through `dequantizer(device)`: the one seam where GPU kernels plug in. The plain-torch
reference in `format.dequantize` serves the CPU and defines the exact result every kernel must match. On a GPU,
a forward of at most FUSED_MAX_TOKENS[bits] tokens (decoding) skips the dense weight altogether: the fused
kernel (`triton_gemv`) multiplies straight from the packed tensors, with the same weight values.
"""

import torch
from torch import nn

from . import format as gptq_format
from .format import GPTQConfig

PACKED_TENSORS = ("qweight", "qzeros", "scales", "g_idx")  # frozen parameters, so that FSDP2 shards them
BITS_AS_FLOAT = {torch.int32: torch.float32, torch.int64: torch.float64}  # same width: a view, not a copy
# Per bit width, the token count up to which a CUDA forward multiplies from the packed weights (triton_gemv) instead
# of dequantising for cuBLAS: the largest count measured faster at Llama-2-70B shapes on an H100 (BENCHMARKS.md:
# 4-bit faster at 1-64 tokens, slower at 128; 3-bit faster at 1, slower at 64). 2- and 8-bit are not measured
# (no Meditron branch has them), so they keep the dequantise path.
FUSED_MAX_TOKENS = {4: 64, 3: 1}


def dequantizer(device: torch.device):
    """The dequantise function for tensors on `device`: (layer, dtype) -> dense weight [O, I]."""
    if device.type == "cuda":
        from .triton_dequant import dequantize_triton  # imported lazily: CI has neither GPU nor Triton
        return dequantize_triton
    return reference_dequantize


def reference_dequantize(layer: "GPTQLinear", dtype: torch.dtype) -> torch.Tensor:
    return gptq_format.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits,
                                  layer.checkpoint_format, dtype)


class _GPTQMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "GPTQLinear") -> torch.Tensor:
        ctx.layer = layer  # the module, not a tensor: nothing is saved for backward
        if x.device.type == "cuda" and x.numel() <= FUSED_MAX_TOKENS.get(layer.bits, 0) * layer.in_features:
            from .triton_gemv import fused_matmul
            return fused_matmul(x, layer)
        weight = dequantizer(x.device)(layer, x.dtype)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = dequantizer(grad_output.device)(ctx.layer, grad_output.dtype)
        return grad_output @ weight, None


class GPTQLinear(nn.Linear):
    """A GPTQ linear layer. It subclasses nn.Linear (without allocating a dense weight) so that PEFT,
    unchanged, wraps it with LoRA; PEFT finds its device through `qweight`."""

    def __init__(self, in_features: int, out_features: int, config: GPTQConfig, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float16):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = config.bits, config.group_size, config.checkpoint_format
        shapes = gptq_format.expected_shapes(config, in_features, out_features)
        self.set_packed(qweight=torch.zeros(shapes["qweight"], dtype=torch.int32, device=device),
                        qzeros=torch.zeros(shapes["qzeros"], dtype=torch.int32, device=device),
                        scales=torch.zeros(shapes["scales"], dtype=torch.float16, device=device),
                        g_idx=gptq_format.default_g_idx(in_features, config.group_size, device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_parameter("weight", None)  # no dense weight; PEFT reads `.weight` of every nn.Linear

    # No __setattr__ of its own: FSDP2 swaps every parameter in and out at each gather and free, through
    # nn.Module's own __setattr__ only (torch's `unsafe_setattr_param`; any override takes its slow path: 112 calls
    # a decoder layer a step, ~0.17 s a step at 80 layers on the host, 2 x H200 profile). Hence `set_packed`.
    def set_packed(self, **tensors: torch.Tensor) -> None:
        """Hold these packed tensors (qweight=..., scales=...) as the layer's frozen parameters."""
        for name, tensor in tensors.items():
            if name not in PACKED_TENSORS:
                raise ValueError(f"{name} is not a GPTQ packed tensor ({', '.join(PACKED_TENSORS)})")
            self._parameters[name] = nn.Parameter(tensor, requires_grad=False)

    def __getattr__(self, name: str):
        value = super().__getattr__(name)  # parameters live in _parameters: every read of one comes here
        int_dtypes = self.__dict__.get("int_dtypes")
        if int_dtypes and name in int_dtypes and value.dtype != int_dtypes[name]:
            return value.view(int_dtypes[name])  # held as float bits (hold_ints_as_floats): the integers again
        return value

    def hold_ints_as_floats(self) -> None:
        """Keep the integer packed tensors as float tensors of the same bits (a view, no copy), read back as integers.
        For FSDP2: torch 2.11's `fully_shard` makes every sharded parameter require a gradient, which an integer
        tensor cannot (bitsandbytes' FSDP-QLoRA stores its 4-bit weights in a float dtype for the same reason)."""
        self.int_dtypes = {}
        for name in PACKED_TENSORS:
            tensor = self._parameters[name]
            if tensor.dtype in BITS_AS_FLOAT:
                self.int_dtypes[name] = tensor.dtype
                self._parameters[name] = nn.Parameter(tensor.detach().view(BITS_AS_FLOAT[tensor.dtype]),
                                                      requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _GPTQMatmul.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] this layer computes with (used by merge and export)."""
        return reference_dequantize(self, dtype or self.scales.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
