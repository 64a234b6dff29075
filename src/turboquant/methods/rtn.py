"""RTN: round-to-nearest weight quantization, optionally with a per-group MSE clipping search.

The clipping search is GPTQ's ``Quantizer(mse=True)`` (Frantar et al., 2022, arXiv:2210.17323): shrink each
group's range by factors down to ``1 - mse_maxshrink`` and keep, per group, the one minimising ``|Q(w) - w|^p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turboquant.errors import ConfigError
from turboquant.methods.base import WeightQuantConfig, check_type, register_method
from turboquant.tensor import QuantizedTensor, QuantScheme, group_view, qparams_from_range, quantize_codes


@dataclass(frozen=True)
class RtnConfig(WeightQuantConfig):
    """Round-to-nearest; ``mse_clip`` searches a clipping range per group instead of min/max."""

    mse_clip: bool = False
    mse_grid: int = 100
    mse_maxshrink: float = 0.2
    mse_norm: float = 2.4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_type("mse_clip", self.mse_clip, bool, "use true or false")
        check_type("mse_grid", self.mse_grid, int, "use an integer number of grid steps, e.g. 100")
        check_type("mse_maxshrink", self.mse_maxshrink, (int, float), "use a fraction in (0, 1), e.g. 0.2")
        check_type("mse_norm", self.mse_norm, (int, float), "use a positive exponent, e.g. 2.4")
        if self.mse_grid < 1 or not 0 < self.mse_maxshrink < 1 or self.mse_norm <= 0:
            raise ConfigError(
                f"MSE clip search settings grid={self.mse_grid}, maxshrink={self.mse_maxshrink}, "
                f"norm={self.mse_norm} are out of range",
                "use grid >= 1, 0 < maxshrink < 1 and norm > 0",
            )


def group_qparams(
    groups: torch.Tensor, scheme: QuantScheme, cfg: RtnConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per slice of ``groups`` ``[rows, G, g]`` (min/max, or the MSE-clipped range)."""
    xmin = groups.amin(dim=-1)
    xmax = groups.amax(dim=-1)
    scale, zero = qparams_from_range(xmin, xmax, scheme)
    if cfg is None or not cfg.mse_clip:
        return scale, zero
    best = _group_error(groups, scale, zero, scheme, cfg.mse_norm)
    steps = int(cfg.mse_maxshrink * cfg.mse_grid)
    for i in range(1, steps + 1):
        p = 1 - i / cfg.mse_grid
        s, z = qparams_from_range(p * xmin, p * xmax, scheme)
        err = _group_error(groups, s, z, scheme, cfg.mse_norm)
        better = err < best
        if better.any():
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def _group_error(
    groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme, norm: float
) -> torch.Tensor:
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = quantize_codes(groups, s, z, scheme.qmax)
    return ((q - z) * s - groups).abs_().pow_(norm).sum(-1)


def rtn_quantize(weight: torch.Tensor, scheme: QuantScheme, cfg: RtnConfig | None = None) -> QuantizedTensor:
    """Round-to-nearest ``weight`` under ``scheme``; the building block other methods reuse."""
    scheme.check_shape(tuple(weight.shape))
    W = weight.float()
    groups = group_view(W, scheme)
    scale, zero = group_qparams(groups, scheme, cfg)
    codes = quantize_codes(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), scheme.qmax)
    return QuantizedTensor.from_groups(codes, scale, zero, scheme, W.shape, weight.dtype)


@register_method("rtn", RtnConfig, "round-to-nearest, any bits/group (optional MSE clip search)", kind="weight")
def quantize_weight(weight: torch.Tensor, cfg: RtnConfig) -> QuantizedTensor:
    return rtn_quantize(weight, cfg.scheme, cfg)
