"""How a source checkpoint's weights are stored, from config.json's ``quantization_config``, and how the stored
tensors become the ordinary float tensors the rest of the pipeline reads.

New releases ship their weights encoded: transformers' finegrained ``fp8`` (DeepSeek-V3 / Qwen3-FP8: e4m3 codes
with a float32 ``<tensor>_scale_inv`` per ``weight_block_size`` block, or one per tensor, some releases naming it
``<tensor>_scale``), ``fbgemm_fp8`` (e4m3 codes with a per-output-channel ``weight_scale`` ``[out, 1]``) and
``mxfp4`` (GPT-OSS's expert stacks: ``<name>_blocks`` holding two e2m1 codes a byte, low nibble first, and
``<name>_scales`` holding one e8m0 exponent per 32 values). TurboQuant quantizes floats, so an encoded checkpoint
is dequantized tensor by tensor as it is read: in float32, rounded to bfloat16 once, under the name and shape
transformers gives the dequantized tensor. Scales and activation scales are parts of a tensor, not tensors of the
model, so they are hidden. Anything inconsistent (a missing or misshapen scale, an unknown block size, a non-finite
scale, an e5m2 code) is refused with the fix: a wrong guess would quantize wrong weights without a word.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Protocol

import torch

from turboquant.errors import ModelLoadError

#: ``quant_method`` values whose checkpoints are read (dequantized on read); every other scheme is refused.
READ_METHODS = ("fp8", "fbgemm_fp8", "mxfp4")
#: What encoded tensors are dequantized to, as torch and safetensors name it.
DEQUANTIZED_DTYPE = torch.bfloat16
DEQUANTIZED_HEADER = "BF16"
FP8_E4M3 = "F8_E4M3"
#: Other 8-bit float codes a header may name: refused (their range differs, the scales would mean other values).
_OTHER_FP8 = ("F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0")
#: ``fmt`` values of a finegrained fp8 config that name e4m3 codes.
_E4M3_FORMATS = ("e4m3", "e4m3fn", "float8_e4m3fn")
#: Header dtypes a scale may be stored as (read as float32, which holds all of them exactly).
_FLOAT_SCALES = ("F32", "BF16", "F16")
#: transformers' ``FineGrainedFP8Config`` default when a config has no ``weight_block_size`` key at all.
DEFAULT_FP8_BLOCK = (128, 128)
_NO_BLOCK_KEY = object()
#: finegrained fp8 scale names (``<tensor>`` + suffix): transformers' own, then the alias some releases use.
_FP8_SCALE_SUFFIXES = ("_scale_inv", "_scale")
_FBGEMM_SCALE_SUFFIXES = ("_scale",)
#: A static-activation fp8 module's activation scale: the checkpoint's name, then transformers' parameter name.
_ACTIVATION_SCALES = (".input_scale", ".activation_scale")

#: The 16 e2m1 (FP4) values by 4-bit code: sign bit 3, then two exponent bits and one mantissa bit.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32
MXFP4_BLOCK_BYTES = MXFP4_GROUP // 2
E8M0_BIAS = 127
#: The e8m0 byte that encodes NaN (OCP MX spec): a scale no valid checkpoint holds.
E8M0_NAN = 255
_BLOCKS, _SCALES = "_blocks", "_scales"
_FIX_REFETCH = "re-fetch the complete release, or quantize its bfloat16 checkpoint instead"


class StoredTensor(Protocol):
    """A tensor as a weight file's header describes it (``io.model.TensorInfo``)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class EncodedTensor:
    """One logical tensor stored as codes plus scales, and how to rebuild it.

    ``scheme``: ``fp8-block`` (one scale per ``block_size`` tile of the last two dimensions, edge tiles partial),
    ``fp8-tensor`` (one scale), ``fp8-channel`` (one scale per output row) or ``mxfp4``.
    """

    name: str
    codes: str
    scales: str
    shape: tuple[int, ...]
    scheme: str
    block_size: tuple[int, int] | None = None

    @property
    def parts(self) -> tuple[str, str]:
        return self.codes, self.scales

    def decode(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The dequantized tensor: computed in float32, rounded to bfloat16 once."""
        if self.scheme == "mxfp4":
            return _decode_mxfp4(self, codes, scales)
        scale = scales.float()
        if not bool(torch.isfinite(scale).all()):
            raise ModelLoadError(f"scale {self.scales} holds {int((~torch.isfinite(scale)).sum())} NaN/Inf value(s)",
                                 f"the release is corrupt: {_FIX_REFETCH}")
        weight = codes.float()
        if self.scheme == "fp8-tensor":
            weight.mul_(scale.reshape(()))
        elif self.scheme == "fp8-channel":
            weight.mul_(scale)
        else:  # one band of block rows at a time, in place: the only float32 copy is the weight's own
            bm, bn = self.block_size or DEFAULT_FP8_BLOCK
            cols = weight.shape[-1]
            for i in range(scale.shape[-2]):
                band = scale[..., i:i + 1, :].repeat_interleave(bn, dim=-1)[..., :cols]
                weight[..., i * bm:(i + 1) * bm, :].mul_(band)
        return weight.to(DEQUANTIZED_DTYPE)


@dataclass(frozen=True)
class SourceLayout:
    """What a checkpoint's stored tensors are: the logical tensors rebuilt from parts (by logical name), and the
    stored names that are parts or activation scales (never reported as tensors of the model)."""

    encoded: dict[str, EncodedTensor]
    hidden: frozenset[str]


@dataclass(frozen=True)
class SourceEncoding:
    """A readable ``quantization_config``: the method, its FP8 block size and activation scheme, and the modules
    it says are stored as plain floats (``modules_to_not_convert`` / ``ignored_layers`` / ``ignore``)."""

    quant_method: str
    weight_block_size: tuple[int, int] | None = None
    activation_scheme: str = "dynamic"
    not_converted: tuple[str, ...] = ()

    def describe(self) -> dict:
        """What manifests record: how the source was stored and what it was read as."""
        out: dict = {"quant_method": self.quant_method}
        if self.quant_method == "fp8":
            out["weight_block_size"] = list(self.weight_block_size) if self.weight_block_size else None
            out["activation_scheme"] = self.activation_scheme
        out["dequantized_to"] = str(DEQUANTIZED_DTYPE).removeprefix("torch.")
        return out

    def layout(self, stored: Mapping[str, StoredTensor]) -> SourceLayout:
        """Pair every encoded tensor with its scales and check both against this encoding; refuses what does not
        fit (never a guess)."""
        for name, t in stored.items():
            if t.dtype in _OTHER_FP8:
                raise ModelLoadError(f"tensor {name} is stored as {t.dtype}; only e4m3 FP8 (F8_E4M3) weights are read",
                                     "quantize the model's bfloat16 release or its e4m3 FP8 release")
        if self.quant_method == "mxfp4":
            encoded, hidden = _mxfp4_layout(stored)
        else:
            encoded, hidden = _fp8_layout(self, stored)
        if not encoded:
            raise ModelLoadError(f"config.json's quantization_config says {self.quant_method}, but no tensor is "
                                 "stored that way", "remove quantization_config from config.json if the weights are "
                                 "plain floats, or re-fetch the encoded release")
        for entry in encoded.values():
            _check_converted(entry, self.not_converted)
        return SourceLayout(encoded, frozenset(hidden))


def source_encoding(config: dict) -> SourceEncoding | None:
    """How ``config``'s checkpoint is stored: None for plain floats, the encoding for fp8 / fbgemm_fp8 / mxfp4.

    Any other ``quantization_config`` is refused: quantizing already-quantized weights again would compound two
    roundings, and their codes are not what the layout holds."""
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method") or q.get("quant_type") or "an unnamed scheme")
    if method not in READ_METHODS:
        raise ModelLoadError(f"the checkpoint is already quantized ({method})",
                             "quantize the original float16 / bfloat16 checkpoint it was made from")
    skipped = _not_converted(q)
    if method != "fp8":
        return SourceEncoding(method, not_converted=skipped)
    _check_fp8_options(q)
    return SourceEncoding(method, _block_size(q.get("weight_block_size", _NO_BLOCK_KEY)), _activation_scheme(q),
                          skipped)


def _check_fp8_options(q: dict) -> None:
    """Refuse finegrained-fp8 variants whose codes or scales mean something else than e4m3 codes times float
    scales (e5m2 codes, ue8m0 byte scales, FP4-packed experts)."""
    fmt = q.get("fmt")
    if fmt is not None and str(fmt).lower() not in _E4M3_FORMATS:
        raise ModelLoadError(f"the checkpoint's FP8 weights are {fmt}; only e4m3 FP8 weights are read",
                             "quantize the model's bfloat16 release or its e4m3 FP8 release")
    for key, plain in (("scale_fmt", "float"), ("expert_dtype", "fp8")):
        value = q.get(key)
        if value is not None and value != plain:
            raise ModelLoadError(f"the checkpoint's FP8 quantization_config has {key}={value!r}, which is not read "
                                 "yet", "quantize the model's bfloat16 release")


def _block_size(value: object) -> tuple[int, int] | None:
    """``weight_block_size`` as ``(rows, cols)``; None (per tensor) when the config says null, transformers'
    default when the key is absent."""
    if value is _NO_BLOCK_KEY:
        return DEFAULT_FP8_BLOCK
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2 \
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise ModelLoadError(f"quantization_config.weight_block_size is {value!r}, not [rows, cols] of two positive "
                         "integers", "restore config.json from the model's repo")


def _activation_scheme(q: dict) -> str:
    scheme = str(q.get("activation_scheme") or "dynamic").lower()
    if scheme not in ("dynamic", "static"):
        raise ModelLoadError(f"quantization_config.activation_scheme is {q.get('activation_scheme')!r}, not dynamic "
                             "or static", "restore config.json from the model's repo")
    return scheme


def _not_converted(q: dict) -> tuple[str, ...]:
    """The module patterns a config says are stored as plain floats, from every key releases use for them."""
    out: list[str] = []
    for key in ("modules_to_not_convert", "ignored_layers", "ignore"):
        value = q.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ModelLoadError(f"quantization_config.{key} is {value!r}, not a list of module names",
                                 "restore config.json from the model's repo")
        out += value
    return tuple(out)


def _fp8_layout(encoding: SourceEncoding, stored: Mapping[str, StoredTensor]
                ) -> tuple[dict[str, EncodedTensor], set[str]]:
    """Every e4m3 tensor with its one scale; activation scales hidden (static) or refused (dynamic); a scale
    beside a tensor that is not FP8 refused."""
    fbgemm = encoding.quant_method == "fbgemm_fp8"
    suffixes = _FBGEMM_SCALE_SUFFIXES if fbgemm else _FP8_SCALE_SUFFIXES
    encoded: dict[str, EncodedTensor] = {}
    hidden: set[str] = set()
    for name, t in stored.items():
        if t.dtype != FP8_E4M3:
            continue
        found = [name + s for s in suffixes if name + s in stored]
        if not found:
            raise ModelLoadError(f"FP8 tensor {name} has no scale ({' or '.join(name + s for s in suffixes)})",
                                 _FIX_REFETCH)
        if len(found) > 1:
            raise ModelLoadError(f"FP8 tensor {name} has two scales ({found[0]} and {found[1]})",
                                 "keep the one the release's quantization_config names: restore the release")
        scale = found[0]
        encoded[name] = (_fbgemm_entry if fbgemm else _fp8_entry)(name, t, scale, stored[scale], encoding)
        hidden.add(scale)
    for name in stored:
        if name in hidden:
            continue
        base = next((name.removesuffix(s) for s in _FP8_SCALE_SUFFIXES if name.endswith(s)), None)
        if base is not None and base in stored:
            raise ModelLoadError(f"{name} looks like the scale of {base}, which is stored as {stored[base].dtype}, "
                                 f"not as a {encoding.quant_method} weight with that scale name", _FIX_REFETCH)
        if not fbgemm and name.endswith(_ACTIVATION_SCALES):
            if encoding.activation_scheme != "static":
                raise ModelLoadError(f"{name} is an activation scale, but the quantization_config's "
                                     "activation_scheme is dynamic", "restore config.json from the model's repo")
            hidden.add(name)
    return encoded, hidden


def _check_scale_dtype(scale: str, info: StoredTensor) -> None:
    if info.dtype not in _FLOAT_SCALES:
        raise ModelLoadError(f"scale {scale} is stored as {info.dtype}; only float32 / bfloat16 / float16 scales are "
                             "read", "quantize the model's bfloat16 release")


def _fp8_entry(name: str, t: StoredTensor, scale: str, info: StoredTensor, encoding: SourceEncoding
               ) -> EncodedTensor:
    """A finegrained fp8 tensor: one scale (per tensor), or one per block of the last two dimensions."""
    _check_scale_dtype(scale, info)
    if math.prod(info.shape) == 1:
        return EncodedTensor(name, name, scale, t.shape, "fp8-tensor")
    block = encoding.weight_block_size
    if block is None:
        raise ModelLoadError(f"scale {scale} has shape {list(info.shape)}, but weight_block_size is null (one scale "
                             "per tensor)", "restore config.json from the model's repo")
    if len(t.shape) < 2:
        raise ModelLoadError(f"FP8 tensor {name} {list(t.shape)} has {math.prod(info.shape)} scales; block scales "
                             "need a matrix", _FIX_REFETCH)
    rows, cols = t.shape[-2:]
    want = (*t.shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
    if tuple(info.shape) != want:
        raise ModelLoadError(f"scale {scale} has shape {list(info.shape)}; a {list(t.shape)} weight in "
                             f"{list(block)} blocks needs {list(want)}",
                             f"the weights do not match weight_block_size: {_FIX_REFETCH}")
    return EncodedTensor(name, name, scale, t.shape, "fp8-block", block)


def _fbgemm_entry(name: str, t: StoredTensor, scale: str, info: StoredTensor, encoding: SourceEncoding
                  ) -> EncodedTensor:
    """An fbgemm fp8 linear weight ``[out, in]`` with one scale per output row, ``[out, 1]``."""
    _check_scale_dtype(scale, info)
    if len(t.shape) != 2 or tuple(info.shape) != (t.shape[0], 1):
        raise ModelLoadError(f"scale {scale} has shape {list(info.shape)}; an fbgemm_fp8 weight {list(t.shape)} "
                             "needs one scale per output row, [out, 1]", _FIX_REFETCH)
    return EncodedTensor(name, name, scale, t.shape, "fp8-channel")


def _mxfp4_layout(stored: Mapping[str, StoredTensor]) -> tuple[dict[str, EncodedTensor], set[str]]:
    """Every ``<name>_blocks`` with its ``<name>_scales``; the logical ``<name>`` has transformers' dequantized
    shape: ``[..., groups * 32]`` with dimensions 1 and 2 swapped (GPT-OSS experts: ``[experts, in, out]``)."""
    encoded: dict[str, EncodedTensor] = {}
    hidden: set[str] = set()
    for name, t in stored.items():
        if t.dtype == FP8_E4M3:
            raise ModelLoadError(f"tensor {name} is stored as FP8, but the quantization_config says mxfp4",
                                 "restore config.json from the model's repo")
        if name.endswith(_SCALES) and name.removesuffix(_SCALES) + _BLOCKS not in stored:
            raise ModelLoadError(f"MXFP4 scales {name} have no {name.removesuffix(_SCALES) + _BLOCKS}", _FIX_REFETCH)
        if not name.endswith(_BLOCKS):
            continue
        base = name.removesuffix(_BLOCKS)
        scales = base + _SCALES
        if scales not in stored:
            raise ModelLoadError(f"MXFP4 blocks {name} have no {scales}", _FIX_REFETCH)
        if base in stored:
            raise ModelLoadError(f"{base} is stored both as a tensor and as MXFP4 blocks", _FIX_REFETCH)
        encoded[base] = _mxfp4_entry(base, t, scales, stored[scales])
        hidden |= {name, scales}
    return encoded, hidden


def _mxfp4_entry(base: str, blocks: StoredTensor, scales: str, info: StoredTensor) -> EncodedTensor:
    name = base + _BLOCKS
    if blocks.dtype != "U8" or info.dtype != "U8":
        raise ModelLoadError(f"MXFP4 tensor {base} is stored as {blocks.dtype} blocks / {info.dtype} scales, not "
                             "U8 / U8", _FIX_REFETCH)
    shape = tuple(blocks.shape)
    if len(shape) < 4 or shape[-1] != MXFP4_BLOCK_BYTES:
        raise ModelLoadError(f"MXFP4 blocks {name} have shape {list(shape)}, not [experts, rows, groups, "
                             f"{MXFP4_BLOCK_BYTES}]", _FIX_REFETCH)
    if tuple(info.shape) != shape[:-1]:
        raise ModelLoadError(f"MXFP4 scales {scales} have shape {list(info.shape)}; blocks {list(shape)} need "
                             f"{list(shape[:-1])}", _FIX_REFETCH)
    flat = [*shape[:-2], shape[-2] * MXFP4_GROUP]
    flat[1], flat[2] = flat[2], flat[1]
    return EncodedTensor(base, name, scales, tuple(flat), "mxfp4")


#: e8m0 exponents as float32 scales, by byte: ``2 ** (byte - 127)`` (the NaN byte is refused before use).
_E8M0_SCALES = torch.tensor([math.ldexp(1.0, e - E8M0_BIAS) for e in range(E8M0_NAN)] + [math.nan],
                            dtype=torch.float32)


def _decode_mxfp4(entry: EncodedTensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """FP4 codes times their group's power of two, expert by expert (so the float32 copy stays one expert's)."""
    if bool((scales == E8M0_NAN).any()):
        raise ModelLoadError(f"MXFP4 scales {entry.scales} hold {int((scales == E8M0_NAN).sum())} NaN exponent(s)",
                             f"the release is corrupt: {_FIX_REFETCH}")
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)
    out = torch.empty(entry.shape, dtype=DEQUANTIZED_DTYPE)
    for i in range(blocks.shape[0]):
        b = blocks[i]
        values = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1).flatten(-2)
        values = (values * _E8M0_SCALES[scales[i].long()].unsqueeze(-1)).flatten(-2)
        out[i] = values.transpose(0, 1).to(DEQUANTIZED_DTYPE)
    return out


def _check_converted(entry: EncodedTensor, patterns: tuple[str, ...]) -> None:
    """Refuse an encoded tensor in a module the config says is stored as plain floats: transformers would load its
    codes as floats, so the release and its config disagree."""
    module = entry.name.rpartition(".")[0]
    for pattern in patterns:
        if _names_module(pattern, module):
            raise ModelLoadError(f"{entry.codes} is stored encoded, but quantization_config lists its module in "
                                 f"'{pattern}' (stored as plain floats)", "restore config.json from the model's repo")


def _names_module(pattern: str, module: str) -> bool:
    """Whether a not-converted entry names ``module`` as transformers matches them: a regex from the start up to a
    module boundary, or a plain suffix (a ``re:`` prefix, as compressed-tensors writes, marks a regex)."""
    pattern = pattern.removeprefix("re:")
    if module.endswith(pattern):
        return True
    try:
        return re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module) is not None
    except re.error:
        raise ModelLoadError(f"quantization_config names the module pattern '{pattern}', which is not a valid "
                             "regular expression", "restore config.json from the model's repo") from None
