"""GPTQ's block procedure: Hessians of each input group from the block runner, solved group by group.

The solver (``methods.gptq.quantize_weight``) is pure; this module decides which inputs it sees: with
``true_sequential`` each group's Hessian comes from the block as quantized so far, and pre-norm blocks run staged
(``runner.run_staged``: one sub-layer at a time, about one block forward in all). With ``gptaq`` both paths also
run an unquantized copy of the block on the float model's activations, so each group's solver sees the cross
term ``D`` it needs.
"""

from __future__ import annotations

import copy

import torch

from turboquant.io.experts import expert_of, merge_expert_groups
from turboquant.io.model import OpenedModel
from turboquant.methods.base import get_method, HESSIAN, make_config, MethodConfig
from turboquant.methods.gptq import quantize_weight
from turboquant.methods.mixed import module_config
from turboquant.quantize.procedures import block_procedure, set_weight
from turboquant.quantize.runner import BlockRunner, InputStats, run_staged
from turboquant.tensor import naming_overflows, QuantizedTensor


def wants_float_stream(opened: OpenedModel, config: MethodConfig) -> bool:
    """GPTAQ fits the float model's layer outputs, so its solver needs the float model's activations."""
    cfg = module_config(config, opened.arch.block_prefix(0) + opened.arch.linears[0])
    return bool(getattr(cfg, "gptaq", False))


@block_procedure(HESSIAN, float_stream=wants_float_stream)
def gptq_block(runner: BlockRunner, block: torch.nn.Module, opened: OpenedModel, config: MethodConfig,
               prefix: str) -> tuple[dict[str, QuantizedTensor], torch.Tensor | None]:
    """GPTQ per linear group; with ``true_sequential`` each group's inputs come from the block as quantized so far.

    Pre-norm blocks run staged (one sub-layer at a time, about one block forward in all); other layouts
    re-capture from the block input after each group. With the float stream (GPTAQ) an unquantized copy of the
    block runs beside on the float model's activations, which it then advances.
    """

    out: dict[str, QuantizedTensor] = {}
    reference = copy.deepcopy(block) if runner.float_hidden is not None else None

    def solve(names: list[str], stats: dict[str, InputStats]) -> None:
        for name in names:
            W = block.get_submodule(name).weight.data
            cfg = module_config(config, prefix + name)
            with naming_overflows(prefix + name):
                if expert_of(name) is not None and stats[name].n < cfg.min_expert_tokens:
                    out[name] = _fallback(W, cfg)
                    runner.notes.setdefault("expert_fallbacks", []).append(
                        f"{prefix}{name} quantized with {cfg.expert_fallback}: its statistics saw {stats[name].n} "
                        f"tokens (min_expert_tokens {cfg.min_expert_tokens})")
                else:
                    out[name] = quantize_weight(W, stats[name].H, cfg, name=prefix + name, D=stats[name].D)
            set_weight(block, name, out[name])

    groups = merge_expert_groups([list(g.linears) for g in runner.groups(block)])
    true_sequential = module_config(config, prefix + groups[0][0]).true_sequential
    if true_sequential and opened.arch.layout is not None:
        return out, run_staged(runner, block, opened.arch.layout, groups, solve, reference)
    if not true_sequential:
        groups = [[name for g in groups for name in g]]
    for names in groups:
        solve(names, runner.capture(block, names, reference=reference))
    if reference is not None:
        runner.float_hidden = runner.forward(reference, runner.float_hidden)
    return out, None


def _fallback(weight: torch.Tensor, cfg: MethodConfig) -> QuantizedTensor:
    """``weight`` by the calibration-free ``expert_fallback`` method under the same scheme (an under-calibrated
    expert: a Hessian of a handful of tokens is noise, and of none a zero matrix)."""
    fallback = make_config(cfg.expert_fallback, bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric)
    return get_method(cfg.expert_fallback).solver(weight, fallback)
