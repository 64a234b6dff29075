"""`turboquant` command line: the commands a person and dvc.yaml run.

Every failure a user can cause prints one line naming the problem and the fix and exits non-zero; outputs are
written under a temporary name and renamed at the end, so a failed command leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Optional

import typer

from turboquant.cli_support import (EXIT_GATE_FAILED, EXIT_NOT_REPRODUCED, fail as _fail, handle_errors,
                                    parse_options, progress_lines)
from turboquant.errors import ConfigError

# Optional libraries the runtimes pull in (torchao via GPTQModel) log import-time noise at WARNING on every command
# (missing CUDA kernels, deprecated pytree registrations); a command's stderr is for its own one-line errors.
for _noisy in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

app = typer.Typer(
    name="turboquant",
    help="Quantize causal LMs into validated, reproducible artifacts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
@handle_errors
def quantize(
    model: str = typer.Argument(..., help="Local model directory or Hub repo id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (canonical quantized checkpoint)."),
    method: str = typer.Option("rtn", help="Quantization method (see `turboquant methods`)."),
    bits: Optional[int] = typer.Option(None, help="Weight bits, 2-8 (default 4)."),
    group_size: Optional[int] = typer.Option(None, help="Group size: 32/64/128/..., -1 per-channel, 0 per-tensor."),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric (default) or asymmetric codes."),
    option: list[str] = typer.Option([], "--option", help="Method option key=value (repeatable), e.g. mse_clip=true."),
    target_bpw: Optional[float] = typer.Option(
        None, help="Mixed precision: bits per layer chosen by measured sensitivity so that the average stored "
                   "bits per weight (scales included) is at most this (rtn / gptq; needs calibration)."),
    candidate_bits: str = typer.Option("2,3,4,6,8", help="Bit widths a layer may get (with --target-bpw)."),
    calib: Optional[Path] = typer.Option(None, help="Calibration file from `turboquant calibrate`."),
    data: list[str] = typer.Option([], help="Build the calibration set on the fly from these files/datasets."),
    n_samples: int = typer.Option(128, help="Calibration windows (with --data)."),
    seqlen: int = typer.Option(2048, help="Calibration window length (with --data; capped at the model context)."),
    seed: int = typer.Option(0, help="Calibration sampling seed (with --data)."),
    sequential: bool = typer.Option(True, help="Feed each block the outputs of the already-quantized blocks."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit) to pin."),
    allow_pickle: bool = typer.Option(False, help="Allow loading pickle (*.bin) checkpoints you trust."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    progress: bool = typer.Option(True, help="Show a progress bar per decoder block (a log line per block when "
                                             "stderr is not a terminal)."),
    device: Optional[str] = typer.Option(
        None, help="Compute device: auto, cpu, cuda, cuda:N or mps (default: $TURBOQUANT_DEVICE, else auto)."),
    activation_budget: Optional[str] = typer.Option(
        None, help="Calibration activations kept on the device, e.g. 16GiB; the rest wait in host memory "
                   "(default: $TURBOQUANT_ACTIVATION_BUDGET, else half the device memory free)."),
) -> None:
    """Quantize MODEL with one method and scheme into a canonical checkpoint that every exporter reads."""
    from turboquant.io.calibration import calibration_for
    from turboquant.io.model import open_model
    from turboquant.methods.base import config_with_scheme, get_method
    from turboquant.quantize.pipeline import quantize as run_quantize

    cfg = config_with_scheme(method, parse_options(option), bits=bits, group_size=group_size, symmetric=sym)
    if target_bpw is not None:
        from turboquant.methods.mixed import MixedPrecisionConfig, parse_bits

        cfg = MixedPrecisionConfig.wrap(cfg, target_bpw, parse_bits(candidate_bits))
    if not get_method(cfg.method).checkpoint:  # bitsandbytes: a transformers checkpoint; int8: refused there
        from turboquant.api import write_bnb_artifact

        path = write_bnb_artifact(model, cfg, out, revision=revision, overwrite=overwrite, allow_pickle=allow_pickle)
        typer.echo(f"wrote {path}")
        return
    opened = open_model(model, revision, allow_pickle=allow_pickle)
    calib_set = calibration_for(opened.source.path, opened.config.get("max_position_embeddings"), calib=calib,
                                data=data, n_samples=n_samples, seqlen=seqlen, seed=seed)
    with progress_lines(progress and not sys.stderr.isatty()):
        path = run_quantize(opened, cfg, out, overwrite=overwrite, progress=progress and sys.stderr.isatty(),
                            calib=calib_set, sequential=sequential, device=device,
                            activation_budget=activation_budget)
    typer.echo(f"wrote {path}")


@app.command()
@handle_errors
def calibrate(
    model: str = typer.Argument(..., help="Model whose tokenizer (and context length) to use."),
    data: list[str] = typer.Option(..., help="Text / JSON lines / Parquet files, or Hub dataset ids (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Calibration file to write (.safetensors)."),
    n_samples: int = typer.Option(128, help="Number of windows."),
    seqlen: int = typer.Option(2048, help="Tokens per window (capped at the model's context)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    text_field: str = typer.Option("text", help="Column holding the text in JSON/Parquet data."),
    chat_template: bool = typer.Option(False, help="Wrap each document in the tokenizer's chat template."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of MODEL."),
) -> None:
    """Build a reproducible calibration set (token windows + recipe) for MODEL."""
    from turboquant.io.calibration import CalibrationRecipe, build_calibration
    from turboquant.io.model import read_config, resolve_model

    source = resolve_model(model, revision)
    recipe = CalibrationRecipe(tuple(data), n_samples=n_samples, seqlen=seqlen, seed=seed, text_field=text_field,
                               chat_template=chat_template)
    config = read_config(source.path)
    calib_set = build_calibration(recipe, source.path, config.get("max_position_embeddings"))
    calib_set.save(out)
    n, length = calib_set.input_ids.shape
    typer.echo(f"wrote {out}: {n} windows x {length} tokens")


@app.command("eval")
@handle_errors
def eval_command(
    model: str = typer.Argument(..., help="Model directory, Hub repo id, or quantized checkpoint directory."),
    text: Path = typer.Option(..., help="Evaluation text file (e.g. WikiText-2 wiki.test.raw)."),
    ctx: int = typer.Option(512, help="Window length in tokens (capped at the model's context)."),
    stride: Optional[int] = typer.Option(None, help="Window stride (default: ctx, non-overlapping)."),
    baseline: Optional[str] = typer.Option(None, help="Unquantized model to compare against (KL, top-1)."),
    max_tokens: Optional[int] = typer.Option(None, help="Evaluate only the first N tokens of the text."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    device: Optional[str] = typer.Option(
        None, help="Device for the torch runtimes: auto, cpu, cuda, cuda:N or mps (default: $TURBOQUANT_DEVICE, "
                   "else auto)."),
) -> None:
    """Perplexity of MODEL on TEXT; with --baseline also KL divergence and top-1 agreement."""
    from turboquant.quality.evaluate import evaluate_paths, write_json
    from turboquant.io.model import resolve_model

    model_dir = resolve_model(model).path
    base_dir = resolve_model(baseline).path if baseline else None
    result = evaluate_paths(model_dir, text, ctx=ctx, stride=stride, baseline=base_dir, max_tokens=max_tokens,
                            progress=sys.stderr.isatty(), device=device)
    line = f"ppl {result.ppl:.4f} over {result.n_scored} tokens ({result.n_windows} windows of {result.ctx})"
    if result.kl is not None:
        line += (f"; baseline ppl {result.baseline_ppl:.4f} ({result.ppl_delta_pct:+.2f}%), "
                 f"KL {result.kl:.6f}, top-1 {result.top1:.4f}")
    typer.echo(line)
    if json_out:
        write_json(result, json_out)


@app.command()
@handle_errors
def export(
    qdir: Path = typer.Argument(..., help="Quantized checkpoint directory (from `turboquant quantize`)."),
    fmt: str = typer.Option(..., "--format", "-f", help="Target format (see `turboquant formats`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the artifact."),
    gguf_type: Optional[str] = typer.Option(None, help="GGUF tensor type, e.g. Q4_0, Q8_0, Q4_K_M (gguf only)."),
    option: list[str] = typer.Option([], "--option", help="Format option key=value (repeatable)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Write QDIR as a deployable artifact in one format; impossible combinations fail before any work."""
    from turboquant.formats import export as run_export

    options = parse_options(option)
    if gguf_type is not None:
        if fmt != "gguf":
            raise ConfigError(f"--gguf-type applies to --format gguf, not {fmt}", "drop --gguf-type")
        options["gguf_type"] = gguf_type
    path = run_export(qdir, fmt, out, overwrite=overwrite, **options)
    typer.echo(f"wrote {path}")


@app.command()
@handle_errors
def validate(
    artifact: Path = typer.Argument(..., help="Artifact (from `turboquant export`) or quantized checkpoint directory."),
    baseline: str = typer.Option(..., help="The unquantized model (directory or Hub repo id)."),
    text: Path = typer.Option(..., help="Evaluation text (e.g. ../shared/data/heldout/all.txt)."),
    ctx: int = typer.Option(512, help="Window length for perplexity / KL / top-1."),
    long_ctx: Optional[int] = typer.Option(None, help="Long-context window (default: the longest that fits)."),
    max_tokens: Optional[int] = typer.Option(None, help="Evaluate only the first N tokens of the text."),
    tasks: list[str] = typer.Option([], "--task", help="lm-eval task (repeatable), e.g. tq_story_cloze."),
    task_limit: Optional[int] = typer.Option(None, help="Examples per task (default: all)."),
    gate: list[str] = typer.Option([], "--gate", help="Gate override key=value, e.g. max_kl=0.05 (null disables)."),
    baseline_cache: Optional[Path] = typer.Option(None, help="File caching the baseline's distributions."),
    json_out: Path = typer.Option(..., "--json", help="Where to write metrics + verdict (JSON)."),
    speed: bool = typer.Option(True, help="Also time prompt and greedy decode and measure peak memory, against the "
                                          "unquantized model in the same runtime."),
    device: Optional[str] = typer.Option(
        None, help="Device for the torch runtimes: auto, cpu, cuda, cuda:N or mps (default: $TURBOQUANT_DEVICE, "
                   "else auto)."),
) -> None:
    """Measure ARTIFACT in its own runtime against BASELINE and apply the gates; exit 3 when a gate fails."""
    from turboquant.quality.gates import Gates
    from turboquant.io.model import resolve_model
    from turboquant.quality.speed import speed_line
    from turboquant.quality.validate import recorded_bits, validate as run_validate, write_validation

    overrides = parse_options(gate)
    gates = Gates.for_bits(recorded_bits(artifact) or 16, **overrides) if overrides else None
    metrics = run_validate(artifact, resolve_model(baseline).path, text, ctx=ctx, long_ctx=long_ctx,
                           max_tokens=max_tokens, tasks=tuple(tasks), task_limit=task_limit, gates=gates,
                           baseline_cache=baseline_cache, progress=sys.stderr.isatty(), device=device,
                           speed=speed)
    write_validation(metrics, json_out)
    verdict = metrics["verdict"]
    line = (f"{metrics['format']} in {metrics['runtime']}: ppl {metrics['ppl']:.4f} ({metrics['ppl_delta_pct']:+.2f}%), "
            f"KL {metrics['kl']:.6f}, top-1 {metrics['top1']:.4f}, {metrics['bits_per_weight']:.2f} bits/weight")
    typer.echo(line)
    if "speed" in metrics:
        typer.echo(speed_line(metrics["speed"]))
    if not verdict["passed"]:
        typer.echo(f"turboquant: gate failed: {'; '.join(verdict['reasons'])}", err=True)
        raise typer.Exit(EXIT_GATE_FAILED)
    typer.echo("all gates passed")


@app.command()
@handle_errors
def report(
    run_dir: Path = typer.Argument(..., help="Run directory holding validation JSON files (and quantized checkpoints)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the report (default: RUN_DIR)."),
) -> None:
    """Write the run's Markdown + self-contained HTML quality report with its plots."""
    from turboquant.quality.report import REPORT_HTML, write_report

    md = write_report(run_dir, out)
    typer.echo(f"wrote {md} and {md.with_name(REPORT_HTML)}")


@app.command()
@handle_errors
def plan(params: Path = typer.Argument(Path("params.yaml"), help="The plan (params.yaml).")) -> None:
    """Validate the plan and print what it expands to; impossible combinations fail before any work."""
    from turboquant.pipeline.overview import overview
    from turboquant.pipeline.plan import Plan

    lines, failures, n_artifacts = overview(Plan.from_yaml(params))
    for line in lines:
        typer.echo(line)
    if failures:
        where, err = failures[0]
        raise ConfigError(f"{len(failures)} planned artifact(s) cannot be made; first {where}: {err.problem}", err.fix)
    typer.echo(f"plan OK: {n_artifacts} artifacts")


@app.command()
@handle_errors
def formats() -> None:
    """List the export formats and the runtimes that load them."""
    from turboquant.formats import FORMATS

    for name, spec in sorted(FORMATS.items()):
        typer.echo(f"{name:20s} {spec.description} — loads in {spec.runtime}")


@app.command()
@handle_errors
def methods() -> None:
    """List the registered quantization methods."""
    from turboquant.methods import METHODS

    for name, spec in sorted(METHODS.items()):
        typer.echo(f"{name:10s} {spec.description}")


@app.command()
@handle_errors
def fetch(
    repo: str = typer.Argument(..., help="Hub repo id, e.g. org/model."),
    revision: Optional[str] = typer.Option(None, help="Branch, tag or commit sha to pin (default: main)."),
    allow_pickle: bool = typer.Option(False, help="Also fetch pickle (*.bin) checkpoints you trust."),
) -> None:
    """Download the files a run needs from REPO at a pinned revision; prints the local path and commit sha."""
    from turboquant.io.hub import fetch_snapshot

    path, sha = fetch_snapshot(repo, revision, allow_pickle=allow_pickle)
    typer.echo(f"{repo}@{sha} -> {path}")


@app.command()
@handle_errors
def publish(
    artifact_dir: Path = typer.Argument(..., help="Exported artifact directory (with manifest.json)."),
    repo: str = typer.Option(..., "--repo", help="Target repo 'namespace/name', or a namespace to use the "
                                                 "community naming ({Model}-GGUF, {Model}-GPTQ-Int4, ...)."),
    validation: Optional[Path] = typer.Option(None, help="Validation JSON (default: ../../eval/<artifact>.json)."),
    private: bool = typer.Option(False, help="Create the repo private."),
    dry_run: bool = typer.Option(False, help="Print the model card and the file list; contact nobody."),
) -> None:
    """Publish an approved artifact to the Hub in one idempotent commit, with its model card (token: HF_TOKEN
    or the stored login)."""
    from turboquant.release.publish import default_validation_path, load_validation, publish as run_publish, target_repo

    data = load_validation(validation or default_validation_path(artifact_dir))
    repo_id = target_repo(artifact_dir, repo, data)
    result = run_publish(artifact_dir, repo_id, validation=data, private=private, dry_run=dry_run)
    if dry_run:
        typer.echo(result.card)
        typer.echo(f"files for {result.repo_id}:")
        for name in result.files:
            typer.echo(f"  {name}")
        typer.echo(f"dry run: nothing was published (idempotency key {result.key})")
        return
    if result.created:
        typer.echo(f"published {artifact_dir.name} to {result.url} (commit {result.commit_sha})")
    else:
        typer.echo(f"{artifact_dir.name} is already published in {result.url} (commit {result.commit_sha}); "
                   "no new commit")


# ---- provenance commands (reproduce) ----

stage_app = typer.Typer(help="The DVC pipeline's stages (dvc.yaml runs these; each reads its slice of the plan).",
                        no_args_is_help=True)
app.add_typer(stage_app, name="stage")


@app.command("reproduce")
@handle_errors
def reproduce_command(
    manifest: Path = typer.Argument(..., help="An artifact's manifest.json (or the artifact directory)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Keep the rebuild here (default: a temp dir)."),
    model: Optional[Path] = typer.Option(None, help="The source model, when it is no longer at the recorded path."),
    pull: bool = typer.Option(True, help="`dvc pull` the calibration file when it is missing or at another version."),
) -> None:
    """Rebuild the artifact of MANIFEST from its recorded inputs and compare sha256s file by file; exit 4 unless
    every file is identical."""
    from turboquant.release.reproduce import reproduce

    result = reproduce(manifest, out, model, pull)
    for note in result.notes:
        typer.echo(f"note: {note}; the rebuild may not be bit-exact (numeric differences are reported)")
    for f in result.files:
        typer.echo(f.line())
    same = sum(f.ok for f in result.files)
    typer.echo(f"{same} of {len(result.files)} files identical")
    if result.tampered:
        name, state = next(iter(result.tampered.items()))
        more = f" (and {len(result.tampered) - 1} more)" if len(result.tampered) > 1 else ""
        _fail(f"file '{name}' of {result.manifest.parent.name} is {state} since export{more}: it does not match "
              f"manifest.json. Fix: restore the artifact (`dvc checkout` / `dvc pull`) or re-export it; never edit "
              f"an artifact by hand.", EXIT_NOT_REPRODUCED)
    if not result.identical:
        typer.echo("turboquant: the rebuild is not byte-identical to the manifest", err=True)
        raise typer.Exit(EXIT_NOT_REPRODUCED)


@stage_app.command("sync")
@handle_errors
def stage_sync(
    params: Path = typer.Argument(Path("params.yaml"), help="The plan (params.yaml)."),
    strict: bool = typer.Option(False, help="Fail when dvc/plan.yaml (the stage list) had to change (dvc.yaml)."),
) -> None:
    """Expand the plan into dvc/plan.yaml (the stage keys dvc.yaml iterates) and one slice per stage."""
    from turboquant.pipeline.plan import Plan
    from turboquant.pipeline.stages import PLAN_FILE, SLICES_DIR, sync_stages

    n_slices, changed = sync_stages(Plan.from_yaml(params), str(params))
    typer.echo(f"wrote {n_slices} stage slices under {SLICES_DIR}" + (f" and {PLAN_FILE}" if changed else ""))
    if strict and changed == "changed":
        raise ConfigError(f"the plan's stage list changed, {PLAN_FILE} was rewritten",
                          "run `dvc repro` again (and commit dvc/plan.yaml)")


@stage_app.command("calibrate")
@handle_errors
def stage_calibrate(key: str = typer.Argument(..., help="Model key (dvc/params/calibrate/KEY.json).")) -> None:
    """Build the model's calibration set (`turboquant calibrate` with the plan's recipe)."""
    from turboquant.pipeline.stages import read_slice
    s = read_slice("calibrate", key)
    calibrate(model=s["model"], data=s["data"], out=Path(s["out"]), n_samples=s["n_samples"], seqlen=s["seqlen"],
              seed=s["seed"], text_field="text", chat_template=False, revision=s.get("revision"))


@stage_app.command("quantize")
@handle_errors
def stage_quantize(key: str = typer.Argument(..., help="MODEL--NAME (dvc/params/quantize/KEY.json).")) -> None:
    """Quantize with one plan entry; the calibration file is loaded with its md5, which the manifest records."""
    from turboquant.pipeline.stages import read_slice
    from turboquant.methods import make_config
    from turboquant.io.model import open_model
    from turboquant.io.calibration import load_calibration
    from turboquant.quantize.pipeline import quantize as run_quantize

    s = read_slice("quantize", key)
    cfg = dict(s["config"])
    config = make_config(cfg.pop("method"), **cfg)
    calib = load_calibration(s["calibration"]) if s.get("calibration") else None
    path = run_quantize(open_model(s["model"], s.get("revision")), config, Path(s["out"]), calib=calib,
                        overwrite=True, progress=False)
    typer.echo(f"wrote {path}")


@stage_app.command("export")
@handle_errors
def stage_export(key: str = typer.Argument(..., help="MODEL--NAME--LABEL (dvc/params/export/KEY.json).")) -> None:
    """Export one quantized checkpoint in one format (`turboquant export` with the plan's options)."""
    from turboquant.pipeline.stages import read_slice
    s = read_slice("export", key)
    export(qdir=Path(s["quantized"]), fmt=s["format"], out=Path(s["out"]), gguf_type=None,
           option=[f"{k}={json.dumps(v)}" for k, v in sorted(s["options"].items())], overwrite=True)


@stage_app.command("evaluate")
@handle_errors
def stage_evaluate(key: str = typer.Argument(..., help="MODEL--NAME--LABEL (dvc/params/evaluate/KEY.json).")) -> None:
    """Validate one artifact (`turboquant validate`); a failed gate is recorded in the metrics, not a stage error."""
    from turboquant.pipeline.stages import read_slice
    from turboquant.pipeline.plan import EvaluationSection
    from turboquant.io.model import resolve_model

    s = read_slice("evaluate", key)
    ev = EvaluationSection.from_dict(s["evaluation"])
    Path(s["out"]).parent.mkdir(parents=True, exist_ok=True)
    try:
        validate(artifact=Path(s["artifact"]), baseline=str(resolve_model(s["model"], s.get("revision")).path),
                 text=Path(ev.text), ctx=ev.ctx, long_ctx=None, max_tokens=ev.max_tokens,
                 tasks=list(ev.tasks or []), task_limit=ev.task_limit,
                 gate=[f"{k}={json.dumps(v)}" for k, v in sorted(s["gates"].items())],
                 baseline_cache=Path(s["baseline_cache"]), json_out=Path(s["out"]), speed=ev.speed, device=None)
    except typer.Exit as e:
        if e.exit_code != EXIT_GATE_FAILED:
            raise
        typer.echo("gate failed: recorded in the metrics; the artifact is not approved")


@stage_app.command("report")
@handle_errors
def stage_report() -> None:
    """Per model the run report (`turboquant report`), and reports/quality.json (one record per artifact) that
    `dvc plots show` draws."""
    from turboquant.pipeline.stages import read_slice, write_report_stage

    path, n = write_report_stage(read_slice("", "report"))
    typer.echo(f"wrote {path} ({n} artifacts)")


# ---- dispatcher commands (recommend) ----


@app.command()
@handle_errors
def recommend(
    target: Optional[str] = typer.Option(None, help="cpu, edge, gpu, qlora or lossless (default: the whole table)."),
) -> None:
    """Print which method and format fit a deployment target (the decision table of docs/methods.md)."""
    from turboquant.recommend import TABLE, recommend as pick, render_text

    rows = [pick(target)] if target is not None else list(TABLE)
    typer.echo("\n\n".join(render_text(r) for r in rows))


#: Entry-point group through which the layers above the engine add commands (``flows.cli``: ``run``, ``nightly``);
#: the engine itself never imports the orchestration code it is driven by.
COMMAND_PLUGINS = "turboquant.cli"


def _load_command_plugins() -> None:
    for ep in sorted(entry_points(group=COMMAND_PLUGINS), key=lambda e: e.name):
        ep.load()(app)


_load_command_plugins()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
