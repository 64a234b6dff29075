"""The nightly watch list (``deployments/watch.yaml``): which Hub repos or authors to check for new releases.

Each entry is either ``repo: org/name`` (optionally ``revision``, default ``main``) or ``author: org`` with an
optional ``name_contains`` filter and ``limit``. Validated strictly, like the plan: a typo fails before the Hub is
asked anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from turboquant.errors import check_keys, ConfigError
from turboquant.io.hub import check_repo_id
from turboquant.fsutil import read_yaml

REPO_KEYS = {"repo", "revision"}
AUTHOR_KEYS = {"author", "name_contains", "limit"}


@dataclass(frozen=True)
class WatchEntry:
    repo: str | None = None
    revision: str = "main"
    author: str | None = None
    name_contains: str | None = None
    limit: int = 50


def load_watch(path: str | Path) -> tuple[WatchEntry, ...]:
    data = read_yaml(path, "watch list", "pass the path of a watch.yaml (see deployments/)") or {}
    if not isinstance(data, dict) or set(data) != {"watch"} or not isinstance(data["watch"], list):
        raise ConfigError(f"{path} must hold one key 'watch' with a list of entries",
                          "write watch: [{repo: org/model}, {author: org, name_contains: text}]")
    return tuple(_entry(e) for e in data["watch"])


def _entry(e: object) -> WatchEntry:
    if not isinstance(e, dict) or ("repo" in e) == ("author" in e):
        raise ConfigError(f"watch entry {e!r} must have exactly one of 'repo' or 'author'",
                          "write {repo: org/model} or {author: org, name_contains: text}")
    allowed = REPO_KEYS if "repo" in e else AUTHOR_KEYS
    check_keys(e, allowed, f"watch entry {e!r} has unknown key(s) {{unknown}}")
    if "repo" in e:
        check_repo_id(str(e["repo"]))
        return WatchEntry(repo=str(e["repo"]), revision=str(e.get("revision", "main")))
    author = str(e["author"])
    check_repo_id(author)
    limit = e.get("limit", 50)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigError(f"watch entry for {author}: limit {limit!r} is not a positive integer", "use e.g. limit: 20")
    return WatchEntry(author=author, name_contains=e.get("name_contains"), limit=limit)
