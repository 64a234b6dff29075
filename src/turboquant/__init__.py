"""TurboQuant: quantize a released causal LM into validated, reproducible artifacts."""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # OpenMP threads that spin while waiting make every small torch op pay a scheduler slice on a shared or
    # quota-limited machine (measured 8x slower RTN under load, benchmarks/foundation.py); sleeping costs little.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
