"""Nightly: find the releases the watch list points at, and which of them are already done."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from prefect import get_client, get_run_logger, task
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound

from turboquant.errors import ConfigError
from turboquant.io.hub import latest_commit, list_watch
from turboquant.pipeline.plan import Plan
from turboquant.pipeline.triage import triage
from turboquant.release.publish import published_keys
from turboquant.release.watch import load_watch


@task(name="find-releases", retries=3, retry_delay_seconds=[10, 60, 300])
def find_releases(watch: str) -> list[dict]:
    """``[{"repo_id", "sha"}]``: the head commit of every watched repo (authors expanded through list_models)."""
    releases = []
    for entry in load_watch(watch):
        repos = [(entry.repo, entry.revision)] if entry.repo else \
            [(r, "main") for r in list_watch(entry.author, entry.name_contains)[: entry.limit]]
        for repo, revision in repos:
            releases.append({"repo_id": repo, "sha": latest_commit(repo, revision)})
    return releases


@task(name="triage-release", retries=3, retry_delay_seconds=[10, 60, 300])
def triage_release(params: str, repo_id: str, sha: str) -> list[str]:
    """Why the plan cannot be run on this release (``unsupported: <reason>`` lines), from its config alone; empty
    when every planned artifact can be made. No weight is downloaded."""
    return triage(Plan.from_yaml(params), repo_id, sha).reasons()


@task(name="published-keys", retries=3, retry_delay_seconds=[10, 60, 300])
def keys_on_hub(repos: list[str]) -> list[str]:
    """Idempotency keys in the commit history of ``repos`` (the plan's target repos for one model)."""
    return sorted({k for repo in repos for k in published_keys(repo)})


def ledger_keys(ledger: Path) -> set[str]:
    """Release keys of runs that finished (published or not): the local record when nothing is published."""
    if not ledger.is_file():
        return set()
    return {json.loads(line)["release"] for line in ledger.read_text().splitlines() if line.strip()}


@task(name="record-release")
def record_release(ledger: str, entry: dict) -> None:
    """Append a finished release to the ledger: one JSON line written under an exclusive lock, as releases
    finish concurrently."""
    path = Path(ledger)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
    get_run_logger().info("recorded release %s@%s", entry["repo_id"], entry["sha"][:12])


@task(name="set-release-limit")
def set_release_limit(name: str, limit: int) -> None:
    """Create the global concurrency limit ``name`` with ``limit`` slots, or set an existing one to it."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"max_concurrent={limit!r} is invalid", "use an integer >= 1")
    with get_client(sync_client=True) as client:
        try:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
