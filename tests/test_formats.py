"""Export formats: layout conformance of the GPTQ and AWQ writers, up-front refusals, manifest, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.cli import app
from turboquant.formats import FormatError, export
from turboquant.fsutil import sha256_file
from turboquant.methods import make_config
from turboquant.quantize.pipeline import quantize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qdirs(tiny_model, tmp_path_factory):
    """Canonical checkpoints of the tiny model under a few schemes."""
    root = tmp_path_factory.mktemp("q")
    specs = {
        "w4g32sym": ("rtn", dict(bits=4, group_size=32, symmetric=True)),
        "w4g32asym": ("rtn", dict(bits=4, group_size=32, symmetric=False)),
        "w3g32sym": ("rtn", dict(bits=3, group_size=32, symmetric=True)),
        "w8chan": ("rtn", dict(bits=8, group_size=-1, symmetric=True)),
        "w4chan": ("rtn", dict(bits=4, group_size=-1, symmetric=True)),
        "hqq": ("hqq", dict(bits=4, group_size=32)),
        "fp16": ("fp16", {}),
    }
    return {k: quantize(tiny_model, make_config(m, **kw), root / k, progress=False) for k, (m, kw) in specs.items()}


def _load_all(out):
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _bits_of_words(words: np.ndarray) -> np.ndarray:
    """int32 words → their bits, least significant first, word after word."""
    return np.unpackbits(words.astype("<i4").view(np.uint8), bitorder="little")


def _stream_codes(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Codes of ``bits`` bits read LSB-first from a continuous stream of int32 words (AutoGPTQ's packing)."""
    b = _bits_of_words(words)[: n * bits].reshape(n, bits)
    return (b * (1 << np.arange(bits))).sum(1)


@pytest.mark.parametrize("key,bits", [("w4g32sym", 4), ("w3g32sym", 3), ("w8chan", 8), ("w4g32asym", 4)])
def test_gptq_layout_matches_autogptq(qdirs, tmp_path, key, bits):
    fmt = "gptq_v2" if key == "w4g32asym" else "gptq"
    try:
        out = export(qdirs[key], "gptq", tmp_path / "gptq", checkpoint_format=fmt)
    except FormatError as e:  # v1 asym refuses zero points of 0 — then v2 must be what it names
        pytest.fail(str(e))
    ckpt = QuantizedCheckpoint.open(qdirs[key])
    state = _load_all(out)
    module = "model.layers.1.mlp.down_proj"
    qt = ckpt.quantized_tensor(module)
    out_f, in_f = qt.shape
    qweight, qzeros = state[f"{module}.qweight"].numpy(), state[f"{module}.qzeros"].numpy()
    assert qweight.dtype == np.int32 and qweight.shape == (in_f * bits // 32, out_f)
    for col in (0, 5, out_f - 1):
        assert np.array_equal(_stream_codes(qweight[:, col], bits, in_f), qt.codes[col].numpy())
    G = qt.scale.shape[1]
    assert qzeros.shape == (G, out_f * bits // 32)
    offset = 1 if fmt == "gptq" else 0
    for g in range(G):
        stored = _stream_codes(qzeros[g], bits, out_f)
        assert np.array_equal(stored, (qt.zero[:, g].numpy().astype(int) - offset) % (1 << bits))
    assert torch.equal(state[f"{module}.scales"], qt.scale.t())
    assert torch.equal(state[f"{module}.g_idx"], qt.group_index().int())
    # dequantizing the artifact by the GPTQ formula gives the canonical weights exactly
    codes = torch.from_numpy(np.stack([_stream_codes(qweight[:, c], bits, in_f) for c in range(out_f)]))
    zeros = torch.from_numpy(np.stack([_stream_codes(qzeros[g], bits, out_f) for g in range(G)])) + offset
    gi = state[f"{module}.g_idx"].long()
    W = (codes.float() - zeros.t().float()[:, gi]) * state[f"{module}.scales"].t().float()[:, gi]
    assert torch.equal(W, qt.dequantize(torch.float32))
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == bits and q["checkpoint_format"] == fmt
    assert q["group_size"] == (32 if "g32" in key else -1) and q["sym"] == ("asym" not in key)
    assert json.loads((out / "quantize_config.json").read_text()) == q
    assert "model.norm.weight" in state and "model.layers.0.self_attn.q_proj.weight" not in state


def test_gptq_v1_refuses_zero_points_of_zero(tiny_model_copy, tmp_path):
    """A group of only positive weights has zero point 0 (asymmetric), which v1 cannot store as zero - 1."""
    from safetensors.torch import save_file

    path = tiny_model_copy / "model.safetensors"
    state = load_file(path)
    state["model.layers.0.self_attn.q_proj.weight"][0].abs_()
    save_file(state, path, metadata={"format": "pt"})
    q = quantize(tiny_model_copy, make_config("rtn", bits=4, group_size=32, symmetric=False), tmp_path / "q",
                 progress=False)
    assert int((QuantizedCheckpoint.open(q).quantized_tensor("model.layers.0.self_attn.q_proj").zero == 0).sum())
    with pytest.raises(FormatError, match="checkpoint_format=gptq_v2"):
        export(q, "gptq", tmp_path / "v1")
    assert not (tmp_path / "v1").exists()
    assert (export(q, "gptq", tmp_path / "v2", checkpoint_format="gptq_v2") / "config.json").is_file()


def _awq_unpack(words: np.ndarray) -> np.ndarray:
    """AutoAWQ's unpack: nibble i of each word is output column 8k + [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    w = words.astype(np.int64) & 0xFFFFFFFF
    nib = (w[..., None] >> (4 * np.arange(8))) & 0xF
    out = np.empty_like(nib)
    out[..., [0, 2, 4, 6, 1, 3, 5, 7]] = nib
    return out.reshape(words.shape[0], -1)


@pytest.mark.parametrize("key", ["w4g32sym", "w4g32asym"])
def test_awq_layout_matches_autoawq(qdirs, tmp_path, key):
    out = export(qdirs[key], "awq", tmp_path / "awq")
    ckpt = QuantizedCheckpoint.open(qdirs[key])
    state = _load_all(out)
    for module in ckpt.modules:
        qt = ckpt.quantized_tensor(module)
        out_f, in_f = qt.shape
        qweight = state[f"{module}.qweight"].numpy()
        assert qweight.dtype == np.int32 and qweight.shape == (in_f, out_f // 8)
        assert np.array_equal(_awq_unpack(qweight), qt.codes.t().numpy())
        assert np.array_equal(_awq_unpack(state[f"{module}.qzeros"].numpy()), qt.zero.t().numpy())
        assert torch.equal(state[f"{module}.scales"], qt.scale.t())
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True,
                 "modules_to_not_convert": None}


@pytest.mark.parametrize("key,fmt,needle", [
    ("w3g32sym", "awq", "4-bit codes only"),
    ("w8chan", "awq", "4-bit codes only"),
    ("w4chan", "awq", "--group-size 128"),
    ("hqq", "awq", "fractional zero points"),
    ("hqq", "gptq", "integer_zero=true"),
    ("fp16", "gptq", "holds no quantized weights"),
])
def test_impossible_combinations_fail_before_any_work(qdirs, tmp_path, key, fmt, needle):
    with pytest.raises(FormatError, match=needle):
        export(qdirs[key], fmt, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


def test_unknown_format_and_option_list_the_valid_ones(qdirs, tmp_path):
    with pytest.raises(Exception, match="use one of: .*gptq"):
        export(qdirs["w4g32sym"], "tflite", tmp_path / "x")
    with pytest.raises(Exception, match=r"use only its options \(checkpoint_format\)"):
        export(qdirs["w4g32sym"], "gptq", tmp_path / "x", desc_act=True)


def test_manifest_and_carried_files(qdirs, tmp_path, tiny_model):
    out = export(qdirs["w4g32sym"], "gptq", tmp_path / "g")
    manifest = json.loads((out / "manifest.json").read_text())
    files = {p.name for p in out.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for name, info in manifest["files"].items():
        assert info["sha256"] == sha256_file(out / name) and info["size"] == (out / name).stat().st_size
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= files
    assert (out / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()
    assert manifest["format"] == "gptq" and manifest["method"] == "rtn"
    assert manifest["schemes"] == [{"bits": 4, "group_size": 32, "symmetric": True}]
    assert manifest["source"]["path"] == str(tiny_model)


def test_manifest_verification_names_a_modified_file(qdirs, tmp_path):
    from turboquant.io.manifest import verify_files

    out = export(qdirs["w4g32sym"], "awq", tmp_path / "a")
    assert set(verify_files(out).values()) == {"ok"}
    shard = sorted(out.glob("*.safetensors"))[0]
    with shard.open("r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    (out / "extra.txt").write_text("x")
    verdict = verify_files(out)
    assert verdict[shard.name] == "modified" and verdict["extra.txt"] == "unlisted"
    assert sum(v == "modified" for v in verdict.values()) == 1


def test_cli_export_and_formats(qdirs, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(qdirs["w4g32sym"]), "--format", "awq", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "model.safetensors.index.json").is_file()
    res = runner.invoke(app, ["export", str(qdirs["w3g32sym"]), "--format", "awq", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "4-bit codes only" in res.output and not (tmp_path / "b").exists()
    res = runner.invoke(app, ["export", str(qdirs["w4g32sym"]), "--format", "awq", "--gguf-type", "Q4_0",
                              "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "--gguf-type applies to --format gguf" in res.output
    res = runner.invoke(app, ["formats"])
    assert res.exit_code == 0 and "gptq" in res.output and "awq" in res.output
