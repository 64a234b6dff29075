"""The bundled example: one model through several methods and schemes, evaluated against its baseline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer

from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize
from turboquant.io.tiny import _FALLBACK_TEXT, save_tiny_model
from turboquant.methods import make_config
from turboquant.quality.evaluate import evaluate_many
from turboquant.quantize.pipeline import quantize

SHARED = Path("../shared")
DEFAULT_MODEL = SHARED / "models" / "tq-ref-llama"
DEFAULT_TEXT = SHARED / "data" / "heldout" / "all.txt"

#: (label, method, options) — the demo's plan.
DEMO_RUNS: list[tuple[str, str, dict]] = [
    ("fp16", "fp16", {}),
    ("bf16", "bf16", {}),
    ("rtn-w8-g128", "rtn", {"bits": 8, "group_size": 128}),
    ("rtn-w4-g128", "rtn", {"bits": 4, "group_size": 128}),
    ("rtn-w4-g128-asym-mse", "rtn", {"bits": 4, "group_size": 128, "symmetric": False, "mse_clip": True}),
    ("rtn-w4-channel", "rtn", {"bits": 4, "group_size": -1}),
    ("rtn-w3-g128", "rtn", {"bits": 3, "group_size": 128}),
]


@dataclass
class DemoRow:
    label: str
    size_mb: float
    bpw: float
    ppl: float
    ppl_delta_pct: float
    kl: float
    top1: float


def checkpoint_bits_per_weight(qdir: Path) -> float:
    """Average stored bits per weight over the quantized (or cast) linear layers."""
    ckpt = QuantizedCheckpoint.open(qdir)
    if not ckpt.modules:
        return 16.0
    total_bits = total_weights = 0
    for module, info in ckpt.modules.items():
        out_f, in_f = info["shape"]
        total_bits += ckpt.scheme(module).storage_bits(out_f, in_f, info.get("fractional_zero", False))
        total_weights += out_f * in_f
    return total_bits / total_weights


def _dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 1e6


def run_demo(out: Path, model: Path | None, text: Path | None, max_tokens: int) -> list[DemoRow]:
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = DEFAULT_MODEL if (DEFAULT_MODEL / "config.json").is_file() else None
    if model is None:
        typer.echo("../shared/models/tq-ref-llama not found: building a tiny random Llama for the demo")
        model = out / "tiny-llama"
        if not (model / "config.json").is_file():
            save_tiny_model(model, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)
    if text is None:
        text = DEFAULT_TEXT if DEFAULT_TEXT.is_file() else None
    raw = read_text(text) if text is not None else _fallback_text()
    ids = tokenize(load_tokenizer(model), raw)[:max_tokens]
    baseline = load_model(model)
    typer.echo(f"model {model}  ·  eval text {text or 'built-in'}  ·  {ids.numel()} tokens")
    for label, method, options in DEMO_RUNS:
        typer.echo(f"quantizing {label} ...")
        quantize(model, make_config(method, **options), out / label, overwrite=True, progress=False)
    typer.echo("evaluating every artifact against the baseline ...")
    results = evaluate_many({label: load_model(out / label) for label, _, _ in DEMO_RUNS}, ids, ctx=512,
                            baseline=baseline)
    rows = [DemoRow(label, _dir_size_mb(out / label), checkpoint_bits_per_weight(out / label), r.ppl,
                    r.ppl_delta_pct, r.kl, r.top1) for label, r in results.items()]
    table = format_table(rows, baseline_ppl=next(iter(results.values())).baseline_ppl)
    typer.echo(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    typer.echo(f"results written to {out}/results.md and {out}/results.json")
    return rows


def format_table(rows: list[DemoRow], baseline_ppl: float | None) -> str:
    lines = [
        f"baseline perplexity: {baseline_ppl:.3f}" if baseline_ppl else "",
        "",
        "| artifact | size MB | bits/weight (linears) | perplexity | Δppl % | KL vs baseline | top-1 agree |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.label} | {r.size_mb:.1f} | {r.bpw:.2f} | {r.ppl:.3f} | {r.ppl_delta_pct:+.2f} | "
                     f"{r.kl:.6f} | {r.top1:.4f} |")
    return "\n".join(lines)


def _fallback_text() -> str:
    return _FALLBACK_TEXT * 16
