"""AWQ "GEMM" checkpoints in AutoAWQ's layout (what transformers, GPTQModel, vLLM and mlx-lm's AWQ import read).

Per quantized linear ``M`` ``[out, in]`` with groups of ``g`` input columns (``G = in / g``):

* ``M.qweight`` int32 ``[in, out / 8]``: 4-bit codes packed along the *output* dimension, eight per word, word
  nibble ``i`` holding output column ``8k + AWQ_ORDER[i]`` (the interleave AutoAWQ's GEMM kernel expects);
* ``M.qzeros`` int32 ``[G, out / 8]``: integer zero points, packed the same way;
* ``M.scales`` float16 ``[G, out]``.

The weight is ``(code - zero) * scale``: codes, zeros and scales are copied from the canonical checkpoint, never
re-rounded. Symmetric codes are stored with their zero point (2**(bits-1)), which the layout holds exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.formats.base import (
    FormatError, refuse_experts, has_act_order, has_fractional_zero, register_format, write_packed_shards, source_config,
    uniform_scheme, write_json,
)
from turboquant.tensor import QuantizedTensor, QuantScheme

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def check(ckpt: QuantizedCheckpoint, options: dict[str, Any]) -> None:
    refuse_experts(ckpt, "awq", "transformers 5.23 + GPTQModel 7.6 leave per-expert AWQ tensors unloaded (the experts are fused 3-D parameters there, randomly initialised)")
    scheme = uniform_scheme(ckpt, "awq")
    if scheme.bits != 4:
        raise FormatError(f"the AWQ GEMM layout holds 4-bit codes only, not {scheme.bits}-bit",
                          "re-quantize with --bits 4, or export to gptq / gguf / mlx, which hold other widths")
    if scheme.group_size <= 0:
        raise FormatError(f"the AWQ GEMM layout needs groups along the input, not {scheme.describe()}",
                          "re-quantize with --group-size 128 (or 64 / 32)")
    if has_fractional_zero(ckpt):
        raise FormatError("the checkpoint has fractional zero points (HQQ), which the AWQ layout cannot store",
                          "re-quantize with --option integer_zero=true, or export to mlx (scale + bias)")
    if has_act_order(ckpt):
        raise FormatError("the checkpoint uses act-order groups (g_idx), which the AWQ layout cannot store",
                          "export it to gptq, or re-quantize GPTQ with --option static_groups=true")
    for module, info in ckpt.modules.items():
        if info["shape"][0] % 8:
            raise FormatError(f"{module} has {info['shape'][0]} outputs, not a multiple of 8 (AWQ packs 8 per word)",
                              "export it to gptq or gguf")


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """4-bit values ``[rows, cols]`` → int32 ``[rows, cols / 8]`` in AutoAWQ's interleaved nibble order."""
    rows, cols = values.shape
    v = values.to(torch.int64).reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    words = (v << (torch.arange(8, dtype=torch.int64) * 4)).sum(-1)
    return words.to(torch.uint32).view(torch.int32)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_awq``: uint8 values ``[rows, cols]``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nibbles = (w.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * 4)) & 0xF
    out = torch.empty_like(nibbles)
    out[..., list(AWQ_ORDER)] = nibbles
    return out.reshape(words.shape[0], -1).to(torch.uint8)


def pack_module(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    return {
        "qweight": pack_awq(qt.codes.t()),
        "qzeros": pack_awq(qt.zero.t()),
        "scales": qt.scale.t().to(torch.float16).contiguous(),
    }


def quantization_config(scheme: QuantScheme) -> dict[str, Any]:
    return {"quant_method": "awq", "version": "gemm", "bits": scheme.bits, "group_size": scheme.group_size,
            "zero_point": True, "modules_to_not_convert": None}


@register_format("awq", description="AutoAWQ GEMM layout (int32 qweight [in, out/8], interleaved nibbles)",
                 runtime="transformers + GPTQModel, vLLM, mlx-lm (AWQ import)", check=check)
def write(ckpt: QuantizedCheckpoint, out: Path, options: dict[str, Any]) -> None:
    scheme = uniform_scheme(ckpt, "awq")
    write_packed_shards(ckpt, out, pack_module)
    config = source_config(ckpt)
    config["quantization_config"] = quantization_config(scheme)
    write_json(out / "config.json", config)
