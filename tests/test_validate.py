"""validate: metrics in the artifact's runtime, gates, and a deliberately broken artifact failing every gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import HELDOUT, REF_MODEL
from turboquant.cli import app
from turboquant.formats import export
from turboquant.methods import make_config
from turboquant.quantize.pipeline import quantize
from turboquant.quality.validate import validate

pytestmark = pytest.mark.slow
TOKENS = 4096


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    return quantize(REF_MODEL, make_config("rtn", bits=4, group_size=32), root / "q", progress=False)


def test_gptq_artifact_is_measured_in_transformers_and_passes(w4, tmp_path):
    art = export(w4, "gptq", tmp_path / "gptq")
    m = validate(art, REF_MODEL, HELDOUT, max_tokens=TOKENS, baseline_cache=tmp_path / "base.safetensors")
    assert m["format"] == "gptq" and m["runtime"] == "transformers + GPTQModel"
    assert m["verdict"]["passed"], m["verdict"]
    assert 0 < m["kl"] < 0.01 and m["top1"] > 0.9 and abs(m["ppl_delta_pct"]) < 5
    assert m["long_ctx"] == 1024 and m["long_ppl"] > 0  # the model's whole context
    assert 4.0 < m["bits_per_weight"] < 16.0 and m["bits"] == 4  # fp32 embeddings and head count too
    assert {c["gate"] for c in m["verdict"]["checks"]} >= {"max_ppl_delta_pct", "max_kl", "min_top1"}
    # the baseline was cached: a second artifact reuses it (and gets the same baseline perplexity)
    again = validate(w4, REF_MODEL, HELDOUT, max_tokens=TOKENS, baseline_cache=tmp_path / "base.safetensors")
    assert again["runtime"] == "torch (dequantized)" and again["baseline_ppl"] == pytest.approx(m["baseline_ppl"])
    assert again["kl"] == pytest.approx(m["kl"], rel=0.05)


def test_gguf_is_measured_in_llama_cpp_and_matches_torch(w4, tmp_path):
    """Q4_0 packed from our codes: llama.cpp's perplexity equals torch's on the same weights within 1 %."""
    art = export(w4, "gguf", tmp_path / "gguf", gguf_type="Q4_0")
    cache = tmp_path / "base.safetensors"
    ours = validate(art, REF_MODEL, HELDOUT, max_tokens=TOKENS, baseline_cache=cache)
    torch_side = validate(w4, REF_MODEL, HELDOUT, max_tokens=TOKENS, baseline_cache=cache)
    assert ours["runtime"] == "llama.cpp" and ours["bits"] == 4 and ours["verdict"]["passed"], ours["verdict"]
    assert abs(ours["ppl"] / torch_side["ppl"] - 1) < 0.01, (ours["ppl"], torch_side["ppl"])
    assert ours["top1"] > 0.95 and ours["long_ctx"] == 1024


@pytest.mark.parametrize("fmt,runtime,opts", [("onnx", "onnxruntime", {}), ("mlx", "MLX (mlx-lm)", {"dtype": "float32"})])
def test_onnx_and_mlx_are_measured_in_their_runtimes(w4, tmp_path, fmt, runtime, opts):
    art = export(w4, fmt, tmp_path / fmt, **opts)
    m = validate(art, REF_MODEL, HELDOUT, max_tokens=1024, long_ctx=1024, baseline_cache=tmp_path / "b.safetensors")
    ref = validate(w4, REF_MODEL, HELDOUT, max_tokens=1024, long_ctx=1024, baseline_cache=tmp_path / "b.safetensors")
    assert m["runtime"] == runtime and m["verdict"]["passed"], m["verdict"]
    assert abs(m["ppl"] / ref["ppl"] - 1) < 1e-3 and abs(m["kl"] - ref["kl"]) < 1e-4


def test_broken_artifact_fails_every_gate_with_reasons(w4, tmp_path):
    """Scales multiplied by 64 in one layer (structurally valid, so not refused up front as zero scales are; its
    weights are wrong): every gate must fail, each with its reason."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(w4, broken)
    shard = next(f for f in sorted(broken.glob("*.safetensors")) if "model.layers.0.mlp.down_proj.qscale" in load_file(f))
    state = load_file(shard)
    for name in state:
        if name.startswith("model.layers.0.") and name.endswith(".qscale"):
            state[name] = state[name] * 64
    save_file(state, shard, metadata={"format": "pt"})
    out = tmp_path / "v.json"
    res = CliRunner().invoke(app, ["validate", str(broken), "--baseline", str(REF_MODEL), "--text", str(HELDOUT),
                                   "--max-tokens", str(TOKENS), "--json", str(out)])
    assert res.exit_code == 3, res.output
    m = json.loads(out.read_text())
    checks = m["verdict"]["checks"]
    assert not m["verdict"]["passed"] and checks and all(not c["passed"] for c in checks), checks
    assert len(m["verdict"]["reasons"]) == len(checks) and "gate failed" in res.output
    assert m["kl"] > 0.1 and m["ppl_delta_pct"] > 5


def test_pareto_front():
    from turboquant.quality.report import pareto_front

    pts = [(10, 5.0), (5, 6.0), (7, 5.5), (8, 7.0), (20, 4.0), (6, 6.5)]
    assert pareto_front(pts) == [1, 2, 0, 4]


def test_report_tables_every_artifact_with_plots(w4, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(w4, run / "quantized" / "rtn-w4-g32")
    for fmt in ("gptq", "awq"):
        art = export(w4, fmt, run / "artifacts" / fmt)
        m = validate(art, REF_MODEL, HELDOUT, max_tokens=2048, baseline_cache=run / "baseline.safetensors")
        (run / "eval").mkdir(exist_ok=True)
        (run / "eval" / f"{fmt}.json").write_text(json.dumps(m))
    failing = json.loads((run / "eval" / "awq.json").read_text())
    failing["verdict"] = {"passed": False, "reasons": ["mean KL divergence 0.5 exceeds 0.1"], "checks": []}
    (run / "eval" / "awq.json").write_text(json.dumps(failing))
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    md = (run / "report.md").read_text()
    assert "| gptq | gptq | transformers + GPTQModel | 4 |" in md and "| pass |" in md
    assert "FAIL: mean KL divergence 0.5 exceeds 0.1" in md and "1 of 2 artifacts passed" in md
    for png in ("size_vs_perplexity.png", "layer_error.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "src=\"http" not in page and "FAIL: mean KL" in page
    shot = render_in_chromium(run / "report.html", tmp_path / "report.png")
    assert [alt for alt, _, _ in shot["images"]] == ["size_vs_perplexity", "layer_error"], shot
    assert all(complete and width > 100 for _, complete, width in shot["images"]), shot  # every plot decoded
    assert "FAIL: mean KL" in shot["text"] and "1 of 2 artifacts passed" in shot["text"]
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot["height"] > 300


def render_in_chromium(page: Path, screenshot: Path) -> dict:
    """Open ``page`` in headless Debian Chromium (the Makefile installs it), save a screenshot, and report every
    image's load state (``complete`` and its decoded width: 0 for a broken image) and the page's text."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver_bin, "chromium / chromedriver are missing: run `make install` (Debian packages)"
    options = Options()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    try:
        driver.get(page.resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        text = driver.execute_script("return document.body.innerText")
        height = driver.execute_script("return document.body.scrollHeight")
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    return {"images": images, "text": text, "height": height}
