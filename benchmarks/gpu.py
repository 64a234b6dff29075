"""Quantization on the accelerator: RTN, GPTQ W4 g128 and AWQ W4 g128 of a random Llama-3-8B-shaped model.

One command (issue 18): writes a random model of the shape (bfloat16 safetensors, one shard per block: no
download), random calibration tokens (128 x 2048 by default), then runs each method through the real pipeline on
``--device`` and reports wall time, peak device memory, and the ratio of the time to the unavoidable matrix work:
one calibration forward of every block plus ``XᵀX`` of every input group, at the float32 matmul rate measured on
the same device in the same run. Writes ``benchmarks/results/gpu.json``.

    python benchmarks/gpu.py                                   # on the GPU machine (cuda)
    python benchmarks/gpu.py --shape tiny --device cpu         # smoke run of the same code, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from turboquant.device import resolve_device
from turboquant.io.calibration import CalibrationRecipe, CalibrationSet
from turboquant.io.tiny import tiny_config
from turboquant.methods import make_config
from turboquant.quantize.pipeline import quantize

SHAPES = {
    "llama3-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
                      max_positions=8192),
    "tiny": dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=4096, max_positions=1024),
}
METHODS = {"rtn": {}, "gptq": {}, "awq": {}}


def write_random_model(path: Path, shape: dict, layers: int | None, seed: int = 0) -> Path:
    """A random model of ``shape`` as a safetensors checkpoint, written block by block (never all in memory)."""
    from transformers import AutoModelForCausalLM

    shape = dict(shape, layers=layers or shape["layers"])
    config = tiny_config("llama", tie_embeddings=False, **shape)
    config.torch_dtype = "bfloat16"
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in skeleton.state_dict().items():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, {})[name] = p
    g = torch.Generator().manual_seed(seed)
    index: dict[str, str] = {}
    for i, (key, tensors) in enumerate(shards.items()):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        real = {n: (torch.ones(p.shape) if n.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02)
                .to(torch.bfloat16) for n, p in tensors.items()}
        save_file(real, str(path / file), metadata={"format": "pt"})
        index.update({n: file for n in real})
        del real
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return path


def matmul_rate(device: torch.device, n: int = 4096, m: int = 8192) -> float:
    """Float32 FLOP/s of an ``[m, n] @ [n, n]`` matmul on ``device`` (best of 5)."""
    a, b = torch.randn(m, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * n * n / best


def matrix_work(shape: dict, layers: int, tokens: int) -> float:
    """FLOPs no calibrated method can avoid: one forward of every block's linears and ``XᵀX`` per input group."""
    h, i = shape["hidden"], shape["intermediate"]
    kv = h * shape["kv_heads"] // shape["heads"]
    linear_params = h * (h + 2 * kv) + h * h + 2 * h * i + i * h
    gram = 3 * h * h + i * i  # attention-norm readers, o_proj, MLP-norm readers, down_proj
    return layers * 2 * tokens * (linear_params + gram)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="blocks to build (default: the shape's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--workdir", type=Path, default=None, help="where the random model is written (default: tmp)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    args = ap.parse_args()

    device = resolve_device(args.device)
    shape = SHAPES[args.shape]
    layers = args.layers or shape["layers"]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tq-gpu-"))
    t0 = time.perf_counter()
    model = write_random_model(work / "model", shape, layers)
    write_s = time.perf_counter() - t0
    ids = torch.randint(0, shape["vocab"], (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet(ids, CalibrationRecipe(sources=("random",), n_samples=args.samples, seqlen=args.seqlen))
    rate = matmul_rate(device)
    work_flops = matrix_work(shape, layers, args.samples * args.seqlen)
    rows = []
    for method in args.methods.split(","):
        cfg = make_config(method, bits=4, group_size=128, **METHODS[method])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        quantize(model, cfg, work / f"q-{method}", calib=calib, device=device, progress=False, overwrite=True)
        _sync(device)
        seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        floor = work_flops / rate if method != "rtn" else None
        rows.append({"method": method, "seconds": float(f"{seconds:.4g}"),
                     "peak_device_gib": round(peak / 2**30, 2) if peak is not None else None,
                     "matrix_floor_s": float(f"{floor:.4g}") if floor else None,
                     "ratio_to_floor": float(f"{seconds / floor:.4g}") if floor else None})
        shutil.rmtree(work / f"q-{method}", ignore_errors=True)
    result = {"shape": args.shape, "layers": layers, "samples": args.samples, "seqlen": args.seqlen,
              "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or device.type, "torch": torch.__version__,
              "matmul_tflops_fp32": round(rate / 1e12, 2), "model_write_s": round(write_s, 1), "rows": rows}
    print(f"{'method':6} {'seconds':>9} {'peak GiB':>9} {'floor s':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['method']:6} {r['seconds']:9.1f} {str(r['peak_device_gib']):>9} {str(r['matrix_floor_s']):>8} "
              f"{str(r['ratio_to_floor']):>6}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
