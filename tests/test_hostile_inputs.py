"""Hostile inputs and faults: every case ends in one clear line (the problem and its fix) with a non-zero exit
(or a typed exception from the API), nothing left in the output location, earlier artifacts and the DVC cache
byte-identical, and nothing published.

Each case goes through the CLI in-process (``CliRunner``, stderr captured apart from stdout) against a local
Hub-compatible server (``hub_server``), so even a case that never means to touch the Hub would be caught if it did.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from conftest import CALIB, HELDOUT, HUB_TOKEN, REF_MODEL
from turboquant.cli import app
from turboquant.cli_support import PROGRESS_PREFIX
from turboquant.errors import TurboQuantError

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


def cli(*args: Any, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


# ---------------------------------------------------------------------------------------------------------------
# The contract, in one helper
# ---------------------------------------------------------------------------------------------------------------


def digest(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` with the sha256 of its bytes (directories as such): a byte-level snapshot."""
    out: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = "absent"
            continue
        for p in sorted([root, *root.rglob("*")]):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@dataclass
class Watched:
    """Directories that must come out of a refused command byte-identical (snapshot taken at creation)."""

    roots: tuple[Path, ...]

    def __post_init__(self) -> None:
        self.before = digest(*self.roots)

    def assert_unchanged(self) -> None:
        after = digest(*self.roots)
        changed = sorted(k for k in self.before.keys() | after.keys() if self.before.get(k) != after.get(k))
        assert not changed, f"watched files changed: {changed[:5]}"


def partials(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.glob(f".{name}.*") if ".tmp" in p.name or ".old-" in p.name] if parent.is_dir() else []


def assert_refused(result: Any, problem: str, fix: str, out: Path | None = None,
                   watched: Watched | None = None, hub: Any = None, code: int = 2,
                   out_before: dict[str, str] | None = None) -> str:
    """The whole contract of a refused command; returns its error line.

    ``result`` is a CliRunner result (exactly one line on stderr, ``turboquant: error: PROBLEM. Fix: FIX.``, exit
    ``code``) or a raised exception (a ``TurboQuantError`` whose text is that one line). ``problem`` / ``fix`` are
    regexes searched in the two halves. ``out`` must be absent afterwards (or, with ``out_before``, unchanged) with
    no ``.tmp-`` / ``.old-`` sibling; ``watched`` must be byte-identical; ``hub`` (the test server) must hold no
    commit beyond the repos' initial ones and have received no commit or upload.
    """
    if isinstance(result, BaseException):
        assert isinstance(result, TurboQuantError), f"untyped exception {type(result).__name__}: {result}"
        line = str(result)
    else:
        assert result.exit_code == code, (result.exit_code, result.stdout[-1000:], result.stderr[-2000:])
        lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith(PROGRESS_PREFIX)]
        assert len(lines) == 1, f"expected one line on stderr besides progress, got {len(lines)}: {lines[:8]}"
        assert lines[0].startswith("turboquant: error: "), lines[0]
        line = lines[0].removeprefix("turboquant: error: ")
        assert "Traceback" not in result.stdout
    assert "\n" not in line and " Fix: " in line, line
    head, _, tail = line.partition(" Fix: ")
    assert re.search(problem, head), f"problem {problem!r} not in {head!r}"
    assert re.search(fix, tail), f"fix {fix!r} not in {tail!r}"
    assert HUB_TOKEN not in line
    if out is not None:
        if out_before is None:
            assert not out.exists(), f"{out} was left behind"
        else:
            assert digest(out) == out_before, f"{out} was changed"
        assert partials(out.parent, out.name) == [], partials(out.parent, out.name)
    if watched is not None:
        watched.assert_unchanged()
    if hub is not None:
        made = [(r, c.title) for r in hub.state.repos for c in hub.state.commits(r) if c.title != "initial commit"]
        assert made == [], f"something was published: {made}"
    return line


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: an earlier run (artifact + DVC cache) that every case must leave alone
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def earlier(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """An earlier run's outputs: a canonical checkpoint, a GPTQ and a GGUF artifact with their validations, and a
    DVC cache holding them (content-addressed copies)."""
    from turboquant.formats import export
    from turboquant.quality.gates import Gates, judge
    from turboquant.methods import make_config
    from turboquant.quantize.pipeline import quantize

    root = tmp_path_factory.mktemp("earlier")
    model = root / "run" / "tiny-llama"
    q4 = quantize(tiny_model, make_config("rtn", bits=4, group_size=32), model / "quantized" / "rtn-w4-g32",
                  progress=False)
    arts = {"gptq": export(q4, "gptq", model / "artifacts" / "rtn-w4-g32-gptq"),
            "gguf": export(q4, "gguf", model / "artifacts" / "rtn-w4-g32-gguf-Q4_0", gguf_type="Q4_0")}
    (model / "eval").mkdir()
    for art in arts.values():
        metrics = {"artifact": str(art), "format": json.loads((art / "manifest.json").read_text())["format"],
                   "ppl": 20.5, "ppl_delta_pct": 2.5, "kl": 0.02, "top1": 0.9, "bits_per_weight": 4.6, "bits": 4,
                   "baseline_ppl": 20.0, "runtime": "test", "ctx": 64, "n_scored": 512}
        metrics["verdict"] = judge(metrics, Gates.for_bits(4)).to_dict()
        (model / "eval" / f"{art.name}.json").write_text(json.dumps(metrics))
    cache = root / "dvc-cache" / "files" / "md5"
    for f in sorted(p for a in arts.values() for p in a.iterdir()):
        md5 = hashlib.md5(f.read_bytes()).hexdigest()
        (cache / md5[:2]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, cache / md5[:2] / md5[2:])
    return {"root": root, "run": model, "quantized": q4, "cache": root / "dvc-cache", **arts}


@pytest.fixture
def hub(hub_server, monkeypatch):
    """The local Hub for every case; huggingface_hub's own back-off sleeps are skipped (they would only slow the
    retries the server's faults cause)."""
    from types import SimpleNamespace

    from huggingface_hub.utils import _http

    import time

    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda s: None, time=time.time,
                                                       monotonic=time.monotonic, perf_counter=time.perf_counter))
    return hub_server


@pytest.fixture
def watched(earlier, tiny_model, hub) -> Watched:
    return Watched((earlier["root"], tiny_model))


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "outputs" / "result"


def rewrite_header(path: Path, change) -> None:
    """Edit a safetensors file's JSON header in place (the data after it unchanged)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def set_tensor(model: Path, name: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = model / "model.safetensors"
    state = load_file(f)
    edit(state[name])
    save_file({k: v.contiguous() for k, v in state.items()}, f, metadata={"format": "pt"})


Q = ("--method", "rtn", "--bits", "4", "--group-size", "32")

# ---------------------------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------------------------


def test_truncated_safetensors(tiny_model_copy, out, watched, hub):
    f = tiny_model_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = cli("quantize", tiny_model_copy, *Q, "--out", out)
    assert_refused(r, r"model\.safetensors is (truncated|not a readable safetensors file)", "download it again",
                   out, watched, hub)


def test_safetensors_header_lies_about_offsets(tiny_model_copy, out, watched, hub):
    def lie(h):
        t = h["model.layers.1.mlp.down_proj.weight"]
        t["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][1] + 4096]
    rewrite_header(tiny_model_copy / "model.safetensors", lie)
    r = cli("quantize", tiny_model_copy, *Q, "--out", out)
    assert_refused(r, r"model\.safetensors is not a readable safetensors file", "corrupt: download it again",
                   out, watched, hub)


def test_safetensors_header_lies_about_a_dtype_of_another_size(tiny_model_copy, out, watched, hub):
    rewrite_header(tiny_model_copy / "model.safetensors",
                   lambda h: h["model.layers.0.self_attn.q_proj.weight"].__setitem__("dtype", "F16"))
    r = cli("quantize", tiny_model_copy, *Q, "--out", out)
    assert_refused(r, r"model\.safetensors is not a readable safetensors file", "download it again",
                   out, watched, hub)


def test_safetensors_header_lies_about_a_dtype_of_the_same_size(tiny_model_copy, out, watched, hub):
    """F32 bytes declared I32: the file is self-consistent, the weight is not a float: refused, never quantized."""
    rewrite_header(tiny_model_copy / "model.safetensors",
                   lambda h: h["model.layers.0.self_attn.q_proj.weight"].__setitem__("dtype", "I32"))
    r = cli("quantize", tiny_model_copy, *Q, "--out", out)
    assert_refused(r, r"model\.layers\.0\.self_attn\.q_proj\.weight is stored as I32, not as a floating-point",
                   "header is wrong .*original", out, watched, hub)


def test_a_shard_missing_from_the_index(tiny_model_copy, out, watched, hub):
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_model_copy / "model.safetensors")
    (tiny_model_copy / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tiny_model_copy / shard, metadata={"format": "pt"})
    (tiny_model_copy / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    (tiny_model_copy / "model-00002-of-00002.safetensors").unlink()
    r = cli("quantize", tiny_model_copy, *Q, "--out", out)
    assert_refused(r, r"shard model-00002-of-00002\.safetensors named in model\.safetensors\.index\.json is missing",
                   "download the missing shard", out, watched, hub)


def test_config_json_missing(tiny_model_copy, out, watched, hub):
    (tiny_model_copy / "config.json").unlink()
    r = cli("quantize", tiny_model_copy, *Q, "--out", out)
    assert_refused(r, r"has no config\.json", r"model directory \(with config\.json\)", out, watched, hub)


def test_config_json_invalid(tiny_model_copy, out, watched, hub):
    (tiny_model_copy / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    r = cli("quantize", tiny_model_copy, *Q, "--out", out)
    assert_refused(r, r"config\.json is not valid JSON", r"restore config\.json", out, watched, hub)


def test_unsupported_architecture(tiny_model_copy, out, watched, hub):
    cfg = json.loads((tiny_model_copy / "config.json").read_text())
    (tiny_model_copy / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2",
                                                             "architectures": ["GPT2LMHeadModel"]}))
    r = cli("quantize", tiny_model_copy, *Q, "--out", out)
    assert_refused(r, r"'gpt2' block weight .*c_attn\.weight .* is not an nn\.Linear and would stay unquantized",
                   r"dedicated entry", out, watched, hub)


@pytest.mark.parametrize("tensor,value", [("model.layers.1.mlp.up_proj.weight", float("nan")),
                                          ("model.embed_tokens.weight", float("inf"))])
def test_nan_or_inf_weights_are_refused_naming_the_tensor(tiny_model_copy, out, watched, hub, tensor, value):
    set_tensor(tiny_model_copy, tensor, lambda t: t.view(-1)[7].fill_(value))
    r = cli("quantize", tiny_model_copy, *Q, "--out", out)
    assert_refused(r, rf"tensor {re.escape(tensor)} holds 1 NaN/Inf value", "corrupt .* use a good revision",
                   out, watched, hub)


def test_only_pickle_weights_are_refused_without_allow_pickle(tiny_model_copy, out, watched, hub):
    import torch
    from safetensors.torch import load_file

    state = load_file(tiny_model_copy / "model.safetensors")
    torch.save(state, tiny_model_copy / "pytorch_model.bin")
    (tiny_model_copy / "model.safetensors").unlink()
    r = cli("quantize", tiny_model_copy, *Q, "--out", out)
    assert_refused(r, r"only pickle weights \(pytorch_model\.bin\), which can run arbitrary code",
                   "convert the checkpoint to safetensors, or pass --allow-pickle", out, watched, hub)


REMOTE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
raise SystemExit("remote code ran")
"""


def _with_remote_code(model: Path, marker: Path, model_type: str) -> None:
    (model / "modeling_evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    (model / "configuration_evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                 "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (model / "config.json").write_text(json.dumps(cfg))


def test_remote_code_of_an_unknown_architecture_is_refused_never_run(tiny_model_copy, out, watched, hub, tmp_path):
    marker = tmp_path / "remote-code-ran"
    _with_remote_code(tiny_model_copy, marker, "evil")
    r = cli("quantize", tiny_model_copy, *Q, "--out", out)
    assert_refused(r, r"architecture 'evil' is not a causal LM that transformers [\d.]+ implements",
                   r"ships natively \(custom `auto_map` code is never run\)", out, watched, hub)
    r = cli("eval", tiny_model_copy, "--text", HELDOUT, "--ctx", "32", "--max-tokens", "64")
    assert r.exit_code != 0 and len(r.stderr.strip().splitlines()) == 1 and "Fix:" in r.stderr
    assert not marker.exists()


def test_remote_code_beside_a_native_architecture_is_never_run(tiny_model_copy, out, watched, hub, tmp_path):
    """auto_map + modeling_*.py on a llama: quantized and evaluated with transformers' own llama; the repo's code
    is neither imported nor carried into the output."""
    marker = tmp_path / "remote-code-ran"
    _with_remote_code(tiny_model_copy, marker, "llama")
    r = cli("quantize", tiny_model_copy, *Q, "--out", out)
    assert r.exit_code == 0, r.stderr
    r = cli("eval", out, "--text", HELDOUT, "--ctx", "32", "--max-tokens", "64")
    assert r.exit_code == 0, r.stderr
    assert not marker.exists() and not list(out.glob("*.py"))
    watched.assert_unchanged()


# ---------------------------------------------------------------------------------------------------------------
# Calibration data and tokenizers
# ---------------------------------------------------------------------------------------------------------------


def test_empty_calibration_data(tiny_model, out, watched, hub, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    r = cli("quantize", tiny_model, "--method", "gptq", "--group-size", "32", "--data", empty, "--n-samples", "2",
            "--seqlen", "32", "--out", out)
    assert_refused(r, "the calibration data holds no text", "non-empty text", out, watched, hub)


def test_calibration_text_shorter_than_one_window(tiny_model, out, watched, hub, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of words here.")
    r = cli("quantize", tiny_model, "--method", "gptq", "--group-size", "32", "--data", short, "--n-samples", "2",
            "--seqlen", "256", "--out", out)
    assert_refused(r, r"the calibration text has \d+ tokens, fewer than one window of 256",
                   "add more text or lower --seqlen", out, watched, hub)


def test_tokenizer_missing(tiny_model_copy, watched, hub, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tiny_model_copy / name).unlink(missing_ok=True)
    calib = tmp_path / "cal" / "calib.safetensors"
    r = cli("calibrate", tiny_model_copy, "--data", CALIB / "tiny.txt", "--n-samples", "2", "--seqlen", "32",
            "--out", calib)
    assert_refused(r, "no usable tokenizer in", r"copy the model's tokenizer files", calib, watched, hub)


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory) -> Path:
    """A tiny llama whose embedding has 512 rows, shipped with a 4096-token tokenizer (another model's)."""
    from turboquant.io.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("vocab") / "small-vocab", hidden=64, intermediate=128, layers=1,
                           heads=4, kv_heads=2, vocab=512, tokenizer_from=REF_MODEL)


def test_tokenizer_larger_than_the_model_vocabulary(small_vocab_model, out, watched, hub):
    r = cli("quantize", small_vocab_model, "--method", "gptq", "--group-size", "32", "--data", CALIB / "tiny.txt",
            "--n-samples", "2", "--seqlen", "32", "--out", out)
    assert_refused(r, r"the tokenizer in .* has \d+ tokens but the model's vocab_size is 512",
                   "use the tokenizer the model was trained with", out, watched, hub)


def test_calibration_set_from_another_tokenizer(small_vocab_model, tiny_model, out, watched, hub, tmp_path):
    calib = tmp_path / "calib.safetensors"
    assert cli("calibrate", tiny_model, "--data", CALIB / "tiny.txt", "--n-samples", "4", "--seqlen", "64",
               "--out", calib).exit_code == 0
    r = cli("quantize", small_vocab_model, "--method", "gptq", "--group-size", "32", "--calib", calib, "--out", out)
    assert_refused(r, r"calibration token id \d+ is outside the model's vocabulary \(512\)",
                   "rebuild the calibration set with this model's tokenizer", out, watched, hub)


def test_corrupt_calibration_file(tiny_model, out, watched, hub, tmp_path):
    calib = tmp_path / "calib.safetensors"
    calib.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    r = cli("quantize", tiny_model, "--method", "gptq", "--group-size", "32", "--calib", calib, "--out", out)
    assert_refused(r, "is not a calibration file", "rebuild it with `turboquant calibrate`", out, watched, hub)


# ---------------------------------------------------------------------------------------------------------------
# Schemes and formats
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", ["1", "9", "16"])
def test_bits_out_of_range(tiny_model, out, watched, hub, bits):
    r = cli("quantize", tiny_model, "--bits", bits, "--group-size", "32", "--out", out)
    assert_refused(r, rf"bits={bits} is out of range", "use an integer from 2 to 8", out, watched, hub)


@pytest.mark.parametrize("group", ["48", "-2", "4"])
def test_group_size_out_of_range(tiny_model, out, watched, hub, group):
    r = cli("quantize", tiny_model, "--bits", "4", "--group-size", group, "--out", out)
    assert_refused(r, rf"group_size={group} is not a valid group size", r"power of two >= 8", out, watched, hub)


def test_group_size_not_dividing_the_input_dimension(tiny_model, out, watched, hub):
    r = cli("quantize", tiny_model, "--bits", "4", "--group-size", "256", "--out", out)
    assert_refused(r, r"group_size 256 does not divide the input dimension 64 of model\.layers\.0\.self_attn\.q_proj",
                   r"use a group size that divides 64", out, watched, hub)


@pytest.fixture(scope="module")
def q3(tiny_model, tmp_path_factory) -> Path:
    from turboquant.methods import make_config
    from turboquant.quantize.pipeline import quantize

    return quantize(tiny_model, make_config("rtn", bits=3, group_size=32), tmp_path_factory.mktemp("q3") / "w3",
                    progress=False)


@pytest.mark.parametrize("fmt,args,problem,fix", [
    ("awq", [], "the AWQ GEMM layout holds 4-bit codes only, not 3-bit", "re-quantize with --bits 4"),
    ("gguf", ["--gguf-type", "Q4_0"], "Q4_0", r"re-quantize|--gguf-type"),
    ("onnx", ["--option", "colour=blue"], r"format 'onnx' has no option\(s\) colour", "use only its options"),
])
def test_a_scheme_the_format_cannot_hold(q3, out, watched, hub, fmt, args, problem, fix):
    r = cli("export", q3, "--format", fmt, *args, "--out", out)
    assert_refused(r, problem, fix, out, watched, hub)


def test_an_impossible_plan_fails_before_the_run_starts(tiny_model, watched, hub, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "models": [{"id": str(tiny_model)}], "evaluation": {"text": str(HELDOUT), "ctx": 32, "max_tokens": 64},
        "quantize": [{"method": "rtn", "options": {"bits": 4, "group_size": 64},
                      "formats": [{"format": "gguf", "gguf_type": "Q4_0"}]}]}))
    run_dir = tmp_path / "run"
    r = cli("run", params, "--run-dir", run_dir, "--no-progress")
    assert_refused(r, r"rtn-w4-g64 -> gguf-Q4_0: .*g64", "expand_groups=true", run_dir, watched, hub)


# ---------------------------------------------------------------------------------------------------------------
# Repo ids and output locations
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo", ["org/../../etc", "../secrets", "org/mo del", "org/model;rm -rf", "a/b/c",
                                  "org/" + "x" * 97])
def test_repo_id_with_path_traversal_or_illegal_characters(out, watched, hub, repo):
    r = cli("quantize", repo, *Q, "--out", out)
    assert_refused(r, "is neither a local model directory nor a valid Hub repo id", r"repo id like 'org/model'",
                   out, watched, hub)
    assert hub.state.requests == []  # refused before any request


@pytest.mark.parametrize("repo", ["tq-pub/../../etc", "tq-pub/a b", "tq-pub/x/y"])
def test_publish_to_an_illegal_repo_id(earlier, watched, hub, repo):
    r = cli("publish", earlier["gptq"], "--repo", repo)
    assert_refused(r, r"is not a repo id of the form namespace/name", "--repo namespace/name", None, watched, hub)
    assert hub.state.requests == []


def test_output_under_a_regular_file(tiny_model, watched, hub, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "sub" / "q"
    r = cli("quantize", tiny_model, *Q, "--out", out)
    assert_refused(r, r"cannot create .*a-file/sub \(Not a directory\)", "choose a writable --out location",
                   None, watched, hub)
    assert blocker.read_text() == "not a directory"


def test_output_on_a_read_only_filesystem(tiny_model, watched, hub):
    """/sys is read-only even for root: the temporary directory cannot be made and nothing is written."""
    out = Path("/sys/turboquant-hostile-test")
    r = cli("quantize", tiny_model, *Q, "--out", out)
    assert_refused(r, r"cannot write in /sys", "choose a writable --out location", out, watched, hub)


def test_existing_output_is_not_replaced_without_overwrite(earlier, watched, hub):
    target = earlier["gptq"]
    before = digest(target)
    r = cli("export", earlier["quantized"], "--format", "gptq", "--out", target)
    assert_refused(r, "already exists", "choose another --out or pass --overwrite", target, watched, hub,
                   out_before=before)


def _enospc_after(real, fraction: float = 0.5):
    """A writer that writes part of its file, then fails as a full disk does."""

    def write(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        path = Path(filename)
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    return write


def test_disk_full_while_exporting_over_an_earlier_artifact(earlier, watched, hub, monkeypatch):
    """--overwrite onto the earlier artifact; the disk fills mid-shard: the partial file goes, the earlier artifact
    stays byte for byte."""
    import safetensors.torch

    before = digest(earlier["gptq"])
    monkeypatch.setattr(safetensors.torch, "save_file", _enospc_after(safetensors.torch.save_file))
    r = cli("export", earlier["quantized"], "--format", "gptq", "--out", earlier["gptq"], "--overwrite")
    assert_refused(r, r"the disk is full \(.*\.safetensors\)", "free space or choose another --out location",
                   earlier["gptq"], watched, hub, out_before=before)


def test_disk_full_while_writing_a_gguf(earlier, out, watched, hub, monkeypatch):
    import gguf

    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def write_tensor_data(self, tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path) if hasattr(self, "path") else None)
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_tensor_data)
    r = cli("export", earlier["quantized"], "--format", "gguf", "--gguf-type", "Q4_0", "--out", out)
    assert_refused(r, "the disk is full", "free space or choose another --out location", out, watched, hub)
    assert calls["n"] == 5


def test_disk_full_while_quantizing(tiny_model, out, watched, hub, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _enospc_after(safetensors.torch.save_file, 0.3))
    r = cli("quantize", tiny_model, *Q, "--out", out)
    assert_refused(r, r"the disk is full \(.*model-00001-of-00003\.safetensors\)", "free space", out, watched, hub)


# ---------------------------------------------------------------------------------------------------------------
# The Hub
# ---------------------------------------------------------------------------------------------------------------


def test_hub_answers_429_then_500_then_times_out(earlier, watched, hub, monkeypatch):
    monkeypatch.setenv("TURBOQUANT_HUB_TIMEOUT", "0.5")
    hub.state.fail(r"/commit/main$", 429, 500, "timeout:2", "timeout:2")
    r = cli("publish", earlier["gguf"], "--repo", "tq-pub/slow-GGUF")
    line = assert_refused(r, r"publishing rtn-w4-g32-gguf-Q4_0 to tq-pub/slow-GGUF failed after 4 attempt\(s\)",
                          "nothing was committed; retry later", None, watched, hub)
    assert "timed out" in line.lower()
    assert [s for m, p, s in hub.state.requests if p.endswith("/commit/main")] == ["429", "500", "timeout", "timeout"]
    assert [c.title for c in hub.state.commits("tq-pub/slow-GGUF")] == ["initial commit"]


def test_hub_drops_the_connection_mid_upload(earlier, watched, hub):
    hub.state.fail(r"^/__lfs/[0-9a-f]{64}$", *["drop"] * 100, method="PUT")
    r = cli("publish", earlier["gguf"], "--repo", "tq-pub/dropped-GGUF")
    assert_refused(r, r"publishing rtn-w4-g32-gguf-Q4_0 to tq-pub/dropped-GGUF failed after 4 attempt\(s\)",
                   "nothing was committed", None, watched, hub)
    assert hub.state.count("PUT", r"^/__lfs/") >= 4 and hub.state.count("POST", r"/commit/") == 0
    assert hub.state.lfs == {}


def test_revoked_token(earlier, watched, hub):
    hub.state.token = "hf_theOnlyValidTokenNow"  # HF_TOKEN (HUB_TOKEN) is no longer accepted
    r = cli("publish", earlier["gptq"], "--repo", "tq-pub/revoked-GPTQ-Int4")
    assert_refused(r, r"the Hub refused to write tq-pub/revoked-GPTQ-Int4 \(401: the token is invalid, revoked",
                   "set HF_TOKEN .* to a valid token with write access", None, watched, hub)
    assert hub.state.repos == {}


def test_unapproved_artifact_is_not_published(earlier, watched, hub, tmp_path):
    validation = json.loads((earlier["run"] / "eval" / f"{earlier['gptq'].name}.json").read_text())
    validation["verdict"] = {"passed": False, "reasons": ["mean KL divergence 0.9 > 0.1"]}
    bad = tmp_path / "validation.json"
    bad.write_text(json.dumps(validation))
    r = cli("publish", earlier["gptq"], "--repo", "tq-pub/x-GPTQ-Int4", "--validation", bad)
    assert_refused(r, r"artifact rtn-w4-g32-gptq is not approved \(mean KL", "only artifacts whose gates passed",
                   None, watched, hub)
    assert hub.state.requests == []


# ---------------------------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------------------------


def _plan(tiny_model: Path, **changes: Any) -> dict:
    plan = {"models": [{"id": str(tiny_model)}], "evaluation": {"text": str(HELDOUT), "ctx": 32, "max_tokens": 64},
            "quantize": [{"method": "rtn", "options": {"bits": 4, "group_size": 32}, "formats": ["gptq"]}]}
    plan.update(changes)
    return plan


@pytest.mark.parametrize("changes,problem,fix", [
    ({"model": "x"}, r"params 'params' has unknown key\(s\) model", "use only: calibration, evaluation"),
    ({"evaluation": {"text": str(HELDOUT), "window": 5}}, r"params 'evaluation' has unknown key\(s\) window",
     "use only: ctx"),
    ({"quantize": [{"method": "rtn", "options": {"bits": 4, "group_size": 32, "colour": 1}, "formats": ["gptq"]}]},
     r"unknown option", r"colour|use"),
], ids=["top", "evaluation", "method-option"])
def test_params_with_unknown_keys(tiny_model, watched, hub, tmp_path, changes, problem, fix):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_plan(tiny_model, **changes)))
    run_dir = tmp_path / "run"
    r = cli("run", params, "--run-dir", run_dir, "--no-progress")
    assert_refused(r, problem, fix, run_dir, watched, hub)


@pytest.mark.parametrize("changes,problem,fix", [
    ({"calibration": {"data": [str(CALIB / "tiny.txt")], "n_samples": "many"}},
     r"params 'calibration\.n_samples' is 'many' \(str\)", r"write it as int >= 1, e\.g\. n_samples: 128"),
    ({"evaluation": {"text": str(HELDOUT), "ctx": "big"}}, r"params 'evaluation\.ctx' is 'big'", "int >= 1"),
    ({"evaluation": {"ctx": 32}}, r"sets no evaluation\.text", "set evaluation.text"),
    ({"quantize": [{"method": "rtn", "options": {"bits": "four", "group_size": 32}, "formats": ["gptq"]}]},
     r"bits='four' is out of range", "use an integer from 2 to 8"),
    ({"quantize": "rtn"}, r"params 'quantize' is empty", "list at least one method"),
    ({"publish": {"enabled": "yes please", "namespace": "me"}}, r"params 'publish\.enabled' is 'yes please'",
     "write it as bool"),
], ids=["n_samples", "ctx", "no-text", "bits", "quantize-str", "publish-enabled"])
def test_params_with_wrong_types(tiny_model, watched, hub, tmp_path, changes, problem, fix):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_plan(tiny_model, **changes)))
    run_dir = tmp_path / "run"
    r = cli("run", params, "--run-dir", run_dir, "--no-progress")
    assert_refused(r, problem, fix, run_dir, watched, hub)


def test_params_that_are_not_yaml(watched, hub, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("models: [unclosed\n  - x: {")
    r = cli("run", params, "--run-dir", tmp_path / "run", "--no-progress")
    assert_refused(r, "is not valid YAML", "fix the YAML syntax", tmp_path / "run", watched, hub)


# ---------------------------------------------------------------------------------------------------------------
# Artifacts changed after their manifest was written
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tampered(earlier, tmp_path) -> Path:
    """A copy of the earlier GPTQ artifact (with its validation) whose config.json was edited after export."""
    art = tmp_path / "run" / "tiny-llama" / "artifacts" / earlier["gptq"].name
    shutil.copytree(earlier["gptq"], art)
    (art.parent.parent / "eval").mkdir()
    shutil.copyfile(earlier["run"] / "eval" / f"{art.name}.json", art.parent.parent / "eval" / f"{art.name}.json")
    cfg = art / "config.json"
    cfg.chmod(0o644)
    cfg.write_text(cfg.read_text().replace('"bits": 4', '"bits": 8'))
    return art


def test_publish_refuses_a_file_modified_after_the_manifest(tampered, watched, hub):
    before = digest(tampered)
    r = cli("publish", tampered, "--repo", "tq-pub/tampered-GPTQ-Int4")
    assert_refused(r, r"file 'config\.json' of rtn-w4-g32-gptq is modified since export",
                   "re-export and re-validate the artifact", tampered, watched, hub, out_before=before)
    assert hub.state.requests == []


def test_publish_refuses_a_file_added_after_the_manifest(earlier, watched, hub, tmp_path):
    art = tmp_path / "art" / earlier["gguf"].name
    shutil.copytree(earlier["gguf"], art)
    (art / "notes.txt").write_text("added by hand")
    validation = earlier["run"] / "eval" / f"{art.name}.json"
    r = cli("publish", art, "--repo", "tq-pub/added-GGUF", "--validation", validation)
    assert_refused(r, r"file 'notes\.txt' of rtn-w4-g32-gguf-Q4_0 is unlisted since export", "re-export",
                   None, watched, hub)


def test_reproduce_refuses_a_file_modified_after_the_manifest(tampered, watched, hub, monkeypatch):
    """The rebuild itself is identical; the artifact's own copy is not: exit 4, one line naming the file."""
    monkeypatch.chdir(tampered.parents[3])
    before = digest(tampered)
    r = cli("reproduce", tampered / "manifest.json")
    assert_refused(r, r"file 'config\.json' of rtn-w4-g32-gptq is modified since export", r"restore the artifact",
                   tampered, watched, hub, code=4, out_before=before)
    assert "identical  config.json; artifact copy modified" in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# The API raises the same errors, typed
# ---------------------------------------------------------------------------------------------------------------


def test_the_api_raises_typed_errors(tiny_model_copy, earlier, tmp_path, hub):
    from turboquant.errors import ConfigError, ModelLoadError, OutputError, PublishError
    from turboquant.formats import export
    from turboquant.release.publish import publish
    from turboquant.methods import make_config
    from turboquant.quantize.pipeline import quantize

    watched = Watched((earlier["root"],))
    (tiny_model_copy / "config.json").write_text("{")
    with pytest.raises(ModelLoadError) as e1:
        quantize(tiny_model_copy, make_config("rtn", bits=4, group_size=32), tmp_path / "q", progress=False)
    with pytest.raises(ConfigError) as e2:
        make_config("rtn", bits=12)
    with pytest.raises(OutputError) as e3:
        export(earlier["quantized"], "gptq", earlier["gptq"])
    with pytest.raises(PublishError) as e4:
        publish(earlier["gptq"], "tq-pub/../x", validation={})
    for exc, problem in ((e1, "not valid JSON"), (e2, "bits=12"), (e3, "already exists"), (e4, "not a repo id")):
        assert_refused(exc.value, problem, ".", tmp_path / "q", watched, hub)
