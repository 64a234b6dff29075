"""AWQ: folding keeps the float block exact, AWQ beats RTN on block outputs, clip search, config strictness."""

import copy
import json

import pytest
import torch

from turboquant.errors import ConfigError
from turboquant.methods import METHODS, make_config
from turboquant.methods.awq import AwqConfig, quantize_weight
from turboquant.quantize.awq import transform_block
from turboquant.methods.rtn import rtn_quantize
from turboquant.io.arch import ARCHITECTURES
from turboquant.tensor import QuantizedTensor, group_view

ARCH = ARCHITECTURES["llama"]
OUTLIERS = [3, 17, 42, 99]  # input channels with x20 activations: what AWQ protects


pytestmark = pytest.mark.usefixtures("one_thread")


def _hidden(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(8, 64, 128, generator=g)
    h[..., OUTLIERS] *= 20
    return h


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def layer(request):
    """Layer 0 of a tiny random Llama (4 heads; 4 KV heads: v->o folds, 2: GQA, v->o skipped), calib + held-out."""
    from transformers import AutoModelForCausalLM

    from turboquant.io.tiny import tiny_config

    torch.manual_seed(0)
    config = tiny_config(hidden=128, intermediate=256, layers=1, heads=4, kv_heads=request.param)
    model = AutoModelForCausalLM.from_config(config).eval()
    position_ids = torch.arange(64).unsqueeze(0)
    cos, sin = model.model.rotary_emb(_hidden(1), position_ids)
    kwargs = {"position_embeddings": (cos, sin), "position_ids": position_ids, "attention_mask": None}
    return request.param, model.model.layers[0], _hidden(1), _hidden(2), kwargs


def _transformed(layer, cfg):
    _, block, calib, _, kwargs = layer
    block = copy.deepcopy(block)
    clips = transform_block(block, ARCH, calib, kwargs, cfg)
    return block, clips


def _quantized_block(block, quantize):
    out = copy.deepcopy(block)
    with torch.no_grad():
        for name in ARCH.linears:
            linear = out.get_submodule(name)
            linear.weight.copy_(quantize(name, linear.weight).dequantize())
    return out


def _out_mse(block, layer):
    _, ref_block, _, held, kwargs = layer
    with torch.no_grad():
        return (block(held, **kwargs) - ref_block(held, **kwargs)).pow(2).mean().item()


@pytest.mark.parametrize("duo_scaling", [True, False])
def test_folding_keeps_float_block_output(layer, duo_scaling):
    kv, block, calib, held, kwargs = layer
    scaled, clips = _transformed(layer, AwqConfig(bits=3, group_size=64, clip=False, duo_scaling=duo_scaling))
    assert clips == {}
    with torch.no_grad():
        for x in (calib, held):  # compare the block's update (output - residual input): the residual dominates
            ref = block(x, **kwargs) - x
            rel = ((scaled(x, **kwargs) - x - ref).norm() / ref.norm()).item()
            assert rel < 1e-4, rel  # measured ~1.5e-6
    changed = {n for n, p in scaled.state_dict().items() if not torch.equal(p, block.state_dict()[n])}
    folded = {"input_layernorm.weight", "post_attention_layernorm.weight", "mlp.up_proj.weight",
              *(f"{n}.weight" for n in ARCH.linears)}
    if kv == 2:  # GQA: v_proj has 64 outputs, o_proj 128 inputs: no v -> o scales, o_proj untouched
        folded.discard("self_attn.o_proj.weight")
    assert changed == folded


# Block-output MSE ratio AWQ / RTN on held-out inputs (asym g64), measured over 5 model seeds:
# 4 bits 0.37-0.50, 3 bits 0.31-0.39; without the clip search 0.59-0.67.
@pytest.mark.parametrize("bits,bound", [(4, 0.6), (3, 0.5)])
def test_awq_beats_rtn_on_block_output(layer, bits, bound):
    cfg = AwqConfig(bits=bits, group_size=64)
    scaled, clips = _transformed(layer, cfg)
    awq = _out_mse(_quantized_block(scaled, lambda n, W: quantize_weight(W, cfg, clips.get(n))), layer)
    rtn = _out_mse(_quantized_block(layer[1], lambda n, W: rtn_quantize(W, cfg.scheme)), layer)
    assert awq <= bound * rtn, awq / rtn
    assert set(clips) == set(ARCH.linears) - {"self_attn.q_proj", "self_attn.k_proj"}  # skip_qk_clip
    if bits == 3:  # the clip search contributes
        noclip_cfg = AwqConfig(bits=bits, group_size=64, clip=False)
        noclip_block, _ = _transformed(layer, noclip_cfg)
        noclip = _out_mse(_quantized_block(noclip_block, lambda n, W: quantize_weight(W, noclip_cfg)), layer)
        assert awq < 0.8 * noclip < 0.8 * rtn, (awq / rtn, noclip / rtn)


def test_staged_transform_matches_the_generic_one(layer):
    """The staged pre-norm path (one pass per sub-layer) folds the same scales and clips as re-capturing the
    inputs from the folded block before every group (any layout's path), up to float rounding."""
    import dataclasses

    cfg = AwqConfig(bits=3, group_size=64, search_tokens=0)
    staged, clips_s = _transformed(layer, cfg)
    generic_arch = dataclasses.replace(ARCH, layout=None)
    _, block, calib, _, kwargs = layer
    generic = copy.deepcopy(block)
    clips_g = transform_block(generic, generic_arch, calib, kwargs, cfg)
    for name, p in staged.state_dict().items():
        assert torch.allclose(p, generic.state_dict()[name], rtol=1e-5, atol=1e-7), name
    assert clips_s.keys() == clips_g.keys()
    for name in clips_s:
        assert torch.allclose(clips_s[name], clips_g[name], rtol=1e-5), name


def test_mlp_scores_on_a_token_subsample(layer):
    """search_tokens bounds the tokens every candidate's MLP forward runs on (one full pass captures the rest)."""
    _, block, calib, _, kwargs = layer
    block = copy.deepcopy(block)
    shapes = []
    block.mlp.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    cfg = AwqConfig(bits=3, group_size=64, clip=False, grid=5, search_tokens=100)
    transform_block(block, ARCH, calib, kwargs, cfg)
    full = [s for s in shapes if s[-2] == 64]
    assert len(full) == 1 and full[0][0] == 8  # the capture pass: every sequence, once
    assert sorted(set(shapes) - set(full)) == [(1, 100, 128)] and len(shapes) - 1 == 1 + 6  # reference + 6 cands


def test_clip_search_ranges(layer):
    cfg = AwqConfig(bits=4, group_size=64, clip_max_shrink=0.4, clip_tokens=100, skip_qk_clip=False)
    scaled, clips = _transformed(layer, cfg)
    assert set(clips) == set(ARCH.linears)  # q_proj / k_proj included (default skips them: see above)
    shrunk = 0
    for name, c in clips.items():
        amax = group_view(scaled.get_submodule(name).weight.detach(), cfg.scheme).abs().amax(-1)
        assert c.shape == amax.shape
        assert torch.all(c <= amax) and torch.all(c >= 0.6 * amax * (1 - 1e-6))
        shrunk += int((c < amax).sum())
    assert shrunk > 0


def test_transform_is_deterministic(layer):
    cfg = AwqConfig(bits=4, group_size=64, grid=8, clip_grid=10)
    (a, clips_a), (b, clips_b) = _transformed(layer, cfg), _transformed(layer, cfg)
    assert all(torch.equal(p, b.state_dict()[n]) for n, p in a.state_dict().items())
    assert clips_a.keys() == clips_b.keys() and all(torch.equal(clips_a[n], clips_b[n]) for n in clips_a)


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_weight_with_clip(symmetric):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 128, generator=g) * 0.02
    before = W.clone()
    cfg = AwqConfig(bits=4, group_size=32, symmetric=symmetric)
    plain = quantize_weight(W, cfg)
    amax = group_view(W, cfg.scheme).abs().amax(-1)
    same = quantize_weight(W, cfg, clip_max=amax)
    assert torch.equal(same.codes, plain.codes) and torch.equal(same.scale, plain.scale)
    clip = amax * torch.linspace(0.5, 1.0, amax.numel()).reshape(amax.shape)
    qt = quantize_weight(W, cfg, clip_max=clip)
    assert torch.equal(W, before)
    assert isinstance(qt, QuantizedTensor) and qt.codes.dtype == torch.uint8 and int(qt.codes.max()) <= 15
    assert qt.scale.dtype == torch.float16 and qt.zero.dtype == torch.uint8 and qt.scale.shape == (32, 4)
    assert torch.all(qt.scale <= plain.scale) and torch.any(qt.scale < plain.scale)
    if symmetric:
        assert torch.all(qt.zero == 8)
    deq = group_view(qt.dequantize(), cfg.scheme).abs().amax(-1)
    assert torch.all(deq <= clip + qt.scale.float())  # within one step of [-c, c]
    with pytest.raises(ValueError, match="clip_max"):
        quantize_weight(W, cfg, clip_max=clip[:, :2])
    with pytest.raises(ConfigError, match="group_size"):
        quantize_weight(torch.zeros(4, 48), cfg)


def test_registration_and_json_round_trip():
    spec = METHODS["awq"]
    assert spec.config_cls is AwqConfig and spec.kind == "weight" and spec.needs_calibration
    assert spec.solver is quantize_weight
    assert AwqConfig().to_dict() == {
        "bits": 4, "group_size": 128, "symmetric": False, "grid": 20, "duo_scaling": True, "clip": True,
        "clip_grid": 20, "clip_max_shrink": 0.5, "clip_tokens": 512, "skip_qk_clip": True, "search_samples": 32,
        "search_tokens": 4096, "indivisible": "error", "group_overrides": {},
    }
    cfg = make_config("awq", bits=3, group_size=64, symmetric=True, grid=10, duo_scaling=False, clip=False,
                      clip_grid=40, clip_max_shrink=0.25, clip_tokens=64, skip_qk_clip=False)
    assert json.loads(cfg.to_json())["method"] == "awq"
    assert AwqConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("bad", [
    {"grid": 0}, {"grid": 2.5}, {"grid": True}, {"duo_scaling": 1}, {"clip": "yes"}, {"skip_qk_clip": None},
    {"clip_grid": 0}, {"clip_max_shrink": 0}, {"clip_max_shrink": 1.0}, {"clip_max_shrink": float("nan")},
    {"clip_max_shrink": "0.5"}, {"clip_tokens": 0}, {"bits": 9}, {"group_size": 100}, {"group_size": 0},
    {"symmetric": "no"},
])
def test_bad_values_rejected(bad):
    with pytest.raises(ConfigError):
        make_config("awq", **bad)


def test_unknown_key_rejected():
    with pytest.raises(ConfigError, match="unknown option"):
        make_config("awq", alpha=0.5)
