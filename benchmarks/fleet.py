"""Makespan of a night: N releases × the plan's artifacts on G GPU + C CPU workers, simulated from measured steps.

Step times are measured here, on this machine, through the engine on the reference model (calibration build,
baseline distributions, each method's quantization, each format's export + validation in its runtime), or read
back from an earlier ``--measured`` JSON. The simulation replays the nightly as it now runs — every release
submitted at once, each step a job on the pool ``pipeline.placement`` sends it to, a worker taking the oldest
ready job of its pool — and as it ran before (one release after another, each release's own steps still in
parallel), and prints the arithmetic: work per pool, the lower bound (work / workers, or the longest chain of one
release), and both makespans. GPU step times are the CPU ones divided by ``--gpu-speedup`` (1: no GPU was
measured; ``benchmarks/gpu.py`` on a lent GPU gives the factor).

    python benchmarks/fleet.py                         # measure (~3 min on 2 cores) and simulate 50 x 8 on 4 + 4
    python benchmarks/fleet.py --measured benchmarks/results/fleet.json --releases 200 --gpus 8
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REF_MODEL = SHARED / "models" / "tq-ref-llama"
CALIB = [SHARED / "data" / "calib" / "wiki.txt", SHARED / "data" / "calib" / "c4.txt"]
HELDOUT = SHARED / "data" / "heldout" / "all.txt"
RESULTS = ROOT / "benchmarks" / "results"

#: The plan of one release: the repository's params.yaml without its ONNX artifact, 8 artifacts.
PLAN = {
    "gptq-w4-g128": ("gptq", {"bits": 4, "group_size": 128, "act_order": True, "static_groups": True},
                     [("gptq", {}), ("compressed-tensors", {}), ("awq", {}), ("mlx", {"dtype": "float32"}),
                      ("gguf", {"gguf_type": "Q4_0", "expand_groups": True})]),
    "awq-w4-g128-asym": ("awq", {"bits": 4, "group_size": 128, "symmetric": False},
                         [("awq", {}), ("compressed-tensors", {})]),
    "rtn-w8-g32": ("rtn", {"bits": 8, "group_size": 32}, [("gguf", {"gguf_type": "Q8_0"})]),
}


def measure(n_samples: int, max_tokens: int) -> dict:
    """Seconds of every step of one release of ``PLAN`` on the reference model, run one at a time."""
    from turboquant.formats.base import export
    from turboquant.io.calibration import CalibrationRecipe, build_calibration
    from turboquant.methods import make_config
    from turboquant.quality.validate import validate
    from turboquant.quantize.pipeline import quantize

    steps: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="turboquant-fleet-") as work:
        work = Path(work)
        t = time.perf_counter()
        calib = build_calibration(CalibrationRecipe(tuple(map(str, CALIB)), n_samples=n_samples, seqlen=512),
                                  REF_MODEL)
        steps["calibrate"] = time.perf_counter() - t
        baseline = work / "baseline.safetensors"
        for name, (method, options, formats) in PLAN.items():
            t = time.perf_counter()
            qdir = quantize(REF_MODEL, make_config(method, **options), work / name, progress=False,
                            calib=calib if method != "rtn" else None)
            steps[f"quantize {name}"] = time.perf_counter() - t
            for fmt, opts in formats:
                label = f"{name}-{fmt}"
                t = time.perf_counter()
                art = export(qdir, fmt, work / label, **opts)
                first = not baseline.is_file()
                t_validate = time.perf_counter()
                validate(art, REF_MODEL, HELDOUT, ctx=512, max_tokens=max_tokens, baseline_cache=baseline,
                         speed=False)
                if first:  # the first validation also computed the baseline's distributions: split it out
                    t2 = time.perf_counter()
                    validate(art, REF_MODEL, HELDOUT, ctx=512, max_tokens=max_tokens, baseline_cache=baseline,
                             speed=False)
                    again = time.perf_counter() - t2
                    steps["baseline"] = max(0.0, (t2 - t_validate) - again)
                    steps[f"ship {label}"] = (t_validate - t) + again
                else:
                    steps[f"ship {label}"] = time.perf_counter() - t
                print(f"  measured ship {label}: {steps[f'ship {label}']:.1f} s", file=sys.stderr)
            print(f"  measured quantize {name}: {steps[f'quantize {name}']:.1f} s", file=sys.stderr)
    return {"model": str(REF_MODEL), "n_samples": n_samples, "seqlen": 512, "max_tokens": max_tokens,
            "steps": steps}


def release_jobs(steps: dict[str, float], pools: tuple[str, ...], gpu_speedup: float) -> list[tuple]:
    """``(step, pool, seconds, depends on)`` of one release, each step on the pool placement picks."""
    from turboquant.pipeline.placement import place_method, place_validator

    jobs = [("calibrate", "cpu", steps["calibrate"], ()), ("baseline", "cpu", steps["baseline"], ())]
    for name, (method, _, formats) in PLAN.items():
        pool = place_method(method, pools).pool
        seconds = steps[f"quantize {name}"] / (gpu_speedup if pool == "cuda" else 1.0)
        jobs.append((f"quantize {name}", pool, seconds, ("calibrate",) if method != "rtn" else ()))
        for fmt, _ in formats:
            vpool = place_validator(fmt, pools).pool
            ship = steps[f"ship {name}-{fmt}"] / (gpu_speedup if vpool == "cuda" else 1.0)
            jobs.append((f"ship {name}-{fmt}", vpool, ship, (f"quantize {name}", "baseline")))
    return jobs


def simulate(jobs: list[tuple], releases: int, workers: dict[str, int], concurrent: bool) -> dict:
    """Event simulation: a free worker takes the oldest ready job of its pool; a job is ready once what it depends
    on has finished (sequentially, also once every step of the release before it has)."""
    keys, deps, seconds, pool_of = [], {}, {}, {}
    for r in range(releases):
        for step, pool, s, after in jobs:
            key = (r, step)
            keys.append(key)
            deps[key] = [(r, a) for a in after] + ([(r - 1, j[0]) for j in jobs] if r and not concurrent else [])
            seconds[key], pool_of[key] = s, pool
    order = {k: i for i, k in enumerate(keys)}
    waiting = {k: len(deps[k]) for k in keys}
    dependents: dict[tuple, list[tuple]] = {k: [] for k in keys}
    for k in keys:
        for d in deps[k]:
            dependents[d].append(k)
    ready: dict[str, list] = {p: [] for p in workers}
    for k in keys:
        if not waiting[k]:
            heapq.heappush(ready[pool_of[k]], (0.0, order[k], k))
    idle, running, busy, now = dict(workers), [], {p: 0.0 for p in workers}, 0.0
    while running or any(ready.values()):
        for p in workers:
            while idle[p] and ready[p]:
                _, i, k = heapq.heappop(ready[p])
                idle[p] -= 1
                busy[p] += seconds[k]
                heapq.heappush(running, (now + seconds[k], i, k))
        if not running:
            raise ValueError(f"jobs wait on a pool with no workers: {sorted(p for p in ready if ready[p])}")
        now, _, k = heapq.heappop(running)
        idle[pool_of[k]] += 1
        for nxt in dependents[k]:
            waiting[nxt] -= 1
            if not waiting[nxt]:
                heapq.heappush(ready[pool_of[nxt]], (now, order[nxt], nxt))
    return {"makespan_s": now, "busy_s": busy,
            "utilisation": {p: busy[p] / (now * n) for p, n in workers.items() if n}}


def chain(jobs: list[tuple]) -> float:
    """The longest dependency chain of one release (no worker count can finish a release faster)."""
    done: dict[str, float] = {}
    for step, _, seconds, after in jobs:  # jobs are listed after what they depend on
        done[step] = seconds + max([done[d] for d in after] or [0.0])
    return max(done.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measured", type=Path, help="reuse the step times of an earlier run's JSON")
    parser.add_argument("--releases", type=int, default=50)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=4)
    parser.add_argument("--gpu-speedup", type=float, default=1.0,
                        help="GPU step time = CPU step time / this (1: not measured)")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=RESULTS / "fleet.json")
    args = parser.parse_args()
    measured = json.loads(args.measured.read_text())["measured"] if args.measured else measure(args.n_samples,
                                                                                                 args.max_tokens)
    workers = {"cuda": args.gpus, "cpu": args.cpus}
    pools = tuple(p for p, n in workers.items() if n)
    jobs = release_jobs(measured["steps"], pools, args.gpu_speedup)
    work = {p: sum(s for _, pool, s, _ in jobs if pool == p) * args.releases for p in workers}
    bound = max([work[p] / n for p, n in workers.items() if n] + [chain(jobs)])
    now = simulate(jobs, args.releases, workers, concurrent=True)
    before = simulate(jobs, args.releases, workers, concurrent=False)
    artifacts = sum(len(f) for _, _, f in PLAN.values())
    lines = [f"# Fleet: {args.releases} releases x {artifacts} artifacts on {args.gpus} GPU + {args.cpus} CPU workers",
             "", f"Step times measured on {measured['model']} ({measured['n_samples']} x {measured['seqlen']} "
             f"calibration tokens, {measured['max_tokens']} validation tokens); GPU steps = CPU / "
             f"{args.gpu_speedup:g}" + (" (no GPU measured)" if args.gpu_speedup == 1 else ""), "",
             "| step | pool | seconds |", "|---|---|---:|"]
    lines += [f"| {step} | {pool} | {seconds:.1f} |" for step, pool, seconds, _ in jobs]
    lines += ["", "| | seconds |", "|---|---:|"]
    for p, n in workers.items():
        lines.append(f"| work on {p}: {args.releases} x {work[p] / args.releases:.1f} s = {work[p]:.0f} s over "
                     f"{n} workers | {work[p] / max(n, 1):.0f} |")
    lines += [f"| one release's longest chain | {chain(jobs):.1f} |",
              f"| lower bound (max of the above) | {bound:.0f} |",
              f"| makespan, releases concurrent (now) | **{now['makespan_s']:.0f}** |",
              f"| makespan, one release after another (before) | {before['makespan_s']:.0f} |",
              f"| speed-up | {before['makespan_s'] / now['makespan_s']:.1f}x |", ""]
    lines.append("Utilisation now: " + ", ".join(f"{p} {u:.0%}" for p, u in now["utilisation"].items()))
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"measured": measured, "releases": args.releases, "workers": workers, "gpu_speedup": args.gpu_speedup,
              "jobs": [{"step": s, "pool": p, "seconds": t, "after": list(a)} for s, p, t, a in jobs],
              "work_s": work, "lower_bound_s": bound, "concurrent": now, "sequential": before}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
