"""Mixed precision: exact allocation, bits accounting, the quantizer's per-module schemes, the trained model's KL,
and the formats that hold a scheme per layer, each loaded by its runtime (GPTQModel, transformers +
compressed-tensors, mlx-lm, llama.cpp); AWQ and ONNX refuse with the fix."""

from __future__ import annotations

import itertools
import json
import os
import random

import numpy as np
import pytest
import torch

from conftest import CALIB, HELDOUT, REF_MODEL
from turboquant.io.calibration import CalibrationRecipe, CalibrationSet, build_calibration
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.errors import ConfigError
from turboquant.formats import FormatError, export
from turboquant.methods import make_config
from turboquant.methods.gptq import GptqConfig
from turboquant.methods.mixed import MixedPrecisionConfig
from turboquant.quantize.sensitivity import allocate, bits_per_weight, module_cost
from turboquant.quantize.pipeline import quantize

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[0, 312, 45, 1022, 7, 99, 2048, 13, 560, 3, 77, 1500, 9, 401, 2222, 18]])


# ---------------------------------------------------------------------------------------------------------------
# Allocation and accounting
# ---------------------------------------------------------------------------------------------------------------


def test_allocation_finds_the_hand_checked_optimum_within_budget():
    """Two 100-weight layers, budget 6 bits/weight (1200 bits): A8+B4 (error 1 + 1 = 2) beats A4+B8 (10.1),
    A4+B4 (11) and A8+B2 (13); A8+B8 (1.1) costs 1600. One bit less and A8+B4 no longer fits: A4+B4."""
    costs = {"A": {2: 200, 4: 400, 8: 800}, "B": {2: 200, 4: 400, 8: 800}}
    errors = {"A": {2: 100.0, 4: 10.0, 8: 1.0}, "B": {2: 12.0, 4: 1.0, 8: 0.1}}
    assert allocate(costs, errors, budget=1200) == {"A": 8, "B": 4}
    assert allocate(costs, errors, budget=1199) == {"A": 4, "B": 4}
    assert allocate(costs, errors, budget=1600) == {"A": 8, "B": 8}
    with pytest.raises(ConfigError, match="below the cheapest"):
        allocate(costs, errors, budget=399)


@pytest.mark.parametrize("max_units", [1 << 16, 37])
def test_allocation_is_optimal_and_never_over_budget(max_units):
    """Against brute force on random instances; with few units (rounded-up costs) it stays feasible and close."""
    rng = random.Random(0)
    for _ in range(30):
        items = [f"l{i}" for i in range(4)]
        costs = {i: {b: b * rng.choice([64, 96, 128]) + rng.randrange(0, 40) for b in (2, 3, 4, 8)} for i in items}
        errors = {i: {b: rng.uniform(0.1, 10) * 4.0 ** -b for b in (2, 3, 4, 8)} for i in items}
        budget = rng.uniform(sum(min(c.values()) for c in costs.values()), sum(max(c.values()) for c in costs.values()))
        best = min(
            (sum(errors[i][b] for i, b in zip(items, combo)), combo)
            for combo in itertools.product((2, 3, 4, 8), repeat=len(items))
            if sum(costs[i][b] for i, b in zip(items, combo)) <= budget
        )
        plan = allocate(costs, errors, budget, max_units=max_units)
        assert sum(costs[i][b] for i, b in plan.items()) <= budget
        got = sum(errors[i][b] for i, b in plan.items())
        if max_units > 1000:
            assert got == pytest.approx(best[0], rel=1e-12)
        else:
            assert got <= best[0] * 50  # coarse units trade a little optimality for memory, never the budget


def test_bits_per_weight_counts_codes_scales_and_zero_points():
    cfg = make_config("mixed", base="rtn", target_bpw=4.0, group_size=32, symmetric=False)
    # [64, 128] at 4 bits: 4*64*128 codes + 64 rows * 4 groups * (16-bit scale + 4-bit zero)
    assert module_cost([64, 128], cfg, 4) == 32768 + 64 * 4 * 20
    shapes = {"a": [64, 128], "b": [128, 64]}
    plan = {"a": 4, "b": 8}
    expected = (32768 + 5120 + 8 * 8192 + 128 * 2 * 24) / (2 * 8192)
    assert bits_per_weight(shapes, cfg, plan) == pytest.approx(expected)


def test_config_round_trips_and_refuses_what_it_cannot_do():
    cfg = make_config("mixed", base="gptq", target_bpw=3.5, candidate_bits=[8, 2, 4], group_size=32,
                      base_options={"act_order": True})
    assert cfg.candidate_bits == (2, 4, 8)
    assert MixedPrecisionConfig.from_json(cfg.to_json()) == cfg
    assert cfg.base_config(4) == GptqConfig(bits=4, group_size=32, act_order=True)
    wrapped = MixedPrecisionConfig.wrap(GptqConfig(bits=4, group_size=64, damp_percent=0.1), 4.5, (3, 4, 8))
    assert (wrapped.group_size, wrapped.base_options["damp_percent"], wrapped.candidate_bits) == (64, 0.1, (3, 4, 8))
    with pytest.raises(ConfigError, match="base method 'awq'"):
        make_config("mixed", base="awq")
    with pytest.raises(ConfigError, match="--target-bpw works with methods"):
        MixedPrecisionConfig.wrap(make_config("hqq"), 4.5)
    with pytest.raises(ConfigError, match="chooses itself"):
        make_config("mixed", base_options={"bits": 4})
    with pytest.raises(ConfigError, match="outside candidate_bits"):
        make_config("mixed", candidate_bits=[2, 4], plan={"model.layers.0.mlp.up_proj": 3})


# ---------------------------------------------------------------------------------------------------------------
# The quantizer on the tiny model, and the formats
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calib():
    ids = torch.randint(3, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(ids, CalibrationRecipe(("synthetic",), n_samples=4, seqlen=64))


@pytest.fixture(scope="module")
def mixed_dirs(tiny_model, calib, tmp_path_factory):
    """Mixed GPTQ (2/3/4/8 bits, g32 sym, at uniform 3-bit's 3.5 bpw) and mixed RTN in GGUF's widths (4/8)."""
    root = tmp_path_factory.mktemp("mixed")
    gptq = make_config("mixed", base="gptq", target_bpw=3.5, candidate_bits=[2, 3, 4, 8], group_size=32)
    gguf = make_config("mixed", base="rtn", target_bpw=5.0, candidate_bits=[4, 8], group_size=32)
    return {"gptq": quantize(tiny_model, gptq, root / "gptq", calib=calib, progress=False),
            "gguf": quantize(tiny_model, gguf, root / "gguf", calib=calib, progress=False)}


def test_checkpoint_records_the_plan_per_module(mixed_dirs):
    ckpt = QuantizedCheckpoint.open(mixed_dirs["gptq"])
    plan = ckpt.meta["config"]["plan"]
    assert plan == {m: info["scheme"]["bits"] for m, info in ckpt.modules.items()}
    assert len(set(plan.values())) > 1
    info = ckpt.meta["mixed_precision"]
    cfg = MixedPrecisionConfig.from_dict(ckpt.meta["config"])
    shapes = {m: i["shape"] for m, i in ckpt.modules.items()}
    assert 3.4 < info["bits_per_weight"] == bits_per_weight(shapes, cfg, plan) <= 3.5
    # optimal under the budget, so never worse than uniform 3-bit (3.5 bpw at g32 sym) on the measured errors
    uniform = sum(errors["3"] for errors in info["sensitivity"].values())
    assert info["predicted_error"] <= uniform
    # a config carrying its plan re-quantizes to the same codes without measuring
    assert cfg.plan == plan


def test_mixed_beats_uniform_kl_on_the_trained_model(tmp_path):
    """tq-ref-llama, RTN g128 asym: mixed at uniform 3-bit's bits per weight has a lower KL than uniform 3-bit."""
    from turboquant.quality.evaluate import evaluate_many
    from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize

    sources = (str(CALIB / "wiki.txt"), str(CALIB / "c4.txt"))
    calib = build_calibration(CalibrationRecipe(sources, n_samples=4, seqlen=512), REF_MODEL)
    uniform = quantize(REF_MODEL, make_config("rtn", bits=3, group_size=128, symmetric=False), tmp_path / "u3",
                       progress=False)
    cfg = make_config("mixed", base="rtn", target_bpw=3 + 20 / 128, group_size=128, symmetric=False,
                      sensitivity_samples=4)
    mixed = quantize(REF_MODEL, cfg, tmp_path / "mixed", calib=calib, progress=False)
    assert QuantizedCheckpoint.open(mixed).meta["mixed_precision"]["bits_per_weight"] <= 3 + 20 / 128
    ids = tokenize(load_tokenizer(REF_MODEL), read_text(HELDOUT))[:2048]
    r = evaluate_many({"u": load_model(uniform), "m": load_model(mixed)}, ids, ctx=512, baseline=load_model(REF_MODEL))
    assert r["m"].kl < 0.85 * r["u"].kl, (r["m"].kl, r["u"].kl)


def _ours(qdir) -> torch.Tensor:
    with torch.no_grad():
        return QuantizedCheckpoint.open(qdir).load_model(torch.float32)(IDS).logits[0].float()


def test_gptq_dynamic_overrides_load_in_gptqmodel(mixed_dirs, tmp_path):
    from gptqmodel import BACKEND, GPTQModel

    qdir = mixed_dirs["gptq"]
    out = export(qdir, "gptq", tmp_path / "gptq")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    plan = QuantizedCheckpoint.open(qdir).meta["config"]["plan"]
    overridden = {k.removeprefix("+:^").removesuffix("$").replace("\\", ""): v["bits"]
                  for k, v in qcfg["dynamic"].items()}
    assert overridden == {m: b for m, b in plan.items() if b != qcfg["bits"]}
    model = GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH)
    loaded = {n: m.bits for n, m in model.model.named_modules() if n in plan}
    assert loaded == plan
    with torch.no_grad():
        theirs = model.model(IDS).logits[0].float()
    assert (theirs - _ours(qdir)).abs().max() < 2e-2  # GPTQModel's torch kernel computes in float16


def test_compressed_tensors_per_module_groups_load_in_transformers(mixed_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    qdir = mixed_dirs["gptq"]
    out = export(qdir, "compressed-tensors", tmp_path / "ct")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    plan = QuantizedCheckpoint.open(qdir).meta["config"]["plan"]
    assert {m: g["weights"]["num_bits"] for g in groups.values() for m in g["targets"]} == plan
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(IDS).logits[0].float()
    assert (theirs - _ours(qdir)).abs().max() < 1e-3


def test_mlx_per_layer_quantization_loads_in_mlx_lm(mixed_dirs, tmp_path):
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    qdir = mixed_dirs["gptq"]
    model, _ = mlx_lm.load(str(export(qdir, "mlx", tmp_path / "mlx", dtype="float32")))
    plan = QuantizedCheckpoint.open(qdir).meta["config"]["plan"]
    for module, bits in plan.items():
        layer = model
        for part in module.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        assert layer.bits == bits, module
    theirs = torch.from_numpy(np.array(model(mx.array(IDS.tolist())))[0])
    assert (theirs - _ours(qdir)).abs().max() < 1e-4


def test_gguf_per_tensor_types_run_in_llama_cpp(mixed_dirs, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from turboquant.formats.gguf.read import tensor_types
    from turboquant.formats.gguf.model import NameMap

    qdir = mixed_dirs["gguf"]
    ckpt = QuantizedCheckpoint.open(qdir)
    out = export(qdir, "gguf", tmp_path / "gguf")
    path = next(out.glob("*.gguf"))
    types, names = tensor_types(path), NameMap(ckpt.config)
    plan = ckpt.meta["config"]["plan"]
    assert {m: types[names.gguf_name(m + ".weight")] for m in plan} == {
        m: {4: "Q4_0", 8: "Q8_0"}[b] for m, b in plan.items()}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False, seed=0)
    try:
        llm.eval(IDS[0].tolist())
        theirs = torch.from_numpy(np.array(llm.scores[: IDS.shape[1]], dtype=np.float32))
    finally:
        llm.close()
    assert (theirs - _ours(qdir)).abs().max() < 2e-2  # llama.cpp quantizes activations to 8 bits for Q4_0/Q8_0
    with pytest.raises(FormatError, match="drop --gguf-type"):
        export(qdir, "gguf", tmp_path / "g2", gguf_type="Q4_0")
    with pytest.raises(FormatError, match="candidate-bits 4,5,8"):
        export(mixed_dirs["gptq"], "gguf", tmp_path / "g3")


def test_formats_refuse_widths_or_mixes_they_cannot_hold(mixed_dirs, tiny_model, tmp_path):
    with pytest.raises(FormatError, match="holds one per model.*export it to gptq"):
        export(mixed_dirs["gptq"], "awq", tmp_path / "awq")
    with pytest.raises(FormatError, match="candidate-bits 2,4,8"):
        export(mixed_dirs["gptq"], "onnx", tmp_path / "onnx")
    # a given plan needs no measurement (nor, for RTN, calibration): one 6-bit layer, which GPTQ cannot hold
    modules = QuantizedCheckpoint.open(mixed_dirs["gptq"]).modules
    plan = {m: 6 if m.endswith("0.mlp.up_proj") else 4 for m in modules}
    six = quantize(tiny_model, make_config("mixed", base="rtn", candidate_bits=[4, 6], group_size=32, plan=plan),
                   tmp_path / "six", progress=False)
    assert QuantizedCheckpoint.open(six).scheme("model.layers.0.mlp.up_proj").bits == 6
    with pytest.raises(FormatError, match="6-bit layers.*candidate-bits 2,3,4,8"):
        export(six, "gptq", tmp_path / "gptq")


def test_cli_target_bpw(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from turboquant.cli import app

    out = tmp_path / "q"
    r = CliRunner().invoke(app, ["quantize", str(tiny_model), "--out", str(out), "--method", "gptq", "--bits", "4",
                                 "--group-size", "32", "--target-bpw", "4.5", "--candidate-bits", "3,4,8",
                                 "--data", str(CALIB / "tiny.txt"), "--n-samples", "4", "--seqlen", "32"])
    assert r.exit_code == 0, r.output
    meta = QuantizedCheckpoint.open(out).meta
    assert meta["method"] == "mixed" and meta["config"]["base"] == "gptq"
    assert meta["mixed_precision"]["bits_per_weight"] <= 4.5
    r = CliRunner().invoke(app, ["quantize", str(tiny_model), "--out", str(tmp_path / "x"), "--method", "awq",
                                 "--target-bpw", "4.5", "--data", str(CALIB / "tiny.txt")])
    assert r.exit_code == 2 and "--target-bpw works with methods" in r.output
