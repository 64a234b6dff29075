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
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
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


def load_quantized(model_dir: str | Path, cfg: BnbConfig, dtype: "torch.dtype | str" = torch.float32) -> nn.Module:
    """The model at ``model_dir`` loaded on CPU with its linears quantized by bitsandbytes (``dtype``: the rest)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map="cpu",
                                                quantization_config=quantization_config(cfg)).eval()


def save_artifact(model_dir: str | Path, cfg: BnbConfig, tmp: Path, aux_files: list[Path]) -> None:
    """Write the transformers bitsandbytes checkpoint of ``model_dir`` into the (temporary) directory ``tmp``.

    Non-quantized tensors keep the source dtype; tokenizer and license files are copied beside it.
    """
    model = load_quantized(model_dir, cfg, dtype="auto")
    model.save_pretrained(str(tmp))
    for f in aux_files:
        if not (tmp / f.name).exists():  # config.json / generation_config.json come from save_pretrained
            shutil.copyfile(f, tmp / f.name)


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
    @register_method(name, config_cls, description, kind="module", checkpoint=False)
    def solve(model: Any, cfg: BnbConfig) -> nn.Module:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"method '{name}' quantizes a loaded torch module, not a {type(model).__name__}",
                              f"call turboquant.quantize(model, method='{name}')")
        return swap_linears(model, cfg)


_register("bnb-int8", BnbInt8Config, "bitsandbytes LLM.int8() linears (transformers checkpoint)")
_register("bnb-nf4", BnbNf4Config, "bitsandbytes 4-bit NormalFloat + double quant (QLoRA base; transformers)")
_register("bnb-fp4", BnbFp4Config, "bitsandbytes 4-bit float + double quant (transformers checkpoint)")


# --- reading an artifact back: what validation reports -------------------------------------------------------------


def artifact_quantization(path: str | Path) -> dict[str, Any] | None:
    """The bitsandbytes ``quantization_config`` of a model directory, or None when it is not a bnb checkpoint."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        qc = json.loads(cfg_path.read_text()).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


_BYTES = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8}


#: Per-tensor constants of a bitsandbytes linear (code books, the serialized quant state, the int8 layout tag): a
#: fixed few hundred bytes each, whatever the layer's size, so they are left out of the bits per weight.
_FIXED_SUFFIXES = ("quant_map", "weight_format", "bitsandbytes__nf4", "bitsandbytes__fp4")


def artifact_bits(path: str | Path) -> float | None:
    """Stored bits per weight of the quantized linears: the codes plus what scales with them (block absmax,
    double quant's nested absmax, LLM.int8()'s per-row SCB): 4 + 8/64 + 32/16384 ~ 4.127 for NF4 / FP4 with double
    quant, 4.5 without, 8 + 32/in_features for int8. None when ``path`` is not a bitsandbytes checkpoint.

    4-bit weights are stored packed as uint8 (two codes a byte), int8 weights as int8 ``[out, in]``.
    """
    if artifact_quantization(path) is None:
        return None
    from turboquant.model import LazyCheckpoint

    infos = LazyCheckpoint.open(Path(path)).tensors
    n_weights, n_bytes = 0, 0
    for name, info in infos.items():
        if not name.endswith(".weight") or info.dtype not in ("U8", "I8"):
            continue
        module = name.removesuffix(".weight")
        n_weights += math.prod(info.shape) * (2 if info.dtype == "U8" else 1)
        for other, o in infos.items():
            if other.endswith(_FIXED_SUFFIXES):
                continue
            if other == name or other.startswith(name + ".") or other == f"{module}.SCB":
                n_bytes += math.prod(o.shape) * _BYTES.get(o.dtype, 4)
    return 8.0 * n_bytes / n_weights if n_weights else None
