"""Publish one approved artifact to the Hub (the last step of its transaction)."""

from __future__ import annotations

from prefect import task


def hub_token(secret_block: str | None) -> str | None:
    """The token from a Prefect Secret block when the plan names one; else ``None`` (HF_TOKEN / stored login)."""
    if not secret_block:
        return None
    from prefect.blocks.system import Secret

    return Secret.load(secret_block).get()


@task(name="publish", retries=2, retry_delay_seconds=[30, 120])
def publish_artifact(artifact: str, validation: str, repo_id: str, private: bool, idempotency_key: str,
                     token_secret: str | None = None) -> dict:
    """``{"repo_id", "commit", "created", "url"}``; an identical artifact already on the Hub creates no commit."""
    from turboquant.release.publish import publish

    result = publish(artifact, repo_id, validation=validation, private=private, token=hub_token(token_secret),
                     idempotency_key=idempotency_key)
    return {"repo_id": result.repo_id, "commit": result.commit_sha, "created": result.created, "url": result.url}
