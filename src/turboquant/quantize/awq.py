"""AWQ's block procedure: search each input group's scale on the block's own outputs, fold it, search clipping.

The pure pieces (candidate scales, scaled fake quantization, the clip search, the grouped quantizer) live in
``methods.awq``; this module runs the block to get what they score: the inputs of each group, the outputs of the
module the group feeds, and the clip-search token subsample. See ``methods.awq`` for the algorithm and the paper.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
from typing import Callable

import torch
from torch import nn

from turboquant.device import stats_dtype
from turboquant.errors import ConfigError, first_line, ModelLoadError
from turboquant.io.arch import ArchSpec, BlockLayout, LinearGroup
from turboquant.io.model import OpenedModel
from turboquant.methods.awq import (AwqConfig, candidates, linear_error, quantize_weight, scaled_fake_quant,
                                    search_clip, weight_mean)
from turboquant.methods.base import ACTIVATION_SCALES, MethodConfig
from turboquant.methods.mixed import module_config
from turboquant.quantize.procedures import block_procedure, set_weight
from turboquant.quantize.runner import (attached, BlockRunner, PreHook, StopForward, first_output, input_before,
                                        input_of, replica_block, run_with_hooks, trace_groups)
from turboquant.tensor import naming_overflows, QuantizedTensor, QuantScheme

logger = logging.getLogger(__name__)

_BATCH_TOKENS = 8192  # tokens per block forward (bounds attention / MLP intermediates)
_QK = ("q_proj", "k_proj")


def _batch(hidden: torch.Tensor) -> int:
    """Samples per block forward: ``_BATCH_TOKENS`` tokens."""
    return max(1, _BATCH_TOKENS // hidden.shape[1])


def _inspect_name(group: LinearGroup) -> str:
    """Module whose output scores a candidate ``s``: the linears' common parent (self_attn, mlp) or the linear."""
    if len(group.linears) == 1:
        return group.linears[0]
    parents = {name.rpartition(".")[0] for name in group.linears}
    return parents.pop() if len(parents) == 1 else ""  # readers in several sub-modules (parallel blocks): the block


def _device_of(block: nn.Module) -> torch.device:
    return next(block.parameters()).device


def _can_fold(feeder: nn.Module, linears: list[nn.Linear]) -> bool:
    """Whether ``feeder``'s output channels map one to one onto the linears' input channels."""
    n_in = linears[0].in_features
    if isinstance(feeder, nn.Linear):
        return feeder.out_features == n_in
    weight = getattr(feeder, "weight", None)
    return isinstance(weight, torch.Tensor) and tuple(weight.shape) == (n_in,)


def _fold(feeder: nn.Module, linears: list[nn.Linear], s: torch.Tensor, offset: float = 0.0) -> None:
    """Feeder output ``/ s`` (norm weight, or linear weight rows and bias), group weight columns ``* s``.

    ``offset``: a norm that multiplies by ``offset + weight`` (Gemma's ``1 + w``) gets ``(offset + w) / s - offset``.
    """
    s = s.to(feeder.weight.device)
    if isinstance(feeder, nn.Linear):
        feeder.weight.div_(s.to(feeder.weight.dtype).unsqueeze(1))
    else:
        feeder.weight.add_(offset).div_(s.to(feeder.weight.dtype)).sub_(offset)
    if getattr(feeder, "bias", None) is not None:
        feeder.bias.div_(s.to(feeder.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))


def _scale_group(block: nn.Module, group: LinearGroup, hidden: torch.Tensor, layer_kwargs: dict, cfg: AwqConfig
                 ) -> torch.Tensor | None:
    """Search ``s`` for one group on the block as it is now and fold it in; the scales, or None when skipped.

    The generic path (any block layout): the group's inputs are captured by re-running the block from its input.
    """
    if group.feeder is None:
        return None
    feeder = block.get_submodule(group.feeder)
    linears = [block.get_submodule(name) for name in group.linears]
    if not _can_fold(feeder, linears):
        return None
    inspect = block.get_submodule(_inspect_name(group))
    n_in = linears[0].in_features
    abs_sum, count = torch.zeros(n_in, dtype=stats_dtype(hidden.device), device=hidden.device), 0
    calls: list[tuple[tuple, dict]] = []

    def on_linear(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        nonlocal abs_sum, count
        X = input_of(args, kwargs).reshape(-1, n_in).float()
        abs_sum += X.abs().sum(0, dtype=abs_sum.dtype)
        count += X.shape[0]
        raise StopForward  # fires after on_inspect (registered first): nothing later in the block is needed

    def on_inspect(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, _replay_kwargs(kwargs)))

    run_with_hooks(block, hidden, layer_kwargs, [(inspect, on_inspect), (linears[0], on_linear)],
                   _batch(hidden))
    x_mean = (abs_sum / max(count, 1)).float()
    if inspect is linears[0]:
        error = linear_error(_gram(calls, n_in), linears[0].weight.detach().clone(), cfg.scheme)
    else:
        error = _module_error(inspect, calls, linears, cfg.scheme)
    s = _best_scale(x_mean, linears, error, cfg)
    _fold(feeder, linears, s, group.fold_offset)
    return s


def _replay_kwargs(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    if kwargs.get("past_key_values") is not None:
        kwargs["past_key_values"] = None  # replays must not grow a KV cache
    return kwargs


def _gram(calls: list[tuple[tuple, dict]], n_in: int) -> torch.Tensor:
    H: torch.Tensor | None = None
    for args, kwargs in calls:
        X = input_of(args, kwargs).reshape(-1, n_in).float()
        H = torch.zeros(n_in, n_in, device=X.device) if H is None else H
        H.addmm_(X.T, X)
    return H if H is not None else torch.zeros(n_in, n_in)


def _best_scale(x_mean: torch.Tensor, linears: list[nn.Linear], error: Callable[[torch.Tensor], float],
                cfg: AwqConfig) -> torch.Tensor:
    """The candidate ``s`` with the least ``error`` (ties: the earlier one)."""
    w_mean = weight_mean(torch.cat([lin.weight.detach().float() for lin in linears]), cfg.scheme)
    best_err, best_s = math.inf, torch.ones_like(x_mean)
    for s in candidates(x_mean, w_mean, cfg):
        err = error(s)
        if err < best_err:
            best_err, best_s = err, s
    return best_s


def _sample_rows(hidden: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` evenly spaced calibration sequences (all of them if fewer)."""
    if hidden.shape[0] <= n:
        return hidden
    return hidden[torch.arange(n) * hidden.shape[0] // n]


def _module_error(inspect: nn.Module, calls: list[tuple[tuple, dict]], linears: list[nn.Linear], scheme: QuantScheme,
                  reference: list[torch.Tensor] | None = None) -> Callable[[torch.Tensor], float]:
    """Squared error of the output of ``inspect`` (attention, MLP) with the group fake-quantized under ``s``.

    ``reference``: the float outputs for ``calls`` when the caller already has them.
    """
    originals = [lin.weight.detach().clone() for lin in linears]
    if reference is None:
        reference = [first_output(inspect(*a, **k)) for a, k in calls]

    def error(s: torch.Tensor) -> float:
        try:
            for lin, W in zip(linears, originals):
                lin.weight.copy_(scaled_fake_quant(W, s, scheme))
            return sum(float((first_output(inspect(*a, **k)) - ref).pow(2).sum())
                       for (a, k), ref in zip(calls, reference))
        finally:
            for lin, W in zip(linears, originals):
                lin.weight.copy_(W)

    return error


def _token_subsample(block: nn.Module, names: list[str], hidden: torch.Tensor, layer_kwargs: dict, n: int
                     ) -> dict[str, torch.Tensor]:
    """Inputs ``X`` ``[n, in]`` of each linear in ``names`` at ``n`` evenly spaced token positions (all if fewer)."""
    total = hidden.shape[0] * hidden.shape[1]
    n = min(n, total)
    wanted = torch.arange(n) * total // n
    seen: dict[str, int] = {name: 0 for name in names}
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook_for(name: str) -> PreHook:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = input_of(args, kwargs)
            X = x.reshape(-1, x.shape[-1])
            lo = seen[name]
            pick = wanted[(wanted >= lo) & (wanted < lo + X.shape[0])] - lo
            parts[name].append(X[pick.to(X.device)].float())
            seen[name] = lo + X.shape[0]

        return hook

    run_with_hooks(block, hidden, layer_kwargs, [(block.get_submodule(name), hook_for(name)) for name in names],
                   _batch(hidden))
    return {name: torch.cat(p) for name, p in parts.items()}


class _EvenTokens:
    """Picks ``n`` evenly spaced tokens out of ``total`` arriving batch by batch (all of them if fewer)."""

    def __init__(self, total: int, n: int) -> None:
        n = total if n <= 0 else min(n, total)
        self.wanted, self.seen, self.parts = torch.arange(n) * total // n, 0, []

    def take(self, x: torch.Tensor) -> None:
        X = x.reshape(-1, x.shape[-1])
        lo = self.seen
        pick = self.wanted[(self.wanted >= lo) & (self.wanted < lo + X.shape[0])] - lo
        self.parts.append(X[pick.to(X.device)].float())
        self.seen = lo + X.shape[0]

    def rows(self) -> torch.Tensor:
        return torch.cat(self.parts)


class _Moments:
    """``XᵀX`` and the mean ``|x|`` per channel of a stream of inputs (float64 sums for the mean, as above)."""

    def __init__(self, n_in: int, device: torch.device) -> None:
        self.H = torch.zeros(n_in, n_in, device=device)
        self.abs_sum = torch.zeros(n_in, dtype=stats_dtype(device), device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        X = x.reshape(-1, x.shape[-1]).float()
        self.H.addmm_(X.T, X)
        self.abs_sum += X.abs().sum(0, dtype=self.abs_sum.dtype)
        self.count += X.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()


def _transform_staged(block: nn.Module, layout: BlockLayout, groups: tuple[LinearGroup, ...], hidden: torch.Tensor,
                      layer_kwargs: dict, cfg: AwqConfig, clip_names: list[str],
                      cfg_for: Callable[[LinearGroup], AwqConfig]) -> dict[str, torch.Tensor]:
    """Scale search and folding for a pre-norm block, running each sub-layer about once.

    The groups' inputs are not re-captured after each fold: folding keeps the float block's function, so the
    attention context and MLP activation captured before a fold are still the inputs afterwards, divided by the
    scales folded into their feeder (equal up to float rounding to what re-running the folded block gives).
    Returns the clip-search inputs ``{linear: X [tokens, in]}`` of ``clip_names``, as the folded block sees them.
    """
    attn_norm, attn = block.get_submodule(layout.attn_norm), block.get_submodule(layout.attn)
    mlp_norm, mlp = block.get_submodule(layout.mlp_norm), block.get_submodule(layout.mlp)
    attn_out, mlp_out = block.get_submodule(layout.attn_out), block.get_submodule(layout.mlp_out)
    total = hidden.shape[0] * hidden.shape[1]
    batch = _batch(hidden)
    batches = [hidden[i : i + batch] for i in range(0, hidden.shape[0], batch)]
    clip = {g.linears[0]: _EvenTokens(total, cfg.clip_tokens) for g in groups}

    def fold(group: LinearGroup, error_of: Callable[[list[nn.Linear], QuantScheme], Callable[[torch.Tensor], float]],
             x_mean: torch.Tensor) -> torch.Tensor | None:
        if group.feeder is None:
            return None
        feeder = block.get_submodule(group.feeder)
        linears = [block.get_submodule(name) for name in group.linears]
        if not _can_fold(feeder, linears):
            return None
        c = cfg_for(group)
        s = _best_scale(x_mean, linears, error_of(linears, c.scheme), c)
        _fold(feeder, linears, s, group.fold_offset)
        return s

    # attention norm -> q/k/v, scored on the attention output; the float pass also yields o_proj's input
    g_qkv, g_o, g_mlp, g_down = groups
    x_moments = _Moments(hidden.shape[-1], hidden.device)
    ctx_moments = _Moments(attn_out.in_features, hidden.device)
    calls, attn_ref = [], []
    for h in batches:
        x = attn_norm(h)
        x_moments.add(x)
        clip[g_qkv.linears[0]].take(x)
        calls.append(((x,), layer_kwargs))
        ctx: list[torch.Tensor] = []
        with attached([(attn_out, lambda _m, args, kwargs: ctx.append(input_of(args, kwargs)))]):
            attn_ref.append(first_output(attn(x, **layer_kwargs)))
        ctx_moments.add(ctx[0])
        clip[g_o.linears[0]].take(ctx[0])
    s_qkv = fold(g_qkv, lambda lins, sch: _module_error(attn, calls, lins, sch, attn_ref), x_moments.mean)
    del calls

    # v_proj -> o_proj, scored on o_proj's output through H
    s_o = fold(g_o, lambda lins, sch: linear_error(ctx_moments.H, lins[0].weight.detach().clone(), sch),
               ctx_moments.mean)

    # MLP norm -> gate/up, scored on the MLP output over a token subsample; the pass also yields down_proj's input
    search = _EvenTokens(total, cfg.search_tokens)
    x2_moments = _Moments(hidden.shape[-1], hidden.device)
    act_moments = _Moments(mlp_out.in_features, hidden.device)
    for h, a in zip(batches, attn_ref):
        x2 = mlp_norm(h + a)
        x2_moments.add(x2)
        search.take(x2)
        clip[g_mlp.linears[0]].take(x2)
        act = input_before(mlp, mlp_out, x2)
        act_moments.add(act)
        clip[g_down.linears[0]].take(act)
    del attn_ref
    x2_search = search.rows().unsqueeze(0)
    s_mlp = fold(g_mlp, lambda lins, sch: _module_error(mlp, [((x2_search,), {})], lins, sch), x2_moments.mean)

    # up_proj -> down_proj, scored on down_proj's output through H
    s_down = fold(g_down, lambda lins, sch: linear_error(act_moments.H, lins[0].weight.detach().clone(), sch),
                  act_moments.mean)

    inputs: dict[str, torch.Tensor] = {}
    for group, s in ((g_qkv, s_qkv), (g_o, s_o), (g_mlp, s_mlp), (g_down, s_down)):
        X = clip[group.linears[0]].rows()
        if s is not None:
            X = X / s
        inputs.update({name: X for name in group.linears if name in clip_names})
    return inputs


def transform_block(block: nn.Module, arch: ArchSpec, hidden: torch.Tensor, layer_kwargs: dict, cfg: AwqConfig,
                    config_of: Callable[[str], AwqConfig] | None = None) -> dict[str, torch.Tensor]:
    """Fold AWQ scales into ``block`` in place (group by group, in ``arch.groups`` order), then search clipping.

    ``hidden``: the block's calibration inputs ``[n_samples, seqlen, hidden_size]``; ``block(x, **layer_kwargs)``
    runs it. The search uses ``cfg.search_samples`` evenly spaced sequences of it. Returns
    ``{linear name: clip_max [out, G]}`` for ``quantize_weight`` (empty when ``cfg.clip`` is off).
    The float block computes the same function afterwards, up to float rounding. ``config_of(linear)``: the
    config one linear is quantized with, when it differs from ``cfg`` (a replaced group size).
    """
    def cfg_of(name: str) -> AwqConfig:
        return config_of(name) if config_of is not None else cfg

    with torch.no_grad():
        hidden = _sample_rows(hidden, cfg.search_samples).to(_device_of(block)).float()
        names = [n for n in arch.linears if not (cfg.skip_qk_clip and n.rpartition(".")[2] in _QK)]
        if arch.layout is not None and len(arch.groups) == 4:
            inputs = _transform_staged(block, arch.layout, arch.groups, hidden, layer_kwargs, cfg, names,
                                       lambda g: cfg_of(g.linears[0]))
        else:
            for group in arch.groups:
                _scale_group(block, group, hidden, layer_kwargs, cfg_of(group.linears[0]))
            inputs = _token_subsample(block, names, hidden, layer_kwargs, cfg.clip_tokens) if cfg.clip else {}
        if not cfg.clip:
            return {}
        return {name: search_clip(block.get_submodule(name).weight, inputs[name], cfg_of(name)) for name in names}


def check_foldable(opened: OpenedModel) -> None:
    """Refuse a discovered family AWQ cannot fold (``foldable_groups``) before any weight is read: proven on block 0
    of a small random replica of the release (``runner.replica_block``), once per config. A config transformers
    cannot shrink is left to the check on the real block at quantization time."""
    if opened.arch.n_experts:
        raise ConfigError(f"AWQ cannot scale the experts of '{opened.arch.name}': they read one norm's output "
                          "with the router, which stays in high precision", "quantize this family with gptq, rtn or hqq")
    if not opened.arch.discovered:
        return
    reason = _fold_refusal(json.dumps(opened.config, sort_keys=True), opened.arch)
    if reason is not None:
        raise ConfigError(*reason)


@functools.lru_cache(maxsize=64)
def _fold_refusal(config_json: str, arch: ArchSpec) -> tuple[str, str] | None:
    try:
        block, hidden, kwargs = replica_block(json.loads(config_json), arch)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, ModelLoadError) as e:
        logger.info("AWQ foldability of '%s' not checked before download: no small replica (%s)", arch.name,
                    first_line(e))
        return None
    with torch.no_grad():
        try:
            groups = trace_groups(block, hidden, kwargs, arch.linears)
            foldable_groups(block, groups, hidden, kwargs, arch.name)
        except ConfigError as e:
            return e.problem, e.fix
    return None


@block_procedure(ACTIVATION_SCALES, structure_check=check_foldable)
def awq_block(runner: BlockRunner, block: torch.nn.Module, opened: OpenedModel, config: MethodConfig,
               prefix: str) -> tuple[dict[str, QuantizedTensor], torch.Tensor | None]:
    """AWQ: search and fold activation scales into the block, search clipping, then quantize every linear."""

    arch = opened.arch
    if "awq_groups" not in runner.notes:
        groups = arch.groups if not arch.discovered else foldable_groups(
            block, runner.groups(block), runner.batch(runner.hidden, slice(0, 1)), runner.layer_kwargs, arch.name)
        runner.notes["awq_groups"] = groups
        runner.notes["awq_unscaled"] = ["+".join(g.linears) for g in groups if g.feeder is None or not _can_fold(
            block.get_submodule(g.feeder), [block.get_submodule(n) for n in g.linears])]
    arch = dataclasses.replace(arch, groups=runner.notes["awq_groups"])
    clips = transform_block(block, arch, runner.hidden, runner.layer_kwargs, config,
                            lambda name: module_config(config, prefix + name))
    out: dict[str, QuantizedTensor] = {}
    for name in opened.arch.linears:
        W = block.get_submodule(name).weight.data
        with naming_overflows(prefix + name):
            out[name] = quantize_weight(W, module_config(config, prefix + name), clip_max=clips.get(name))
        set_weight(block, name, out[name])
    return out, None


#: Relative change of the block output a verified fold may cause (float32 rounding only).
_FOLD_TOLERANCE = 1e-4


@torch.no_grad()
def foldable_groups(block: nn.Module, groups: tuple[LinearGroup, ...], hidden: torch.Tensor, kwargs: dict,
                    family: str) -> tuple[LinearGroup, ...]:
    """``groups`` with the feeder each can fold AWQ scales into, proven on ``block`` itself (None for a group left
    unscaled: its linears are still quantized with AWQ's clip search).

    A candidate is the module whose output the group reads, else an earlier linear as wide as the group's input
    (``v_proj`` before ``o_proj``, ``up_proj`` before ``down_proj``). It is accepted only when dividing its output
    by random scales and multiplying the group's weight columns by them leaves the block's output unchanged (so
    the output feeds nothing else, and a norm's ``1 + w`` form is found). A group reading the residual stream
    directly (no linear upstream of its input in the block) that cannot fold is refused: that is AWQ's main gain.
    """
    reference = first_output(block(hidden, **kwargs))
    order = [n for g in groups for n in g.linears]
    out: list[LinearGroup] = []
    for g in groups:
        earlier = [n for n in reversed(order[: order.index(g.linears[0])])]
        candidates = ([g.feeder] if g.feeder is not None else []) + [n for n in earlier if n != g.feeder]
        found = next(((name, off) for name in candidates for off in _offsets(block.get_submodule(name))
                      if _fold_holds(block, g, name, off, hidden, kwargs, reference)), None)
        if found is not None:
            out.append(LinearGroup(found[0], g.linears, fold_offset=found[1]))
            continue
        if not _reads_linear_output(block, g, hidden, kwargs):
            weightless = g.feeder is not None and getattr(block.get_submodule(g.feeder), "weight", None) is None
            why = (f"its input comes from {g.feeder}, which has no weight to fold into (a non-parametric norm)"
                   if weightless else "no norm or linear produces that input alone (e.g. a post-norm block reads "
                   "the residual stream directly)")
            raise ConfigError(f"AWQ cannot fold scales into the input of {', '.join(g.linears)} in '{family}': {why}",
                              "quantize this family with gptq, rtn or hqq")
        out.append(LinearGroup(None, g.linears))
    return tuple(out)


def _offsets(feeder: nn.Module) -> tuple[float, ...]:
    return (0.0,) if isinstance(feeder, nn.Linear) else (0.0, 1.0)


def _fold_holds(block: nn.Module, group: LinearGroup, feeder: str, offset: float, hidden: torch.Tensor, kwargs: dict,
                reference: torch.Tensor) -> bool:
    trial = copy.deepcopy(block)
    module = trial.get_submodule(feeder)
    linears = [trial.get_submodule(n) for n in group.linears]
    if not _can_fold(module, linears):
        return False
    s = (torch.rand(linears[0].in_features, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.5).to(hidden.device)
    _fold(module, linears, s, offset)
    out = first_output(trial(hidden, **kwargs))
    return bool((out - reference).norm() <= _FOLD_TOLERANCE * reference.norm())


def _reads_linear_output(block: nn.Module, group: LinearGroup, hidden: torch.Tensor, kwargs: dict) -> bool:
    """Whether the group's input depends on some linear of the block (autograd through a copy of it)."""
    trial = copy.deepcopy(block)
    for p in trial.parameters():
        p.requires_grad_(False)
    for m in trial.modules():
        if isinstance(m, nn.Linear):
            m.weight.requires_grad_(True)
    seen: list[bool] = []

    def hook(_m: nn.Module, args: tuple, kw: dict) -> None:
        seen.append(input_of(args, kw).requires_grad)
        raise StopForward

    with torch.enable_grad():
        run_with_hooks(trial, hidden, kwargs, [(trial.get_submodule(group.linears[0]), hook)], hidden.shape[0])
    return bool(seen and seen[0])
