"""Run one reference quantizer (llm-compressor or GPTQModel) and export its result as a plain float HF directory.

Runs inside the benchmark venv (``.venv-bench``, ``make bench-env``), started as a subprocess by
``methods_vs_reference.py``; it never imports turboquant. Only the quantize call itself (``oneshot`` /
``GPTQModel.quantize``) is timed. The quantized weights are exported *dequantized* (float32, the values the
quantized model computes with) next to a copy of the source model's config and tokenizer, so TurboQuant's
evaluator loads them like any HF model. A JSON report (timing, versions, export checks) goes to ``--report``.

    .venv-bench/bin/python benchmarks/reference_runner.py --tool llmcompressor --method gptq \
        --model DIR --dataset DIR --out DIR --report FILE [--threads 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

_AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "llmcompressor", "compressed-tensors", "gptqmodel", "accelerate",
                "datasets", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _load_float_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def _write_float_dir(tensors: dict, model_dir: str, out: Path) -> None:
    """``tensors`` (HF names, float32) + the source directory's config/tokenizer files, as a plain HF dir."""
    from safetensors.torch import save_file

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("tie_word_embeddings"):  # the head is the embedding (stored once, as the source stores it)
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for name in _AUX_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            shutil.copy2(src, out / name)


# --------------------------------------------------------------------------------------------------------------
# llm-compressor
# --------------------------------------------------------------------------------------------------------------

def _no_pin_memory() -> None:
    """AWQ pins its activation cache for faster host-to-device copies; without an accelerator that fails on CPU.

    Made a no-op at runtime (site-packages untouched): on CPU the tensors are used where they are.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def _llmc_weights(bits: int, group_size: int, symmetric: bool) -> dict:
    """A config group equal to the W{bits}A16 preset (int, min-max observer) with another group size."""
    return {"group_0": {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric,
                                                          "strategy": "group", "group_size": group_size}}}


def _llmc_recipe(method: str, bits: int = 4, group_size: int = 128):
    preset = bits == 4 and group_size == 128
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        # W4A16 preset: int4, symmetric, group 128, min-max observer (other group sizes: the same as a config
        # group). actorder left at its default ("static": columns by decreasing diag(H), group qparams fixed on
        # the original weights up front).
        scheme = {"scheme": "W4A16"} if preset else {"config_groups": _llmc_weights(bits, group_size, True)}
        return [GPTQModifier(**scheme, targets="Linear", ignore=["lm_head"], block_size=128, dampening_frac=0.01)]
    if method == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # The non-deprecated form: the AWQ scale search as a transform, then RTN to W4A16_ASYM (int4, asym, g128).
        scheme = {"scheme": "W4A16_ASYM"} if preset else {"config_groups": _llmc_weights(bits, group_size, False)}
        return [AWQModifier(duo_scaling=True, n_grid=20),
                QuantizationModifier(**scheme, targets="Linear", ignore=["lm_head"])]
    raise SystemExit(f"unknown method {method}")


def _llmc_export(model) -> tuple[dict, dict]:
    """Every tensor under its HF name; quantized linears' weights replaced by their fake-quantized values."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {}
    checks = {"quantized_linears": 0, "weights_changed_by_requantize": 0, "weights_total": 0, "max_levels": 0}
    qparam_suffixes = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")
    quantized = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if isinstance(module, torch.nn.Linear) and scheme is not None and scheme.weights is not None:
            args = scheme.weights
            W = module.weight.detach().float()
            scale = module.weight_scale.detach()
            zp = getattr(module, "weight_zero_point", None)
            g_idx = getattr(module, "weight_g_idx", None)
            if g_idx is not None and bool((g_idx >= 0).all()):
                raise SystemExit(f"{name}: g_idx (group act-order) export is not implemented")
            with torch.no_grad():
                Q = fake_quantize(W, scale.float(), None if zp is None else zp, args).float()
            checks["quantized_linears"] += 1
            checks["weights_changed_by_requantize"] += int((Q != W).sum())
            checks["weights_total"] += W.numel()
            gs = args.group_size or W.shape[1]
            levels = Q.reshape(Q.shape[0], -1, gs)
            # distinct values in the most populated group (<= 16 for 4-bit): a cheap sanity check of the export
            sample = levels[: min(8, levels.shape[0])]
            checks["max_levels"] = max(checks["max_levels"], max(int(torch.unique(g).numel())
                                                                 for g in sample.reshape(-1, gs)))
            quantized[name + ".weight"] = Q
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[-1] in qparam_suffixes or "observer" in key:
            continue
        state[key] = quantized.get(key, value)
    return state, checks


def run_llmcompressor(args) -> dict:
    import torch
    from datasets import load_from_disk

    torch.set_num_threads(args.threads)
    model = _load_float_model(args.model)
    ds = load_from_disk(args.dataset)
    recipe = _llmc_recipe(args.method, args.bits, args.group_size)
    if args.method == "awq":
        _no_pin_memory()
    from llmcompressor import oneshot

    n, seqlen = len(ds), len(ds[0]["input_ids"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=n,
            shuffle_calibration_samples=False, batch_size=args.batch_size, pipeline="sequential")
    seconds = time.perf_counter() - t0
    state, checks = _llmc_export(model)
    _write_float_dir(state, args.model, Path(args.out))
    return {"quantize_seconds": seconds, "export_checks": checks,
            "settings": {"recipe": [type(m).__name__ + ": " + repr(m.model_dump(exclude_none=True)
                                                                   if hasattr(m, "model_dump") else m)
                                    for m in recipe],
                         "pipeline": "sequential", "batch_size": args.batch_size, "n_samples": n,
                         "seqlen": seqlen}}


# --------------------------------------------------------------------------------------------------------------
# GPTQModel
# --------------------------------------------------------------------------------------------------------------

def run_gptqmodel(args) -> dict:
    import torch
    from datasets import load_from_disk

    torch.set_num_threads(args.threads)
    from gptqmodel import GPTQModel, QuantizeConfig

    if args.tool_defaults:  # GPTQModel's own defaults (desc_act off, act_group_aware on, damp 0.05)
        qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True)
    else:  # act-order with static groups and damp 0.01: the same GPTQ as llm-compressor's default
        qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True, desc_act=True,
                              static_groups=True, act_group_aware=False, damp_percent=0.01, true_sequential=True)
    model = GPTQModel.load(args.model, qcfg, device="cpu", dtype=torch.float32)
    ds = load_from_disk(args.dataset)
    calib = [{"input_ids": torch.tensor(r["input_ids"])[None], "attention_mask": torch.tensor(r["attention_mask"])[None]}
             for r in ds]
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    qdir = Path(args.out + ".gptq-packed")
    if qdir.exists():
        shutil.rmtree(qdir)
    model.save(str(qdir))
    del model
    state, checks = _gptqmodel_export(str(qdir), args.model, args.group_size)
    _write_float_dir(state, args.model, Path(args.out))
    return {"quantize_seconds": seconds, "export_checks": checks,
            "settings": {"quantize_config": {k: str(v) for k, v in qcfg.to_dict().items()},
                         "batch_size": args.batch_size, "n_samples": len(calib)}}


def _gptqmodel_export(qdir: str, model_dir: str, group_size: int = 128) -> tuple[dict, dict]:
    """Reload the packed checkpoint with GPTQModel and read each quantized linear's weight back as
    ``W^T = layer(I)`` (kernel-agnostic: whatever GPTQModel computes with is what is exported)."""
    import torch
    from gptqmodel import GPTQModel

    qmodel = GPTQModel.load(qdir, device="cpu")
    inner = qmodel.model
    float_model = _load_float_model(model_dir)
    state = dict(float_model.state_dict())
    checks = {"quantized_linears": 0, "max_levels": 0}
    with torch.no_grad():
        for name, module in inner.named_modules():
            if hasattr(module, "qweight") and name + ".weight" in state:
                W = state[name + ".weight"]
                eye = torch.eye(W.shape[1], dtype=torch.float32)
                dt = getattr(module, "scales").dtype
                out = module(eye.to(dt)).float()
                bias = getattr(module, "bias", None)
                if bias is not None:
                    out = out - bias.float()
                state[name + ".weight"] = out.t().contiguous()
                checks["quantized_linears"] += 1
                g = state[name + ".weight"][:8].reshape(-1, group_size)
                checks["max_levels"] = max(checks["max_levels"], max(int(torch.unique(r).numel()) for r in g))
    checks["kernel"] = sorted({type(m).__name__ for m in inner.modules() if hasattr(m, "qweight")})
    return state, checks


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tool", choices=["llmcompressor", "gptqmodel"], required=True)
    p.add_argument("--method", choices=["gptq", "awq"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--tool-defaults", action="store_true", help="gptqmodel: its own default QuantizeConfig")
    args = p.parse_args()
    t_start = time.perf_counter()
    runner = run_llmcompressor if args.tool == "llmcompressor" else run_gptqmodel
    result = runner(args)
    import torch

    result.update(tool=args.tool, method=args.method, threads=torch.get_num_threads(), versions=_versions(),
                  total_seconds=time.perf_counter() - t_start, out=args.out,
                  env={k: v for k, v in os.environ.items() if k.startswith(("GPTQMODEL_", "OMP_", "MKL_"))})
    Path(args.report).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("tool", "method", "quantize_seconds", "export_checks")}, default=str))


if __name__ == "__main__":
    main()
