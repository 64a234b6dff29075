"""Calibrated-quantization memory benchmark: peak RSS of GPTQ / AWQ stays flat in model depth.

Run ``.venv/bin/python benchmarks/calibrated_memory.py [--malloc-diagnostic gptq]`` (about 7 minutes on a shared
2-core machine, 10 with the diagnostic; the committed results used it). Prints a Markdown table and writes
``benchmarks/results/calibrated_memory.json`` and ``.md``.

Target
------
For each calibrated method (GPTQ W4 g128, AWQ W4 g128), peak RSS of ``quantize(..., calib=...)`` on a random Llama
with 16 decoder layers is at most 1.2x that on the same model with 4 layers: ``sequential.BlockRunner`` keeps one
block's weights plus the calibration activations ``[n, seqlen, hidden]`` resident, whatever the depth. The same
holds for a mixture-of-experts model (row GPTQ-MOE: a random Qwen3-MoE of the same widths, 8 experts of half the
MLP width, top-2, every expert calibrated on every token), whose one resident block holds all its experts.

How
---
* Models: the random fp32 Llamas of ``benchmarks/foundation.py`` (hidden 1024, intermediate 2816, 16/8 heads, vocab
  32000, 4 and 16 layers), built by its ``ensure_model`` under ``benchmarks/work/`` or reused when present.
* Calibration: synthetic - ``n x seqlen`` token ids drawn uniformly from ``[0, vocab)`` with ``torch.Generator``
  seed 0 (default 16 x 256), wrapped in a ``CalibrationSet`` whose recipe names the source ``synthetic-uniform-ids``.
  This benchmark is about memory, not quality: random ids produce activations of the right shape and dtype.
* Each quantization runs in a fresh ``python -c`` subprocess that imports what ``quantize`` needs, builds the
  calibration tensor, runs ``quantize`` and prints ``getrusage(RUSAGE_SELF).ru_maxrss`` (the exact peak, the target).
  The same child also records, without touching the peak counter: ``/proc/self/status`` (VmRSS / RssAnon / RssFile)
  right after every block is finished (a thin wrapper around ``BlockRunner.advance``, which ``quantize`` calls after
  ``release_block``), the bytes of real (non-meta) parameters and buffers left in the runner's skeleton at that
  moment (checks that ``release_block`` really drops each block's weights), and the approximate per-phase peaks
  from a 5 ms sampler thread (phase = block i, then the non-block shard).
* An import-floor child (torch + turboquant.quantize.pipeline + methods + transformers' Llama, as the calibrated path loads)
  gives the RSS before any work.
* Speed settings (memory is what is measured; they keep the run within ~10 minutes on a shared 2-core machine):
  ``torch.set_num_threads(1)`` in every child (``--threads``), and for AWQ a lighter search than its defaults
  (``--awq-options``, default ``search_samples=4, grid=5, clip_grid=10``): the candidates are scored one after the
  other on the same tensors, so fewer of them change the time, not what is resident, apart from the scale search's
  subset of sequences (4 of 16 here), which is the same at both depths. ``--awq-options '{}'`` restores the defaults.
* Diagnostic (not the target, off by default): ``--malloc-diagnostic gptq[,awq]`` repeats those methods' runs with
  ``MALLOC_MMAP_THRESHOLD_=131072`` in the child's environment. Setting the threshold turns off glibc malloc's
  dynamic mmap threshold, under which, once a large buffer (e.g. a 30 MiB Hessian) has been freed, every later
  allocation up to 32 MiB comes from the heap and freed memory stays in the process instead of going back to the OS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from foundation import (  # noqa: E402  (benchmarks/ is not a package)
    _RSS_HELPERS,
    RSS_RATIO_TARGET,
    SIZES,
    WORK,
    _loadavg,
    _version,
    ensure_model,
    run_child,
    weight_sizes,
)

RESULTS = HERE / "results"
SIZE = "full"
METHODS = {
    # name: scheme and options (both W4 g128; AWQ asymmetric as its default, GPTQ symmetric as its default)
    "gptq": dict(bits=4, group_size=128),
    "awq": dict(bits=4, group_size=128),
    "gptq-moe": dict(bits=4, group_size=128),
}
#: The mixture-of-experts row: GPTQ on a random Qwen3-MoE of the same widths (8 experts of half the MLP width,
#: top-2, every expert calibrated on every token), so one resident block holds all its experts.
MOE = dict(model_type="qwen3_moe", experts=8)
MOE_TOKENIZER = HERE.parent.parent / "shared" / "models" / "tq-ref-llama"
AWQ_FAST = dict(search_samples=4, grid=5, clip_grid=10)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

CHILD_BUILD_MOE = _RSS_HELPERS + r"""
import os, shutil, torch
from pathlib import Path
from turboquant.io.tiny import save_tiny_model
args = json.loads(sys.argv[1])
final = Path(args.pop("path"))
tmp = final.with_name(final.name + ".tmp-build")
shutil.rmtree(tmp, ignore_errors=True)
save_tiny_model(tmp, dtype=torch.float32, tie_embeddings=False, **args)
os.replace(tmp, final)
print(json.dumps({"maxrss_kib": _maxrss_kib()}))
"""

CHILD_FLOOR = _RSS_HELPERS + r"""
import torch
import turboquant.quantize.pipeline, turboquant.methods, turboquant.io.calibration, turboquant.quantize.runner
import transformers
import transformers.models.llama.modeling_llama
print(json.dumps({"maxrss_kib": _maxrss_kib(), "status": _status()}))
"""

# The measured run. ru_maxrss is never reset; the instrumentation only reads /proc/self/status.
CHILD_CALIBRATED = _RSS_HELPERS + r"""
import threading, time
import torch
import turboquant.quantize.pipeline as Q
import turboquant.quantize.runner as S
from turboquant.io.calibration import CalibrationRecipe, CalibrationSet
from turboquant.methods import make_config

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
n, seqlen = args["n_samples"], args["seqlen"]
ids = torch.randint(0, args["vocab"], (n, seqlen), generator=torch.Generator().manual_seed(args["seed"]))
calib = CalibrationSet(ids, CalibrationRecipe(("synthetic-uniform-ids",), n_samples=n, seqlen=seqlen,
                                              seed=args["seed"]))
cfg = make_config(args["method"], **args["options"])

state = {"phase": 0, "stop": False}
peaks = {}
after_block = []
KEYS = ("VmRSS", "RssAnon", "RssFile")

def sample():
    while not state["stop"]:
        s = _status()
        p = peaks.setdefault(state["phase"], dict.fromkeys(KEYS, 0))
        for k in KEYS:
            p[k] = max(p[k], s.get(k, 0))
        time.sleep(0.005)

def real_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers())
               if not t.is_meta)

orig_advance = S.BlockRunner.advance
def advance(self, outputs):
    orig_advance(self, outputs)
    after_block.append({**_status(), "skeleton_real_bytes": real_bytes(self.skeleton),
                        "hidden_bytes": self.hidden.numel() * self.hidden.element_size(),
                        "t": time.perf_counter() - t0})
    state["phase"] += 1
S.BlockRunner.advance = advance

before = _status()
th = threading.Thread(target=sample, daemon=True)
th.start()
t0 = time.perf_counter()
Q.quantize(args["model"], cfg, args["out"], overwrite=True, progress=False, calib=calib)
elapsed = time.perf_counter() - t0
state["stop"] = True
th.join()
print(json.dumps({"maxrss_kib": _maxrss_kib(), "seconds": elapsed, "before": before, "after": _status(),
                  "after_block": after_block, "phase_peaks": {str(k): v for k, v in peaks.items()},
                  "config": cfg.to_dict(), "torch_threads": torch.get_num_threads()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="gptq,awq,gptq-moe", help="comma-separated subset of gptq,awq,gptq-moe")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1)")
    ap.add_argument("--awq-options", type=json.loads, default=AWQ_FAST,
                    help=f"extra AWQ options as JSON (default {json.dumps(AWQ_FAST)}; '{{}}' = AWQ defaults)")
    ap.add_argument("--malloc-diagnostic", default="",
                    help="comma-separated methods to re-run with MALLOC_MMAP_THRESHOLD_=131072 (diagnostic)")
    ap.add_argument("--json", type=Path, default=RESULTS / "calibrated_memory.json")
    a = ap.parse_args()
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    s = SIZES[SIZE]
    small_l, big_l = s["layers"]
    WORK.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    models, sizes, moe_models, moe_sizes = {}, {}, {}, {}
    for layers in (small_l, big_l):
        models[layers], _ = ensure_model(SIZE, layers)
        sizes[layers] = weight_sizes(models[layers])
        if "gptq-moe" in methods:
            moe_models[layers] = ensure_moe_model(s, layers)
            moe_sizes[layers] = weight_sizes(moe_models[layers])

    print("measuring the import floor ...", file=sys.stderr, flush=True)
    floor = run_child(CHILD_FLOOR, {})
    def measure(method: str, layers: int, env: dict | None = None) -> dict:
        options = {**METHODS[method], **(a.awq_options if method == "awq" else {})}
        tag = " (" + " ".join(f"{k}={v}" for k, v in env.items()) + ")" if env else ""
        print(f"{method}: {layers} layers{tag} ...", file=sys.stderr, flush=True)
        out = WORK / f"out-calib-{method}-L{layers}"
        load = _loadavg()
        model = moe_models[layers] if method == "gptq-moe" else models[layers]
        r = run_child(CHILD_CALIBRATED, dict(model=str(model), out=str(out), method=method.removesuffix("-moe"),
                                             options=options, n_samples=a.n_samples, seqlen=a.seqlen,
                                             seed=a.seed, vocab=s["vocab"], threads=a.threads), env=env)
        shutil.rmtree(out, ignore_errors=True)
        r["loadavg_before_after"] = [load, _loadavg()]
        r["options"], r["env"] = options, env or {}
        print(f"  peak {r['maxrss_kib'] / 1024:.0f} MiB in {r['seconds']:.0f} s", file=sys.stderr, flush=True)
        return r

    runs = {m: {str(L): measure(m, L) for L in (small_l, big_l)} for m in methods}
    diag_methods = [m.strip() for m in a.malloc_diagnostic.split(",") if m.strip()]
    diag_runs = {m: {str(L): measure(m, L, MALLOC_ENV) for L in (small_l, big_l)} for m in diag_methods}

    hidden, inter = s["hidden"], s["intermediate"]
    acts = a.n_samples * a.seqlen * hidden * 4
    def summarize(all_runs: dict) -> tuple[dict, dict]:
        targets, summary = {}, {}
        for method, by_l in all_runs.items():
            sm, bg = by_l[str(small_l)], by_l[str(big_l)]
            ratio = bg["maxrss_kib"] / sm["maxrss_kib"]
            targets[method] = {"target": f"<= {RSS_RATIO_TARGET}", "value": ratio,
                               "pass": ratio <= RSS_RATIO_TARGET}
            summary[method] = {}
            for L, r in by_l.items():
                ab = r["after_block"]
                blocks = [r["phase_peaks"].get(str(i), {}) for i in range(int(L))]
                summary[method][L] = {
                    "peak_rss_kib": r["maxrss_kib"],
                    "above_floor_kib": r["maxrss_kib"] - floor["maxrss_kib"],
                    "seconds": r["seconds"],
                    "seconds_per_block": (ab[-1]["t"] / len(ab)) if ab else None,
                    "rss_after_block_kib": [x["VmRSS"] for x in ab],
                    "anon_after_block_kib": [x["RssAnon"] for x in ab],
                    "file_after_block_kib": [x["RssFile"] for x in ab],
                    "skeleton_real_bytes_after_block": [x["skeleton_real_bytes"] for x in ab],
                    "block_phase_peak_sampled_kib": max((p.get("VmRSS", 0) for p in blocks), default=0),
                    "non_block_phase_peak_sampled_kib": r["phase_peaks"].get(L, {}).get("VmRSS", 0),
                }
        return targets, summary

    targets, summary = summarize(runs)
    diag_targets, diag_summary = summarize(diag_runs)

    import torch  # machine info only, after all children ran

    result = {
        "benchmark": "calibrated_memory",
        "model": {**s, "layers": [small_l, big_l], "dtype": "float32", "tie_embeddings": False,
                  "paths": {str(k): str(v) for k, v in models.items()}},
        "calibration": {"kind": "synthetic: token ids uniform in [0, vocab), torch.Generator seed",
                        "n_samples": a.n_samples, "seqlen": a.seqlen, "seed": a.seed,
                        "note": "about memory, not quality"},
        "methods": {m: runs[m][str(small_l)]["config"] for m in runs},
        "speed_settings": {"torch_threads": a.threads, "awq_extra_options": a.awq_options,
                           "note": "for run time only; candidates are scored one at a time on the same tensors"},
        "sizes": {
            "block_weights_bytes": sizes[big_l]["block_bytes"],
            "non_block_weights_bytes": sizes[big_l]["non_block_bytes"],
            "calib_activations_fp32_bytes": acts,
            "calib_activations_shape": [a.n_samples, a.seqlen, hidden],
            "largest_hessian_fp32_bytes": inter * inter * 4,
            "file_bytes": {str(k): v["file_bytes"] for k, v in sizes.items()},
            "moe_block_weights_bytes": moe_sizes[big_l]["block_bytes"] if moe_sizes else None,
            "moe": {**MOE, "moe_intermediate": inter // 2, "top_k": 2} if moe_sizes else None,
        },
        "targets": {"peak_rss_ratio": targets},
        "floor": floor,
        "summary": summary,
        "runs": runs,
        "malloc_diagnostic": {"env": MALLOC_ENV, "note": "diagnostic, not the target: glibc's dynamic mmap "
                              "threshold turned off", "ratios": diag_targets, "summary": diag_summary,
                              "runs": diag_runs} if diag_runs else None,
        "total_seconds": time.perf_counter() - t_start,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_version": torch.__version__,
            "transformers_version": _version("transformers"),
            "safetensors_version": _version("safetensors"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_at_end": _loadavg(),
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    text = render(result, small_l, big_l)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    a.json.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {a.json} and {a.json.with_suffix('.md')}")


def ensure_moe_model(s: dict, layers: int) -> Path:
    """The random Qwen3-MoE of the MoE row at ``layers`` blocks (built once under ``benchmarks/work/``)."""
    path = WORK / f"qwen3moe-h{s['hidden']}-e{MOE['experts']}-v{s['vocab']}-L{layers}-fp32"
    if not ((path / "config.json").is_file() and any(path.glob("*.safetensors"))):
        print(f"building {path.name} ...", file=sys.stderr, flush=True)
        run_child(CHILD_BUILD_MOE, dict(path=str(path), hidden=s["hidden"], intermediate=s["intermediate"],
                                        heads=s["heads"], kv_heads=s["kv_heads"], vocab=s["vocab"], layers=layers,
                                        tokenizer_from=str(MOE_TOKENIZER), **MOE))
    return path


def render(r: dict, small_l: int, big_l: int) -> str:
    m, c, z = r["model"], r["calibration"], r["sizes"]
    mib = lambda kib: f"{kib / 1024:.0f} MiB"  # noqa: E731
    b = lambda n: f"{n / (1 << 20):.1f} MiB"  # noqa: E731
    ok = lambda x: "PASS" if x else "FAIL"  # noqa: E731
    lines = [
        f"### TurboQuant calibrated-quantization memory: Llama h{m['hidden']} i{m['intermediate']} "
        f"heads {m['heads']}/{m['kv_heads']} vocab {m['vocab']} fp32, {small_l} vs {big_l} layers",
        "",
        f"Calibration: synthetic, {c['n_samples']} x {c['seqlen']} uniform random token ids (seed {c['seed']}); "
        f"about memory, not quality. Each run in a fresh subprocess, torch threads "
        f"{r['speed_settings']['torch_threads']}; AWQ extra options {json.dumps(r['speed_settings']['awq_extra_options'])}.",
        "",
        f"| method | peak RSS {small_l} L | peak RSS {big_l} L | ratio {big_l}/{small_l} | target | result "
        f"| above floor {small_l} L / {big_l} L | wall {small_l} L | wall {big_l} L | s / block |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, t in r["targets"]["peak_rss_ratio"].items():
        sm, bg = r["summary"][method][str(small_l)], r["summary"][method][str(big_l)]
        lines.append(
            f"| {method.upper()} W4 g128 | {mib(sm['peak_rss_kib'])} | {mib(bg['peak_rss_kib'])} | {t['value']:.3f} "
            f"| {t['target']} | {ok(t['pass'])} | {mib(sm['above_floor_kib'])} / {mib(bg['above_floor_kib'])} "
            f"| {sm['seconds']:.0f} s | {bg['seconds']:.0f} s | {bg['seconds_per_block']:.1f} |")
    lines += [
        "",
        "| size | value |",
        "|---|---|",
        f"| one decoder block's weights (fp32) | {b(z['block_weights_bytes'])} |",
        f"| non-block weights (embed + lm_head + norm, fp32) | {b(z['non_block_weights_bytes'])} |",
        f"| calibration activations {z['calib_activations_shape']} fp32 | {b(z['calib_activations_fp32_bytes'])} |",
        f"| largest GPTQ Hessian (intermediate^2, fp32) | {b(z['largest_hessian_fp32_bytes'])} |",
    ] + ([f"| GPTQ-MOE: one Qwen3-MoE block's weights ({z['moe']['experts']} experts, fp32) "
          f"| {b(z['moe_block_weights_bytes'])} |"] if z.get("moe_block_weights_bytes") else []) + [
        f"| import floor (torch + turboquant + transformers Llama) | {mib(r['floor']['maxrss_kib'])} |",
        "",
        "| method, layers | peak while a block is processed (sampled) | peak of the non-block shard (sampled) "
        "| RSS after block 0 | RSS after last block | anon after block 0 / last | skeleton real bytes after each block |",
        "|---|---|---|---|---|---|---|",
    ]
    diag = r.get("malloc_diagnostic") or {}
    sections = [("", r["summary"])] + ([(" + malloc diag.", diag["summary"])] if diag else [])
    for suffix, summ in sections:
        for method, by_l in summ.items():
            for L in (small_l, big_l):
                d = by_l[str(L)]
                rss, anon = d["rss_after_block_kib"], d["anon_after_block_kib"]
                sk = d["skeleton_real_bytes_after_block"]
                lines.append(
                    f"| {method.upper()}{suffix}, {L} | {mib(d['block_phase_peak_sampled_kib'])} "
                    f"| {mib(d['non_block_phase_peak_sampled_kib'])} | {mib(rss[0])} | {mib(rss[-1])} "
                    f"| {mib(anon[0])} / {mib(anon[-1])} | {'0 (all blocks released)' if not any(sk) else sk} |")
    if diag:
        env = " ".join(f"{k}={v}" for k, v in diag["env"].items())
        lines += ["", f"Diagnostic (not the target): the same runs with `{env}` (glibc's dynamic mmap threshold off)",
                  "", f"| method | peak RSS {small_l} L | peak RSS {big_l} L | ratio {big_l}/{small_l} "
                  f"| wall {small_l} L | wall {big_l} L |", "|---|---|---|---|---|---|"]
        for method, t in diag["ratios"].items():
            sm, bg = diag["summary"][method][str(small_l)], diag["summary"][method][str(big_l)]
            lines.append(f"| {method.upper()} W4 g128 | {mib(sm['peak_rss_kib'])} | {mib(bg['peak_rss_kib'])} "
                         f"| {t['value']:.3f} | {sm['seconds']:.0f} s | {bg['seconds']:.0f} s |")
    mc = r["machine"]
    lines += ["", f"Total benchmark time {r['total_seconds']:.0f} s. machine: {mc['cpu_count']} CPUs, "
                  f"torch {mc['torch_version']}, transformers {mc['transformers_version']}, "
                  f"safetensors {mc['safetensors_version']}, python {mc['python']}; "
                  f"load average at end {mc['loadavg_at_end']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
