"""Where work runs: what each method and each format's validator needs, and the table that maps needs to pools.

A piece of work declares the devices it can use, best first — a method on its registration
(``MethodSpec.devices``), a format's validator in ``VALIDATOR_NEEDS``: GPTQ's Hessians and solves are much faster
on CUDA but run on CPU; bitsandbytes' kernels want CUDA; an MLX artifact is best validated on Apple Silicon, and
mlx[cpu] can do it on Linux. A deployment knows which work pools exist (``deployments/prefect.yaml``: ``cpu``, ``cuda``,
``apple``); ``place`` picks the first declared device whose pool is available. Without deployments everything
runs in-process, which is the same as "only the cpu pool exists".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from turboquant.device import device_kind
from turboquant.errors import ConfigError
from turboquant.methods.base import get_method

DEVICES = ("cuda", "apple", "cpu")

#: Devices each format's validator (its real runtime) can run on, best first.
VALIDATOR_NEEDS: dict[str, tuple[str, ...]] = {
    "gguf": ("cpu",),
    "mlx": ("apple", "cpu"),
    "onnx": ("cpu",),
    "gptq": ("cuda", "cpu"),
    "awq": ("cuda", "cpu"),
    "compressed-tensors": ("cuda", "cpu"),
    "bnb": ("cuda", "cpu"),
    "checkpoint": ("cpu",),
}

#: Device -> work pool name (the pools ``deployments/prefect.yaml`` creates).
POOL_FOR_DEVICE: dict[str, str] = {"cuda": "cuda", "apple": "apple", "cpu": "cpu"}

#: The deployment of the per-method flow on each pool (``flows/quantize_method.py``).
METHOD_DEPLOYMENT = "quantize_method/quantize-method-{pool}"


@dataclass(frozen=True)
class Placement:
    """Which pool a piece of work goes to, and why."""

    work: str
    pool: str
    device: str

    @property
    def deployment(self) -> str:
        return METHOD_DEPLOYMENT.format(pool=self.pool)


def available_pools(env: str | None = None) -> tuple[str, ...]:
    """Pools that have workers: ``TURBOQUANT_POOLS`` (comma-separated), else only ``cpu``."""
    raw = env if env is not None else os.environ.get("TURBOQUANT_POOLS", "cpu")
    pools = tuple(p.strip() for p in raw.split(",") if p.strip())
    unknown = sorted(set(pools) - set(POOL_FOR_DEVICE.values()))
    if unknown:
        raise ConfigError(f"unknown work pool(s) {', '.join(unknown)} in TURBOQUANT_POOLS",
                          f"use a comma-separated subset of {', '.join(POOL_FOR_DEVICE.values())}")
    return pools or ("cpu",)


def _place(work: str, needs: tuple[str, ...], pools: tuple[str, ...]) -> Placement:
    for device in needs:
        if POOL_FOR_DEVICE[device] in pools:
            return Placement(work, POOL_FOR_DEVICE[device], device)
    raise ConfigError(f"{work} needs one of {', '.join(needs)} but only pool(s) {', '.join(pools)} have workers",
                      f"start a worker on pool {POOL_FOR_DEVICE[needs[0]]} or add it to TURBOQUANT_POOLS")


def place_method(method: str, pools: tuple[str, ...] | None = None, device: str | None = None) -> Placement:
    """The pool a quantization with ``method`` runs on: the first of the method's devices with a pool, or the pool
    of the plan's ``device`` for it (``cuda:1`` → cuda, ``mps`` → apple) when one is named."""
    kind = device_kind(device) if device else None
    needs = (kind,) if kind else get_method(method).devices
    return _place(f"method {method}" + (f" on {device}" if kind else ""), needs, pools or available_pools())


def place_validator(fmt: str, pools: tuple[str, ...] | None = None) -> Placement:
    """The pool an artifact of format ``fmt`` is validated on."""
    return _place(f"{fmt} validation", VALIDATOR_NEEDS.get(fmt, ("cpu",)), pools or available_pools())
