"""How fast an artifact runs where it is deployed: prompt (prefill) and greedy-decode throughput and peak memory in
its own runtime, against the unquantized model in the same runtime on the same prompt.

Each measurement runs in a fresh process (``python -m turboquant.quality.speed``), so the peak resident memory is
that artifact's alone and not whatever an earlier artifact of the same validation left behind; measurements on one
machine take turns (a lock file), so two validations do not time each other. The unquantized reference is the
baseline model itself for the torch runtimes (torch, transformers), and the baseline exported as a float artifact of
the same format for the others (GGUF F16 in llama.cpp, float MLX, float ONNX), built once and cached.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from turboquant.device import resolve_device
from turboquant.errors import DataError, TurboQuantError
from turboquant.fsutil import atomic_output_dir
from turboquant.formats import onnx
from turboquant.formats.base import export
from turboquant.io.checkpoint import METADATA_FILE, QuantizedCheckpoint
from turboquant.io.manifest import find_manifest
from turboquant.methods import make_config
from turboquant.quality.evaluate import module_device
from turboquant.quality.runtimes import artifact_format, open_runtime
from turboquant.quantize.pipeline import quantize

#: Prompt length and generated tokens of a measurement (llama.cpp's llama-bench uses pp512 / tg128 on big models;
#: these are sized for the models validated on a CPU worker, and recorded with every result).
PROMPT_TOKENS = 128
DECODE_TOKENS = 32
#: Formats whose runtime is torch's (transformers + kernels): their reference is the float model in torch.
TORCH_FORMATS = ("canonical", "hf", "gptq", "awq", "compressed-tensors", "bitsandbytes")
#: The float export that serves as the unquantized reference of the other formats (MLX: mlx-lm's own conversion).
FLOAT_REFERENCE: dict[str, dict[str, Any]] = {"gguf": {"gguf_type": "F16"}, "onnx": {}, "mlx": {}}
#: Seconds a measurement may take (a child that hangs is reported, not waited for forever).
CHILD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Speed:
    """One artifact's throughput and memory in its runtime."""

    runtime: str
    device: str
    prompt_tokens: int
    prompt_tok_s: float
    decode_tokens: int
    decode_tok_s: float
    #: peak resident memory of the measuring process, and its part above the process before the model was opened
    peak_rss_bytes: int
    model_rss_bytes: int
    #: peak CUDA memory allocated by torch (None off CUDA)
    peak_device_bytes: int | None = None
    #: the greedy tokens generated (a runtime that decodes wrongly shows here, not only in its speed)
    tokens: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Speed":
        return cls(**{**data, "tokens": tuple(data.get("tokens") or ())})


def greedy_timing(runtime: Any, prompt: torch.Tensor, n_new: int) -> tuple[float, float, list[int]]:
    """Seconds for the prefill of ``prompt`` and for ``n_new`` greedy tokens after it, each step reusing the
    runtime's KV cache where it has one, and the tokens generated (a scorer brings its own ``greedy_timing``)."""
    if not isinstance(runtime, torch.nn.Module):
        return runtime.greedy_timing(prompt, n_new)
    device = module_device(runtime)
    ids = prompt.reshape(1, -1).to(device)
    tokens = []
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        out = runtime(ids, use_cache=True)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(n_new):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            out = runtime(token, past_key_values=out.past_key_values, use_cache=True)
        _sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, [int(t) for t in tokens]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_here(path: str | Path, prompt: torch.Tensor, n_new: int, device: str | None = None,
                 fmt: str | None = None) -> Speed:
    """Measure the artifact at ``path`` (of format ``fmt``: default, as recorded) in this process (``measure`` runs
    this in a fresh one)."""
    dev = resolve_device(device)
    before = _rss_now()
    _reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    name, runtime = open_runtime(Path(path), dev, fmt)
    greedy_timing(runtime, prompt[:8], 2)  # warm-up: first-call allocations and kernel selection are not speed
    prefill_s, decode_s, tokens = greedy_timing(runtime, prompt, n_new)
    peak = _peak_rss()
    return Speed(runtime=name, device=str(dev), prompt_tokens=int(prompt.numel()),
                 prompt_tok_s=prompt.numel() / max(prefill_s, 1e-9), decode_tokens=n_new,
                 decode_tok_s=n_new / max(decode_s, 1e-9), peak_rss_bytes=peak, model_rss_bytes=max(0, peak - before),
                 peak_device_bytes=int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None,
                 tokens=tuple(tokens))


def measure(path: str | Path, prompt: torch.Tensor, n_new: int = DECODE_TOKENS, device: str | None = None,
            fmt: str | None = None, lock_dir: str | Path | None = None) -> Speed:
    """``measure_here`` in a fresh Python process, one measurement at a time on this machine."""
    with tempfile.TemporaryDirectory(prefix="turboquant-speed-") as work:
        ids_file = Path(work) / "prompt.json"
        ids_file.write_text(json.dumps(prompt.tolist()))
        cmd = [sys.executable, "-m", "turboquant.quality.speed", str(path), str(ids_file), str(n_new)]
        if device:
            cmd += ["--device", str(device)]
        if fmt:
            cmd += ["--format", fmt]
        with _turn(lock_dir):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"measuring the speed of {path} failed ({last})",
                        "validate without speed (evaluation.speed: false / --no-speed) and report the failure")
    return Speed.from_dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def reference_artifact(fmt: str, artifact: Path, baseline: Path, cache_dir: Path) -> tuple[Path, str]:
    """``(path, format)`` of the unquantized model in ``fmt``'s runtime, built once under ``cache_dir``: the
    baseline itself for the torch runtimes; its float16 checkpoint exported as GGUF F16 (llama.cpp) or float ONNX;
    for MLX, mlx-lm's own conversion of the baseline in the artifact's dtype."""
    if fmt in TORCH_FORMATS:
        return baseline, "hf"
    if fmt not in FLOAT_REFERENCE:
        raise DataError(f"no unquantized reference is known for format '{fmt}'", "validate it without speed")
    if fmt == "mlx":
        dtype = ((find_manifest(artifact) or {}).get("format_options") or {}).get("dtype", "float16")
        out = cache_dir / f"mlx-{dtype}"
        if not (out / "config.json").is_file():
            _mlx_convert(baseline, out, dtype)
        return out, "mlx"
    checkpoint = cache_dir / "fp16"
    if not (checkpoint / METADATA_FILE).is_file():
        quantize(baseline, make_config("fp16"), checkpoint, overwrite=True, progress=False)
    options = FLOAT_REFERENCE[fmt]
    out = cache_dir / "-".join([fmt] + [f"{k}={v}" for k, v in sorted(options.items())])
    if fmt == "onnx" and not (out / onnx.MODEL_FILE).is_file():
        # the exporter refuses a float checkpoint (an ONNX artifact is for quantized weights); its graph writer
        # gives the same float graph a user would export with torch.onnx
        with atomic_output_dir(out, overwrite=True) as tmp:
            onnx.write(QuantizedCheckpoint.open(checkpoint), tmp, {})
    elif fmt != "onnx" and find_manifest(out) is None:
        export(checkpoint, fmt, out, overwrite=True, **options)
    return out, fmt


def _mlx_convert(baseline: Path, out: Path, dtype: str) -> None:
    """mlx-lm's float conversion of a local HF model (no download: the path is a directory), written atomically.
    It runs as mlx-lm's own command, whose progress prints stay off this process's stdout (redirecting
    ``sys.stdout`` here would race with other threads)."""
    with atomic_output_dir(out, overwrite=True) as tmp:
        tmp.rmdir()  # mlx-lm refuses an existing output directory
        proc = subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(baseline),
                               "--mlx-path", str(tmp), "--dtype", dtype], capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"mlx-lm could not convert {baseline} to a float MLX reference ({last})",
                            "validate the MLX artifact without speed")


def compare(artifact: Path, baseline: Path, prompt: torch.Tensor, cache_dir: Path, n_new: int = DECODE_TOKENS,
            device: str | None = None) -> dict[str, Any]:
    """Speed of ``artifact`` and of the unquantized reference in the same runtime, and their ratios."""
    fmt = artifact_format(artifact)
    reference, ref_fmt = reference_artifact(fmt, artifact, baseline, cache_dir)
    ours = measure(artifact, prompt, n_new, device)
    key = hashlib.sha256(json.dumps([str(reference), ref_fmt, prompt.tolist(), n_new, device]).encode()).hexdigest()
    saved = cache_dir / f"speed-{key[:16]}.json"  # every artifact of a run is compared with one measurement
    if saved.is_file():
        ref = Speed.from_dict(json.loads(saved.read_text()))
    else:
        ref = measure(reference, prompt, n_new, device, fmt=ref_fmt)
        cache_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(ref.to_dict()))
    return {"artifact": ours.to_dict(), "reference": {**ref.to_dict(), "path": str(reference)},
            "prompt_speedup": ours.prompt_tok_s / ref.prompt_tok_s,
            "decode_speedup": ours.decode_tok_s / ref.decode_tok_s,
            "memory_ratio": (ours.model_rss_bytes / ref.model_rss_bytes) if ref.model_rss_bytes else None}


def speed_line(result: dict[str, Any]) -> str:
    """One line for a ``compare`` result: throughput and memory of the artifact and the ratios to the float model."""
    a, r = result["artifact"], result["reference"]
    memory = f", memory {a['model_rss_bytes'] / 2**20:.0f} MiB" + (
        f" ({result['memory_ratio']:.2f}x)" if result.get("memory_ratio") else "")
    return (f"speed in {a['runtime']} on {a['device']}: prompt {a['prompt_tok_s']:.0f} tok/s "
            f"({result['prompt_speedup']:.2f}x the float model's {r['prompt_tok_s']:.0f}), decode "
            f"{a['decode_tok_s']:.1f} tok/s ({result['decode_speedup']:.2f}x {r['decode_tok_s']:.1f}){memory}")


class _turn:
    """Exclusive turn for speed measurements on this machine (a lock file), so they do not time each other."""

    def __init__(self, lock_dir: str | Path | None) -> None:
        root = Path(lock_dir or Path(tempfile.gettempdir()) / "turboquant-devices")
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "speed.lock"

    def __enter__(self) -> "_turn":
        self.handle = open(self.path, "ab")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _status_bytes(key: str) -> int | None:
    """A memory figure of this process from ``/proc/self/status`` (Linux), None elsewhere."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(key + ":")), None)


def _max_rss() -> int:
    """``getrusage``'s lifetime peak RSS in bytes (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _rss_now() -> int:
    now = _status_bytes("VmRSS")
    return now if now is not None else _max_rss()


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS; elsewhere the lifetime peak
    is used, which in a fresh measuring process is the same thing."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else _max_rss()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turboquant.quality.speed", description=measure_here.__doc__)
    parser.add_argument("artifact")
    parser.add_argument("prompt_json")
    parser.add_argument("n_new", type=int)
    parser.add_argument("--device", default=None)
    parser.add_argument("--format", default=None)
    args = parser.parse_args(argv)
    prompt = torch.tensor(json.loads(Path(args.prompt_json).read_text()), dtype=torch.long)
    try:
        speed = measure_here(args.artifact, prompt, args.n_new, args.device, args.format)
    except TurboQuantError as e:
        print(f"turboquant: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(speed.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
