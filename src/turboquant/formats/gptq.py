"""GPTQ checkpoints in the AutoGPTQ / GPTQModel layout (what transformers, GPTQModel, vLLM and ExLlama load).

Per quantized linear ``M`` ``[out, in]`` with ``G`` groups:

* ``M.qweight`` int32 ``[in * bits / 32, out]``: codes packed along the input dimension, least significant bits
  first, as one continuous bit stream per output column (so 3-bit codes straddle words, as AutoGPTQ does);
* ``M.qzeros`` int32 ``[G, out * bits / 32]``: zero points packed the same way along the output dimension,
  stored as ``zero - 1`` in the original ("v1", ``checkpoint_format: gptq``) layout, as ``zero`` in ``gptq_v2``;
* ``M.scales`` float16 ``[G, out]``; ``M.g_idx`` int32 ``[in]``: the group of each input column (act-order).

The weight is ``(code - zero) * scale`` exactly as in the canonical checkpoint: codes, zeros and scales are
copied, never re-rounded. Other tensors keep their names and dtypes. config.json gains ``quantization_config``
and ``quantize_config.json`` is written beside it (older loaders read that one).

Mixed precision (a scheme per module): ``bits`` / ``group_size`` / ``sym`` are the most common scheme's, and every
module with another scheme gets a GPTQModel ``dynamic`` override keyed by its exact name,
``{"+:^model\\.layers\\.0\\.mlp\\.down_proj$": {"bits": 8, "group_size": 128, "sym": true}}``, which GPTQModel's
loader (``GPTQModel.load``) and vLLM apply per layer. transformers' own GPTQ path (through optimum) ignores
``dynamic`` and cannot load such a checkpoint.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.formats.base import (
    FormatError, refuse_experts, has_fractional_zero, register_format, schemes, write_packed_shards, source_config, write_json,
)
from turboquant.tensor import PER_TENSOR, QuantizedTensor, QuantScheme, pack_words

GPTQ_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def check(ckpt: QuantizedCheckpoint, options: dict[str, Any]) -> None:
    refuse_experts(ckpt, "gptq", "transformers 5.23 + GPTQModel 7.6 leave per-expert GPTQ tensors unloaded (the experts are fused 3-D parameters there, randomly initialised)")
    found = schemes(ckpt)
    if not found:
        raise FormatError(f"{ckpt.path} holds no quantized weights (method '{ckpt.method}')",
                          "quantize with a weight method (rtn, gptq, awq, hqq) before exporting to gptq")
    for scheme in sorted(found, key=lambda s: s.bits):
        if scheme.bits in GPTQ_BITS:
            continue
        if len(found) > 1:
            raise FormatError(f"the GPTQ layout holds {', '.join(map(str, GPTQ_BITS))}-bit codes and this "
                              f"mixed-precision checkpoint has {scheme.bits}-bit layers",
                              "re-quantize with --candidate-bits 2,3,4,8, or export to mlx / compressed-tensors")
        raise FormatError(f"the GPTQ layout holds {', '.join(map(str, GPTQ_BITS))}-bit codes, not {scheme.bits}-bit",
                          "re-quantize with --bits 4 (or 2, 3, 8), or export to gguf / mlx")
    if has_fractional_zero(ckpt):
        raise FormatError("the checkpoint has fractional zero points (HQQ), which the GPTQ layout cannot store",
                          "re-quantize with --option integer_zero=true, or export to mlx (scale + bias)")
    fmt = options["checkpoint_format"]
    if fmt not in CHECKPOINT_FORMATS:
        raise FormatError(f"checkpoint_format={fmt!r} is not a GPTQ layout", f"use one of {CHECKPOINT_FORMATS}")
    for module, info in ckpt.modules.items():
        out_f, in_f = info["shape"]
        bits = ckpt.scheme(module).bits
        for what, n in (("input", in_f), ("output", out_f)):
            if (n * bits) % 32:
                raise FormatError(f"{module} has {n} {what} features, which {bits}-bit codes do not pack "
                                  "into whole 32-bit words", "export to gguf or mlx, or use 4-bit codes")
    if fmt == "gptq" and not getattr(ckpt, "planned", False):  # needs the codes
        for module in (m for m in ckpt.modules if not ckpt.scheme(m).symmetric):
            zero = ckpt.tensors.load([f"{module}.qzero"])[f"{module}.qzero"]
            if bool((zero == 0).any()):
                raise FormatError(
                    f"{module} has zero points equal to 0, which the v1 GPTQ layout (it stores zero - 1) cannot hold",
                    "pass --option checkpoint_format=gptq_v2, or quantize symmetrically (--sym)",
                )


def pack_module(qt: QuantizedTensor, v1: bool) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of one linear (names relative to the module)."""
    bits = qt.scheme.bits
    scale, zero = qt.scale, qt.zero
    if qt.scheme.group_size == PER_TENSOR:  # one scale per tensor is one scale per channel, repeated
        scale, zero = scale.expand(qt.shape[0], 1), zero.expand(qt.shape[0], 1)
    stored_zero = zero.to(torch.int32) - (1 if v1 else 0)
    return {
        "qweight": pack_words(qt.codes, bits).t().contiguous(),
        "qzeros": pack_words((stored_zero & ((1 << bits) - 1)).t().contiguous(), bits),
        "scales": scale.t().to(torch.float16).contiguous(),
        "g_idx": qt.group_index().to(torch.int32),
    }


def main_scheme(ckpt: QuantizedCheckpoint) -> QuantScheme:
    """The scheme most modules use (ties: the narrowest): the config's top-level scheme."""
    counts = Counter(ckpt.scheme(m) for m in ckpt.modules)
    return max(sorted(counts, key=lambda s: (s.bits, s.group_size, s.symmetric)), key=lambda s: counts[s])


def _scheme_keys(scheme: QuantScheme) -> dict[str, Any]:
    return {"bits": scheme.bits, "group_size": scheme.group_size if scheme.group_size > 0 else -1,
            "sym": scheme.symmetric}


def dynamic_overrides(ckpt: QuantizedCheckpoint, main: QuantScheme) -> dict[str, dict[str, Any]]:
    """GPTQModel ``dynamic`` entries (exact-name patterns) for the modules whose scheme is not ``main``."""
    return {f"+:^{re.escape(m)}$": _scheme_keys(ckpt.scheme(m))
            for m in sorted(ckpt.modules) if ckpt.scheme(m) != main}


def quantization_config(scheme: QuantScheme, ckpt: QuantizedCheckpoint, checkpoint_format: str) -> dict[str, Any]:
    meta_cfg = ckpt.meta.get("config", {})
    meta_cfg = {**meta_cfg, **meta_cfg.get("base_options", {})}  # mixed precision: the base method's options
    act_order = any(info.get("act_order") for info in ckpt.modules.values())
    dynamic = dynamic_overrides(ckpt, scheme)
    return {
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        **_scheme_keys(scheme),
        "desc_act": act_order,
        **({"dynamic": dynamic} if dynamic else {}),
        "static_groups": bool(meta_cfg.get("static_groups", False)),
        "true_sequential": bool(meta_cfg.get("true_sequential", True)),
        "damp_percent": meta_cfg.get("damp_percent", 0.01),
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"turboquant:{ckpt.meta.get('turboquant_version')}"],
                 "method": ckpt.method},
    }


@register_format("gptq", description="AutoGPTQ / GPTQModel layout (int32 qweight, qzeros, scales, g_idx)",
                 runtime="transformers + GPTQModel, vLLM, ExLlama", check=check,
                 options={"checkpoint_format": "gptq"})
def write(ckpt: QuantizedCheckpoint, out: Path, options: dict[str, Any]) -> None:
    v1 = options["checkpoint_format"] == "gptq"
    scheme = main_scheme(ckpt)
    write_packed_shards(ckpt, out, lambda qt: pack_module(qt, v1))
    qcfg = quantization_config(scheme, ckpt, options["checkpoint_format"])
    config = source_config(ckpt)
    config["quantization_config"] = qcfg
    write_json(out / "config.json", config)
    write_json(out / "quantize_config.json", qcfg)
