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
from typing import Callable, Iterator

import torch

from turboquant.errors import ConfigError
from turboquant.methods.base import ACTIVATION_SCALES, check_type, register_method, WeightQuantConfig
from turboquant.tensor import PER_TENSOR, QuantizedTensor, QuantScheme, group_view, qparams_from_range, quantize_codes

_CLIP_BUDGET = 1 << 24  # floats in one [G, rows, tokens] partial-product tensor of the clip search


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
                 needs_calibration=True, devices=("cuda", "cpu"), block_procedure=ACTIVATION_SCALES)
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
# Scale search and folding
# ---------------------------------------------------------------------------------------------------------------


def weight_mean(W: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``s_W``: per input channel, the mean of ``|W|`` normalised by its group's max (``W``: the group stacked)."""
    g = group_view(W.abs(), scheme)
    g = g / g.amax(-1, keepdim=True).clamp_min(1e-12)
    return g.reshape(W.shape).mean(0)


def candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, cfg: AwqConfig) -> Iterator[torch.Tensor]:
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


def scaled_fake_quant(W: torch.Tensor, s: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1``: the weight a candidate ``s`` makes the unscaled input see."""
    return _fake_quantize(group_view(W.float() * s, scheme), scheme).reshape(W.shape) / s


def linear_error(H: torch.Tensor, W: torch.Tensor, scheme: QuantScheme) -> Callable[[torch.Tensor], float]:
    """Output error of a lone linear, ``||(W - Ŵ) Xᵀ||² = tr(ΔW H ΔWᵀ)`` with ``H = XᵀX``: no pass over tokens."""

    def error(s: torch.Tensor) -> float:
        dW = W.float() - scaled_fake_quant(W, s, scheme)
        return float(((dW @ H) * dW).sum())

    return error


# ---------------------------------------------------------------------------------------------------------------
# Clip search
# ---------------------------------------------------------------------------------------------------------------


def search_clip(W: torch.Tensor, X: torch.Tensor, cfg: AwqConfig) -> torch.Tensor:
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


