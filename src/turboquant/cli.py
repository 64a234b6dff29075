"""`turboquant` command line: the commands a person and dvc.yaml run.

Every failure a user can cause prints one line naming the problem and the fix and exits non-zero; outputs are
written under a temporary name and renamed at the end, so a failed command leaves nothing behind.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from turboquant.errors import ConfigError, TurboQuantError

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
    from turboquant.calibration import CalibrationRecipe, CalibrationSet, build_calibration
    from turboquant.model import open_model
    from turboquant.quantize_checkpoint import quantize as run_quantize

    cfg = build_config(method, bits, group_size, sym, option)
    if calib and data:
        raise ConfigError("both --calib and --data were given", "pass one of them")
    opened = open_model(model, revision, allow_pickle=allow_pickle)
    calib_set = None
    if calib:
        calib_set = CalibrationSet.load(calib)
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
    from turboquant.plan import Plan

    p = Plan.from_yaml(params)
    failures = []
    for m in p.models:
        local = Path(m["id"]).expanduser()
        typer.echo(f"model {m['id']}" + (f" @ {m['revision']}" if m.get("revision") else ""))
        results = p.check_formats(resolve_model(local).path) if local.is_dir() else None
        for q in p.quantize:
            typer.echo(f"  quantize {q.name}: {q.config.to_json()}")
            for target in q.formats:
                err = next((e for n, lbl, e in results if n == q.name and lbl == target.label), None) if results else None
                typer.echo(f"    export {target.label}" + (f"  <- IMPOSSIBLE: {err}" if err else ""))
                if err:
                    failures.append((f"{m['id']} {q.name} -> {target.label}", err))
        if results is None:
            typer.echo("  (Hub model: shapes are checked once it is fetched)")
    if failures:
        where, err = failures[0]
        raise ConfigError(f"{len(failures)} planned artifact(s) cannot be made; first {where}: {err.problem}", err.fix)
    typer.echo(f"plan OK: {sum(len(q.formats) for q in p.quantize) * len(p.models)} artifacts")


@app.command()
@handle_errors
def run(
    params: Path = typer.Argument(Path("params.yaml"), help="The plan (params.yaml)."),
    run_dir: Path = typer.Option(Path("runs/latest"), help="Where the run's outputs go."),
) -> None:
    """Run the whole plan as the Prefect flow quantize_model (embedded: no server needed)."""
    from turboquant.plan import Plan

    Plan.from_yaml(params)  # a bad plan fails here, before Prefect starts
    from flows.quantize_model import quantize_model  # the CLI is the one engine module that reaches the flows

    verdicts = quantize_model(params=str(params), run_dir=str(run_dir))
    passed = sum(v["passed"] for v in verdicts)
    typer.echo(f"{passed} of {len(verdicts)} artifacts passed their gates; report: {run_dir}")
    failed = [v for v in verdicts if not v["passed"]]
    if failed:
        typer.echo(f"turboquant: {len(failed)} artifact(s) not approved; first: {Path(failed[0]['artifact']).name}: "
                   f"{'; '.join(failed[0]['reasons'])}", err=True)
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


# ---- provenance commands (reproduce) ----


# ---- dispatcher commands (recommend) ----


def main() -> None:
    app()


if __name__ == "__main__":
    main()
