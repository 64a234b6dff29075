"""Device execution without an accelerator: the device code path on ``device="cpu"`` with the activation budget
forced to zero (every activation offloaded to host memory and fetched back) gives the same bytes as the default,
every tensor is where the store says, and a bad device or budget is a one-line error."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from turboquant.device import ActivationStore, parse_size, resolve_budget, resolve_device, to_device
from turboquant.errors import ConfigError
from turboquant.io.calibration import CalibrationRecipe, build_calibration
from turboquant.io.model import open_model
from turboquant.methods import make_config
from turboquant.methods.mixed import MixedPrecisionConfig
from turboquant.quantize.pipeline import quantize
from turboquant.quantize.runner import BlockRunner

from conftest import CALIB, REF_MODEL


def _tensor_hash(ckpt) -> str:
    h = hashlib.sha256()
    for f in sorted(ckpt.glob("*.safetensors")):
        t = load_file(f)
        for k in sorted(t):
            h.update(k.encode())
            h.update(t[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def calib():
    return build_calibration(CalibrationRecipe(sources=(str(CALIB / "tiny.txt"),), n_samples=6, seqlen=32), REF_MODEL)


@pytest.mark.parametrize("method,options", [("gptq", {}), ("gptq", {"true_sequential": False}), ("awq", {}),
                                            ("rtn", {}), ("mixed", {})])
def test_offloaded_activations_give_the_same_bytes(tiny_model, calib, tmp_path, method, options):
    if method == "mixed":
        cfg = MixedPrecisionConfig.wrap(make_config("gptq", bits=4, group_size=32), 4.5, (2, 4, 8))
    else:
        cfg = make_config(method, bits=4, group_size=32, **options)
    kw = dict(calib=calib, progress=False, batch_size=4)
    default = quantize(tiny_model, cfg, tmp_path / "default", **kw)
    offloaded = quantize(tiny_model, cfg, tmp_path / "offloaded", device="cpu", activation_budget=0, **kw)
    assert _tensor_hash(default) == _tensor_hash(offloaded)
    assert (default / "model.safetensors.index.json").read_bytes() == \
        (offloaded / "model.safetensors.index.json").read_bytes()


def test_every_tensor_is_placed_as_the_budget_says(tiny_model, calib):
    opened = open_model(tiny_model)
    hidden_bytes = 6 * 32 * 64 * 4  # n_samples x seqlen x hidden, float32
    store = ActivationStore(torch.device("cpu"), budget=hidden_bytes)  # room for the inputs, not the outputs
    runner = BlockRunner.start(opened, calib.input_ids, batch_size=4, store=store)
    assert store.placements == [("hidden", "device")] and store.resident_bytes == hidden_bytes
    block = runner.load_block(0)
    assert {p.device.type for p in block.parameters()} == {"cpu"} and not any(p.is_meta for p in block.parameters())
    out = runner.forward(block)
    assert store.placements[-1] == ("block output", "host") and out.shape == runner.hidden.shape
    stats = runner.capture(block, ["self_attn.q_proj"])
    assert stats["self_attn.q_proj"].H.device == runner.device and stats["self_attn.q_proj"].n == 6 * 32
    runner.advance(out)  # the old inputs are released: the budget is free again
    assert store.resident_bytes == 0
    again = store.keep(torch.zeros(6, 32, 64), "hidden")
    assert store.placements[-1] == ("hidden", "device") and store.resident_bytes == hidden_bytes
    del again
    assert store.resident_bytes == 0


def test_to_device_keeps_a_shared_tensor_shared():
    mask = torch.ones(1, 1, 4, 4)
    calls = [{"attention_mask": mask, "position_embeddings": (mask, mask)}, {"attention_mask": mask}]
    moved = to_device(calls, torch.device("cpu"))
    assert moved[0]["attention_mask"] is moved[1]["attention_mask"] is moved[0]["position_embeddings"][0]


@pytest.mark.parametrize("spec,message", [
    ("gpu", "device 'gpu' is not a device name"),
    ("cuda:7", "device 'cuda:7' was asked for but torch"),
    ("cuda", "device 'cuda' was asked for but torch"),
])
def test_a_device_this_machine_lacks_is_refused(spec, message):
    if torch.cuda.is_available() and spec.startswith("cuda"):
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=message):
        resolve_device(spec)


def test_auto_and_env_pick_the_device(monkeypatch):
    monkeypatch.setenv("TURBOQUANT_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.delenv("TURBOQUANT_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected


def test_sizes_parse_and_bad_ones_are_refused(monkeypatch):
    assert parse_size("8GiB") == 8 << 30 and parse_size("512 MB") == 512 << 20 and parse_size("0") == 0
    assert parse_size(1024) == 1024 and parse_size(None) is None
    with pytest.raises(ConfigError, match="'lots' is not a size"):
        parse_size("lots")
    monkeypatch.setenv("TURBOQUANT_ACTIVATION_BUDGET", "1KiB")
    assert resolve_budget(None, torch.device("cpu")) == 1024
    monkeypatch.delenv("TURBOQUANT_ACTIVATION_BUDGET")
    assert resolve_budget(None, torch.device("cpu")) is None  # the CPU's activations are host memory anyway


def test_a_bad_device_leaves_nothing_on_disk(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="not a device name"):
        quantize(tiny_model, make_config("rtn", bits=4, group_size=32), tmp_path / "out", device="tpu",
                 progress=False)
    assert not (tmp_path / "out").exists()


def test_the_gpu_benchmark_runs_its_smoke_shape_on_the_cpu(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "gpu.py"), "--shape", "tiny", "--device", "cpu",
                    "--samples", "4", "--seqlen", "64", "--methods", "rtn,gptq", "--out", str(out)],
                   check=True, capture_output=True, timeout=900)
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and [r["method"] for r in result["rows"]] == ["rtn", "gptq"]
    gptq = result["rows"][1]
    assert gptq["matrix_floor_s"] > 0 and gptq["ratio_to_floor"] > 0
    assert gptq["ratio_to_floor"] == pytest.approx(gptq["seconds"] / gptq["matrix_floor_s"], rel=1e-2)
