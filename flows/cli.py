"""The orchestration commands of ``turboquant``: ``run`` (the whole plan as the Prefect flow quantize_model),
``nightly`` (one pass of the watch list) and ``demo`` (the bundled example plan, run as ``run`` runs a plan).

They live above the engine because they start Prefect flows; ``turboquant.cli`` loads them through the
``turboquant.cli`` entry-point group (``pyproject.toml``), so the engine never imports the flows it is driven by.
The engine, Prefect and the flows are imported only when one of these commands runs (every ``turboquant``
invocation loads this module).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from turboquant.cli_support import EXIT_GATE_FAILED, handle_errors
from turboquant.errors import ConfigError


@handle_errors
def run(
    params: Path = typer.Argument(Path("params.yaml"), help="The plan (params.yaml)."),
    run_dir: Path = typer.Option(Path("runs/latest"), help="Where the run's outputs go."),
    placement: str = typer.Option("local", help="local: everything in this process; pools: each quantization as a "
                                                "run of the quantize_method deployment on its pool (needs a server "
                                                "and workers, see deployments/)."),
    progress: bool = typer.Option(True, help="Show a progress bar over the plan's steps."),
) -> None:
    """Run the whole plan as the Prefect flow quantize_model (embedded: no server needed)."""
    from turboquant.pipeline.placement import place_method
    from turboquant.pipeline.plan import Plan

    if placement not in ("local", "pools"):
        raise ConfigError(f"--placement {placement!r} is not local or pools", "pass --placement local or pools")
    plan = Plan.from_yaml(params)  # a bad plan fails here, before Prefect starts
    if not plan.evaluation.text:
        raise ConfigError(f"{params} sets no evaluation.text, which every artifact is validated on",
                          "set evaluation.text to a held-out text file (e.g. ../shared/data/heldout/all.txt)")
    for m in plan.models:  # and so does an impossible (scheme, format) on a local model's real shapes
        if m.local_dir:
            plan.require_formats(m.local_dir, m.id)
    if placement == "pools":
        for q in plan.quantize:
            place_method(q.config.method)  # no pool with a worker for a method fails here too
    _prefect_defaults()
    from flows.quantize_model import quantize_model
    from tasks.progress import plan_progress

    with plan_progress(plan, enabled=progress):
        verdicts = quantize_model(params=str(params), run_dir=str(run_dir), placement=placement)
    passed = sum(v["passed"] for v in verdicts)
    typer.echo(f"{passed} of {len(verdicts)} artifacts passed their gates; report: {run_dir}")
    failed = [v for v in verdicts if not v["passed"]]
    if failed:
        typer.echo(f"turboquant: {len(failed)} artifact(s) not approved; first: {Path(failed[0]['artifact']).name}: "
                   f"{'; '.join(failed[0]['reasons'])}", err=True)
        raise typer.Exit(EXIT_GATE_FAILED)


@handle_errors
def nightly(
    watch: Path = typer.Option(Path("deployments/watch.yaml"), help="The watch list (repos, or authors + filter)."),
    params: Path = typer.Option(Path("params.yaml"), help="The plan each new release runs (its models are replaced "
                                                           "by the release)."),
    runs_root: Path = typer.Option(Path("runs/nightly"), help="Where each release's run and the ledger go."),
    placement: str = typer.Option("local", help="local or pools (see `turboquant run`)."),
    max_concurrent: int = typer.Option(4, min=1, help="Releases processed at once (a Prefect global concurrency "
                                                      "limit)."),
) -> None:
    """Check the watch list once and run the plan on every release not yet processed, the releases concurrently
    (what the 02:00 UTC deployment does)."""
    from turboquant.pipeline.plan import Plan
    from turboquant.release.watch import load_watch

    Plan.from_yaml(params)
    load_watch(watch)
    _prefect_defaults()
    from flows.nightly import nightly as nightly_flow

    outcomes = nightly_flow(watch=str(watch), params=str(params), runs_root=str(runs_root), placement=placement,
                            max_concurrent=max_concurrent)
    runs_root.mkdir(parents=True, exist_ok=True)
    (runs_root / "last-nightly.json").write_text(json.dumps(outcomes, indent=2, sort_keys=True, default=str) + "\n")
    for o in outcomes:
        extra = f" ({o['passed']} approved)" if "passed" in o else (f": {o['error'].splitlines()[0]}" if "error" in o else "")
        typer.echo(f"{o['status']:9s} {o['repo_id']}@{o['sha'][:12]}{extra}")
    if any(o["status"] == "failed" for o in outcomes):
        raise typer.Exit(EXIT_GATE_FAILED)


@handle_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Where the demo plan, its run and the report go."),
    model: Optional[Path] = typer.Option(None, help="Model to use (default: ../shared/models/tq-ref-llama, "
                                                   "else a tiny Llama the demo builds)."),
    text: Optional[Path] = typer.Option(None, help="Evaluation text (default: ../shared/data/heldout/all.txt)."),
    max_tokens: int = typer.Option(4096, help="Tokens of the text every artifact is validated on."),
    progress: bool = typer.Option(True, help="Show a progress bar over the plan's steps."),
) -> None:
    """The whole product on the bundled model: calibrate, quantize with GPTQ / AWQ / RTN in parallel, export to
    GGUF, GPTQ, AWQ, MLX and compressed-tensors, validate each in its runtime, gate, report."""
    from turboquant.demo import demo_plan, verdict_table
    from turboquant.pipeline.plan import Plan

    params, notes = demo_plan(out, model, text, max_tokens)
    for note in notes:
        typer.echo(f"note: {note}")
    plan = Plan.from_yaml(params)
    typer.echo(f"demo plan {params}: {sum(len(q.formats) for q in plan.quantize)} artifacts from "
               f"{len(plan.quantize)} quantizations of {plan.models[0].id}")
    _prefect_defaults()
    from flows.quantize_model import quantize_model
    from tasks.progress import plan_progress

    run_dir = out / "run"
    with plan_progress(plan, enabled=progress):
        verdicts = quantize_model(params=str(params), run_dir=str(run_dir), placement="local")
    typer.echo(verdict_table(verdicts))
    reports = sorted(run_dir.glob("*/report.html"))
    passed = sum(v["passed"] for v in verdicts)
    typer.echo(f"{passed} of {len(verdicts)} artifacts passed their gates; report: "
               f"{reports[0] if reports else run_dir}")
    if passed < len(verdicts):
        raise typer.Exit(EXIT_GATE_FAILED)


def _prefect_defaults() -> None:
    """Settings every command that starts flows runs with (the user's environment wins): our log lines in the
    Prefect logs, and time for an embedded server to start on a busy machine (Prefect's default 20 s is not)."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "turboquant")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def register(app: typer.Typer) -> None:
    """Add ``run``, ``nightly`` and ``demo`` to the ``turboquant`` command line (the ``turboquant.cli`` entry
    point)."""
    app.command()(run)
    app.command()(nightly)
    app.command()(demo)
