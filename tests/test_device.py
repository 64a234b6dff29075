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


# --- sharing a machine's GPUs, the plan's device, validation on the device -------------------------------------------


def test_claims_take_free_gpus_first_and_wait_when_all_are_held(tmp_path):
    import threading

    from turboquant.device import claimed_index

    got = []
    with claimed_index(2, tmp_path) as a, claimed_index(2, tmp_path) as b:
        assert (a, b) == (0, 1)
        third = threading.Thread(target=lambda: got.append(_hold(tmp_path)))
        third.start()
        third.join(0.5)
        assert third.is_alive() and got == []  # both GPUs held: the third run waits
    third.join(5)
    assert got == [0]  # ... and takes the first one freed


def _hold(lock_dir) -> int:
    from turboquant.device import claimed_index

    with claimed_index(2, lock_dir, poll_s=0.05) as index:
        return index


def test_a_claim_held_by_another_process_is_respected(tmp_path):
    import subprocess
    import sys

    from turboquant.device import claimed_index

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom turboquant.device import claimed_index\n"
        f"with claimed_index(2, {str(tmp_path)!r}) as i:\n    print(i, flush=True)\n    sys.stdin.readline()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        with claimed_index(2, tmp_path) as index:
            assert index == 1
    finally:
        holder.communicate("\n", timeout=60)


def test_unpinned_cuda_requests_spread_over_the_gpus(monkeypatch, tmp_path):
    from turboquant.device import claimed_device

    monkeypatch.setenv("TURBOQUANT_DEVICE_LOCKS", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with claimed_device("cuda") as a, claimed_device("auto") as b, claimed_device("cuda:1") as pinned:
        assert (a, b, pinned) == (torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with claimed_device("auto") as cpu:
        assert cpu == torch.device("cpu")


def test_the_plan_names_a_device_per_method_and_it_picks_the_pool():
    from turboquant.pipeline.placement import place_method
    from turboquant.pipeline.plan import Plan

    def plan(device):
        entry = {"method": "gptq", "options": {"bits": 4, "group_size": 32}, "formats": ["gptq"], "device": device}
        return Plan.from_dict({"models": ["m"], "calibration": {"data": ["x.txt"]}, "quantize": [entry]})

    assert plan("CUDA:1").quantize[0].device == "cuda:1"
    pools = ("cpu", "cuda", "apple")
    assert place_method("gptq", pools, device="cpu").pool == "cpu"  # gptq would pick cuda first otherwise
    assert place_method("gptq", pools).pool == "cuda"
    assert place_method("rtn", pools, device="cuda:1").pool == "cuda"
    assert place_method("rtn", pools, device="mps").pool == "apple"
    assert place_method("rtn", pools, device="auto").pool == "cpu"
    with pytest.raises(ConfigError, match="on cuda.*only pool"):
        place_method("rtn", ("cpu",), device="cuda")
    with pytest.raises(ConfigError, match="'tpu' is not a device name"):
        plan("tpu")
    with pytest.raises(ConfigError, match="must be a device name"):
        plan(0)


def test_validation_runs_on_the_asked_device_and_records_it(tiny_model, tmp_path):
    from turboquant.quality.runtimes import open_runtime
    from turboquant.quality.validate import validate

    q = quantize(tiny_model, make_config("rtn", bits=8, group_size=32), tmp_path / "q", progress=False)
    name, model = open_runtime(q, torch.device("meta"))  # placement only: meta holds no values
    assert name == "torch (dequantized)" and {p.device.type for p in model.parameters()} == {"meta"}
    text = CALIB / "tiny.txt"
    on_cpu = validate(q, tiny_model, text, ctx=32, max_tokens=96, device="cpu")
    default = validate(q, tiny_model, text, ctx=32, max_tokens=96)
    assert on_cpu["device"] == "cpu" and on_cpu["kl"] == default["kl"] and 0 < on_cpu["kl"] < 0.01
    with pytest.raises(ConfigError, match="not a device name"):
        validate(q, tiny_model, text, ctx=32, max_tokens=96, device="gpu0")
