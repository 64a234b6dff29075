"""Hugging Face Hub access: pinned, minimal snapshot downloads; idempotent publishing of approved artifacts.

Everything goes through ``huggingface_hub``, so HF_TOKEN / stored login, HF_ENDPOINT, HF_HUB_OFFLINE and the
local cache behave as users expect (read at call time, so a changed environment is honoured).

Fetch resolves the revision to its commit sha first, checks the free disk space against the sizes of the files a
run needs, then downloads exactly that commit. Publish refuses an artifact whose gates did not pass or whose files
no longer match its manifest, then makes one commit per artifact (``create_commit``: LFS blobs are uploaded
first, the commit is a single call, so a failure leaves no half-made commit) whose message carries the artifact's
idempotency key; a key already in the repo's history, or files already byte-identical, make no new commit.
Transient failures (429, 5xx, timeouts, dropped connections) are retried with exponential backoff. The token is
passed to the client only: it is never logged, nor written to a manifest, record, card or error message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from turboquant.errors import ConfigError, ModelLoadError, PublishError

logger = logging.getLogger("turboquant.hub")
T = TypeVar("T")

#: What a quantization run needs from a model repo; pickles are fetched only when explicitly allowed.
MODEL_FILE_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template.*",
    "LICENSE*",
    "NOTICE*",
    "README.md",
]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def check_repo_id(repo_id: str) -> None:
    """Refuse repo ids that are not ``[namespace/]name`` of safe characters (path traversal included)."""
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")) or "--" in repo_id:
        raise ModelLoadError(
            f"'{repo_id}' is neither a local model directory nor a valid Hub repo id",
            "pass an existing directory, or a repo id like 'org/model' (letters, digits, '-', '_', '.')",
        )



# ---------------------------------------------------------------------------------------------------------------
# Settings, read at call time
# ---------------------------------------------------------------------------------------------------------------


def hub_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else HF_ENDPOINT, else the client's default (https://huggingface.co)."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"} if value is not None else constants.HF_HUB_OFFLINE


def hub_cache_dir() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, else the client's default cache."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


#: Seconds a Hub connection may wait for a socket operation (connect, read, write) before it counts as timed out
#: (and is retried as a transient failure). huggingface_hub's own client waits forever, which would hang an
#: unattended run on a Hub that stops answering. TURBOQUANT_HUB_TIMEOUT overrides it.
HUB_TIMEOUT_ENV = "TURBOQUANT_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 60.0
_client_timeout: float | None = None


def hub_timeout() -> float:
    raw = os.environ.get(HUB_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_HUB_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{HUB_TIMEOUT_ENV}={raw!r} is not a number", "set it to a timeout in seconds, e.g. 60") from None
    if value <= 0:
        raise ConfigError(f"{HUB_TIMEOUT_ENV}={raw!r} is not positive", "set it to a timeout in seconds, e.g. 60")
    return value


def ensure_client_timeout() -> None:
    """Give huggingface_hub's shared HTTP client a timeout (``hub_timeout()``), unless the user installed a client
    factory of their own; re-installed when the setting changes."""
    global _client_timeout
    from huggingface_hub.utils import _http

    seconds = hub_timeout()
    current = _http._GLOBAL_CLIENT_FACTORY
    if seconds == _client_timeout and getattr(current, "turboquant_timeout", None) == seconds:
        return
    if current is not _http.default_client_factory and getattr(current, "turboquant_timeout", None) is None:
        return  # a factory the user set: theirs to configure
    import httpx2

    def factory() -> httpx2.Client:
        return httpx2.Client(event_hooks={"request": [_http.hf_request_event_hook]}, follow_redirects=True,
                             timeout=httpx2.Timeout(seconds))

    factory.turboquant_timeout = seconds  # type: ignore[attr-defined]
    _http.set_client_factory(factory)
    _client_timeout = seconds


def _quiet():
    """No upload / download progress bars when stderr is not a terminal (a job's log, a test): a failure must read
    as one line there, not as the last of a screenful of bars."""
    import contextlib

    from huggingface_hub.utils import disable_progress_bars

    return contextlib.nullcontext() if sys.stderr.isatty() else disable_progress_bars()


def _api(token: str | None, endpoint: str | None):
    from huggingface_hub import HfApi

    ensure_client_timeout()
    return HfApi(endpoint=hub_endpoint(endpoint), token=token)


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _first_line(e: BaseException, token: str | None) -> str:
    lines = [s for s in str(e).splitlines() if s.strip()]
    return _redact(lines[0] if lines else type(e).__name__, token)


# ---------------------------------------------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the wait before retry ``i`` (1-based) is ``base_delay * 2**(i-1)``, capped at
    ``max_delay``. Deterministic (no jitter), so tests can use tiny delays and count the retries."""

    attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 30.0

    def delay(self, retry: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** (retry - 1))


#: Used when no policy is passed (tests patch it to tiny delays).
DEFAULT_RETRY = RetryPolicy()
#: HTTP statuses worth retrying: timeouts, rate limits, server errors, and a commit that lost a race (412/409).
TRANSIENT_STATUSES = frozenset({408, 409, 412, 429, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    """429 / 5xx / timeouts / dropped connections, also when wrapped (the client wraps upload errors)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from huggingface_hub.errors import OfflineModeIsEnabled

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OfflineModeIsEnabled):  # a ConnectionError, but retrying cannot help
            return False
        if isinstance(seen, HfHubHTTPError):
            status = getattr(seen.response, "status_code", None)
            return status in TRANSIENT_STATUSES
        if isinstance(seen, (httpx2.TransportError, TimeoutError, ConnectionError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def with_retries(fn: Callable[[int], T], policy: RetryPolicy | None = None, *, what: str = "hub call") -> T:
    """``fn(attempt)`` until it succeeds, retrying transient failures with exponential backoff."""
    policy = policy or DEFAULT_RETRY
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn(attempt)
        except Exception as e:  # noqa: BLE001 - classified below, re-raised when not transient
            if attempt >= policy.attempts or not is_transient(e):
                raise
            wait = policy.delay(attempt)
            logger.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(e).__name__,
                           str(e).splitlines()[0] if str(e) else "", attempt, policy.attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------------
# Fetch
# ---------------------------------------------------------------------------------------------------------------


def _matching(names: list[str], patterns: list[str]) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(names, allow_patterns=patterns))


def _free_bytes(path: Path) -> int:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(".").free


def check_disk_space(repo_id: str, sha: str, sizes: dict[str, int], cache_dir: Path) -> None:
    """Refuse a download whose files (those not cached yet) do not fit in the cache's free space."""
    from huggingface_hub.file_download import repo_folder_name

    snapshot = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / sha
    needed = sum(size for name, size in sizes.items() if not (snapshot / name).exists())
    free = _free_bytes(cache_dir)
    if needed > free:
        raise ModelLoadError(
            f"'{repo_id}' needs {needed / 1e9:.2f} GB for {len(sizes)} files but {cache_dir} has {free / 1e9:.2f} GB free",
            "free disk space, or point HF_HOME / HF_HUB_CACHE at a larger disk")


def _store_ref(cache_dir: Path, repo_id: str, revision: str, sha: str) -> None:
    """Record ``revision -> sha`` in the cache (as the client does), so offline runs find the snapshot by name."""
    from huggingface_hub.file_download import repo_folder_name

    ref = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.tmp-{os.getpid()}")
        tmp.write_text(sha)
        os.replace(tmp, ref)
    except OSError as e:
        logger.warning("could not cache the ref %s of %s: %s", revision, repo_id, e.strerror)


def fetch_snapshot(repo_id: str, revision: str | None = None, allow_pickle: bool = False, *,
                   token: str | None = None, endpoint: str | None = None, cache_dir: str | Path | None = None,
                   retry: RetryPolicy | None = None) -> tuple[Path, str]:
    """Download (or reuse from cache) the files a run needs; returns ``(local_dir, commit_sha)``.

    Online: the revision is resolved to its commit sha (``model_info``), the sizes of the matching files are
    checked against the free disk space, and exactly that commit is downloaded. Offline (HF_HUB_OFFLINE): the
    cache is used as is.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    check_repo_id(repo_id)
    ensure_client_timeout()
    patterns = MODEL_FILE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    cache = Path(cache_dir).expanduser() if cache_dir else hub_cache_dir()
    url = hub_endpoint(endpoint)
    try:
        if hub_offline():
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=str(cache),
                                          local_files_only=True))
            return path, path.name
        api = _api(token, endpoint)
        info = with_retries(lambda _: api.model_info(repo_id, revision=revision, files_metadata=True), retry,
                            what=f"model_info {repo_id}")
        sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        wanted = _matching(sorted(sizes), patterns)
        check_disk_space(repo_id, info.sha, {n: sizes[n] for n in wanted}, cache)
        with _quiet():
            path = Path(with_retries(lambda _: snapshot_download(
                repo_id, revision=info.sha, allow_patterns=patterns, cache_dir=str(cache), endpoint=url, token=token),
                retry, what=f"download {repo_id}"))
        if revision != info.sha:
            _store_ref(cache, repo_id, revision or "main", info.sha)
    except hf_errors.GatedRepoError:
        raise ModelLoadError(
            f"model '{repo_id}' is gated", "accept its license on the Hub and log in (`hf auth login` or HF_TOKEN)"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelLoadError(
            f"model repo '{repo_id}' was not found (or is private)", "check the id, or log in if it is private"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise ModelLoadError(
            f"revision '{revision}' does not exist in '{repo_id}'", "pass an existing branch, tag or commit sha"
        ) from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise ModelLoadError(
            f"model '{repo_id}' is not in the local cache and the Hub cannot be reached (offline?)",
            "connect to the network, unset HF_HUB_OFFLINE, or pass a local directory",
        ) from None
    except hf_errors.HfHubHTTPError as e:
        raise ModelLoadError(
            f"the Hub refused '{repo_id}': {_first_line(e, token)}", "check HF_ENDPOINT, your token and the repo id"
        ) from None
    except Exception as e:
        if not is_transient(e):
            raise
        raise ModelLoadError(f"the Hub at {url} could not be reached for '{repo_id}' ({_first_line(e, token)})",
                             "check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache") from None
    return path, info.sha


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


def artifact_key(manifest: dict[str, Any]) -> str:
    """The idempotency key of an exported artifact, from its manifest."""
    source = manifest.get("source") or {}
    model_sha = (source.get("commit_sha") or source.get("content_sha256")
                 or _sha_json({k: source.get(k) for k in ("repo_id", "path")}))
    plan = {k: manifest.get(k) for k in ("method", "method_config", "schemes", "calibration", "format",
                                         "format_options")}
    files = {name: info["sha256"] for name, info in sorted((manifest.get("files") or {}).items())}
    return idempotency_key(model_sha, _sha_json(plan), str(manifest.get("turboquant_version")), _sha_json(files))


def _commits(repo_id: str, token: str | None, endpoint: str | None, retry: RetryPolicy | None = None):
    api = _api(token, endpoint)
    return with_retries(lambda _: api.list_repo_commits(repo_id), retry, what=f"list commits of {repo_id}")


def published_keys(repo_id: str, token: str | None = None, *, endpoint: str | None = None) -> set[str]:
    """Idempotency keys found in the commit messages of ``repo_id`` (empty when the repo does not exist)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        commits = _commits(repo_id, token, endpoint)
    except RepositoryNotFoundError:
        return set()
    return {k for c in commits for k in _KEY_RX.findall(f"{c.title}\n{c.message}")}


def latest_commit(repo_id: str, revision: str = "main", token: str | None = None, *,
                  endpoint: str | None = None) -> str:
    """The commit sha ``revision`` of ``repo_id`` points at now."""
    api = _api(token, endpoint)
    info = with_retries(lambda _: api.model_info(repo_id, revision=revision), what=f"model_info {repo_id}")
    return str(info.sha)


def list_watch(author: str, name_filter: str | None = None, *, token: str | None = None,
               endpoint: str | None = None) -> list[str]:
    """Repo ids of ``author``'s models whose names contain ``name_filter`` (the nightly watch list), sorted."""
    api = _api(token, endpoint)
    models = with_retries(lambda _: list(api.list_models(author=author, search=name_filter)),
                          what=f"list models of {author}")
    return sorted(m.id for m in models)


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
    from turboquant.manifest import MANIFEST_FILE, verify_files

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
    return json.loads((artifact_dir / MANIFEST_FILE).read_text())


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
    from turboquant.manifest import MANIFEST_FILE

    names = sorted(manifest.get("files") or {})
    if manifest.get("format") not in SHARED_REPO_FORMATS:
        names.append(MANIFEST_FILE)
    return {name: artifact_dir / name for name in names}


def _existing_records(api, repo_id: str, head: str, remote: dict[str, Any], skip: str, token: str | None,
                      endpoint: str) -> list[dict[str, Any]]:
    """The records of the other artifacts already in the repo (read into a throwaway directory)."""
    from huggingface_hub import hf_hub_download

    from turboquant.modelcard import RECORD_DIR

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
            info = _api(token, endpoint).model_info(base_model)
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
    ``artifact_key(manifest)``; when the repo's history already holds it, or the repo's files are already
    byte-identical, no commit is made. ``dry_run`` contacts nobody and returns the card and file list.
    """
    from turboquant.modelcard import RECORD_DIR, artifact_record, build_card

    artifact_dir = Path(artifact_dir)
    if "/" not in repo_id or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise PublishError(f"'{repo_id}' is not a repo id of the form namespace/name",
                           "pass --repo namespace/name (letters, digits, '-', '_', '.')")
    data = load_validation(validation)
    manifest = check_publishable(artifact_dir, data)
    key = idempotency_key or artifact_key(manifest)
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
    api = _api(token, endpoint)
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
        with _quiet():
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
        tries = (retry or DEFAULT_RETRY).attempts if is_transient(e) else retries["n"] + 1
        raise PublishError(f"publishing {artifact_dir.name} to {repo_id} failed after {tries} attempt(s): "
                           f"{_first_line(e, token)}", "nothing was committed; retry later (check HF_ENDPOINT and "
                           "the Hub's status)") from None
    logger.info("published %s to %s: %s", artifact_dir.name, repo_id,
                f"commit {result.commit_sha}" if result.created else "no new commit")
    return result
