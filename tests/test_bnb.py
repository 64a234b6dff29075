"""bitsandbytes artifacts: saved and reloaded through transformers, their bits per weight, validated in
transformers like every other artifact."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import turboquant
from conftest import HELDOUT, REF_MODEL
from turboquant.cli import app
from turboquant.errors import OutputError
from turboquant.quality.bnb import artifact_quantization, bnb_bits_per_weight
from turboquant.quality.runtimes import artifact_format, open_runtime
from turboquant.quality.validate import validate


def _linear(model, kind: str):
    return type(model.model.layers[0].self_attn.q_proj).__name__ == kind


@pytest.mark.parametrize("method,options,kind,bits", [
    # NF4 + double quant: 4-bit codes + one uint8 absmax per 64 weights + one float32 per 256 absmax blocks
    # (the tiny model's layers hold 64 or 128 blocks, so one nested absmax each): 4 + 8/64 + ~0.006
    ("bnb-nf4", {}, "Linear4bit", (4.125, 4.14)),
    # FP4 without double quant: a float32 absmax per 64 weights: 4 + 32/64
    ("bnb-fp4", {"double_quant": False}, "Linear4bit", (4.5, 4.5)),
    # LLM.int8(): a float32 SCB per output row: 8 + 32/64 (in 64) and 8 + 32/128 (down_proj), weighted 8.44
    ("bnb-int8", {}, "Linear8bitLt", (8.44, 8.45)),
])
def test_save_reload_through_transformers(tiny_model, tmp_path, method, options, kind, bits, one_thread):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    q = turboquant.quantize(tiny_model, method=method, save_dir=out, **options)
    qc = artifact_quantization(out)
    assert qc is not None and qc["quant_method"] == "bitsandbytes"
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".*"))  # tokenizer copied, no temp left
    again = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval()
    assert _linear(q, kind) and _linear(again, kind)
    assert type(again.lm_head) is torch.nn.Linear  # transformers keeps the head in float, as QLoRA does
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(q(ids).logits, again(ids).logits)
    lo, hi = bits
    assert lo - 1e-9 <= bnb_bits_per_weight(out) <= hi + 1e-9
    assert artifact_format(out) == "bitsandbytes" and artifact_format(tiny_model) == "hf"
    with pytest.raises(OutputError, match="already exists"):
        turboquant.quantize(tiny_model, method=method, save_dir=out, **options)


def test_cli_writes_the_artifact_and_validation_measures_it_in_transformers(tmp_path):
    """The reference model in NF4: the artifact's runtime is transformers + bitsandbytes, and it passes the
    4-bit gates (measured: KL 0.0017, top-1 0.97, perplexity -0.1 % on the first 1024 held-out tokens)."""
    art = tmp_path / "nf4"
    r = CliRunner().invoke(app, ["quantize", str(REF_MODEL), "--method", "bnb-nf4", "--out", str(art)])
    assert r.exit_code == 0, r.output
    name, runtime = open_runtime(art)
    assert name == "transformers + bitsandbytes" and isinstance(runtime, torch.nn.Module)
    m = validate(art, REF_MODEL, HELDOUT, max_tokens=1024, ctx=512, long_ctx=1024)
    assert m["format"] == "bitsandbytes" and m["runtime"] == "transformers + bitsandbytes"
    assert 4.12 < m["bits"] < 4.14 and m["verdict"]["gates"]["max_kl"] == 0.1  # the 4-bit gates apply
    assert 0 < m["kl"] < 0.01 and m["top1"] > 0.93 and abs(m["ppl_delta_pct"]) < 2
    assert m["verdict"]["passed"], m["verdict"]
    assert {c["gate"] for c in m["verdict"]["checks"]} >= {"max_ppl_delta_pct", "max_kl", "min_top1"}
    assert m["size_bytes"] > 0 and m["bits_per_weight"] > 4  # float embeddings and head count too
    r = CliRunner().invoke(app, ["validate", str(art), "--baseline", str(REF_MODEL), "--text", str(HELDOUT),
                                 "--max-tokens", "512", "--json", str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output
    assert "bitsandbytes in transformers + bitsandbytes" in r.output
    assert json.loads((tmp_path / "v.json").read_text())["verdict"]["passed"]
