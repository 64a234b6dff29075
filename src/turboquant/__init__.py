"""TurboQuant: quantize a released causal LM into validated, reproducible artifacts."""

import ctypes as _ctypes
import importlib as _importlib
import os as _os
import sys as _sys
import types as _types

if "torch" not in _sys.modules:
    # OpenMP threads that spin while waiting make every small torch op pay a scheduler slice on a shared or
    # quota-limited machine (measured 8x slower RTN under load, benchmarks/foundation.py); sleeping costs little.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if _sys.platform.startswith("linux"):
    # glibc raises its mmap threshold after each large free, so block-sized tensors (Hessians, weights) end up in a
    # fragmenting heap that is never returned: peak RSS then grows ~20 MiB per decoder block. A fixed threshold
    # (M_MMAP_THRESHOLD = -3) returns them to the OS on free (benchmarks/calibrated_memory.py: ratio 1.54 -> 1.00).
    try:
        _ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc

from turboquant._version import __version__  # noqa: E402

__all__ = ["list_methods", "methods", "quantize"]


class DispatchingPackage(_types.ModuleType):
    """The class of the ``turboquant.quantize`` package: calling it is calling the dispatcher ``turboquant.api.
    quantize`` (``turboquant.quantize(model, method=...)``), so that the subpackage holding the block runner and
    the checkpoint pipeline and the one-line public entry point share their natural name, as
    ``turboquant.methods`` is both the methods package and the function listing them. The face is reached at call
    time only: the package itself never depends on it."""

    def __call__(self, *args, **kwargs):
        return _importlib.import_module("turboquant.api").quantize(*args, **kwargs)


def __getattr__(name: str):
    """``turboquant.list_methods`` (from ``turboquant.api``), the callable ``turboquant.methods`` package and the
    callable ``turboquant.quantize`` package, imported on first use so that ``import turboquant`` stays light."""
    if name == "list_methods":
        return _importlib.import_module("turboquant.api").list_methods
    if name in ("methods", "quantize"):
        return _importlib.import_module(f"turboquant.{name}")
    raise AttributeError(f"module 'turboquant' has no attribute {name!r}")
