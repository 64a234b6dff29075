"""Packing our codes into GGUF blocks unchanged (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0): see ``formats.gguf.write``."""

from __future__ import annotations

import numpy as np
import torch

from turboquant.formats.gguf.types import BLOCK
from turboquant.tensor import QuantizedTensor
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
