"""Any decoder family transformers ships: discovery, calibration through the family's own forward, every format.

Each family is a tiny random model built on the fly (its own defaults for what the test does not set, such as
tied embeddings). A wrong tensor mapping in a format shows up as a runtime KL far from the torch KL of the
same checkpoint; a wrong calibration capture as block outputs that differ from the model's own forward.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from turboquant.errors import ConfigError, TurboQuantError
from turboquant.formats.base import export, get_format, resolve_options
from turboquant.formats.gguf import model as gguf_model
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

#: The families the issue names: every method, every format.
ISSUE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "cohere",
                  "starcoder2", "glm4", "smollm3", "exaone4", "ernie4_5"]
#: Beyond the issue's list: dense families transformers ships that llama.cpp 0.3.36 loads, and two it does not
#: (GGUF refused up front). The suite runs them through gptq and awq to the family-specific runtimes (GGUF, MLX);
#: the family-agnostic layouts are measured for them by benchmarks/families.py.
EXTRA_FAMILIES = ["gemma", "olmo", "olmo3", "stablelm", "nemotron", "arcee", "seed_oss", "cohere2", "internlm3", "phi",
                  "jais2", "helium", "ministral"]
FAMILIES = ISSUE_FAMILIES + EXTRA_FAMILIES
#: Post-norm blocks: q/k/v read the residual stream with no norm in front, so AWQ has nothing to fold into;
#: OLMo's LayerNorm has no weight.
AWQ_REFUSED = {"olmo2", "olmo3", "exaone4", "olmo"}
#: What each format's own check refuses, and why (the plan check runs the same check, before any work).
FORMAT_REFUSED = {("mlx", "exaone4"), ("mlx", "olmo"), ("mlx", "arcee"), ("mlx", "jais2"), ("mlx", "ministral"),
                  ("gguf", "helium"), ("gguf", "ministral")}
FORMATS = ("gptq", "compressed-tensors", "gguf", "onnx", "mlx")
#: mlx-lm indexes the first full-attention layer, which comes sixth in Gemma 3 and fourth in OLMo 3 / Command R7B.
FAMILY_LAYERS = {"gemma3_text": 6, "olmo3": 4, "cohere2": 4}
#: A runtime's KL of an artifact against torch's KL of the checkpoint it came from. The issue asks for 2x; the
#: measured ratios are 0.99-1.01 (benchmarks/results/families.md), and Gemma 3's local RoPE base left out of its
#: GGUF gave 1.6x, which 2x would have passed.
RUNTIME_KL_RATIO = 1.25

pytestmark = pytest.mark.usefixtures("one_thread")


def _family_model(root, family: str):
    return save_tiny_model(root / family / "tiny", model_type=family, hidden=64, intermediate=128,
                           layers=FAMILY_LAYERS.get(family, 2),
                           vocab=4096, tokenizer_from=REF_MODEL, tie_embeddings=None)


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
    -> every format whose runtime loads the family, its runtime's KL within 1.25x of torch's; the others refused."""
    path = _family_model(tmp_path, family)
    opened = open_model(path)
    n_linears = opened.n_layers * len(opened.arch.linears)
    calib = _calib()
    torch_kl = {}
    extra = family in EXTRA_FAMILIES
    for method in ("gptq", "awq") if extra else ("rtn", "gptq", "awq"):
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
    for fmt in ("gguf", "mlx") if extra else FORMATS:
        spec = get_format(fmt)
        if (fmt, family) in FORMAT_REFUSED:
            with pytest.raises(TurboQuantError, match=family):
                spec.check(ckpt, resolve_options(spec, {}))
            continue
        artifact = export(qdir, fmt, tmp_path / f"a-{fmt}")
        if fmt == "gguf":
            _check_gguf_metadata(artifact, read_config(path))
        kl = validate(artifact, path, HELDOUT, ctx=64, max_tokens=256)["kl"]
        assert torch_kl["gptq"] / RUNTIME_KL_RATIO <= kl <= RUNTIME_KL_RATIO * torch_kl["gptq"], (fmt, kl, torch_kl)


def _check_gguf_metadata(artifact, config: dict) -> None:
    """The family's llama.cpp architecture, and every config value its converter writes, are in the file."""
    import gguf

    reader = gguf.GGUFReader(next(artifact.glob("*.gguf")))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    fam = gguf_model.FAMILIES[config["model_type"]]
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[fam.arch]]
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert fields[f"{arch}.rope.dimension_count"] == gguf_model.rope_dims(config)
    for key in fam.keys:
        if config.get(key.field) is not None:
            assert fields[key.template().format(arch=arch)] == pytest.approx(config[key.field]), key.field
    pattern = gguf_model.sliding_layers(config)
    if pattern is not None:
        assert fields[f"{arch}.attention.sliding_window_pattern"] == pattern


@pytest.mark.parametrize("family", ["gemma3_text", "exaone4"])
def test_gguf_sliding_window_shorter_than_the_text(tmp_path, family):
    """A 16-token window over 64-token windows of text: llama.cpp slides Gemma 3's local layers as transformers
    does (same KL); for EXAONE 4 at this depth it attends fully, which the export records."""
    path = _family_model(tmp_path, family)
    config = read_config(path) | {"sliding_window": 16}
    (path / "config.json").write_text(json.dumps(config))
    qdir = quantize(path, make_config("gptq", bits=4, group_size=32), tmp_path / "q", progress=False, calib=_calib())
    torch_kl = validate(qdir, path, HELDOUT, ctx=64, max_tokens=256)["kl"]
    artifact = export(qdir, "gguf", tmp_path / "a")
    kl = validate(artifact, path, HELDOUT, ctx=64, max_tokens=256)["kl"]
    notes = read_manifest(artifact / "manifest.json")["format_details"].get("notes", [])
    if family == "gemma3_text":
        assert torch_kl / RUNTIME_KL_RATIO <= kl <= RUNTIME_KL_RATIO * torch_kl and notes == []
    else:
        assert notes == ["llama.cpp's exaone4 runs every layer with full attention where the model slides a "
                         "16-token window (same output up to that many tokens)"]
        assert kl > 2 * torch_kl  # the difference the note warns of


def test_gguf_refuses_what_llama_cpp_would_compute_differently():
    """llama.cpp fixes Gemma's query scale and SmolLM3's RoPE-free layers: a config saying otherwise is refused
    (its GGUF would score differently); a sliding window llama.cpp does not apply is exported with a note."""
    gemma = {"model_type": "gemma2", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
             "head_dim": 16, "query_pre_attn_scalar": 256}
    with pytest.raises(gguf_model.GGUFModelError, match="query_pre_attn_scalar=256 differs from head_dim 16"):
        gguf_model.check_config(gemma)
    gguf_model.check_config(gemma | {"query_pre_attn_scalar": 16})
    smol = {"model_type": "smollm3", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4}
    gguf_model.check_config(smol | {"no_rope_layers": [1, 1, 1, 0]})
    with pytest.raises(gguf_model.GGUFModelError, match="no RoPE on every 4th layer"):
        gguf_model.check_config(smol | {"no_rope_layers": [1, 0, 1, 0]})
    phi_name = r"named 'tiny-phi3' as Phi-3 and needs its token <\|endoftext\|>"
    with pytest.raises(gguf_model.GGUFModelError, match=phi_name):
        gguf_model.check_name_rules("tiny-phi3", REF_MODEL)
    gguf_model.check_name_rules("tiny", REF_MODEL)
    phi = {"model_type": "phi3", "num_hidden_layers": 2, "sliding_window": 2047, "max_position_embeddings": 4096}
    assert gguf_model.conversion_notes(phi) == [
        "llama.cpp's phi3 runs every layer with full attention where the model slides a 2047-token window "
        "(same output up to that many tokens)"]
    assert gguf_model.conversion_notes(phi | {"sliding_window": None}) == []
    assert gguf_model.sliding_layers({"num_hidden_layers": 3, "sliding_window": 8, "max_position_embeddings": 64,
                                      "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}
                                     ) == [True, True, False]


def test_mlx_refuses_what_mlx_lm_cannot_build():
    """mlx-lm's sliding-window classes index the first full-attention layer; its olmo class exits without ai2-olmo."""
    from turboquant.formats.mlx import check_family

    sliding = {"model_type": "olmo3", "layer_types": ["sliding_attention"] * 3}
    with pytest.raises(TurboQuantError, match="every layer of this olmo3 model slides a window"):
        check_family(sliding)
    check_family(sliding | {"layer_types": ["sliding_attention"] * 3 + ["full_attention"]})
    with pytest.raises(TurboQuantError, match=r"'olmo' class cannot be imported here \(To run olmo install ai2-olmo"):
        check_family({"model_type": "olmo"})


def test_refuses_what_it_could_not_quantize_completely(tiny_model_copy):
    """GPT-2 keeps its projections in Conv1D modules: they would stay float, so the model is refused up front."""
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
