"""bitsandbytes: LLM.int8() and 4-bit NF4 / FP4 linears, loaded, saved and reloaded through transformers.

Dettmers et al., 2022, "LLM.int8()" (arXiv:2208.07339): int8 weights with a per-row absmax (``SCB``), outlier
input features above ``threshold`` computed in float. Dettmers et al., 2023, "QLoRA" (arXiv:2305.14314): 4-bit
NormalFloat (or FP4) codes in blocks of 64 with a float absmax per block; ``double_quant`` quantizes those absmax
values again to 8 bits in blocks of 256 (about 0.37 fewer bits per weight), the QLoRA default kept here.

The artifact is a transformers checkpoint: ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` then
``save_pretrained``; ``config.json`` carries the ``quantization_config`` that makes any transformers install reload
it (CPU included, bitsandbytes >= 0.48). transformers keeps ``lm_head`` in float, as QLoRA does. A module that is
not a transformers model has its ``nn.Linear`` layers swapped for bitsandbytes' in memory (``swap_linears``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from turboquant.errors import ConfigError
from turboquant.methods.base import MethodConfig, check_type, register_method

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
QUANT_METHOD = "bitsandbytes"


@dataclass(frozen=True)
class BnbInt8Config(MethodConfig):
    """LLM.int8(): ``threshold`` is the input magnitude above which a feature is computed in float."""

    threshold: float = 6.0

    def __post_init__(self) -> None:
        check_type("threshold", self.threshold, (int, float), "use a number >= 0, e.g. 6.0")
        if self.threshold < 0:
            raise ConfigError(f"threshold={self.threshold} is negative", "use a number >= 0, e.g. 6.0")


@dataclass(frozen=True)
class Bnb4bitConfig(MethodConfig):
    """4-bit bitsandbytes linears: ``double_quant`` re-quantizes the block absmax values; ``compute_dtype`` is the
    dtype the dequantized weights are multiplied in."""

    double_quant: bool = True
    compute_dtype: str = "float32"
    quant_type = ""  # class attribute, set by the subclasses (not a config key)

    def __post_init__(self) -> None:
        check_type("double_quant", self.double_quant, bool, "use true or false")
        check_type("compute_dtype", self.compute_dtype, str, f"use one of {list(COMPUTE_DTYPES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype={self.compute_dtype!r} is not supported",
                              f"use one of {list(COMPUTE_DTYPES)}")


@dataclass(frozen=True)
class BnbNf4Config(Bnb4bitConfig):
    """4-bit NormalFloat (QLoRA's data type for normally distributed weights)."""

    quant_type = "nf4"


@dataclass(frozen=True)
class BnbFp4Config(Bnb4bitConfig):
    """4-bit float (1 sign, 2 exponent, 1 mantissa bit)."""

    quant_type = "fp4"


BnbConfig = BnbInt8Config | Bnb4bitConfig


def quantization_config(cfg: BnbConfig):
    """The transformers ``BitsAndBytesConfig`` for ``cfg``."""
    from transformers import BitsAndBytesConfig

    if isinstance(cfg, BnbInt8Config):
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(cfg.threshold))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype))


def swap_linears(model: nn.Module, cfg: BnbConfig) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by bitsandbytes' ``Linear8bitLt`` / ``Linear4bit``."""
    import bitsandbytes as bnb

    model = copy.deepcopy(model).eval()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    if not targets:
        raise ConfigError("the model has no nn.Linear to quantize", "pass a model with Linear layers")
    for name, lin in targets:
        W = lin.weight.detach().float().clone()
        if isinstance(cfg, BnbInt8Config):
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      has_fp16_weights=False, threshold=float(cfg.threshold))
            new.weight = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=getattr(torch, cfg.compute_dtype),
                                    compress_statistics=cfg.double_quant, quant_type=cfg.quant_type)
            new.weight = bnb.nn.Params4bit(W, requires_grad=False, compress_statistics=cfg.double_quant,
                                           quant_type=cfg.quant_type)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach().float().clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new.to("cpu"))
    return model


def _register(name: str, config_cls: type[MethodConfig], description: str) -> None:
    @register_method(name, config_cls, description, kind="transformers", checkpoint=False, devices=("cuda", "cpu"))
    def solve(model: Any, cfg: BnbConfig) -> nn.Module:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"method '{name}' quantizes a loaded torch module, not a {type(model).__name__}",
                              f"call turboquant.quantize(model, method='{name}')")
        return swap_linears(model, cfg)


_register("bnb-int8", BnbInt8Config, "bitsandbytes LLM.int8() linears (transformers checkpoint)")
_register("bnb-nf4", BnbNf4Config, "bitsandbytes 4-bit NormalFloat + double quant (QLoRA base; transformers)")
_register("bnb-fp4", BnbFp4Config, "bitsandbytes 4-bit float + double quant (transformers checkpoint)")




