"""Quantization methods: importing this package fills the ``METHODS`` registry.

The package is also callable: ``turboquant.methods()`` returns ``{name: one-line description}`` for every
registered method (the same as ``turboquant.list_methods()``). This uses module ``__class__`` assignment (a
``types.ModuleType`` subclass with ``__call__``, supported since Python 3.5), so ``import turboquant.methods`` and
``from turboquant.methods import get_method`` keep working as for any package.
"""

import sys as _sys
import types as _types

from turboquant.methods import awq, bnb, cast, gptq, hqq, int8, rtn  # noqa: F401  (registration side effects)
from turboquant.methods import mixed  # noqa: F401,E402  (after its bases: rtn, gptq)
from turboquant.methods.base import METHODS, MethodConfig, MethodSpec, WeightQuantConfig, get_method, make_config


def list_methods() -> dict[str, str]:
    """Every registered method with its one-line description, sorted by name."""
    return {name: METHODS[name].description for name in sorted(METHODS)}


class _CallableModule(_types.ModuleType):
    """``turboquant.methods()`` lists the methods; attribute access is that of the package."""

    def __call__(self) -> dict[str, str]:
        return list_methods()


_sys.modules[__name__].__class__ = _CallableModule

__all__ = ["METHODS", "MethodConfig", "MethodSpec", "WeightQuantConfig", "get_method", "list_methods", "make_config"]
