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

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turboquant import faults
from turboquant.formats.base import FormatError, register_format
from turboquant.formats.gguf import model as gguf_model
from turboquant.formats.gguf.imatrix import write_imatrix
from turboquant.formats.gguf.kquant import check_imatrix, imatrix_for, llama_quantize, load_llama_cpp, load_imatrix_file
from turboquant.formats.gguf.pack import pack_native
from turboquant.formats.gguf.types import (CONVERSIONS, gguf_file_type, ggml_type, IMATRIX_FILE, NATIVE, NO_IMATRIX,
                                           plan_tensors, resolve_target, TensorPlan)
from turboquant.io.calibration import CalibrationSet, check_vocab
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.tensor import QuantizedTensor


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
        gguf_model.check_name_rules(model_name(ckpt), ckpt.path)
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
    load_llama_cpp()  # fails early when llama-cpp-python is missing
    if imatrix is not None and calib is not None:
        raise FormatError("both imatrix and calib were given", "pass one: a ready imatrix file, or calibration data")
    if imatrix is None and calib is None:
        raise FormatError(f"{target.name} is quantized by llama.cpp with an importance matrix, and none was given",
                          "pass --option calib=CALIB.safetensors (computed here) or --option imatrix=FILE "
                          f"(or imatrix={NO_IMATRIX} to quantize without one)")
    if calib is not None:
        check_vocab(CalibrationSet.load(calib), int(config["vocab_size"]))
    elif str(imatrix) != NO_IMATRIX:
        check_imatrix(load_imatrix_file(imatrix), ckpt, names)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _tensor_bytes(plan: TensorPlan, qt: QuantizedTensor | None, tensor: torch.Tensor | None) -> np.ndarray:
    """The stored array of one tensor (numpy float for F32/F16, uint8 bytes for BF16 and block types)."""
    import gguf

    if qt is not None and plan.qtype in NATIVE:
        return pack_native(qt, plan.qtype, plan.row_order)
    w = qt.dequantize(torch.float32) if qt is not None else tensor
    if plan.shift:
        w = w.float() + plan.shift
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
        writer.add_file_type(gguf_file_type(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        gguf_model.add_tokenizer(writer, ckpt.path, int(config["vocab_size"]))
        writer.add_string("turboquant.method", ckpt.method)
        writer.add_string("turboquant.schemes", ", ".join(sorted({ckpt.scheme(m).describe() for m in ckpt.modules}))
                          or "float")
        writer.add_string("turboquant.conversion", conversion)
        for key, value in (extra or {}).items():
            _add_value(writer, key, value)
        for p in plans:
            writer.add_tensor_info(p.gguf_name, *p.info(), raw_dtype=ggml_type(p.qtype))
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
    notes = gguf_model.conversion_notes(ckpt.config)
    recorded = {"turboquant.notes": notes} if notes else {}
    if target.route != "llama.cpp":
        write_gguf(ckpt, path, plan_tensors(ckpt, target), target.name, CONVERSIONS[target.route], recorded)
        return {"file": path.name, "gguf_type": target.name, "conversion": CONVERSIONS[target.route], **_notes(notes)}
    names = gguf_model.NameMap(ckpt.config)
    imatrix = imatrix_for(ckpt, options, names)
    extra: dict[str, Any] = dict(recorded)
    if imatrix is not None:
        write_imatrix(out / IMATRIX_FILE, imatrix)
        extra |= {"quantize.imatrix.file": IMATRIX_FILE, "quantize.imatrix.dataset": ", ".join(imatrix.datasets),
                  "quantize.imatrix.entries_count": len(imatrix), "quantize.imatrix.chunks_count": imatrix.chunk_count}
    conversion = CONVERSIONS["llama.cpp"] + ("" if imatrix is not None else " (none given)")
    tmp = out / f".{path.stem}.float.gguf"
    try:
        write_gguf(ckpt, tmp, plan_tensors(ckpt, target, intermediate=True), "F32", conversion, extra)
        llama_quantize(tmp, path, target.name, imatrix, threads=os.cpu_count() or 0)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "gguf_type": target.name, "conversion": conversion, **_notes(notes)}


def _notes(notes: list[str]) -> dict[str, Any]:
    return {"notes": notes} if notes else {}
