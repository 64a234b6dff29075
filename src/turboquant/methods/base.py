"""Method configs and the method registry.

Every method is one module holding a frozen config dataclass (validated on construction, round-tripping through
JSON, rejecting unknown keys) and a pure solver, registered here by a decorator.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Literal

from turboquant.errors import check_keys, ConfigError
from turboquant.tensor import QuantScheme

#: cast: a dtype cast of every tensor; weight: a weight-only solver producing QuantizedTensors (both go through
#: the checkpoint quantizer); module: transforms a loaded ``nn.Module`` in memory (``turboquant.quantize``);
#: transformers: quantized by transformers' own integration, saved as a transformers checkpoint (bitsandbytes).
MethodKind = Literal["cast", "weight", "module", "transformers"]

#: Block procedures (``quantize/``) a calibrated weight method runs with: ``hessian`` accumulates ``H = XᵀX`` per
#: input group and solves group by group (GPTQ); ``activation-scales`` searches and folds per-channel scales
#: before quantizing (AWQ). Calibration-free methods need none: each weight is quantized on its own.
HESSIAN = "hessian"
ACTIVATION_SCALES = "activation-scales"
#: Devices a method can run on, best first, when it declares none.
CPU_ONLY = ("cpu",)


@dataclass(frozen=True)
class MethodConfig:
    """Base for method configs: JSON round trip and strict keys."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps({"method": self.method, **self.to_dict()}, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        data = {k: v for k, v in data.items() if k != "method"}
        known = [f.name for f in fields(cls)]
        check_keys(data, known, f"unknown option(s) {{unknown}} for method '{cls.method}'",
                   None if known else f"method '{cls.method}' takes no options")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "MethodConfig":
        return cls.from_dict(json.loads(text))


#: What a weight quantizer does with a layer whose input its group size does not divide.
INDIVISIBLE_POLICIES = ("error", "largest_divisor")


@dataclass(frozen=True)
class WeightQuantConfig(MethodConfig):
    """Options shared by every integer weight quantizer: the scheme, and what to do with a layer it cannot cover.

    ``indivisible``: a group size that does not divide a layer's input either fails the run up front (``error``)
    or quantizes that layer with the largest group that does (``largest_divisor``: group sizes are powers of two,
    as every format's kernels need, so hidden 576 at group 128 gets 64);
    ``group_overrides`` (module -> group size) is filled in by the quantizer and recorded with the config.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    indivisible: str = "error"
    group_overrides: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scheme  # validates bits / group_size / symmetric
        if self.indivisible not in INDIVISIBLE_POLICIES:
            raise ConfigError(f"indivisible={self.indivisible!r} is not a policy",
                              f"use one of {', '.join(INDIVISIBLE_POLICIES)}")
        check_type("group_overrides", self.group_overrides, dict, "leave it empty: the quantizer fills it in")

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    @property
    def permutes_groups(self) -> bool:
        """Whether the codes come with a ``g_idx`` (groups not contiguous along the input): GPTQ's act-order."""
        return False

    @property
    def fractional_zeros(self) -> bool:
        """Whether zero points may be fractional (HQQ's optimised zeros), which integer-zero formats cannot hold."""
        return False


def with_group_overrides(config: WeightQuantConfig, in_features: dict[str, int]) -> WeightQuantConfig:
    """``config`` with ``group_overrides`` for every module (name -> input width) its group size does not divide,
    under ``indivisible="largest_divisor"``; unchanged otherwise (``error``: the shape check refuses it)."""
    g = config.group_size
    if config.indivisible != "largest_divisor" or g <= 0:
        return config
    overrides = {}
    for module, n in in_features.items():
        if n % g:
            divisor = n & -n if n & -n < g else g  # the largest power of two dividing n, capped at g
            if divisor < MIN_DIVISOR_GROUP:
                raise ConfigError(f"{module} has {n} inputs: no power-of-two group >= {MIN_DIVISOR_GROUP} divides it",
                                  "use group_size=-1 (one scale per row) for this model")
            overrides[module] = divisor
    return dataclasses.replace(config, group_overrides=overrides)


def group_fallbacks(config: WeightQuantConfig, in_features: dict[str, int]) -> list[str]:
    """One line per replaced group size (how many layers, their width): what the manifest and the card say."""
    counts: dict[tuple[int, int], int] = {}
    for module, g in config.group_overrides.items():
        key = (in_features[module], g)
        counts[key] = counts.get(key, 0) + 1
    return [f"group size {g} instead of {config.group_size} for {k} layer(s) with {n} inputs ({config.group_size} "
            f"does not divide {n}; indivisible=largest_divisor)" for (n, g), k in sorted(counts.items())]


#: The smallest group ``largest_divisor`` falls back to (the smallest valid group size).
MIN_DIVISOR_GROUP = 8


def check_type(name: str, value: Any, expected: type | tuple[type, ...], hint: str) -> None:
    """Refuse a config value of the wrong type (bools are not ints here)."""
    ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in _as_tuple(expected))
    if not ok:
        raise ConfigError(f"{name}={value!r} has the wrong type", hint)


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config class, what it produces and needs, and its solver.

    ``checkpoint`` is False for methods the canonical checkpoint quantizer (CLI ``quantize``, the plan) cannot run:
    they quantize a loaded module (int8) or write their own artifact (bitsandbytes). ``devices``: where it can
    run, best first (placement on work pools reads it). ``block_procedure``: how a calibrated weight method runs
    over a block (``HESSIAN`` or ``ACTIVATION_SCALES``; ``quantize/`` registers one procedure per name).
    """

    name: str
    config_cls: type[MethodConfig]
    description: str
    kind: MethodKind
    solver: Callable[..., Any]
    needs_calibration: bool = False
    checkpoint: bool = True
    devices: tuple[str, ...] = CPU_ONLY
    block_procedure: str | None = None


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    config_cls: type[MethodConfig],
    description: str,
    kind: MethodKind,
    needs_calibration: bool = False,
    checkpoint: bool = True,
    devices: tuple[str, ...] = CPU_ONLY,
    block_procedure: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding a solver to ``METHODS`` under ``name``, with what the rest of the engine needs to know of
    it (calibration, canonical checkpoint form, devices, block procedure)."""

    def wrap(solver: Callable[..., Any]) -> Callable[..., Any]:
        if name in METHODS:
            raise RuntimeError(f"method {name!r} registered twice")
        config_cls.method = name
        METHODS[name] = MethodSpec(name, config_cls, description, kind, solver, needs_calibration, checkpoint,
                                   tuple(devices), block_procedure)
        return solver

    return wrap


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'", f"use one of {sorted(METHODS)}") from None


def make_config(method: str, **options: Any) -> MethodConfig:
    """Build a validated config for the canonical checkpoint quantizer (plan, CLI, tests) from keyword options.

    Methods without a checkpoint path are refused here, so a plan naming one fails up front;
    ``turboquant.quantize`` builds their configs with ``spec.config_cls.from_dict``.
    """
    spec = get_method(method)
    if not spec.checkpoint:
        raise ConfigError(
            f"method '{method}' has no canonical checkpoint form ({spec.description})",
            f"call turboquant.quantize(model, method='{method}') in Python"
            + (f", or run `turboquant quantize MODEL --method {method} --out DIR`" if spec.kind == "transformers"
               else "")
            + f"; checkpoint methods: {sorted(n for n, s in METHODS.items() if s.checkpoint)}",
        )
    return spec.config_cls.from_dict(options)


def config_with_scheme(method: str, options: dict[str, Any], **scheme: Any) -> MethodConfig:
    """A validated config from options plus scheme flags (``bits``, ``group_size``, ``symmetric``; None: unset);
    a flag the method has no field for is refused (the CLI's ``--bits`` on a cast, say)."""
    spec = get_method(method)
    names = {f.name for f in fields(spec.config_cls)}
    values = dict(options)
    for key, value in scheme.items():
        if value is None:
            continue
        if key not in names:
            raise ConfigError(f"method '{method}' takes no --{key.replace('_', '-')}", "drop that flag")
        values[key] = value
    return spec.config_cls.from_dict(values)
