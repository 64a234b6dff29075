"""GGUF: one self-describing file for llama.cpp (and llama-cpp-python, Ollama, LM Studio).

Written with gguf-py's ``GGUFWriter``, one shard of the canonical checkpoint at a time. Which of four routes a
tensor takes depends on the checkpoint and on ``gguf_type``:

========================  ==========================  ===================================================
checkpoint                ``gguf_type``                what is written
========================  ==========================  ===================================================
quantized, scheme fits    native fit (default)         the codes, packed unchanged (``pack``)
float (fp16 / bf16)       F32 F16 BF16 Q8_0 Q4_x Q5_x  gguf-py's own quantizer (``gguf.quants``)
quantized                 F32 F16 BF16                 the dequantized weights (F32 exact)
any                       K-quant (Q2_K … Q6_K)        llama.cpp's quantizer on the exact float weights,
                                                       fed an importance matrix (``llama.cpp``)
========================  ==========================  ===================================================

Native fits (``NATIVE``): a GGUF block type holds 32 consecutive weights of a row with one float16 scale ``d``
(and a float16 ``m`` for the ``_1`` types). Our codes map onto them exactly when groups are blocks (group size 32)
and the group of a column is ``column // group`` (no act-order permutation). Larger groups (a multiple of 32,
per-channel, per-tensor) are written only with ``expand_groups=true``, each block repeating its group's scale —
exact too, but a checkpoint made for a coarser grid than the type's is refused by default so that a user asking
for Q4_0 from group 128 learns what they get:

* Q4_0 ``(q - 8)·d``, Q5_0 ``(q - 16)·d``, Q8_0 ``q·d`` (int8): our symmetric codes with zero ``2**(bits-1)``
  (Q8_0's int8 is ``code - 128``) and ``d = scale``: bit-exact.
* Q4_1 / Q5_1 ``q·d + m``: asymmetric codes, ``d = scale``, ``m = -zero·scale`` rounded to float16 — the one
  rounding of this format, at most half a float16 ulp of ``|zero·scale|`` per weight (fractional HQQ zeros too).

A quantized checkpoint fitting no native type can still become a K-quant: llama.cpp then *re-quantizes the
dequantized weights* (a second rounding, recorded as ``turboquant.conversion`` in the file and in ``CONVERSIONS``).
Tensors our checkpoint keeps in float follow llama.cpp: 1-D tensors (norms, biases) F32; embeddings and the LM head
of a packed checkpoint F16 (BF16 when stored so); from a float checkpoint they take the chosen type, except that
the LM head of a 4/5-bit file is Q8_0 (llama.cpp's quantizer gives it Q6_K, which gguf-py cannot write).
"""

from __future__ import annotations

import ctypes
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turboquant import faults
from turboquant.checkpoint import QuantizedCheckpoint
from turboquant.formats import gguf_model
from turboquant.formats.base import FormatError, register_format
from turboquant.tensor import PER_CHANNEL, PER_TENSOR, QuantizedTensor, QuantScheme

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


# ---------------------------------------------------------------------------------------------------------------
# Planning: which type each tensor gets (shared by check and write)
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Check (before any work)
# ---------------------------------------------------------------------------------------------------------------


def check(ckpt: QuantizedCheckpoint, options: dict[str, Any]) -> None:
    if not isinstance(options.get("expand_groups"), bool):
        raise FormatError(f"expand_groups={options.get('expand_groups')!r} is not true or false",
                          "pass --option expand_groups=true or false")
    try:
        config = ckpt.config
        gguf_model.check_config(config)
        gguf_model.check_tokenizer(ckpt.path)
        names = gguf_model.NameMap(config)
        for name in ckpt.plain_names():
            names.gguf_name(name)
    except gguf_model.GGUFModelError as e:
        raise FormatError(e.problem, e.fix) from None
    target = resolve_target(ckpt, options)
    imatrix, calib = options.get("imatrix"), options.get("calib")
    if target.route != "llama.cpp":
        if imatrix is not None or calib is not None:
            raise FormatError(f"an importance matrix only feeds llama.cpp's K-quants, not {target.name}",
                              "drop the imatrix / calib options, or choose a K-quant (e.g. --gguf-type Q4_K_M)")
        return
    _llama_cpp()  # fails early when llama-cpp-python is missing
    if imatrix is not None and calib is not None:
        raise FormatError("both imatrix and calib were given", "pass one: a ready imatrix file, or calibration data")
    if imatrix is None and calib is None:
        raise FormatError(f"{target.name} is quantized by llama.cpp with an importance matrix, and none was given",
                          "pass --option calib=CALIB.safetensors (computed here) or --option imatrix=FILE "
                          f"(or imatrix={NO_IMATRIX} to quantize without one)")
    if calib is not None:
        from turboquant.calibration import CalibrationSet, check_vocab

        check_vocab(CalibrationSet.load(calib), int(config["vocab_size"]))
    elif str(imatrix) != NO_IMATRIX:
        _check_imatrix(load_imatrix_file(imatrix), ckpt, names)


def _check_imatrix(imatrix, ckpt: QuantizedCheckpoint, names: gguf_model.NameMap) -> None:
    expected = {}
    for module, info in ckpt.modules.items():
        expected[names.gguf_name(module + ".weight")] = int(info["shape"][1])
    for name in ckpt.plain_names():
        info = ckpt.tensors.tensors[name]
        if len(info.shape) == 2:
            expected[names.gguf_name(name)] = int(info.shape[1])
    used = [n for n in imatrix.sums if n in expected]
    if not used:
        raise FormatError(f"the imatrix names ({', '.join(sorted(imatrix.sums)[:3])}, ...) match no tensor of "
                          "this model", "pass an imatrix computed for this model (GGUF tensor names)")
    for n in used:
        if imatrix.sums[n].size != expected[n]:
            raise FormatError(f"imatrix entry {n} has {imatrix.sums[n].size} values for {expected[n]} inputs",
                              "pass an imatrix computed for this model")


def load_imatrix_file(path):
    from turboquant.errors import DataError
    from turboquant.imatrix import read_imatrix

    try:
        return read_imatrix(path)
    except DataError as e:
        raise FormatError(e.problem, e.fix) from None


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise FormatError(f"K-quants are computed by llama.cpp and llama-cpp-python is not importable ({e})",
                          "pip install llama-cpp-python==0.3.36, or choose a type gguf-py writes "
                          f"({', '.join(PY_TYPES)})") from None
    return llama_cpp


# ---------------------------------------------------------------------------------------------------------------
# Packing our codes into GGUF blocks
# ---------------------------------------------------------------------------------------------------------------


def block_params(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block float32 ``(scale, zero)`` ``[out, in / 32]`` (groups are whole blocks, contiguous)."""
    out_f, in_f = qt.shape
    first_col = torch.arange(in_f // BLOCK) * BLOCK
    g = qt.scheme.group_size
    col = first_col // g if g > 0 else torch.zeros_like(first_col)
    scale, zero = qt.scale.float()[:, col], qt.zero.float()[:, col]
    return scale.expand(out_f, -1), zero.expand(out_f, -1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """ggml's 4-bit layout: byte j holds element j (low nibble) and element j + 16 (high nibble)."""
    return ((q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """ggml's ``qh``: bit j of a little-endian uint32 is bit 4 of element j."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
    return bits.sum(-1, dtype=np.uint32)[..., None].astype("<u4").view(np.uint8)


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy()[..., None].astype("<f2").view(np.uint8)


def pack_native(qt: QuantizedTensor, qtype: str, row_order: np.ndarray | None = None) -> np.ndarray:
    """GGUF block bytes ``[out, in / 32 * type_size]`` of ``qt`` as ``qtype`` (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0).

    Codes and float16 scales are copied; only the ``m`` of Q4_1/Q5_1 is a rounding (``-zero·scale`` to float16).
    """
    out_f, in_f = qt.shape
    scale, zero = block_params(qt)
    q = qt.codes.numpy().reshape(out_f, in_f // BLOCK, BLOCK)
    if row_order is not None:
        q, scale, zero = q[row_order], scale[row_order], zero[row_order]
    d = _f16_bytes(scale)
    if qtype == "Q8_0":
        parts = [d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif qtype == "Q4_0":
        parts = [d, _nibbles(q)]
    elif qtype == "Q5_0":
        parts = [d, _high_bits(q), _nibbles(q)]
    elif qtype == "Q4_1":
        parts = [d, _f16_bytes(-(zero * scale)), _nibbles(q)]
    elif qtype == "Q5_1":
        parts = [d, _f16_bytes(-(zero * scale)), _high_bits(q), _nibbles(q)]
    else:
        raise ValueError(f"{qtype} is not a native block type")
    return np.concatenate(parts, axis=-1).reshape(out_f, -1)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


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

    def info(self) -> tuple[tuple[int, ...], np.dtype, int]:
        """The numpy shape, dtype and byte size gguf-py's writer expects (uint8 bytes for block types)."""
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[_ggml_type(self.qtype)]
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
                                shape, file, module, gguf_model.qk_row_order(*perm) if perm else None))
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


def _tensor_bytes(plan: TensorPlan, qt: QuantizedTensor | None, tensor: torch.Tensor | None) -> np.ndarray:
    """The stored array of one tensor (numpy float for F32/F16, uint8 bytes for BF16 and block types)."""
    import gguf

    if qt is not None and plan.qtype in NATIVE:
        return pack_native(qt, plan.qtype, plan.row_order)
    w = qt.dequantize(torch.float32) if qt is not None else tensor
    if plan.row_order is not None:
        w = w[torch.from_numpy(plan.row_order)]
    if plan.qtype == "BF16":
        b = w.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
        return b.reshape(*w.shape[:-1], -1)
    if plan.qtype == "F16":
        return w.to(torch.float16).numpy()
    arr = w.to(torch.float32).numpy()
    if plan.qtype == "F32":
        return arr
    return gguf.quants.quantize(arr, gguf.GGMLQuantizationType[plan.qtype])


def _ggml_type(qtype: str):
    import gguf

    return gguf.GGMLQuantizationType[qtype]


def _file_type(name: str):
    import gguf

    return gguf.LlamaFileType.ALL_F32 if name == "F32" else gguf.LlamaFileType[f"MOSTLY_{name}"]


def model_name(ckpt: QuantizedCheckpoint) -> str:
    source = ckpt.meta.get("source") or {}
    if source.get("repo_id"):
        return str(source["repo_id"]).rstrip("/").split("/")[-1]
    return Path(source.get("path") or ckpt.path).name


def write_gguf(ckpt: QuantizedCheckpoint, path: Path, plans: list[TensorPlan], file_type: str, conversion: str,
               extra: dict[str, Any] | None = None) -> Path:
    """Header, metadata and tensor infos first, then the tensor data shard by shard (one block held at a time)."""
    import gguf

    config = ckpt.config
    writer = gguf.GGUFWriter(str(path), gguf_model.arch_name(config))
    try:
        writer.add_name(model_name(ckpt))
        writer.add_quantized_by("TurboQuant")
        gguf_model.add_architecture(writer, config)
        writer.add_file_type(_file_type(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        gguf_model.add_tokenizer(writer, ckpt.path, int(config["vocab_size"]))
        writer.add_string("turboquant.method", ckpt.method)
        writer.add_string("turboquant.schemes", ", ".join(sorted({ckpt.scheme(m).describe() for m in ckpt.modules}))
                          or "float")
        writer.add_string("turboquant.conversion", conversion)
        for key, value in (extra or {}).items():
            _add_value(writer, key, value)
        for p in plans:
            writer.add_tensor_info(p.gguf_name, *p.info(), raw_dtype=_ggml_type(p.qtype))
        factors = gguf_model.rope_freq_factors(config)
        if factors is not None:
            writer.add_tensor_info("rope_freqs.weight", factors.shape, factors.dtype, factors.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        faults.point("gguf.header_written")
        files = list(dict.fromkeys(p.file for p in plans))  # plan order is writing order
        for file in files:
            in_file = [p for p in plans if p.file == file]
            plain = ckpt.tensors.load([p.hf_name for p in in_file if p.module is None])
            for p in in_file:
                qt = ckpt.quantized_tensor(p.module) if p.module else None
                writer.write_tensor_data(np.ascontiguousarray(_tensor_bytes(p, qt, plain.get(p.hf_name))))
            del plain
            faults.point("gguf.shard_written")
        if factors is not None:
            writer.write_tensor_data(factors)
    finally:
        writer.close()
    return path


def _add_value(writer, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        writer.add_string(key, str(value))


# ---------------------------------------------------------------------------------------------------------------
# K-quants through llama.cpp
# ---------------------------------------------------------------------------------------------------------------


def llama_quantize(src: Path, dst: Path, ftype_name: str, imatrix=None, threads: int = 0) -> None:
    """llama.cpp's ``llama_model_quantize`` (the code behind ``llama-quantize``), with an importance matrix.

    The imatrix reaches it as llama.h's NULL-terminated ``llama_model_imatrix_data`` array of per-tensor
    ``E[x²]`` (what llama-quantize makes of an imatrix file: ``in_sum2 / counts``).
    """
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(_file_type(ftype_name))
    params.nthread = threads
    keep: list[Any] = []
    if imatrix is not None and len(imatrix):
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, name in enumerate(sorted(imatrix.sums)):
            values = np.ascontiguousarray(imatrix.mean(name), dtype=np.float32)
            cname = name.encode()
            keep += [values, cname]
            entries[i].name = cname
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise FormatError(f"llama.cpp's quantizer failed (return code {rc}) on {src.name}",
                          "see its log above; try another --gguf-type")


def _imatrix_for(ckpt: QuantizedCheckpoint, options: dict[str, Any], names: gguf_model.NameMap):
    from turboquant.imatrix import compute_imatrix

    if options.get("calib") is not None:
        from turboquant.calibration import CalibrationSet

        calib = CalibrationSet.load(options["calib"])
        computed = compute_imatrix(ckpt.path, calib)
        return computed.renamed(lambda n: names.gguf_name(n + ".weight"))
    if str(options.get("imatrix")) == NO_IMATRIX:
        return None
    return load_imatrix_file(options["imatrix"])


# ---------------------------------------------------------------------------------------------------------------
# The format
# ---------------------------------------------------------------------------------------------------------------


@register_format(
    "gguf", description="GGUF for llama.cpp: native blocks (codes packed unchanged), F16/BF16/Q8_0 from float, "
                        "K-quants by llama.cpp with an importance matrix",
    runtime="llama.cpp, llama-cpp-python, Ollama, LM Studio", check=check,
    options={"gguf_type": None, "imatrix": None, "calib": None, "expand_groups": False},
)
def write(ckpt: QuantizedCheckpoint, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    target = resolve_target(ckpt, options)
    path = out / f"{model_name(ckpt)}-{target.name}.gguf"
    if target.route != "llama.cpp":
        write_gguf(ckpt, path, plan_tensors(ckpt, target), target.name, CONVERSIONS[target.route])
        return {"file": path.name, "gguf_type": target.name, "conversion": CONVERSIONS[target.route]}
    names = gguf_model.NameMap(ckpt.config)
    imatrix = _imatrix_for(ckpt, options, names)
    extra: dict[str, Any] = {}
    if imatrix is not None:
        from turboquant.imatrix import write_imatrix

        write_imatrix(out / IMATRIX_FILE, imatrix)
        extra = {"quantize.imatrix.file": IMATRIX_FILE, "quantize.imatrix.dataset": ", ".join(imatrix.datasets),
                 "quantize.imatrix.entries_count": len(imatrix), "quantize.imatrix.chunks_count": imatrix.chunk_count}
    conversion = CONVERSIONS["llama.cpp"] + ("" if imatrix is not None else " (none given)")
    tmp = out / f".{path.stem}.float.gguf"
    try:
        write_gguf(ckpt, tmp, plan_tensors(ckpt, target, intermediate=True), "F32", conversion, extra)
        llama_quantize(tmp, path, target.name, imatrix, threads=os.cpu_count() or 0)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "gguf_type": target.name, "conversion": conversion}


# ---------------------------------------------------------------------------------------------------------------
# Reading back (tests, validation): the float weights a GGUF file holds, under Hugging Face names
# ---------------------------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path, config: dict[str, Any], hf_names: list[str]) -> dict[str, torch.Tensor]:
    """Dequantize every tensor of a GGUF file (``gguf.quants.dequantize``) back to Hugging Face names and layout.

    ``hf_names`` are the model's state-dict names (e.g. ``build_skeleton(...).state_dict()``); q/k rows are
    permuted back for llama-architecture files.
    """
    import gguf

    names = gguf_model.NameMap(config)
    back: dict[str, str] = {}
    for n in hf_names:
        g = names.gguf_name(n) if not n.endswith("rotary_emb.inv_freq") else None
        if g is not None:
            back[g] = n
    reader = gguf.GGUFReader(str(path))
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name not in back:
            continue
        hf = back[t.name]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        w = w.reshape(shape)
        perm = names.permutation(hf)
        if perm is not None:
            order = torch.from_numpy(gguf_model.qk_row_order(*perm))
            restored = torch.empty_like(w)
            restored[order] = w
            w = restored
        state[hf] = w
    return state


def tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name → type name (e.g. ``blk.0.attn_q.weight: Q4_0``)."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


__all__ = ["BLOCK", "CONVERSIONS", "K_QUANTS", "NATIVE", "PY_TYPES", "TYPES", "Target", "check", "llama_quantize",
           "native_fit", "pack_native", "plan_tensors", "read_state_dict", "resolve_target", "tensor_types", "write"]
