"""Nightly (cron 02:00 UTC in deployments/prefect.yaml): watch list → new releases → quantize_model for each.

A release is a watched repo's head commit. It is skipped when it was already processed for this plan and this code
version: its key (``release.keys``) is in the local ledger of finished runs, or the Hub's commit history of
the plan's target repos carries the key of one of its artifacts. A release the plan cannot be run on (triage from
its config alone: an architecture, source encoding or shape some planned artifact cannot take) is reported as
``unsupported`` with the reasons, and costs no weight download.

Every release left is submitted at once, each a ``process-release`` task whose body is that release's
``quantize_model`` run (a child flow run). How many run together is a Prefect global concurrency limit
(``RELEASE_LIMIT``, set from ``max_concurrent``, visible and adjustable in the Prefect UI); with
``placement=pools`` each release's quantizations further queue on their pools, whose work-pool concurrency
limits (``infra/``) bound each kind of worker. One release failing does not stop the others.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.concurrency.sync import concurrency
from prefect.futures import wait

from flows.quantize_model import _publish_target, quantize_model
from tasks.releases import (find_releases, keys_on_hub, ledger_keys, record_release, set_release_limit,
                            triage_release)
from turboquant.pipeline.plan import Plan
from turboquant.release.keys import plan_digest, release_artifact_key, release_key

LEDGER = "processed.jsonl"
#: The global concurrency limit every release run holds one slot of while it runs.
RELEASE_LIMIT = "turboquant-nightly-releases"
#: Releases processed at once unless the deployment says otherwise.
DEFAULT_MAX_CONCURRENT = 4


@flow(name="nightly", log_prints=True)
def nightly(watch: str = "deployments/watch.yaml", params: str = "params.yaml", runs_root: str = "runs/nightly",
            placement: str = "auto", max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> list[dict]:
    """One entry per watched release: ``{"repo_id", "sha", "status": skipped | unsupported | processed | failed,
    ...}``; processed and failed ones carry their run's ``started`` / ``finished`` times (epoch seconds), processed
    ones the artifacts the gates or the pipeline rejected with the reasons. A failed release (its run raised) is
    not recorded, so the next night retries it; a processed one with rejected artifacts is done."""
    plan = Plan.from_yaml(params)
    plan_sha = plan_digest(params)
    ledger = Path(runs_root) / LEDGER
    done = ledger_keys(ledger)
    outcomes: list[dict] = []
    todo = []
    for r in find_releases(watch):
        key = release_key(r["sha"], plan_sha)
        name = r["repo_id"].split("/")[-1]
        planned = {release_artifact_key(key, f"{q.name}-{t.label}") for q in plan.quantize for t in q.formats}
        targets = sorted({t["repo_id"] for q in plan.quantize for f in q.formats
                          if (t := _publish_target(plan.publish, name, f.format, q))})
        if key in done or (targets and planned & set(keys_on_hub(targets))):
            print(f"skip {r['repo_id']}@{r['sha'][:12]}: already processed for this plan and code")
            outcomes.append({**r, "status": "skipped", "release": key})
            continue
        reasons = triage_release(params, r["repo_id"], r["sha"])
        if reasons:
            print(f"unsupported {r['repo_id']}@{r['sha'][:12]}: {'; '.join(reasons)}")
            outcomes.append({**r, "status": "unsupported", "release": key, "error": "; ".join(reasons)})
            continue
        todo.append({**r, "release": key, "run_dir": str(Path(runs_root) / f"{name}@{r['sha'][:12]}")})
    if todo:
        set_release_limit(RELEASE_LIMIT, max_concurrent)
        futures = [process_release.submit(r, params, placement, str(ledger)) for r in todo]
        wait(futures)
        outcomes += [f.result() for f in futures]
    return outcomes


@task(name="process-release")
def process_release(release: dict, params: str, placement: str, ledger: str) -> dict:
    """One release's ``quantize_model`` run, holding a slot of ``RELEASE_LIMIT`` while it runs; a failure becomes
    this release's ``failed`` outcome."""
    with concurrency(RELEASE_LIMIT, occupy=1, strict=True):
        started = time.time()
        try:
            verdicts = quantize_model(params=params, run_dir=release["run_dir"], placement=placement,
                                      models=[{"id": release["repo_id"], "revision": release["sha"]}])
        except Exception as e:  # noqa: BLE001 - one release's failure is reported, the others still run
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"FAILED {release['repo_id']}@{release['sha'][:12]}: {first}")
            return {**release, "status": "failed", "error": str(e)[:500], "started": started,
                    "finished": time.time()}
        finished = time.time()
    passed = sum(v["passed"] for v in verdicts)
    rejected = {Path(v["artifact"]).name: v["reasons"] for v in verdicts if not v["passed"]}
    entry = {k: release[k] for k in release if k != "run_dir"}
    record_release(ledger, {**entry, "passed": passed, "artifacts": len(verdicts)})
    return {**release, "status": "processed", "passed": passed, "rejected": rejected, "started": started,
            "finished": finished}
