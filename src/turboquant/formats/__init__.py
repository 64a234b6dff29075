"""Export formats (one module each); importing this package registers them."""

from turboquant.formats import awq, compressed_tensors, gguf, gptq, mlx, onnx  # noqa: F401
from turboquant.formats.base import FORMATS, FormatError, export, get_format

__all__ = ["FORMATS", "FormatError", "export", "get_format"]
