"""Work crossing machines through storage named by URL (``turboquant.io.storage``): one transfer per task."""

from __future__ import annotations

from prefect import task

from tasks.progress import STEP_HOOKS

from turboquant.io.storage import get_dir, get_file, put_dir, put_file


@task(name="share-file", retries=2, retry_delay_seconds=[10, 60], **STEP_HOOKS)
def share_file(path: str, storage: str, key: str) -> str:
    """The URL of ``path`` uploaded to ``storage`` under ``key`` (with its sha256 index)."""
    return put_file(path, storage, key)


@task(name="fetch-stored-file", retries=2, retry_delay_seconds=[10, 60], **STEP_HOOKS)
def fetch_stored_file(url: str, local_dir: str) -> str:
    """The local path of the one file stored at ``url``, downloaded into ``local_dir`` and checked."""
    return str(get_file(url, local_dir))


@task(name="share-dir", retries=2, retry_delay_seconds=[10, 60], **STEP_HOOKS)
def share_dir(path: str, storage: str, key: str) -> str:
    """The URL of directory ``path`` uploaded to ``storage`` under ``key`` (files first, their index last)."""
    return put_dir(path, storage, key)["url"]


@task(name="receive-dir", retries=2, retry_delay_seconds=[10, 60], **STEP_HOOKS)
def receive_dir(url: str, local: str) -> str:
    """``local``, now holding the directory stored at ``url``, every file's sha256 checked against its index."""
    get_dir(url, local)
    return local
