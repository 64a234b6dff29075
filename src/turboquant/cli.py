"""`turboquant` command line: the commands a person and dvc.yaml run.

Every failure a user can cause prints one line naming the problem and the fix and exits non-zero; outputs are
written under a temporary name and renamed at the end, so a failed command leaves nothing behind.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from turboquant.errors import ConfigError, TurboQuantError

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

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1


def _fail(message: str, code: int) -> None:
    typer.echo(f"turboquant: error: {message}", err=True)
    raise typer.Exit(code)


def _os_error_line(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"the disk is full{where}. Fix: free space or choose another --out location."
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}. Fix: choose a writable location or fix its permissions."
    return f"{e.strerror or e}{where}. Fix: check the path and try again."


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one line on stderr and a non-zero exit (traceback with TURBOQUANT_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except TurboQuantError as e:
            if os.environ.get("TURBOQUANT_DEBUG"):
                raise
            _fail(str(e), EXIT_USER_ERROR)
        except OSError as e:
            if os.environ.get("TURBOQUANT_DEBUG"):
                raise
            _fail(_os_error_line(e), EXIT_USER_ERROR)
        except KeyboardInterrupt:
            _fail("interrupted; no partial output was kept", 130)
        except Exception as e:  # noqa: BLE001 - the last line of defence for an unattended job
            if os.environ.get("TURBOQUANT_DEBUG"):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            _fail(f"internal error {type(e).__name__}: {first}. Fix: rerun with TURBOQUANT_DEBUG=1 and report it.",
                  EXIT_INTERNAL)

    return wrapper


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, true/false), else kept as text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"option '{pair}' is not key=value", "write options as --option key=value")
        try:
            out[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = raw
    return out


def build_config(method: str, bits: int | None, group_size: int | None, sym: bool | None, options: list[str]):
    """A validated method config from CLI flags; scheme flags are refused for methods without a scheme."""
    from dataclasses import fields

    from turboquant.methods import get_method

    spec = get_method(method)
    values = parse_options(options)
    names = {f.name for f in fields(spec.config_cls)}
    for key, value in (("bits", bits), ("group_size", group_size), ("symmetric", sym)):
        if value is None:
            continue
        if key not in names:
            raise ConfigError(f"method '{method}' takes no --{key.replace('_', '-')}", "drop that flag")
        values[key] = value
    return spec.config_cls.from_dict(values)


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
    progress: bool = typer.Option(True, help="Show a progress bar per decoder block."),
) -> None:
    """Quantize MODEL with one method and scheme into a canonical checkpoint that every exporter reads."""
    from turboquant.calibration import CalibrationRecipe, build_calibration
    from turboquant.methods import get_method
    from turboquant.provenance import load_calibration
    from turboquant.model import open_model
    from turboquant.quantize_checkpoint import quantize as run_quantize

    cfg = build_config(method, bits, group_size, sym, option)
    if target_bpw is not None:
        from turboquant.methods.mixed import MixedPrecisionConfig, parse_bits

        cfg = MixedPrecisionConfig.wrap(cfg, target_bpw, parse_bits(candidate_bits))
    if calib and data:
        raise ConfigError("both --calib and --data were given", "pass one of them")
    if not get_method(cfg.method).checkpoint:  # bitsandbytes: a transformers checkpoint; int8: refused there
        from turboquant.api import write_bnb_artifact

        path = write_bnb_artifact(model, cfg, out, revision=revision, overwrite=overwrite, allow_pickle=allow_pickle)
        typer.echo(f"wrote {path}")
        return
    opened = open_model(model, revision, allow_pickle=allow_pickle)
    calib_set = None
    if calib:
        calib_set = load_calibration(calib)  # records the file's DVC md5 for the manifest
    elif data:
        recipe = CalibrationRecipe(tuple(data), n_samples=n_samples, seqlen=seqlen, seed=seed)
        calib_set = build_calibration(recipe, opened.source.path, opened.config.get("max_position_embeddings"))
    path = run_quantize(opened, cfg, out, overwrite=overwrite, progress=progress and sys.stderr.isatty(),
                        calib=calib_set, sequential=sequential)
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
    from turboquant.calibration import CalibrationRecipe, build_calibration
    from turboquant.model import read_config, resolve_model

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
) -> None:
    """Perplexity of MODEL on TEXT; with --baseline also KL divergence and top-1 agreement."""
    from turboquant.evaluate import evaluate_paths, write_json
    from turboquant.model import resolve_model

    model_dir = resolve_model(model).path
    base_dir = resolve_model(baseline).path if baseline else None
    result = evaluate_paths(model_dir, text, ctx=ctx, stride=stride, baseline=base_dir, max_tokens=max_tokens,
                            progress=sys.stderr.isatty())
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


EXIT_GATE_FAILED = 3


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
) -> None:
    """Measure ARTIFACT in its own runtime against BASELINE and apply the gates; exit 3 when a gate fails."""
    from turboquant.gates import Gates
    from turboquant.model import resolve_model
    from turboquant.validate import artifact_bits, validate as run_validate, write_validation

    overrides = parse_options(gate)
    gates = Gates.for_bits(artifact_bits(artifact) or 16, **overrides) if overrides else None
    metrics = run_validate(artifact, resolve_model(baseline).path, text, ctx=ctx, long_ctx=long_ctx,
                           max_tokens=max_tokens, tasks=tuple(tasks), task_limit=task_limit, gates=gates,
                           baseline_cache=baseline_cache, progress=sys.stderr.isatty())
    write_validation(metrics, json_out)
    verdict = metrics["verdict"]
    line = (f"{metrics['format']} in {metrics['runtime']}: ppl {metrics['ppl']:.4f} ({metrics['ppl_delta_pct']:+.2f}%), "
            f"KL {metrics['kl']:.6f}, top-1 {metrics['top1']:.4f}, {metrics['bits_per_weight']:.2f} bits/weight")
    typer.echo(line)
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
    from turboquant.report import REPORT_HTML, write_report

    md = write_report(run_dir, out)
    typer.echo(f"wrote {md} and {md.with_name(REPORT_HTML)}")


@app.command()
@handle_errors
def plan(params: Path = typer.Argument(Path("params.yaml"), help="The plan (params.yaml).")) -> None:
    """Validate the plan and print what it expands to; impossible combinations fail before any work."""
    from turboquant.model import resolve_model
    from turboquant.placement import place_method, place_validator
    from turboquant.plan import Plan

    p = Plan.from_yaml(params)
    failures = []
    for m in p.models:
        local = Path(m["id"]).expanduser()
        typer.echo(f"model {m['id']}" + (f" @ {m['revision']}" if m.get("revision") else ""))
        results = p.check_formats(resolve_model(local).path) if local.is_dir() else None
        typer.echo("  fetch → calibrate → baseline (pool cpu)")
        for q in p.quantize:
            pool = _pool_of(place_method, q.config.method)
            typer.echo(f"  quantize {q.name} (pool {pool}): {q.config.to_json()}")
            for target in q.formats:
                err = next((e for n, lbl, e in results if n == q.name and lbl == target.label), None) if results else None
                typer.echo(f"    export {target.label} → validate (pool {_pool_of(place_validator, target.format)})"
                           f" → gate → publish" + (f"  <- IMPOSSIBLE: {err}" if err else ""))
                if err:
                    failures.append((f"{m['id']} {q.name} -> {target.label}", err))
        if results is None:
            typer.echo("  (Hub model: shapes are checked once it is fetched)")
    if failures:
        where, err = failures[0]
        raise ConfigError(f"{len(failures)} planned artifact(s) cannot be made; first {where}: {err.problem}", err.fix)
    typer.echo(f"plan OK: {sum(len(q.formats) for q in p.quantize) * len(p.models)} artifacts")


def _pool_of(place: Callable[[str], Any], name: str) -> str:
    try:
        return place(name).pool
    except ConfigError as e:
        return f"NONE AVAILABLE: {e.problem}"


@app.command()
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
    from turboquant.plan import Plan

    if placement not in ("local", "pools"):
        raise ConfigError(f"--placement {placement!r} is not local or pools", "pass --placement local or pools")
    plan = Plan.from_yaml(params)  # a bad plan fails here, before Prefect starts
    if not plan.evaluation.get("text"):
        raise ConfigError(f"{params} sets no evaluation.text, which every artifact is validated on",
                          "set evaluation.text to a held-out text file (e.g. ../shared/data/heldout/all.txt)")
    for m in plan.models:  # and so does an impossible (scheme, format) on a local model's real shapes
        if Path(m["id"]).expanduser().is_dir():
            plan.require_formats(Path(m["id"]).expanduser(), m["id"])
    if placement == "pools":
        from turboquant.placement import place_method

        for q in plan.quantize:
            place_method(q.config.method)  # no pool with a worker for a method fails here too
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "turboquant")
    from flows.quantize_model import quantize_model  # the CLI is the one engine module that reaches the flows
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


@app.command()
@handle_errors
def nightly(
    watch: Path = typer.Option(Path("deployments/watch.yaml"), help="The watch list (repos, or authors + filter)."),
    params: Path = typer.Option(Path("params.yaml"), help="The plan each new release runs (its models are replaced "
                                                           "by the release)."),
    runs_root: Path = typer.Option(Path("runs/nightly"), help="Where each release's run and the ledger go."),
    placement: str = typer.Option("local", help="local or pools (see `turboquant run`)."),
) -> None:
    """Check the watch list once and run the plan on every release not yet processed (what the 02:00 UTC
    deployment does)."""
    from turboquant.plan import Plan
    from turboquant.watch import load_watch

    Plan.from_yaml(params)
    load_watch(watch)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "turboquant")
    from flows.nightly import nightly as nightly_flow

    outcomes = nightly_flow(watch=str(watch), params=str(params), runs_root=str(runs_root), placement=placement)
    for o in outcomes:
        extra = f" ({o['passed']} approved)" if "passed" in o else (f": {o['error'].splitlines()[0]}" if "error" in o else "")
        typer.echo(f"{o['status']:9s} {o['repo_id']}@{o['sha'][:12]}{extra}")
    if any(o["status"] == "failed" for o in outcomes):
        raise typer.Exit(EXIT_GATE_FAILED)


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
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Working directory for the demo's outputs."),
    model: Optional[Path] = typer.Option(None, help="Model to use (default: ../shared/models/tq-ref-llama, "
                                                   "else a tiny Llama the demo builds)."),
    text: Optional[Path] = typer.Option(None, help="Evaluation text (default: ../shared/data/heldout/all.txt)."),
    max_tokens: int = typer.Option(16384, help="Tokens of the text to evaluate on."),
) -> None:
    """Quantize the bundled example with several methods and schemes and print a results table."""
    from turboquant.demo import run_demo

    run_demo(out, model, text, max_tokens)


# ---- Hub commands (fetch, publish) ----


@app.command()
@handle_errors
def fetch(
    repo: str = typer.Argument(..., help="Hub repo id, e.g. org/model."),
    revision: Optional[str] = typer.Option(None, help="Branch, tag or commit sha to pin (default: main)."),
    allow_pickle: bool = typer.Option(False, help="Also fetch pickle (*.bin) checkpoints you trust."),
) -> None:
    """Download the files a run needs from REPO at a pinned revision; prints the local path and commit sha."""
    from turboquant.hub import fetch_snapshot

    path, sha = fetch_snapshot(repo, revision, allow_pickle=allow_pickle)
    typer.echo(f"{repo}@{sha} -> {path}")


def default_validation_path(artifact_dir: Path) -> Path:
    """Where the flow writes an artifact's validation: run/<model>/artifacts/<label> -> run/<model>/eval/<label>.json."""
    return artifact_dir.resolve().parent.parent / "eval" / f"{artifact_dir.resolve().name}.json"


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
    from turboquant.hub import load_validation, publish as run_publish, repo_name_for
    from turboquant.modelcard import artifact_bits, model_name

    data = load_validation(validation or default_validation_path(artifact_dir))
    repo_id = repo
    if "/" not in repo:
        manifest_path = artifact_dir / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        repo_id = repo_name_for(model_name(manifest), manifest.get("format", "artifact"),
                                artifact_bits(manifest, data), repo)
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

EXIT_NOT_REPRODUCED = 4

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
    from turboquant.reproduce import reproduce

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


def _slice(stage: str, key: str) -> dict[str, Any]:
    from turboquant.provenance import SLICES_DIR

    path = Path(SLICES_DIR) / stage / f"{key}.json"
    if not path.is_file():
        raise ConfigError(f"no {stage} stage '{key}' ({path} is missing)", "run `turboquant stage sync params.yaml`")
    return json.loads(path.read_text())


@stage_app.command("sync")
@handle_errors
def stage_sync(
    params: Path = typer.Argument(Path("params.yaml"), help="The plan (params.yaml)."),
    strict: bool = typer.Option(False, help="Fail when dvc/plan.yaml (the stage list) had to change (dvc.yaml)."),
) -> None:
    """Expand the plan into dvc/plan.yaml (the stage keys dvc.yaml iterates) and one slice per stage."""
    import shutil

    import yaml

    from turboquant.plan import Plan
    from turboquant.provenance import PLAN_FILE, SLICES_DIR, expand_pipeline

    plan_data, slices = expand_pipeline(Plan.from_yaml(params), str(params))
    shutil.rmtree(SLICES_DIR, ignore_errors=True)
    for rel, data in slices.items():
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        Path(rel).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    text = ("# Generated by `turboquant stage sync` from the plan: the stage keys dvc.yaml iterates. Commit it.\n"
            + yaml.safe_dump(plan_data, sort_keys=True))
    old = Path(PLAN_FILE).read_text() if Path(PLAN_FILE).is_file() else None
    if old != text:
        Path(PLAN_FILE).write_text(text)
    typer.echo(f"wrote {len(slices)} stage slices under {SLICES_DIR}" + ("" if old == text else f" and {PLAN_FILE}"))
    if strict and old is not None and old != text:
        raise ConfigError(f"the plan's stage list changed, {PLAN_FILE} was rewritten",
                          "run `dvc repro` again (and commit dvc/plan.yaml)")


@stage_app.command("calibrate")
@handle_errors
def stage_calibrate(key: str = typer.Argument(..., help="Model key (dvc/params/calibrate/KEY.json).")) -> None:
    """Build the model's calibration set (`turboquant calibrate` with the plan's recipe)."""
    s = _slice("calibrate", key)
    calibrate(model=s["model"], data=s["data"], out=Path(s["out"]), n_samples=s["n_samples"], seqlen=s["seqlen"],
              seed=s["seed"], text_field="text", chat_template=False, revision=s.get("revision"))


@stage_app.command("quantize")
@handle_errors
def stage_quantize(key: str = typer.Argument(..., help="MODEL--NAME (dvc/params/quantize/KEY.json).")) -> None:
    """Quantize with one plan entry; the calibration file is loaded with its md5, which the manifest records."""
    from turboquant.methods import make_config
    from turboquant.model import open_model
    from turboquant.provenance import load_calibration
    from turboquant.quantize_checkpoint import quantize as run_quantize

    s = _slice("quantize", key)
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
    s = _slice("export", key)
    export(qdir=Path(s["quantized"]), fmt=s["format"], out=Path(s["out"]), gguf_type=None,
           option=[f"{k}={json.dumps(v)}" for k, v in sorted(s["options"].items())], overwrite=True)


@stage_app.command("evaluate")
@handle_errors
def stage_evaluate(key: str = typer.Argument(..., help="MODEL--NAME--LABEL (dvc/params/evaluate/KEY.json).")) -> None:
    """Validate one artifact (`turboquant validate`); a failed gate is recorded in the metrics, not a stage error."""
    from turboquant.model import resolve_model

    s = _slice("evaluate", key)
    ev = s["evaluation"]
    Path(s["out"]).parent.mkdir(parents=True, exist_ok=True)
    try:
        validate(artifact=Path(s["artifact"]), baseline=str(resolve_model(s["model"], s.get("revision")).path),
                 text=Path(ev["text"]), ctx=ev.get("ctx", 512), long_ctx=None, max_tokens=ev.get("max_tokens"),
                 tasks=list(ev.get("tasks") or []), task_limit=ev.get("task_limit"),
                 gate=[f"{k}={json.dumps(v)}" for k, v in sorted(s["gates"].items())],
                 baseline_cache=Path(s["baseline_cache"]), json_out=Path(s["out"]))
    except typer.Exit as e:
        if e.exit_code != EXIT_GATE_FAILED:
            raise
        typer.echo("gate failed: recorded in the metrics; the artifact is not approved")


@stage_app.command("report")
@handle_errors
def stage_report() -> None:
    """Per model the run report (`turboquant report`), and reports/quality.json (one record per artifact) that
    `dvc plots show` draws."""
    from turboquant.report import find_validations, write_report

    s = _slice("", "report")
    records = []
    for mk in sorted(s["runs"]):
        metrics_dir = Path(s["metrics"]) / mk
        if not metrics_dir.is_dir():
            continue
        write_report(metrics_dir, Path(s["out"]) / "models" / mk)
        for v in find_validations(metrics_dir):
            records.append({"model": mk, "artifact": Path(v["artifact"]).name, "format": v.get("format"),
                            "bits_per_weight": v.get("bits_per_weight"), "ppl": v.get("ppl"), "kl": v.get("kl"),
                            "top1": v.get("top1"), "passed": v["verdict"]["passed"]})
    Path(s["out"]).mkdir(parents=True, exist_ok=True)
    (Path(s["out"]) / "quality.json").write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    typer.echo(f"wrote {s['out']}/quality.json ({len(records)} artifacts)")



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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
