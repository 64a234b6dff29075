"""Validate one artifact in its own runtime: quality against the baseline, size, lm-eval tasks, gate verdict.

What is measured (``validate``): perplexity, mean KL divergence of next-token distributions against the baseline
and top-1 agreement on the evaluation text at ``ctx``; perplexity at the longest context that fits (long-context
damage shows there first); file size and bits per weight; optional lm-eval tasks against the baseline's scores.
The verdict applies the gates (defaults by the artifact's bit width, see ``gates``) and lists every check.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from turboquant.device import describe_device, resolve_device
from turboquant.errors import DataError
from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize
from turboquant.io.checkpoint import METADATA_FILE, QuantizedCheckpoint
from turboquant.io.manifest import find_manifest
from turboquant.io.model import open_source_checkpoint
from turboquant.quality.bnb import bnb_bits_per_weight as bnb_bits
from turboquant.quality.evaluate import BaselineLogits, evaluate_many, model_context
from turboquant.quality.gates import Gates, judge
from turboquant.quality.lmeval import run_tasks
from turboquant.quality.runtimes import artifact_format, open_runtime
from turboquant.quality.speed import compare, PROMPT_TOKENS

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".onnx_data", ".data", ".npz")
#: lm-eval metrics scored as accuracies (0-1, higher is better): their drop is gated, in points.
ACCURACY_METRICS = ("acc", "acc_norm", "exact_match", "f1")


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def parameter_count(model_dir: Path) -> int:
    ckpt = open_source_checkpoint(Path(model_dir))
    total = 0
    for info in ckpt.tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        total += n
    return total


def recorded_bits(path: Path) -> float | None:
    """The code width recorded in the artifact's manifest (widest scheme), or None for float artifacts.

    A bitsandbytes checkpoint has no manifest: its quantized linears' stored bits per weight are measured (e.g.
    ~4.13 for NF4 with double quant, absmax included), so the 4-bit gates apply to it.
    """

    measured = bnb_bits(path)
    if measured is not None:
        return measured
    data = find_manifest(path)
    if data is None:
        meta = Path(path) / METADATA_FILE
        if not meta.is_file():
            return None
        data = json.loads(meta.read_text())
    bits = [s["bits"] for s in data.get("schemes", [])] or ([data["scheme"]["bits"]] if data.get("scheme") else [])
    gguf_type = (data.get("format_details") or {}).get("gguf_type")
    if gguf_type:  # the file's type decides: a K-quant of a float checkpoint is a 2-6 bit artifact
        import re

        m = re.match(r"[QI]Q?(\d)", gguf_type)
        return float(m.group(1)) if m else None
    mixed = (data.get("mixed_precision") or (data.get("quantized_checkpoint") or {}).get("mixed_precision"))
    if isinstance(mixed, dict) and mixed.get("bits_per_weight"):
        return float(mixed["bits_per_weight"])  # per-layer widths: the gates follow the achieved average
    return max(bits) if bits else None


def _task_scores(results: dict[str, dict[str, Any]]) -> dict[str, tuple[str, float]]:
    """``{task: (metric, score in points)}`` for tasks reporting an accuracy-like metric."""
    out = {}
    for task, metrics in results.items():
        metric = next((m for m in ACCURACY_METRICS if m in metrics), None)
        if metric is not None:
            out[task] = (metric, 100.0 * float(metrics[metric]))
    return out


def validate(
    artifact: str | Path,
    baseline: str | Path,
    text: str | Path,
    *,
    ctx: int = 512,
    long_ctx: int | None = None,
    max_tokens: int | None = None,
    tasks: tuple[str, ...] = (),
    task_limit: int | None = None,
    gates: Gates | None = None,
    baseline_cache: str | Path | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    speed: bool = False,
) -> dict[str, Any]:
    """Metrics and verdict for ``artifact`` against ``baseline`` (the unquantized model) on ``text``; the artifact's
    runtime and the baseline run on ``device`` (``device.resolve_device``) where the runtime runs on torch.

    ``speed``: also prompt and greedy-decode throughput and peak memory in the runtime, against the unquantized
    model in the same runtime (``quality.speed``; its float reference is cached beside ``baseline_cache``)."""
    artifact, baseline = Path(artifact), Path(baseline)
    dev = resolve_device(device)
    fmt = artifact_format(artifact)
    if fmt == "canonical":
        QuantizedCheckpoint.open(artifact).check_complete()  # exported artifacts were checked at export
    runtime_name, runtime = open_runtime(artifact, dev)
    tokenizer = load_tokenizer(artifact if (artifact / "tokenizer_config.json").is_file() else baseline)
    ids = tokenize(tokenizer, read_text(text))
    if max_tokens:
        ids = ids[:max_tokens]
    base_model = load_model(baseline).to(dev).eval()
    if base_model.config.vocab_size != _vocab(runtime, base_model):
        raise DataError("the artifact's vocabulary differs from the baseline's",
                        "validate an artifact only against the model it was made from")
    contexts = [c for c in (model_context(runtime), model_context(base_model)) if c]
    ctx = min([ctx] + contexts)
    base = _baseline(base_model, ids, ctx, baseline_cache)
    short = evaluate_many({"a": runtime}, ids, ctx=ctx, baseline=base, text_name=str(text), progress=progress)["a"]
    metrics: dict[str, Any] = {
        "artifact": str(artifact), "format": fmt, "runtime": runtime_name, "device": describe_device(dev),
        "baseline": str(baseline),
        "text": str(text), **{k: v for k, v in short.to_dict().items() if k != "text"},
    }
    longest = long_ctx or min(contexts + [ids.numel()])
    if longest > ctx and ids.numel() >= longest:
        long = evaluate_many({"a": runtime}, ids, ctx=longest, baseline=base_model)["a"]
        metrics.update(long_ctx=long.ctx, long_ppl=long.ppl, long_baseline_ppl=long.baseline_ppl,
                       long_ppl_delta_pct=long.ppl_delta_pct, long_kl=long.kl)
    size, params = weight_bytes(artifact), parameter_count(baseline)
    metrics.update(size_bytes=size, params=params, bits_per_weight=8.0 * size / params if params else None)
    if tasks:
        metrics["tasks"] = _tasks(runtime, base_model, tokenizer, tasks, task_limit, baseline_cache)
    if speed:
        metrics["speed"] = _speed(artifact, baseline, ids, baseline_cache, dev)
    bits = recorded_bits(artifact)
    gates = gates or Gates.for_bits(bits or 16)
    verdict = judge(metrics, gates)
    metrics["bits"] = bits
    metrics["verdict"] = verdict.to_dict()
    return metrics


def _speed(artifact: Path, baseline: Path, ids: torch.Tensor, cache: str | Path | None,
           device: torch.device) -> dict[str, Any]:
    """``speed.compare`` on the first ``PROMPT_TOKENS`` tokens of the evaluation text."""
    prompt = ids[:PROMPT_TOKENS]
    if prompt.numel() < 8:
        raise DataError(f"the evaluation text has {ids.numel()} tokens, too few to time a prompt",
                        "pass a longer text, or validate without speed")
    if cache is not None:
        return compare(artifact, baseline, prompt, Path(cache).parent / "reference", device=str(device))
    with tempfile.TemporaryDirectory(prefix="turboquant-reference-") as work:
        return compare(artifact, baseline, prompt, Path(work), device=str(device))


def _vocab(runtime, base_model) -> int:
    if isinstance(runtime, torch.nn.Module):
        return runtime.config.vocab_size
    return getattr(runtime, "vocab_size", base_model.config.vocab_size)


def _baseline(base_model, ids: torch.Tensor, ctx: int, cache: str | Path | None):
    """The baseline's distributions: read from ``cache`` when it covers these windows, else computed (and saved)."""
    if cache is None:
        return base_model
    cache = Path(cache)
    if cache.is_file():
        saved = BaselineLogits.load(cache)
        if saved.matches(ids, ctx, None):
            return saved
    saved = BaselineLogits.compute(base_model, ids, ctx)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    saved.save(tmp)
    tmp.replace(cache)
    return saved


def _tasks(runtime, base_model, tokenizer, tasks, limit, cache) -> dict[str, dict[str, Any]]:
    ours = run_tasks(runtime, tokenizer, list(tasks), limit=limit)
    base_path = Path(f"{cache}.tasks.json") if cache else None
    key = json.dumps({"tasks": sorted(tasks), "limit": limit})
    saved = json.loads(base_path.read_text()) if base_path and base_path.is_file() else {}
    if key not in saved:
        saved[key] = run_tasks(base_model, tokenizer, list(tasks), limit=limit)
        if base_path:
            base_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    theirs = saved[key]
    out: dict[str, dict[str, Any]] = {}
    ours_scores, base_scores = _task_scores(ours), _task_scores(theirs)
    for task in ours:
        entry: dict[str, Any] = {"metrics": ours[task], "baseline_metrics": theirs.get(task, {})}
        if task in ours_scores:
            entry.update(metric=ours_scores[task][0], score=ours_scores[task][1],
                         baseline=base_scores.get(task, (None, None))[1])
        out[task] = entry
    return out


def write_validation(metrics: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")
