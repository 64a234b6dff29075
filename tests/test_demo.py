"""The demo plan: the whole product (calibration, GPTQ + AWQ + RTN, five formats in their runtimes, gates, report)
on the bundled model, every combination possible on its real shapes; a tiny model stands in, said aloud, when
../shared is absent. The run itself is `make demo` (timed in the README); the flow is tested in test_flow.py."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REF_MODEL
from turboquant import demo
from turboquant.pipeline.plan import Plan

REQUIRED_FORMATS = {"gguf", "gptq", "awq", "mlx", "compressed-tensors"}


def test_demo_plan_covers_every_method_and_format_and_is_possible(tmp_path):
    params, notes = demo.demo_plan(tmp_path, model=REF_MODEL)
    plan = Plan.from_yaml(params)
    assert notes == []
    assert {q.config.method for q in plan.quantize} == {"gptq", "awq", "rtn"}
    assert {t.format for q in plan.quantize for t in q.formats} == REQUIRED_FORMATS
    assert plan.calibration.n_samples == 32 and plan.evaluation.max_tokens == 4096
    assert Path(plan.evaluation.text).is_file() and all(Path(d).is_file() for d in plan.calibration.data)
    results = plan.check_formats(REF_MODEL)
    assert len(results) == 6 and [err for _, _, err in results] == [None] * 6


def test_demo_without_shared_builds_a_tiny_model_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEFAULT_MODEL", tmp_path / "absent")
    monkeypatch.setattr(demo, "DEFAULT_TEXT", tmp_path / "absent.txt")
    monkeypatch.setattr(demo, "DEFAULT_CALIB", (tmp_path / "absent-calib.txt",))
    params, notes = demo.demo_plan(tmp_path / "out")
    plan = Plan.from_yaml(params)
    assert len(notes) == 1 and "tiny random Llama" in notes[0]
    assert (Path(plan.models[0].id) / "config.json").is_file()
    assert plan.calibration.data == (plan.evaluation.text,) and Path(plan.evaluation.text).stat().st_size > 10_000
    assert [err for _, _, err in plan.check_formats(Path(plan.models[0].id))] == [None] * 6


def test_verdict_table_rows_carry_metrics_and_reasons(tmp_path):
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"runtime": "llama.cpp", "bits_per_weight": 4.5, "ppl": 38.1, "ppl_delta_pct": 0.2,
                              "kl": 0.00123, "top1": 0.97,
                              "speed": {"artifact": {"decode_tok_s": 412.3}, "decode_speedup": 1.61}}))
    table = demo.verdict_table([
        {"artifact": str(tmp_path / "gptq-w4-g32-gguf-Q4_0"), "passed": True, "reasons": [], "validation": str(ok)},
        {"artifact": str(tmp_path / "awq-w4-g128-asym-awq"), "passed": False, "reasons": ["kl 0.2 > 0.1"]},
    ])
    lines = table.splitlines()
    assert len(lines) == 4
    assert "| gptq-w4-g32-gguf-Q4_0 | llama.cpp | 4.50 | 38.100 (+0.20) | 0.00123 | 0.9700 | 412 (1.61×) | PASS |" \
        == lines[2]
    assert lines[3].startswith("| awq-w4-g128-asym-awq | — |") and lines[3].endswith("FAIL: kl 0.2 > 0.1 |")
