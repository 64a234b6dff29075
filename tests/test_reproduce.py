"""Byte-identical rebuilds on CPU: every method quantizes and every native writer exports to the same bytes twice,
and `turboquant reproduce` rebuilds an artifact from its manifest, file by file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import CALIB
from turboquant.io.calibration import CalibrationRecipe, build_calibration
from turboquant.cli import app
from turboquant.formats import export
from turboquant.fsutil import sha256_file
from turboquant.io.manifest import file_hashes
from turboquant.methods import make_config
from turboquant.io.calibration import load_calibration
from turboquant.io.provenance import md5_file
from turboquant.quantize.pipeline import quantize

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {
    "rtn": dict(bits=4, group_size=32),
    "gptq": dict(bits=4, group_size=32),
    "awq": dict(bits=4, group_size=32, search_samples=2, grid=4, clip_grid=4, clip_tokens=32),
    "hqq": dict(bits=4, group_size=32, iters=4),
}
#: (format, options) each native writer, from the checkpoint whose scheme it holds.
WRITERS = {"gguf": ("rtn", {"gguf_type": "Q4_0"}), "gptq": ("gptq", {}), "awq": ("awq", {}),
           "compressed-tensors": ("gptq", {}), "mlx": ("hqq", {})}


@pytest.fixture(scope="module")
def calib_file(tiny_model, tmp_path_factory) -> Path:
    recipe = CalibrationRecipe(sources=(str(CALIB / "tiny.txt"),), n_samples=4, seqlen=32)
    return build_calibration(recipe, tiny_model).save(tmp_path_factory.mktemp("calib") / "calibration.safetensors")


@pytest.fixture(scope="module")
def builds(tiny_model, calib_file, tmp_path_factory):
    """Each method quantized twice, each writer exported twice (from the two checkpoints)."""
    root = tmp_path_factory.mktemp("twice")
    out: dict[str, tuple[Path, Path]] = {}
    for method, opts in METHODS.items():
        pair = []
        for run in ("a", "b"):
            calib = load_calibration(calib_file) if method in ("gptq", "awq") else None
            pair.append(quantize(tiny_model, make_config(method, **opts), root / run / method, calib=calib,
                                 progress=False))
        out[method] = tuple(pair)
    for fmt, (method, options) in WRITERS.items():
        out[f"fmt:{fmt}"] = tuple(export(q, fmt, q.parent / f"{method}-{fmt}", **options) for q in out[method])
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_quantize_byte_identically(builds, method):
    a, b = builds[method]
    assert file_hashes(a) == file_hashes(b)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_native_writers_export_byte_identically(builds, fmt):
    a, b = builds[f"fmt:{fmt}"]
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["files"] == mb["files"] and ma["files"] == {k: v for k, v in file_hashes(b).items()}


def test_manifest_records_calibration_md5_and_versions(builds, calib_file):
    m = json.loads((builds["fmt:gptq"][0] / "manifest.json").read_text())
    assert m["calibration"]["dvc_md5"] == md5_file(calib_file) and m["calibration"]["recipe"]["n_samples"] == 4
    assert m["format"] == "gptq" and m["method"] == "gptq" and m["seed"] == 0
    assert set(m["libraries"]) >= {"torch", "transformers", "gguf", "llama_cpp_python"}
    assert m["machine"]["device"] == "cpu" and m["code"]["git_sha"]


def test_reproduce_from_manifest_is_identical_and_catches_tampering(builds, tmp_path, monkeypatch):
    art = builds["fmt:gguf"][0]
    monkeypatch.chdir(art.parent)
    res = CliRunner().invoke(app, ["reproduce", str(art / "manifest.json"), "--no-pull", "--out", str(tmp_path / "re")])
    assert res.exit_code == 0, res.output
    assert "DIFFERENT" not in res.output and "files identical" in res.output
    # a manifest whose recorded sha256 no longer matches: DIFFERENT, with the numeric difference to the copy on disk
    m = json.loads((art / "manifest.json").read_text())
    gguf_name = next(n for n in m["files"] if n.endswith(".gguf"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in m["files"]:
        (bad / name).write_bytes((art / name).read_bytes())
    m["files"][gguf_name]["sha256"] = "0" * 64
    m["libraries"]["torch"] = "0.0-recorded"
    (bad / "manifest.json").write_text(json.dumps(m))
    res = CliRunner().invoke(app, ["reproduce", str(bad / "manifest.json"), "--no-pull"])
    assert res.exit_code == 4, res.output
    assert f"DIFFERENT" in res.output and gguf_name in res.output and "may not be bit-exact" in res.output


def test_reproduce_refuses_a_changed_model(builds, tiny_model_copy, tmp_path):
    art = builds["fmt:gptq"][0]
    m = json.loads((art / "manifest.json").read_text())
    (tiny_model_copy / "config.json").write_text((tiny_model_copy / "config.json").read_text() + "\n")
    res = CliRunner().invoke(app, ["reproduce", str(art / "manifest.json"), "--model", str(tiny_model_copy),
                                   "--no-pull"])
    assert res.exit_code == 2 and "does not match the manifest" in res.output
    assert m["source"]["content_sha256"] and sha256_file(art / "manifest.json")


@pytest.mark.parametrize("how", ["data", "calib"])
def test_cli_artifacts_reproduce_from_another_working_directory(tiny_model, tmp_path, monkeypatch, how):
    """An artifact made by plain CLI calls in one directory — calibration built on the fly with --data, or a file
    passed with a relative --calib — rebuilds byte-identically from another directory (the model, the data and
    the calibration file are found by their recorded hashes, not by the old working directory)."""
    import shutil

    made, elsewhere = tmp_path / "made", tmp_path / "elsewhere"
    made.mkdir()
    elsewhere.mkdir()
    shutil.copytree(tiny_model, made / "model")
    shutil.copyfile(CALIB / "tiny.txt", made / "tiny.txt")
    monkeypatch.chdir(made)
    recipe = ["--n-samples", "4", "--seqlen", "32"]
    if how == "calib":
        r = CliRunner().invoke(app, ["calibrate", "model", "--data", "tiny.txt", *recipe, "--out", "calib.safetensors"])
        assert r.exit_code == 0, r.output
        source = ["--calib", "calib.safetensors"]
    else:
        source = ["--data", "tiny.txt", *recipe]
    r = CliRunner().invoke(app, ["quantize", "model", "--method", "gptq", "--bits", "4", "--group-size", "32",
                                 *source, "--out", "q", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["export", "q", "--format", "gptq", "--out", "art"])
    assert r.exit_code == 0, r.output
    recorded = json.loads((made / "art" / "manifest.json").read_text())
    assert recorded["source"]["path"] == "model" and recorded["calibration"]["recipe"]["sources"] == ["tiny.txt"]
    assert bool(recorded["calibration"].get("file")) == (how == "calib")
    monkeypatch.chdir(elsewhere)
    r = CliRunner().invoke(app, ["reproduce", str(made / "art" / "manifest.json"), "--no-pull"])
    assert r.exit_code == 0, r.output
    n = len(recorded["files"])
    assert f"{n} of {n} files identical" in r.output and "DIFFERENT" not in r.output
    # a changed calibration source is caught by its hash, not silently used
    (made / "tiny.txt").write_text((made / "tiny.txt").read_text() + "more text\n")
    if how == "calib":
        (made / "calib.safetensors").write_bytes(b"")
    r = CliRunner().invoke(app, ["reproduce", str(made / "art" / "manifest.json"), "--no-pull"])
    assert r.exit_code == 2 and ("tiny.txt" in r.output or "calib.safetensors" in r.output), r.output
