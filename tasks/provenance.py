"""Provenance: record what a run produced in DVC (content-addressed cache, pushed to the configured remote)."""

from __future__ import annotations

import os

from prefect import get_run_logger, task

from turboquant.release.dvc import Dvc, find_dvc_root


@task(name="track-outputs", retries=2, retry_delay_seconds=[5, 30])
def track_outputs(paths: list[str], push: bool = True, remote: str | None = None) -> list[str]:
    """``dvc add`` (or commit a pointer under dvc/tracked/ for git-ignored run directories) each of ``paths`` —
    the calibration file and the artifact directories — then ``dvc push`` them to ``remote`` (default: the
    repository's default remote, or ``TURBOQUANT_DVC_REMOTE``). Returns the .dvc files to commit to git; outside a
    DVC repository it tracks nothing and says so."""
    logger = get_run_logger()
    existing = [p for p in paths if p and os.path.exists(p)]
    if not existing:
        return []
    root = find_dvc_root(existing[0])
    if root is None:
        logger.warning("not tracked with DVC: %s is outside a DVC repository", existing[0])
        return []
    dvc = Dvc(root)
    pointers = [str(dvc.track(p)) for p in existing]
    if push:
        dvc.push(pointers, remote or os.environ.get("TURBOQUANT_DVC_REMOTE") or None)
    logger.info("tracked %d outputs with DVC%s; commit %s", len(pointers), " and pushed" if push else "",
                ", ".join(dvc.rel(p) for p in pointers))
    return pointers
