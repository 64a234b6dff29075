"""Block procedures: how a calibrated weight method quantizes one loaded decoder block.

A method names its procedure on its registration (``MethodSpec.block_procedure``: ``HESSIAN`` for GPTQ,
``ACTIVATION_SCALES`` for AWQ); the modules of ``quantize/`` register one function per name here. The pipeline
looks the procedure up and never tests method names.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from turboquant.errors import ConfigError
from turboquant.io.model import OpenedModel
from turboquant.methods.base import MethodConfig, get_method
from turboquant.methods.mixed import base_method
from turboquant.quantize.runner import BlockRunner
from turboquant.tensor import QuantizedTensor

#: Quantizes one loaded block in place; returns its quantized tensors and, when it computed it on the way, the
#: quantized block's output over the calibration inputs (else None: the caller runs the block).
BlockProcedure = Callable[[BlockRunner, nn.Module, OpenedModel, MethodConfig, str],
                          tuple[dict[str, QuantizedTensor], torch.Tensor | None]]

#: Whether a procedure, for this model and config, needs the float model's activations carried beside the
#: quantized ones (``BlockRunner.float_hidden``), e.g. GPTAQ's asymmetric target.
FloatStream = Callable[[OpenedModel, MethodConfig], bool]

#: Raises, before any weight is read, when a procedure cannot run on ``opened``'s family (from its config alone:
#: the plan check and triage call it), e.g. AWQ on a block with nothing to fold scales into.
StructureCheck = Callable[[OpenedModel], None]

BLOCK_PROCEDURES: dict[str, BlockProcedure] = {}
FLOAT_STREAMS: dict[str, FloatStream] = {}
STRUCTURE_CHECKS: dict[str, StructureCheck] = {}


def block_procedure(name: str, float_stream: FloatStream | None = None, structure_check: StructureCheck | None = None
                    ) -> Callable[[BlockProcedure], BlockProcedure]:
    """Decorator registering the procedure for methods whose registration names ``name``."""

    def wrap(fn: BlockProcedure) -> BlockProcedure:
        if name in BLOCK_PROCEDURES:
            raise RuntimeError(f"block procedure {name!r} registered twice")
        BLOCK_PROCEDURES[name] = fn
        if float_stream is not None:
            FLOAT_STREAMS[name] = float_stream
        if structure_check is not None:
            STRUCTURE_CHECKS[name] = structure_check
        return fn

    return wrap


def procedure_for(config: MethodConfig) -> BlockProcedure:
    """The block procedure of ``config``'s method (of its base method, for mixed precision)."""
    spec = get_method(base_method(config))
    if spec.block_procedure not in BLOCK_PROCEDURES:
        raise ConfigError(f"method '{spec.name}' has no block procedure for calibrated quantization",
                          f"use one of {sorted(BLOCK_PROCEDURES)}' methods, or a calibration-free method")
    return BLOCK_PROCEDURES[spec.block_procedure]


def needs_float_stream(opened: OpenedModel, config: MethodConfig) -> bool:
    """Whether sequential quantization of ``opened`` with ``config`` must carry the float model's activations."""
    wants = FLOAT_STREAMS.get(get_method(base_method(config)).block_procedure)
    return bool(wants and wants(opened, config))


def check_structure(opened: OpenedModel, config: MethodConfig) -> None:
    """Raise when ``config``'s block procedure cannot run on ``opened``'s family (its ``StructureCheck``)."""
    spec = get_method(base_method(config))
    check = STRUCTURE_CHECKS.get(spec.block_procedure) if spec.needs_calibration else None
    if check is not None:
        check(opened)


def set_weight(block: nn.Module, name: str, qt: QuantizedTensor) -> None:
    """Make the block compute with the quantized weight, so later groups and blocks see its error."""
    linear = block.get_submodule(name)
    linear.weight.data = qt.dequantize(torch.float32)
