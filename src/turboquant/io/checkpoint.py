"""The canonical on-disk form of a quantized model, which every exporter reads.

A directory holding:

* ``model-XXXXX-of-YYYYY.safetensors`` shards (one per decoder block, then one for the rest) with, per quantized
  linear ``M``: ``M.qcodes`` (uint8 bit stream along the input dimension, see ``tensor.pack_bits``), ``M.qscale``
  (float16), ``M.qzero`` (uint8) and optionally ``M.g_idx`` (int32); every other tensor under its original name;
* ``model.safetensors.index.json`` (the standard weight map);
* ``turboquant.json``: method and config, per-module scheme, shape and dtype, and the source model;
* the source's config, generation config, tokenizer and license files, unchanged.

Cast methods (fp16/bf16) store plain tensors only, so their directory is also an ordinary HF checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import safetensors.torch

from turboquant import faults
from turboquant._version import __version__
from turboquant.errors import ModelLoadError
from turboquant.io.arch import arch_for
from turboquant.io.model import LazyCheckpoint, read_config
from turboquant.io.skeleton import build_skeleton, materialize
from turboquant.tensor import QuantizedTensor, QuantScheme

METADATA_FILE = "turboquant.json"
INDEX_FILE = "model.safetensors.index.json"
FORMAT_NAME = "turboquant-canonical"
FORMAT_VERSION = 1
PACKING = "uint8 little-endian bit stream along in_features"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ModelLoadError(f"unknown dtype '{name}' in {METADATA_FILE}", "re-create the quantized checkpoint")
    return dtype


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """Writes safetensors shards one at a time (so only one block is ever held) and the standard weight index — the
    one shard writer, shared by the canonical checkpoint and every safetensors-based format.

    ``single_file``: a lone shard is named ``model.safetensors`` and gets no index (what transformers writes);
    ``fault``: the kill point reached after each shard (the fault-injection tests stop a run there).
    """

    def __init__(self, root: Path, total: int, *, fault: str, single_file: bool = False) -> None:
        self.root, self.total, self.fault, self.single_file = root, total, fault, single_file
        self.weight_map: dict[str, str] = {}
        self.size = 0

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        name = "model.safetensors" if self.single_file and self.total == 1 else shard_name(index, self.total)
        tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
        safetensors.torch.save_file(tensors, str(self.root / name), metadata={"format": "pt"})
        (self.root / name).chmod(0o644)
        faults.point(self.fault)
        for key, t in tensors.items():
            self.weight_map[key] = name
            self.size += t.numel() * t.element_size()

    def write_index(self) -> None:
        """``model.safetensors.index.json`` (none for a lone ``model.safetensors``)."""
        if self.single_file and self.total == 1:
            return
        index = {"metadata": {"total_size": self.size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.root / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class CheckpointWriter:
    """Writes the canonical checkpoint: its shards one at a time, then the index and metadata."""

    def __init__(self, root: Path, n_shards: int) -> None:
        self.root = root
        self.shards = ShardWriter(root, n_shards, fault="quantize.shard_written")
        self.modules: dict[str, dict[str, Any]] = {}

    def add_quantized(self, module: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """Record a quantized module and return its tensors for the current shard."""
        self.modules[module] = {
            "shape": list(qt.shape),
            "dtype": dtype_name(qt.dtype),
            "scheme": qt.scheme.to_dict(),
            "act_order": qt.g_idx is not None,
            "fractional_zero": not qt.integer_zero,
        }
        return qt.to_tensors(module)

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self.shards.write(index, tensors)

    def finish(self, metadata: dict[str, Any], aux_files: list[Path], config_updates: dict[str, Any],
               config_drops: tuple[str, ...] = ()) -> None:
        """Index, the source's files (config.json with ``config_updates`` set and ``config_drops`` removed: a
        dequantized source's ``quantization_config``), then the metadata, last."""
        self.shards.write_index()
        for f in aux_files:
            shutil.copyfile(f, self.root / f.name)
        if config_updates or config_drops:
            cfg_path = self.root / "config.json"
            config = json.loads(cfg_path.read_text())
            config.update(config_updates)
            for key in config_drops:
                config.pop(key, None)
            cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        faults.point("quantize.before_metadata")
        full = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "turboquant_version": __version__,
            "packing": PACKING,
            **metadata,
            "modules": dict(sorted(self.modules.items())),
        }
        (self.root / METADATA_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")


@dataclass
class QuantizedCheckpoint:
    """A canonical quantized model opened for reading; tensors are read lazily."""

    path: Path
    meta: dict[str, Any]
    tensors: LazyCheckpoint

    @classmethod
    def open(cls, path: str | Path) -> "QuantizedCheckpoint":
        path = Path(path)
        meta_path = path / METADATA_FILE
        if not meta_path.is_file():
            raise ModelLoadError(
                f"{path} is not a TurboQuant quantized checkpoint (no {METADATA_FILE})",
                "pass a directory written by `turboquant quantize`",
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{meta_path} is not valid JSON ({e})", "re-create the quantized checkpoint") from None
        if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(
                f"{meta_path} has format {meta.get('format')!r} v{meta.get('format_version')!r}",
                f"re-create it with this TurboQuant (format v{FORMAT_VERSION})",
            )
        return cls(path=path, meta=meta, tensors=LazyCheckpoint.open(path))

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def config(self) -> dict[str, Any]:
        return read_config(self.path)

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return self.meta["modules"]

    def scheme(self, module: str) -> QuantScheme:
        return QuantScheme.from_dict(self.modules[module]["scheme"])

    def quantized_tensor(self, module: str) -> QuantizedTensor:
        info = self.modules[module]
        names = [f"{module}.{s}" for s in ("qcodes", "qscale", "qzero", "g_idx") if f"{module}.{s}" in self.tensors.tensors]
        return QuantizedTensor.from_tensors(
            self.tensors.load(names), module, self.scheme(module), tuple(info["shape"]), dtype_from_name(info["dtype"])
        )

    def plain_names(self) -> list[str]:
        """Tensors stored as they are (norms, embeddings, unquantized linears)."""
        packed = {f"{m}.{s}" for m in self.modules for s in ("qcodes", "qscale", "qzero", "g_idx")}
        return [n for n in self.tensors.names() if n not in packed]

    def iter_quantized(self) -> Iterator[tuple[str, QuantizedTensor]]:
        for module in self.modules:
            yield module, self.quantized_tensor(module)

    def dequantized_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor of the model as a float state dict (quantized weights dequantized)."""
        state = self.tensors.load(self.plain_names())
        for module, qt in self.iter_quantized():
            state[f"{module}.weight"] = qt.dequantize(dtype or qt.dtype)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        return state

    def check_complete(self) -> None:
        """Refuse a checkpoint that is not what its plan promised: a linear of the model left unquantized (by a
        weight method), or a scale that is not a positive finite number (checked before every export)."""
        if not self.modules:
            return  # a dtype cast: nothing is quantized by design
        arch = arch_for(self.config, self.path)
        expected = set(arch.linear_names())
        missing = sorted(expected - set(self.modules))
        if missing:
            raise ModelLoadError(
                f"{len(missing)} of the model's {len(expected)} linears are not quantized in {self.path} "
                f"(first: {missing[0]})", "re-create the checkpoint with `turboquant quantize`")
        for module in sorted(self.modules):
            scale = self.tensors.load([f"{module}.qscale"])[f"{module}.qscale"].float()
            bad = ~(torch.isfinite(scale) & (scale > 0))
            if bool(bad.any()):
                raise ModelLoadError(f"{module}.qscale holds {int(bad.sum())} zero, negative or non-finite scale(s)",
                                     "the checkpoint is corrupt: re-create it with `turboquant quantize`")

    def load_model(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The transformers model with dequantized weights (what every runtime should reproduce)."""
        model = build_skeleton(self.path, dtype=dtype, real_buffers=True)
        materialize(model, self.dequantized_state_dict(dtype), dtype=dtype)
        return model
