"""Quantization methods: importing this package fills the ``METHODS`` registry."""

from turboquant.methods import awq, cast, gptq, hqq, rtn  # noqa: F401  (registration side effects)
from turboquant.methods.base import METHODS, MethodConfig, MethodSpec, WeightQuantConfig, get_method, make_config

__all__ = ["METHODS", "MethodConfig", "MethodSpec", "WeightQuantConfig", "get_method", "make_config"]
