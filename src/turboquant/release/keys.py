"""Idempotency keys: one release of one model, processed by one plan with one version of the code.

The nightly job must not redo (or re-publish) a release it already handled, and must redo it when the plan or
the code changed. ``release_key`` hashes exactly those three things; each published artifact's commit carries
``release_artifact_key`` (a hash of the release key and the artifact's label), so the Hub itself records what was
done.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from turboquant.io.provenance import code_version as code
from turboquant.fsutil import read_yaml

@lru_cache(maxsize=1)
def code_version() -> str:
    """``<version>+g<git sha>`` of this checkout (``.dirty`` with uncommitted changes), else the version alone."""

    c = code()
    if c["git_sha"] == "unknown":
        return c["turboquant_version"]
    return f"{c['turboquant_version']}+g{c['git_sha'][:12]}{'.dirty' if c['git_dirty'] else ''}"


def plan_digest(plan: str | Path | dict[str, Any]) -> str:
    """sha256 of the plan's content (a params.yaml path or its parsed mapping), independent of key order and
    formatting; the ``models`` section is left out because the release key names the model itself."""
    data = read_yaml(plan, "plan file", "pass the path of a params.yaml") if isinstance(plan, (str, Path)) else plan
    body = {k: v for k, v in (data or {}).items() if k != "models"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def release_key(model_sha: str, plan_sha: str, code: str | None = None) -> str:
    """The key of (model commit, plan, code version): equal keys mean the same work would be done again."""
    raw = json.dumps([model_sha, plan_sha, code or code_version()])
    return hashlib.sha256(raw.encode()).hexdigest()


def release_artifact_key(release: str, label: str) -> str:
    """The idempotency key (64 hex digits, the form ``release.publish`` writes into commit messages) one published
    artifact of ``release`` carries; the nightly job recomputes it for every planned label to see what is done."""
    return hashlib.sha256(json.dumps([release, label]).encode()).hexdigest()
