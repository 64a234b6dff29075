"""Where the engine computes: the device a run asks for, and where its calibration activations are kept.

A quantization run holds one decoder block's weights, its Hessians and statistics, and the solvers' work on the
compute device; its calibration activations (the block inputs of every sample, and the intermediates of a staged
block) are kept there too while they fit an ``ActivationStore`` budget, and in host memory beyond it (pinned on
CUDA, so batches stream back without a synchronous copy). Every computation moves its batch to the device first, so
where a tensor is kept never changes a result: on one device the bytes are the same whatever the budget.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, IO

import torch

from turboquant.errors import ConfigError

#: Environment variable a worker pool sets (``deployments/prefect.yaml`` job variables) to choose the device.
DEVICE_ENV = "TURBOQUANT_DEVICE"
#: Environment variable for the activation budget (``parse_size`` syntax), e.g. set per pool.
BUDGET_ENV = "TURBOQUANT_ACTIVATION_BUDGET"

_SPEC = re.compile(r"^(auto|cpu|mps|cuda(?::(\d+))?)$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
#: Directory of the per-GPU lock files by which runs on one machine share its GPUs (default: the temp directory).
LOCK_DIR_ENV = "TURBOQUANT_DEVICE_LOCKS"
#: Seconds between tries while every GPU of the machine is held by another run.
CLAIM_POLL_S = 1.0
#: Share of the device memory free at the start that activations may take when no budget is given.
DEFAULT_BUDGET_SHARE = 0.5


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """The ``torch.device`` for ``auto | cpu | cuda[:N] | mps`` (None: ``$TURBOQUANT_DEVICE``, else ``auto``).

    ``auto`` is the first CUDA device, else MPS, else the CPU. A device this machine does not have is refused."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    match = _SPEC.match(text)
    if match is None:
        raise ConfigError(f"device '{spec}' is not a device name", "use auto, cpu, cuda, cuda:N or mps")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise ConfigError("device 'mps' was asked for but this machine has no usable Apple-Silicon GPU "
                              f"(torch {torch.__version__})", "use --device cpu, or run on the apple pool")
        return torch.device("mps")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(match.group(2) or 0)
    if count == 0:
        raise ConfigError(f"device '{text}' was asked for but torch {torch.__version__} sees no CUDA device",
                          "use --device cpu (or auto), or run on the cuda pool")
    if index >= count:
        raise ConfigError(f"device '{text}' does not exist: this machine has {count} CUDA device(s)",
                          f"use cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def check_device_name(spec: str) -> str:
    """``spec`` normalised if it names a device (``auto``, ``cpu``, ``cuda[:N]``, ``mps``), checked by name only:
    a plan names the device of a worker machine, not of the machine that reads the plan."""
    text = str(spec).strip().lower()
    if _SPEC.match(text) is None:
        raise ConfigError(f"device '{spec}' is not a device name", "use auto, cpu, cuda, cuda:N or mps")
    return text


def device_kind(spec: str) -> str | None:
    """The kind of machine a device name needs (``cuda``, ``apple`` or ``cpu``); None for ``auto``."""
    text = check_device_name(spec)
    return None if text == "auto" else {"mps": "apple"}.get(text, text.split(":")[0])


def is_unpinned(spec: str | torch.device | None) -> bool:
    """Whether ``spec`` (None: ``$TURBOQUANT_DEVICE``) asks for "a GPU" rather than a numbered one: ``auto`` or
    ``cuda``. Such a request may take any GPU of the machine, which is what lets runs share several."""
    if isinstance(spec, torch.device):
        return False
    return (spec or os.environ.get(DEVICE_ENV) or "auto").strip().lower() in ("auto", "cuda")


@contextmanager
def claimed_device(spec: str | torch.device | None = None) -> Iterator[torch.device]:
    """The device of ``resolve_device(spec)``, held for the block of the ``with``.

    On a CUDA machine an unpinned request (``auto``, ``cuda``) takes a GPU that no other TurboQuant run on this
    machine holds (one lock file per GPU, so threads of one worker and separate worker processes alike), waiting
    while all are held: two methods started at once on a two-GPU worker run one per GPU, a third waits for the
    first to finish (each run's activation budget assumes the GPU's free memory is its own). A numbered device
    (``cuda:1``) is used as asked, unlocked."""
    device = resolve_device(spec)
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if count == 0 or not is_unpinned(spec):
        yield device
        return
    with claimed_index(count) as index:
        yield torch.device("cuda", index)


@contextmanager
def claimed_index(count: int, lock_dir: str | Path | None = None, poll_s: float = CLAIM_POLL_S) -> Iterator[int]:
    """The index of one of ``count`` devices that no other holder of a lock in ``lock_dir`` has, held until the
    block ends; lowest free index first, waiting ``poll_s`` between tries while all are taken."""
    root = Path(lock_dir or os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "turboquant-devices")
    root.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(count):
            handle = _try_lock(root / f"cuda-{index}.lock")
            if handle is not None:
                try:
                    yield index
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    handle.close()
                return
        time.sleep(poll_s)


def _try_lock(path: Path) -> IO[bytes] | None:
    """The open lock file, locked exclusively, or None when another holder has it (``flock`` locks belong to one
    open file, so two threads of one process exclude each other as two processes do)."""
    handle = open(path, "ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def parse_size(text: str | int | None) -> int | None:
    """Bytes for ``"8GiB"``, ``"512 MB"``, ``"0"`` or an int (units are binary: 1 GB = 2**30); None stays None."""
    if text is None or isinstance(text, int) and not isinstance(text, bool):
        if isinstance(text, int) and text < 0:
            raise ConfigError(f"activation budget {text} is negative", "use a size such as 8GiB, or 0")
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"'{text}' is not a size", "use a size such as 8GiB, 512MiB or 0")
    return int(float(match.group(1)) * _UNITS[unit])


def default_budget(device: torch.device) -> int | None:
    """Activation bytes kept on ``device`` when no budget is given: all on the CPU (its memory is the host's), else
    ``DEFAULT_BUDGET_SHARE`` of the device memory free now (the rest is for the block, its statistics and solves)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_BUDGET_SHARE)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() * DEFAULT_BUDGET_SHARE)
    return None


def resolve_budget(budget: int | str | None, device: torch.device) -> int | None:
    """The activation budget in bytes: ``budget`` if given, else ``$TURBOQUANT_ACTIVATION_BUDGET``, else
    ``default_budget``."""
    if budget is None:
        budget = os.environ.get(BUDGET_ENV) or None
    return parse_size(budget) if budget is not None else default_budget(device)


def describe_device(device: torch.device) -> str:
    """What the manifest records of the compute device: ``cpu``, ``mps`` or ``cuda (<name>)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def stats_dtype(device: torch.device) -> torch.dtype:
    """The widest float a device sums in: float64, except on MPS (which has none: float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def to_device(obj: Any, device: torch.device, memo: dict[int, Any] | None = None) -> Any:
    """``obj`` (a tensor, or tuples / lists / dicts of them) with every tensor on ``device``; a tensor seen twice
    (one mask shared by every layer's call) is moved once, so it stays shared."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))
        return memo[id(obj)][1]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


@dataclass
class ActivationStore:
    """Keeps activation tensors on ``device`` while their bytes fit ``budget`` (None: no limit), else on the host.

    ``fetch`` brings a (slice of a) kept tensor to the device for computing; the accounting follows the kept
    tensors' lifetimes, so a store can be shared by every block of a run. ``placements`` records, per
    ``keep``/``empty`` call, the role and where it went (the manifest's note and the tests read it)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    budget: int | None = None
    placements: list[tuple[str, str]] = field(default_factory=list)
    _resident: list[int] = field(default_factory=lambda: [0])

    @property
    def resident_bytes(self) -> int:
        """Bytes of kept activations now on the device."""
        return self._resident[0]

    def _fits(self, nbytes: int) -> bool:
        return self.budget is None or self._resident[0] + nbytes <= self.budget

    def _host(self) -> torch.device:
        return torch.device("cpu")

    def _track(self, t: torch.Tensor, role: str, on_device: bool) -> torch.Tensor:
        self.placements.append((role, "device" if on_device else "host"))
        if on_device:
            nbytes = t.numel() * t.element_size()
            self._resident[0] += nbytes
            weakref.finalize(t, _release, self._resident, nbytes)
        return t

    def empty(self, shape: tuple[int, ...] | torch.Size, role: str, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
        """An uninitialised activation tensor, kept where the budget says."""
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if self._fits(nbytes):
            return self._track(torch.empty(shape, dtype=dtype, device=self.device), role, True)
        pin = self.device.type == "cuda"
        return self._track(torch.empty(shape, dtype=dtype, device=self._host(), pin_memory=pin), role, False)

    def keep(self, t: torch.Tensor, role: str) -> torch.Tensor:
        """``t`` as a kept activation: on the device if it fits (``t`` itself when it is there), else in (pinned)
        host memory."""
        if self._fits(t.numel() * t.element_size()):
            return self._track(t.to(self.device), role, True)
        host = t.to(self._host())
        return self._track(host.pin_memory() if self.device.type == "cuda" else host, role, False)

    def fetch(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the compute device (itself when it is there already)."""
        return t.to(self.device, non_blocking=t.is_pinned()) if t.device != self.device else t


def _release(counter: list[int], nbytes: int) -> None:
    counter[0] -= nbytes
