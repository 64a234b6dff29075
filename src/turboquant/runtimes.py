"""Open an artifact in the runtime its users deploy it with, as something ``evaluate`` can score.

A format's runtime is the consumer that proves it: transformers (which hands GPTQ / AWQ layers to GPTQModel's
kernels and compressed-tensors checkpoints to compressed-tensors) for the safetensors formats, llama.cpp for
GGUF, MLX for mlx-lm checkpoints, onnxruntime for ONNX. A canonical TurboQuant checkpoint or a plain HF model
is scored in torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from turboquant.checkpoint import METADATA_FILE
from turboquant.errors import ModelLoadError
from turboquant.evaluate import Scorer, load_model
from turboquant.manifest import MANIFEST_FILE

Opener = Callable[[Path], "torch.nn.Module | Scorer"]
RUNTIMES: dict[str, tuple[str, Opener]] = {}


def register_runtime(fmt: str, name: str) -> Callable[[Opener], Opener]:
    def deco(fn: Opener) -> Opener:
        RUNTIMES[fmt] = (name, fn)
        return fn

    return deco


def artifact_format(path: Path) -> str:
    """``gguf``, ``gptq``, … from the artifact's manifest; ``canonical`` or ``hf`` for the other directories."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        return json.loads((path / MANIFEST_FILE).read_text())["format"]
    if (path / METADATA_FILE).is_file():
        return "canonical"
    if (path / "config.json").is_file():
        return "hf"
    raise ModelLoadError(f"{path} is neither an exported artifact, a quantized checkpoint nor a model directory",
                         "pass a directory written by `turboquant export` or `turboquant quantize`")


def open_runtime(path: str | Path) -> tuple[str, "torch.nn.Module | Scorer"]:
    """``(runtime name, scorer)`` for the artifact at ``path``."""
    path = Path(path)
    fmt = artifact_format(path)
    if fmt not in RUNTIMES:
        raise ModelLoadError(f"no runtime is registered for format '{fmt}'",
                             f"validate one of: {', '.join(sorted(RUNTIMES))}")
    name, opener = RUNTIMES[fmt]
    return name, opener(path)


@register_runtime("canonical", "torch (dequantized)")
@register_runtime("hf", "torch")
def _torch(path: Path) -> torch.nn.Module:
    return load_model(path).eval()


@register_runtime("gptq", "transformers + GPTQModel")
@register_runtime("awq", "transformers + GPTQModel")
@register_runtime("compressed-tensors", "transformers + compressed-tensors")
def _transformers(path: Path) -> torch.nn.Module:
    import os

    from transformers import AutoModelForCausalLM

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, torch.get_num_threads())))
    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32).eval()
