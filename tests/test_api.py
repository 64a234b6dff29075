"""turboquant.quantize: every registered method on a tiny model, the dispatcher's errors, recommend and its doc.

Error bounds are on ``|logits_q - logits| / |logits|`` over two random 32-token windows of the tiny random Llama
(hidden 64, 2 layers). Measured (torch 2.13 CPU): fp16 7e-4, bf16 5.4e-3, int8-dynamic 0.029, int8-static 0.019
(minmax, per channel) / 0.022 (entropy, per tensor), bnb-int8 0.008, rtn w8 0.006; 4-bit: hqq 0.070, awq 0.077,
nf4 0.081, rtn 0.107, fp4 0.108, gptq 0.113 (4 calibration windows of 32 tokens; on a random model GPTQ's
calibration text says little about random evaluation tokens). Bounds are ~2x the measurement: they catch a
broken method (a wrong scale is off by far more) without failing on rounding noise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import turboquant
from conftest import CALIB
from turboquant.cli import app
from turboquant.errors import ConfigError, OutputError
from turboquant.methods.int8 import Int8Linear

TEXTS = [(CALIB / "tiny.txt").read_text()]
CAL = {"calib_dataset": TEXTS, "calib_samples": 4, "calib_seqlen": 32}

CASES = [  # (method, options, bound on the relative logits error)
    ("fp16", {}, 2e-3),
    ("bf16", {}, 1.5e-2),
    ("rtn", {"bits": 8, "group_size": 32}, 1.5e-2),
    ("rtn", {"bits": 4, "group_size": 32}, 0.2),
    ("hqq", {"bits": 4, "group_size": 32}, 0.15),
    ("gptq", {"bits": 4, "group_size": 32, **CAL}, 0.2),
    ("awq", {"bits": 4, "group_size": 32, **CAL}, 0.15),
    ("int8-dynamic", {}, 0.06),
    ("int8-static", {**CAL}, 0.04),
    ("int8-static", {"observer": "entropy", "per_channel": False, **CAL}, 0.05),
    ("bnb-int8", {}, 0.02),
    ("bnb-nf4", {}, 0.15),
    ("bnb-fp4", {}, 0.2),
    ("mixed", {"base": "rtn", "target_bpw": 4.5, "group_size": 32, **CAL}, 0.2),  # measured 0.037
]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits
    return model, ids, ref


def rel_error(module: torch.nn.Module, ids: torch.Tensor, ref: torch.Tensor) -> float:
    with torch.inference_mode():
        out = module(ids).logits.float()
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("method,options,bound", CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_every_method_runs_forward_within_its_error_bound(tiny, method, options, bound, one_thread):
    model, ids, ref = tiny
    q = turboquant.quantize(model, method=method, **options)
    err = rel_error(q, ids, ref)
    assert 0 < err < bound, f"{method} {options}: {err:.5f}"
    assert not q.training
    assert model.model.layers[0].self_attn.q_proj.__class__ is torch.nn.Linear  # the input was not modified


def test_every_registered_method_is_covered_and_listed():
    listed = turboquant.methods()
    assert listed == turboquant.list_methods()
    assert set(listed) == {m for m, _, _ in CASES}  # a new method needs a case here
    assert all(d and "\n" not in d for d in listed.values())
    from turboquant.methods import METHODS, get_method  # the package still imports as one

    assert get_method("bnb-nf4") is METHODS["bnb-nf4"] and not METHODS["bnb-nf4"].checkpoint


def test_static_int8_really_computes_in_integers(one_thread):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    batches = [torch.randn(4, 16) for _ in range(3)]
    q = turboquant.quantize(net, method="int8-static", calib_loader=batches, per_channel=True)
    lin = q[0]
    assert isinstance(lin, Int8Linear) and lin.qweight_t.dtype == torch.int8
    assert lin.x_scale.item() == pytest.approx(max(b.abs().max().item() for b in batches) / 127)  # minmax
    x = torch.randn(5, 16)
    xq = (x / lin.x_scale).round().clamp(-127, 127)
    expected = (xq.double() @ lin.qweight_t.double()) * (lin.x_scale * lin.w_scale).double() + lin.bias.double()
    assert torch.allclose(lin(x).double(), expected, atol=1e-5)
    with torch.no_grad():  # inside the calibrated range (x above may be clipped: static ranges are fixed)
        y, ref = q(batches[0]), net(batches[0])
    assert float((y - ref).norm() / ref.norm()) < 0.03


def test_dynamic_int8_and_bnb_take_any_module():
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(8, 16, batch_first=True)
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    net = Net().eval().requires_grad_(False)
    x = torch.randn(2, 5, 8)
    dyn = turboquant.quantize(net, method="int8-dynamic")
    assert "quantized" in type(dyn.rnn).__module__ and "quantized" in type(dyn.head).__module__
    assert float((dyn(x) - net(x)).norm() / net(x).norm()) < 0.05
    nf4 = turboquant.quantize(torch.nn.Sequential(net.head), method="bnb-nf4")
    assert type(nf4[0]).__name__ == "Linear4bit"
    h = torch.randn(3, 16)
    assert float((nf4(h) - net.head(h)).norm() / net.head(h).norm()) < 0.2


def test_model_given_as_a_directory_and_save_dir(tiny, tiny_model, tmp_path):
    from turboquant.io.checkpoint import QuantizedCheckpoint

    model, ids, ref = tiny
    from_dir = turboquant.quantize(tiny_model, method="rtn", bits=4, group_size=32, save_dir=tmp_path / "q")
    from_module = turboquant.quantize(model, method="rtn", bits=4, group_size=32)
    with torch.inference_mode():
        assert torch.equal(from_dir(ids).logits, from_module(ids).logits)
    assert QuantizedCheckpoint.open(tmp_path / "q").method == "rtn"
    with pytest.raises(OutputError, match="already exists"):
        turboquant.quantize(tiny_model, method="rtn", save_dir=tmp_path / "q", group_size=32)
    turboquant.quantize(tiny_model, method="rtn", bits=8, group_size=32, save_dir=tmp_path / "q", overwrite=True)
    assert QuantizedCheckpoint.open(tmp_path / "q").meta["config"]["bits"] == 8


def test_save_dir_is_atomic_when_quantization_fails(tiny_model, tmp_path, monkeypatch):
    import dataclasses

    from turboquant.methods import METHODS

    calls = []

    def failing(weight, cfg):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("solver failed mid-model")
        return METHODS["rtn"].solver(weight, cfg)

    monkeypatch.setitem(METHODS, "rtn", dataclasses.replace(METHODS["rtn"], solver=failing))
    with pytest.raises(RuntimeError, match="mid-model"):
        turboquant.quantize(tiny_model, method="rtn", group_size=32, save_dir=tmp_path / "q")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory is left


SWAP_OPTIONS = {"gptq": {"bits": 4, "group_size": 32}, "awq": {"bits": 4, "group_size": 32},
                "mixed": {"base": "rtn", "target_bpw": 4.5, "group_size": 32}, "int8-static": {}}


def test_one_calib_loader_swaps_between_every_calibrated_method(tiny, one_thread):
    """The seed's promise: the same ``calib_loader`` feeds every calibrated method, so a swap is one word."""
    from turboquant.methods import METHODS

    model, ids, ref = tiny
    calibrated = {name for name, spec in METHODS.items() if spec.needs_calibration}
    assert calibrated == set(SWAP_OPTIONS)  # a new calibrated method joins this loop
    tokens = torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(1))
    loader = [{"input_ids": tokens[i:i + 2], "attention_mask": torch.ones(2, 32, dtype=torch.long)} for i in (0, 2)]
    errors = {}
    for method, options in SWAP_OPTIONS.items():
        q = turboquant.quantize(model, method=method, calib_loader=loader, **options)
        errors[method] = rel_error(q, ids, ref)
    bounds = {m: b for m, o, b in CASES if "calib_dataset" in o}
    assert all(0 < errors[m] < bounds[m] for m in errors), errors
    # the loader's windows are the calibration set: the same ids as token-id calib_dataset give the same model
    a = turboquant.quantize(model, method="gptq", calib_loader=loader, bits=4, group_size=32)
    b = turboquant.quantize(model, method="gptq", calib_dataset=tokens, bits=4, group_size=32)
    pa, pb = a.model.layers[1].mlp.down_proj.weight, b.model.layers[1].mlp.down_proj.weight
    assert torch.equal(pa, pb)


@pytest.mark.parametrize("loader,message", [
    ([{"input_ids": torch.ones(1, 8, dtype=torch.long), "attention_mask": torch.tensor([[1] * 6 + [0] * 2])}],
     "padded"),
    ([torch.ones(1, 8, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], "one length"),
    ([torch.rand(1, 8)], "not token ids"),
    ([{"labels": torch.ones(1, 8, dtype=torch.long)}], "no input_ids"),
    ([], "no batches"),
])
def test_calib_loader_refuses_what_would_be_trimmed(tiny, loader, message):
    from turboquant.errors import DataError

    with pytest.raises(DataError, match=message):
        turboquant.quantize(tiny[0], method="gptq", calib_loader=loader, bits=4, group_size=32)
    with pytest.raises(ConfigError, match="pass one of them"):
        turboquant.quantize(tiny[0], method="gptq", calib_loader=loader, calib_dataset=TEXTS)


def test_dispatcher_errors_name_the_valid_choices(tiny):
    model = tiny[0]
    with pytest.raises(ConfigError) as e:
        turboquant.quantize(model, method="int4-magic")
    assert all(name in str(e.value) for name in turboquant.methods())
    with pytest.raises(ConfigError) as e:
        turboquant.quantize(model, method="rtn", bitz=4)
    assert "bitz" in str(e.value) and "group_size" in str(e.value) and "save_dir" in str(e.value)
    with pytest.raises(ConfigError, match="observer"):
        turboquant.quantize(model, method="int8-static", observer="kl", calib_loader=[])
    with pytest.raises(ConfigError, match="per_channel"):
        turboquant.quantize(model, method="int8-static", per_channel="yes", calib_loader=[])
    with pytest.raises(ConfigError, match="wrong type|bits"):
        turboquant.quantize(model, method="rtn", bits="4")
    with pytest.raises(ConfigError, match="double_quant"):
        turboquant.quantize(model, method="bnb-nf4", double_quant="no")
    with pytest.raises(ConfigError, match="needs calibration"):
        turboquant.quantize(model, method="gptq")
    with pytest.raises(ConfigError, match="calib_loader|calib_dataset"):
        turboquant.quantize(model, method="int8-static")
    with pytest.raises(ConfigError, match="takes no calibration"):
        turboquant.quantize(model, method="rtn", calib_dataset=TEXTS)
    with pytest.raises(ConfigError, match="no on-disk form"):
        turboquant.quantize(model, method="int8-dynamic", save_dir="unused")
    with pytest.raises(ConfigError, match="transformers"):
        turboquant.quantize(torch.nn.Linear(4, 4), method="rtn")


def test_plan_and_cli_refuse_methods_without_a_checkpoint(tiny_model, tmp_path):
    from turboquant.methods import make_config
    from turboquant.pipeline.plan import Plan

    with pytest.raises(ConfigError, match="turboquant.quantize"):
        make_config("int8-dynamic")
    with pytest.raises(ConfigError, match="no canonical checkpoint"):
        Plan.from_dict({"models": ["m"], "quantize": [{"method": "int8-static", "formats": ["gguf"]}]})
    r = CliRunner().invoke(app, ["quantize", str(tiny_model), "--method", "int8-dynamic", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "turboquant.quantize" in r.output and not (tmp_path / "o").exists()


def test_recommend_prints_a_row_of_the_table_in_the_docs():
    from turboquant.methods import METHODS
    from turboquant.recommend import TABLE, render_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
    assert doc.read_text() == render_markdown(), "regenerate: python -m turboquant.recommend > docs/methods.md"
    assert {r.target for r in TABLE} == {"cpu", "edge", "gpu", "qlora", "lossless"}
    assert all(r.method in METHODS for r in TABLE)
    r = CliRunner().invoke(app, ["recommend", "--target", "qlora"])
    assert r.exit_code == 0 and "bnb-nf4" in r.output and "bitsandbytes" in r.output
    r = CliRunner().invoke(app, ["recommend"])
    assert r.exit_code == 0 and all(row.title in r.output for row in TABLE)
    r = CliRunner().invoke(app, ["recommend", "--target", "phone"])
    assert r.exit_code == 2 and "cpu" in r.output and "lossless" in r.output
