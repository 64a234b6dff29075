"""Running methods over a model: the block runner (one block resident), per-method block procedures,
mixed-precision sensitivity and the checkpoint pipeline.

The package is also callable: ``turboquant.quantize(model, method=...)`` is the dispatcher of ``turboquant.api``
(see ``turboquant.DispatchingPackage``).
"""

import sys as _sys

from turboquant import DispatchingPackage as _DispatchingPackage
from turboquant.quantize import awq, gptq  # noqa: F401,E402  (register the block procedures)

_sys.modules[__name__].__class__ = _DispatchingPackage
