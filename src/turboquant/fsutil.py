"""Filesystem helpers: outputs appear whole or not at all; YAML inputs read with one-line errors."""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from turboquant import faults
from turboquant.errors import ConfigError, OutputError


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out`` only if the block succeeds.

    On any exception the temporary directory is removed and ``out`` (if it existed) is left untouched.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists", "choose another --out or pass --overwrite")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {parent} ({e.strerror})", "choose a writable --out location") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent} is not writable", "choose a writable --out location or fix its permissions")
    remove_stale_partials(parent, out.name)
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"cannot write in {parent} ({e.strerror})",
                          "choose a writable --out location or fix its permissions") from None
    try:
        yield tmp
        faults.point("atomic.before_rename")
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            faults.point("atomic.between_renames")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        faults.point("atomic.renamed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(parent: Path, name: str) -> list[Path]:
    """Delete what a killed writer of ``name`` left: ``.name.tmp-PID`` / ``.name.old-PID`` of dead processes.

    A process killed with SIGKILL cannot clean up; the next writer of the same output does it, so no partial
    artifact survives a crash. Directories of live processes (a concurrent writer) are left alone.
    """
    removed = []
    for path in sorted(parent.glob(f".{name}.*-*")):
        kind, _, pid = path.name[len(name) + 2:].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not (parent / name).exists():  # killed between its two renames: put the old one back
            os.replace(path, parent / name)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_yaml(path: str | Path, what: str, missing_fix: str) -> Any:
    """The parsed YAML at ``path``; a missing file or a syntax error is a one-line ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist", missing_fix)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({str(e).splitlines()[0]})", "fix the YAML syntax") from None
