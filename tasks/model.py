"""Model fetch: a Hub repo pinned to its commit, or a local directory (identified by its content hash)."""

from __future__ import annotations

from prefect import task

from tasks.progress import STEP_HOOKS

from turboquant import faults
from turboquant.io.model import resolve_model


@task(name="fetch-model", retries=2, retry_delay_seconds=[10, 60], **STEP_HOOKS)
def fetch_model(model_id: str, revision: str | None = None) -> dict:
    """``{"path", "repo_id", "revision", "commit_sha", "sha"}``: ``sha`` is the commit sha of a Hub model and the
    content hash of a local one — what identifies the release."""
    faults.point("task.fetch.start")
    source = resolve_model(model_id, revision)
    return {**source.describe(), "sha": source.commit_sha or source.content_hash()}
