import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from turboquant.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", [[], ["quantize"], ["eval"], ["methods"], ["demo"]])
def test_help_on_every_command(command):
    r = run(*command, "--help")
    assert r.exit_code == 0 and "Usage" in r.output


def test_methods_lists_registry():
    r = run("methods")
    assert r.exit_code == 0
    assert {line.split()[0] for line in r.output.splitlines()} >= {"fp16", "bf16", "rtn"}


def test_quantize_then_eval_with_baseline(tmp_path, tiny_model, heldout_text):
    out = tmp_path / "q"
    r = run("quantize", tiny_model, "--method", "rtn", "--bits", "4", "--group-size", "32", "--asym",
            "--option", "mse_clip=true", "--out", out)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "turboquant.json").read_text())
    assert meta["config"]["mse_clip"] is True and meta["scheme"]["symmetric"] is False
    js = tmp_path / "eval.json"
    r = run("eval", out, "--text", heldout_text, "--ctx", "128", "--max-tokens", "600", "--baseline", tiny_model,
            "--json", js)
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    assert {"ppl", "baseline_ppl", "ppl_delta_pct", "kl", "top1"} <= set(data)
    assert data["kl"] > 0 and 0.5 < data["top1"] <= 1 and data["n_windows"] == 4
    assert "KL" in r.output


def test_quantize_prints_a_progress_line_per_block_when_stderr_is_not_a_terminal(tmp_path, tiny_model):
    import re

    r = subprocess.run([sys.executable, "-m", "turboquant.cli", "quantize", str(tiny_model), "--method", "rtn",
                        "--bits", "4", "--group-size", "32", "--out", str(tmp_path / "q")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    n_layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    assert len(lines) == n_layers + 1, lines  # every block, then the embeddings / head shard
    pattern = r"turboquant: progress: rtn q: shard (\d+)/(\d+) done in [\d.]+ s \([\d.]+ s total\)"
    assert [re.fullmatch(pattern, ln).groups() for ln in lines] == [
        (str(i), str(n_layers + 1)) for i in range(1, n_layers + 2)]
    quiet = subprocess.run([sys.executable, "-m", "turboquant.cli", "quantize", str(tiny_model), "--method", "rtn",
                            "--bits", "4", "--group-size", "32", "--no-progress", "--out", str(tmp_path / "q2")],
                           capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.startswith("wrote ")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--bits", "9"], "bits=9 is out of range"),
        (["--group-size", "48"], "group_size=48 is not a valid group size"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "fp16", "--bits", "4"], "method 'fp16' takes no --bits"),
        (["--option", "mse_grid"], "is not key=value"),
        (["--option", "colour=blue"], "unknown option(s) colour for method"),
    ],
)
def test_bad_quantize_input_is_one_line_error_and_no_output(tmp_path, tiny_model, args, needle):
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "turboquant.cli", "quantize", str(tiny_model), "--out", str(out), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Fix:" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_model_is_one_line_error(tmp_path):
    r = run("quantize", "org/../../etc", "--out", tmp_path / "q")
    assert r.exit_code == 2
    assert "nor a valid Hub repo id" in r.output


def test_eval_missing_text(tiny_model, tmp_path):
    r = run("eval", tiny_model, "--text", tmp_path / "none.txt")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_calibrate_then_gptq_quantize(tmp_path, tiny_model):
    from turboquant.io.calibration import CalibrationSet

    from conftest import CALIB

    calib = tmp_path / "calib.safetensors"
    r = run("calibrate", tiny_model, "--data", CALIB / "tiny.txt", "--n-samples", "4", "--seqlen", "64", "--out", calib)
    assert r.exit_code == 0, r.output
    assert CalibrationSet.load(calib).input_ids.shape == (4, 64) and "4 windows x 64 tokens" in r.output
    out = tmp_path / "g"
    r = run("quantize", tiny_model, "--method", "gptq", "--group-size", "32", "--calib", calib, "--out", out,
            "--option", "act_order=true")
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "turboquant.json").read_text())
    assert meta["method"] == "gptq" and meta["config"]["act_order"] is True
    assert meta["calibration"]["recipe"]["n_samples"] == 4
    r = run("quantize", tiny_model, "--method", "gptq", "--group-size", "32", "--out", tmp_path / "none")
    assert r.exit_code == 2 and "needs calibration data" in r.output and not (tmp_path / "none").exists()
