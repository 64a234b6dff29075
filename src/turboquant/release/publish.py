"""Publishing approved artifacts to the Hugging Face Hub: community repo names, idempotency keys, one commit each.

Publish refuses an artifact whose gates did not pass or whose files no longer match its manifest, then makes one
commit per artifact (``create_commit``: LFS blobs are uploaded first, the commit is a single call, so a failure
leaves no half-made commit) whose message carries the artifact's idempotency key; a key already in the repo's
history, or files already byte-identical, make no new commit. Transient failures are retried with backoff
(``io.hub.with_retries``). The token is passed to the client only: it is never logged, nor written to a manifest,
record, card or error message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from turboquant.errors import ConfigError, ModelLoadError, PublishError
from turboquant.io.hub import (check_repo_id, first_error_line, hub_api, hub_endpoint, hub_offline, is_transient,
                               quiet_hub, REPO_ID_PATTERN, retry_policy, RetryPolicy, with_retries)
from turboquant.io.manifest import find_manifest, MANIFEST_FILE, read_manifest, verify_files
from turboquant.release.modelcard import artifact_record, build_card, model_name, naming_bits, RECORD_DIR

logger = logging.getLogger("turboquant.hub")
# ---------------------------------------------------------------------------------------------------------------
# Names, keys, history
# ---------------------------------------------------------------------------------------------------------------

#: Repo names by format, following the community's conventions (TheBloke / bartowski / Qwen / mlx-community /
#: RedHatAI / onnx-community). ``{model}`` is the base model's name, ``{bits}`` the code width.
REPO_TEMPLATES: dict[str, str] = {
    "gguf": "{model}-GGUF",
    "gptq": "{model}-GPTQ-Int{bits}",
    "awq": "{model}-AWQ",
    "mlx": "{model}-{bits}bit-mlx",
    "compressed-tensors": "{model}-quantized.w{bits}a16",
    "onnx": "{model}-ONNX",
}
#: Formats whose artifacts share one repo per model (several files side by side): their manifests go to records.
SHARED_REPO_FORMATS = frozenset({"gguf"})


def repo_name_for(model_name: str, fmt: str, bits: int | None, namespace: str,
                  template: dict[str, str] | None = None) -> str:
    """``{namespace}/{Model}-GGUF``, ``{Model}-GPTQ-Int4``, ``{Model}-AWQ``, ``{Model}-4bit-mlx``, …; ``template``
    overrides the pattern of any format (keys: format names; fields: ``{model}``, ``{bits}``, ``{format}``)."""
    patterns = {**REPO_TEMPLATES, **(template or {})}
    pattern = patterns.get(fmt, "{model}-{format}-{bits}bit")
    name = pattern.format(model=model_name.rstrip("/").split("/")[-1], bits=bits if bits is not None else 16,
                          format=fmt.upper())
    repo_id = f"{namespace}/{name}"
    try:
        check_repo_id(repo_id)
    except ModelLoadError:
        raise ConfigError(f"'{repo_id}' is not a valid repo id", "use a namespace and template of letters, digits, "
                          "'-', '_', '.' (at most 96 characters each)") from None
    return repo_id


KEY_TRAILER = "TurboQuant-Idempotency-Key"
_KEY_RX = re.compile(rf"{KEY_TRAILER}: ([0-9a-f]{{64}})")


def idempotency_key(model_sha: str, plan_hash: str, code_version: str, artifact_sha: str) -> str:
    """sha256 over what makes a published artifact what it is: the source model's commit sha (or content hash),
    the hash of the recipe (method + config, schemes, calibration, format + options), the TurboQuant version and
    the sha256 of the artifact's files. The same four inputs never need a second commit."""
    blob = json.dumps([model_sha, plan_hash, code_version, artifact_sha], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _sha_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def manifest_key(manifest: dict[str, Any]) -> str:
    """The idempotency key of an exported artifact, from its manifest."""
    source = manifest.get("source") or {}
    model_sha = (source.get("commit_sha") or source.get("content_sha256")
                 or _sha_json({k: source.get(k) for k in ("repo_id", "path")}))
    plan = {k: manifest.get(k) for k in ("method", "method_config", "schemes", "calibration", "format",
                                         "format_options")}
    files = {name: info["sha256"] for name, info in sorted((manifest.get("files") or {}).items())}
    return idempotency_key(model_sha, _sha_json(plan), str(manifest.get("turboquant_version")), _sha_json(files))


def _commits(repo_id: str, token: str | None, endpoint: str | None, retry: RetryPolicy | None = None):
    api = hub_api(token, endpoint)
    return with_retries(lambda _: api.list_repo_commits(repo_id), retry, what=f"list commits of {repo_id}")


def published_keys(repo_id: str, token: str | None = None, *, endpoint: str | None = None) -> set[str]:
    """Idempotency keys found in the commit messages of ``repo_id`` (empty when the repo does not exist)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        commits = _commits(repo_id, token, endpoint)
    except RepositoryNotFoundError:
        return set()
    return {k for c in commits for k in _KEY_RX.findall(f"{c.title}\n{c.message}")}



# ---------------------------------------------------------------------------------------------------------------
# Publish
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishResult:
    """``created`` is False when nothing was committed (already published, or identical files, or a dry run)."""

    repo_id: str
    commit_sha: str | None
    created: bool
    url: str
    files: tuple[str, ...]
    key: str = ""
    retries: int = 0
    card: str = field(default="", repr=False)


def load_validation(validation: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(validation, dict):
        return validation
    path = Path(validation)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PublishError(f"validation file {path} does not exist", "validate the artifact first "
                           "(`turboquant validate ... --json FILE`) and pass --validation FILE") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PublishError(f"validation file {path} is not valid JSON", "re-run `turboquant validate`") from None
    if not isinstance(data, dict):
        raise PublishError(f"validation file {path} is not a JSON object", "re-run `turboquant validate`")
    return data


def check_publishable(artifact_dir: Path, validation: dict[str, Any]) -> dict[str, Any]:
    """The artifact's manifest, once its verdict passed and every file still matches the manifest."""

    verdict = validation.get("verdict")
    if not isinstance(verdict, dict) or verdict.get("passed") is not True:
        reasons = "; ".join((verdict or {}).get("reasons") or []) if isinstance(verdict, dict) else "no verdict"
        raise PublishError(f"artifact {artifact_dir.name} is not approved ({reasons or 'its gates did not pass'})",
                           "only artifacts whose gates passed are published; fix the quality or the gates and "
                           "validate again")
    named = validation.get("artifact")
    if named and Path(str(named)).name != artifact_dir.name:
        raise PublishError(f"the validation is of {Path(str(named)).name}, not of {artifact_dir.name}",
                           "pass the validation JSON written for this artifact")
    try:
        status = verify_files(artifact_dir)
    except ModelLoadError as e:
        raise PublishError(e.problem, e.fix) from None
    bad = {name: s for name, s in status.items() if s != "ok"}
    if bad:
        name, state = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise PublishError(f"file '{name}' of {artifact_dir.name} is {state} since export{more}: it does not match "
                           f"{MANIFEST_FILE}", "re-export and re-validate the artifact; never edit it by hand")
    return read_manifest(artifact_dir)


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Upload:
    """The files of one commit: repo path -> local file or bytes, with their sha256."""

    files: dict[str, Path | bytes]
    sha256: dict[str, str]

    def identical_to(self, remote: dict[str, Any]) -> bool:
        for path, content in self.files.items():
            entry = remote.get(path)
            if entry is None:
                return False
            if entry.lfs is not None:
                if entry.lfs.sha256 != self.sha256[path]:
                    return False
            else:
                data = content if isinstance(content, bytes) else content.read_bytes()
                if entry.blob_id != _git_oid(data):
                    return False
        return True


def _artifact_files(artifact_dir: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    """Repo path -> local file: every file of the artifact; shared repos keep manifests in the records instead."""

    names = sorted(manifest.get("files") or {})
    if manifest.get("format") not in SHARED_REPO_FORMATS:
        names.append(MANIFEST_FILE)
    return {name: artifact_dir / name for name in names}


def _existing_records(api, repo_id: str, head: str, remote: dict[str, Any], skip: str, token: str | None,
                      endpoint: str) -> list[dict[str, Any]]:
    """The records of the other artifacts already in the repo (read into a throwaway directory)."""
    from huggingface_hub import hf_hub_download


    names = [p for p in remote if p.startswith(f"{RECORD_DIR}/") and p.endswith(".json") and p != skip]
    out = []
    with tempfile.TemporaryDirectory(prefix="tq-records-") as tmp:
        for name in sorted(names):
            local = hf_hub_download(repo_id, name, revision=head, cache_dir=tmp, endpoint=endpoint, token=token)
            try:
                out.append(json.loads(Path(local).read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError):
                logger.warning("ignoring the unreadable record %s in %s", name, repo_id)
    return out


def _base_license(manifest: dict[str, Any], base_model: str | None, token: str | None, endpoint: str | None) -> str | None:
    """The base model's license: from its local README metadata, else from its card on the Hub."""
    source = manifest.get("source") or {}
    readme = Path(str(source.get("path") or "")) / "README.md"
    if source.get("path") and readme.is_file():
        m = re.match(r"^---\s*\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
        if m:
            import yaml

            try:
                meta = yaml.safe_load(m.group(1))
            except yaml.YAMLError:
                meta = None
            if isinstance(meta, dict) and meta.get("license"):
                return str(meta["license"])
    if base_model and not hub_offline():
        try:
            info = hub_api(token, endpoint).model_info(base_model)
            lic = getattr(info.card_data, "license", None) if info.card_data else None
            return str(lic) if lic else None
        except Exception:  # noqa: BLE001 - the license is best effort; a missing one is left out of the card
            return None
    return None


def publish(artifact_dir: str | Path, repo_id: str, *, validation: dict[str, Any] | str | Path,
            private: bool = False, token: str | None = None, dry_run: bool = False,
            idempotency_key: str | None = None, endpoint: str | None = None, base_model: str | None = None,
            license: str | None = None, retry: RetryPolicy | None = None) -> PublishResult:
    """Publish one approved artifact to ``repo_id`` in one commit, with a generated model card.

    Refused (``PublishError``) unless the validation's verdict passed and every file matches the artifact's
    manifest. ``token`` defaults to HF_TOKEN / the stored login. ``idempotency_key`` defaults to
    ``manifest_key(manifest)``; when the repo's history already holds it, or the repo's files are already
    byte-identical, no commit is made. ``dry_run`` contacts nobody and returns the card and file list.
    """

    artifact_dir = Path(artifact_dir)
    if "/" not in repo_id or not REPO_ID_PATTERN.match(repo_id) or ".." in repo_id:
        raise PublishError(f"'{repo_id}' is not a repo id of the form namespace/name",
                           "pass --repo namespace/name (letters, digits, '-', '_', '.')")
    data = load_validation(validation)
    manifest = check_publishable(artifact_dir, data)
    key = idempotency_key or manifest_key(manifest)
    source = manifest.get("source") or {}
    base = base_model or source.get("repo_id")
    files = _artifact_files(artifact_dir, manifest)
    hashes = {p: (manifest["files"][p]["sha256"] if p in manifest["files"] else
                  hashlib.sha256(f.read_bytes()).hexdigest()) for p, f in files.items()}
    record = artifact_record(artifact_dir.name, manifest, data,
                             {p: {"sha256": hashes[p], "size": f.stat().st_size} for p, f in files.items()})
    record_path = f"{RECORD_DIR}/{record['entry']}.json"
    url = f"{hub_endpoint(endpoint)}/{repo_id}"

    def upload_for(others: list[dict[str, Any]], lic: str | None) -> tuple[_Upload, str]:
        card = str(build_card(repo_id, [*others, record], base_model=base, license=lic))
        content: dict[str, Path | bytes] = {**files, record_path: (json.dumps(record, indent=2, sort_keys=True,
                                                                              default=str) + "\n").encode(),
                                            "README.md": card.encode()}
        sha = {p: hashes.get(p) or hashlib.sha256(c if isinstance(c, bytes) else c.read_bytes()).hexdigest()
               for p, c in content.items()}
        return _Upload(content, sha), card

    if dry_run:
        upload, card = upload_for([], license)
        return PublishResult(repo_id, None, False, url, tuple(sorted(upload.files)), key, 0, card)

    from huggingface_hub import CommitOperationAdd, get_token

    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token was found", "set HF_TOKEN, run `hf auth login`, or pass a token")
    api = hub_api(token, endpoint)
    lic = license or _base_license(manifest, base, token, endpoint)
    sent = {"commits": 0}
    retries = {"n": 0}

    def attempt(n: int) -> PublishResult:
        retries["n"] = n - 1
        api.create_repo(repo_id, private=private, exist_ok=True)
        commits = api.list_repo_commits(repo_id)
        head = commits[0].commit_id
        for c in commits:
            if key in _KEY_RX.findall(f"{c.title}\n{c.message}"):
                logger.info("%s is already in %s (commit %s)", artifact_dir.name, repo_id, c.commit_id)
                return PublishResult(repo_id, c.commit_id, sent["commits"] > 0, url, tuple(sorted(upload.files)),
                                     key, n - 1, card)
        remote = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=head) if hasattr(f, "size")}
        others = _existing_records(api, repo_id, head, remote, record_path, token, hub_endpoint(endpoint))
        new_upload, new_card = upload_for(others, lic)
        if new_upload.identical_to(remote):
            logger.info("%s: files already identical in %s; no commit", artifact_dir.name, repo_id)
            return PublishResult(repo_id, head, False, url, tuple(sorted(new_upload.files)), key, n - 1, new_card)
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=c if isinstance(c, bytes) else str(c))
               for p, c in sorted(new_upload.files.items())]
        title = f"Publish {record['entry']} ({manifest.get('format')}, TurboQuant)"
        body = (f"Artifact {artifact_dir.name}: gates passed; {len(ops)} files.\n\n{KEY_TRAILER}: {key}")
        sent["commits"] += 1
        info = api.create_commit(repo_id, ops, commit_message=title, commit_description=body, parent_commit=head)
        return PublishResult(repo_id, info.oid, True, url, tuple(sorted(new_upload.files)), key, n - 1, new_card)

    upload, card = upload_for([], lic)  # what an already-published artifact reports
    try:
        with quiet_hub():
            result = with_retries(attempt, retry, what=f"publish {artifact_dir.name} to {repo_id}")
    except PublishError:
        raise
    except Exception as e:
        from huggingface_hub.errors import HfHubHTTPError

        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, HfHubHTTPError) and status in (401, 403):
            raise PublishError(f"the Hub refused to write {repo_id} ({status}: the token is invalid, revoked or "
                               "has no write access there); nothing was committed",
                               "set HF_TOKEN (or `hf auth login`) to a valid token with write access to that "
                               "namespace") from None
        if not (is_transient(e) or isinstance(e, HfHubHTTPError)):
            raise
        tries = retry_policy(retry).attempts if is_transient(e) else retries["n"] + 1
        raise PublishError(f"publishing {artifact_dir.name} to {repo_id} failed after {tries} attempt(s): "
                           f"{first_error_line(e, token)}", "nothing was committed; retry later (check HF_ENDPOINT and "
                           "the Hub's status)") from None
    logger.info("published %s to %s: %s", artifact_dir.name, repo_id,
                f"commit {result.commit_sha}" if result.created else "no new commit")
    return result


def default_validation_path(artifact_dir: Path) -> Path:
    """Where the flow writes an artifact's validation: run/<model>/artifacts/<label> -> run/<model>/eval/<label>.json."""
    return artifact_dir.resolve().parent.parent / "eval" / f"{artifact_dir.resolve().name}.json"


def target_repo(artifact_dir: Path, repo: str, validation: dict[str, Any]) -> str:
    """``repo`` when it is ``namespace/name``; for a bare namespace, the community's name for this artifact
    (``{Model}-GGUF``, ``{Model}-GPTQ-Int4``, …) in it."""
    if "/" in repo:
        return repo
    manifest = find_manifest(artifact_dir) or {}
    return repo_name_for(model_name(manifest), manifest.get("format", "artifact"), naming_bits(manifest, validation),
                         repo)
