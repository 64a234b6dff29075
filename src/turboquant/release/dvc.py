"""The ``dvc`` command line, which DVC-tracked inputs and outputs go through.

The engine never imports ``dvc``: ``Dvc`` runs ``python -m dvc`` (the interpreter's own DVC) as a subprocess,
with its site cache kept inside the project (``.dvc/tmp/site-cache``) and analytics off, so that no command
writes to ``/var/tmp/dvc`` or phones home.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from turboquant.errors import ProvenanceError




def find_dvc_root(path: str | Path) -> Path | None:
    """The nearest directory at or above ``path`` holding a ``.dvc`` directory."""
    p = Path(path).resolve()
    for d in (p, *p.parents):
        if (d / ".dvc").is_dir():
            return d
    return None


def dvc_env(root: Path) -> dict[str, str]:
    """Environment for ``dvc``: the site cache inside the project, no analytics, no update checks."""
    env = dict(os.environ)
    env.setdefault("DVC_SITE_CACHE_DIR", str(root / ".dvc" / "tmp" / "site-cache"))
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("DVC_NO_UPDATER", "1")
    return env


@dataclass(frozen=True)
class Dvc:
    """The ``dvc`` CLI of this interpreter, run in one repository (``root``)."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> "Dvc":
        root = find_dvc_root(path)
        if root is None:
            raise ProvenanceError(f"{path} is not inside a DVC repository",
                                  "run `git init && dvc init` in the project, or pass a path inside one")
        return cls(root)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "dvc", *args]
        res = subprocess.run(cmd, cwd=self.root, env=dvc_env(self.root), capture_output=True, text=True)
        if check and res.returncode != 0:
            last = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise ProvenanceError(f"`dvc {' '.join(args)}` failed: {last[0]}",
                                  "check the DVC remote configuration (`dvc remote list`) and the paths")
        return res

    def rel(self, path: str | Path) -> str:
        return Path(os.path.relpath(Path(path).resolve(), self.root)).as_posix()

    def is_git_ignored(self, path: str | Path) -> bool:
        res = subprocess.run(["git", "check-ignore", "-q", self.rel(path)], cwd=self.root, capture_output=True)
        return res.returncode == 0

    def track(self, path: str | Path) -> Path:
        """Put ``path`` (file or directory) under DVC (content-addressed in the cache); returns its .dvc file.

        ``dvc add`` writes ``PATH.dvc`` beside it; when that file would be git-ignored (a run directory), the
        pointer goes to ``dvc/tracked/<path with / as -->.dvc`` instead — flat, so that an ignore rule on a
        directory name (``runs/``) cannot match the pointer too — and ``dvc commit`` fills in its hash."""
        path = Path(path).resolve()
        sibling = path.with_name(path.name + ".dvc")
        if not self.is_git_ignored(sibling):
            self.run("add", "-q", self.rel(path))
            return sibling
        pointer = self.root / "dvc" / "tracked" / (self.rel(path).replace("/", "--") + ".dvc")
        if self.is_git_ignored(pointer):
            raise ProvenanceError(f"{self.rel(pointer)} would be git-ignored, so DVC refuses it",
                                  "remove the .gitignore rule that matches dvc/tracked/")
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(f"outs:\n- path: {Path(os.path.relpath(path, pointer.parent)).as_posix()}\n")
        self.run("commit", "-q", "-f", self.rel(pointer))
        return pointer

    def push(self, targets: list[str | Path], remote: str | None = None) -> None:
        self.run("push", "-q", *(["-r", remote] if remote else []), *[self.rel(t) for t in targets])

    def pull(self, targets: list[str | Path], remote: str | None = None) -> subprocess.CompletedProcess:
        return self.run("pull", *(["-r", remote] if remote else []), *[self.rel(t) for t in targets], check=False)

    def cache_object(self, md5: str) -> Path:
        """Where DVC 3 keeps the object with this md5 in the local cache."""
        return self.root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
