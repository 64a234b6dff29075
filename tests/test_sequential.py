import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from turboquant.io.calibration import CalibrationRecipe, CalibrationSet
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.methods import make_config
from turboquant.io.model import open_model
from turboquant.quantize.pipeline import quantize
from turboquant.quantize.runner import BlockRunner, run_staged
from turboquant.io.tiny import save_tiny_model

from conftest import REF_MODEL


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 4096, (6, 48), generator=torch.Generator().manual_seed(0))


def test_block_by_block_forward_equals_the_full_model(tiny_model, ids):
    runner = BlockRunner.start(open_model(tiny_model), ids, batch_size=4)
    for i in range(2):
        block = runner.load_block(i)
        runner.advance(runner.forward(block))
        runner.release_block(i)
    full = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        expected = full.model(ids).last_hidden_state  # after the final norm
        ours = full.model.norm(runner.hidden)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_captured_hessians_match_direct_computation(tiny_model, ids):
    runner = BlockRunner.start(open_model(tiny_model), ids, batch_size=4)
    block = runner.load_block(0)
    stats = runner.capture(block, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], abs_mean=True)
    with torch.no_grad():
        x = block.input_layernorm(runner.hidden).reshape(-1, 64)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"]
    assert torch.allclose(stats["self_attn.q_proj"].H, x.T @ x / x.shape[0], atol=1e-5)
    assert torch.allclose(stats["self_attn.v_proj"].abs_mean, x.abs().mean(0), atol=1e-6)
    down = runner.capture(block, ["mlp.down_proj"])["mlp.down_proj"]
    assert down.H.shape == (128, 128) and down.n == 6 * 48 and down.abs_mean is None


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_staged_block_equals_the_block_and_its_captures(tmp_path, ids, model_type, one_thread):
    """Run staged with a no-op solver: the output is the block's, and every group's H is what capture sees."""
    path = save_tiny_model(tmp_path / model_type, model_type=model_type, hidden=64, intermediate=128, layers=1,
                           heads=4, kv_heads=2, tokenizer_from=REF_MODEL)
    opened = open_model(path)
    runner = BlockRunner.start(opened, ids, batch_size=4)
    block = runner.load_block(0)
    seen: dict[str, torch.Tensor] = {}

    def solve(names, stats):
        assert len({id(stats[n]) for n in names}) == 1  # one shared accumulator per input group
        seen.update({n: stats[n].H.clone() for n in names})

    groups = [list(g.linears) for g in opened.arch.groups]
    staged = run_staged(runner, block, opened.arch.layout, groups, solve)
    expected = runner.forward(block)
    assert torch.allclose(staged, expected, atol=1e-6), (staged - expected).abs().max()
    for names in groups:
        captured = runner.capture(block, names)
        for n in names:
            assert torch.allclose(seen[n], captured[n].H, atol=1e-6), n


def test_staged_gptq_matches_recapturing_every_group(tmp_path, tiny_model, ids, monkeypatch):
    """The staged pipeline is a speed-up only: same codes as re-running the block before every group."""
    import dataclasses

    from turboquant.io import arch as tq_arch

    cfg = make_config("gptq", bits=3, group_size=32)
    staged = QuantizedCheckpoint.open(quantize(tiny_model, cfg, tmp_path / "s", calib=_calib(ids), progress=False))
    plain = dataclasses.replace(tq_arch.ARCHITECTURES["llama"], layout=None)
    monkeypatch.setitem(tq_arch.ARCHITECTURES, "llama", plain)
    slow = QuantizedCheckpoint.open(quantize(tiny_model, cfg, tmp_path / "r", calib=_calib(ids), progress=False))
    for name in staged.modules:
        a, b = staged.quantized_tensor(name), slow.quantized_tensor(name)
        agree = (a.codes == b.codes).float().mean().item()
        assert agree > 0.999 and torch.equal(a.scale, b.scale) or agree == 1.0, (name, agree)


def _calib(ids):
    return CalibrationSet(ids, CalibrationRecipe(("synthetic",), n_samples=ids.shape[0], seqlen=ids.shape[1]))


def test_gptq_pipeline_is_deterministic_and_records_calibration(tmp_path, tiny_model, ids):
    cfg = make_config("gptq", bits=4, group_size=32)
    outs = [quantize(tiny_model, cfg, tmp_path / f"q{k}", calib=_calib(ids), progress=False) for k in range(2)]
    for f in sorted(outs[0].glob("*.safetensors")):
        assert hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256((outs[1] / f.name).read_bytes()).digest()
    ckpt = QuantizedCheckpoint.open(outs[0])
    assert ckpt.meta["calibration"]["recipe"]["n_samples"] == 6 and ckpt.meta["calibration"]["sequential"] is True
    assert len(ckpt.modules) == 14


def test_calibrated_method_without_data_fails_up_front(tmp_path, tiny_model):
    from turboquant.errors import ConfigError

    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize(tiny_model, make_config("gptq", group_size=32), tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_sequential_flag_changes_inputs_of_later_blocks(tmp_path, tiny_model, ids):
    cfg = make_config("gptq", bits=3, group_size=32)
    seq = QuantizedCheckpoint.open(quantize(tiny_model, cfg, tmp_path / "s", calib=_calib(ids), progress=False))
    par = QuantizedCheckpoint.open(quantize(tiny_model, cfg, tmp_path / "p", calib=_calib(ids), sequential=False,
                                            progress=False))
    first = "model.layers.0.mlp.down_proj"
    last = "model.layers.1.mlp.down_proj"
    assert torch.equal(seq.quantized_tensor(first).codes, par.quantized_tensor(first).codes)
    assert not torch.equal(seq.quantized_tensor(last).codes, par.quantized_tensor(last).codes)


def test_staged_float_stream_for_gptaq(tiny_model, ids, one_thread):
    """With a float reference block, the float stream advances to the float block's output and every group's
    cross term D = (X_float - X)ᵀ X / n is what the two streams give (zero while they agree)."""
    import copy

    opened = open_model(tiny_model)
    runner = BlockRunner.start(opened, ids, batch_size=4)
    block = runner.load_block(0)
    expected = runner.forward(block)
    runner.float_hidden = runner.hidden + 0.01 * torch.randn_like(runner.hidden)  # a float stream that differs
    expected_float = runner.forward(block, runner.float_hidden)
    x0_float = block.input_layernorm(runner.float_hidden).reshape(-1, 64)
    x0 = block.input_layernorm(runner.hidden).reshape(-1, 64)
    seen = {}

    def solve(names, stats):
        seen.update({n: stats[n] for n in names})

    groups = [list(g.linears) for g in opened.arch.groups]
    out = run_staged(runner, block, opened.arch.layout, groups, solve, reference=copy.deepcopy(block))
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(runner.float_hidden, expected_float, atol=1e-6)
    D = seen["self_attn.q_proj"].D
    assert torch.allclose(D, (x0_float - x0).T @ x0 / x0.shape[0], atol=1e-6)
    assert all(seen[n].D is not None and seen[n].D.abs().sum() > 0 for n in seen)
