"""Quantize a model into the canonical checkpoint, one decoder block at a time.

Calibration-free methods stream: read block i, quantize its linears, write shard i, release it. Calibrated methods
(GPTQ, AWQ) run the calibration activations through the same block first (``runner.BlockRunner``), with the
method's registered block procedure (``procedures``). Either way
peak memory is one block's weights (plus the activations) whatever the depth of the model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from turboquant.device import ActivationStore, claimed_device, describe_device, resolve_budget
from turboquant.errors import ConfigError
from turboquant.fsutil import atomic_output_dir
from turboquant.io.calibration import CalibrationSet, check_vocab
from turboquant.io.checkpoint import CheckpointWriter, dtype_name
from turboquant.io.experts import expert_modules
from turboquant.io.model import check_finite, open_model, OpenedModel
from turboquant.methods import get_method, MethodConfig
from turboquant.methods.base import group_fallbacks, WeightQuantConfig, with_group_overrides
from turboquant.methods.mixed import base_method, MixedPrecisionConfig, module_config
from turboquant.quantize import sensitivity as mixed_precision
from turboquant.quantize.procedures import check_structure, needs_float_stream, procedure_for
from turboquant.quantize.runner import BlockRunner, routed_tokens
from turboquant.tensor import naming_overflows, QuantScheme

logger = logging.getLogger(__name__)


def quantize(
    model: str | Path | OpenedModel,
    config: MethodConfig,
    out: str | Path,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    calib: CalibrationSet | None = None,
    sequential: bool = True,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    activation_budget: int | str | None = None,
) -> Path:
    """Quantize ``model`` with ``config`` into the canonical checkpoint at ``out`` (written atomically).

    Calibrated methods need ``calib``; ``sequential=False`` feeds every block the float model's activations
    instead of those of the already-quantized blocks before it. ``device`` (``device.resolve_device``: None is
    ``$TURBOQUANT_DEVICE`` or auto) holds the block, its statistics and the solves; calibration activations stay
    there within ``activation_budget`` bytes (``device.resolve_budget``) and in host memory beyond it. On a
    machine with several GPUs an unpinned device (auto, cuda) is a GPU no other run holds (``claimed_device``).
    """
    spec = get_method(config.method)
    mixed = isinstance(config, MixedPrecisionConfig)
    if spec.needs_calibration and calib is None and not (mixed and config.plan and not get_method(config.base).needs_calibration):
        raise ConfigError(f"method '{spec.name}' needs calibration data", "pass --calib FILE or --data FILE")
    with claimed_device(device) as dev:
        store = ActivationStore(dev, resolve_budget(activation_budget, dev))
        opened = model if isinstance(model, OpenedModel) else open_model(model, revision, allow_pickle=allow_pickle)
        config, fallbacks = planned_config(opened, config)
        if calib is not None:
            check_vocab(calib, int(opened.config.get("vocab_size", 0)) or 1 << 62)
        out = Path(out)
        n_shards = opened.n_layers + 1
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            sensitivity = None
            if mixed:  # measure and allocate first: the budget is shared by every layer of the model
                config, sensitivity = mixed_precision.resolve(opened, config, calib, batch_size, progress,
                                                              store=store)
            writer = CheckpointWriter(tmp, n_shards)
            label = f"{spec.name} {getattr(config, 'scheme', '') and config.scheme.describe()}"
            bar = _BlockProgress(tqdm(total=n_shards, desc=label, unit="block", disable=not progress, leave=False),
                                 spec.name, out.name)
            experts: dict[str, Any] = {}
            if get_method(base_method(config)).needs_calibration:
                fallbacks += _quantize_calibrated(opened, config, calib, writer, sequential, batch_size, bar.update,
                                                  store, experts)
            else:
                for i in range(opened.n_layers):
                    tensors = opened.block(i)
                    writer.write_shard(i, _process_block(opened, i, tensors, config, writer, dev))
                    del tensors
                    bar.update()
            rest = opened.checkpoint.load(opened.checkpoint.non_block_names(opened.arch))
            check_finite(rest)
            writer.write_shard(opened.n_layers, _process_plain(rest, config))
            del rest
            bar.update()
            bar.close()
            meta = _metadata(opened, config)
            meta["fallbacks"] = fallbacks
            if opened.arch.n_experts:
                meta["experts"] = {"per_module": opened.arch.n_experts, "routers_kept": list(opened.arch.routers),
                                   **experts}
            meta["device"] = describe_device(dev)
            if mixed:
                shapes = {m: info["shape"] for m, info in writer.modules.items()}
                meta["mixed_precision"] = mixed_precision.summary(config, shapes, sensitivity)
            if calib is not None:
                meta["calibration"] = {"recipe": calib.recipe.to_dict(), **calib.provenance,
                                       "sequential": sequential}
            writer.finish(meta, opened.aux_files(), _config_updates(opened, config), _config_drops(opened))
    return out


class _BlockProgress:
    """The tqdm bar plus one ``turboquant`` log line per finished block (Prefect shows them in the task's logs)."""

    def __init__(self, bar: Any, method: str, name: str) -> None:
        self.bar, self.method, self.name, self.done = bar, method, name, 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        now = time.perf_counter()
        logger.info("%s %s: shard %d/%d done in %.1f s (%.1f s total)", self.method, self.name, self.done,
                    self.bar.total, now - self.last, now - self.start)
        self.last = now

    def close(self) -> None:
        self.bar.close()


def _quantize_calibrated(
    opened: OpenedModel,
    config: MethodConfig,
    calib: CalibrationSet,
    writer: CheckpointWriter,
    sequential: bool,
    batch_size: int,
    tick: Callable[[], Any],
    store: ActivationStore,
    experts: dict[str, Any],
) -> list[str]:
    """Block by block: load, (capture + solve) with the method's procedure, write the shard, advance inputs.

    Returns what the procedure changed from what was asked (for the manifest and the card); fills ``experts``
    with each mixture-of-experts module's routed token counts (for the manifest). Solvers' results come back to
    the host for writing."""
    procedure = procedure_for(config)
    runner = BlockRunner.start(opened, calib.input_ids, batch_size=batch_size, store=store)
    runner.all_experts = bool(getattr(config, "calibrate_all_experts", True))
    if needs_float_stream(opened, config):
        runner.keep_float_stream()
    for i in range(opened.n_layers):
        block = runner.load_block(i)
        check_finite({opened.arch.block_prefix(i) + k: v for k, v in block.state_dict().items()})
        prefix = opened.arch.block_prefix(i)
        float_out = None
        if expert_modules(block):
            with routed_tokens(block) as counts:
                float_out = runner.forward(block)
            runner.notes.setdefault("routed_tokens", {}).update(
                {prefix + name: c.tolist() for name, c in counts.items()})
        if sequential:
            float_out = None
        elif float_out is None:
            float_out = runner.forward(block)
        quantized, quantized_out = procedure(runner, block, opened, config, prefix)
        if sequential:
            outputs = quantized_out if quantized_out is not None else runner.forward(block)
        else:
            outputs = float_out
        del quantized_out
        tensors: dict[str, torch.Tensor] = {}
        for name, t in block.state_dict().items():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in quantized:
                qt = quantized[module].to("cpu")
                qt.dtype = opened.checkpoint_dtype(prefix + name)
                tensors.update(writer.add_quantized(prefix + module, qt))
            else:
                tensors[prefix + name] = t.detach().to("cpu", opened.checkpoint_dtype(prefix + name))
        writer.write_shard(i, tensors)
        runner.release_block(i)
        runner.advance(outputs)
        tick()
    if "routed_tokens" in runner.notes:
        experts["routed_tokens"] = runner.notes["routed_tokens"]
        experts["calibrate_all_experts"] = runner.all_experts
    return [f"AWQ scales not folded for {group} (no norm or linear produces its input alone): AWQ's clip search "
            "and quantizer only" for group in runner.notes.get("awq_unscaled", [])] \
        + runner.notes.get("expert_fallbacks", []) \
        + (["GPTAQ's float-model term not used for expert linears: with routed-only statistics "
            "(calibrate_all_experts: false) the float and quantized paths route different tokens"]
           if runner.notes.get("unpaired_experts") else [])


def planned_config(opened: OpenedModel, config: MethodConfig) -> tuple[MethodConfig, list[str]]:
    """``config`` as it will run on ``opened`` (per-layer groups under ``indivisible``) and what that changed from
    what was asked; fails before any work when the scheme cannot cover a linear or the method's block procedure
    cannot run on the family. The plan check and triage run the same."""
    fallbacks: list[str] = []
    if isinstance(config, WeightQuantConfig):
        widths = opened.linear_inputs()
        config = with_group_overrides(config, widths)
        fallbacks = group_fallbacks(config, widths)
    if isinstance(config, (WeightQuantConfig, MixedPrecisionConfig)):
        _check_scheme_fits(opened, config)
    check_structure(opened, config)
    return config, fallbacks


def _check_scheme_fits(opened: OpenedModel, config: WeightQuantConfig | MixedPrecisionConfig) -> None:
    """Fail before any work when the scheme cannot cover a linear (e.g. a group size not dividing in_features)."""
    for module in opened.linear_inputs():
        name = f"{module}.weight"
        for scheme in _schemes(config, module):
            scheme.check_shape(opened.checkpoint.tensors[name].shape, name)


def _schemes(config: WeightQuantConfig | MixedPrecisionConfig, module: str) -> list[QuantScheme]:
    if isinstance(config, WeightQuantConfig):
        return [module_config(config, module).scheme]
    return [config.scheme_at(b) for b in config.candidate_bits]


def _process_block(
    opened: OpenedModel, index: int, tensors: dict[str, torch.Tensor], config: MethodConfig, writer: CheckpointWriter,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One streamed block: every planned linear solved on ``device`` (its result back on the host), the rest as read."""
    check_finite(tensors)
    spec = get_method(base_method(config))
    if spec.kind == "cast":
        return _process_plain(tensors, config)
    prefix = opened.arch.block_prefix(index)
    out: dict[str, torch.Tensor] = {}
    targets = {f"{prefix}{linear}.weight" for linear in opened.arch.linears_at(index)}
    for name, t in tensors.items():
        if name in targets:
            module = name.removesuffix(".weight")
            with naming_overflows(module):
                qt = spec.solver(t.to(device), module_config(config, module)).to("cpu")
                out.update(writer.add_quantized(module, qt))
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


def _config_drops(opened: OpenedModel) -> tuple[str, ...]:
    """A dequantized source's ``quantization_config`` describes weights the output no longer holds."""
    return ("quantization_config",) if opened.checkpoint.encoding is not None else ()


def _config_updates(opened: OpenedModel, config: MethodConfig) -> dict[str, Any]:
    cast_dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if config.method in cast_dtypes:
        return {"dtype": dtype_name(cast_dtypes[config.method])}
    return {}
