"""Engine-foundation benchmark: streaming memory and RTN throughput of ``turboquant.quantize.pipeline``.

Run ``.venv/bin/python benchmarks/foundation.py [--quick]``. Prints a Markdown table and writes
``benchmarks/results/foundation.json`` (``foundation-quick.json`` with ``--quick``).

Targets
-------
1. **Streaming memory.** Peak RSS of quantizing (RTN W4 g128) a random Llama with 16 decoder layers is at most
   1.2x that of the same model with 4 layers: only one decoder block is ever resident. Every quantization runs in a
   fresh ``python -c`` subprocess that imports only what ``quantize`` needs, runs it and prints
   ``getrusage(RUSAGE_SELF).ru_maxrss``. For context we also measure the import floor (a subprocess that only
   imports), the floor with transformers, the per-block and non-block weight sizes, and - in a separate,
   instrumented subprocess - the peak anonymous / file-backed RSS while each shard is being produced.
2. **RTN throughput.** On the 16-layer model, wall time of ``quantize()`` (RTN W4 g128) is at most 3x that of a plain
   reference that reads the same tensors block by block with ``safetensors.safe_open`` and writes them back with
   ``safetensors.torch.save_file``, one shard per block (plus one for the non-block tensors, as ``quantize`` does).
   Both run in one subprocess, after one warm-up each, interleaved (io, rtn, rtn, io, ...); best and median are
   reported and the target uses the best of each. A per-stage breakdown of one RTN pass is reported alongside.
   Diagnostics (not targets, ``--no-diagnostics`` skips them) repeat the comparison with ``OMP_WAIT_POLICY=PASSIVE``
   and with ``torch.set_num_threads(1)``: on a small machine shared with other work, OpenMP threads that spin at
   barriers can dominate the RTN time. The load average around each timing run is recorded.

Models are built with ``turboquant.tiny.save_tiny_model`` (tokenizer trained on its default text: the quantizer
never reads it) into ``benchmarks/work/``, each in its own subprocess, once; they are reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"

RSS_RATIO_TARGET = 1.2
TIME_RATIO_TARGET = 3.0

SIZES = {
    "full": dict(hidden=1024, intermediate=2816, heads=16, kv_heads=8, vocab=32000, layers=(4, 16)),
    "quick": dict(hidden=256, intermediate=768, heads=4, kv_heads=2, vocab=4096, layers=(2, 8)),
}
SCHEME = dict(bits=4, group_size=128, symmetric=True)
# name: (label, extra child args, extra environment) - timing diagnostics run after the target measurement
DIAGNOSTIC_VARIANTS = {
    "omp_passive": ("OMP_WAIT_POLICY=PASSIVE", {}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "one_thread": ("torch.set_num_threads(1)", {"threads": 1}, {}),
}

# ---------------------------------------------------------------------------------------------------------------
# Child programs (each runs in a fresh interpreter; the last stdout line is a JSON object)
# ---------------------------------------------------------------------------------------------------------------

_RSS_HELPERS = r"""
import json, resource, sys
def _status():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])  # KiB
    return out
def _maxrss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
"""

CHILD_BUILD = _RSS_HELPERS + r"""
import os, shutil, torch
from pathlib import Path
from turboquant.io.tiny import save_tiny_model
args = json.loads(sys.argv[1])
final = Path(args.pop("path"))
tmp = final.with_name(final.name + ".tmp-build")
shutil.rmtree(tmp, ignore_errors=True)
save_tiny_model(tmp, dtype=torch.float32, tie_embeddings=False, model_type="llama", **args)
os.replace(tmp, final)
print(json.dumps({"maxrss_kib": _maxrss_kib()}))
"""

CHILD_FLOOR = _RSS_HELPERS + r"""
import torch
import turboquant.quantize.pipeline, turboquant.methods
import safetensors.torch
if json.loads(sys.argv[1]).get("transformers"):
    import transformers
    import transformers.models.llama.modeling_llama
print(json.dumps({"maxrss_kib": _maxrss_kib(), "status": _status(),
                  "transformers_loaded": "transformers" in sys.modules}))
"""

# The measured run: nothing but imports, quantize(), getrusage.
CHILD_QUANTIZE = _RSS_HELPERS + r"""
import time
import turboquant.quantize.pipeline
from turboquant.methods import make_config
args = json.loads(sys.argv[1])
before = _status()
cfg = make_config("rtn", **args["scheme"])
t0 = time.perf_counter()
turboquant.quantize.pipeline.quantize(args["model"], cfg, args["out"], overwrite=True, progress=False)
elapsed = time.perf_counter() - t0
print(json.dumps({"maxrss_kib": _maxrss_kib(), "before": before, "after": _status(), "seconds": elapsed,
                  "transformers_loaded": "transformers" in sys.modules}))
"""

# Instrumented run (not used for the target). A thin wrapper around CheckpointWriter.write_shard marks the end of each
# shard's phase; at each mark the exact peak RSS of the phase is read from VmHWM, which is then reset by writing "5" to
# /proc/self/clear_refs. A 1 ms sampler thread splits the (approximate) peak into anonymous and file-backed pages.
CHILD_QUANTIZE_TRACE = _RSS_HELPERS + r"""
import threading, time
import turboquant.quantize.pipeline as Q
from turboquant.methods import make_config
args = json.loads(sys.argv[1])
state = {"phase": -1, "stop": False}
peaks = {}
def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
def sample():
    while not state["stop"]:
        s = _status()
        p = peaks.setdefault(state["phase"], {"VmRSS": 0, "RssAnon": 0, "RssFile": 0})
        for k in ("VmRSS", "RssAnon", "RssFile"):
            p[k] = max(p[k], s.get(k, 0))
        time.sleep(0.001)
def end_phase():
    peaks.setdefault(state["phase"], {"VmRSS": 0, "RssAnon": 0, "RssFile": 0})["VmHWM_exact"] = _status()["VmHWM"]
    reset_hwm()
    state["phase"] += 1
orig = Q.CheckpointWriter.write_shard
def write_shard(self, index, tensors):
    orig(self, index, tensors)
    end_phase()
Q.CheckpointWriter.write_shard = write_shard
before = _status()
th = threading.Thread(target=sample, daemon=True)
th.start()
time.sleep(0.01)
end_phase()  # phase -1: imports and start-up; phase i: shard i (n_layers = the non-block shard); last: finish()
Q.quantize(args["model"], make_config("rtn", **args["scheme"]), args["out"], overwrite=True, progress=False)
state["stop"] = True
th.join()
end_phase()
print(json.dumps({"before": before, "hwm_reset_works": reset_hwm(),
                  "peaks": {str(k): v for k, v in peaks.items()}}))
"""

CHILD_TIMING = _RSS_HELPERS + r"""
import os, shutil, statistics, time
from pathlib import Path
import turboquant  # first, as the CLI does: it sets the OpenMP wait policy before torch loads
import torch
from safetensors import safe_open
from safetensors.torch import save_file
import turboquant.quantize.pipeline as Q
from turboquant.methods import make_config, get_method
from turboquant.io.model import open_model, check_finite
from turboquant.io.checkpoint import CheckpointWriter

args = json.loads(sys.argv[1])
if args.get("threads"):
    torch.set_num_threads(args["threads"])
model, base = Path(args["model"]), Path(args["out_base"])
cfg = make_config("rtn", **args["scheme"])

def io_reference(out):
    # Same access pattern as quantize: per block, open the file(s), read the block's tensors, close; write one shard.
    out.mkdir(parents=True)
    opened = open_model(model)  # the name -> file index (header reads only), as quantize builds it
    ck, arch = opened.checkpoint, opened.arch
    groups = [ck.block_names(arch, i) for i in range(opened.n_layers)] + [ck.non_block_names(arch)]
    for i, names in enumerate(groups):
        by_file = {}
        for n in names:
            by_file.setdefault(ck.tensors[n].file, []).append(n)
        tensors = {}
        for f, wanted in by_file.items():
            with safe_open(f, framework="pt") as h:
                for n in wanted:
                    tensors[n] = h.get_tensor(n)
        save_file(tensors, str(out / f"shard-{i:05d}.safetensors"), metadata={"format": "pt"})
        del tensors

def rtn(out):
    Q.quantize(model, cfg, out, overwrite=True, progress=False)

def timed(fn, tag):
    out = base / f"{tag}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    fn(out)
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return dt

def profile(out):
    # One RTN pass broken into the stages quantize() runs, timed separately (same calls, same order).
    spec = get_method(cfg.method)
    opened = open_model(model)
    out.mkdir(parents=True)
    w = CheckpointWriter(out, opened.n_layers + 1)
    # safetensors >= 0.7 get_tensor returns tensors backed by the file's mmap: "map" is nearly free and the pages
    # are faulted in by the first op that reads them (check_finite), which therefore also carries the read cost.
    st = dict.fromkeys(("map", "check_finite_first_touch", "rtn_solver", "pack_to_tensors", "write_shard",
                        "rest_map", "rest_check_finite_first_touch", "rest_write"), 0.0)
    prefix_linears = opened.arch.linears
    for i in range(opened.n_layers):
        t = time.perf_counter(); tensors = opened.block(i); st["map"] += time.perf_counter() - t
        t = time.perf_counter(); check_finite(tensors); st["check_finite_first_touch"] += time.perf_counter() - t
        targets = {f"{opened.arch.block_prefix(i)}{l}.weight" for l in prefix_linears}
        shard = {}
        for name, x in tensors.items():
            if name in targets:
                t = time.perf_counter(); qt = spec.solver(x, cfg); st["rtn_solver"] += time.perf_counter() - t
                t = time.perf_counter(); shard.update(w.add_quantized(name.removesuffix(".weight"), qt))
                st["pack_to_tensors"] += time.perf_counter() - t
            else:
                shard[name] = x
        t = time.perf_counter(); w.write_shard(i, shard); st["write_shard"] += time.perf_counter() - t
        del tensors, shard
    t = time.perf_counter(); rest = opened.checkpoint.load(opened.checkpoint.non_block_names(opened.arch))
    st["rest_map"] += time.perf_counter() - t
    t = time.perf_counter(); check_finite(rest); st["rest_check_finite_first_touch"] += time.perf_counter() - t
    t = time.perf_counter(); w.write_shard(opened.n_layers, rest); st["rest_write"] += time.perf_counter() - t
    return st

base.mkdir(parents=True, exist_ok=True)
warm = {"io": timed(io_reference, "io"), "rtn": timed(rtn, "rtn")}
io_t, rtn_t = [], []
for r in range(args["repeats"]):
    order = [("io", io_reference, io_t), ("rtn", rtn, rtn_t)]
    if r % 2:
        order.reverse()
    for tag, fn, acc in order:
        acc.append(timed(fn, tag))
prof_dir = base / f"profile-{os.getpid()}"
shutil.rmtree(prof_dir, ignore_errors=True)
try:
    t0 = time.perf_counter(); stages = profile(prof_dir); stages["total"] = time.perf_counter() - t0
except Exception as e:  # internals may change under us; the benchmark targets do not depend on this
    stages = {"error": f"{type(e).__name__}: {e}"}
shutil.rmtree(prof_dir, ignore_errors=True)
print(json.dumps({"warmup": warm, "io_seconds": io_t, "rtn_seconds": rtn_t, "rtn_stages_seconds": stages,
                  "torch_threads": torch.get_num_threads()}))
"""


def run_child(code: str, args: dict, env: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), json.dumps(args)],
        capture_output=True, text=True, env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child failed (exit {proc.returncode}); stderr above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def model_dir(size: str, layers: int) -> Path:
    s = SIZES[size]
    return WORK / f"llama-h{s['hidden']}-i{s['intermediate']}-v{s['vocab']}-L{layers}-fp32"


def ensure_model(size: str, layers: int) -> tuple[Path, dict | None]:
    path = model_dir(size, layers)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path, None
    s = SIZES[size]
    print(f"building {path.name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    info = run_child(CHILD_BUILD, dict(path=str(path), hidden=s["hidden"], intermediate=s["intermediate"],
                                       heads=s["heads"], kv_heads=s["kv_heads"], vocab=s["vocab"], layers=layers))
    info["seconds"] = time.perf_counter() - t0
    return path, info


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}


def weight_sizes(path: Path) -> dict:
    """Bytes of block 0, of all blocks and of the non-block tensors, from the safetensors headers only."""
    import struct

    block0 = blocks = rest = 0
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            size = info["data_offsets"][1] - info["data_offsets"][0]
            if name.startswith("model.layers."):
                blocks += size
                if name.startswith("model.layers.0."):
                    block0 += size
            else:
                rest += size
    return {"block_bytes": block0, "all_blocks_bytes": blocks, "non_block_bytes": rest,
            "files": [f.name for f in files], "file_bytes": sum(f.stat().st_size for f in files)}


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model, fewer repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats of each side (default 3, quick 2)")
    ap.add_argument("--rss-repeats", type=int, default=None, help="fresh-process RSS runs per model (default 2)")
    ap.add_argument("--no-diagnostics", action="store_true", help="skip the timing diagnostics (OMP passive, 1 thread)")
    ap.add_argument("--json", type=Path, default=None, help="output JSON path")
    a = ap.parse_args()
    size = "quick" if a.quick else "full"
    repeats = a.repeats or (2 if a.quick else 3)
    rss_repeats = a.rss_repeats or (1 if a.quick else 2)
    out_json = a.json or RESULTS / ("foundation-quick.json" if a.quick else "foundation.json")
    small_l, big_l = SIZES[size]["layers"]
    WORK.mkdir(parents=True, exist_ok=True)

    builds, models, sizes = {}, {}, {}
    for layers in (small_l, big_l):
        path, info = ensure_model(size, layers)
        models[layers], sizes[layers] = path, weight_sizes(path)
        if info:
            builds[layers] = info

    # --- target 1: peak RSS, each in a fresh process -------------------------------------------------------
    print("measuring import floors ...", file=sys.stderr, flush=True)
    floor = [run_child(CHILD_FLOOR, {"transformers": False}) for _ in range(rss_repeats)]
    floor_tf = [run_child(CHILD_FLOOR, {"transformers": True}) for _ in range(rss_repeats)]
    rss = {}
    for layers in (small_l, big_l):
        print(f"measuring peak RSS, {layers} layers ...", file=sys.stderr, flush=True)
        out = WORK / f"out-rss-L{layers}"
        runs = [run_child(CHILD_QUANTIZE, {"model": str(models[layers]), "out": str(out), "scheme": SCHEME})
                for _ in range(rss_repeats)]
        shutil.rmtree(out, ignore_errors=True)
        trace = run_child(CHILD_QUANTIZE_TRACE, {"model": str(models[layers]), "out": str(out), "scheme": SCHEME})
        shutil.rmtree(out, ignore_errors=True)
        peaks = trace["peaks"]
        block_phases = [peaks[str(i)] for i in range(layers)]
        rest_phase = peaks.get(str(layers), {})
        rss[layers] = {
            "runs": runs,
            "peak_rss_kib": min(r["maxrss_kib"] for r in runs),
            "rss_before_quantize_kib": min(r["before"]["VmRSS"] for r in runs),
            "quantize_seconds": [r["seconds"] for r in runs],
            "trace": {
                "note": "instrumented run; by phase (-1 start-up, i < n shard i, n non-block shard, n+1 finish): "
                        "VmHWM_exact = exact peak RSS of the phase (VmHWM reset via clear_refs), "
                        "VmRSS/RssAnon/RssFile = maxima of a 1 ms sampler (approximate), KiB",
                "before": trace["before"],
                "blocks_peak": {k: max(p.get(k, 0) for p in block_phases)
                                for k in ("VmHWM_exact", "VmRSS", "RssAnon", "RssFile")},
                "per_block_peak_kib": [p.get("VmHWM_exact") for p in block_phases],
                "non_block_shard_peak": rest_phase,
                "by_phase": peaks,
            },
        }
    floor_kib = min(r["maxrss_kib"] for r in floor)
    floor_tf_kib = min(r["maxrss_kib"] for r in floor_tf)
    rss_ratio = rss[big_l]["peak_rss_kib"] / rss[small_l]["peak_rss_kib"]
    above_floor = {L: rss[L]["peak_rss_kib"] - floor_kib for L in (small_l, big_l)}

    # --- target 2: RTN vs plain read+write, same process, interleaved ---------------------------------------
    print(f"timing RTN vs read+write on {big_l} layers ({repeats} repeats + warm-up) ...", file=sys.stderr, flush=True)
    load_before = _loadavg()
    timing = run_child(CHILD_TIMING, {"model": str(models[big_l]), "out_base": str(WORK / "out-timing"),
                                      "scheme": SCHEME, "repeats": repeats})
    timing["loadavg_before_after"] = [load_before, _loadavg()]
    diagnostics = {}
    if not a.no_diagnostics:
        # Diagnostics only (not the target): the same comparison with torch's OpenMP threads told not to spin, and
        # with intra-op parallelism off, to show how much of the RTN time is OpenMP synchronisation on a small,
        # shared machine.
        for name, (label, extra, env) in DIAGNOSTIC_VARIANTS.items():
            print(f"timing again: {label} (diagnostic) ...", file=sys.stderr, flush=True)
            load_before = _loadavg()
            d = run_child(CHILD_TIMING, {"model": str(models[big_l]), "out_base": str(WORK / "out-timing"),
                                         "scheme": SCHEME, "repeats": repeats, **extra}, env=env)
            d["label"], d["child_args"], d["env"] = label, extra, env
            d["loadavg_before_after"] = [load_before, _loadavg()]
            d["io_best"], d["rtn_best"] = min(d["io_seconds"]), min(d["rtn_seconds"])
            d["io_median"], d["rtn_median"] = statistics.median(d["io_seconds"]), statistics.median(d["rtn_seconds"])
            d["ratio_best"], d["ratio_median"] = d["rtn_best"] / d["io_best"], d["rtn_median"] / d["io_median"]
            diagnostics[name] = d
    shutil.rmtree(WORK / "out-timing", ignore_errors=True)
    io_best, rtn_best = min(timing["io_seconds"]), min(timing["rtn_seconds"])
    io_med, rtn_med = statistics.median(timing["io_seconds"]), statistics.median(timing["rtn_seconds"])
    time_ratio = rtn_best / io_best
    time_ratio_median = rtn_med / io_med

    import torch  # only for the machine info, after all children ran

    result = {
        "benchmark": "foundation",
        "mode": size,
        "model": {**SIZES[size], "layers": [small_l, big_l], "dtype": "float32", "tie_embeddings": False,
                  "paths": {str(k): str(v) for k, v in models.items()}},
        "scheme": SCHEME,
        "method": "rtn",
        "weights": {str(k): v for k, v in sizes.items()},
        "builds": {str(k): v for k, v in builds.items()},
        "targets": {
            "peak_rss_ratio": {"target": f"<= {RSS_RATIO_TARGET}", "value": rss_ratio,
                               "pass": rss_ratio <= RSS_RATIO_TARGET},
            "rtn_over_io_time": {"target": f"<= {TIME_RATIO_TARGET}", "value": time_ratio,
                                 "value_median": time_ratio_median, "pass": time_ratio <= TIME_RATIO_TARGET},
        },
        "rss": {
            "unit": "KiB (ru_maxrss of a fresh subprocess)",
            "floor_import_kib": floor_kib,
            "floor_import_note": "torch + turboquant.quantize.pipeline + turboquant.methods + safetensors (what the quantize "
                                 "child imports; transformers is not imported by quantize)",
            "floor_with_transformers_kib": floor_tf_kib,
            "floor_runs": floor, "floor_with_transformers_runs": floor_tf,
            "by_layers": {str(k): v for k, v in rss.items()},
            "above_floor_kib": {str(k): v for k, v in above_floor.items()},
        },
        "timing": {
            "model_layers": big_l,
            "repeats": repeats,
            "order": "warm-up io, warm-up rtn, then interleaved (io, rtn), (rtn, io), ...",
            **timing,
            "io_best": io_best, "io_median": io_med, "rtn_best": rtn_best, "rtn_median": rtn_med,
        },
        "timing_diagnostics": diagnostics,
        "machine": {
            "cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_version": torch.__version__,
            "torch_threads": timing["torch_threads"],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "safetensors_version": _version("safetensors"),
            "loadavg_at_end": _loadavg(),
            "transformers_version": _version("transformers"),
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result, small_l, big_l))
    print(f"\nwrote {out_json}")


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def mc_threads(r: dict) -> int:
    return r["machine"]["torch_threads"]


def render(r: dict, small_l: int, big_l: int) -> str:
    rs, t, w = r["rss"], r["timing"], r["weights"]
    m = r["model"]
    tg = r["targets"]
    ok = lambda b: "PASS" if b else "FAIL"  # noqa: E731
    f = lambda kib: f"{kib / 1024:.0f} MiB"  # noqa: E731
    b = lambda n: f"{n / (1 << 20):.1f} MiB"  # noqa: E731
    lines = [
        f"### TurboQuant foundation benchmark ({r['mode']}): Llama h{m['hidden']} i{m['intermediate']} "
        f"heads {m['heads']}/{m['kv_heads']} vocab {m['vocab']} fp32, RTN W4 g128",
        "",
        "| measure | value | target | result |",
        "|---|---|---|---|",
        f"| peak RSS {big_l} layers / {small_l} layers | {tg['peak_rss_ratio']['value']:.3f} "
        f"| <= {RSS_RATIO_TARGET} | {ok(tg['peak_rss_ratio']['pass'])} |",
        f"| RTN time / read+write time ({big_l} layers, best) | {tg['rtn_over_io_time']['value']:.2f} "
        f"| <= {TIME_RATIO_TARGET} | {ok(tg['rtn_over_io_time']['pass'])} |",
        f"| RTN time / read+write time ({big_l} layers, median) | {tg['rtn_over_io_time']['value_median']:.2f} | | |",
        "",
        "| memory | value |",
        "|---|---|",
        f"| import floor (torch + turboquant.quantize.pipeline) | {f(rs['floor_import_kib'])} "
        f"(anon {f(rs['floor_runs'][0]['status']['RssAnon'])} / file-backed "
        f"{f(rs['floor_runs'][0]['status']['RssFile'])}) |",
        f"| import floor + transformers | {f(rs['floor_with_transformers_kib'])} |",
    ]
    for L in (small_l, big_l):
        d = rs["by_layers"][str(L)]
        tr = d["trace"]
        lines += [
            f"| {L} layers: weights on disk | {b(w[str(L)]['file_bytes'])} |",
            f"| {L} layers: peak RSS (fresh process) | {f(d['peak_rss_kib'])} "
            f"(+{f(rs['above_floor_kib'][str(L)])} over floor) |",
            f"| {L} layers: peak RSS while producing block shards: exact (sampled anon / file-backed) | "
            f"{f(tr['blocks_peak']['VmHWM_exact'])} ({f(tr['blocks_peak']['RssAnon'])} / "
            f"{f(tr['blocks_peak']['RssFile'])}) |",
            f"| {L} layers: peak RSS while producing the non-block shard: exact (sampled anon / file-backed) | "
            f"{f(tr['non_block_shard_peak'].get('VmHWM_exact', 0))} ({f(tr['non_block_shard_peak'].get('RssAnon', 0))}"
            f" / {f(tr['non_block_shard_peak'].get('RssFile', 0))}) |",
        ]
    lines += [
        f"| one decoder block (fp32) | {b(w[str(big_l)]['block_bytes'])} |",
        f"| non-block tensors (embed + lm_head + norm) | {b(w[str(big_l)]['non_block_bytes'])} |",
        "",
        "| time (s) | best | median | all |",
        "|---|---|---|---|",
        f"| read + write reference | {t['io_best']:.2f} | {t['io_median']:.2f} | "
        f"{', '.join(f'{x:.2f}' for x in t['io_seconds'])} |",
        f"| quantize() RTN W4 g128 | {t['rtn_best']:.2f} | {t['rtn_median']:.2f} | "
        f"{', '.join(f'{x:.2f}' for x in t['rtn_seconds'])} |",
    ]
    diags = r.get("timing_diagnostics") or {}
    for d in diags.values():
        lines += [
            f"| read + write reference, {d['label']} (diagnostic) | {d['io_best']:.2f} | {d['io_median']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in d['io_seconds'])} |",
            f"| quantize() RTN W4 g128, {d['label']} (diagnostic) | {d['rtn_best']:.2f} | {d['rtn_median']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in d['rtn_seconds'])} |",
            f"| ratio, {d['label']} (diagnostic) | {d['ratio_best']:.2f} | {d['ratio_median']:.2f} | |",
        ]
    lines += ["", "load average (1/5/15 min) before/after timing: " + "; ".join(
        [f"as-is {t['loadavg_before_after']}"] + [f"{d['label']} {d['loadavg_before_after']}" for d in diags.values()])]
    stage_cols = [(f"{mc_threads(r)} threads, as-is", t.get("rtn_stages_seconds", {}))]
    stage_cols += [(d["label"], d.get("rtn_stages_seconds", {})) for d in diags.values()]
    stage_cols = [(lab, st) for lab, st in stage_cols if st and "error" not in st]
    if stage_cols:
        lines += ["", "| RTN stage, one instrumented pass (s) | " + " | ".join(lab for lab, _ in stage_cols) + " |",
                  "|---|" + "---|" * len(stage_cols)]
        for k in stage_cols[0][1]:
            lines.append(f"| {k} | " + " | ".join(f"{st.get(k, float('nan')):.3f}" for _, st in stage_cols) + " |")
    mc = r["machine"]
    lines += ["", f"machine: {mc['cpu_count']} CPUs, torch {mc['torch_version']} ({mc['torch_threads']} threads), "
                  f"safetensors {mc['safetensors_version']}, python {mc['python']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
