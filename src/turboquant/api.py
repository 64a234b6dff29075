"""``turboquant.quantize``: one call, one signature, every registered method, a module that runs on CPU back.

``quantize(model, method=..., **options)`` takes an ``nn.Module`` (a transformers model for the checkpoint
methods), a local model directory or a Hub repo id. ``options`` are the method's config keys (validated by its
frozen config dataclass: unknown keys and wrong types raise ``ConfigError`` naming the valid ones) plus the
dispatcher's own keys (``DISPATCH_OPTIONS``). What each kind of method does:

* ``fp16`` / ``bf16`` / ``rtn`` / ``gptq`` / ``awq`` / ``hqq`` (checkpoint methods): the canonical checkpoint
  quantizer writes a ``QuantizedCheckpoint`` (to ``save_dir``, atomically, or a temporary directory) which is
  loaded back with its weights dequantized — the exact weights every exported format reproduces. A module is
  first saved with ``save_pretrained`` (with its tokenizer, when its ``name_or_path`` holds one).
* ``int8-dynamic`` / ``int8-static``: transform a copy of the module in memory (any ``nn.Module``); static int8
  calibrates on ``calib_loader`` batches, or on ``calib_dataset`` token windows for a causal LM.
* Every calibrated method takes either ``calib_dataset`` or ``calib_loader``: the checkpoint methods turn a
  loader's token-id batches into a calibration set (recorded as ``<calib_loader>`` with the ids' sha256).
* ``bnb-int8`` / ``bnb-nf4`` / ``bnb-fp4``: transformers loads the model with a ``BitsAndBytesConfig``;
  ``save_dir`` keeps the transformers bitsandbytes checkpoint (reloaded from there, proving it reloads). A module
  that is not a transformers model has its linears swapped in memory.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from turboquant.errors import check_keys, ConfigError, DataError
from turboquant.fsutil import atomic_output_dir
from turboquant.io.calibration import build_calibration, calibration_from_batches, CalibrationRecipe, CalibrationSet
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.io.files import TOKENIZER_FILES, matching_files
from turboquant.io.loaders import load_model
from turboquant.io.model import open_model, resolve_model
from turboquant.methods import bnb, get_method, list_methods, MethodConfig, METHODS, MethodSpec
from turboquant.quantize import bnb as bnb_artifact
from turboquant.quantize.pipeline import quantize as quantize_checkpoint

#: keyword options of ``quantize`` that are not method config keys.
DISPATCH_OPTIONS = ("calib_dataset", "calib_loader", "calib_samples", "calib_seqlen", "dtype", "overwrite",
                    "revision", "save_dir")

__all__ = ["DISPATCH_OPTIONS", "list_methods", "quantize", "write_bnb_artifact"]


def quantize(
    model: nn.Module | str | Path,
    method: str,
    *,
    save_dir: str | Path | None = None,
    calib_dataset: Any = None,
    calib_loader: Iterable[Any] | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 2048,
    revision: str | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> nn.Module:
    """Quantize ``model`` with ``method`` and return a module in eval mode that runs forward on CPU.

    ``calib_dataset``: a ``CalibrationSet``, a calibration file from ``turboquant calibrate``, token ids
    ``[n, seqlen]``, text / JSON lines / Parquet file(s) or a Hub dataset id, or a list of strings
    (``calib_samples`` windows of ``calib_seqlen`` tokens are cut from text). ``calib_loader``: batches for any
    calibrated method (token ids ``[b, s]``, a mapping with ``input_ids``, or a tuple whose first item is the ids;
    ``int8-static`` also takes any args / kwargs its module's forward does), so swapping methods changes one word.
    ``dtype``: of the returned module (default: the cast's dtype for fp16/bf16, else the given module's dtype,
    else float32).
    """
    spec = get_method(method)
    cfg = build_config(spec, options)
    if spec.needs_calibration is False and (calib_dataset is not None or calib_loader is not None):
        raise ConfigError(f"method '{method}' takes no calibration data", "drop calib_dataset / calib_loader")
    if calib_dataset is not None and calib_loader is not None:
        raise ConfigError("both calib_dataset and calib_loader were given", "pass one of them")
    if spec.kind in ("cast", "weight"):
        if calib_loader is not None:
            calib_dataset = calibration_from_batches(calib_loader)
        return _via_checkpoint(model, spec, cfg, save_dir, calib_dataset, calib_samples, calib_seqlen, revision,
                               overwrite, dtype)
    if spec.kind == "transformers":
        return _bnb(model, cfg, save_dir, revision, overwrite)
    if save_dir is not None:
        raise ConfigError(f"method '{method}' has no on-disk form in TurboQuant",
                          "drop save_dir (keep the returned module, or pick bnb-int8 for a saved int8 checkpoint)")
    module = _as_module(model, revision, dtype)
    if not spec.needs_calibration:
        return spec.solver(module, cfg).eval()
    batches = calib_loader if calib_loader is not None else _lm_batches(module, calib_dataset, calib_samples,
                                                                        calib_seqlen)
    return spec.solver(module, cfg, batches).eval()


def build_config(spec: MethodSpec, options: dict[str, Any]) -> MethodConfig:
    """The method's validated config; an unknown key fails listing the method's keys and the dispatcher's."""
    known = [f.name for f in fields(spec.config_cls)]
    check_keys(options, known, f"unknown option(s) {{unknown}} for method '{spec.name}'",
               f"use method options {', '.join(sorted(known))} or dispatcher options {', '.join(DISPATCH_OPTIONS)}")
    return spec.config_cls.from_dict(options)


# --- checkpoint methods ----------------------------------------------------------------------------------------------


def _via_checkpoint(model: Any, spec: MethodSpec, cfg: MethodConfig, save_dir: Any, calib_dataset: Any,
                    samples: int, seqlen: int, revision: str | None, overwrite: bool,
                    dtype: torch.dtype | None) -> nn.Module:

    cast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(spec.name)
    with tempfile.TemporaryDirectory(prefix="turboquant-") as work:
        src: Any = model
        if isinstance(model, nn.Module):
            src = _save_module(model, Path(work) / "src", spec.name)
            dtype = dtype or cast or _module_dtype(model)
            revision_arg = None
        else:
            revision_arg = revision
        opened = open_model(src, revision_arg)
        calib = None
        if spec.needs_calibration:
            calib = calibration_set(calib_dataset, opened.source.path, samples, seqlen, Path(work),
                                    opened.config.get("max_position_embeddings"))
        out = Path(save_dir) if save_dir is not None else Path(work) / "quantized"
        quantize_checkpoint(opened, cfg, out, overwrite=overwrite, progress=False, calib=calib)
        return QuantizedCheckpoint.open(out).load_model(dtype or cast or torch.float32).eval()


def _module_dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def _save_module(model: nn.Module, path: Path, method: str) -> Path:
    """``save_pretrained`` of a transformers model, with the tokenizer files of its ``name_or_path`` (if any)."""
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ConfigError(f"method '{method}' quantizes transformers causal LMs; got a {type(model).__name__}",
                          "pass a transformers model, a model directory or a Hub id, or use int8-dynamic, "
                          "int8-static or bnb-* for any nn.Module")
    model.save_pretrained(str(path), safe_serialization=True)
    origin = Path(str(getattr(model, "name_or_path", "") or ""))
    if str(origin) and origin.is_dir():
        for f in matching_files(origin, TOKENIZER_FILES):
            shutil.copyfile(f, path / f.name)
    return path


def calibration_set(data: Any, tokenizer_dir: Path, samples: int, seqlen: int, work: Path,
                    max_context: int | None = None):
    """A ``CalibrationSet`` from any of the forms ``quantize`` accepts as ``calib_dataset``."""

    if data is None:
        raise ConfigError("this method needs calibration data",
                          "pass calib_dataset (text files, a list of strings, token ids or a calibration file)")
    if isinstance(data, CalibrationSet):
        return data
    if isinstance(data, torch.Tensor):
        ids = data if data.dim() == 2 else data.reshape(1, -1)
        if ids.is_floating_point() or ids.shape[1] < 2:
            raise DataError(f"calib_dataset token ids of shape {tuple(data.shape)} / {data.dtype} are unusable",
                            "pass integer token ids [n_samples, seqlen] with seqlen >= 2")
        recipe = CalibrationRecipe(("<token ids>",), n_samples=ids.shape[0], seqlen=ids.shape[1])
        return CalibrationSet(ids.long(), recipe, {})
    if isinstance(data, (str, Path)) and str(data).endswith(".safetensors") and _is_file(data):
        return CalibrationSet.load(data)
    if isinstance(data, (str, Path)):
        sources = (str(data),)
    elif isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, Path)) for d in data):
        if all(_is_file(d) for d in data):
            sources = tuple(str(d) for d in data)
        else:  # strings of text: one document each
            text_file = work / "calibration.txt"
            text_file.write_text("\n\n".join(str(d) for d in data), encoding="utf-8")
            sources = (str(text_file),)
    else:
        raise ConfigError(f"calib_dataset of type {type(data).__name__} is not supported",
                          "pass text files, a list of strings, token ids [n, seqlen] or a calibration file")
    recipe = CalibrationRecipe(sources, n_samples=samples, seqlen=seqlen)
    return build_calibration(recipe, tokenizer_dir, max_context)


def _is_file(text: str | Path) -> bool:
    """Whether ``text`` names an existing file (False for long strings of text, which no path can be)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


# --- module methods ----------------------------------------------------------------------------------------------


def _as_module(model: Any, revision: str | None, dtype: torch.dtype | None) -> nn.Module:
    """The model as a torch module: as given, or loaded (safetensors only) from a directory / Hub id."""
    if isinstance(model, nn.Module):
        return model

    return load_model(resolve_model(model, revision).path, dtype or torch.float32).eval()


def _lm_batches(module: nn.Module, calib_dataset: Any, samples: int, seqlen: int) -> list[torch.Tensor]:
    """Calibration windows for a causal LM, one window a batch (``int8-static`` without a ``calib_loader``)."""
    if calib_dataset is None:
        raise ConfigError("method 'int8-static' needs calibration batches",
                          "pass calib_loader (an iterable of input batches) or calib_dataset (for a causal LM)")
    origin = Path(str(getattr(module, "name_or_path", "") or "."))
    with tempfile.TemporaryDirectory(prefix="turboquant-") as work:
        calib = calibration_set(calib_dataset, origin, samples, seqlen, Path(work),
                                getattr(getattr(module, "config", None), "max_position_embeddings", None))
    return [row.unsqueeze(0) for row in calib.input_ids]


def _bnb(model: Any, cfg: MethodConfig, save_dir: Any, revision: str | None, overwrite: bool) -> nn.Module:
    if isinstance(model, nn.Module) and not hasattr(model, "save_pretrained"):
        if save_dir is not None:
            raise ConfigError(f"a {type(model).__name__} has no transformers checkpoint form",
                              "drop save_dir, or pass a transformers model")
        return bnb.swap_linears(model, cfg)
    with tempfile.TemporaryDirectory(prefix="turboquant-") as work:
        src = _save_module(model, Path(work) / "src", cfg.method) if isinstance(model, nn.Module) else model
        rev = None if isinstance(model, nn.Module) else revision
        if save_dir is None:
            return bnb_artifact.load_quantized(open_model(src, rev).source.path, cfg)
        out = write_bnb_artifact(src, cfg, save_dir, revision=rev, overwrite=overwrite)
    return reload_bnb(out)


def write_bnb_artifact(model: str | Path, cfg: MethodConfig, out: str | Path, *, revision: str | None = None,
                       overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """Write the transformers bitsandbytes checkpoint of ``model`` to ``out`` atomically (the CLI's path too)."""

    if get_method(cfg.method).kind != "transformers":
        raise ConfigError(f"method '{cfg.method}' has no checkpoint form in TurboQuant",
                          f"call turboquant.quantize(model, method='{cfg.method}') in Python, or pick a checkpoint "
                          f"method or one of {sorted(n for n, s in METHODS.items() if s.kind == 'transformers')}")
    opened = open_model(model, revision, allow_pickle=allow_pickle)
    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        bnb_artifact.save_artifact(opened.source.path, cfg, tmp, opened.aux_files())
    return out


def reload_bnb(path: str | Path) -> nn.Module:
    """A saved bitsandbytes checkpoint loaded back through transformers on CPU (its config says how)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map="cpu").eval()
