"""K-quants through llama.cpp: its quantizer (llama-cpp-python) on the exact float weights, fed our importance
matrix (computed from a calibration set, or read from an imatrix file)."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from turboquant.errors import DataError
from turboquant.formats.base import FormatError
from turboquant.formats.gguf import model as gguf_model
from turboquant.formats.gguf.imatrix import compute_imatrix, read_imatrix
from turboquant.formats.gguf.types import NO_IMATRIX, PY_TYPES, gguf_file_type
from turboquant.io.calibration import CalibrationSet
from turboquant.io.checkpoint import QuantizedCheckpoint
def check_imatrix(imatrix, ckpt: QuantizedCheckpoint, names: gguf_model.NameMap) -> None:
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
    try:
        return read_imatrix(path)
    except DataError as e:
        raise FormatError(e.problem, e.fix) from None


def load_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise FormatError(f"K-quants are computed by llama.cpp and llama-cpp-python is not importable ({e})",
                          "pip install llama-cpp-python==0.3.36, or choose a type gguf-py writes "
                          f"({', '.join(PY_TYPES)})") from None
    return llama_cpp


def llama_quantize(src: Path, dst: Path, ftype_name: str, imatrix=None, threads: int = 0) -> None:
    """llama.cpp's ``llama_model_quantize`` (the code behind ``llama-quantize``), with an importance matrix.

    The imatrix reaches it as llama.h's NULL-terminated ``llama_model_imatrix_data`` array of per-tensor
    ``E[x²]`` (what llama-quantize makes of an imatrix file: ``in_sum2 / counts``).
    """
    llama_cpp = load_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf_file_type(ftype_name))
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


def imatrix_for(ckpt: QuantizedCheckpoint, options: dict[str, Any], names: gguf_model.NameMap):
    if options.get("calib") is not None:
        calib = CalibrationSet.load(options["calib"])
        computed = compute_imatrix(ckpt.path, calib)
        return computed.renamed(lambda n: names.gguf_name(n + ".weight"))
    if str(options.get("imatrix")) == NO_IMATRIX:
        return None
    return load_imatrix_file(options["imatrix"])
