"""The one interchange layout between methods and formats: ``QuantScheme`` and ``QuantizedTensor``.

Methods produce a ``QuantizedTensor`` (unpacked integer codes + scale + zero point + optional g_idx);
formats pack it into their own layouts. The conventions follow GPTQ / AutoGPTQ, which most runtimes read:

* codes are unsigned, ``0 .. 2**bits - 1``; a weight is ``(code - zero) * scale``;
* symmetric schemes fix ``zero = 2**(bits-1)`` (so signed formats such as GGUF Q4_0/Q8_0 hold them exactly);
* scales are rounded to float16 *before* codes are chosen, so every float16-scale format reproduces the
  dequantized weights bit for bit;
* ``g_idx[i]`` is the group of input column ``i`` (GPTQ's act-order layout); without it, ``i // group_size``;
* zero points are integers (uint8) for most methods; HQQ-style solvers may keep *fractional* zero points
  (float16, still in code units). Formats with float offsets (MLX biases, GGUF Q4_1 mins) hold both; formats with
  integer zero points (GPTQ, AWQ, compressed-tensors) refuse fractional ones.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import torch

from turboquant.errors import check_keys, ConfigError

PER_TENSOR = 0
PER_CHANNEL = -1
SCALE_DTYPE = torch.float16
_MIN_SCALE = 1e-7  # float16 keeps this as a subnormal; below it a scale would round to zero
_MAX_SCALE = 65504.0


@dataclass(frozen=True)
class QuantScheme:
    """How weights are mapped to integers: bit width, grouping along the input dimension, symmetry.

    ``group_size``: a power of two >= 8 for per-group scales, ``-1`` (``PER_CHANNEL``) for one scale per
    output row, ``0`` (``PER_TENSOR``) for one scale for the whole tensor.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits={self.bits!r} is out of range", "use an integer from 2 to 8")
        g = self.group_size
        valid_group = isinstance(g, int) and not isinstance(g, bool) and (
            g in (PER_TENSOR, PER_CHANNEL) or (g >= 8 and g & (g - 1) == 0)
        )
        if not valid_group:
            raise ConfigError(
                f"group_size={g!r} is not a valid group size",
                "use a power of two >= 8 (32, 64, 128, ...), -1 for per-channel or 0 for per-tensor",
            )
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric={self.symmetric!r} is not a boolean", "use true or false")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def granularity(self) -> str:
        return {PER_TENSOR: "tensor", PER_CHANNEL: "channel"}.get(self.group_size, "group")

    def groups(self, in_features: int) -> int:
        """Number of scale columns for a weight with ``in_features`` inputs."""
        return in_features // self.group_size if self.group_size > 0 else 1

    def storage_bits(self, out_features: int, in_features: int, fractional_zero: bool = False) -> int:
        """Bits a packed ``[out, in]`` weight needs: codes, float16 scales and (asymmetric) zero points.

        Integer zero points pack into ``bits`` bits; fractional ones (HQQ) are stored as float16.
        """
        scale_rows = 1 if self.group_size == PER_TENSOR else out_features
        per_scale = 16 + (0 if self.symmetric else (16 if fractional_zero else self.bits))
        return self.bits * out_features * in_features + scale_rows * self.groups(in_features) * per_scale

    def check_shape(self, shape: tuple[int, ...], name: str = "weight") -> None:
        """Refuse a 2-D weight this scheme cannot cover exactly."""
        if len(shape) != 2:
            raise ConfigError(f"{name} has shape {tuple(shape)}, not 2-D", "quantize only Linear weights")
        if self.group_size > 0 and shape[1] % self.group_size:
            raise ConfigError(
                f"group_size {self.group_size} does not divide the input dimension {shape[1]} of {name}",
                f"use a group size that divides {shape[1]} (e.g. {_largest_pow2_divisor(shape[1])}) or -1",
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantScheme":
        known = {f.name for f in fields(cls)}
        check_keys(data, known, "unknown scheme key(s) {unknown}")
        return cls(**data)

    def describe(self) -> str:
        grouping = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
        return f"W{self.bits} {grouping} {'sym' if self.symmetric else 'asym'}"


def _largest_pow2_divisor(n: int) -> int:
    g = 1
    while n % (g * 2) == 0 and g < 128:
        g *= 2
    return g


@dataclass
class QuantizedTensor:
    """A quantized 2-D weight ``[out_features, in_features]`` in unpacked form.

    ``codes``: uint8 ``[out, in]``; ``scale``: float16 ``[out, G]``; ``zero``: uint8 (or float16 for fractional
    zero points) ``[out, G]`` (G scale columns, 1 per row for per-channel; ``[1, 1]`` for per-tensor);
    ``g_idx``: int32 ``[in]`` or None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: QuantScheme
    g_idx: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        out_f, in_f = self.codes.shape
        groups = self.scheme.groups(in_f)
        rows = 1 if self.scheme.group_size == PER_TENSOR else out_f
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8, got {self.codes.dtype}")
        if self.zero.dtype not in (torch.uint8, torch.float16):
            raise ValueError(f"zero must be uint8 or float16, got {self.zero.dtype}")
        if tuple(self.scale.shape) != (rows, groups) or self.zero.shape != self.scale.shape:
            raise ValueError(
                f"scale/zero shapes {tuple(self.scale.shape)}/{tuple(self.zero.shape)} do not match "
                f"codes {tuple(self.codes.shape)} under {self.scheme.describe()}"
            )
        if self.g_idx is not None and tuple(self.g_idx.shape) != (in_f,):
            raise ValueError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected ({in_f},)")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def integer_zero(self) -> bool:
        """Whether zero points are integers (required by GPTQ / AWQ / compressed-tensors layouts)."""
        return self.zero.dtype == torch.uint8

    def group_index(self) -> torch.Tensor:
        """Scale column used by each input column."""
        in_f = self.codes.shape[1]
        if self.g_idx is not None:
            return self.g_idx.long()
        if self.scheme.group_size > 0:
            return torch.arange(in_f, device=self.codes.device) // self.scheme.group_size
        return torch.zeros(in_f, dtype=torch.long, device=self.codes.device)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """The same tensor with codes, scales, zero points and ``g_idx`` on ``device`` (itself when there)."""
        if self.codes.device == torch.device(device):
            return self
        g_idx = None if self.g_idx is None else self.g_idx.to(device)
        return QuantizedTensor(self.codes.to(device), self.scale.to(device), self.zero.to(device), self.scheme, g_idx,
                               self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight these codes represent: ``(codes - zero) * scale``."""
        idx = self.group_index()
        scale = self.scale.float()[:, idx]
        zero = self.zero.float()[:, idx]
        weight = (self.codes.float() - zero) * scale
        return weight.to(dtype or self.dtype)

    @classmethod
    def from_groups(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        scheme: QuantScheme,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        integer_zero: bool = True,
    ) -> "QuantizedTensor":
        """Store float ``codes`` ``[rows, G, g]`` (``group_view`` layout) with their float scale and zero ``[rows, G]``."""
        return cls(
            codes=codes.reshape(shape).to(torch.uint8),
            scale=scale.to(SCALE_DTYPE),
            zero=zero.to(torch.uint8 if integer_zero else torch.float16),
            scheme=scheme,
            dtype=dtype,
        )

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat, packed tensors for the canonical checkpoint (``prefix`` is the module name)."""
        out = {
            f"{prefix}.qcodes": pack_bits(self.codes, self.scheme.bits),
            f"{prefix}.qscale": self.scale.contiguous(),
            f"{prefix}.qzero": self.zero.contiguous(),
        }
        if self.g_idx is not None:
            out[f"{prefix}.g_idx"] = self.g_idx.to(torch.int32).contiguous()
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, scheme: QuantScheme, shape: tuple[int, int], dtype: torch.dtype
    ) -> "QuantizedTensor":
        """Inverse of ``to_tensors``."""
        codes = unpack_bits(tensors[f"{prefix}.qcodes"], scheme.bits, shape[1])
        return cls(
            codes=codes,
            scale=tensors[f"{prefix}.qscale"],
            zero=tensors[f"{prefix}.qzero"],
            scheme=scheme,
            g_idx=tensors.get(f"{prefix}.g_idx"),
            dtype=dtype,
        )


class ScaleOverflowError(ConfigError):
    """A scale float16 cannot hold: storing 65504 instead would clip every weight of that group."""

    def __init__(self, scale: float, module: str | None = None) -> None:
        self.scale, self.module = scale, module
        where = f"{module} needs" if module else "a weight group needs"
        super().__init__(f"{where} a quantization scale of {scale:.4g}, beyond float16's 65504 (clamping it would "
                         "clip those weights)", "quantize with more bits (e.g. --bits 8) or a smaller group size, "
                         "or use a checkpoint without such outlier weights")


@contextmanager
def naming_overflows(module: str) -> Iterator[None]:
    """Re-raise a ``ScaleOverflowError`` from inside a solver with the module's name in it."""
    try:
        yield
    except ScaleOverflowError as e:
        raise ScaleOverflowError(e.scale, module) from None


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales as float16 will store them, returned as float32.

    Rounded *up* to the next float16 so that the grid still spans the range the scale was computed for (rounding
    down would clip the extreme weights of every group by up to 2**-11 of the range); kept away from 0. A scale
    above float16's range raises ``ScaleOverflowError``: it is never clamped.
    """
    top = float(scale.max()) if scale.numel() else 0.0
    if top > _MAX_SCALE:
        raise ScaleOverflowError(top)
    s = scale.float().clamp(_MIN_SCALE, _MAX_SCALE)
    s16 = s.to(SCALE_DTYPE)
    up = torch.nextafter(s16, torch.full_like(s16, float("inf")))
    return torch.where(s16.float() < s, up, s16).float()


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-exact, as float32) and integer zero point covering ``[xmin, xmax]`` (0 always inside)."""
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if scheme.symmetric:
        amax = torch.maximum(-xmin, xmax)
        scale = round_scale(2 * amax / scheme.qmax)
        zero = torch.full_like(scale, float(scheme.sym_zero))
    else:
        scale = round_scale((xmax - xmin) / scheme.qmax)
        zero = torch.round(-xmin / scale).clamp(0, scheme.qmax)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Round-to-nearest codes of ``x`` under broadcastable ``scale`` and integer ``zero``, as float."""
    return torch.div(x, scale).round_().add_(zero).clamp_(0, qmax)


def group_view(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``[rows, G, g]`` view of a ``[out, in]`` weight, one slice per scale."""
    out_f, in_f = weight.shape
    if scheme.group_size > 0:
        return weight.reshape(out_f, in_f // scheme.group_size, scheme.group_size)
    if scheme.group_size == PER_CHANNEL:
        return weight.reshape(out_f, 1, in_f)
    return weight.reshape(1, 1, out_f * in_f)


def from_group_view(grouped: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return grouped.reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# Bit packing: a little-endian bit stream along the last dimension (code k holds bits [k*b, (k+1)*b)).
# Read as int32 words on a little-endian machine this is exactly GPTQ's packing along a dimension, 3-bit included.
# ---------------------------------------------------------------------------------------------------------------


def packed_length(n: int, bits: int) -> int:
    """Bytes used by ``n`` codes of ``bits`` bits (padded to whole codes-per-byte groups)."""
    per_unit = 8 // math.gcd(bits, 8)  # codes in the smallest byte-aligned unit
    return (n + per_unit - 1) // per_unit * per_unit * bits // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., n]`` (each < 2**bits) into a uint8 bit stream ``[..., packed_length(n, bits)]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    n = codes.shape[-1]
    per_unit = 8 // math.gcd(bits, 8)
    pad = (-n) % per_unit
    c = codes.to(torch.int32)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    lead = c.shape[:-1]
    if 8 % bits == 0:
        per_byte = 8 // bits
        grouped = c.to(torch.uint8).reshape(*lead, -1, per_byte)
        packed = grouped[..., 0].clone()
        for k in range(1, per_byte):
            packed |= grouped[..., k] << (k * bits)
        return packed
    unit_bytes = per_unit * bits // 8  # ``per_unit`` codes fill exactly this many bytes (at most 64 bits)
    units = c.to(torch.int64).reshape(*lead, -1, per_unit) << (torch.arange(per_unit, dtype=torch.int64) * bits)
    word = units.sum(-1)
    stream = (word.unsqueeze(-1) >> (torch.arange(unit_bytes, dtype=torch.int64) * 8)) & 0xFF
    return stream.to(torch.uint8).reshape(*lead, -1)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 codes ``[..., n]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    if bits == 8:
        return packed.to(torch.uint8)[..., :n].contiguous()
    p = packed.to(torch.int32)
    lead = p.shape[:-1]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(8 // bits, dtype=torch.int32) * bits
        codes = (p.unsqueeze(-1) >> shifts) & mask
    else:
        per_unit = 8 // math.gcd(bits, 8)
        unit_bytes = per_unit * bits // 8
        byte_units = p.to(torch.int64).reshape(*lead, -1, unit_bytes) << (torch.arange(unit_bytes) * 8)
        word = byte_units.sum(-1)
        codes = (word.unsqueeze(-1) >> (torch.arange(per_unit, dtype=torch.int64) * bits)) & mask
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8).contiguous()


def pack_words(codes: torch.Tensor, bits: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Pack codes along the last dimension into ``dtype`` words (int32 for GPTQ/AWQ/compressed-tensors)."""
    if sys.byteorder != "little":
        raise RuntimeError("word packing assumes a little-endian host")
    width = torch.iinfo(dtype).bits
    n = codes.shape[-1]
    if (n * bits) % width:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole {width}-bit words")
    packed = pack_bits(codes, bits)
    return packed.reshape(-1).view(dtype).reshape(*packed.shape[:-1], -1)  # flat first: size-1 dims may carry odd strides


def unpack_words(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_words``."""
    return unpack_bits(words.reshape(-1).view(torch.uint8).reshape(*words.shape[:-1], -1), bits, n)
