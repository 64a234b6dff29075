"""AWQ: activation-aware weight quantization (Lin et al., 2023, arXiv:2306.00978).

A few input channels of each linear see activations far larger than the rest; rounding the weights that multiply
them costs the most output error. AWQ protects them without mixed precision: for a per-input-channel scale ``s``,
``W X = (W diag(s)) (diag(s)^-1 X)``, so quantizing ``W diag(s)`` instead of ``W`` shrinks the relative rounding
error of the salient columns. ``s`` is searched, not learned (Section 3.2):
``s = s_X^α / s_W^(1-α)`` (``s_X``: mean ``|X|`` per channel; ``s_W``: mean per-group-normalised ``|W|`` per channel,
the "duo" scaling of the reference code; without it ``s = s_X^α``), normalised so that ``sqrt(max(s) min(s)) = 1``,
with ``α`` on a grid over ``[0, 1)`` minimising the MSE of the output of the module the group feeds (whole attention
for q/k/v, whole MLP for gate/up, the linear itself otherwise). The best ``s`` is then *folded*: the op producing
``X`` (an RMSNorm or a linear) divides its output by ``s``, the group's weight columns are multiplied by ``s``, so the
float block computes the same function. Finally each linear's per-group clipping range ``[-c, c]`` is searched
(shrink factors of ``max |w|``) to minimise the error of the group's partial products ``W_g X_g`` on a subsample of
tokens.

As in the reference implementations, a group whose feeder cannot absorb ``1/s`` (v_proj → o_proj under
grouped-query attention, where v_proj has fewer outputs than o_proj has inputs) is not scaled. Deliberate
differences: with duo scaling the identity ``s = 1`` is also scored (the α grid does not contain it), so the search
never ends worse than no scaling on its own loss; the clip grid includes its end point ``1 - clip_max_shrink``; and
inputs are re-captured for every group from the block as folded so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from turboquant.errors import ConfigError
from turboquant.methods.base import WeightQuantConfig, check_type, register_method
from turboquant.model import ArchSpec, BlockLayout, LinearGroup
from turboquant.sequential import input_before
from turboquant.tensor import PER_TENSOR, QuantizedTensor, QuantScheme, group_view, qparams_from_range, quantize_codes

_BATCH_TOKENS = 8192  # tokens per block forward (bounds attention / MLP intermediates)
_CLIP_BUDGET = 1 << 24  # floats in one [G, rows, tokens] partial-product tensor of the clip search
_QK = ("q_proj", "k_proj")


@dataclass(frozen=True)
class AwqConfig(WeightQuantConfig):
    """AWQ options on top of the scheme (asymmetric by default, as the AWQ GEMM format).

    ``grid``: number of α values ``i / grid`` tried; ``duo_scaling``: ``s = s_X^α / s_W^(1-α)`` (else ``s_X^α``);
    ``clip``: search per-group clipping after scaling, over shrink factors ``1 - i / clip_grid`` down to
    ``1 - clip_max_shrink``, on ``clip_tokens`` evenly spaced tokens; ``skip_qk_clip``: leave q_proj / k_proj
    unclipped (their error is amplified by the softmax, where the partial-product loss is a poor proxy);
    ``search_samples``: calibration sequences (evenly spaced) used by the scale search — one α per group is
    chosen, which a subset determines as well as the whole set at a fraction of the cost on CPU;
    ``search_tokens``: in pre-norm blocks, the MLP (which works token by token) scores candidates on this many
    evenly spaced tokens of those sequences (0: all) — its loss is a sum over tokens, so a subsample estimates it
    without bias, and whole-MLP forwards would otherwise be most of the search's cost. ``clip_tokens`` are
    drawn from the same sequences.
    """

    symmetric: bool = False
    grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    skip_qk_clip: bool = True
    search_samples: int = 32
    search_tokens: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size == PER_TENSOR:
            raise ConfigError("AWQ does not support per-tensor scales", "use a group size (e.g. 128) or -1")
        for name in ("duo_scaling", "clip", "skip_qk_clip"):
            check_type(name, getattr(self, name), bool, "use true or false")
        for name, example in (("grid", 20), ("clip_grid", 20), ("clip_tokens", 512), ("search_samples", 32)):
            check_type(name, getattr(self, name), int, f"use a positive integer, e.g. {example}")
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} is not positive", f"use e.g. {example}")
        check_type("search_tokens", self.search_tokens, int, "use a token count, e.g. 4096 (0: all)")
        if self.search_tokens < 0:
            raise ConfigError(f"search_tokens={self.search_tokens} is negative", "use e.g. 4096, or 0 for all tokens")
        check_type("clip_max_shrink", self.clip_max_shrink, (int, float), "use a fraction in (0, 1), e.g. 0.5")
        if not (math.isfinite(self.clip_max_shrink) and 0 < self.clip_max_shrink < 1):
            raise ConfigError(f"clip_max_shrink={self.clip_max_shrink!r} is out of range", "use a fraction in (0, 1)")


# ---------------------------------------------------------------------------------------------------------------
# Quantizer
# ---------------------------------------------------------------------------------------------------------------


def _quantize_groups(
    groups: torch.Tensor, scheme: QuantScheme, clip_max: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale and zero of ``groups`` ``[rows, G, g]``, each group first clamped to ``[-c, c]``."""
    if clip_max is not None:
        c = clip_max.unsqueeze(-1)
        groups = torch.maximum(torch.minimum(groups, c), -c)
    scale, zero = qparams_from_range(groups.amin(-1), groups.amax(-1), scheme)
    codes = quantize_codes(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), scheme.qmax)
    return codes, scale, zero


def _fake_quantize(groups: torch.Tensor, scheme: QuantScheme, clip_max: torch.Tensor | None = None) -> torch.Tensor:
    """``Q(w)`` dequantized, same shape as ``groups``: what the quantized model will compute with."""
    codes, scale, zero = _quantize_groups(groups, scheme, clip_max)
    return (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


@register_method("awq", AwqConfig, "activation-aware scaling + clip search (needs calibration)", kind="weight",
                 needs_calibration=True)
def quantize_weight(W: torch.Tensor, cfg: AwqConfig, clip_max: torch.Tensor | None = None) -> QuantizedTensor:
    """Grouped RTN of ``W`` (already scaled by ``transform_block``), each group clipped to ``clip_max`` if given."""
    scheme = cfg.scheme
    scheme.check_shape(tuple(W.shape))
    groups = group_view(W.float(), scheme)
    if clip_max is not None and tuple(clip_max.shape) != tuple(groups.shape[:2]):
        raise ValueError(f"clip_max has shape {tuple(clip_max.shape)}, expected {tuple(groups.shape[:2])}")
    codes, scale, zero = _quantize_groups(groups, scheme, None if clip_max is None else clip_max.float())
    return QuantizedTensor.from_groups(codes, scale, zero, scheme, W.shape, W.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Running the block with hooks
# ---------------------------------------------------------------------------------------------------------------

PreHook = Callable[[nn.Module, tuple, dict], None]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the block is not computed."""


def _run_block(block: nn.Module, hidden: torch.Tensor, layer_kwargs: dict, hooks: list[tuple[nn.Module, PreHook]]
               ) -> None:
    """Run ``block`` over ``hidden`` in batches with forward pre-hooks (``with_kwargs``) attached meanwhile.

    ``layer_kwargs`` must broadcast over the batch (position embeddings with batch dimension 1).
    """
    batch = max(1, _BATCH_TOKENS // hidden.shape[1])
    handles = [m.register_forward_pre_hook(fn, with_kwargs=True) for m, fn in hooks]
    try:
        for i in range(0, hidden.shape[0], batch):
            try:
                block(hidden[i : i + batch], **layer_kwargs)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _inspect_name(group: LinearGroup) -> str:
    """Module whose output scores a candidate ``s``: the linears' common parent (self_attn, mlp) or the linear."""
    if len(group.linears) == 1:
        return group.linears[0]
    parents = {name.rpartition(".")[0] for name in group.linears}
    if len(parents) != 1 or "" in parents:
        raise ValueError(f"linears {group.linears} have no common parent module to score AWQ scales on")
    return parents.pop()


# ---------------------------------------------------------------------------------------------------------------
# Scale search and folding
# ---------------------------------------------------------------------------------------------------------------


def _weight_mean(W: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``s_W``: per input channel, the mean of ``|W|`` normalised by its group's max (``W``: the group stacked)."""
    g = group_view(W.abs(), scheme)
    g = g / g.amax(-1, keepdim=True).clamp_min(1e-12)
    return g.reshape(W.shape).mean(0)


def _candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, cfg: AwqConfig) -> Iterator[torch.Tensor]:
    """Scales ``s`` tried: identity (with duo scaling), then one per ``α = i / grid``."""
    if cfg.duo_scaling:
        yield torch.ones_like(x_mean)
    for i in range(cfg.grid):
        alpha = i / cfg.grid
        s = x_mean.pow(alpha)
        if cfg.duo_scaling:
            s = s / (w_mean.pow(1 - alpha) + 1e-4)
        s = s.clamp_min(1e-4)
        yield s / (s.max() * s.min()).sqrt()


def _can_fold(feeder: nn.Module, linears: list[nn.Linear]) -> bool:
    """Whether ``feeder``'s output channels map one to one onto the linears' input channels."""
    n_in = linears[0].in_features
    if isinstance(feeder, nn.Linear):
        return feeder.out_features == n_in
    weight = getattr(feeder, "weight", None)
    return isinstance(weight, torch.Tensor) and tuple(weight.shape) == (n_in,)


def _fold(feeder: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Feeder output ``/ s`` (norm weight, or linear weight rows and bias), group weight columns ``* s``."""
    if isinstance(feeder, nn.Linear):
        feeder.weight.div_(s.to(feeder.weight.dtype).unsqueeze(1))
    else:
        feeder.weight.div_(s.to(feeder.weight.dtype))
    if getattr(feeder, "bias", None) is not None:
        feeder.bias.div_(s.to(feeder.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))


def _scale_group(block: nn.Module, group: LinearGroup, hidden: torch.Tensor, layer_kwargs: dict, cfg: AwqConfig
                 ) -> torch.Tensor | None:
    """Search ``s`` for one group on the block as it is now and fold it in; the scales, or None when skipped.

    The generic path (any block layout): the group's inputs are captured by re-running the block from its input.
    """
    feeder = block.get_submodule(group.feeder)
    linears = [block.get_submodule(name) for name in group.linears]
    if not _can_fold(feeder, linears):
        return None
    inspect = block.get_submodule(_inspect_name(group))
    n_in = linears[0].in_features
    abs_sum, count = torch.zeros(n_in, dtype=torch.float64), 0
    calls: list[tuple[tuple, dict]] = []

    def on_linear(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        nonlocal abs_sum, count
        X = _input_of(args, kwargs).reshape(-1, n_in).float()
        abs_sum += X.abs().sum(0, dtype=torch.float64)
        count += X.shape[0]
        raise _StopForward  # fires after on_inspect (registered first): nothing later in the block is needed

    def on_inspect(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, _replay_kwargs(kwargs)))

    _run_block(block, hidden, layer_kwargs, [(inspect, on_inspect), (linears[0], on_linear)])
    x_mean = (abs_sum / max(count, 1)).float()
    if inspect is linears[0]:
        error = _linear_error(_gram(calls, n_in), linears[0].weight.detach().clone(), cfg.scheme)
    else:
        error = _module_error(inspect, calls, linears, cfg.scheme)
    s = _best_scale(x_mean, linears, error, cfg)
    _fold(feeder, linears, s)
    return s


def _replay_kwargs(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    if kwargs.get("past_key_values") is not None:
        kwargs["past_key_values"] = None  # replays must not grow a KV cache
    return kwargs


def _gram(calls: list[tuple[tuple, dict]], n_in: int) -> torch.Tensor:
    H = torch.zeros(n_in, n_in)
    for args, kwargs in calls:
        X = _input_of(args, kwargs).reshape(-1, n_in).float()
        H.addmm_(X.T, X)
    return H


def _best_scale(x_mean: torch.Tensor, linears: list[nn.Linear], error: Callable[[torch.Tensor], float],
                cfg: AwqConfig) -> torch.Tensor:
    """The candidate ``s`` with the least ``error`` (ties: the earlier one)."""
    w_mean = _weight_mean(torch.cat([lin.weight.detach().float() for lin in linears]), cfg.scheme)
    best_err, best_s = math.inf, torch.ones_like(x_mean)
    for s in _candidates(x_mean, w_mean, cfg):
        err = error(s)
        if err < best_err:
            best_err, best_s = err, s
    return best_s


def _sample_rows(hidden: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` evenly spaced calibration sequences (all of them if fewer)."""
    if hidden.shape[0] <= n:
        return hidden
    return hidden[torch.arange(n) * hidden.shape[0] // n]


def _scaled_fake_quant(W: torch.Tensor, s: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1``: the weight a candidate ``s`` makes the unscaled input see."""
    return _fake_quantize(group_view(W.float() * s, scheme), scheme).reshape(W.shape) / s


def _linear_error(H: torch.Tensor, W: torch.Tensor, scheme: QuantScheme) -> Callable[[torch.Tensor], float]:
    """Output error of a lone linear, ``||(W - Ŵ) Xᵀ||² = tr(ΔW H ΔWᵀ)`` with ``H = XᵀX``: no pass over tokens."""

    def error(s: torch.Tensor) -> float:
        dW = W.float() - _scaled_fake_quant(W, s, scheme)
        return float(((dW @ H) * dW).sum())

    return error


def _module_error(inspect: nn.Module, calls: list[tuple[tuple, dict]], linears: list[nn.Linear], scheme: QuantScheme,
                  reference: list[torch.Tensor] | None = None) -> Callable[[torch.Tensor], float]:
    """Squared error of the output of ``inspect`` (attention, MLP) with the group fake-quantized under ``s``.

    ``reference``: the float outputs for ``calls`` when the caller already has them.
    """
    originals = [lin.weight.detach().clone() for lin in linears]
    if reference is None:
        reference = [_first(inspect(*a, **k)) for a, k in calls]

    def error(s: torch.Tensor) -> float:
        try:
            for lin, W in zip(linears, originals):
                lin.weight.copy_(_scaled_fake_quant(W, s, scheme))
            return sum(float((_first(inspect(*a, **k)) - ref).pow(2).sum()) for (a, k), ref in zip(calls, reference))
        finally:
            for lin, W in zip(linears, originals):
                lin.weight.copy_(W)

    return error


# ---------------------------------------------------------------------------------------------------------------
# Clip search
# ---------------------------------------------------------------------------------------------------------------


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
            x = _input_of(args, kwargs)
            X = x.reshape(-1, x.shape[-1])
            lo = seen[name]
            pick = wanted[(wanted >= lo) & (wanted < lo + X.shape[0])] - lo
            parts[name].append(X[pick].float())
            seen[name] = lo + X.shape[0]

        return hook

    _run_block(block, hidden, layer_kwargs, [(block.get_submodule(name), hook_for(name)) for name in names])
    return {name: torch.cat(p) for name, p in parts.items()}


def _search_clip(W: torch.Tensor, X: torch.Tensor, cfg: AwqConfig) -> torch.Tensor:
    """``c`` ``[out, G]`` minimising ``mean_t (W_g x_g - Q(clamp(W_g, -c, c)) x_g)^2`` per row and group ``g``."""
    groups = group_view(W.float(), cfg.scheme)  # [out, G, g]
    n_out, G, g = groups.shape
    Xg = X.reshape(-1, G, g).permute(1, 2, 0)  # [G, g, T]
    amax = groups.abs().amax(-1)
    best_c, best_err = amax.clone(), torch.full_like(amax, math.inf)
    shrinks = [1 - i / cfg.clip_grid for i in range(round(cfg.clip_max_shrink * cfg.clip_grid) + 1)]
    rows = max(1, _CLIP_BUDGET // (G * Xg.shape[2]))
    for r in range(0, n_out, rows):
        Wr = groups[r : r + rows]
        ref = torch.bmm(Wr.transpose(0, 1), Xg)  # [G, rows, T] partial products W_g x_g
        for p in shrinks:
            c = amax[r : r + rows] * p
            Q = _fake_quantize(Wr, cfg.scheme, c)
            err = (torch.bmm(Q.transpose(0, 1), Xg) - ref).pow(2).mean(-1).t()
            better = err < best_err[r : r + rows]
            best_err[r : r + rows] = torch.where(better, err, best_err[r : r + rows])
            best_c[r : r + rows] = torch.where(better, c, best_c[r : r + rows])
    return best_c


class _EvenTokens:
    """Picks ``n`` evenly spaced tokens out of ``total`` arriving batch by batch (all of them if fewer)."""

    def __init__(self, total: int, n: int) -> None:
        n = total if n <= 0 else min(n, total)
        self.wanted, self.seen, self.parts = torch.arange(n) * total // n, 0, []

    def take(self, x: torch.Tensor) -> None:
        X = x.reshape(-1, x.shape[-1])
        lo = self.seen
        self.parts.append(X[self.wanted[(self.wanted >= lo) & (self.wanted < lo + X.shape[0])] - lo].float())
        self.seen = lo + X.shape[0]

    def rows(self) -> torch.Tensor:
        return torch.cat(self.parts)


class _Moments:
    """``XᵀX`` and the mean ``|x|`` per channel of a stream of inputs (float64 sums for the mean, as above)."""

    def __init__(self, n_in: int) -> None:
        self.H, self.abs_sum, self.count = torch.zeros(n_in, n_in), torch.zeros(n_in, dtype=torch.float64), 0

    def add(self, x: torch.Tensor) -> None:
        X = x.reshape(-1, x.shape[-1]).float()
        self.H.addmm_(X.T, X)
        self.abs_sum += X.abs().sum(0, dtype=torch.float64)
        self.count += X.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()


def _transform_staged(block: nn.Module, layout: BlockLayout, groups: tuple[LinearGroup, ...], hidden: torch.Tensor,
                      layer_kwargs: dict, cfg: AwqConfig, clip_names: list[str]) -> dict[str, torch.Tensor]:
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
    batch = max(1, _BATCH_TOKENS // hidden.shape[1])
    batches = [hidden[i : i + batch] for i in range(0, hidden.shape[0], batch)]
    clip = {g.linears[0]: _EvenTokens(total, cfg.clip_tokens) for g in groups}

    def fold(group: LinearGroup, error_of: Callable[[list[nn.Linear]], Callable[[torch.Tensor], float]],
             x_mean: torch.Tensor) -> torch.Tensor | None:
        feeder = block.get_submodule(group.feeder)
        linears = [block.get_submodule(name) for name in group.linears]
        if not _can_fold(feeder, linears):
            return None
        s = _best_scale(x_mean, linears, error_of(linears), cfg)
        _fold(feeder, linears, s)
        return s

    # attention norm -> q/k/v, scored on the attention output; the float pass also yields o_proj's input
    g_qkv, g_o, g_mlp, g_down = groups
    x_moments, ctx_moments = _Moments(hidden.shape[-1]), _Moments(attn_out.in_features)
    calls, attn_ref = [], []
    for h in batches:
        x = attn_norm(h)
        x_moments.add(x)
        clip[g_qkv.linears[0]].take(x)
        calls.append(((x,), layer_kwargs))
        ctx: list[torch.Tensor] = []
        handle = attn_out.register_forward_pre_hook(lambda _m, args: ctx.append(args[0]))
        try:
            attn_ref.append(_first(attn(x, **layer_kwargs)))
        finally:
            handle.remove()
        ctx_moments.add(ctx[0])
        clip[g_o.linears[0]].take(ctx[0])
    s_qkv = fold(g_qkv, lambda lins: _module_error(attn, calls, lins, cfg.scheme, attn_ref), x_moments.mean)
    del calls

    # v_proj -> o_proj, scored on o_proj's output through H
    s_o = fold(g_o, lambda lins: _linear_error(ctx_moments.H, lins[0].weight.detach().clone(), cfg.scheme),
               ctx_moments.mean)

    # MLP norm -> gate/up, scored on the MLP output over a token subsample; the pass also yields down_proj's input
    search = _EvenTokens(total, cfg.search_tokens)
    x2_moments, act_moments = _Moments(hidden.shape[-1]), _Moments(mlp_out.in_features)
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
    s_mlp = fold(g_mlp, lambda lins: _module_error(mlp, [((x2_search,), {})], lins, cfg.scheme), x2_moments.mean)

    # up_proj -> down_proj, scored on down_proj's output through H
    s_down = fold(g_down, lambda lins: _linear_error(act_moments.H, lins[0].weight.detach().clone(), cfg.scheme),
                  act_moments.mean)

    inputs: dict[str, torch.Tensor] = {}
    for group, s in ((g_qkv, s_qkv), (g_o, s_o), (g_mlp, s_mlp), (g_down, s_down)):
        X = clip[group.linears[0]].rows()
        if s is not None:
            X = X / s
        inputs.update({name: X for name in group.linears if name in clip_names})
    return inputs


def transform_block(block: nn.Module, arch: ArchSpec, hidden: torch.Tensor, layer_kwargs: dict, cfg: AwqConfig
                    ) -> dict[str, torch.Tensor]:
    """Fold AWQ scales into ``block`` in place (group by group, in ``arch.groups`` order), then search clipping.

    ``hidden``: the block's calibration inputs ``[n_samples, seqlen, hidden_size]``; ``block(x, **layer_kwargs)``
    runs it. The search uses ``cfg.search_samples`` evenly spaced sequences of it. Returns
    ``{linear name: clip_max [out, G]}`` for ``quantize_weight`` (empty when ``cfg.clip`` is off).
    The float block computes the same function afterwards, up to float rounding.
    """
    with torch.no_grad():
        hidden = _sample_rows(hidden.float(), cfg.search_samples)
        names = [n for n in arch.linears if not (cfg.skip_qk_clip and n.rpartition(".")[2] in _QK)]
        if arch.layout is not None and len(arch.groups) == 4:
            inputs = _transform_staged(block, arch.layout, arch.groups, hidden, layer_kwargs, cfg, names)
        else:
            for group in arch.groups:
                _scale_group(block, group, hidden, layer_kwargs, cfg)
            inputs = _token_subsample(block, names, hidden, layer_kwargs, cfg.clip_tokens) if cfg.clip else {}
        if not cfg.clip:
            return {}
        return {name: _search_clip(block.get_submodule(name).weight, inputs[name], cfg) for name in names}
