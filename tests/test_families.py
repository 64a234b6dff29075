"""Any decoder family transformers ships: discovery, calibration through the family's own forward, every format.

Each family is a tiny random model built on the fly (its own defaults for what the test does not set, such as
tied embeddings). A wrong tensor mapping in a format shows up as a runtime KL far from the torch KL of the
same checkpoint; a wrong calibration capture as block outputs that differ from the model's own forward.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from turboquant.errors import ConfigError, TurboQuantError
from turboquant.formats.base import export, get_format, resolve_options
from turboquant.io.arch import ARCHITECTURES, arch_for
from turboquant.io.calibration import CalibrationRecipe, CalibrationSet
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.io.manifest import read_manifest
from turboquant.io.model import open_model, read_config
from turboquant.io.tiny import save_tiny_model
from turboquant.methods import make_config
from turboquant.quality.validate import validate
from turboquant.quantize.awq import foldable_groups
from turboquant.quantize.pipeline import quantize
from turboquant.quantize.runner import BlockRunner, first_output
from turboquant.release.modelcard import artifact_record, card_body

from conftest import HELDOUT, REF_MODEL

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "cohere",
            "starcoder2", "glm4", "smollm3", "exaone4", "ernie4_5"]
#: Post-norm blocks: q/k/v read the residual stream with no norm in front, so AWQ has nothing to fold into.
AWQ_REFUSED = {"olmo2", "exaone4"}
#: What each format's own check refuses, and why (the plan check runs the same check, before any work).
FORMAT_REFUSED = {("gguf", f) for f in FAMILIES if f not in ARCHITECTURES} | {("mlx", "exaone4")}
FORMATS = ("gptq", "compressed-tensors", "gguf", "onnx", "mlx")

pytestmark = pytest.mark.usefixtures("one_thread")


def _family_model(root, family: str):
    # gemma3_text: mlx-lm's Gemma 3 indexes the first full-attention layer, which comes sixth
    layers = 6 if family == "gemma3_text" else 2
    return save_tiny_model(root / family, model_type=family, hidden=64, intermediate=128, layers=layers, vocab=4096,
                           tokenizer_from=REF_MODEL, tie_embeddings=None)


def _calib(seqlen: int = 32) -> CalibrationSet:
    ids = torch.randint(3, 4000, (4, seqlen), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(ids, CalibrationRecipe(("synthetic",), n_samples=4, seqlen=seqlen))


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_reproduces_the_models_own_forward(tmp_path, family):
    """Block by block through the runner (each block called as the model's forward calls it: masks, RoPE,
    sliding windows, embedding scale) gives the model's own last-block output."""
    path = _family_model(tmp_path, family)
    opened = open_model(path)
    calib = _calib()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    blocks = model.get_submodule(opened.arch.blocks_prefix)
    seen: list[torch.Tensor] = []
    handle = blocks[-1].register_forward_hook(lambda _m, _a, out: seen.append(first_output(out)))
    with torch.no_grad():
        model(input_ids=calib.input_ids, use_cache=False)
    handle.remove()
    runner = BlockRunner.start(opened, calib.input_ids, batch_size=2)
    for i in range(opened.n_layers):
        block = runner.load_block(i)
        runner.advance(runner.forward(block))
        runner.release_block(i)
    torch.testing.assert_close(runner.hidden, seen[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in ARCHITECTURES])
def test_discovery_equals_the_table(tmp_path, family):
    """A table entry is only a speed-up: discovery finds the same blocks and linears, tracing the same groups,
    and AWQ's verified feeders are the table's (4 KV heads: v_proj -> o_proj folds)."""
    path = save_tiny_model(tmp_path / family, model_type=family, hidden=64, intermediate=128, layers=2,
                           kv_heads=4, vocab=4096, tokenizer_from=REF_MODEL)
    table = ARCHITECTURES[family]
    found = arch_for(read_config(path), path, use_table=False)
    assert found.discovered and not arch_for(read_config(path), path).discovered
    assert (found.blocks_prefix, found.linears, found.n_layers) == (table.blocks_prefix, table.linears, 2)
    opened = open_model(path)
    opened.arch = found
    runner = BlockRunner.start(opened, _calib().input_ids)
    block = runner.load_block(0)
    traced = runner.groups(block)
    assert [g.linears for g in traced] == [g.linears for g in table.groups]
    folded = foldable_groups(block, traced, runner.hidden[:1], runner.layer_kwargs, family)
    assert [(g.feeder, g.fold_offset) for g in folded] == [(g.feeder, 0.0) for g in table.groups]


def test_gemma_norm_folds_with_its_offset(tmp_path):
    """Gemma's norms multiply by ``1 + w``: AWQ's fold is proven with that offset, and the block is unchanged."""
    path = _family_model(tmp_path, "gemma2")
    opened = open_model(path)
    runner = BlockRunner.start(opened, _calib().input_ids)
    block = runner.load_block(0)
    folded = foldable_groups(block, runner.groups(block), runner.hidden[:1], runner.layer_kwargs, "gemma2")
    by_linear = {g.linears[0]: g for g in folded}
    assert by_linear["self_attn.q_proj"].feeder == "input_layernorm"
    assert by_linear["self_attn.q_proj"].fold_offset == 1.0
    assert by_linear["mlp.gate_proj"].feeder == "pre_feedforward_layernorm"
    assert by_linear["mlp.down_proj"].feeder == "mlp.up_proj"
    assert by_linear["self_attn.o_proj"].feeder is None  # GQA: v_proj is narrower than o_proj's input


@pytest.mark.parametrize("family", FAMILIES)
def test_family_quantizes_and_loads_in_every_runtime(tmp_path, family):
    """rtn, gptq and awq (where the block folds) -> canonical checkpoint, scored in torch; the gptq checkpoint
    -> every format whose runtime loads the family, its runtime's KL within 2x of torch's; the others refused."""
    path = _family_model(tmp_path, family)
    opened = open_model(path)
    n_linears = opened.n_layers * len(opened.arch.linears)
    calib = _calib()
    torch_kl = {}
    for method in ("rtn", "gptq", "awq"):
        config = make_config(method, bits=4, group_size=32)
        if method == "awq" and family in AWQ_REFUSED:
            with pytest.raises(ConfigError, match="AWQ cannot fold scales into the input of self_attn.q_proj"):
                quantize(opened, config, tmp_path / f"q-{method}", progress=False, calib=calib)
            assert not (tmp_path / f"q-{method}").exists()
            continue
        qdir = quantize(opened, config, tmp_path / f"q-{method}", progress=False, calib=calib)
        assert len(QuantizedCheckpoint.open(qdir).modules) == n_linears
        kl = validate(qdir, path, HELDOUT, ctx=64, max_tokens=256)["kl"]
        assert 0 < kl < 0.05, (method, kl)
        torch_kl[method] = kl
    qdir = tmp_path / "q-gptq"
    ckpt = QuantizedCheckpoint.open(qdir)
    for fmt in FORMATS:
        spec = get_format(fmt)
        if (fmt, family) in FORMAT_REFUSED:
            with pytest.raises(TurboQuantError, match=family):
                spec.check(ckpt, resolve_options(spec, {}))
            continue
        artifact = export(qdir, fmt, tmp_path / f"a-{fmt}")
        kl = validate(artifact, path, HELDOUT, ctx=64, max_tokens=256)["kl"]
        assert torch_kl["gptq"] / 2 <= kl <= 2 * torch_kl["gptq"], (fmt, kl, torch_kl["gptq"])


def test_refuses_what_it_could_not_quantize_completely(tiny_model_copy):
    """GPT-2 keeps its projections in Conv1D modules: they would stay float, so the model is refused up front."""
    import json

    cfg = json.loads((tiny_model_copy / "config.json").read_text())
    cfg.update(model_type="gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=4096)
    (tiny_model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TurboQuantError, match=r"block weight attn\.c_attn\.weight .* is not an nn\.Linear"):
        open_model(tiny_model_copy)



def test_indivisible_group_size_follows_the_plan_policy(tmp_path):
    """Hidden 96 with group 64: refused by default (nothing written); with ``indivisible: largest_divisor`` those
    layers get group 32 (the largest power of two dividing 96), recorded per layer in the config, as a fallback
    in the manifest and on the card."""
    path = save_tiny_model(tmp_path / "m", hidden=96, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=4096,
                           tokenizer_from=REF_MODEL)
    with pytest.raises(ConfigError, match="group_size 64 does not divide the input dimension 96"):
        quantize(path, make_config("rtn", bits=4, group_size=64), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    calib = _calib()
    expected = ["group size 32 instead of 64 for 12 layer(s) with 96 inputs (64 does not divide 96; "
                "indivisible=largest_divisor)"]
    for method in ("rtn", "gptq", "awq"):
        config = make_config(method, bits=4, group_size=64, indivisible="largest_divisor")
        qdir = quantize(path, config, tmp_path / method, progress=False, calib=calib)
        ckpt = QuantizedCheckpoint.open(qdir)
        groups = {m: ckpt.scheme(m).group_size for m in ckpt.modules}
        assert groups["model.layers.1.self_attn.q_proj"] == groups["model.layers.0.mlp.up_proj"] == 32
        assert groups["model.layers.1.mlp.down_proj"] == 64
        assert ckpt.meta["config"]["group_overrides"]["model.layers.0.self_attn.o_proj"] == 32
        assert expected[0] in ckpt.meta["fallbacks"]
        assert 0 < validate(qdir, path, HELDOUT, ctx=64, max_tokens=256)["kl"] < 0.05
    artifact = export(tmp_path / "gptq", "gptq", tmp_path / "a-gptq")
    manifest = read_manifest(artifact / "manifest.json")
    assert manifest["fallbacks"] == expected
    record = artifact_record("gptq", manifest, {"verdict": {"passed": True}}, {})
    assert f"Changed from what was asked: {expected[0]}." in card_body("org/m-GPTQ", [record], base_model=None)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_scale_beyond_float16_fails_naming_the_tensor(tiny_model_copy, tmp_path, method):
    """A weight row of magnitude 3e6 at 4 bits needs a scale above 65504: refused, never clamped (which would
    clip the row), and nothing is written; at 8 bits (scale 2.4e4) the same row is quantized."""
    from safetensors.torch import load_file, save_file

    f = tiny_model_copy / "model.safetensors"
    state = load_file(f)
    state["model.layers.1.mlp.up_proj.weight"][5] = 3e6
    save_file(state, f, metadata={"format": "pt"})
    calib = _calib()
    overflow = r"model\.layers\.1\.mlp\.up_proj needs a quantization scale of [\d.]+e\+05, beyond float16's 65504"
    with pytest.raises(ConfigError, match=overflow):
        quantize(tiny_model_copy, make_config(method, bits=4, group_size=32), tmp_path / "q", progress=False,
                 calib=calib)
    assert not (tmp_path / "q").exists()
    qdir = quantize(tiny_model_copy, make_config(method, bits=8, group_size=32), tmp_path / "q8", progress=False,
                    calib=calib)
    row = QuantizedCheckpoint.open(qdir).quantized_tensor("model.layers.1.mlp.up_proj").dequantize(torch.float32)[5]
    torch.testing.assert_close(row, torch.full_like(row, 3e6), rtol=5e-3, atol=0)  # the symmetric grid's edge


def test_export_refuses_an_incomplete_or_corrupt_checkpoint(tiny_model, tmp_path):
    """Every linear of the model must be quantized and every scale positive and finite before any export."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    qdir = quantize(tiny_model, make_config("rtn", bits=4, group_size=32), tmp_path / "q", progress=False)
    export(qdir, "gptq", tmp_path / "ok")
    broken = tmp_path / "dropped"
    shutil.copytree(qdir, broken)
    meta = json.loads((broken / "turboquant.json").read_text())
    del meta["modules"]["model.layers.1.mlp.down_proj"]
    (broken / "turboquant.json").write_text(json.dumps(meta))
    with pytest.raises(TurboQuantError, match=r"1 of the model's 14 linears are not quantized .*model\.layers\.1\.mlp"):
        export(broken, "gptq", tmp_path / "a1")
    assert not (tmp_path / "a1").exists()
    with pytest.raises(TurboQuantError, match=r"1 of the model's 14 linears are not quantized"):
        validate(broken, tiny_model, HELDOUT, ctx=64, max_tokens=256)
    zeroed = tmp_path / "zeroed"
    shutil.copytree(qdir, zeroed)
    name = "model.layers.0.self_attn.k_proj.qscale"
    shard = next(f for f in zeroed.glob("*.safetensors") if name in load_file(f))
    tensors = load_file(shard)
    tensors[name][3, 0] = 0
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(TurboQuantError, match=rf"{re.escape(name)} holds 1 zero, negative or non-finite scale"):
        export(zeroed, "gptq", tmp_path / "a2")
    assert not (tmp_path / "a2").exists()
