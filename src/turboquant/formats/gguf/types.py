"""GGUF type facts and the per-tensor plan: which GGUF type each tensor gets, and by which route.

Shared by the format check (before any work) and the writer. See ``formats.gguf.write`` for the routes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from turboquant.formats.base import FormatError
from turboquant.formats.gguf import model as gguf_model
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.tensor import PER_CHANNEL, PER_TENSOR, QuantScheme
BLOCK = 32


#: GGUF block types that hold a scheme's codes exactly: type → (bits, symmetric).
NATIVE: dict[str, tuple[int, bool]] = {"Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True),
                                       "Q5_1": (5, False), "Q8_0": (8, True)}


FLOAT_TYPES = ("F32", "F16", "BF16")


#: Types gguf-py quantizes itself (from float weights).
PY_TYPES = FLOAT_TYPES + ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


#: llama.cpp's K-quant mixes (``LLAMA_FTYPE_MOSTLY_*``), quantized by llama.cpp through llama-cpp-python.
K_QUANTS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")


TYPES = PY_TYPES + K_QUANTS


IMATRIX_FILE = "imatrix.gguf"


NO_IMATRIX = "none"


CONVERSIONS = {
    "pack": "quantized codes packed unchanged into GGUF blocks (Q4_1/Q5_1 mins rounded to float16)",
    "gguf-py": "float weights quantized by gguf-py (gguf.quants)",
    "dequantize": "quantized weights dequantized to float",
    "llama.cpp": "float weights (dequantized, for a quantized checkpoint) re-quantized by llama.cpp's "
                 "llama_model_quantize with an importance matrix",
}


def native_fit(scheme: QuantScheme, in_features: int, expand_groups: bool = False) -> str | None:
    """The GGUF block type holding ``scheme``'s codes exactly (contiguous groups assumed), or None.

    Groups of exactly 32 are blocks. Larger groups (a multiple of 32, per-channel, per-tensor) fit too when
    ``expand_groups`` is set: each block then repeats its group's scale, which keeps every code and scale exact.
    """
    fits = [t for t, (bits, sym) in NATIVE.items() if bits == scheme.bits and sym == scheme.symmetric]
    if not fits or in_features % BLOCK:
        return None
    g = scheme.group_size
    if g == BLOCK:
        return fits[0]
    whole_blocks = (g > 0 and g % BLOCK == 0) or g in (PER_CHANNEL, PER_TENSOR)
    return fits[0] if whole_blocks and expand_groups else None


def _describe_native(t: str) -> str:
    bits, sym = NATIVE[t]
    return (f"{t} holds {bits}-bit {'symmetric' if sym else 'asymmetric'} codes in blocks of {BLOCK} along the "
            f"input dimension (groups of {BLOCK}; larger contiguous groups with expand_groups=true)")


@dataclass(frozen=True)
class Target:
    """The resolved export: the file's type name, the route, and the type of each quantized module."""

    name: str
    route: str
    module_types: dict[str, str]


def _module_fits(ckpt: QuantizedCheckpoint, expand_groups: bool) -> dict[str, str | None]:
    fits: dict[str, str | None] = {}
    for module, info in ckpt.modules.items():
        fit = native_fit(ckpt.scheme(module), int(info["shape"][1]), expand_groups)
        if fit and info.get("act_order") and not _contiguous_groups(ckpt, module):
            fit = None
        fits[module] = fit
    return fits


def _contiguous_groups(ckpt: QuantizedCheckpoint, module: str) -> bool:
    if getattr(ckpt, "planned", False):  # a plan's act-order (dynamic groups) permutes columns
        return False
    qt = ckpt.quantized_tensor(module)
    g = qt.scheme.group_size
    natural = torch.arange(qt.shape[1]) // g if g > 0 else torch.zeros(qt.shape[1], dtype=torch.long)
    return bool(torch.equal(qt.group_index(), natural))


def resolve_target(ckpt: QuantizedCheckpoint, options: dict[str, Any]) -> Target:
    """Validate ``gguf_type`` against the checkpoint; raise ``FormatError`` naming what would fit."""
    requested = options.get("gguf_type")
    requested = None if requested in (None, "", "auto") else str(requested).upper()
    if requested is not None and requested not in TYPES:
        raise FormatError(f"gguf_type {requested!r} is not a GGUF type this exporter writes",
                          f"use one of {', '.join(TYPES)}")
    if not ckpt.modules:  # a float (cast) checkpoint
        name = requested or {"bf16": "BF16"}.get(ckpt.method, "F16")
        route = "llama.cpp" if name in K_QUANTS else "gguf-py"
        return Target(name, route, {})
    if requested in K_QUANTS:
        return Target(requested, "llama.cpp", {})
    if requested in FLOAT_TYPES:
        return Target(requested, "dequantize", {})
    expand = bool(options.get("expand_groups"))
    fits = _module_fits(ckpt, expand)
    unfit = sorted(m for m, t in fits.items() if t is None or (requested and t != requested))
    if unfit:
        module = unfit[0]
        desc = ckpt.scheme(module).describe()
        act = " with act-order groups" if ckpt.modules[module].get("act_order") else ""
        fit = fits[module]
        expanded = None if expand else _module_fits(ckpt, True)[module]
        expandable = expanded is not None and fit is None and requested in (None, expanded)
        if requested is None:
            problem = f"{module} is {desc}{act}, which no GGUF block type holds exactly as it is"
        else:
            problem = f"{_describe_native(requested)}; {module} is {desc}{act}"
        if fit:
            fix = f"use --gguf-type {fit} (holds these codes exactly)"
        elif expandable:
            fix = (f"pass --option expand_groups=true to write {expanded} with each group's scale repeated over its "
                   f"blocks of {BLOCK} (exact: codes and scales kept), re-quantize with --group-size {BLOCK}, or use "
                   "a K-quant such as --gguf-type Q4_K_M --option calib=CALIB")
        else:
            fix = ("use a K-quant such as --gguf-type Q4_K_M --option calib=CALIB (re-quantized by llama.cpp from "
                   "the dequantized weights) or F16, or re-quantize with --group-size 32 and 4, 5 or 8 bits "
                   "(--sym for Q4_0/Q5_0/Q8_0)")
        if requested and len(set(fits.values())) > 1 and None not in fits.values():
            fix = "drop --gguf-type (auto): each tensor of this mixed-precision checkpoint keeps its own native type"
        elif len({ckpt.scheme(m) for m in ckpt.modules}) > 1 and not fit and not expandable:
            fix = ("mixed precision maps onto GGUF's per-tensor types only with widths 4, 5 and 8: re-quantize with "
                   "--candidate-bits 4,5,8 --group-size 32 --sym (Q4_0 / Q5_0 / Q8_0 per tensor), or " + fix[:1].lower()
                   + fix[1:].split(", or re-quantize")[0])
        raise FormatError(problem, fix)
    types = {m: str(t) for m, t in fits.items()}
    # the file type of a per-tensor mix is its dominant type (llama.cpp's convention for mixed files)
    name = requested or Counter(types.values()).most_common(1)[0][0]
    return Target(name, "pack", types)


@dataclass
class TensorPlan:
    """One GGUF tensor: its source (an HF tensor or a quantized module), GGUF name and type."""

    hf_name: str
    gguf_name: str
    qtype: str
    shape: tuple[int, ...]
    file: str  # the canonical shard holding it: tensors are written shard by shard
    module: str | None = None  # set for quantized modules (their ``.weight``)
    row_order: np.ndarray | None = None  # q/k rows permuted for llama.cpp's RoPE
    shift: float = 0.0  # added to a float tensor (Gemma's 1 + w norms)

    def info(self) -> tuple[tuple[int, ...], np.dtype, int]:
        """The numpy shape, dtype and byte size gguf-py's writer expects (uint8 bytes for block types)."""
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[ggml_type(self.qtype)]
        nbytes = int(np.prod(self.shape)) // block * type_size
        if self.qtype in ("F32", "F16"):
            return self.shape, np.dtype(np.float32 if self.qtype == "F32" else np.float16), nbytes
        return (*self.shape[:-1], self.shape[-1] // block * type_size), np.dtype(np.uint8), nbytes


def _float_type(dtype_name: str) -> str:
    """Float tensors of a packed export: F16 as llama.cpp's converter writes them, BF16 kept as BF16."""
    return "BF16" if dtype_name in ("BF16", "bfloat16") else "F16"


def _exact_float_type(dtype_name: str) -> str:
    """The float type holding a stored tensor without rounding (for llama.cpp's quantizer input)."""
    return {"BF16": "BF16", "bfloat16": "BF16", "F16": "F16", "float16": "F16"}.get(dtype_name, "F32")


def plan_tensors(ckpt: QuantizedCheckpoint, target: Target, intermediate: bool = False) -> list[TensorPlan]:
    """Every GGUF tensor in writing order (shard file by shard file), with its type under ``target``'s route."""
    names = gguf_model.NameMap(ckpt.config)
    entries: list[tuple[str, str, str | None, tuple[int, ...], str]] = []
    for module, info in ckpt.modules.items():
        file = ckpt.tensors.tensors[f"{module}.qcodes"].file.name
        entries.append((file, f"{module}.weight", module, tuple(info["shape"]), info["dtype"]))
    for name in ckpt.plain_names():
        info = ckpt.tensors.tensors[name]
        entries.append((info.file.name, name, None, tuple(info.shape), info.dtype))
    plans: list[TensorPlan] = []
    for file, hf_name, module, shape, dtype in sorted(entries, key=lambda e: (e[0], e[1])):
        gname = names.gguf_name(hf_name)
        if gname is None:
            continue
        perm = names.permutation(hf_name)
        plans.append(TensorPlan(hf_name, gname, _tensor_type(target, gname, module, shape, dtype, intermediate),
                                shape, file, module, gguf_model.qk_row_order(*perm) if perm else None,
                                names.value_shift(hf_name)))
    return plans


def _tensor_type(target: Target, gname: str, module: str | None, shape: tuple[int, ...], dtype: str,
                 intermediate: bool) -> str:
    if len(shape) == 1:
        return "F32"
    if intermediate:  # what llama.cpp's quantizer reads: the exact float weights
        return "F32" if module else _exact_float_type(dtype)
    if target.route == "pack":
        return target.module_types[module] if module else _float_type(dtype)
    if target.route == "dequantize":
        return target.name
    t = target.name  # gguf-py from float weights
    if t in NATIVE and shape[-1] % BLOCK:
        return "F16"  # a row that is not whole blocks stays float, as llama.cpp's converter does
    if gname == "output.weight" and t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        return "Q8_0"
    return t


def ggml_type(qtype: str):
    import gguf

    return gguf.GGMLQuantizationType[qtype]


def gguf_file_type(name: str):
    import gguf

    return gguf.LlamaFileType.ALL_F32 if name == "F32" else gguf.LlamaFileType[f"MOSTLY_{name}"]
