"""fp16 / bf16: plain dtype casts of every floating-point tensor — the lossless-ish baselines."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turboquant.methods.base import MethodConfig, register_method


@dataclass(frozen=True)
class Fp16Config(MethodConfig):
    """Cast weights to IEEE float16 (values beyond ±65504 saturate)."""


@dataclass(frozen=True)
class Bf16Config(MethodConfig):
    """Cast weights to bfloat16 (float32's range, 8 bits of mantissa)."""


def _cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not weight.is_floating_point():
        return weight
    if dtype == torch.float16:
        limit = torch.finfo(torch.float16).max
        weight = weight.float().clamp(-limit, limit)
    return weight.to(dtype)


@register_method("fp16", Fp16Config, "cast to float16 (2 bytes/weight, baseline)", kind="cast")
def cast_fp16(weight: torch.Tensor, cfg: Fp16Config) -> torch.Tensor:
    return _cast(weight, torch.float16)


@register_method("bf16", Bf16Config, "cast to bfloat16 (2 bytes/weight, baseline)", kind="cast")
def cast_bf16(weight: torch.Tensor, cfg: Bf16Config) -> torch.Tensor:
    return _cast(weight, torch.bfloat16)
