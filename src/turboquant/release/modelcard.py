"""Model cards for published artifacts: the README.md the Hub renders, metadata first.

The YAML header says what the Hub indexes: ``base_model`` + ``base_model_relation: quantized`` (the model tree),
``library_name`` and ``pipeline_tag`` (the runtime widgets), ``tags`` (format, bits, method, ``turboquant``), the
base model's ``license`` and a ``model-index`` with the measured results. The body says what was quantized and
how, lists the files with size, bits per weight, perplexity, KL and gate verdict, shows how to run them in their
runtime, gives the calibration data hash and the commands that rebuild the artifact.

A repo can hold several artifacts (all GGUF types of one model share ``{Model}-GGUF``): each publish stores a
small JSON *record* per artifact under ``turboquant/`` and the card is rebuilt from all records in the repo. A
record carries no local path and no credential.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

RECORD_DIR = "turboquant"
#: library_name the Hub uses for each format's runtime.
LIBRARY = {"gguf": "gguf", "gptq": "transformers", "awq": "transformers", "compressed-tensors": "transformers",
           "mlx": "mlx", "onnx": "onnx"}
#: Validation metrics copied into a record (and so into the card).
METRIC_KEYS = ("ppl", "baseline_ppl", "ppl_delta_pct", "kl", "top1", "ctx", "n_scored", "long_ctx", "long_ppl",
               "long_ppl_delta_pct", "size_bytes", "params", "bits_per_weight", "bits", "runtime", "device", "speed")


def naming_bits(manifest: dict[str, Any], validation: dict[str, Any] | None = None) -> int | None:
    """Code width of the artifact: the validation's, else the GGUF type's digit, else the widest scheme."""
    if validation and validation.get("bits") is not None:
        return int(validation["bits"])
    gguf_type = (manifest.get("format_details") or {}).get("gguf_type")
    if gguf_type:
        m = re.match(r"[QI]Q?(\d)", gguf_type)
        return int(m.group(1)) if m else None
    bits = [s.get("bits") for s in manifest.get("schemes") or [] if s.get("bits")]
    return max(bits) if bits else None


def model_name(manifest: dict[str, Any]) -> str:
    """The source model's name: the last part of its repo id, else its directory name."""
    source = manifest.get("source") or {}
    if source.get("repo_id"):
        return str(source["repo_id"]).rstrip("/").split("/")[-1]
    return str(source.get("name") or Path(str(source.get("path") or "model")).name)


def calibration_hash(calibration: dict[str, Any] | None) -> str | None:
    """sha256 over the calibration recipe and the hashes of its sources and tokenizer: same hash, same tokens."""
    if not calibration:
        return None
    keep = {k: calibration.get(k) for k in ("recipe", "sources_sha256", "tokenizer_sha256", "n_text_tokens")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def entry_name(label: str, manifest: dict[str, Any]) -> str:
    """The record's name in the repo: the GGUF file's stem for GGUF (one per type), else the artifact's label."""
    gguf_file = (manifest.get("format_details") or {}).get("file")
    return Path(gguf_file).stem if manifest.get("format") == "gguf" and gguf_file else label


def artifact_record(label: str, manifest: dict[str, Any], validation: dict[str, Any],
                    files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the repo keeps about one published artifact (``turboquant/<entry>.json``). The idempotency key is
    not in it (it lives in the commit message), so the same bytes published under another key stay identical."""
    source = manifest.get("source") or {}
    verdict = validation.get("verdict") or {}
    tasks = {t: {k: r.get(k) for k in ("metric", "score", "baseline")}
             for t, r in sorted((validation.get("tasks") or {}).items()) if "score" in r}
    return {
        "entry": entry_name(label, manifest),
        "artifact": label,
        "format": manifest.get("format"),
        "bits": naming_bits(manifest, validation),
        "method": manifest.get("method"),
        "method_config": manifest.get("method_config"),
        "schemes": manifest.get("schemes"),
        "format_options": manifest.get("format_options"),
        "format_details": manifest.get("format_details"),
        "source": {"name": model_name(manifest), "repo_id": source.get("repo_id"),
                   "commit_sha": source.get("commit_sha")},
        "fallbacks": list(manifest.get("fallbacks") or []),
        "experts": manifest.get("experts"),
        "calibration": manifest.get("calibration"),
        "calibration_sha256": calibration_hash(manifest.get("calibration")),
        "turboquant_version": manifest.get("turboquant_version"),
        "eval_text": Path(str(validation["text"])).name if validation.get("text") else None,
        "metrics": {k: validation.get(k) for k in METRIC_KEYS if validation.get(k) is not None},
        "tasks": tasks,
        "verdict": {"passed": bool(verdict.get("passed")), "reasons": list(verdict.get("reasons") or [])},
        "files": files,
        "manifest": manifest,
    }


def experts_sentence(experts: dict[str, Any] | None) -> str:
    """What a mixture-of-experts artifact did with its experts and routers (empty for a dense model)."""
    if not experts:
        return ""
    text = f" Mixture of experts: all {experts.get('per_module')} experts of every MoE block quantized"
    routers = experts.get("routers_kept") or []
    if routers:
        text += f", routers ({', '.join(routers)}) kept in full precision"
    counts = [c for per in (experts.get("routed_tokens") or {}).values() for c in per]
    if counts:
        how = "every calibration token through every expert" if experts.get("calibrate_all_experts") \
            else "routed tokens only"
        text += f"; statistics from {how} (routed tokens per expert: {min(counts)} to {max(counts)})"
    return text + "."


# ---------------------------------------------------------------------------------------------------------------
# Commands and snippets
# ---------------------------------------------------------------------------------------------------------------


def _opt(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def reproduce_command(record: dict[str, Any]) -> str:
    """The ``turboquant`` commands that rebuild this artifact from the pinned base model."""
    source = record["source"]
    model = source.get("repo_id") or source.get("name")
    q = [f"turboquant quantize {model}"]
    if source.get("commit_sha"):
        q.append(f"--revision {source['commit_sha']}")
    q.append(f"--method {record.get('method')}")
    q += [f"--option {k}={_opt(v)}" for k, v in sorted((record.get("method_config") or {}).items()) if v is not None]
    recipe = (record.get("calibration") or {}).get("recipe")
    if recipe:
        q += [f"--data {s}" for s in recipe.get("sources", [])]
        q += [f"--n-samples {recipe.get('n_samples')}", f"--seqlen {recipe.get('seqlen')}", f"--seed {recipe.get('seed')}"]
    q.append("--out quantized")
    e = [f"turboquant export quantized --format {record['format']}"]
    for k, v in sorted((record.get("format_options") or {}).items()):
        if v is None or v is False or k == "calib":
            continue
        e.append(f"--gguf-type {v}" if k == "gguf_type" else f"--option {k}={_opt(v)}")
    e.append(f"--out {record['artifact']}")
    return " \\\n    ".join(q) + "\n" + " \\\n    ".join(e)


def usage_snippet(fmt: str, repo_id: str, records: list[dict[str, Any]]) -> str:
    """How to run the artifact in its runtime(s)."""
    if fmt == "gguf":
        first = next((f for f in records[0]["files"] if f.endswith(".gguf")), "model.gguf")
        gtype = (records[0].get("format_details") or {}).get("gguf_type", "Q4_0")
        return (f"llama.cpp:\n\n```sh\nllama-cli --hf-repo {repo_id} --hf-file {first} -p \"The meaning of life is\"\n"
                f"llama-server -hf {repo_id}:{gtype}\n```\n\nllama-cpp-python:\n\n```python\nfrom llama_cpp import Llama\n\n"
                f"llm = Llama.from_pretrained(repo_id=\"{repo_id}\", filename=\"{first}\")\n"
                "print(llm(\"The meaning of life is\", max_tokens=32)[\"choices\"][0][\"text\"])\n```\n")
    if fmt == "mlx":
        return (f"mlx-lm (Apple silicon):\n\n```sh\npip install mlx-lm\nmlx_lm.generate --model {repo_id} "
                f"--prompt \"The meaning of life is\"\n```\n\n```python\nfrom mlx_lm import load, generate\n\n"
                f"model, tokenizer = load(\"{repo_id}\")\nprint(generate(model, tokenizer, prompt=\"The meaning of life is\", "
                "max_tokens=32))\n```\n")
    if fmt == "onnx":
        return (f"ONNX Runtime (CPU, MatMulNBits):\n\n```python\nfrom huggingface_hub import snapshot_download\n"
                f"import onnxruntime as ort\n\npath = snapshot_download(\"{repo_id}\")\n"
                "session = ort.InferenceSession(f\"{path}/model.onnx\")\n```\n")
    extra = {"gptq": "pip install gptqmodel", "awq": "pip install gptqmodel",
             "compressed-tensors": "pip install compressed-tensors"}.get(fmt, "")
    return (f"vLLM:\n\n```sh\nvllm serve {repo_id}\n```\n\ntransformers ({extra}):\n\n```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\")\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{repo_id}\", device_map=\"auto\")\n"
            "inputs = tokenizer(\"The meaning of life is\", return_tensors=\"pt\").to(model.device)\n"
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))\n```\n")


# ---------------------------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return "-"


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _eval_results(records: list[dict[str, Any]]) -> list[EvalResult]:
    out = []
    for r in records:
        m, text = r["metrics"], r.get("eval_text") or "heldout text"
        for metric, name in (("ppl", "perplexity"), ("kl", "kl_divergence"), ("top1", "top1_agreement")):
            if m.get(metric) is not None:
                out.append(EvalResult(task_type="text-generation", task_name="Text Generation",
                                      dataset_type="text", dataset_name=text, metric_type=name,
                                      metric_value=round(float(m[metric]), 6), metric_name=f"{r['entry']} {name}",
                                      verified=False))
        for task, t in sorted((r.get("tasks") or {}).items()):
            if t.get("score") is not None:
                out.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                      metric_type=t.get("metric") or "acc", metric_value=round(float(t["score"]), 4),
                                      metric_name=f"{r['entry']} {task}", verified=False))
    return out


def card_metadata(repo_id: str, records: list[dict[str, Any]], *, base_model: str | None,
                  license: str | None) -> ModelCardData:
    first = records[0]
    fmt = first["format"]
    tags = [fmt, "turboquant", "quantized"]
    for r in records:
        tags += [f"{r['bits']}-bit"] if r.get("bits") else []
        tags += [r["method"]] if r.get("method") else []
        gtype = (r.get("format_details") or {}).get("gguf_type")
        tags += [gtype] if gtype else []
    tags = list(dict.fromkeys(tags))
    return ModelCardData(
        base_model=base_model, base_model_relation="quantized" if base_model else None,
        library_name=LIBRARY.get(fmt), pipeline_tag="text-generation", tags=tags, license=license,
        model_name=repo_id.split("/")[-1], eval_results=_eval_results(records) or None,
    )


def card_body(repo_id: str, records: list[dict[str, Any]], *, base_model: str | None) -> str:
    first = records[0]
    src = first["source"]
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{src.get('name')}`"
    pinned = f" at commit `{src['commit_sha']}`" if src.get("commit_sha") else ""
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"Quantized versions of {base}{pinned}, made with TurboQuant {first.get('turboquant_version')} and "
             "published only because every quality gate passed against the unquantized model.", "",
             "## What was quantized and how", ""]
    for r in records:
        schemes = ", ".join(json.dumps(s, sort_keys=True) for s in r.get("schemes") or []) or "float"
        conv = (r.get("format_details") or {}).get("conversion")
        lines.append(f"- **{r['entry']}**: method `{r.get('method')}` ({json.dumps(r.get('method_config'), sort_keys=True)}), "
                     f"scheme {schemes}, exported as `{r['format']}`" + (f" ({conv})" if conv else "") + "."
                     + experts_sentence(r.get("experts"))
                     + ("".join(f" Changed from what was asked: {f}." for f in r.get("fallbacks") or [])))
    lines += ["", "## Files", "",
              "| File | Size | Bits per weight | Perplexity (vs base) | KL | Top-1 | Gates |",
              "|---|---|---|---|---|---|---|"]
    for r in records:
        m = r["metrics"]
        weights = [f for f in r["files"] if f.endswith((".gguf", ".safetensors", ".onnx", ".onnx_data", ".npz"))]
        name = weights[0] if r["format"] == "gguf" and weights else f"{r['entry']} ({len(r['files'])} files)"
        size = m.get("size_bytes") or sum(int(f["size"]) for f in r["files"].values())
        ppl = f"{_num(m.get('ppl'), '.4f')} ({_num(m.get('ppl_delta_pct'), '+.2f')}%)" if m.get("ppl") else "-"
        gate = "passed" if r["verdict"]["passed"] else "failed: " + "; ".join(r["verdict"]["reasons"])
        lines.append(f"| {name} | {_size(size)} | {_num(m.get('bits_per_weight'), '.2f')} | {ppl} | "
                     f"{_num(m.get('kl'), '.6f')} | {_num(m.get('top1'), '.4f')} | {gate} |")
    text = first.get("eval_text")
    lines += ["", f"Measured in each artifact's own runtime ({first['metrics'].get('runtime', '-')}) on `{text}` at "
              f"context {first['metrics'].get('ctx', '-')}; KL is the mean KL divergence of the next-token "
              "distribution from the base model's, top-1 the agreement of their argmax.", ""]
    lines += speed_section(records)
    lines += ["## Usage", "", usage_snippet(first["format"], repo_id, records), "## Reproduce", ""]
    for r in records:
        calib = r.get("calibration_sha256")
        lines += [f"**{r['entry']}**: calibration data sha256 `{calib}`" if calib
                  else f"**{r['entry']}**: no calibration data (the method needs none).", "",
                  "```sh", reproduce_command(r), "```", ""]
    lines += ["Every file's sha256 is listed in the artifact's manifest "
              f"(`manifest.json`, or `{RECORD_DIR}/<file>.json` for shared repos).", ""]
    return "\n".join(lines)


def speed_section(records: list[dict[str, Any]]) -> list[str]:
    """The speed table: each artifact's prompt and greedy-decode throughput and memory in its runtime, against the
    unquantized model in the same runtime on the same prompt (empty when no speed was measured)."""
    timed = [r for r in records if (r["metrics"].get("speed") or {}).get("artifact")]
    if not timed:
        return []
    lines = ["## Speed", "", "| Artifact | Runtime | Device | Prompt tok/s (× base) | Decode tok/s (× base) | "
             "Memory (× base) |", "|---|---|---|---|---|---|"]
    for r in timed:
        sp = r["metrics"]["speed"]
        a = sp["artifact"]
        memory = _size(a["model_rss_bytes"]) + (f" ({sp['memory_ratio']:.2f}×)" if sp.get("memory_ratio") else "")
        lines.append(f"| {r['entry']} | {a['runtime']} | {a['device']} | {a['prompt_tok_s']:.0f} "
                     f"({sp['prompt_speedup']:.2f}×) | {a['decode_tok_s']:.1f} ({sp['decode_speedup']:.2f}×) | "
                     f"{memory} |")
    a = timed[0]["metrics"]["speed"]["artifact"]
    lines += ["", f"A prompt of {a['prompt_tokens']} tokens, then {a['decode_tokens']} greedy tokens on the "
              "runtime's KV cache, each artifact in a fresh process; the base is the unquantized model in the same "
              "runtime (GGUF F16 for llama.cpp, float MLX, float ONNX, the float model in torch for the "
              "transformers formats). Memory is the process's peak resident memory above its start.", ""]
    return lines


def build_card(repo_id: str, records: list[dict[str, Any]], *, base_model: str | None = None,
               license: str | None = None) -> ModelCard:
    """The README.md for ``repo_id`` holding the artifacts of ``records`` (sorted by entry name)."""
    records = sorted(records, key=lambda r: r["entry"])
    data = card_metadata(repo_id, records, base_model=base_model, license=license)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(repo_id, records, base_model=base_model)}")
