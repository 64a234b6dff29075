"""The plan: strict params.yaml parsing and every impossible (scheme, format) combination caught before work."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from conftest import CALIB, REF_MODEL
from turboquant.cli import app
from turboquant.errors import ConfigError
from turboquant.pipeline.plan import Plan


def _params(tmp_path, quantize, **extra):
    data = {"models": [{"id": str(REF_MODEL)}], "calibration": {"data": [str(CALIB / "wiki.txt")]},
            "quantize": quantize, **extra}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_plan_expands_and_names_default_labels(tmp_path):
    p = Plan.from_yaml(_params(tmp_path, [
        {"method": "gptq", "options": {"bits": 4, "group_size": 32}, "formats": ["gptq", {"format": "gguf", "gguf_type": "Q4_0"}]},
        {"name": "hqq3", "method": "hqq", "options": {"bits": 3, "group_size": 64}, "formats": ["mlx"]},
    ]))
    assert [q.name for q in p.quantize] == ["gptq-w4-g32", "hqq3"]
    assert [t.label for t in p.quantize[0].formats] == ["gptq", "gguf-Q4_0"]
    assert all(err is None for _, _, err in p.check_formats(REF_MODEL))


@pytest.mark.parametrize("quant,label,needle", [
    ({"method": "rtn", "options": {"bits": 3, "group_size": 32}, "formats": ["awq"]}, "awq", "4-bit codes only"),
    ({"method": "rtn", "options": {"bits": 4, "group_size": 128}, "formats": [{"format": "gguf", "gguf_type": "Q4_0"}]},
     "gguf-Q4_0", "expand_groups=true"),
    ({"method": "gptq", "options": {"bits": 4, "group_size": 128, "act_order": True, "static_groups": False},
      "formats": ["awq"]}, "awq",
     "act-order"),
    ({"method": "hqq", "options": {"bits": 4, "group_size": 64}, "formats": ["gptq"]}, "gptq", "integer_zero"),
    ({"method": "rtn", "options": {"bits": 3, "group_size": 64}, "formats": ["onnx"]}, "onnx", "MatMulNBits"),
    ({"method": "rtn", "options": {"bits": 4, "group_size": 16}, "formats": ["mlx"]}, "mlx", "MLX groups"),
])
def test_impossible_combinations_fail_in_the_plan(tmp_path, quant, label, needle):
    p = Plan.from_yaml(_params(tmp_path, [quant]))
    (name, got, err), = p.check_formats(REF_MODEL)
    assert got == label and err is not None and needle in str(err), err
    res = CliRunner().invoke(app, ["plan", str(tmp_path / "params.yaml")])
    assert res.exit_code == 2 and "cannot be made" in res.output and needle in res.output
    assert len([ln for ln in res.output.splitlines() if ln.startswith("turboquant: error")]) == 1


@pytest.mark.parametrize("data,needle", [
    ({"models": [{"id": "x"}], "quantize": [{"method": "rtn", "formats": ["gptq"]}], "colour": 1}, "unknown key(s) colour"),
    ({"models": [], "quantize": [{"method": "rtn", "formats": ["gptq"]}]}, "'models' is empty"),
    ({"models": ["x"], "quantize": [{"method": "rtn", "options": {"bits": 9}, "formats": ["gptq"]}]}, "bits"),
    ({"models": ["x"], "quantize": [{"method": "rtn", "options": {"bitz": 4}, "formats": ["gptq"]}]}, "bitz"),
    ({"models": ["x"], "quantize": [{"method": "gptq", "formats": ["gptq"]}]}, "calibration.data is empty"),
    ({"models": ["x"], "quantize": [{"method": "rtn", "formats": []}]}, "lists no formats"),
    ({"models": ["x"], "quantize": [{"method": "rtn", "formats": ["gptq"]}], "gates": {"max_kl": -1}}, "max_kl"),
    ({"models": ["x"], "quantize": [{"method": "rtn", "formats": ["gptq"]}, {"method": "rtn", "formats": ["awq"]}]},
     "names repeat"),
])
def test_bad_params_are_rejected_with_the_fix(data, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Plan.from_dict(data)


def test_the_repository_params_yaml_is_a_valid_plan(monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # its paths are relative to the repository, as `turboquant run` is started there
    p = Plan.from_yaml(root / "params.yaml")
    results = p.check_formats(Path(p.models[0].id))
    assert len(results) == 9 and all(err is None for _, _, err in results), [e for *_, e in results if e]


def test_a_mixed_precision_plan_is_checked_against_every_candidate_width(tmp_path, tiny_model):
    """Per-layer widths are chosen only after measuring, so every candidate width is planned on some layer: the
    GPTQ layout (no 6-bit codes) and AWQ (one scheme per model) fail up front, compressed-tensors passes."""
    plan = Plan.from_dict({
        "models": [{"id": str(tiny_model)}],
        "calibration": {"data": [str(CALIB / "tiny.txt")]},
        "quantize": [{"method": "mixed", "options": {"base": "gptq", "target_bpw": 3.6, "group_size": 32},
                      "formats": ["gptq", "awq", "compressed-tensors"]}],
    })
    verdicts = {label: err for _, label, err in plan.check_formats(tiny_model)}
    assert "6-bit" in verdicts["gptq"].problem and "--candidate-bits 2,3,4,8" in verdicts["gptq"].fix
    assert "mixes schemes" in verdicts["awq"].problem
    assert verdicts["compressed-tensors"] is None
    with pytest.raises(ConfigError, match="calibration.data is empty"):
        Plan.from_dict({"models": [{"id": str(tiny_model)}],
                        "quantize": [{"method": "mixed", "options": {"base": "rtn"}, "formats": ["mlx"]}]})
