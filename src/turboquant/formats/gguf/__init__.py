"""GGUF for llama.cpp: type facts and the per-tensor plan (``types``), packing our codes into blocks (``pack``), the
writer and the registered format (``write``), K-quants through llama.cpp (``kquant``), reading back (``read``),
architecture and tokenizer metadata (``model``), and the importance matrix (``imatrix``)."""

from turboquant.formats.gguf.kquant import llama_quantize
from turboquant.formats.gguf.pack import block_params, pack_native
from turboquant.formats.gguf.read import read_state_dict, tensor_types
from turboquant.formats.gguf.types import (BLOCK, CONVERSIONS, FLOAT_TYPES, IMATRIX_FILE, K_QUANTS, NATIVE, PY_TYPES,
                                           TYPES, Target, native_fit, plan_tensors, resolve_target)
from turboquant.formats.gguf.write import check, write

__all__ = ["BLOCK", "CONVERSIONS", "FLOAT_TYPES", "IMATRIX_FILE", "K_QUANTS", "NATIVE", "PY_TYPES", "TYPES", "Target",
           "block_params", "check", "llama_quantize", "native_fit", "pack_native", "plan_tensors", "read_state_dict",
           "resolve_target", "tensor_types", "write"]
