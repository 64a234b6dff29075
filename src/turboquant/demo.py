"""The bundled example: the plan ``turboquant demo`` runs (the whole product on the reference model) and the table
it prints afterwards.

The plan calibrates once, quantizes with GPTQ, AWQ and RTN (in parallel), exports to GGUF, GPTQ, AWQ, MLX and
compressed-tensors, validates every artifact in its own runtime against the float model, gates it and writes the
report. It is sized to finish in minutes on two CPU cores: 32 calibration windows of 512 tokens, 4,096 evaluation
tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from turboquant.io.tiny import FALLBACK_TEXT, save_tiny_model

SHARED = Path("../shared")
DEFAULT_MODEL = SHARED / "models" / "tq-ref-llama"
DEFAULT_TEXT = SHARED / "data" / "heldout" / "all.txt"
DEFAULT_CALIB = (SHARED / "data" / "calib" / "wiki.txt", SHARED / "data" / "calib" / "c4.txt")

#: The demo's quantizations: (method, options, formats). GPTQ at group 32 fits GGUF's Q4_0 blocks natively. The
#: MLX artifact is float32 because MLX's CPU backend (Linux, no Metal) runs float16 about 45x slower (measured:
#: 0.9 s vs 0.02 s per token on tq-ref-llama); on Apple Silicon mlx-lm's float16 default is the one to ship.
DEMO_QUANTIZE: list[tuple[str, dict[str, Any], list[Any]]] = [
    ("gptq", {"bits": 4, "group_size": 32, "act_order": True, "static_groups": True},
     [{"format": "gguf", "gguf_type": "Q4_0"}, "gptq", {"format": "mlx", "dtype": "float32"}, "compressed-tensors"]),
    ("awq", {"bits": 4, "group_size": 128, "symmetric": False, "search_samples": 8}, ["awq"]),
    ("rtn", {"bits": 8, "group_size": 32}, [{"format": "gguf", "gguf_type": "Q8_0"}]),
]


def demo_plan(out: Path, model: Path | None = None, text: Path | None = None, max_tokens: int = 4096,
              n_samples: int = 32) -> tuple[Path, list[str]]:
    """Write the demo's ``params.yaml`` under ``out``; returns it and what was substituted for missing inputs.

    Without ``../shared`` (a fresh clone elsewhere) the demo builds a tiny random Llama and calibrates and
    evaluates on text it trains that model's tokenizer on; that fallback is said, never silent.
    """
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if model is None:
        model = DEFAULT_MODEL if (DEFAULT_MODEL / "config.json").is_file() else None
    data = [str(p.resolve()) for p in DEFAULT_CALIB if p.is_file()]
    if text is None:
        text = DEFAULT_TEXT if DEFAULT_TEXT.is_file() else None
    if model is None or not data or text is None:
        fallback = out / "built-in.txt"
        fallback.write_text(_fallback_text())
        data = data or [str(fallback.resolve())]
        text = text or fallback
    if model is None:
        model = out / "tiny-llama"
        notes.append(f"{DEFAULT_MODEL} not found: a tiny random Llama was built at {model}")
        if not (model / "config.json").is_file():
            save_tiny_model(model, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)
    plan = {
        "models": [{"id": str(Path(model).resolve())}],
        "calibration": {"data": data, "n_samples": n_samples, "seqlen": 512, "seed": 0},
        "evaluation": {"text": str(Path(text).resolve()), "ctx": 512, "max_tokens": max_tokens},
        "quantize": [{"method": m, "options": o, "formats": f} for m, o, f in DEMO_QUANTIZE],
        "gates": {},
        "publish": {"enabled": False},
    }
    params = out / "params.yaml"
    params.write_text("# The demo plan (written by `turboquant demo`); run it again with `turboquant run` on it.\n"
                      + yaml.safe_dump(plan, sort_keys=False))
    return params, notes


def verdict_table(verdicts: list[dict[str, Any]]) -> str:
    """One row per artifact of a run (the flow's verdicts): runtime, bits per weight, perplexity change, KL vs the
    float model, top-1 agreement, greedy decode tok/s with its ratio to the float model in the same runtime, and
    the gate verdict with its reasons."""
    rows = ["| artifact | runtime | bits/weight (file) | ppl (Δ %) | KL vs float | top-1 | decode tok/s (× float) "
            "| gates |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for v in verdicts:
        path = Path(v["validation"]) if v.get("validation") else None
        m = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        passed = "PASS" if v["passed"] else "FAIL: " + "; ".join(v.get("reasons") or [])
        speed = m.get("speed") or {}
        decode = (f"{speed['artifact']['decode_tok_s']:.0f} ({speed['decode_speedup']:.2f}×)" if speed else "—")
        rows.append(f"| {Path(v['artifact']).name} | {m.get('runtime', '—')} | {_num(m.get('bits_per_weight'), '.2f')} "
                    f"| {_num(m.get('ppl'), '.3f')} ({_num(m.get('ppl_delta_pct'), '+.2f')}) | "
                    f"{_num(m.get('kl'), '.5f')} | {_num(m.get('top1'), '.4f')} | {decode} | {passed} |")
    return "\n".join(rows)


def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "—"


def _fallback_text() -> str:
    return FALLBACK_TEXT * 16
