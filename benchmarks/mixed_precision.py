"""Mixed precision by measured sensitivity vs uniform quantization at equal bits per weight (issue 9, item 4).

On tq-ref-llama: calibration 128 x 512 tokens from calib/wiki.txt + calib/c4.txt (params.yaml's recipe); evaluation
on all of heldout/all.txt (non-overlapping 512-token windows): KL divergence and top-1 agreement against the float
model, perplexity. Uniform RTN / GPTQ at 3 and 4 bits (g128, asymmetric) against mixed precision over the same base
method with ``candidate_bits`` 2, 3, 4, 6, 8 at targets equal to the uniform runs' measured bits per weight, and one
in between. Each base method's sensitivity is measured once and shared by its targets (its time is reported on its
own). Writes benchmarks/results/mixed_precision.json and .md.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/mixed_precision.py
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from turboquant.io.calibration import CalibrationRecipe, build_calibration
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.quality.evaluate import BaselineLogits, evaluate_many
from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize
from turboquant.methods import make_config
from turboquant.quantize.sensitivity import measure_sensitivity, plan_bits
from turboquant.io.model import open_model
from turboquant.quantize.pipeline import quantize

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "tq-ref-llama"
CALIB = (str(SHARED / "data" / "calib" / "wiki.txt"), str(SHARED / "data" / "calib" / "c4.txt"))
HELDOUT = SHARED / "data" / "heldout" / "all.txt"
WORK = ROOT / "benchmarks" / "work" / "mixed_precision"
RESULTS = ROOT / "benchmarks" / "results"
SCHEME = dict(group_size=128, symmetric=False)
CANDIDATES = (2, 3, 4, 6, 8)
BASES = ("rtn", "gptq")
UNIFORM_BITS = (3, 4)
MIDDLE_BPW = 3.65  # between the 3- and 4-bit runs


def bits_per_weight(qdir: Path) -> float:
    """Stored bits per weight over the quantized linears (codes + float16 scales + zero points)."""
    ckpt = QuantizedCheckpoint.open(qdir)
    total = params = 0
    for module, info in ckpt.modules.items():
        out_f, in_f = info["shape"]
        total += ckpt.scheme(module).storage_bits(out_f, in_f)
        params += out_f * in_f
    return total / params


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    calib = build_calibration(CalibrationRecipe(CALIB, n_samples=128, seqlen=512, seed=0), MODEL)
    ids = tokenize(load_tokenizer(MODEL), read_text(HELDOUT))
    baseline = BaselineLogits.compute(load_model(MODEL), ids, ctx=512)
    opened = open_model(MODEL)
    rows: list[dict] = []
    sensitivity_s: dict[str, float] = {}
    for base in BASES:
        uniform_bpw = {}
        for bits in UNIFORM_BITS:
            label = f"{base} W{bits} uniform"
            out = WORK / label.replace(" ", "_")
            t = time.perf_counter()
            quantize(MODEL, make_config(base, bits=bits, **SCHEME), out, overwrite=True, progress=False,
                     calib=calib if base == "gptq" else None)
            rows.append({"label": label, "base": base, "kind": "uniform", "dir": out,
                         "seconds": time.perf_counter() - t})
            uniform_bpw[bits] = bits_per_weight(out)
        mixed = make_config("mixed", base=base, target_bpw=uniform_bpw[UNIFORM_BITS[0]], candidate_bits=CANDIDATES,
                            **SCHEME)
        t = time.perf_counter()
        sens = measure_sensitivity(opened, mixed, calib)
        sensitivity_s[base] = time.perf_counter() - t
        (WORK / f"sensitivity-{base}.json").write_text(json.dumps(sens.to_dict(), indent=1))
        print(f"{base}: sensitivity measured in {sensitivity_s[base]:.1f}s", flush=True)
        targets = [uniform_bpw[UNIFORM_BITS[0]], MIDDLE_BPW, uniform_bpw[UNIFORM_BITS[1]]]
        for target in targets:
            cfg = replace(mixed, target_bpw=target)
            cfg = replace(cfg, plan=plan_bits(sens, cfg))
            label = f"{base} mixed @{target:.3f}"
            out = WORK / label.replace(" ", "_").replace("@", "")
            t = time.perf_counter()
            quantize(MODEL, cfg, out, overwrite=True, progress=False, calib=calib)
            hist = {b: list(cfg.plan.values()).count(b) for b in CANDIDATES}
            rows.append({"label": label, "base": base, "kind": "mixed", "dir": out, "target_bpw": target,
                         "seconds": time.perf_counter() - t + sensitivity_s[base],
                         "layers_per_bits": {str(b): n for b, n in hist.items() if n}})
    for row in rows:
        print(f"quantized {row['label']} in {row['seconds']:.1f}s", flush=True)
    models = {r["label"]: load_model(r["dir"]) for r in rows}
    results = evaluate_many(models, ids, ctx=512, baseline=baseline, text_name=HELDOUT.name)
    table = []
    for r in rows:
        res = results[r["label"]]
        table.append({"label": r["label"], "base": r["base"], "kind": r["kind"], "bpw": bits_per_weight(r["dir"]),
                      "target_bpw": r.get("target_bpw"), "kl": res.kl, "top1": res.top1, "ppl": res.ppl,
                      "seconds": r["seconds"], "layers_per_bits": r.get("layers_per_bits")})
    report = {
        "model": MODEL.name, "eval": {"text": "heldout/all.txt", "ctx": 512, "tokens": int(ids.numel()),
                                      "baseline_ppl": results[rows[0]["label"]].baseline_ppl},
        "calibration": {"sources": ["calib/wiki.txt", "calib/c4.txt"], "n_samples": 128, "seqlen": 512},
        "scheme": SCHEME, "candidate_bits": list(CANDIDATES),
        "sensitivity": {"samples": mixed.sensitivity_samples, "seconds": sensitivity_s},
        "torch": torch.__version__, "machine": platform.machine(), "rows": table,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mixed_precision.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| run | bits/weight | KL | top-1 | ppl | time (s) | layers per bits |", "|---|---|---|---|---|---|---|"]
    for t in table:
        hist = ", ".join(f"{n}x{b}" for b, n in (t["layers_per_bits"] or {}).items())
        lines.append(f"| {t['label']} | {t['bpw']:.3f} | {t['kl']:.5f} | {t['top1']:.4f} | {t['ppl']:.3f} | "
                     f"{t['seconds']:.1f} | {hist} |")
    sens_times = ", ".join(f"{k} {v:.0f}s" for k, v in sensitivity_s.items())
    md = (f"Mixed precision vs uniform on {MODEL.name} (heldout/all.txt, {ids.numel()} tokens, ctx 512; float ppl "
          f"{report['eval']['baseline_ppl']:.3f}). g128 asymmetric; mixed picks per layer from {list(CANDIDATES)} "
          f"bits; its time includes the sensitivity pass ({sens_times}, {mixed.sensitivity_samples} windows).\n\n"
          + "\n".join(lines) + "\n")
    (RESULTS / "mixed_precision.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
