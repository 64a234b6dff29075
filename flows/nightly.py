"""Nightly (cron 02:00 UTC in deployments/prefect.yaml): watch list → new releases → quantize_model for each.

A release is a watched repo's head commit. It is skipped when it was already processed for this plan and this code
version: its key (``release.keys``) is in the local ledger of finished runs, or the Hub's commit history of
the plan's target repos carries the key of one of its artifacts. A release the plan cannot be run on (triage from
its config alone: an architecture, source encoding or shape some planned artifact cannot take) is reported as
``unsupported`` with the reasons, and costs no weight download. One release failing does not stop the others.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.quantize_model import _publish_target, quantize_model
from tasks.releases import find_releases, keys_on_hub, ledger_keys, record_release, triage_release
from turboquant.pipeline.plan import Plan
from turboquant.release.keys import plan_digest, release_artifact_key, release_key

LEDGER = "processed.jsonl"


@flow(name="nightly", log_prints=True)
def nightly(watch: str = "deployments/watch.yaml", params: str = "params.yaml", runs_root: str = "runs/nightly",
            placement: str = "auto") -> list[dict]:
    """One entry per watched release: ``{"repo_id", "sha", "status": skipped | unsupported | processed | failed,
    ...}``."""
    plan = Plan.from_yaml(params)
    plan_sha = plan_digest(params)
    ledger = Path(runs_root) / LEDGER
    done = ledger_keys(ledger)
    outcomes = []
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
        run_dir = str(Path(runs_root) / f"{name}@{r['sha'][:12]}")
        try:
            verdicts = quantize_model(params=params, run_dir=run_dir, placement=placement,
                                      models=[{"id": r["repo_id"], "revision": r["sha"]}])
        except Exception as e:  # noqa: BLE001 - one release's failure is reported, the others still run
            print(f"FAILED {r['repo_id']}@{r['sha'][:12]}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            outcomes.append({**r, "status": "failed", "release": key, "error": str(e)[:500]})
            continue
        passed = sum(v["passed"] for v in verdicts)
        record_release(str(ledger), {**r, "release": key, "passed": passed, "artifacts": len(verdicts)})
        outcomes.append({**r, "status": "processed", "release": key, "passed": passed, "run_dir": run_dir})
    return outcomes
