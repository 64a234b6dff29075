"""int8 for a loaded module: torch's dynamic quantization, and static int8 with calibrated activation ranges.

* ``int8-dynamic`` is ``torch.ao.quantization.quantize_dynamic`` with its default qconfig: weights int8 per
  tensor, activations quantized per batch at run time (Linear, LSTM, GRU; any ``nn.Module``).
* ``int8-static`` fixes each Linear's activation scale ahead of time from calibration batches with one of the
  observers (``methods.observers``: minmax, percentile, histogram, entropy) and stores weights as symmetric
  int8 (per output channel or per tensor). ``Int8Linear`` really computes in integers: the input is rounded to
  int8 with the calibrated scale, multiplied with the int8 weights accumulating in int32 (``torch._int_mm``, or an
  int32 matmul where that kernel is missing), then rescaled by ``x_scale * w_scale`` — the arithmetic an int8
  GEMM engine does (Jacob et al., 2018, arXiv:1712.05877, with zero points of 0: symmetric ranges).

Neither has an on-disk canonical form: they are registered with ``checkpoint=False`` and run only through
``turboquant.quantize``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from turboquant.errors import ConfigError, DataError
from turboquant.methods.base import MethodConfig, check_type, register_method
from turboquant.methods.observers import OBSERVERS, MinMaxObserver, Observer, make_observer

DYNAMIC_MODULES: dict[str, type[nn.Module]] = {"linear": nn.Linear, "lstm": nn.LSTM, "gru": nn.GRU}
QMAX = 127


def _as_names(name: str, value: Any, hint: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name}={value!r} has the wrong type", hint)
    return tuple(value)


@dataclass(frozen=True)
class Int8DynamicConfig(MethodConfig):
    """Dynamic int8 (torch): which module types to quantize."""

    modules: tuple[str, ...] = ("linear", "lstm", "gru")

    def __post_init__(self) -> None:
        names = _as_names("modules", self.modules, f"use a list drawn from {sorted(DYNAMIC_MODULES)}")
        unknown = sorted(set(names) - set(DYNAMIC_MODULES))
        if unknown or not names:
            raise ConfigError(f"modules={list(names)} is invalid",
                              f"use a non-empty list drawn from {sorted(DYNAMIC_MODULES)}")
        object.__setattr__(self, "modules", names)


@dataclass(frozen=True)
class Int8StaticConfig(MethodConfig):
    """Static int8: activation ranges from ``observer`` over calibration batches; weights per channel or tensor."""

    observer: str = "minmax"
    per_channel: bool = True
    percentile: float = 99.99
    num_bins: int = 2048
    skip_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_type("observer", self.observer, str, f"use one of {sorted(OBSERVERS)}")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer '{self.observer}'", f"use one of {sorted(OBSERVERS)}")
        check_type("per_channel", self.per_channel, bool, "use true or false")
        make_observer(self.observer, percentile=self.percentile, num_bins=self.num_bins)  # validates both
        object.__setattr__(self, "skip_modules", _as_names(
            "skip_modules", self.skip_modules, "use a list of module names, e.g. ['lm_head']"))


def require_module(model: Any, method: str) -> nn.Module:
    """The methods here transform a loaded module; refuse anything else (e.g. the checkpoint quantizer's tensors)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"method '{method}' quantizes a loaded torch module, not a {type(model).__name__}",
                          f"call turboquant.quantize(model, method='{method}')")
    return model


@register_method("int8-dynamic", Int8DynamicConfig, "torch dynamic int8 (Linear/LSTM/GRU), any nn.Module, CPU",
                 kind="module", checkpoint=False)
def quantize_dynamic(model: nn.Module, cfg: Int8DynamicConfig) -> nn.Module:
    """A copy of ``model`` with the chosen module types replaced by torch's dynamic int8 modules."""
    require_module(model, "int8-dynamic")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices (it works: DEPENDENCIES)
        return torch.ao.quantization.quantize_dynamic(
            model, {DYNAMIC_MODULES[m] for m in cfg.modules}, dtype=torch.qint8, inplace=False
        )


class Int8Linear(nn.Module):
    """A Linear computing ``int8(x) @ int8(W)^T`` in int32, rescaled; the activation scale is fixed (static)."""

    def __init__(self, qweight: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight_t", qweight.t().contiguous())  # int8 [in, out]: _int_mm's layout
        self.register_buffer("w_scale", w_scale.float().reshape(-1))  # [out] or [1]
        self.register_buffer("x_scale", x_scale.float().reshape(()))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, x_scale: torch.Tensor, per_channel: bool) -> "Int8Linear":
        obs = MinMaxObserver(axis=0 if per_channel else None)
        obs.observe(linear.weight)
        w_scale = obs.range().symmetric_scale(QMAX)
        W = linear.weight.detach().float()
        qweight = (W / (w_scale.unsqueeze(1) if per_channel else w_scale)).round().clamp(-QMAX, QMAX).to(torch.int8)
        return cls(qweight, w_scale, x_scale, linear.bias)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / self.x_scale).round_().clamp_(-QMAX, QMAX).to(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq = self.quantize_input(x.reshape(-1, self.in_features))
        acc = int8_matmul(xq, self.qweight_t)
        y = acc.float() * (self.x_scale * self.w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, x_scale={float(self.x_scale):.4g}"


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for int8 ``a [M, K]``, ``b [K, N]`` accumulated in int32 (exact)."""
    try:
        return torch._int_mm(a, b)
    except (RuntimeError, NotImplementedError):
        return a.to(torch.int32) @ b.to(torch.int32)


def _targets(model: nn.Module, skip: tuple[str, ...]) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name not in skip and name.rsplit(".", 1)[-1] not in skip}


def run_batches(model: nn.Module, batches: Iterable[Any]) -> int:
    """Forward every calibration batch (a tensor, a tuple of args or a mapping of kwargs); returns the count."""
    n = 0
    with torch.inference_mode():
        for batch in batches:
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
            n += 1
    if n == 0:
        raise DataError("the calibration loader yielded no batches", "pass a calib_loader with at least one batch")
    return n


@register_method("int8-static", Int8StaticConfig,
                 "static int8 W8A8 with calibrated activation ranges (minmax/percentile/histogram/entropy)",
                 kind="module", needs_calibration=True, checkpoint=False)
def quantize_static(model: nn.Module, cfg: Int8StaticConfig, batches: Iterable[Any]) -> nn.Module:
    """A copy of ``model`` whose Linears are ``Int8Linear`` with activation scales observed over ``batches``."""
    import copy

    require_module(model, "int8-static")
    model = copy.deepcopy(model).eval()
    targets = _targets(model, cfg.skip_modules)
    if not targets:
        raise ConfigError("the model has no nn.Linear to quantize",
                          "pass a model with Linear layers, or fewer skip_modules")
    observers: dict[str, Observer] = {
        name: make_observer(cfg.observer, percentile=cfg.percentile, num_bins=cfg.num_bins) for name in targets
    }
    hooks = [m.register_forward_pre_hook(lambda _m, args, o=observers[name]: o.observe(args[0]))
             for name, m in targets.items()]
    try:
        run_batches(model, batches)
    finally:
        for h in hooks:
            h.remove()
    for name, linear in targets.items():
        x_scale = observers[name].range().symmetric_scale(QMAX)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(linear, x_scale, cfg.per_channel))
    return model
