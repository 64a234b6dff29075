"""Hub: pinned fetch and idempotent, safe publishing, against the local Hub-compatible server (tests/hub_server.py)
with the real huggingface_hub client: model cards, commit counts, retries under injected faults, refusals, and
no token in any output."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import HUB_TOKEN
from turboquant.cli import app
from turboquant.errors import ConfigError, ModelLoadError, PublishError
from turboquant.formats import export
from turboquant.quality.gates import Gates, judge
from turboquant.io.hub import RetryPolicy, fetch_snapshot, latest_commit, list_watch
from turboquant.release.publish import manifest_key, idempotency_key, publish, published_keys, repo_name_for
from turboquant.methods import make_config
from turboquant.quantize.pipeline import quantize

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = "tq-org/tiny-llama"
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)
#: Metrics that pass the default gates of each width (and, with ``passed=False``, a KL that fails them).
GOOD = {4: dict(ppl=20.5, ppl_delta_pct=2.5, kl=0.02, top1=0.9, bits_per_weight=4.6),
        8: dict(ppl=20.1, ppl_delta_pct=0.5, kl=0.004, top1=0.97, bits_per_weight=8.5)}


def _validation(art: Path, bits: int, passed: bool = True) -> dict:
    metrics = {"artifact": str(art), "format": json.loads((art / "manifest.json").read_text())["format"],
               "runtime": "llama.cpp", "text": "/somewhere/heldout/all.txt", "ctx": 256, "n_scored": 2048,
               "baseline_ppl": 20.0, "size_bytes": sum(p.stat().st_size for p in art.iterdir()), "params": 300000,
               "bits": bits, **GOOD[bits]}
    if not passed:
        metrics["kl"] = 0.9
    metrics["verdict"] = judge(metrics, Gates.for_bits(bits)).to_dict()
    return metrics


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """The flow's layout: run/tiny-llama/artifacts/<label> and run/tiny-llama/eval/<label>.json."""
    root = tmp_path_factory.mktemp("hubrun") / "run" / "tiny-llama"
    q4 = quantize(tiny_model, make_config("rtn", bits=4, group_size=32), root / "quantized" / "w4", progress=False)
    q8 = quantize(tiny_model, make_config("rtn", bits=8, group_size=32), root / "quantized" / "w8", progress=False)
    arts = {"gguf-Q4_0": (export(q4, "gguf", root / "artifacts" / "rtn-w4-gguf-Q4_0", gguf_type="Q4_0"), 4),
            "gguf-Q8_0": (export(q8, "gguf", root / "artifacts" / "rtn-w8-gguf-Q8_0", gguf_type="Q8_0"), 8),
            "gptq": (export(q4, "gptq", root / "artifacts" / "rtn-w4-gptq"), 4)}
    (root / "eval").mkdir()
    for art, bits in arts.values():
        (root / "eval" / f"{art.name}.json").write_text(json.dumps(_validation(art, bits)))
    return {k: a for k, (a, _) in arts.items()} | {"root": root}


def _val(art: Path) -> Path:
    return art.parent.parent / "eval" / f"{art.name}.json"


def _card(server, repo_id: str) -> tuple[dict, str]:
    text = server.state.files(repo_id)["README.md"].decode()
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def _publish_commits(server, repo_id: str) -> list:
    return [c for c in server.state.commits(repo_id) if c.title != "initial commit"]


# ---------------------------------------------------------------------------------------------------------------
# Names and keys
# ---------------------------------------------------------------------------------------------------------------


def test_repo_names_follow_the_community_conventions():
    assert repo_name_for("Qwen2.5-7B", "gguf", 4, "me") == "me/Qwen2.5-7B-GGUF"
    assert repo_name_for("org/Qwen2.5-7B", "gptq", 4, "me") == "me/Qwen2.5-7B-GPTQ-Int4"
    assert repo_name_for("Qwen2.5-7B", "awq", 4, "me") == "me/Qwen2.5-7B-AWQ"
    assert repo_name_for("Qwen2.5-7B", "mlx", 4, "me") == "me/Qwen2.5-7B-4bit-mlx"
    assert repo_name_for("Qwen2.5-7B", "onnx", 4, "me") == "me/Qwen2.5-7B-ONNX"
    assert repo_name_for("M", "gptq", 8, "me", {"gptq": "{model}-gptq-{bits}b"}) == "me/M-gptq-8b"
    with pytest.raises(ConfigError, match="not a valid repo id"):
        repo_name_for("M", "gguf", 4, "bad/ns")


def test_idempotency_key_changes_with_each_input(run):
    base = idempotency_key("a" * 40, "p", "0.1.0", "f")
    assert base == idempotency_key("a" * 40, "p", "0.1.0", "f") and len(base) == 64
    assert len({base, idempotency_key("b" * 40, "p", "0.1.0", "f"), idempotency_key("a" * 40, "q", "0.1.0", "f"),
                idempotency_key("a" * 40, "p", "0.2.0", "f"), idempotency_key("a" * 40, "p", "0.1.0", "g")}) == 5
    m4, m8 = (json.loads((run[k] / "manifest.json").read_text()) for k in ("gguf-Q4_0", "gguf-Q8_0"))
    assert manifest_key(m4) == manifest_key(json.loads(json.dumps(m4))) != manifest_key(m8)


# ---------------------------------------------------------------------------------------------------------------
# Fetch
# ---------------------------------------------------------------------------------------------------------------


def _source_repo(server, tiny_model: Path, repo_id: str = BASE, **kw) -> str:
    files = {p.name: p for p in tiny_model.iterdir() if p.is_file()}
    files["README.md"] = "---\nlicense: apache-2.0\n---\n# tiny\n"
    files["pytorch_model.bin"] = b"pickle!"
    files["notes/other.txt"] = "not needed"
    return server.state.create_repo(repo_id, files, **kw)


def test_fetch_pins_the_revision_and_fetches_only_what_is_needed(hub_server, tiny_model, tmp_path):
    first = _source_repo(hub_server, tiny_model)
    path, sha = fetch_snapshot(BASE)
    assert sha == first and path.name == first and str(path).startswith(str(tmp_path / "hf-home"))
    names = sorted(p.name for p in path.iterdir())
    assert "config.json" in names and "README.md" in names and any(n.endswith(".safetensors") for n in names)
    assert "pytorch_model.bin" not in names and "notes" not in names
    config = json.loads((path / "config.json").read_text())
    second = hub_server.state.push(BASE, {"config.json": json.dumps({**config, "tq_release": 2})}, message="v2")
    assert fetch_snapshot(BASE)[1] == second  # main moved
    old, old_sha = fetch_snapshot(BASE, revision=first)  # pinned: the old bytes
    assert old_sha == first and "tq_release" not in json.loads((old / "config.json").read_text())
    hub_server.state.tag(BASE, "v1", first)
    assert fetch_snapshot(BASE, revision="v1")[1] == first
    res = CliRunner().invoke(app, ["fetch", BASE, "--revision", "v1"])
    assert res.exit_code == 0 and f"{BASE}@{first} -> " in res.output


def test_fetch_errors_are_one_line_with_the_fix(hub_server, tiny_model, monkeypatch):
    _source_repo(hub_server, tiny_model)
    _source_repo(hub_server, tiny_model, "tq-org/gated", gated=True)
    with pytest.raises(ModelLoadError, match="was not found"):
        fetch_snapshot("tq-org/missing")
    with pytest.raises(ModelLoadError, match="is gated.*accept its license"):
        fetch_snapshot("tq-org/gated")
    with pytest.raises(ModelLoadError, match="revision 'nope' does not exist"):
        fetch_snapshot(BASE, revision="nope")
    import turboquant.io.hub as hub

    monkeypatch.setattr(hub, "_free_bytes", lambda path: 1000)
    before = hub_server.state.count("GET", "/resolve/")
    with pytest.raises(ModelLoadError, match=r"needs .* GB for \d+ files .* free.*HF_HUB_CACHE"):
        fetch_snapshot(BASE)
    assert hub_server.state.count("GET", "/resolve/") == before  # refused before downloading anything
    monkeypatch.undo()


def test_fetch_offline_uses_the_cache(hub_server, tiny_model, monkeypatch):
    sha = _source_repo(hub_server, tiny_model)
    path, _ = fetch_snapshot(BASE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub_server.state.requests)
    assert fetch_snapshot(BASE) == (path, sha)
    assert len(hub_server.state.requests) == n  # no request at all
    with pytest.raises(ModelLoadError, match="not in the local cache.*unset HF_HUB_OFFLINE"):
        fetch_snapshot("tq-org/never-fetched")


# ---------------------------------------------------------------------------------------------------------------
# Publish
# ---------------------------------------------------------------------------------------------------------------


def test_gguf_types_share_one_repo_with_a_rich_card(hub_server, run):
    repo = repo_name_for("tiny-llama", "gguf", 4, "tq-pub")
    r4 = publish(run["gguf-Q4_0"], repo, validation=_val(run["gguf-Q4_0"]), base_model=BASE, retry=FAST)
    r8 = publish(run["gguf-Q8_0"], repo, validation=_val(run["gguf-Q8_0"]), base_model=BASE, retry=FAST)
    assert repo == "tq-pub/tiny-llama-GGUF" and r4.created and r8.created
    commits = _publish_commits(hub_server, repo)
    assert [c.oid for c in commits] == [r4.commit_sha, r8.commit_sha]
    files = hub_server.state.files(repo)
    assert {"tiny-llama-Q4_0.gguf", "tiny-llama-Q8_0.gguf", "turboquant/tiny-llama-Q4_0.json",
            "turboquant/tiny-llama-Q8_0.json", "README.md", "tokenizer.json"} <= set(files)
    assert "manifest.json" not in files  # each type's manifest lives in its record
    assert files["tiny-llama-Q8_0.gguf"] == (run["gguf-Q8_0"] / "tiny-llama-Q8_0.gguf").read_bytes()
    record = json.loads(files["turboquant/tiny-llama-Q4_0.json"])
    assert record["artifact"] == "rtn-w4-gguf-Q4_0" and record["manifest"]["format_details"]["gguf_type"] == "Q4_0"
    meta, body = _card(hub_server, repo)
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "gguf" and meta["pipeline_tag"] == "text-generation"
    assert {"gguf", "4-bit", "8-bit", "rtn", "turboquant", "Q4_0", "Q8_0"} <= set(meta["tags"])
    results = meta["model-index"][0]["results"]
    metrics = {m["name"]: m["value"] for r in results for m in r["metrics"]}
    assert metrics["tiny-llama-Q4_0 perplexity"] == pytest.approx(GOOD[4]["ppl"])
    assert metrics["tiny-llama-Q8_0 kl_divergence"] == pytest.approx(GOOD[8]["kl"])
    assert metrics["tiny-llama-Q4_0 top1_agreement"] == pytest.approx(GOOD[4]["top1"])
    for gtype, bits in (("Q4_0", 4), ("Q8_0", 8)):
        row = next(line for line in body.splitlines() if line.startswith(f"| tiny-llama-{gtype}.gguf |"))
        assert f"| {GOOD[bits]['bits_per_weight']:.2f} |" in row and f"{GOOD[bits]['kl']:.6f}" in row
        assert row.endswith("| passed |")
    assert "llama-cli --hf-repo tq-pub/tiny-llama-GGUF --hf-file tiny-llama-Q4_0.gguf" in body
    assert "turboquant quantize" in body and "--gguf-type Q8_0" in body and "no calibration data" in body
    assert published_keys(repo) == {r4.key, r8.key}


def test_republishing_an_identical_artifact_makes_no_commit(hub_server, run):
    repo = "tq-pub/tiny-llama-GPTQ-Int4"
    first = publish(run["gptq"], repo, validation=_val(run["gptq"]), base_model=BASE, retry=FAST)
    again = publish(run["gptq"], repo, validation=_val(run["gptq"]), base_model=BASE, retry=FAST)
    assert first.created and not again.created and again.commit_sha == first.commit_sha
    # another key, same bytes: still nothing to commit
    other = publish(run["gptq"], repo, validation=_val(run["gptq"]), base_model=BASE, retry=FAST,
                    idempotency_key="f" * 64)
    assert not other.created and len(_publish_commits(hub_server, repo)) == 1
    files = hub_server.state.files(repo)
    assert json.loads(files["manifest.json"]) == json.loads((run["gptq"] / "manifest.json").read_text())
    meta, body = _card(hub_server, repo)
    assert meta["library_name"] == "transformers" and "vllm serve tq-pub/tiny-llama-GPTQ-Int4" in body
    assert "from_pretrained(\"tq-pub/tiny-llama-GPTQ-Int4\"" in body
    assert hub_server.state.count("POST", "/commit/") == 1


def test_429_then_500_then_success_gives_one_commit_after_two_retries(hub_server, run):
    repo = "tq-pub/retry-GGUF"
    hub_server.state.fail(r"/commit/main$", 429, 500)
    res = publish(run["gguf-Q4_0"], repo, validation=_val(run["gguf-Q4_0"]), retry=FAST)
    assert res.created and res.retries == 2
    assert hub_server.state.count("POST", r"/commit/main$") == 3
    assert [c.oid for c in _publish_commits(hub_server, repo)] == [res.commit_sha]
    assert hub_server.state.count("PUT", r"^/__lfs/") == 1  # the blob was uploaded once, then reused


def test_dropped_connections_are_retried_without_duplicates(hub_server, run):
    repo = "tq-pub/drop-GGUF"
    hub_server.state.fail(r"^/__lfs/[0-9a-f]{64}$", "drop", method="PUT")  # mid-upload of the GGUF blob
    hub_server.state.fail(r"/commit/main$", "drop_after")  # the commit is made, its answer lost
    res = publish(run["gguf-Q4_0"], repo, validation=_val(run["gguf-Q4_0"]), retry=FAST)
    assert hub_server.state.count("PUT", r"^/__lfs/") == 2
    commits = _publish_commits(hub_server, repo)
    assert len(commits) == 1 and res.commit_sha == commits[0].oid and res.created and res.retries == 1
    assert hub_server.state.count("POST", r"/commit/main$") == 1  # the retry found the key: no second commit


def test_exhausted_retries_fail_cleanly_with_zero_commits(hub_server, run):
    repo = "tq-pub/down-GGUF"
    hub_server.state.fail(r"/commit/main$", *[500] * 10)
    with pytest.raises(PublishError, match=r"failed after 4 attempt\(s\).*nothing was committed"):
        publish(run["gguf-Q4_0"], repo, validation=_val(run["gguf-Q4_0"]), retry=FAST)
    assert hub_server.state.count("POST", r"/commit/main$") == 4
    assert _publish_commits(hub_server, repo) == []


def test_unapproved_and_modified_artifacts_are_refused_before_any_request(hub_server, run, tmp_path):
    art = run["gguf-Q4_0"]
    with pytest.raises(PublishError, match="not approved .*mean KL divergence"):
        publish(art, "tq-pub/bad-GGUF", validation=_validation(art, 4, passed=False), retry=FAST)
    copy = tmp_path / art.name
    shutil.copytree(art, copy)
    (copy / "tokenizer_config.json").write_text("{}")
    with pytest.raises(PublishError, match="file 'tokenizer_config.json' .* modified since export"):
        publish(copy, "tq-pub/bad-GGUF", validation={**_validation(art, 4)}, retry=FAST)
    assert hub_server.state.repos == {} and hub_server.state.requests == []
    res = CliRunner().invoke(app, ["publish", str(copy), "--repo", "tq-pub/bad-GGUF",
                                   "--validation", str(_val(art))])
    assert res.exit_code == 2 and "tokenizer_config.json" in res.output and len(res.output.strip().splitlines()) == 1
    assert hub_server.state.repos == {}


def test_nightly_helpers_see_keys_heads_and_new_releases(hub_server, tiny_model, run):
    first = _source_repo(hub_server, tiny_model)
    _source_repo(hub_server, tiny_model, "tq-org/other-model")
    assert list_watch("tq-org") == ["tq-org/other-model", BASE]
    assert list_watch("tq-org", "tiny") == [BASE]
    assert latest_commit(BASE) == first
    second = hub_server.state.push(BASE, {"extra.json": "{}"}, message="new release")
    assert latest_commit(BASE) == second != first and latest_commit(BASE, revision=first) == first
    assert published_keys("tq-pub/never") == set()
    res = publish(run["gptq"], "tq-pub/keys", validation=_val(run["gptq"]), retry=FAST)
    assert published_keys("tq-pub/keys") == {res.key}


def test_private_repo_and_explicit_token(hub_server, run, monkeypatch):
    secret = "hf_tqExplicitOnly9876"
    hub_server.state.token = secret
    monkeypatch.delenv("HF_TOKEN")
    res = publish(run["gptq"], "tq-pub/private-GPTQ-Int4", validation=_val(run["gptq"]), private=True,
                  token=secret, retry=FAST)
    assert res.created and hub_server.state.repos["tq-pub/private-GPTQ-Int4"].private
    with pytest.raises(PublishError, match="no Hugging Face token"):
        publish(run["gptq"], "tq-pub/x", validation=_val(run["gptq"]), retry=FAST)


def test_the_token_appears_in_no_output(hub_server, run, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    art = tmp_path / "run" / "m" / "artifacts" / run["gguf-Q4_0"].name
    shutil.copytree(run["gguf-Q4_0"], art)
    (art.parent.parent / "eval").mkdir()
    _val(art).write_text(json.dumps(_validation(art, 4)))
    res = CliRunner().invoke(app, ["publish", str(art), "--repo", "tq-pub"])
    assert res.exit_code == 0, res.output
    assert "published rtn-w4-gguf-Q4_0 to " in res.output and "tq-pub/tiny-llama-GGUF" in res.output
    again = CliRunner().invoke(app, ["publish", str(art), "--repo", "tq-pub/tiny-llama-GGUF"])
    assert again.exit_code == 0 and "already published" in again.output
    hub_server.state.fail(r"/commit/main$", *[503] * 10)
    with pytest.raises(PublishError) as failed:
        publish(run["gptq"], "tq-pub/t", validation=_val(run["gptq"]), token=HUB_TOKEN, retry=FAST)
    dry = CliRunner().invoke(app, ["publish", str(art), "--repo", "tq-pub/dry", "--dry-run"])
    outputs = [res.output, again.output, dry.output, str(failed.value), caplog.text, *capsys.readouterr()]
    written = [p for root in (tmp_path, run["root"]) for p in root.rglob("*") if p.is_file()]
    assert written and any(p.name == "manifest.json" for p in written)
    outputs += [p.read_bytes().decode("latin-1") for p in written]
    outputs += [b.decode("latin-1") for repo in hub_server.state.repos for b in hub_server.state.files(repo).values()]
    assert not [o for o in outputs if HUB_TOKEN in o]


def test_dry_run_prints_the_card_and_files_and_contacts_nobody(hub_server, run):
    res = CliRunner().invoke(app, ["publish", str(run["gptq"]), "--repo", "tq-pub", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("---\n") and "base_model_relation" not in res.output.split("---")[1]  # local base
    assert "files for tq-pub/tiny-llama-GPTQ-Int4:" in res.output
    for name in ("README.md", "manifest.json", "quantize_config.json", "turboquant/rtn-w4-gptq.json"):
        assert f"  {name}\n" in res.output
    assert hub_server.state.requests == []


def test_fetch_quantize_export_publish_end_to_end(hub_server, tiny_model, tmp_path):
    """A Hub model in, a published GGUF out: base_model, license and the pinned revision come from the source."""
    from turboquant.io.model import resolve_model

    sha = _source_repo(hub_server, tiny_model)
    source = resolve_model(BASE)
    assert source.commit_sha == sha
    q = quantize(source.path, make_config("rtn", bits=4, group_size=32), tmp_path / "q", progress=False)
    meta = json.loads((q / "turboquant.json").read_text())
    if not (meta.get("source") or {}).get("repo_id"):  # a path was quantized: record where it came from
        meta["source"] = source.describe()
        (q / "turboquant.json").write_text(json.dumps(meta))
    art = export(q, "gguf", tmp_path / "art", gguf_type="Q4_0")
    res = publish(art, repo_name_for("tiny-llama", "gguf", 4, "tq-pub"), validation=_validation(art, 4), retry=FAST)
    assert res.created
    card_meta, body = _card(hub_server, res.repo_id)
    assert card_meta["base_model"] == BASE and card_meta["license"] == "apache-2.0"
    assert f"--revision {sha}" in body and f"turboquant quantize {BASE}" in body
