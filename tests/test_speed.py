"""Speed per artifact in its runtime against the float model in the same runtime (issue 19, item 5).

What can be asserted on a noisy shared machine is not a speed-up but what the numbers are made of: the greedy
tokens each runtime decodes on its KV cache (a broken cache path decodes other tokens), the reference each format
is compared with, memory that follows the weights' size, and the way results reach the validation JSON, the CLI,
the report and the model card."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import HELDOUT, REF_MODEL
from turboquant.cli import app
from turboquant.formats.base import export
from turboquant.io.loaders import load_model
from turboquant.methods import make_config
from turboquant.quality.speed import compare, greedy_timing, measure, reference_artifact, speed_line
from turboquant.quantize.pipeline import quantize
from turboquant.release.modelcard import speed_section

PROMPT = torch.randint(0, 4000, (64,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    return quantize(REF_MODEL, make_config("rtn", bits=4, group_size=32),
                    tmp_path_factory.mktemp("speed") / "rtn-w4", progress=False)


def _uncached_greedy(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt.clone()
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.cat([ids, model(ids[None]).logits[0, -1].argmax().reshape(1)])
    return ids[prompt.numel():].tolist()


def test_torch_decode_on_the_kv_cache_gives_the_uncached_tokens():
    model = load_model(REF_MODEL).eval()
    prefill_s, decode_s, tokens = greedy_timing(model, PROMPT, 12)
    assert prefill_s > 0 and decode_s > 0
    assert tokens == _uncached_greedy(model, PROMPT, 12)


def test_each_format_is_compared_with_the_float_model_in_its_own_runtime(w4, tmp_path):
    gguf = export(w4, "gguf", tmp_path / "gguf", gguf_type="Q4_0")
    ref, ref_fmt = reference_artifact("gguf", gguf, REF_MODEL, tmp_path / "ref")
    assert ref_fmt == "gguf" and json.loads((ref / "manifest.json").read_text())["format_options"]["gguf_type"] == "F16"
    assert reference_artifact("gptq", w4, REF_MODEL, tmp_path / "ref") == (REF_MODEL, "hf")
    result = compare(gguf, REF_MODEL, PROMPT, tmp_path / "ref", n_new=16)
    ours, theirs = result["artifact"], result["reference"]
    assert ours["runtime"] == theirs["runtime"] == "llama.cpp" and ours["decode_tokens"] == 16
    # the F16 GGUF in llama.cpp decodes what the float model decodes in torch: the reference is the same model
    float_tokens = _uncached_greedy(load_model(REF_MODEL).eval(), PROMPT, 16)
    assert sum(a == b for a, b in zip(theirs["tokens"], float_tokens)) >= 14, (theirs["tokens"], float_tokens)
    # weights 4x smaller in bytes: less resident memory in the same runtime
    assert result["memory_ratio"] < 0.95 and ours["model_rss_bytes"] > 0
    assert result["decode_speedup"] == pytest.approx(ours["decode_tok_s"] / theirs["decode_tok_s"])
    again = compare(gguf, REF_MODEL, PROMPT, tmp_path / "ref", n_new=16)
    assert again["reference"] == result["reference"]  # one reference measurement serves every artifact
    assert len(list((tmp_path / "ref").glob("speed-*.json"))) == 1


def test_a_failing_measurement_is_one_clear_error(tmp_path):
    from turboquant.errors import DataError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DataError, match="measuring the speed of .* failed"):
        measure(tmp_path, PROMPT, 4)


def test_validate_reports_speed_in_json_cli_and_card(w4, tmp_path):
    out = tmp_path / "v.json"
    r = CliRunner().invoke(app, ["validate", str(w4), "--baseline", str(REF_MODEL), "--text", str(HELDOUT),
                                 "--ctx", "128", "--max-tokens", "512", "--json", str(out)])
    assert r.exit_code == 0, r.output
    speed = json.loads(out.read_text())["speed"]
    assert speed["artifact"]["runtime"] == "torch (dequantized)" and speed["reference"]["runtime"] == "torch"
    assert speed["artifact"]["prompt_tokens"] == 128 and speed_line(speed) in r.output
    record = {"entry": "rtn-w4", "metrics": {"speed": speed}}
    card = "\n".join(speed_section([record]))
    assert "| rtn-w4 | torch (dequantized) | cpu |" in card and "128 tokens, then 32 greedy tokens" in card
    assert speed_section([{"entry": "x", "metrics": {}}]) == []
    quiet = CliRunner().invoke(app, ["validate", str(w4), "--baseline", str(REF_MODEL), "--text", str(HELDOUT),
                                     "--ctx", "128", "--max-tokens", "512", "--no-speed", "--json", str(out)])
    assert quiet.exit_code == 0 and "speed" not in json.loads(out.read_text())


def test_concurrent_llama_cpp_loads_leave_stdout_and_stderr_where_they_were(w4, tmp_path):
    """llama-cpp-python points fds 1 and 2 at /dev/null while it loads; unserialised loads from several threads
    (concurrent validations) could leave them there and swallow every later line, the one-line error included."""
    import os
    import threading

    from turboquant.quality.runtimes import LlamaCppScorer

    gguf = next(export(w4, "gguf", tmp_path / "gguf", gguf_type="Q4_0").glob("*.gguf"))
    before = [os.fstat(fd) for fd in (1, 2)]

    def load() -> None:
        scorer = LlamaCppScorer(gguf)
        scorer.logits(PROMPT[:8])

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = [os.fstat(fd) for fd in (1, 2)]
    assert [(s.st_dev, s.st_ino) for s in after] == [(s.st_dev, s.st_ino) for s in before]
