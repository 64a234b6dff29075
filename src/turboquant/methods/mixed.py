"""Mixed precision: a base method (RTN or GPTQ) run at a bit width chosen per layer under a bits-per-weight budget.

This module holds the config only; measuring each layer's sensitivity and allocating the bits is
``quantize.sensitivity`` (it needs calibration data and the model, which a config never touches). The config records
the resolved allocation in ``plan`` (module name → bits), so the checkpoint's metadata says exactly what was done
and a config with a ``plan`` re-quantizes to the same checkpoint without measuring again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from turboquant.errors import ConfigError
from turboquant.methods.base import (check_type, get_method, make_config, MethodConfig, register_method,
                                     WeightQuantConfig)
from turboquant.tensor import QuantizedTensor, QuantScheme

#: Base methods whose solver runs per linear at any bit width (AWQ folds one set of scales per block and HQQ
#: has no calibration pass to share, so they are not offered).
BASES = ("rtn", "gptq")
DEFAULT_CANDIDATES = (2, 3, 4, 6, 8)
_SCHEME_KEYS = ("bits", "group_size", "symmetric")


@dataclass(frozen=True)
class MixedPrecisionConfig(MethodConfig):
    """Quantize with ``base`` at per-layer bits from ``candidate_bits`` so that the average stored bits per
    weight (codes + float16 scales + zero points, as ``QuantScheme.storage_bits`` counts them) is at most
    ``target_bpw``.

    ``base_options``: the base method's other options (e.g. GPTQ's ``act_order``), the same for every layer;
    ``sensitivity_samples``: calibration windows used to measure each layer's sensitivity (the quantization
    itself uses all of them); ``plan``: module → bits, filled in by the quantizer (empty: measure and allocate).
    """

    base: str = "gptq"
    target_bpw: float = 4.5
    candidate_bits: tuple[int, ...] = DEFAULT_CANDIDATES
    group_size: int = 128
    symmetric: bool = True
    base_options: dict[str, Any] = field(default_factory=dict)
    sensitivity_samples: int = 16
    plan: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ConfigError(f"mixed precision over base method {self.base!r} is not supported",
                              f"use base {' or '.join(BASES)} (--method {' / '.join(BASES)} with --target-bpw)")
        check_type("target_bpw", self.target_bpw, (int, float), "use a number of bits per weight, e.g. 4.5")
        if not (math.isfinite(self.target_bpw) and 1 < self.target_bpw <= 16):
            raise ConfigError(f"target_bpw={self.target_bpw!r} is out of range", "use a value in (1, 16], e.g. 4.5")
        if isinstance(self.candidate_bits, (str, bytes)) or not hasattr(self.candidate_bits, "__iter__"):
            raise ConfigError(f"candidate_bits={self.candidate_bits!r} is not a list", "use e.g. [2, 3, 4, 6, 8]")
        bits = tuple(sorted(set(self.candidate_bits)))
        if not bits:
            raise ConfigError("candidate_bits is empty", "list at least one bit width, e.g. [2, 3, 4, 6, 8]")
        object.__setattr__(self, "candidate_bits", bits)
        check_type("base_options", self.base_options, dict, "use a mapping of the base method's options")
        clash = sorted(set(self.base_options) & set(_SCHEME_KEYS + ("method",)))
        if clash:
            raise ConfigError(f"base_options sets {clash}, which mixed precision chooses itself",
                              "set group_size / symmetric on the mixed config and leave bits to the allocation")
        check_type("sensitivity_samples", self.sensitivity_samples, int, "use a positive number of windows, e.g. 16")
        if self.sensitivity_samples < 1:
            raise ConfigError(f"sensitivity_samples={self.sensitivity_samples} is not positive", "use e.g. 16")
        check_type("plan", self.plan, dict, "use a mapping module name -> bits (or leave it empty)")
        for b in bits:
            self.base_config(b)  # validates every candidate scheme and the base options
        stray = sorted({b for b in self.plan.values()} - set(bits))
        if stray:
            raise ConfigError(f"plan uses bit widths {stray} outside candidate_bits {list(bits)}",
                              "leave plan empty (it is filled in by the quantizer) or add them to candidate_bits")

    def base_config(self, bits: int) -> MethodConfig:
        """The base method's config at ``bits`` (what one layer is quantized with)."""
        return make_config(self.base, bits=bits, group_size=self.group_size, symmetric=self.symmetric,
                           **self.base_options)

    @property
    def permutes_groups(self) -> bool:
        """Whether the base method's codes come with a ``g_idx`` (the same at every width)."""
        return bool(getattr(self.base_config(self.candidate_bits[0]), "permutes_groups", False))

    def scheme_at(self, bits: int) -> QuantScheme:
        return QuantScheme(bits=bits, group_size=self.group_size, symmetric=self.symmetric)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["candidate_bits"] = list(self.candidate_bits)
        d["plan"] = dict(sorted(self.plan.items()))
        return d

    @classmethod
    def wrap(cls, base: MethodConfig, target_bpw: float, candidate_bits: tuple[int, ...] | None = None,
             **options: Any) -> "MixedPrecisionConfig":
        """Mixed precision over an already-built ``base`` config (what ``--target-bpw`` does on the CLI): its
        group size, symmetry and other options are kept, its ``bits`` is replaced per layer."""
        if base.method not in BASES or not isinstance(base, WeightQuantConfig):
            raise ConfigError(f"--target-bpw works with methods {', '.join(BASES)}, not '{base.method}'",
                              "use --method gptq (or rtn) with --target-bpw")
        rest = {f.name: getattr(base, f.name) for f in fields(base) if f.name not in _SCHEME_KEYS}
        return cls(base=base.method, target_bpw=target_bpw, group_size=base.group_size, symmetric=base.symmetric,
                   candidate_bits=tuple(candidate_bits or DEFAULT_CANDIDATES), base_options=rest, **options)


def module_config(config: MethodConfig, module: str) -> MethodConfig:
    """The config one linear (full module name) is quantized with: the planned base config under mixed precision,
    the layer's own group size where ``indivisible`` replaced it."""
    if isinstance(config, WeightQuantConfig) and module in config.group_overrides:
        return dataclasses.replace(config, group_size=config.group_overrides[module], group_overrides={})
    if not isinstance(config, MixedPrecisionConfig):
        return config
    try:
        return config.base_config(config.plan[module])
    except KeyError:
        raise ConfigError(f"the mixed-precision plan has no entry for {module}",
                          "leave plan empty so that it is measured for this model") from None


def base_method(config: MethodConfig) -> str:
    """The method whose solver runs: the base of a mixed config, else the config's own."""
    return config.base if isinstance(config, MixedPrecisionConfig) else config.method


@register_method("mixed", MixedPrecisionConfig,
                 "mixed precision: per-layer bits (rtn / gptq) allocated by measured sensitivity under a bpw budget",
                 kind="weight", needs_calibration=True,
                 devices=("cuda", "cpu"))  # each layer runs its base method's block procedure
def quantize_weight(weight: torch.Tensor, cfg: MixedPrecisionConfig, *, bits: int,
                    H: torch.Tensor | None = None) -> QuantizedTensor:
    """One linear at ``bits`` with the base solver (GPTQ needs ``H``)."""

    solver = get_method(cfg.base).solver
    base = cfg.base_config(bits)
    return solver(weight, base) if H is None else solver(weight, H, base)


def parse_bits(text: str) -> tuple[int, ...]:
    """``"2,3,4,8"`` → ``(2, 3, 4, 8)`` (the CLI's ``--candidate-bits``)."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ConfigError(f"--candidate-bits {text!r} is not a list of integers", "write e.g. 2,3,4,6,8") from None
