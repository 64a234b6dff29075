"""Open an artifact in the runtime its users deploy it with, as something ``evaluate`` can score.

A format's runtime is the consumer that proves it: transformers (which hands GPTQ / AWQ layers to GPTQModel's
kernels and compressed-tensors checkpoints to compressed-tensors) for the safetensors formats, llama.cpp for
GGUF, MLX for mlx-lm checkpoints, onnxruntime for ONNX. A canonical TurboQuant checkpoint or a plain HF model
is scored in torch. The torch and transformers runtimes load the artifact on the validation device (GPTQModel's
CUDA kernels take it in float16 there); llama.cpp offloads to the GPU it was built for; MLX runs where MLX does.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

import torch

from turboquant.errors import ModelLoadError
from turboquant.formats.onnx import MODEL_FILE
from turboquant.io.checkpoint import METADATA_FILE
from turboquant.io.loaders import load_model
from turboquant.io.skeleton import build_skeleton, materialize
from turboquant.io.manifest import find_manifest
from turboquant.quality.bnb import artifact_quantization
from turboquant.quality.evaluate import Scorer

Opener = Callable[[Path, torch.device], "torch.nn.Module | Scorer"]
RUNTIMES: dict[str, tuple[str, Opener]] = {}


def register_runtime(fmt: str, name: str) -> Callable[[Opener], Opener]:
    def deco(fn: Opener) -> Opener:
        RUNTIMES[fmt] = (name, fn)
        return fn

    return deco


def artifact_format(path: Path) -> str:
    """``gguf``, ``gptq``, … from the artifact's manifest; ``canonical``, ``bitsandbytes`` (a transformers
    checkpoint whose config names that quant_method) or ``hf`` for the other directories."""
    path = Path(path)
    manifest = find_manifest(path)
    if manifest is not None:
        return manifest["format"]
    if (path / METADATA_FILE).is_file():
        return "canonical"
    if (path / "config.json").is_file():
        return "bitsandbytes" if artifact_quantization(path) is not None else "hf"
    raise ModelLoadError(f"{path} is neither an exported artifact, a quantized checkpoint nor a model directory",
                         "pass a directory written by `turboquant export` or `turboquant quantize`")


def open_runtime(path: str | Path, device: torch.device = torch.device("cpu"), fmt: str | None = None
                 ) -> tuple[str, "torch.nn.Module | Scorer"]:
    """``(runtime name, scorer)`` for the artifact at ``path`` (of format ``fmt``, default: as its manifest says),
    on ``device`` where the runtime runs on torch's."""
    path = Path(path)
    fmt = fmt or artifact_format(path)
    if fmt not in RUNTIMES:
        raise ModelLoadError(f"no runtime is registered for format '{fmt}'",
                             f"validate one of: {', '.join(sorted(RUNTIMES))}")
    name, opener = RUNTIMES[fmt]
    opened = opener(path, device)
    return opened if isinstance(opened, tuple) else (name, opened)


@register_runtime("canonical", "torch (dequantized)")
@register_runtime("hf", "torch")
def _torch(path: Path, device: torch.device) -> torch.nn.Module:
    return load_model(path).to(device).eval()


@register_runtime("compressed-tensors", "transformers + compressed-tensors")
def _compressed_tensors(path: Path, device: torch.device):
    """transformers loads symmetric pack-quantized checkpoints; an asymmetric one it cannot (5.23 sizes
    ``weight_zero_point`` unpacked before decompressing, llm-compressor's own output too), so that one is
    decompressed by compressed-tensors itself — the library vLLM's loader mirrors — into the float model."""
    if not _asymmetric_groups(path):
        return _transformers(path, device)
    return "compressed-tensors (decompressed in torch)", _decompressed(path, device)


def _asymmetric_groups(path: Path) -> bool:
    qcfg = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    return any((g.get("weights") or {}).get("symmetric") is False for g in (qcfg.get("config_groups") or {}).values())


def _decompressed(path: Path, device: torch.device) -> torch.nn.Module:
    """The float model whose every packed linear is ``PackedQuantizationCompressor.decompress``-ed with the scheme
    of the config group that targets it."""
    import re

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    qcfg = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    groups = [(g["targets"], QuantizationScheme(targets=g["targets"], weights=g["weights"]))
              for g in qcfg["config_groups"].values()]

    def scheme_of(module: str) -> QuantizationScheme:
        for targets, scheme in groups:
            if any(t == "Linear" or t == module or (t.startswith("re:") and re.fullmatch(t[3:], module))
                   for t in targets):
                return scheme
        raise ModelLoadError(f"no config group of {path} targets {module}", "re-export the artifact")

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    packed = sorted(k.removesuffix(".weight_packed") for k in state if k.endswith(".weight_packed"))
    for module in packed:
        parts = {k.removeprefix(module + "."): state.pop(k) for k in list(state) if k.startswith(module + ".")}
        state[module + ".weight"] = PackedQuantizationCompressor.decompress(parts, scheme_of(module))["weight"]
    model = build_skeleton(Path(path), dtype=torch.float32, real_buffers=True)
    materialize(model, state, dtype=torch.float32)
    return model.to(device).eval()


@register_runtime("gptq", "transformers + GPTQModel")
@register_runtime("awq", "transformers + GPTQModel")
def _transformers(path: Path, device: torch.device) -> torch.nn.Module:
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, torch.get_num_threads())))
    dtype = kernel_dtype(device)
    if _has_dynamic_overrides(path):
        # Per-module bits (mixed precision) live in quantization_config.dynamic, which GPTQModel honours and
        # transformers' optimum path does not: load it the way its users do.
        from gptqmodel import BACKEND, GPTQModel

        backend = BACKEND.TORCH if device.type == "cpu" else BACKEND.AUTO
        return GPTQModel.load(str(path), device=str(device), backend=backend).model.to(dtype).eval()
    return from_pretrained_complete(path, device, dtype)


def from_pretrained_complete(path: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` that refuses a partial load: a parameter the artifact did not
    fill (transformers leaves it randomly initialised, e.g. experts whose quantized tensors it cannot merge) or a
    tensor it could not place would make every score that follows meaningless."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, device_map=str(device), dtype=dtype,
                                                       output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or [])
        if keys:
            raise ModelLoadError(
                f"transformers loaded {path} incompletely: {len(keys)} {kind.replace('_', ' ')} (e.g. {keys[0]})",
                "this runtime cannot load this model's layout: export a format that loads it (compressed-tensors "
                "for mixture-of-experts releases)")
    return model.eval()


def kernel_dtype(device: torch.device) -> torch.dtype:
    """The activation dtype the quantized kernels take: float32 on the CPU (GPTQModel's torch kernels, exact
    reference), float16 on a GPU (the Marlin / ExLlama / AWQ kernels serving engines use)."""
    return torch.float32 if device.type == "cpu" else torch.float16


def _has_dynamic_overrides(path: Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return bool((json.loads(config.read_text()).get("quantization_config") or {}).get("dynamic"))


@register_runtime("bitsandbytes", "transformers + bitsandbytes")
def _bitsandbytes(path: Path, device: torch.device) -> torch.nn.Module:
    """A bitsandbytes checkpoint (``turboquant quantize --method bnb-*``): its config.json's quantization_config
    makes transformers rebuild the Linear8bitLt / Linear4bit layers on ``device``."""

    return from_pretrained_complete(path, device, kernel_dtype(device))


#: llama-cpp-python points the process's stdout / stderr file descriptors at /dev/null while it loads a model
#: (``verbose=False``) and back afterwards; two threads loading at once can restore each other's /dev/null and
#: leave them there for good (seen: a nightly with concurrent GGUF validations lost all its later output), so
#: loads take turns.
_LLAMA_LOADS = threading.Lock()


class LlamaCppScorer:
    """A GGUF file in llama.cpp (llama-cpp-python): logits for every position of a window."""

    def __init__(self, gguf: Path, context: int | None = None) -> None:
        import llama_cpp

        self.path = gguf
        self._llama_cpp = llama_cpp
        with _LLAMA_LOADS:
            probe = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        try:
            self.vocab_size = probe.n_vocab()
            self.context = context or int(probe.metadata.get(f"{probe.metadata['general.architecture']}"
                                                             ".context_length", 2048))
        finally:
            probe.close()
        self._llm, self._n_ctx = None, 0
        #: every layer offloaded when llama.cpp was built with a GPU backend (CUDA, Metal), else none
        self.gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0

    def _model(self, n: int):
        if self._llm is None or self._n_ctx < n:
            if self._llm is not None:
                self._llm.close()
            threads = max(1, torch.get_num_threads())
            with _LLAMA_LOADS:
                self._llm = self._llama_cpp.Llama(model_path=str(self.path), n_ctx=n, n_batch=n, n_ubatch=n,
                                                  logits_all=True, n_threads=threads, verbose=False, seed=0,
                                                  n_gpu_layers=self.gpu_layers)
            self._n_ctx = n
        return self._llm

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        import numpy as np

        llm = self._model(int(ids.numel()))
        llm.reset()
        llm.eval(ids.tolist())
        return torch.from_numpy(np.array(llm.scores[: ids.numel()], dtype=np.float32))

    def greedy_timing(self, prompt: torch.Tensor, n_new: int) -> tuple[float, float, list[int]]:
        """Seconds of the prefill of ``prompt`` (one batch) and of ``n_new`` greedy steps on llama.cpp's KV cache,
        and the tokens."""
        import time

        import numpy as np

        llm = self._model(int(prompt.numel()) + n_new)
        llm.reset()
        tokens = []
        t0 = time.perf_counter()
        llm.eval(prompt.tolist())
        t1 = time.perf_counter()
        for _ in range(n_new):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
        return t1 - t0, time.perf_counter() - t1, tokens


@register_runtime("gguf", "llama.cpp")
def _gguf(path: Path, device: torch.device) -> LlamaCppScorer:
    files = sorted(p for p in path.glob("*.gguf") if p.name != "imatrix.gguf")
    if len(files) != 1:
        raise ModelLoadError(f"{path} holds {len(files)} model GGUF files", "validate a directory with exactly one")
    return LlamaCppScorer(files[0])


class MlxScorer:
    """An mlx-lm checkpoint in MLX (mlx_lm.load): logits of one window."""

    def __init__(self, path: Path) -> None:
        import mlx_lm

        self.model, _ = mlx_lm.load(str(path))
        config = json.loads((path / "config.json").read_text())
        self.context = config.get("max_position_embeddings")
        self.vocab_size = config.get("vocab_size")

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        import mlx.core as mx
        import numpy as np

        out = self.model(mx.array([ids.tolist()])).astype(mx.float32)
        return torch.from_numpy(np.array(out)[0])

    def greedy_timing(self, prompt: torch.Tensor, n_new: int) -> tuple[float, float, list[int]]:
        """Seconds of the prefill and of ``n_new`` greedy steps on mlx-lm's prompt cache, and the tokens."""
        import time

        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        tokens = []
        t0 = time.perf_counter()
        logits = self.model(mx.array([prompt.tolist()]), cache=cache)
        mx.eval(logits)
        t1 = time.perf_counter()
        for _ in range(n_new):
            token = mx.argmax(logits[:, -1, :], axis=-1)
            logits = self.model(token[:, None], cache=cache)
            mx.eval(logits)
            tokens.append(int(token.item()))
        return t1 - t0, time.perf_counter() - t1, tokens


class OnnxScorer:
    """An exported ONNX graph in onnxruntime (CPU execution provider): logits of one window."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort


        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        self.session = ort.InferenceSession(str(path / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        config = json.loads((path / "config.json").read_text())
        self.context = config.get("max_position_embeddings")
        self.vocab_size = config.get("vocab_size")

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        import numpy as np

        batch = ids.reshape(1, -1).numpy().astype(np.int64)
        out = self.session.run(None, {"input_ids": batch, "attention_mask": np.ones_like(batch)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)[0])

    def greedy_timing(self, prompt: torch.Tensor, n_new: int) -> tuple[float, float, list[int]]:
        """Seconds of the prefill and of ``n_new`` greedy steps, and the tokens. The exported graph has no KV-cache
        inputs, so each step runs the whole sequence again: what a user of this artifact gets."""
        import time

        ids = prompt.clone()
        t0 = time.perf_counter()
        logits = self.logits(ids)
        t1 = time.perf_counter()
        for _ in range(n_new):
            ids = torch.cat([ids, logits[-1].argmax().reshape(1)])
            logits = self.logits(ids)
        return t1 - t0, time.perf_counter() - t1, ids[prompt.numel():].tolist()


@register_runtime("mlx", "MLX (mlx-lm)")
def _mlx(path: Path, device: torch.device) -> MlxScorer:
    return MlxScorer(path)


@register_runtime("onnx", "onnxruntime")
def _onnx(path: Path, device: torch.device) -> OnnxScorer:
    return OnnxScorer(path)
