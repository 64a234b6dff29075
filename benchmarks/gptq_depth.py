"""Where GPTQ's error goes with depth: block-output error after every block, for RTN, our GPTQ variants and the
reference tools, all on the same held-out tokens (issue 21).

    python benchmarks/gptq_depth.py --model deep                 # tq-deep-llama (trained if missing), W4 g64 sym
    python benchmarks/gptq_depth.py --model ref --group-size 128  # ../shared/models/tq-ref-llama
    python benchmarks/gptq_depth.py --model deep --refs           # + llm-compressor and GPTQModel (.venv-bench)

Every variant quantizes the same calibration windows (128 x 512 from calib/wiki.txt + calib/c4.txt, seed 0, as
``methods_vs_reference.py`` builds them). Then, on the first ``--windows`` 512-token windows of heldout/all.txt:

* **accumulated error** after block i: ``sum ||h_q,i - h_i||² / sum ||h_i||²`` where ``h_i`` is the float model's
  residual stream after block i and ``h_q,i`` the quantized model's, each run end to end (what the next block and
  finally the head see: error made in blocks 0..i, propagated);
* **local error** of block i: its quantized copy fed the *float* input ``h_{i-1}``,
  ``sum ||B_q,i(h_{i-1}) - h_i||² / sum ||h_i - h_{i-1}||²`` (relative to what the block adds to the stream: the
  solver's quality on that block alone).

Also KL / top-1 / perplexity vs the float model with our evaluator on heldout/all.txt and on the first 64 windows of
WikiText-2 test. Results: ``benchmarks/results/gptq_depth-<model>-g<group>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods_vs_reference as mvr  # noqa: E402

ROOT = mvr.ROOT
WIKI = mvr.SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def variants(bits: int, group_size: int) -> dict[str, tuple[object, str]]:
    """Our rows: name -> (config, what differs)."""
    from turboquant.methods.gptq import GptqConfig
    from turboquant.methods.rtn import RtnConfig

    s = dict(bits=bits, group_size=group_size, symmetric=True)
    off = dict(gptaq=False)
    return {
        "rtn": (RtnConfig(**s), "RTN min-max"),
        "gptq-defaults": (GptqConfig(**s), "our GptqConfig defaults (act-order + static groups + GPTAQ)"),
        "gptq-noact": (GptqConfig(**s, act_order=False, static_groups=False, **off),
                       "no act-order, groups fitted when reached (the defaults before issue 21)"),
        "gptq-noact-static": (GptqConfig(**s, act_order=False, static_groups=True, **off),
                              "no act-order, group scales fitted up front on the original weights"),
        "gptq-act-static": (GptqConfig(**s, act_order=True, static_groups=True, **off),
                            "act-order + static groups (llm-compressor's default solver settings)"),
        "gptq-act-dynamic": (GptqConfig(**s, act_order=True, static_groups=False, **off),
                             "act-order, groups formed in act-order and fitted when reached (g_idx)"),
        "gptq-act-static-nots": (GptqConfig(**s, act_order=True, static_groups=True, true_sequential=False, **off),
                                 "act-order + static, one capture per block (as llm-compressor)"),
        "gptq-act-static-mse": (GptqConfig(**s, act_order=True, static_groups=True, mse_clip=True, **off),
                                "act-order + static + MSE range search"),
        "gptq-act-static-damp0.1": (GptqConfig(**s, act_order=True, static_groups=True, damp_percent=0.1, **off),
                                    "act-order + static, damp 0.1"),
        "gptq-noact-gptaq": (GptqConfig(**s, act_order=False, static_groups=False, gptaq=True),
                             "no act-order + GPTAQ (fit the float model's layer outputs)"),
        "gptq-act-static-gptaq": (GptqConfig(**s, act_order=True, static_groups=True, gptaq=True),
                                  "act-order + static + GPTAQ (= the defaults)"),
        "gptq-act-static-gptaq-mse": (GptqConfig(**s, act_order=True, static_groups=True, gptaq=True,
                                                 mse_clip=True), "act-order + static + GPTAQ + MSE range search"),
    }


@torch.no_grad()
def block_errors(float_model: torch.nn.Module, models: dict[str, torch.nn.Module], ids: torch.Tensor,
                 ctx: int, n_windows: int) -> dict[str, dict[str, list[float]]]:
    """Per model: accumulated and local relative error after every block (definitions in the module docstring)."""
    windows = ids[: n_windows * ctx].reshape(n_windows, ctx)
    layers_f = float_model.model.layers
    n = len(layers_f)

    def run(model, teacher: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        handles = []
        for i, layer in enumerate(model.model.layers):
            if teacher is not None:
                def pre(_m, args, kwargs, i=i):
                    return (teacher[i],) + tuple(args[1:]), kwargs
                handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(
                lambda _m, _a, out: outs.append((out[0] if isinstance(out, tuple) else out).clone())))
        try:
            model.model(input_ids=w)
        finally:
            for h in handles:
                h.remove()
        return outs

    acc_num = {k: torch.zeros(n, dtype=torch.float64) for k in models}
    loc_num = {k: torch.zeros(n, dtype=torch.float64) for k in models}
    acc_den = torch.zeros(n, dtype=torch.float64)
    loc_den = torch.zeros(n, dtype=torch.float64)
    for wi in range(n_windows):
        w = windows[wi : wi + 1]
        emb = float_model.model.embed_tokens(w)
        hf = run(float_model)
        inputs = [emb] + hf[:-1]
        for i in range(n):
            acc_den[i] += hf[i].double().pow(2).sum()
            loc_den[i] += (hf[i] - inputs[i]).double().pow(2).sum()
        for name, m in models.items():
            hq = run(m)
            hl = run(m, teacher=inputs)
            for i in range(n):
                acc_num[name][i] += (hq[i] - hf[i]).double().pow(2).sum()
                loc_num[name][i] += (hl[i] - hf[i]).double().pow(2).sum()
    return {name: {"accumulated": (acc_num[name] / acc_den).tolist(), "local": (loc_num[name] / loc_den).tolist()}
            for name in models}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deep", help="deep (tq-deep-llama), ref (tq-ref-llama) or a directory")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--refs", action="store_true", help="also llm-compressor and GPTQModel (needs .venv-bench)")
    p.add_argument("--windows", type=int, default=16, help="held-out windows for the block errors")
    p.add_argument("--kl-windows", type=int, default=64, help="WikiText-2 windows for KL (heldout: whole text)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reuse", action="store_true", help="reuse quantized outputs already in the work dir")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    if args.model == "deep":
        import deep_ref_model

        model = deep_ref_model.ensure_model(log)
        tag = "tq-deep-llama"
    elif args.model == "ref":
        model, tag = mvr.MODEL, "tq-ref-llama"
    else:
        model, tag = Path(args.model), Path(args.model).name
    work = ROOT / "benchmarks" / "work" / "gptq_depth" / f"{tag}-w{args.bits}g{args.group_size}"
    work.mkdir(parents=True, exist_ok=True)
    calib, _, ds_path = mvr.build_calibration(128, 512)
    report: dict = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": str(model),
                    "tag": tag, "bits": args.bits, "group_size": args.group_size, "load_before": mvr.machine_load(),
                    "rows": {}}

    from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize
    from turboquant.quality.evaluate import evaluate_many
    from turboquant.quantize.pipeline import quantize

    outputs: dict[str, Path] = {}
    only = set(filter(None, args.only.split(",")))
    for name, (cfg, note) in variants(args.bits, args.group_size).items():
        if only and name not in only:
            continue
        out = work / name
        row = {"note": note, "config": cfg.to_dict(), "method": cfg.method}
        if not (args.reuse and (out / "turboquant.json").is_file()):
            log(f"{name}: {note}")
            t0 = time.perf_counter()
            quantize(model, cfg, out, calib=calib, overwrite=True, progress=False, batch_size=args.batch_size)
            row["quantize_seconds"] = round(time.perf_counter() - t0, 1)
        outputs[name] = out
        report["rows"][name] = row
    if args.refs:
        refs = [("llmcompressor", "llmc-gptq", "llm-compressor GPTQModifier, its defaults (static act-order)"),
                ("gptqmodel", "gptqmodel-gptq", "GPTQModel desc_act + static_groups, damp 0.01"),
                ("gptqmodel-defaults", "gptqmodel-gptq-defaults", "GPTQModel defaults (act_group_aware, damp 0.05)")]
        for tool, name, note in refs:
            if only and name not in only:
                continue
            out = work / "out" / name  # where run_reference writes
            row = {"note": note}
            if not (args.reuse and (out / "model.safetensors").is_file()):
                log(f"{name}: {note}")
                r = mvr.run_reference(tool, "gptq", ds_path, args.threads, args.batch_size, 3600, model=model,
                                      work=work, bits=args.bits, group_size=args.group_size, name=name)
                if r.get("error"):
                    log(f"  failed: {r['error']} {r.get('log_tail', [])[-5:]}")
                    row["error"] = r["error"]
                    report["rows"][name] = row
                    continue
                row["quantize_seconds"] = round(r["quantize_seconds"], 1)
                row["settings"] = r.get("settings")
            outputs[name] = out
            report["rows"][name] = row

    log(f"loading {len(outputs)} models")
    float_model = load_model(model)
    models = {name: load_model(path) for name, path in outputs.items()}
    tok = load_tokenizer(model)
    held = tokenize(tok, read_text(mvr.HELDOUT))
    log(f"block errors on {args.windows} x 512 held-out tokens")
    errs = block_errors(float_model, models, held, 512, args.windows)
    log("KL on heldout/all.txt and WikiText-2")
    ev_h = evaluate_many(models, held, ctx=512, baseline=float_model, text_name="heldout/all.txt")
    wiki = tokenize(tok, read_text(WIKI))[: args.kl_windows * 512]
    ev_w = evaluate_many(models, wiki, ctx=512, baseline=float_model, text_name="wiki.test.raw")
    for name in outputs:
        report["rows"][name].update(block_error=errs[name], eval_heldout=ev_h[name].to_dict(),
                                    eval_wikitext2=ev_w[name].to_dict())
    report["load_after"] = mvr.machine_load()
    out = ROOT / "benchmarks" / "results" / f"gptq_depth-{tag}-w{args.bits}g{args.group_size}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)


def markdown(report: dict) -> str:
    rows = report["rows"]
    done = {k: r for k, r in rows.items() if r.get("block_error")}
    n = len(next(iter(done.values()))["block_error"]["accumulated"]) if done else 0
    rtn = done.get("rtn")
    lines = [f"# GPTQ through depth: {report['tag']}, W{report['bits']} g{report['group_size']} sym", "",
             f"Generated {report['started']} by `benchmarks/gptq_depth.py`; model `{report['model']}`. "
             "Accumulated: relative MSE of the residual stream after block i (end-to-end runs). Local: block i "
             "fed the float input, error relative to the block's own update. Σ: summed over blocks. "
             "KL: mean KL(float || quantized) per token, our evaluator.", "",
             "| row | settings | Σ accumulated | Σ acc / RTN | Σ local | last-block acc | KL heldout | KL WikiText-2 "
             "| top-1 WikiText-2 | quantize s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in done.items():
        acc, loc = r["block_error"]["accumulated"], r["block_error"]["local"]
        ratio = sum(acc) / sum(rtn["block_error"]["accumulated"]) if rtn else None
        lines.append(f"| {k} | {r['note']} | {sum(acc):.4f} | {mvr.fmt(ratio, '.3f')} | {sum(loc):.4f} | "
                     f"{acc[-1]:.5f} | {r['eval_heldout']['kl']:.5f} | {r['eval_wikitext2']['kl']:.5f} | "
                     f"{r['eval_wikitext2']['top1']:.4f} | {mvr.fmt(r.get('quantize_seconds'), '.1f')} |")
    if done:
        names = list(done)
        lines += ["", "Accumulated error after each block:", "",
                  "| block | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for i in range(n):
            lines.append(f"| {i} | " + " | ".join(f"{done[k]['block_error']['accumulated'][i]:.5f}" for k in names)
                         + " |")
        lines += ["", "Local error of each block (float input):", "",
                  "| block | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for i in range(n):
            lines.append(f"| {i} | " + " | ".join(f"{done[k]['block_error']['local'][i]:.4f}" for k in names) + " |")
    for k, r in rows.items():
        if r.get("error"):
            lines.append(f"\n- **{k}** failed: {r['error']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
