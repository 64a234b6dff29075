"""TurboQuant GPTQ / AWQ against the reference implementations, in one run: same model, same tokens, same scheme.

    make bench-methods            # = .venv/bin/python benchmarks/methods_vs_reference.py (needs `make bench-env`)

What it does, in order (every timed step runs alone, one after the other; all with the same torch thread count):

1. builds the calibration set once with ``turboquant.calibration`` (128 windows x 512 tokens from calib/wiki.txt +
   calib/c4.txt, seed 0) under ``benchmarks/work/methods_vs_reference/`` and saves the very same windows as a
   ``datasets.Dataset`` (input_ids + attention_mask) for the reference tools;
2. times our "unavoidable matrix work" for GPTQ: one forward of every block over the calibration set plus
   ``H = XᵀX`` accumulation for every linear group (no solve), block-sequential like the real pipeline;
3. times our quantize calls (RTN, GPTQ, AWQ if ``turboquant.methods.awq`` imports and runs);
4. runs llm-compressor ``oneshot`` (GPTQ, AWQ) and GPTQModel (GPTQ) in ``.venv-bench`` as subprocesses
   (``benchmarks/reference_runner.py``), which time only the quantize call and export dequantized float weights;
5. evaluates every output with *our* evaluator (``evaluate_many``) against the float model on
   heldout/all.txt (whole text, ctx 512): KL, top-1, perplexity;
6. writes ``benchmarks/results/methods_vs_reference.{json,md}`` and prints the table.

Schemes (what both sides support identically): GPTQ int4 symmetric g128 (llm-compressor's W4A16 preset), AWQ int4
asymmetric g128 (W4A16_ASYM); min-max ranges. GPTQ uses llm-compressor's default column order ("static" act-order:
columns by decreasing diag(H), group scales fitted up front on the original weights), damp 0.01, block 128, so
ours runs with ``act_order=True, static_groups=True`` and GPTQModel with ``desc_act=True, static_groups=True``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

# Set before torch loads, for this process and (inherited) the reference subprocesses alike: OpenMP threads sleep
# instead of spinning while they wait, as `import turboquant` sets by default (spinning threads on a shared 2-core
# machine make every small op wait for a scheduler slice). Same runtime settings for every tool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TQ_SHARED", ROOT.parent / "shared"))
MODEL = SHARED / "models" / "tq-ref-llama"
CALIB_SOURCES = (SHARED / "data" / "calib" / "wiki.txt", SHARED / "data" / "calib" / "c4.txt")
HELDOUT = SHARED / "data" / "heldout" / "all.txt"
WIKITEXT2 = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
WORK = ROOT / "benchmarks" / "work" / "methods_vs_reference"
RESULTS = ROOT / "benchmarks" / "results"
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
RUNNER = ROOT / "benchmarks" / "reference_runner.py"

# targets
KL_RATIO = 1.0          # our KL <= theirs
PPL_TOL_PCT = 0.5       # our perplexity within 0.5 % of theirs
TIME_RATIO = 0.5        # our wall time <= 0.5 x theirs
MATRIX_RATIO = 2.0      # our GPTQ time <= 2 x matrix work


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_load() -> dict:
    la = os.getloadavg()
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"loadavg_1_5_15": [round(x, 2) for x in la], "uptime": up, "cpus": os.cpu_count(),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "datasets", "safetensors", "numpy", "turboquant"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        out["turboquant_git"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                               capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------------------------------------------------------
# 1. calibration
# ---------------------------------------------------------------------------------------------------------------

def build_calibration(n_samples: int, seqlen: int):
    """Our calibration set, built once (reused when the recipe matches), and the same windows as a Dataset."""
    from datasets import Dataset, load_from_disk

    from turboquant.io.calibration import CalibrationRecipe, CalibrationSet, build_calibration as build

    recipe = CalibrationRecipe(sources=tuple(str(p) for p in CALIB_SOURCES), n_samples=n_samples, seqlen=seqlen,
                               seed=0)
    tag = f"calib-{n_samples}x{seqlen}"
    path, ds_path = WORK / f"{tag}.safetensors", WORK / f"{tag}-dataset"
    calib = None
    if path.is_file():
        calib = CalibrationSet.load(path)
        if calib.recipe != recipe:
            calib = None
    if calib is None:
        log(f"building calibration set {tag}")
        calib = build(recipe, MODEL)
        calib.save(path)
        shutil.rmtree(ds_path, ignore_errors=True)
    ids = calib.input_ids.tolist()
    if ds_path.is_dir():
        ds = load_from_disk(str(ds_path))
        if ds["input_ids"] != ids:
            shutil.rmtree(ds_path)
    if not ds_path.is_dir():
        Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}).save_to_disk(str(ds_path))
    return calib, path, ds_path


# ---------------------------------------------------------------------------------------------------------------
# 2. matrix work
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def matrix_work(calib, batch_size: int, model: Path = MODEL) -> dict:
    """Block-sequential: embed, then per block one forward over all samples with ``H += xᵀx`` (float32) captured
    for the first linear of every input group (the linears of a group share H). No solve, no quantization."""
    from turboquant.io.model import open_model
    from turboquant.quantize.runner import BlockRunner

    opened = open_model(model)
    t0 = time.perf_counter()
    runner = BlockRunner.start(opened, calib.input_ids, batch_size=batch_size)
    t_embed = time.perf_counter() - t0
    t_fwd = t_h = 0.0
    n_tokens = calib.input_ids.numel()
    for i in range(opened.n_layers):
        block = runner.load_block(i)
        hs: dict[str, torch.Tensor] = {}
        timer = {"h": 0.0}

        def hook_for(name: str):
            def hook(module, args):
                th = time.perf_counter()
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                if name not in hs:
                    hs[name] = torch.zeros(x.shape[1], x.shape[1])
                hs[name].addmm_(x.T, x, alpha=1.0 / n_tokens)
                timer["h"] += time.perf_counter() - th
            return hook

        handles = [block.get_submodule(g.linears[0]).register_forward_pre_hook(hook_for(g.linears[0]))
                   for g in opened.arch.groups]
        tf = time.perf_counter()
        out = runner.forward(block)
        t_fwd += time.perf_counter() - tf - timer["h"]
        t_h += timer["h"]
        for h in handles:
            h.remove()
        runner.release_block(i)
        runner.advance(out)
        del hs
    total = time.perf_counter() - t0
    return {"seconds": total, "embed_seconds": t_embed, "forward_seconds": t_fwd, "hessian_seconds": t_h,
            "blocks": opened.n_layers, "groups_per_block": len(opened.arch.groups), "tokens": n_tokens}


# ---------------------------------------------------------------------------------------------------------------
# 3. ours
# ---------------------------------------------------------------------------------------------------------------

def run_ours(name: str, config, calib, batch_size: int, model: Path = MODEL, work: Path = WORK) -> dict:
    from turboquant.quantize.pipeline import quantize

    out = work / "out" / name
    t0 = time.perf_counter()
    quantize(model, config, out, calib=calib, overwrite=True, progress=False, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    return {"tool": "turboquant", "quantize_seconds": seconds, "out": str(out),
            "settings": {"method": config.method, **config.to_dict(), "batch_size": batch_size}}


def our_configs(group_size: int, include_awq: bool, extended: bool = False) -> list[tuple[str, str, object, str]]:
    """(row name, method family, config, note). ``ours-gptq`` is GptqConfig with its defaults (only the scheme set)."""
    from turboquant.methods.gptq import GptqConfig
    from turboquant.methods.rtn import RtnConfig

    g = group_size
    d = GptqConfig(bits=4, group_size=g, symmetric=True)
    defaults = (f"act_order={d.act_order}, static_groups={d.static_groups}, damp {d.damp_percent}, block "
                f"{d.block_size}, true_sequential={d.true_sequential}, mse_clip={d.mse_clip}")
    rows = [
        ("ours-rtn-sym", "rtn", RtnConfig(bits=4, group_size=g, symmetric=True), f"RTN int4 sym g{g}"),
        ("ours-rtn-asym", "rtn", RtnConfig(bits=4, group_size=g, symmetric=False), f"RTN int4 asym g{g}"),
        ("ours-gptq", "gptq", d, f"GPTQ int4 sym g{g}, our defaults ({defaults})"),
        ("ours-gptq-mse", "gptq", GptqConfig(bits=4, group_size=g, symmetric=True, mse_clip=True),
         "defaults + mse_clip: each group's range searched for least error (GPTQModel's `mse` option)"),
        ("ours-gptq-nogptaq", "gptq", GptqConfig(bits=4, group_size=g, symmetric=True, gptaq=False),
         "defaults without GPTAQ: act-order, static groups, damp 0.01, block 128, true_sequential (= "
         "llm-compressor's solver settings; GPTQModel's desc_act + static_groups)"),
        ("ours-gptq-nots", "gptq", GptqConfig(bits=4, group_size=g, symmetric=True, true_sequential=False,
                                              gptaq=False),
         "act-order + static groups, true_sequential=False: one capture per block, as llm-compressor does"),
        ("ours-gptq-noact", "gptq-noact", GptqConfig(bits=4, group_size=g, symmetric=True, act_order=False,
                                                     static_groups=False, gptaq=False),
         "no act-order, group scales fitted as the solver reaches them, no GPTAQ (our defaults before issue 21)"),
    ]
    if include_awq:
        from turboquant.methods.awq import AwqConfig

        rows += [("ours-awq", "awq", AwqConfig(bits=4, group_size=g, symmetric=False),
                  f"AWQ int4 asym g{g}, our defaults (duo scaling, grid 20, + clip search)")]
    if include_awq and extended:
        rows += [
            ("ours-awq-noclip", "awq-noclip", AwqConfig(bits=4, group_size=g, symmetric=False, clip=False),
             "scale search only, as llm-compressor's AWQModifier (no clip search)"),
        ]
    return rows


def gptq_breakdown(config, calib, batch_size: int) -> dict:
    """Where our GPTQ's time goes: the same quantize call with timers wrapped around its phases (a separate run;
    the timed rows above run unwrapped). Each phase counts its own time only: time spent in another timed phase
    called from inside it (XᵀX accumulation and the solver inside the staged block run) is counted there."""
    from turboquant.io.checkpoint import CheckpointWriter
    from turboquant.quantize import gptq as gptq_block
    from turboquant.quantize import runner as sequential

    phases = [
        (sequential.BlockRunner, "start", "start (embed)"),
        (sequential.BlockRunner, "load_block", "load_block"),
        (gptq_block, "run_staged", "staged block run: norms, attention, MLP, residuals (one pass)"),
        (sequential.BlockRunner, "capture", "capture forwards (re-run from block input)"),
        (sequential.InputStats, "add", "XᵀX accumulation"),
        (sequential.BlockRunner, "forward", "output forward (quantized block)"),
        (gptq_block, "quantize_weight", "solve (gptq.quantize_weight)"),
        (gptq_block, "set_weight", "set dequantized weight"),
        (CheckpointWriter, "write_shard", "write shards"),
    ]
    acc = {key: 0.0 for _, _, key in phases}
    calls = {key: 0 for key in acc}
    stack: list[float] = []  # time of timed calls nested inside each open timed call
    patches = []

    def wrap(owner, attr, key):
        orig = getattr(owner, attr)

        def timed(*a, **kw):
            stack.append(0.0)
            t = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                dt = time.perf_counter() - t
                nested = stack.pop()
                acc[key] += dt - nested
                calls[key] += 1
                if stack:
                    stack[-1] += dt
        patches.append((owner, attr, orig))
        setattr(owner, attr, timed)

    for owner, attr, key in phases:
        wrap(owner, attr, key)
    try:
        r = run_ours("breakdown-gptq", config, calib, batch_size)
    finally:
        for owner, attr, orig in reversed(patches):
            setattr(owner, attr, orig)
    shutil.rmtree(r["out"], ignore_errors=True)
    total = r["quantize_seconds"]
    out = {k: {"seconds": round(v, 2), "calls": calls[k], "share": round(v / total, 3)}
           for k, v in acc.items() if calls[k]}
    out["other"] = {"seconds": round(total - sum(acc.values()), 2), "calls": 0,
                    "share": round(1 - sum(acc.values()) / total, 3)}
    return {"seconds": total, "phases": out}


# ---------------------------------------------------------------------------------------------------------------
# 4. references
# ---------------------------------------------------------------------------------------------------------------

def run_reference(tool: str, method: str, ds_path: Path, threads: int, batch_size: int, timeout: int, *,
                  model: Path = MODEL, work: Path = WORK, bits: int = 4, group_size: int = 128,
                  name: str | None = None) -> dict:
    """``tool``: llmcompressor, gptqmodel (desc_act + static groups, damp 0.01) or gptqmodel-defaults."""
    name = name or f"{'llmc' if tool == 'llmcompressor' else tool}-{method}"
    out, report, logf = work / "out" / name, work / f"{name}.json", work / "logs" / f"{name}.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    report.unlink(missing_ok=True)
    if not BENCH_PY.is_file():
        return {"tool": tool, "error": f"{BENCH_PY} missing: run `make bench-env`"}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"], "GPTQMODEL_CPU_WORKERS": str(max(2, threads)),  # its loader pool needs 2
           "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(WORK / "gptqmodel-extensions"),
           "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    cmd = [str(BENCH_PY), str(RUNNER), "--tool", tool.removesuffix("-defaults"), "--method", method,
           "--model", str(model), "--dataset", str(ds_path), "--out", str(out), "--report", str(report),
           "--threads", str(threads), "--batch-size", str(batch_size), "--bits", str(bits),
           "--group-size", str(group_size)] + (["--tool-defaults"] if tool.endswith("-defaults") else [])
    t0 = time.perf_counter()
    try:
        with open(logf, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=ROOT)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t0
    if rc != 0 or not report.is_file():
        tail = logf.read_text(errors="replace").replace("\r", "\n").splitlines()[-25:]
        return {"tool": tool, "error": f"exit {rc}", "log": str(logf), "log_tail": tail, "subprocess_seconds": wall}
    result = json.loads(report.read_text())
    result["subprocess_seconds"] = wall
    result["log"] = str(logf.relative_to(ROOT))
    return result


# ---------------------------------------------------------------------------------------------------------------
# 5. evaluation
# ---------------------------------------------------------------------------------------------------------------

def evaluate_all(outputs: dict[str, str], ctx: int, max_tokens: int | None = None, model: Path = MODEL,
                 wiki_windows: int = 0) -> dict:
    """Our evaluator vs the float model: heldout/all.txt (whole), and the first ``wiki_windows`` windows of
    WikiText-2 test when > 0. Returns {name: {"eval": ..., "eval_wikitext2": ...}}."""
    from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize
    from turboquant.quality.evaluate import evaluate_many

    tok = load_tokenizer(model)
    ids = tokenize(tok, read_text(HELDOUT))
    if max_tokens:
        ids = ids[:max_tokens]
    base = load_model(model)
    models = {name: load_model(path) for name, path in outputs.items()}
    t0 = time.perf_counter()
    res = evaluate_many(models, ids, ctx=ctx, baseline=base, text_name=str(HELDOUT))
    out = {name: {"eval": r.to_dict()} for name, r in res.items()}
    if wiki_windows:
        wiki = tokenize(tok, read_text(WIKITEXT2))[: wiki_windows * ctx]
        for name, r in evaluate_many(models, wiki, ctx=ctx, baseline=base, text_name=str(WIKITEXT2)).items():
            out[name]["eval_wikitext2"] = r.to_dict()
    log(f"evaluated {len(models)} models in {time.perf_counter() - t0:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------------------------
# 6. report
# ---------------------------------------------------------------------------------------------------------------

def compare(ours: dict, theirs: dict, matrix: dict | None, gptq: bool) -> dict:
    out: dict = {}
    if ours.get("eval") and theirs.get("eval"):
        kl_o, kl_t = ours["eval"]["kl"], theirs["eval"]["kl"]
        ppl_o, ppl_t = ours["eval"]["ppl"], theirs["eval"]["ppl"]
        out["kl_ratio"] = kl_o / kl_t
        out["kl_pass"] = kl_o <= KL_RATIO * kl_t
        out["ppl_diff_pct"] = 100 * (ppl_o / ppl_t - 1)
        out["ppl_pass"] = abs(out["ppl_diff_pct"]) <= PPL_TOL_PCT
    if ours.get("eval_wikitext2") and theirs.get("eval_wikitext2"):
        kl_o, kl_t = ours["eval_wikitext2"]["kl"], theirs["eval_wikitext2"]["kl"]
        out["wiki_kl_ratio"] = kl_o / kl_t
        out["wiki_kl_pass"] = kl_o <= KL_RATIO * kl_t
    if ours.get("quantize_seconds") and theirs.get("quantize_seconds"):
        out["time_ratio"] = ours["quantize_seconds"] / theirs["quantize_seconds"]
        out["time_pass"] = out["time_ratio"] <= TIME_RATIO
    if gptq and matrix and ours.get("quantize_seconds"):
        out["matrix_ratio"] = ours["quantize_seconds"] / matrix["seconds"]
        out["matrix_pass"] = out["matrix_ratio"] <= MATRIX_RATIO
    return out


def fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def pf(ok) -> str:
    return "—" if ok is None else ("PASS" if ok else "FAIL")


def markdown(report: dict) -> str:
    lines = [
        "# TurboQuant vs reference quantizers (CPU)",
        "",
        f"Generated {report['started']} by `benchmarks/methods_vs_reference.py`. "
        f"Calibration: {report['calibration']['n_samples']} x {report['calibration']['seqlen']} tokens "
        f"(calib/wiki.txt + calib/c4.txt, seed 0), the same token windows for every tool and both models (they "
        f"share tq-ref-llama's tokenizer); AWQ rows (ours and llm-compressor alike) use the first "
        f"{report['calibration']['awq_windows']} of them. Evaluation: heldout/all.txt, whole text, ctx "
        f"{report['eval_ctx']}, and the first {report['wiki_windows']} windows of WikiText-2 test, our evaluator "
        f"for every row. torch threads: {report['threads']} everywhere (torch.set_num_threads, OMP_NUM_THREADS), "
        f"OMP_WAIT_POLICY={report['omp_wait_policy']} for every tool; batch {report['batch_size']} samples.",
        "",
        f"Machine: {report['machine']['cpu_model']}, {report['machine']['cpus']} CPUs; load average "
        f"before {report['load_before']['loadavg_1_5_15']}, after {report['load_after']['loadavg_1_5_15']} "
        "(1/5/15 min) — timings are wall-clock and noisy when the load is above the core count (2 cores shared "
        "with another engineer's test suite).",
        "",
    ]
    for tag, m in report["models"].items():
        lines += model_markdown(tag, m)
    lines += ["## Versions", "", f"- main env: `{json.dumps(report['versions'])}`"]
    for m in report["models"].values():
        r = next((r for r in m["runs"].values() if r.get("versions")), None)
        if r:
            lines.append(f"- reference env: `{json.dumps(r['versions'])}`")
            break
    return "\n".join(lines) + "\n"


def model_markdown(tag: str, m: dict) -> list[str]:
    runs, cmp_, mw = m["runs"], m["comparisons"], m.get("matrix_work")
    base = next((r["eval"] for r in runs.values() if r.get("eval")), None)
    wbase = next((r["eval_wikitext2"] for r in runs.values() if r.get("eval_wikitext2")), None)
    lines = [f"## {tag}: {m['description']}", ""]
    if base:
        lines += [f"Float baseline perplexity: heldout {base['baseline_ppl']:.4f}"
                  + (f", WikiText-2 {wbase['baseline_ppl']:.2f}" if wbase else "") + "; "
                  f"{base['n_scored']} + {wbase['n_scored'] if wbase else 0} scored tokens.", ""]
    lines += ["| row | tool | scheme / settings | quantize s | KL heldout | top-1 | ppl | Δppl vs float | "
              "KL WikiText-2 | top-1 WikiText-2 |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        e, w = r.get("eval") or {}, r.get("eval_wikitext2") or {}
        err = f" **failed: {r['error']}**" if r.get("error") else ""
        if r.get("calibration_windows"):
            err = f" ({r['calibration_windows']} calibration windows)" + err
        lines.append(f"| {name} | {r.get('tool', '')} | {r.get('note', '')}{err} | "
                     f"{fmt(r.get('quantize_seconds'), '.1f')} | {fmt(e.get('kl'), '.6f')} | "
                     f"{fmt(e.get('top1'), '.4f')} | {fmt(e.get('ppl'), '.4f')} | "
                     f"{fmt(e.get('ppl_delta_pct'), '+.3f')} % | {fmt(w.get('kl'), '.6f')} | "
                     f"{fmt(w.get('top1'), '.4f')} |")
    if mw:
        lines += ["", f"Matrix work (one block-sequential forward over the calibration set + XᵀX for every linear "
                  f"group, no solve, measured {len(mw.get('all_seconds', [1]))}x: "
                  f"{', '.join(f'{x:.1f}' for x in mw.get('all_seconds', [mw['seconds']]))} s; the fastest is used): "
                  f"**{mw['seconds']:.1f} s** (embed {mw['embed_seconds']:.1f}, forward "
                  f"{mw['forward_seconds']:.1f}, XᵀX {mw['hessian_seconds']:.1f})."]
    bd = m.get("gptq_breakdown")
    if bd:
        lines += ["", f"Where ours-gptq's time goes (a separate instrumented run, {bd['seconds']:.1f} s):", "",
                  "| phase | s | calls | share |", "|---|---:|---:|---:|"]
        for k, v in bd["phases"].items():
            lines.append(f"| {k} | {v['seconds']:.1f} | {v['calls']} | {100 * v['share']:.0f} % |")
    lines += ["", f"Targets ({tag}):", "",
              "| ours vs reference | KL heldout ours/theirs (≤ 1) | KL WikiText-2 ours/theirs (≤ 1) | "
              "ppl diff (≤ ±0.5 %) | time ours/theirs (≤ 0.5) | GPTQ time / matrix work (≤ 2) |",
              "|---|---|---|---|---|---|"]
    for key, c in cmp_.items():
        lines.append(f"| {key} | {fmt(c.get('kl_ratio'), '.3f')} {pf(c.get('kl_pass'))} | "
                     f"{fmt(c.get('wiki_kl_ratio'), '.3f')} {pf(c.get('wiki_kl_pass'))} | "
                     f"{fmt(c.get('ppl_diff_pct'), '+.3f')} % {pf(c.get('ppl_pass'))} | "
                     f"{fmt(c.get('time_ratio'), '.3f')} {pf(c.get('time_pass'))} | "
                     f"{fmt(c.get('matrix_ratio'), '.2f')} {pf(c.get('matrix_pass'))} |")
    lines += ["", "Settings:", ""]
    for name, r in runs.items():
        if r.get("settings"):
            lines.append(f"- **{name}**: `{json.dumps(r['settings'], default=str)[:600]}`")
    errors = [(n, r) for n, r in runs.items() if r.get("error")]
    if errors:
        lines += ["", "Failures:", ""]
        for n, r in errors:
            lines.append(f"- **{n}**: {r['error']}")
            for t in r.get("log_tail", [])[-8:]:
                lines.append(f"    {t}")
    return lines + [""]


def model_specs(names: list[str]) -> list[dict]:
    """The models the benchmark covers: tq-ref-llama (6 blocks, g128 as before) and tq-deep-llama (24 blocks,
    trained by ``deep_ref_model.py`` when missing; W4 g64 sym, the scheme of issue 21)."""
    specs = []
    for n in names:
        if n == "ref":
            specs.append({"tag": "tq-ref-llama", "path": MODEL, "group_size": 128, "work": WORK, "breakdown": True,
                          "description": "6 blocks x 384, 12.9 M parameters (../shared/models/tq-ref-llama); "
                                         "W4 g128"})
        elif n == "deep":
            import deep_ref_model

            specs.append({"tag": "tq-deep-llama", "path": deep_ref_model.ensure_model(log), "group_size": 64,
                          "work": WORK / "tq-deep-llama", "breakdown": False,
                          "description": "24 blocks x 128, tied embeddings, trained here by "
                                         "`benchmarks/deep_ref_model.py` (recipe hash "
                                         f"{deep_ref_model.recipe_hash()}); W4 g64 (the scheme of issue 21)"})
        else:
            raise SystemExit(f"unknown model {n!r}: use ref, deep")
    return specs


def make_awq_calib(calib, ds_path: Path, n: int):
    """The first ``n`` windows of the calibration set (ours and as a Dataset), for both AWQ implementations."""
    if not 0 < n < calib.input_ids.shape[0]:
        return calib, ds_path
    from datasets import Dataset

    from turboquant.io.calibration import CalibrationSet

    awq_calib = CalibrationSet(calib.input_ids[:n].clone(), calib.recipe,
                               {**calib.provenance, "windows_used": f"first {n}"})
    awq_ds_path = WORK / f"{ds_path.name}-first{n}"
    shutil.rmtree(awq_ds_path, ignore_errors=True)
    ids = awq_calib.input_ids.tolist()
    Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}).save_to_disk(str(awq_ds_path))
    return awq_calib, awq_ds_path


def bench_model(spec: dict, args, calib, ds_path: Path, awq_calib, awq_ds_path: Path, want) -> dict:
    """Every row for one model: ours, the references, evaluation, comparisons."""
    model, work, g = spec["path"], spec["work"], spec["group_size"]
    work.mkdir(parents=True, exist_ok=True)
    m: dict = {"model": str(model), "group_size": g, "description": spec["description"],
               "load_before": machine_load()}
    log(f"=== {spec['tag']} ({model})")
    from turboquant.io.skeleton import build_skeleton  # warm transformers' lazy imports, so they are not timed
    build_skeleton(model, dtype=torch.float32)

    runs: dict[str, dict] = {}
    loads: dict[str, list] = {}
    mw_runs: list[dict] = []

    def measure_matrix_work(tag: str) -> None:
        """Measured before and after our GPTQ rows; the faster (least disturbed) one is used for the ratio."""
        if not want("matrix-work"):
            return
        log(f"matrix work (forward + XᵀX, no solve), {tag}")
        mw_runs.append({**matrix_work(calib, args.batch_size, model), "when": tag})
        loads[f"matrix-work {tag}"] = list(os.getloadavg())
        log(f"  {mw_runs[-1]['seconds']:.1f} s")
        best = min(mw_runs, key=lambda r: r["seconds"])
        m["matrix_work"] = {**best, "all_seconds": [r["seconds"] for r in mw_runs], "runs": mw_runs}

    measure_matrix_work("before our GPTQ runs")
    include_awq, awq_error = True, None
    try:
        import turboquant.methods.awq  # noqa: F401
    except Exception as e:  # in progress elsewhere: report, run the rest
        include_awq, awq_error = False, f"turboquant.methods.awq does not import: {type(e).__name__}: {e}"
    rows = our_configs(g, include_awq, args.extended)
    last_gptq = [n for n, f, _, _ in rows if f.startswith("gptq")][-1]
    for name, family, cfg, note in rows:
        if not want(name):
            continue
        log(f"{name}: {note}")
        try:
            r = run_ours(name, cfg, awq_calib if family.startswith("awq") else calib, args.batch_size, model, work)
        except Exception as e:
            r = {"tool": "turboquant", "error": f"{type(e).__name__}: {e}",
                 "log_tail": traceback.format_exc().splitlines()[-8:]}
        r.update(family=family, note=note)
        runs[name] = r
        loads[name] = list(os.getloadavg())
        log(f"  {r.get('quantize_seconds', float('nan')):.1f} s {r.get('error', '')}")
        if family.startswith("awq"):
            r["calibration_windows"] = int(awq_calib.input_ids.shape[0])
        if name == last_gptq:
            measure_matrix_work("after our GPTQ runs")
    if spec["breakdown"] and not args.no_breakdown and want("breakdown"):
        gcfg = next(c for n, _, c, _ in our_configs(g, False) if n == "ours-gptq")
        log("ours-gptq again, instrumented (where the time goes)")
        m["gptq_breakdown"] = gptq_breakdown(gcfg, calib, args.batch_size)
        log(f"  {m['gptq_breakdown']['seconds']:.1f} s")
    if awq_error:
        runs["ours-awq"] = {"tool": "turboquant", "family": "awq", "error": awq_error}

    refs = [("llmcompressor", "gptq", "llmc-gptq", "gptq",
             f"llm-compressor GPTQModifier int4 sym g{g} (W4A16 min-max), its defaults: static act-order, "
             "dampening 0.01, block 128"),
            ("gptqmodel", "gptq", "gptqmodel-gptq", "gptq", f"GPTQModel desc_act + static_groups, damp 0.01, sym g{g}"),
            ("gptqmodel-defaults", "gptq", "gptqmodel-gptq-defaults", "gptq",
             f"GPTQModel its defaults (desc_act off, act_group_aware on, damp 0.05), sym g{g}"),
            ("llmcompressor", "awq", "llmc-awq", "awq", f"llm-compressor AWQModifier + int4 asym g{g} (W4A16_ASYM)")]
    if not args.skip_refs:
        for tool, method, name, family, note in refs:
            if not want(name):
                continue
            log(f"{name}: {note}")
            r = run_reference(tool, method, awq_ds_path if method == "awq" else ds_path, args.threads,
                              args.batch_size, args.ref_timeout, model=model, work=work, group_size=g, name=name)
            if method == "awq":
                r["calibration_windows"] = int(awq_calib.input_ids.shape[0])
            r.update(family=family, note=note)
            runs[name] = r
            loads[name] = list(os.getloadavg())
            log(f"  {r.get('quantize_seconds', float('nan')):.1f} s {r.get('error', '')}")

    if not args.skip_eval:
        outputs = {n: r["out"] for n, r in runs.items() if r.get("out") and not r.get("error")}
        if outputs:
            log(f"evaluating {len(outputs)} outputs + float baseline")
            for n, e in evaluate_all(outputs, args.ctx, args.eval_tokens or None, model, args.wiki_windows).items():
                runs[n].update(e)

    mw = m.get("matrix_work")
    pairs = [("GPTQ: ours-gptq vs llmc-gptq", "ours-gptq", "llmc-gptq", True),
             ("GPTQ: ours-gptq vs gptqmodel-gptq", "ours-gptq", "gptqmodel-gptq", True),
             ("GPTQ: ours-gptq vs gptqmodel-gptq-defaults", "ours-gptq", "gptqmodel-gptq-defaults", True),
             ("GPTQ: ours-gptq-mse vs llmc-gptq", "ours-gptq-mse", "llmc-gptq", True),
             ("GPTQ: ours-gptq-mse vs gptqmodel-gptq", "ours-gptq-mse", "gptqmodel-gptq", True),
             ("GPTQ: ours-gptq-nogptaq vs llmc-gptq", "ours-gptq-nogptaq", "llmc-gptq", True),
             ("GPTQ: ours-gptq-nogptaq vs gptqmodel-gptq", "ours-gptq-nogptaq", "gptqmodel-gptq", True),
             ("GPTQ: ours-gptq-nots vs llmc-gptq", "ours-gptq-nots", "llmc-gptq", True),
             ("GPTQ: ours-gptq-noact (old defaults) vs llmc-gptq", "ours-gptq-noact", "llmc-gptq", True),
             ("AWQ: ours-awq vs llmc-awq", "ours-awq", "llmc-awq", False),
             ("AWQ: ours-awq-noclip vs llmc-awq", "ours-awq-noclip", "llmc-awq", False)]
    m["comparisons"] = {k: compare(runs[a], runs[b], mw, gp) for k, a, b, gp in pairs if a in runs and b in runs}
    m["load_after_each_step"] = loads
    m["runs"] = runs
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="ref,deep", help="comma-separated: ref (tq-ref-llama), deep (tq-deep-llama)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--wiki-windows", type=int, default=64, help="WikiText-2 test windows evaluated (0: none)")
    p.add_argument("--only", default="", help="comma-separated row names to run (debugging)")
    p.add_argument("--awq-samples", type=int, default=32,
                   help="AWQ rows (ours and llm-compressor) use the first N calibration windows (0: all)")
    p.add_argument("--extended", action="store_true", help="also ours-awq-noclip")
    p.add_argument("--skip-refs", action="store_true")
    p.add_argument("--no-breakdown", action="store_true", help="skip the extra instrumented GPTQ run")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--eval-tokens", type=int, default=0, help="debugging only: evaluate a prefix of the text")
    p.add_argument("--ref-timeout", type=int, default=1800)
    p.add_argument("--out", default=str(RESULTS / "methods_vs_reference"), help="results path without suffix")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    WORK.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    want = lambda n: not only or n in only  # noqa: E731
    report: dict = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
                    "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "batch_size": args.batch_size,
                    "eval_ctx": args.ctx, "wiki_windows": args.wiki_windows, "eval_text": str(HELDOUT),
                    "eval_tokens_limit": args.eval_tokens or None, "versions": versions(),
                    "load_before": machine_load(),
                    "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()},
                    "targets": {"kl_ratio_max": KL_RATIO, "ppl_diff_pct_max": PPL_TOL_PCT,
                                "time_ratio_max": TIME_RATIO, "gptq_over_matrix_work_max": MATRIX_RATIO}}
    log(f"load before: {report['load_before']['uptime']}")
    specs = model_specs([n for n in args.models.split(",") if n])  # trains tq-deep-llama first when missing

    calib, calib_path, ds_path = build_calibration(args.n_samples, args.seqlen)
    # AWQ (both sides) on the first --awq-samples windows of the same set: llm-compressor's AWQ grid search runs
    # every candidate over every cached sample, ~50 min for 128 windows on this loaded 2-core machine.
    awq_calib, awq_ds_path = make_awq_calib(calib, ds_path, args.awq_samples)
    report["calibration"] = {**calib.recipe.to_dict(), "file": str(calib_path.relative_to(ROOT)),
                             "dataset_dir": str(ds_path.relative_to(ROOT)), **calib.provenance,
                             "awq_windows": int(awq_calib.input_ids.shape[0]),
                             "awq_dataset_dir": str(awq_ds_path.relative_to(ROOT))}
    report["models"] = {s["tag"]: bench_model(s, args, calib, ds_path, awq_calib, awq_ds_path, want) for s in specs}
    report["load_after"] = machine_load()
    log(f"load after: {report['load_after']['uptime']}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
