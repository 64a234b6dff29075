"""Quantize a model into the canonical checkpoint, one decoder block at a time.

Calibration-free methods stream: read block i, quantize its linears, write shard i, release it. Peak memory is
one block's weights whatever the depth of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from turboquant.checkpoint import CheckpointWriter, dtype_name
from turboquant.errors import ConfigError
from turboquant.fsutil import atomic_output_dir
from turboquant.methods import MethodConfig, get_method
from turboquant.methods.base import WeightQuantConfig
from turboquant.model import OpenedModel, check_finite, open_model


def quantize(
    model: str | Path | OpenedModel,
    config: MethodConfig,
    out: str | Path,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Quantize ``model`` with ``config`` into the canonical checkpoint at ``out`` (written atomically)."""
    spec = get_method(config.method)
    if spec.needs_calibration:
        raise ConfigError(f"method '{spec.name}' needs calibration data", "pass --calib FILE or --data FILE")
    opened = model if isinstance(model, OpenedModel) else open_model(model, revision, allow_pickle=allow_pickle)
    if isinstance(config, WeightQuantConfig):
        _check_scheme_fits(opened, config)
    out = Path(out)
    n_shards = opened.n_layers + 1
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = CheckpointWriter(tmp, n_shards)
        bar = tqdm(total=n_shards, desc=f"{spec.name} {getattr(config, 'scheme', '') and config.scheme.describe()}",
                   unit="block", disable=not progress, leave=False)
        for i in range(opened.n_layers):
            tensors = opened.block(i)
            writer.write_shard(i, _process_block(opened, i, tensors, config, writer))
            del tensors
            bar.update()
        rest = opened.checkpoint.load(opened.checkpoint.non_block_names(opened.arch))
        check_finite(rest)
        writer.write_shard(opened.n_layers, _process_plain(rest, config))
        del rest
        bar.update()
        bar.close()
        writer.finish(_metadata(opened, config), opened.aux_files(), _config_updates(opened, config))
    return out


def _check_scheme_fits(opened: OpenedModel, config: WeightQuantConfig) -> None:
    """Fail before any work when the scheme cannot cover a linear (e.g. a group size not dividing in_features)."""
    for i in range(opened.n_layers):
        for linear in opened.arch.linears:
            name = f"{opened.arch.block_prefix(i)}{linear}.weight"
            config.scheme.check_shape(opened.checkpoint.tensors[name].shape, name)


def _process_block(
    opened: OpenedModel, index: int, tensors: dict[str, torch.Tensor], config: MethodConfig, writer: CheckpointWriter
) -> dict[str, torch.Tensor]:
    check_finite(tensors)
    spec = get_method(config.method)
    if spec.kind == "cast":
        return _process_plain(tensors, config)
    prefix = opened.arch.block_prefix(index)
    out: dict[str, torch.Tensor] = {}
    targets = {f"{prefix}{linear}.weight" for linear in opened.arch.linears}
    for name, t in tensors.items():
        if name in targets:
            module = name.removesuffix(".weight")
            out.update(writer.add_quantized(module, spec.solver(t, config)))
        else:
            out[name] = t
    return out


def _process_plain(tensors: dict[str, torch.Tensor], config: MethodConfig) -> dict[str, torch.Tensor]:
    spec = get_method(config.method)
    if spec.kind != "cast":
        return tensors
    return {k: spec.solver(v, config) for k, v in tensors.items()}


def _metadata(opened: OpenedModel, config: MethodConfig) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "method": config.method,
        "config": config.to_dict(),
        "architecture": opened.arch.name,
        "source": opened.source.describe(),
        "torch_version": torch.__version__,
    }
    if isinstance(config, WeightQuantConfig):
        meta["scheme"] = config.scheme.to_dict()
    return meta


def _config_updates(opened: OpenedModel, config: MethodConfig) -> dict[str, Any]:
    cast_dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if config.method in cast_dtypes:
        return {"dtype": dtype_name(cast_dtypes[config.method])}
    return {}
