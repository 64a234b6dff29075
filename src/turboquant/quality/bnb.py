"""Reading a bitsandbytes artifact back: its quantization config and its stored bits per weight."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from turboquant.io.model import LazyCheckpoint
from turboquant.methods.bnb import QUANT_METHOD


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


def bnb_bits_per_weight(path: str | Path) -> float | None:
    """Stored bits per weight of the quantized linears: the codes plus what scales with them (block absmax,
    double quant's nested absmax, LLM.int8()'s per-row SCB): 4 + 8/64 + 32/16384 ~ 4.127 for NF4 / FP4 with double
    quant, 4.5 without, 8 + 32/in_features for int8. None when ``path`` is not a bitsandbytes checkpoint.

    4-bit weights are stored packed as uint8 (two codes a byte), int8 weights as int8 ``[out, in]``.
    """
    if artifact_quantization(path) is None:
        return None
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
