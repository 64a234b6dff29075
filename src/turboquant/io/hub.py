"""Hugging Face Hub reads: pinned, minimal snapshot downloads and the queries the nightly job makes.

Everything goes through ``huggingface_hub``, so HF_TOKEN / stored login, HF_ENDPOINT, HF_HUB_OFFLINE and the
local cache behave as users expect (read at call time, so a changed environment is honoured).

Fetch resolves the revision to its commit sha first, checks the free disk space against the sizes of the files a
run needs, then downloads exactly that commit. Transient failures (429, 5xx, timeouts, dropped connections) are
retried with exponential backoff (``with_retries``, which publishing shares). The token is passed to the client
only: it is never logged, nor written to a manifest, record, card or error message.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from turboquant.errors import ConfigError, ModelLoadError
from turboquant.io.files import AUX_FILE_PATTERNS, MODEL_FILE_PATTERNS, PICKLE_PATTERNS

logger = logging.getLogger("turboquant.hub")
T = TypeVar("T")

REPO_ID_PATTERN = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def check_repo_id(repo_id: str) -> None:
    """Refuse repo ids that are not ``[namespace/]name`` of safe characters (path traversal included)."""
    if not REPO_ID_PATTERN.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")) or "--" in repo_id:
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


def quiet_hub():
    """No upload / download progress bars when stderr is not a terminal (a job's log, a test): a failure must read
    as one line there, not as the last of a screenful of bars."""
    import contextlib

    from huggingface_hub.utils import disable_progress_bars

    return contextlib.nullcontext() if sys.stderr.isatty() else disable_progress_bars()


def hub_api(token: str | None, endpoint: str | None):
    from huggingface_hub import HfApi

    ensure_client_timeout()
    return HfApi(endpoint=hub_endpoint(endpoint), token=token)


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def first_error_line(e: BaseException, token: str | None) -> str:
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


def retry_policy(policy: RetryPolicy | None = None) -> RetryPolicy:
    """``policy``, else the module default (read at call time, so a changed default applies everywhere)."""
    return policy or DEFAULT_RETRY
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
    policy = retry_policy(policy)
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

    check_repo_id(repo_id)
    ensure_client_timeout()
    patterns = MODEL_FILE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    cache = Path(cache_dir).expanduser() if cache_dir else hub_cache_dir()
    url = hub_endpoint(endpoint)
    with hub_errors(repo_id, revision, token, url):
        if hub_offline():
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=str(cache),
                                          local_files_only=True))
            return path, path.name
        api = hub_api(token, endpoint)
        info = with_retries(lambda _: api.model_info(repo_id, revision=revision, files_metadata=True), retry,
                            what=f"model_info {repo_id}")
        sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        wanted = _matching(sorted(sizes), patterns)
        check_disk_space(repo_id, info.sha, {n: sizes[n] for n in wanted}, cache)
        with quiet_hub():
            path = Path(with_retries(lambda _: snapshot_download(
                repo_id, revision=info.sha, allow_patterns=patterns, cache_dir=str(cache), endpoint=url, token=token),
                retry, what=f"download {repo_id}"))
        if revision != info.sha:
            _store_ref(cache, repo_id, revision or "main", info.sha)
    return path, info.sha


def fetch_config(repo_id: str, revision: str | None = None, *, token: str | None = None,
                 endpoint: str | None = None, cache_dir: str | Path | None = None,
                 retry: RetryPolicy | None = None) -> tuple[Path, str, list[str]]:
    """A release's config and tokenizer files only (no weights), for triage before any weight is fetched:
    ``(directory holding them, commit sha, the names of every file in the repo)``."""
    from huggingface_hub import snapshot_download

    check_repo_id(repo_id)
    ensure_client_timeout()
    cache = Path(cache_dir).expanduser() if cache_dir else hub_cache_dir()
    url = hub_endpoint(endpoint)
    with hub_errors(repo_id, revision, token, url):
        api = hub_api(token, endpoint)
        info = with_retries(lambda _: api.model_info(repo_id, revision=revision), retry, what=f"model_info {repo_id}")
        files = sorted(s.rfilename for s in info.siblings or [])
        if "config.json" not in files:
            raise ModelLoadError(f"'{repo_id}' has no config.json", "watch a Hugging Face model repo")
        with quiet_hub():
            path = Path(with_retries(lambda _: snapshot_download(
                repo_id, revision=info.sha, allow_patterns=list(AUX_FILE_PATTERNS), cache_dir=str(cache),
                endpoint=url, token=token), retry, what=f"download {repo_id} config"))
    return path, str(info.sha), files


@contextmanager
def hub_errors(repo_id: str, revision: str | None, token: str | None, url: str) -> Iterator[None]:
    """The Hub's exceptions as one-line ``ModelLoadError``s naming the repo and the fix."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
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
            f"the Hub refused '{repo_id}': {first_error_line(e, token)}", "check HF_ENDPOINT, your token and the repo id"
        ) from None
    except ModelLoadError:
        raise
    except Exception as e:
        if not is_transient(e):
            raise
        raise ModelLoadError(f"the Hub at {url} could not be reached for '{repo_id}' ({first_error_line(e, token)})",
                             "check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache") from None


def latest_commit(repo_id: str, revision: str = "main", token: str | None = None, *,
                  endpoint: str | None = None) -> str:
    """The commit sha ``revision`` of ``repo_id`` points at now."""
    api = hub_api(token, endpoint)
    info = with_retries(lambda _: api.model_info(repo_id, revision=revision), what=f"model_info {repo_id}")
    return str(info.sha)


def list_watch(author: str, name_filter: str | None = None, *, token: str | None = None,
               endpoint: str | None = None) -> list[str]:
    """Repo ids of ``author``'s models whose names contain ``name_filter`` (the nightly watch list), sorted."""
    api = hub_api(token, endpoint)
    models = with_retries(lambda _: list(api.list_models(author=author, search=name_filter)),
                          what=f"list models of {author}")
    return sorted(m.id for m in models)
