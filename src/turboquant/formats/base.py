"""What every export format shares: a registry, the up-front scheme check, atomic writing and the manifest.

A format reads the canonical quantized checkpoint (``checkpoint.QuantizedCheckpoint``), never the source model and
never calibration data. Its ``check`` runs before any work and raises a ``FormatError`` naming what would fit
when the checkpoint's schemes cannot be represented exactly; its ``write`` packs into a fresh directory that
``export`` turns into the output only when everything (files, tokenizer, manifest) was written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from turboquant.io.experts import expert_of
from turboquant.io.files import CARRIED_FILE_PATTERNS, matching_files
from turboquant.io.checkpoint import METADATA_FILE, QuantizedCheckpoint, ShardWriter
from turboquant import faults
from turboquant.errors import check_keys, ConfigError
from turboquant.fsutil import atomic_output_dir
from turboquant.io.manifest import MANIFEST_FILE, write_manifest
from turboquant.tensor import QuantizedTensor, QuantScheme



class FormatError(ConfigError):
    """A quantized checkpoint (or option) the requested format cannot represent."""


Check = Callable[[QuantizedCheckpoint, dict[str, Any]], None]
#: Writes the artifact; may return details recorded in the manifest (e.g. GGUF's type and conversion route).
Write = Callable[[QuantizedCheckpoint, Path, dict[str, Any]], "dict[str, Any] | None"]


@dataclass(frozen=True)
class FormatSpec:
    """A registered export format.

    ``check(ckpt, options)`` raises ``FormatError`` before any work; ``write(ckpt, out_dir, options)`` writes the
    artifact's own files into ``out_dir`` (an empty temporary directory). ``options`` maps each accepted option
    to its default.
    """

    name: str
    description: str
    runtime: str
    check: Check
    write: Write
    options: dict[str, Any] = field(default_factory=dict)


FORMATS: dict[str, FormatSpec] = {}


def register_format(name: str, *, description: str, runtime: str, check: Check,
                    options: dict[str, Any] | None = None) -> Callable[[Write], Write]:
    """Decorator registering ``write`` as format ``name``."""

    def deco(write: Write) -> Write:
        if name in FORMATS:
            raise ValueError(f"format {name!r} registered twice")
        FORMATS[name] = FormatSpec(name, description, runtime, check, write, dict(options or {}))
        return write

    return deco


def get_format(name: str) -> FormatSpec:
    if name not in FORMATS:
        raise ConfigError(f"unknown format '{name}'", f"use one of: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def resolve_options(spec: FormatSpec, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over the format's defaults; unknown keys fail listing the valid ones."""
    check_keys(options, spec.options, f"format '{spec.name}' has no option(s) {{unknown}}",
               f"use only its options ({', '.join(sorted(spec.options)) or 'none'})")
    return {**spec.options, **{k: v for k, v in options.items() if v is not None}}


def export(qdir: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False, **options: Any) -> Path:
    """Write the quantized checkpoint at ``qdir`` as format ``fmt`` into ``out`` (whole, or not at all).

    The checkpoint's completeness and the format's check run first, so a damaged checkpoint or an impossible
    combination fails before anything is written.
    """
    spec = get_format(fmt)
    opts = resolve_options(spec, options)
    ckpt = QuantizedCheckpoint.open(qdir)
    ckpt.check_complete()
    spec.check(ckpt, opts)
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        details = spec.write(ckpt, tmp, opts)
        carry_files(ckpt.path, tmp)
        faults.point("export.before_manifest")
        write_manifest(tmp, ckpt, fmt, opts, details or {})
    return Path(out)


def carry_files(src: Path, dst: Path) -> None:
    """Copy the source model's tokenizer, chat template, generation config and license files not yet in ``dst``."""
    for f in matching_files(src, CARRIED_FILE_PATTERNS):
        if not (dst / f.name).exists():
            shutil.copyfile(f, dst / f.name)


# ---------------------------------------------------------------------------------------------------------------
# Helpers for checks
# ---------------------------------------------------------------------------------------------------------------


def schemes(ckpt: QuantizedCheckpoint) -> set[QuantScheme]:
    """The distinct schemes of the quantized modules (empty for a float / cast checkpoint)."""
    return {ckpt.scheme(m) for m in ckpt.modules}


def uniform_scheme(ckpt: QuantizedCheckpoint, fmt: str) -> QuantScheme:
    """The one scheme every quantized module uses; fails for float checkpoints and mixed precision."""
    found = schemes(ckpt)
    if not found:
        raise FormatError(f"{ckpt.path} holds no quantized weights (method '{ckpt.method}')",
                          f"quantize with a weight method (rtn, gptq, awq, hqq) before exporting to {fmt}")
    if len(found) > 1:
        listed = ", ".join(sorted(s.describe() for s in found))
        raise FormatError(f"{ckpt.path} mixes schemes ({listed}) and format {fmt} holds one per model",
                          "export it to gptq, compressed-tensors, mlx, onnx or gguf (a scheme per layer), "
                          "or re-quantize without --target-bpw")
    return found.pop()


def has_act_order(ckpt: QuantizedCheckpoint) -> bool:
    return any(info.get("act_order") for info in ckpt.modules.values())


def has_fractional_zero(ckpt: QuantizedCheckpoint) -> bool:
    return any(info.get("fractional_zero") for info in ckpt.modules.values())


@dataclass
class Shard:
    """One canonical shard's content: plain tensors and quantized modules (a decoder block, or the rest)."""

    index: int
    total: int
    plain: dict[str, torch.Tensor]
    quantized: dict[str, QuantizedTensor]


def iter_shards(ckpt: QuantizedCheckpoint) -> Iterator[Shard]:
    """The checkpoint shard by shard, so that an exporter holds one decoder block at a time."""
    files = sorted({info.file for info in ckpt.tensors.tensors.values()})
    plain_names = set(ckpt.plain_names())
    for i, f in enumerate(files):
        names = [n for n, info in ckpt.tensors.tensors.items() if info.file == f]
        modules = sorted({m for m in ckpt.modules if f"{m}.qcodes" in names})
        plain = ckpt.tensors.load([n for n in names if n in plain_names])
        yield Shard(i, len(files), plain, {m: ckpt.quantized_tensor(m) for m in modules})


def write_packed_shards(ckpt: QuantizedCheckpoint, out: Path,
                        pack: Callable[[QuantizedTensor], dict[str, torch.Tensor]],
                        plain: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = dict,
                        regroup: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = dict) -> None:
    """Write the checkpoint shard by shard: each module's ``pack(qt)`` tensors (named ``module.key``) beside the
    shard's ``plain(tensors)``, all passed through ``regroup`` (e.g. experts stacked), then the index — the loop
    every safetensors-based format shares."""
    writer = None
    for shard in iter_shards(ckpt):
        writer = writer or ShardWriter(out, shard.total, fault="export.shard_written", single_file=True)
        tensors = plain(shard.plain)
        for module, qt in shard.quantized.items():
            tensors.update({f"{module}.{k}": v for k, v in pack(qt).items()})
        writer.write(shard.index, regroup(tensors))
    writer.write_index()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def refuse_experts(ckpt: QuantizedCheckpoint, fmt: str, why: str) -> None:
    """Refuse a mixture-of-experts checkpoint for a format whose runtime here would not load its experts
    quantized (``why`` names the runtime and what it does instead)."""
    experts = [m for m in ckpt.modules if expert_of(m) is not None]
    if experts:
        raise FormatError(f"the {fmt} export of '{ckpt.config.get('model_type')}' cannot carry its {len(experts)} "
                          f"expert linears: {why}", "export compressed-tensors for mixture-of-experts releases")


def source_config(ckpt: QuantizedCheckpoint) -> dict[str, Any]:
    """The model's config.json as stored in the canonical checkpoint, without TurboQuant's own keys."""
    config = dict(ckpt.config)
    config.pop("quantization_config", None)
    return config


__all__ = ["FORMATS", "MANIFEST_FILE", "METADATA_FILE", "FormatError", "FormatSpec", "Shard", "carry_files", "export",
           "get_format", "has_act_order", "has_fractional_zero", "iter_shards", "refuse_experts", "register_format", "schemes",
           "uniform_scheme", "write_packed_shards"]
