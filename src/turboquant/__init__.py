"""TurboQuant: quantize a released causal LM into validated, reproducible artifacts."""

import ctypes as _ctypes
import os as _os
import sys as _sys

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

__version__ = "0.1.0"

__all__ = ["list_methods", "methods", "quantize"]


def __getattr__(name: str):
    """``turboquant.quantize`` / ``turboquant.list_methods`` (from ``turboquant.api``) and the callable
    ``turboquant.methods`` package, imported on first use so that ``import turboquant`` stays light."""
    import importlib

    if name in ("quantize", "list_methods"):
        return getattr(importlib.import_module("turboquant.api"), name)
    if name == "methods":
        return importlib.import_module("turboquant.methods")
    raise AttributeError(f"module 'turboquant' has no attribute {name!r}")
