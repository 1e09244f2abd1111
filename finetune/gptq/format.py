"""The GPTQ checkpoint format: its config, and packing / unpacking / dequantising its integer tensors.

Tensors of one quantised linear (AutoGPTQ and gptqmodel; in_features = I, out_features = O, G groups):
    qweight  int32 [I * bits / 32, O]   quantised weights, packed along the input dim
    qzeros   int32 [G, O * bits / 32]   zero points, packed along the output dim
    scales   fp16  [G, O]
    g_idx    int32 [I]                  group of each input row; under act-order a shuffled row // group_size
Packing is a little-endian bit stream: in each run of `bits` int32 words, value k (0..31) occupies bits
[bits*k, bits*k + bits), so 3-bit values can straddle two words. checkpoint_format "gptq" (v1, every
TheBloke branch) stores zero - 1; "gptq_v2" stores the zero itself.

    W[o, i] = (q[i, o] - zero[g_idx[i], o]) * scale[g_idx[i], o]
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_FORMATS = ("gptq", "gptq_v2")


class GPTQFormatError(ValueError):
    """A checkpoint this toolkit cannot load; the message names the cause and the fix."""


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int  # -1: one group spanning all input rows
    desc_act: bool = False  # act-order: rows quantised by decreasing activation, g_idx shuffled
    sym: bool = True
    checkpoint_format: str = "gptq"
    lm_head: bool = False  # whether lm_head is quantised too

    @classmethod
    def from_dict(cls, raw: dict, origin: str) -> "GPTQConfig":
        method = str(raw.get("quant_method", "gptq")).lower()
        if method != "gptq":
            raise GPTQFormatError(f"{origin}: quant_method is {method!r}; this toolkit loads GPTQ checkpoints only "
                                  "(pick a GPTQ branch, e.g. TheBloke/meditron-70B-GPTQ)")
        bits = raw.get("bits")
        if bits not in SUPPORTED_BITS:
            raise GPTQFormatError(f"{origin}: bits={bits} is not supported; GPTQ bits must be one of "
                                  f"{', '.join(map(str, SUPPORTED_BITS))}")
        group_size = raw.get("group_size", -1)
        if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
            raise GPTQFormatError(f"{origin}: group_size={group_size!r} is invalid; use -1 (one group) or a "
                                  "positive row count such as 128")
        fmt = raw.get("checkpoint_format") or raw.get("format") or "gptq"
        if fmt not in SUPPORTED_FORMATS:
            raise GPTQFormatError(f"{origin}: checkpoint_format={fmt!r} is not supported; use one of "
                                  f"{', '.join(SUPPORTED_FORMATS)} (convert others with gptqmodel first)")
        return cls(bits=bits, group_size=group_size, desc_act=bool(raw.get("desc_act", False)),
                   sym=bool(raw.get("sym", True)), checkpoint_format=fmt, lm_head=bool(raw.get("lm_head", False)))

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)


def read_gptq_config(model_dir: str | Path) -> GPTQConfig:
    """The checkpoint's GPTQ settings: config.json's quantization_config, else quantize_config.json."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise GPTQFormatError(f"{model_dir}: no config.json; point to a model directory or Hub repo id")
    raw = json.loads(config_path.read_text()).get("quantization_config")
    origin = str(config_path)
    if raw is None and (model_dir / "quantize_config.json").is_file():
        origin = str(model_dir / "quantize_config.json")
        raw = json.loads(Path(origin).read_text())
    if raw is None:
        raise GPTQFormatError(f"{model_dir}: no quantization_config in config.json and no quantize_config.json; "
                              "this is not a GPTQ checkpoint (load it with transformers directly)")
    return GPTQConfig.from_dict(raw, origin)


def _packed_words(n_values: int, bits: int) -> int:
    return -(-n_values * bits // 32)


def unpack(packed: torch.Tensor, bits: int, n_values: int) -> torch.Tensor:
    """int32 words [W, M] packed along dim 0 → int32 values [n_values, M] in [0, 2**bits)."""
    runs = -(-n_values // 32)
    words = packed
    if words.shape[0] < runs * bits:  # pad to whole runs of 32 values
        words = torch.nn.functional.pad(words, (0, 0, 0, runs * bits - words.shape[0]))
    words = words.reshape(runs, bits, -1)
    mask = (1 << bits) - 1
    values = []
    for k in range(32):
        word, shift = divmod(bits * k, 32)
        low_bits = min(bits, 32 - shift)
        value = (words[:, word] >> shift) & ((1 << low_bits) - 1)  # the mask drops arithmetic-shift sign bits
        if low_bits < bits:  # straddles into the next word (3-bit only)
            value |= (words[:, word + 1] << low_bits) & mask
        values.append(value)
    return torch.stack(values, dim=1).reshape(runs * 32, -1)[:n_values]


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `unpack`: int values [N, M] in [0, 2**bits) → int32 words [ceil(N * bits / 32), M]."""
    n_values = values.shape[0]
    runs = -(-n_values // 32)
    values = torch.nn.functional.pad(values.to(torch.int32), (0, 0, 0, runs * 32 - n_values))
    values = values.reshape(runs, 32, -1)
    words = torch.zeros(runs, bits, values.shape[-1], dtype=torch.int32, device=values.device)
    for k in range(32):
        word, shift = divmod(bits * k, 32)
        words[:, word] |= values[:, k] << shift  # int32 shifts wrap: the bit pattern is what counts
        if shift + bits > 32:
            words[:, word + 1] |= values[:, k] >> (32 - shift)
    return words.reshape(runs * bits, -1)[:_packed_words(n_values, bits)]


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str) -> torch.Tensor:
    """Zero points [G, O] as integers, with v1's stored-minus-one undone."""
    zeros = unpack(qzeros.t(), bits, out_features).t()
    return zeros + 1 if checkpoint_format == "gptq" else zeros


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int, checkpoint_format: str = "gptq", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight [O, I] (nn.Linear layout) in `dtype` (default: scales' dtype).

    (q - zero) is a small integer and scale an fp16, so their product is exact in fp32; rounding it to the
    scales' fp16 gives the same bits as gptqmodel's fp16 arithmetic. That fp16 weight is what the checkpoint
    means (every GPTQ kernel computes it), so it is cast on to `dtype` from there: fp32 holds it exactly."""
    in_features, out_features = g_idx.shape[0], scales.shape[1]
    q = unpack(qweight, bits, in_features)
    zeros = unpack_zeros(qzeros, bits, out_features, checkpoint_format)
    groups = g_idx.long()
    weight = (q - zeros[groups]).to(torch.float32) * scales[groups].to(torch.float32)
    return weight.t().to(scales.dtype).to(dtype or scales.dtype)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """g_idx of a checkpoint without act-order: row // group_size."""
    rows = torch.arange(in_features, dtype=torch.int32, device=device)
    return rows // group_size if group_size != -1 else torch.zeros_like(rows)


def expected_shapes(config: GPTQConfig, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one quantised linear's tensors, to validate a checkpoint before reading its data."""
    groups = config.n_groups(in_features)
    return {"qweight": (_packed_words(in_features, config.bits), out_features),
            "qzeros": (groups, _packed_words(out_features, config.bits)),
            "scales": (groups, out_features),
            "g_idx": (in_features,)}
