"""Families x methods x formats: every dense decoder family the tests cover, measured end to end.

Run ``.venv/bin/python benchmarks/families.py``. For each family a tiny random model (hidden 64, 2 blocks; more
for families whose mlx-lm class needs a full-attention layer: ``FAMILY_LAYERS``) is quantized with rtn, gptq and
awq (W4 g32, 4 x 32 random calibration tokens), each canonical checkpoint is scored in torch, and the gptq
checkpoint is exported to every format and scored in that format's runtime (KL vs the float model on the first 512 tokens of
``data/heldout/all.txt``, context 64). A format or method that refuses the family records its one-line reason.
Prints a Markdown table and writes ``benchmarks/results/families.{json,md}``: the README's families table.

A runtime KL equal to torch's (ratio 1.00) is what a correct tensor mapping gives; the tests assert within 1.25x
(the issue asks 2x).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))

from conftest import HELDOUT, REF_MODEL  # noqa: E402
from turboquant.errors import TurboQuantError  # noqa: E402
from turboquant.formats.base import export, get_format, resolve_options  # noqa: E402
from turboquant.io.checkpoint import QuantizedCheckpoint  # noqa: E402
from turboquant.io.calibration import CalibrationRecipe, CalibrationSet  # noqa: E402
from turboquant.io.model import open_model  # noqa: E402
from turboquant.io.tiny import save_tiny_model  # noqa: E402
from turboquant.methods import make_config  # noqa: E402
from turboquant.quality.validate import validate  # noqa: E402
from turboquant.quantize.pipeline import quantize  # noqa: E402
from test_families import FAMILIES, FAMILY_LAYERS, FORMATS  # noqa: E402

METHODS = ("rtn", "gptq", "awq")


def measure(family: str, work: Path) -> dict:
    layers = FAMILY_LAYERS.get(family, 2)
    path = save_tiny_model(work / family / "tiny", model_type=family, hidden=64, intermediate=128, layers=layers,
                           vocab=4096, tokenizer_from=REF_MODEL, tie_embeddings=None)
    opened = open_model(path)
    ids = torch.randint(3, 4000, (4, 32), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet(ids, CalibrationRecipe(("synthetic",), n_samples=4, seqlen=32))
    row: dict = {"family": family, "table_entry": not opened.arch.discovered, "linears": list(opened.arch.linears),
                 "methods": {}, "formats": {}}
    for method in METHODS:
        try:
            qdir = quantize(opened, make_config(method, bits=4, group_size=32), work / f"{family}-{method}",
                            progress=False, calib=calib)
        except TurboQuantError as e:
            row["methods"][method] = {"refused": str(e)}
            continue
        meta = QuantizedCheckpoint.open(qdir).meta
        kl = validate(qdir, path, HELDOUT, ctx=64, max_tokens=512)["kl"]
        row["methods"][method] = {"kl": kl, "fallbacks": meta.get("fallbacks") or []}
    qdir = work / f"{family}-gptq"
    ckpt = QuantizedCheckpoint.open(qdir)
    torch_kl = row["methods"]["gptq"]["kl"]
    for fmt in FORMATS:
        spec = get_format(fmt)
        try:
            spec.check(ckpt, resolve_options(spec, {}))
        except TurboQuantError as e:
            row["formats"][fmt] = {"refused": str(e)}
            continue
        t = time.perf_counter()
        result = validate(export(qdir, fmt, work / f"{family}-as-{fmt}"), path, HELDOUT, ctx=64, max_tokens=512)
        row["formats"][fmt] = {"runtime": result["runtime"], "kl": result["kl"], "ratio": result["kl"] / torch_kl,
                               "seconds": time.perf_counter() - t}
    return row


def table(rows: list[dict]) -> str:
    head = "| family | table | " + " | ".join(f"{m} KL" for m in METHODS) + " | " + \
        " | ".join(f"{f} (KL ratio)" for f in FORMATS) + " |"
    lines = [head, "|" + "---|" * (2 + len(METHODS) + len(FORMATS))]
    for r in rows:
        cells = [r["family"], "yes" if r["table_entry"] else "discovered"]
        for m in METHODS:
            v = r["methods"][m]
            cells.append("refused" if "refused" in v else f"{v['kl']:.3g}" + (" *" if v["fallbacks"] else ""))
        for f in FORMATS:
            v = r["formats"][f]
            cells.append("refused" if "refused" in v else f"{v['ratio']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    reasons = [f"{r['family']} / {k}: {v['refused']}" for r in rows for k, v in {**r["methods"], **r["formats"]}.items()
               if "refused" in v]
    notes = ["", "`*`: AWQ left at least one group unscaled (its input is no single foldable norm or linear; "
             "recorded in the manifest and the card). Refusals:", ""] + [f"- {x}" for x in reasons]
    return "\n".join(lines + notes) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    out = ROOT / "results"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            rows.append(measure(family, Path(tmp)))
            print(family, "done", flush=True)
    md = table(rows)
    print(md)
    (out / "families.json").write_text(json.dumps({"families": rows, "torch": torch.__version__}, indent=2) + "\n")
    (out / "families.md").write_text(md)


if __name__ == "__main__":
    main()
