"""Quality of every method on the trained reference model: the table in the README.

Calibration 128 x 512 tokens from calib/wiki.txt + calib/c4.txt (and calib/code.txt for the domain-mismatch row);
evaluation on heldout/all.txt (KL, top-1, perplexity vs the float model) and on the WikiText-2 test split
(perplexity, first 64 windows of 512). Writes benchmarks/results/quality.json and quality.md.

    .venv/bin/python benchmarks/quality.py
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from turboquant.io.calibration import CalibrationRecipe, build_calibration
from turboquant.quality.evaluate import evaluate_many
from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize
from turboquant.methods import make_config
from turboquant.quantize.pipeline import quantize

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "tq-ref-llama"
CALIB = SHARED / "data" / "calib"
HELDOUT = SHARED / "data" / "heldout" / "all.txt"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
WORK = ROOT / "benchmarks" / "work" / "quality"
RESULTS = ROOT / "benchmarks" / "results"

SOURCES = {"wiki+c4": (str(CALIB / "wiki.txt"), str(CALIB / "c4.txt")), "code": (str(CALIB / "code.txt"),)}
RUNS = [
    ("rtn W4 g128", "rtn", dict(bits=4, group_size=128, symmetric=False), None),
    ("hqq W4 g128", "hqq", dict(bits=4, group_size=128), None),
    ("awq W4 g128", "awq", dict(bits=4, group_size=128, symmetric=False), "wiki+c4"),
    ("gptq W4 g128", "gptq", dict(bits=4, group_size=128, symmetric=False), "wiki+c4"),
    ("gptq W4 g128 act-order", "gptq", dict(bits=4, group_size=128, symmetric=False, act_order=True), "wiki+c4"),
    ("gptq W4 g128 (calib: code)", "gptq", dict(bits=4, group_size=128, symmetric=False), "code"),
    ("rtn W3 g128", "rtn", dict(bits=3, group_size=128, symmetric=False), None),
    ("hqq W3 g128", "hqq", dict(bits=3, group_size=128), None),
    ("awq W3 g128", "awq", dict(bits=3, group_size=128, symmetric=False), "wiki+c4"),
    ("gptq W3 g128", "gptq", dict(bits=3, group_size=128, symmetric=False), "wiki+c4"),
]


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    calib = {k: build_calibration(CalibrationRecipe(v, n_samples=128, seqlen=512, seed=0), MODEL) for k, v in SOURCES.items()}
    models, seconds = {}, {}
    for label, method, opts, data in RUNS:
        out = WORK / label.replace(" ", "_").replace("(", "").replace(")", "").replace(":", "")
        t = time.perf_counter()
        quantize(MODEL, make_config(method, **opts), out, overwrite=True, progress=False,
                 calib=calib[data] if data else None)
        seconds[label] = time.perf_counter() - t
        models[label] = load_model(out)
        print(f"quantized {label} in {seconds[label]:.1f}s", flush=True)
    tok = load_tokenizer(MODEL)
    baseline = load_model(MODEL)
    held = evaluate_many(models, tokenize(tok, read_text(HELDOUT)), ctx=512, baseline=baseline)
    wiki_ids = tokenize(tok, read_text(WIKITEXT))[: 64 * 512]
    wiki = evaluate_many({**models, "float32 baseline": baseline}, wiki_ids, ctx=512)
    rows = []
    for label, *_ in RUNS:
        h, w = held[label], wiki[label]
        rows.append({"artifact": label, "kl": h.kl, "kl_p99": h.kl_p99, "top1": h.top1, "ppl_heldout": h.ppl,
                     "ppl_heldout_delta_pct": h.ppl_delta_pct, "ppl_wikitext2": w.ppl, "quantize_s": seconds[label]})
    base = {"ppl_heldout": next(iter(held.values())).baseline_ppl, "ppl_wikitext2": wiki["float32 baseline"].ppl}
    lines = [f"float32 baseline: held-out perplexity {base['ppl_heldout']:.3f}, "
             f"WikiText-2 perplexity {base['ppl_wikitext2']:.2f} (first 64 x 512 tokens)", "",
             "| artifact | KL vs float | top-1 agree | held-out ppl (Δ%) | WikiText-2 ppl | quantize s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['artifact']} | {r['kl']:.5f} | {r['top1']:.4f} | {r['ppl_heldout']:.3f} "
                     f"({r['ppl_heldout_delta_pct']:+.2f}) | {r['ppl_wikitext2']:.2f} | {r['quantize_s']:.1f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.md").write_text(table + "\n")
    (RESULTS / "quality.json").write_text(json.dumps(
        {"baseline": base, "rows": rows, "calibration": "128 x 512 tokens, seed 0", "eval_ctx": 512,
         "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
