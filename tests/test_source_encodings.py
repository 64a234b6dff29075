"""FP8 and MXFP4 source checkpoints are dequantized on read (issue 16, part 4).

A tiny bfloat16 Llama is rewritten here into each encoding the way real releases store it (finegrained fp8 with
128x128 block scales and partial edge blocks, per-tensor fp8 with static activation scales, fbgemm per-channel
fp8, MXFP4 expert blocks); reading it must give exactly the dequantized values (our own loop reference and
transformers' own dequantization), hide every scale, and quantize bit for bit like a plain bf16 checkpoint holding
the same weights. Every inconsistency is refused with the fix.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import turboquant
from turboquant.errors import ModelLoadError
from turboquant.formats import export
from turboquant.io.checkpoint import METADATA_FILE
from turboquant.io.manifest import MANIFEST_FILE
from turboquant.io.model import LazyCheckpoint, open_model
from turboquant.io.source_encoding import source_encoding
from turboquant.io.provenance import source_record
from turboquant.io.tiny import save_tiny_model
from turboquant.pipeline.plan import Plan
from turboquant.pipeline.triage import shapes_only

from conftest import HELDOUT, REF_MODEL

HIDDEN, INTERMEDIATE = 256, 320  # 320 = 2.5 blocks of 128: partial edge blocks along both dimensions
FP8_MAX = 448.0
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"
FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("enc") / "bf16", hidden=HIDDEN, intermediate=INTERMEDIATE,
                           layers=2, heads=4, kv_heads=2, vocab=4096, tokenizer_from=REF_MODEL,
                           dtype=torch.bfloat16)


def linear_names() -> list[str]:
    return [f"model.layers.{i}.{linear}.weight" for i in range(2) for linear in LINEARS]


# --- encoders (the test's own, independent of the reader) ---------------------------------------------------------


def fp8_block_encode(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes and float32 per-block scales (amax / 448), block by block."""
    bm, bn = block
    rows, cols = w.shape
    scale = torch.empty(math.ceil(rows / bm), math.ceil(cols / bn), dtype=torch.float32)
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].float()
            s = tile.abs().amax() / FP8_MAX
            scale[i, j] = s
            tile = (tile / s).clamp(-FP8_MAX, FP8_MAX)
            codes[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = tile.to(torch.float8_e4m3fn)
    return codes, scale


def fp8_block_reference(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    bm, bn = block
    out = torch.empty(codes.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = \
                codes[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].float() * scale[i, j]
    return out.to(torch.bfloat16)


def fp8_tensor_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = w.float().abs().amax() / FP8_MAX
    return (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s.reshape(())


def fp8_channel_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
    return (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def mxfp4_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 expert blocks ``[2 experts, 24 rows, 3 groups, 16]`` and e8m0 scales around 2**0."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (2, 24, 3, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 136, (2, 24, 3), generator=g, dtype=torch.uint8)
    scales[0, 0, 0], scales[1, 2, 1] = 0, 254  # the extreme exponents 2**-127 and 2**127
    return blocks, scales


def mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Value by value: code k of group g in row r is byte k // 2's low (even k) or high nibble, times
    2**(scale - 127); the result is transposed to [experts, groups * 32, rows] as transformers does."""
    experts, rows, groups, _ = blocks.shape
    out = torch.empty(experts, groups * 32, rows, dtype=torch.float64)
    for e in range(experts):
        for r in range(rows):
            for g in range(groups):
                scale = 2.0 ** (int(scales[e, r, g]) - 127)
                for k in range(32):
                    byte = int(blocks[e, r, g, k // 2])
                    out[e, g * 32 + k, r] = FP4[(byte >> 4) if k % 2 else (byte & 0x0F)] * scale
    return out.float().to(torch.bfloat16)


# --- writing a release ------------------------------------------------------------------------------------------


def write_release(src: Path, dst: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None
                  ) -> Path:
    """``src``'s files with ``tensors`` as its weights and ``quantization_config`` in its config.json."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def fp8_release(src: Path, dst: Path, block: tuple[int, int] = (128, 128), **qcfg
                ) -> tuple[Path, dict[str, torch.Tensor]]:
    """Every block linear as e4m3 with block scales (lm_head stays bf16, listed as not converted); returns the
    release and the expected dequantized linears."""
    state = load_file(src / "model.safetensors")
    expected = {}
    for name in linear_names():
        codes, scale = fp8_block_encode(state[name], block)
        state[name], state[name + "_scale_inv"] = codes, scale
        expected[name] = fp8_block_reference(codes, scale, block)
    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": list(block), "modules_to_not_convert": ["lm_head"], **qcfg}
    return write_release(src, dst, state, config), expected


# --- reading --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [(128, 128), (64, 96)])
def test_fp8_block_scales_are_dequantized_on_read(bf16_model, tmp_path, block):
    path, expected = fp8_release(bf16_model, tmp_path / "fp8", block)
    opened = open_model(path)
    ckpt = opened.checkpoint
    assert not [n for n in ckpt.names() if n.endswith(("_scale_inv", "_scale"))]
    got = ckpt.load(linear_names() + ["model.norm.weight"])
    stored = load_file(path / "model.safetensors")
    from transformers.integrations import finegrained_fp8

    for name in linear_names():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], expected[name]), name
        assert ckpt.tensors[name].dtype == "BF16" and opened.checkpoint_dtype(name) == torch.bfloat16
        assert ckpt.tensors[name].shape == tuple(stored[name].shape)
        theirs = finegrained_fp8._dequantize_fp8_weight(stored[name], stored[name + "_scale_inv"], list(block),
                                                        torch.float32).to(torch.bfloat16)
        assert torch.equal(got[name], theirs), name
        rows, cols = stored[name].shape
        if rows % block[0] == 0 and cols % block[1] == 0:  # transformers' load-time dequantizer needs whole blocks
            whole = finegrained_fp8.Fp8Dequantize(None)._dequantize_one(
                stored[name], stored[name + "_scale_inv"], output_dtype=torch.bfloat16)
            assert torch.equal(got[name], whole), name
    assert torch.equal(got["model.norm.weight"], stored["model.norm.weight"])
    assert ckpt.load(["lm_head.weight"])["lm_head.weight"].dtype == torch.bfloat16
    assert opened.source.describe()["source_encoding"] == {
        "quant_method": "fp8", "weight_block_size": list(block), "activation_scheme": "dynamic",
        "dequantized_to": "bfloat16"}


def test_fp8_per_tensor_scales_with_static_activation_scales(bf16_model, tmp_path):
    """The vLLM-style layout: per-tensor ``weight_scale`` (a scalar), ``input_scale`` per linear, no block size."""
    state = load_file(bf16_model / "model.safetensors")
    expected = {}
    for name in linear_names():
        codes, scale = fp8_tensor_encode(state[name])
        module = name.removesuffix(".weight")
        state[name], state[f"{module}.weight_scale"] = codes, scale
        state[f"{module}.input_scale"] = torch.tensor([0.02])
        expected[name] = (codes.float() * scale).to(torch.bfloat16)
    path = write_release(bf16_model, tmp_path / "fp8", state,
                         {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]})
    ckpt = open_model(path).checkpoint
    assert not [n for n in ckpt.names() if n.endswith(("weight_scale", "input_scale"))]
    assert set(ckpt.names()) == set(load_file(bf16_model / "model.safetensors"))
    got = ckpt.load(linear_names())
    assert all(torch.equal(got[n], expected[n]) for n in linear_names())


def test_fbgemm_fp8_per_channel_scales(bf16_model, tmp_path):
    state = load_file(bf16_model / "model.safetensors")
    expected = {}
    for name in linear_names():
        codes, scale = fp8_channel_encode(state[name])
        state[name], state[name + "_scale"] = codes, scale
        expected[name] = (codes.float() * scale).to(torch.bfloat16)
    path = write_release(bf16_model, tmp_path / "fbgemm", state,
                         {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                          "modules_to_not_convert": ["lm_head"]})
    opened = open_model(path)
    assert not [n for n in opened.checkpoint.names() if n.endswith("_scale")]
    got = opened.checkpoint.load(linear_names())
    assert all(torch.equal(got[n], expected[n]) for n in linear_names())
    assert opened.source.describe()["source_encoding"] == {"quant_method": "fbgemm_fp8",
                                                          "dequantized_to": "bfloat16"}


def mxfp4_release(src: Path, dst: Path, **extra: torch.Tensor) -> Path:
    """The bf16 Llama plus a GPT-OSS-style expert stack stored as MXFP4 (the linears stay bf16)."""
    state = load_file(src / "model.safetensors")
    blocks, scales = mxfp4_tensors()
    state |= {f"{EXPERTS}_blocks": blocks, f"{EXPERTS}_scales": scales, **extra}
    config = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return write_release(src, dst, state, config)


def test_mxfp4_blocks_are_dequantized_as_transformers_does(bf16_model, tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    path = mxfp4_release(bf16_model, tmp_path / "mxfp4")
    opened = open_model(path)
    ckpt = opened.checkpoint
    assert EXPERTS in ckpt.names() and not [n for n in ckpt.names() if n.endswith(("_blocks", "_scales"))]
    assert ckpt.tensors[EXPERTS].shape == (2, 3 * 32, 24) and ckpt.tensors[EXPERTS].dtype == "BF16"
    assert EXPERTS in ckpt.block_names(opened.arch, 0)
    got = ckpt.load([EXPERTS])[EXPERTS]
    blocks, scales = mxfp4_tensors()
    assert got.dtype == torch.bfloat16 and torch.equal(got, mxfp4_reference(blocks, scales))
    assert torch.equal(got, convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))
    plain = load_file(bf16_model / "model.safetensors")
    assert all(torch.equal(v, plain[k]) for k, v in ckpt.load(linear_names()).items())
    assert opened.source.describe()["source_encoding"] == {"quant_method": "mxfp4", "dequantized_to": "bfloat16"}


def test_whole_models_read_as_transformers_loads_them_dequantized(tmp_path):
    """transformers' own loader, dequantizing on CPU: an fp8 Llama with whole 128x128 blocks (hidden 256 /
    intermediate 384; its loader refuses partial blocks) and an MXFP4 GPT-OSS (whose expert stacks no block
    runner reads yet, hence ``LazyCheckpoint.open`` rather than ``open_model``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    llama = save_tiny_model(tmp_path / "llama", hidden=256, intermediate=384, layers=1, vocab=4096,
                            tokenizer_from=REF_MODEL, dtype=torch.bfloat16)
    state = load_file(llama / "model.safetensors")
    for name in [n for n in state if n.endswith("proj.weight")]:
        state[name], state[name + "_scale_inv"] = fp8_block_encode(state[name], (128, 128))
    fp8 = write_release(llama, tmp_path / "fp8", state, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                          "weight_block_size": [128, 128]})
    config = AutoConfig.for_model("gpt_oss", hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                  num_local_experts=2, num_experts_per_tok=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "gpt-oss")
    state = load_file(tmp_path / "gpt-oss" / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for proj in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{proj}"
        experts, rows_in, cols_out = state.pop(name).shape  # stored [experts, out, in / 32, 16]
        state[name + "_blocks"] = torch.randint(0, 256, (experts, cols_out, rows_in // 32, 16), generator=g,
                                                dtype=torch.uint8)
        state[name + "_scales"] = torch.randint(118, 134, (experts, cols_out, rows_in // 32), generator=g,
                                                dtype=torch.uint8)
    mxfp4 = write_release(tmp_path / "gpt-oss", tmp_path / "mxfp4", state, {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]})

    for path, qcfg in ((fp8, FineGrainedFP8Config(dequantize=True)), (mxfp4, Mxfp4Config(dequantize=True))):
        ckpt = LazyCheckpoint.open(path, encoding=source_encoding(json.loads((path / "config.json").read_text())))
        ours = ckpt.load(ckpt.names())
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=qcfg,
                                                      device_map="cpu").state_dict()
        assert set(ours) == set(theirs), path.name
        assert all(ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]) for k in ours), path.name


def test_plain_checkpoints_are_read_as_before(bf16_model):
    opened = open_model(bf16_model)
    assert opened.checkpoint.encoding is None and not opened.checkpoint.stored and not opened.checkpoint.encoded
    assert "source_encoding" not in opened.source.describe()
    assert "source_encoding" not in source_record(opened.source.describe())


# --- end to end -------------------------------------------------------------------------------------------------


def test_quantizing_an_fp8_release_equals_quantizing_its_dequantized_weights(bf16_model, tmp_path):
    fp8, expected = fp8_release(bf16_model, tmp_path / "fp8")
    state = load_file(bf16_model / "model.safetensors") | expected
    plain = write_release(bf16_model, tmp_path / "plain", state, None)

    outs = {}
    for name, src in (("fp8", fp8), ("plain", plain)):
        out = tmp_path / f"q-{name}"
        module = turboquant.quantize(src, method="rtn", bits=4, group_size=64, save_dir=out)
        outs[name] = (out, module.state_dict())
    (q_fp8, m_fp8), (q_plain, m_plain) = outs["fp8"], outs["plain"]
    assert set(m_fp8) == set(m_plain) and all(torch.equal(m_fp8[k], m_plain[k]) for k in m_plain)
    shards = sorted(p.name for p in q_plain.glob("*.safetensors"))
    assert shards == sorted(p.name for p in q_fp8.glob("*.safetensors"))
    for shard in shards:
        a, b = load_file(q_fp8 / shard), load_file(q_plain / shard)
        assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in b), shard

    meta_fp8, meta_plain = (json.loads((q / METADATA_FILE).read_text()) for q in (q_fp8, q_plain))
    assert meta_fp8["modules"] == meta_plain["modules"]
    assert meta_fp8["modules"]["model.layers.0.mlp.down_proj"]["dtype"] == "bfloat16"
    encoding = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic",
                "dequantized_to": "bfloat16"}
    assert meta_fp8["source"]["source_encoding"] == encoding and "source_encoding" not in meta_plain["source"]
    assert "quantization_config" not in json.loads((q_fp8 / "config.json").read_text())
    assert json.loads((q_plain / "config.json").read_text()) == json.loads((q_fp8 / "config.json").read_text())

    manifests = {}
    for name, q in (("fp8", q_fp8), ("plain", q_plain)):
        art = export(q, "gptq", tmp_path / f"gptq-{name}")
        manifests[name] = json.loads((art / MANIFEST_FILE).read_text())
        assert json.loads((art / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert manifests["fp8"]["source"]["source_encoding"] == encoding
    assert "source_encoding" not in manifests["plain"]["source"]


def test_triage_accepts_an_fp8_release(bf16_model, tmp_path):
    path, _ = fp8_release(bf16_model, tmp_path / "fp8")
    planned = shapes_only(path, ["config.json", "model.safetensors"], "org/tiny-fp8", "0" * 40)
    read = open_model(path)
    assert planned.linear_inputs() == read.linear_inputs()
    assert all(planned.checkpoint.tensors[f"{m}.weight"].shape == read.checkpoint.tensors[f"{m}.weight"].shape
               for m in read.linear_inputs())
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "models": [{"id": "org/tiny-fp8"}], "calibration": {"data": [str(HELDOUT)], "n_samples": 2, "seqlen": 32},
        "evaluation": {"text": str(HELDOUT)},
        "quantize": [{"name": "rtn4", "method": "rtn", "options": {"bits": 4, "group_size": 32},
                      "formats": ["gptq", "gguf"]}]}))
    assert [err for _, _, err in Plan.from_yaml(params).check_formats(planned)] == [None, None]


# --- refusals ---------------------------------------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj"


def _drop(name: str):
    return lambda state: state.pop(name)


def _set(name: str, value: torch.Tensor):
    return lambda state: state.__setitem__(name, value)


def _nan_scale(state: dict) -> None:
    state[f"{Q}.weight_scale_inv"][0, 1] = float("inf")


BAD_FP8 = [
    ("no scale", {}, _drop(f"{Q}.weight_scale_inv"), rf"FP8 tensor {Q}.weight has no scale \({Q}.weight_scale_inv "
                                                      rf"or {Q}.weight_scale\)"),
    ("scale shape", {}, _set(f"{Q}.weight_scale_inv", torch.ones(2, 3)),
     rf"scale {Q}.weight_scale_inv has shape \[2, 3\]; a \[256, 256\] weight in \[128, 128\] blocks needs \[2, 2\]"),
    ("two scales", {}, _set(f"{Q}.weight_scale", torch.ones(2, 2)), "has two scales"),
    ("byte scales", {}, _set(f"{Q}.weight_scale_inv", torch.ones(2, 2, dtype=torch.uint8)),
     "is stored as U8; only float32 / bfloat16 / float16 scales are read"),
    ("block size list", {"weight_block_size": [128]}, None, r"weight_block_size is \[128\], not \[rows, cols\]"),
    ("block size zero", {"weight_block_size": [0, 128]}, None, "weight_block_size is"),
    ("block size text", {"weight_block_size": "128x128"}, None, "weight_block_size is '128x128'"),
    ("null block size", {"weight_block_size": None}, None, r"has shape \[\d, \d\], but weight_block_size is null"),
    ("activation scheme", {"activation_scheme": "per-token"}, None,
     "activation_scheme is 'per-token', not dynamic or static"),
    ("dynamic with input scales", {}, _set(f"{Q}.input_scale", torch.tensor([1.0])),
     f"{Q}.input_scale is an activation scale, but the quantization_config's activation_scheme is dynamic"),
    ("e5m2 fmt", {"fmt": "e5m2"}, None, "FP8 weights are e5m2; only e4m3 FP8 weights are read"),
    ("e5m2 tensor", {}, _set(f"{Q}.weight", torch.zeros(256, 256, dtype=torch.float8_e5m2)),
     f"tensor {Q}.weight is stored as F8_E5M2; only e4m3 FP8"),
    ("ue8m0 scales", {"scale_fmt": "ue8m0"}, None, "scale_fmt='ue8m0', which is not read yet"),
    ("scale of a float tensor", {}, _set("model.norm.weight_scale_inv", torch.ones(1)),
     "model.norm.weight_scale_inv looks like the scale of model.norm.weight, which is stored as BF16"),
    ("listed as not converted", {"modules_to_not_convert": ["model.layers.0.self_attn"]}, None,
     r"model\.layers\.0\.self_attn\.\w+\.weight is stored encoded, but quantization_config lists its module in "
     r"'model\.layers\.0\.self_attn'"),
]


@pytest.mark.parametrize("case,qcfg,mutate,needle", BAD_FP8, ids=[c[0] for c in BAD_FP8])
def test_inconsistent_fp8_releases_are_refused(bf16_model, tmp_path, case, qcfg, mutate, needle):
    path, _ = fp8_release(bf16_model, tmp_path / "fp8", **qcfg)
    if mutate is not None:
        state = load_file(path / "model.safetensors")
        mutate(state)
        save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=needle) as err:
        open_model(path)
    assert "Fix: " in str(err.value) and "\n" not in str(err.value)


def test_non_finite_scales_are_refused_on_read(bf16_model, tmp_path):
    path, _ = fp8_release(bf16_model, tmp_path / "fp8")
    state = load_file(path / "model.safetensors")
    _nan_scale(state)
    save_file(state, str(path / "model.safetensors"))
    ckpt = open_model(path).checkpoint
    with pytest.raises(ModelLoadError, match=rf"scale {Q}.weight_scale_inv holds 1 NaN/Inf value\(s\)"):
        ckpt.load([f"{Q}.weight"])

    nan = mxfp4_tensors()[1]
    nan[1, 0, 2] = 255
    ckpt = open_model(mxfp4_release(bf16_model, tmp_path / "mxfp4", **{f"{EXPERTS}_scales": nan})).checkpoint
    with pytest.raises(ModelLoadError, match=rf"MXFP4 scales {EXPERTS}_scales hold 1 NaN exponent"):
        ckpt.load([EXPERTS])


def test_fbgemm_scale_of_the_wrong_shape_is_refused(bf16_model, tmp_path):
    state = load_file(bf16_model / "model.safetensors")
    state[f"{Q}.weight"] = state[f"{Q}.weight"].float().to(torch.float8_e4m3fn)
    state[f"{Q}.weight_scale"] = torch.ones(1, 256)
    path = write_release(bf16_model, tmp_path / "fbgemm", state, {"quant_method": "fbgemm_fp8"})
    with pytest.raises(ModelLoadError, match=r"an fbgemm_fp8 weight \[256, 256\] needs one scale per output row"):
        open_model(path)


BAD_MXFP4 = [
    ("blocks without scales", {"model.layers.1.mlp.experts.down_proj_blocks": torch.zeros(2, 8, 1, 16,
                                                                                          dtype=torch.uint8)},
     "MXFP4 blocks model.layers.1.mlp.experts.down_proj_blocks have no model.layers.1.mlp.experts.down_proj_scales"),
    ("scales without blocks", {"model.layers.1.mlp.experts.down_proj_scales": torch.zeros(2, 8, 1,
                                                                                          dtype=torch.uint8)},
     "MXFP4 scales model.layers.1.mlp.experts.down_proj_scales have no"),
    ("scales shape", {f"{EXPERTS}_scales": torch.zeros(2, 24, 2, dtype=torch.uint8)},
     rf"MXFP4 scales {EXPERTS}_scales have shape \[2, 24, 2\]; blocks \[2, 24, 3, 16\] need \[2, 24, 3\]"),
    ("fp8 tensor", {"model.norm.weight": torch.zeros(HIDDEN, dtype=torch.float8_e4m3fn)},
     "tensor model.norm.weight is stored as FP8, but the quantization_config says mxfp4"),
]


@pytest.mark.parametrize("case,extra,needle", BAD_MXFP4, ids=[c[0] for c in BAD_MXFP4])
def test_inconsistent_mxfp4_releases_are_refused(bf16_model, tmp_path, case, extra, needle):
    with pytest.raises(ModelLoadError, match=needle):
        open_model(mxfp4_release(bf16_model, tmp_path / "mxfp4", **extra))


def test_an_encoded_config_over_plain_weights_is_refused(bf16_model, tmp_path):
    state = load_file(bf16_model / "model.safetensors")
    path = write_release(bf16_model, tmp_path / "fp8", state, {"quant_method": "fp8"})
    with pytest.raises(ModelLoadError, match="quantization_config says fp8, but no tensor is stored that way"):
        open_model(path)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_other_quantized_sources_are_still_refused(bf16_model, tmp_path, method):
    state = load_file(bf16_model / "model.safetensors")
    path = write_release(bf16_model, tmp_path / method, state, {"quant_method": method, "bits": 4})
    with pytest.raises(ModelLoadError, match=rf"the checkpoint is already quantized \({method}\)"):
        open_model(path)


def test_bitsandbytes_methods_refuse_an_encoded_source(bf16_model, tmp_path):
    """bnb-* goes through transformers' loader, which would keep the release's own FP8 quantization."""
    path, _ = fp8_release(bf16_model, tmp_path / "fp8")
    with pytest.raises(ModelLoadError, match="keeps the fp8 source's own quantization and ignores bitsandbytes'"):
        turboquant.quantize(path, method="bnb-nf4", save_dir=tmp_path / "bnb")
    assert not (tmp_path / "bnb").exists()
