"""The quality report of a run: every artifact's measured quality and verdict, with plots, as Markdown and as one
self-contained HTML file (plots embedded), so a reviewer sees at a glance what may be published and why.

Inputs found under the run directory: validation JSON files (``turboquant validate --json``, recognised by their
``verdict``) and canonical quantized checkpoints (``turboquant.json``), whose weights give the per-layer
quantization error plot (relative Frobenius error of each linear against the source model, by block).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

import torch

from turboquant.errors import DataError
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.io.model import open_source_checkpoint

REPORT_MD, REPORT_HTML = "report.md", "report.html"
PARETO_PNG, LAYERS_PNG = "size_vs_perplexity.png", "layer_error.png"


def find_validations(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(Path(run_dir).rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and "verdict" in data and "ppl" in data:
            data["_file"] = str(path.relative_to(run_dir))
            out.append(data)
    return out


def artifact_name(v: dict[str, Any]) -> str:
    return Path(v["artifact"]).name


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both size and perplexity (lower is better), by size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def layer_errors(qdir: Path) -> dict[str, list[float]]:
    """``{linear kind: [relative error per block]}`` of a canonical checkpoint against its source weights."""

    ckpt = QuantizedCheckpoint.open(qdir)
    source = Path(ckpt.meta["source"]["path"])
    if not source.is_dir():
        return {}
    src = open_source_checkpoint(source)
    errors: dict[str, dict[int, float]] = {}
    for module in ckpt.modules:
        m = re.search(r"\.(\d+)\.(.+)$", module)
        if not m or f"{module}.weight" not in src.tensors:
            continue
        W = src.load([f"{module}.weight"])[f"{module}.weight"].float()
        err = (ckpt.quantized_tensor(module).dequantize(torch.float32) - W).norm() / W.norm().clamp_min(1e-12)
        errors.setdefault(m.group(2).rpartition(".")[2], {})[int(m.group(1))] = err.item()
    return {k: [v[i] for i in sorted(v)] for k, v in sorted(errors.items())}


def _plot_pareto(vals: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(v["size_bytes"] / 1e6, v["ppl"]) for v in vals]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for v, (x, y) in zip(vals, pts):
        ax.scatter(x, y, marker="o" if v["verdict"]["passed"] else "x", color="tab:blue" if v["verdict"]["passed"]
                   else "tab:red", zorder=3)
        ax.annotate(artifact_name(v), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:green", label="Pareto front")
    base = vals[0].get("baseline_ppl")
    if base:
        ax.axhline(base, color="gray", lw=0.8, label=f"baseline ppl {base:.3f}")
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel("perplexity (eval text)")
    ax.set_title("Size vs perplexity (x: gate failed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_layers(errors: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, kinds in errors.items():
        per_block = [sum(v[i] for v in kinds.values()) / len(kinds) for i in range(min(len(v) for v in kinds.values()))]
        ax.plot(range(len(per_block)), per_block, marker="o", label=name)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative weight error ||Ŵ − W|| / ||W|| (mean over linears)")
    ax.set_title("Per-layer quantization error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _rows(vals: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for v in sorted(vals, key=lambda v: v["size_bytes"]):
        tasks = "; ".join(f"{t} {r['score']:.1f} ({r['score'] - r['baseline']:+.1f})" for t, r in
                          sorted((v.get("tasks") or {}).items()) if r.get("score") is not None and r.get("baseline") is not None)
        verdict = "pass" if v["verdict"]["passed"] else "FAIL: " + "; ".join(v["verdict"]["reasons"])
        rows.append([artifact_name(v), v["format"], v["runtime"], _fmt(v.get("bits"), "g"),
                     f"{v['size_bytes'] / 1e6:.1f}", _fmt(v.get("bits_per_weight"), ".2f"),
                     f"{v['ppl']:.4f} ({v['ppl_delta_pct']:+.2f}%)", f"{v['kl']:.6f}", f"{v['top1']:.4f}",
                     _fmt(v.get("long_ppl_delta_pct"), "+.2f"), tasks or "—", *_speed_cells(v.get("speed")),
                     verdict])
    return rows


def _speed_cells(speed: dict[str, Any] | None) -> list[str]:
    """Prompt and decode tok/s with their ratio to the float model in the same runtime, and peak model memory."""
    if not speed:
        return ["—", "—", "—"]
    a = speed["artifact"]
    memory = f"{a['model_rss_bytes'] / 2**20:.0f}" + (f" ({speed['memory_ratio']:.2f}×)" if speed.get("memory_ratio")
                                                      else "")
    return [f"{a['prompt_tok_s']:.0f} ({speed['prompt_speedup']:.2f}×)",
            f"{a['decode_tok_s']:.1f} ({speed['decode_speedup']:.2f}×)", memory]


HEADER = ["artifact", "format", "runtime", "bits", "MB", "bits/weight", "ppl (Δ)", "KL", "top-1", "long-ctx Δppl %",
          "tasks (Δ points)", "prompt tok/s (× float)", "decode tok/s (× float)", "memory MiB (× float)", "verdict"]


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and the PNG plots for the run at ``run_dir``; returns the Markdown path."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir)
    vals = find_validations(run_dir)
    if not vals:
        raise DataError(f"no validation results under {run_dir}", "run `turboquant validate ... --json RUN_DIR/eval/NAME.json` first")
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_pareto(vals, out_dir / PARETO_PNG)
    errors = {p.parent.name: layer_errors(p.parent) for p in sorted(run_dir.rglob("turboquant.json"))}
    errors = {k: v for k, v in errors.items() if v}
    if errors:
        _plot_layers(errors, out_dir / LAYERS_PNG)
    rows = _rows(vals)
    passed = sum(v["verdict"]["passed"] for v in vals)
    first = vals[0]
    intro = (f"Baseline `{first['baseline']}`; evaluation text `{first['text']}` ({first['n_scored']} tokens scored, "
             f"windows of {first['ctx']}). {passed} of {len(vals)} artifacts passed their gates; only those may be "
             "published.")
    md = ["# Quantization report", "", intro, "", "| " + " | ".join(HEADER) + " |",
          "|" + "---|" * len(HEADER)] + ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", f"![size vs perplexity]({PARETO_PNG})"]
    if errors:
        md += ["", f"![per-layer quantization error]({LAYERS_PNG})"]
    (out_dir / REPORT_MD).write_text("\n".join(md) + "\n")
    (out_dir / REPORT_HTML).write_text(_html(intro, rows, out_dir, bool(errors)))
    return out_dir / REPORT_MD


def _img(path: Path) -> str:
    return f'<img alt="{path.stem}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def _html(intro: str, rows: list[list[str]], out_dir: Path, layers: bool) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    imgs = _img(out_dir / PARETO_PNG) + (_img(out_dir / LAYERS_PNG) if layers else "")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:48%;margin:1em 1% 0 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Quantization report</title><style>{style}"
            f"</style></head><body><h1>Quantization report</h1><p>{html.escape(intro)}</p><table><tr>{head}</tr>"
            f"{body}</table><div>{imgs}</div></body></html>\n")
