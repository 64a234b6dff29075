"""Storage named by URL, for work that crosses machines: a pool worker's checkpoint reaching the process that
exports and validates it, a calibration file reaching the worker.

Any fsspec URL works — a local path or ``file://``, ``s3://`` / ``gs://`` / ``az://`` (with their fsspec
packages installed), ``memory://`` in tests. A directory is stored with an index of every file's sha256, written
last, so a reader sees either a complete upload or none, and every download is checked against it: bytes that
changed on the way are refused, naming the file, and nothing is left half-written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import fsspec

from turboquant.errors import ConfigError, DataError
from turboquant.fsutil import atomic_output_dir, sha256_file

#: Environment variable naming the storage URL (a plan's pools share it; see deployments/prefect.yaml).
STORAGE_ENV = "TURBOQUANT_STORAGE"
#: The index of a stored directory: ``{"files": {relative path: sha256}}``.
INDEX = ".turboquant-files.json"


def storage_url(url: str | None = None) -> str | None:
    """``url``, else ``$TURBOQUANT_STORAGE``, else None (no storage: work stays on one machine's disk); a local
    path becomes its ``file://`` URL."""
    url = url or os.environ.get(STORAGE_ENV) or None
    if url is not None and "://" not in url:
        url = Path(url).resolve().as_uri()  # a local path: as file:// so a stored URL is never read as a path
    if url is not None:
        try:
            fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"storage URL '{url}' cannot be opened ({str(e).splitlines()[0]})",
                              "use a local path, file://, or install the fsspec package for its scheme "
                              "(s3fs for s3://, gcsfs for gs://)") from None
    return url


def stored_url(url: str, key: str) -> str:
    """The URL of ``key`` in the storage at ``url``."""
    return url.rstrip("/") + "/" + key.strip("/")


def put_dir(local: str | Path, url: str, key: str) -> dict[str, Any]:
    """Upload the files under ``local`` to ``url/key`` and then their index; ``{"url", "files"}``."""
    local = Path(local)
    fs, root = fsspec.core.url_to_fs(stored_url(url, key))
    files = {p.relative_to(local).as_posix(): sha256_file(p) for p in sorted(local.rglob("*")) if p.is_file()}
    if fs.exists(root):
        fs.rm(root, recursive=True)  # a re-run replaces an earlier (possibly partial) upload
    for rel in files:
        target = f"{root}/{rel}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(local / rel), target)
    with fs.open(f"{root}/{INDEX}", "w") as f:
        f.write(json.dumps({"files": files}, indent=2, sort_keys=True) + "\n")
    return {"url": stored_url(url, key), "files": files}


def get_dir(url: str, local: str | Path) -> dict[str, str]:
    """Download the directory at ``url`` into ``local`` (atomically, replacing it), each file checked against the
    stored index; the index (relative path → sha256)."""
    fs, root = fsspec.core.url_to_fs(url)
    try:
        with fs.open(f"{root}/{INDEX}", "r") as f:
            files = json.loads(f.read())["files"]
    except FileNotFoundError:
        raise DataError(f"{url} holds no complete upload (no {INDEX})",
                        "re-run the step that uploads it; every worker must use the same storage URL") from None
    with atomic_output_dir(Path(local), overwrite=True) as tmp:
        for rel, digest in files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{rel}", str(target))
            got = sha256_file(target)
            if got != digest:
                raise DataError(f"{url}/{rel} arrived with sha256 {got[:12]}…, not the uploaded "
                                f"{digest[:12]}…", "re-run the quantization; check the storage for corruption")
    return files


def put_file(local: str | Path, url: str, key: str) -> str:
    """Upload one file as a one-file directory (with its index); the URL to ``get_file`` it from."""
    fs, root = fsspec.core.url_to_fs(stored_url(url, key))
    local = Path(local)
    digest = sha256_file(local)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)
    fs.put_file(str(local), f"{root}/{local.name}")
    with fs.open(f"{root}/{INDEX}", "w") as f:
        f.write(json.dumps({"files": {local.name: digest}}, indent=2, sort_keys=True) + "\n")
    return stored_url(url, key)


def get_file(url: str, local_dir: str | Path) -> Path:
    """Download the one-file directory at ``url`` into ``local_dir`` (checked); the local file's path."""
    files = get_dir(url, local_dir)
    if len(files) != 1:
        raise DataError(f"{url} holds {len(files)} files, not one", "upload it with put_file")
    return Path(local_dir) / next(iter(files))
