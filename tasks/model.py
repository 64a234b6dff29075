"""Model fetch: a Hub repo pinned to its commit, or a local directory."""

from __future__ import annotations

from prefect import task

from turboquant.model import resolve_model


@task(name="fetch-model", retries=2, retry_delay_seconds=[10, 60])
def fetch_model(model_id: str, revision: str | None = None) -> dict:
    """``{"path", "repo_id", "revision", "commit_sha"}`` of the resolved model."""
    return resolve_model(model_id, revision).describe()
