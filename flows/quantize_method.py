"""One method × scheme on one model: the unit of work a pool's worker runs (deployed per pool in
``deployments/prefect.yaml``; the parent ``quantize_model`` starts it with ``run_deployment``).

Without ``storage`` the worker writes the checkpoint to ``out``, a path the parent can read (one machine, or a
shared file system). With ``storage`` (a URL, ``io.storage``) nothing is assumed shared: the worker fetches the
model itself (pinned ``revision``), downloads the calibration file from its URL, quantizes into its own scratch
directory (``$TURBOQUANT_SCRATCH``, else the temp directory) and uploads the checkpoint to ``storage`` under the
key ``out``; the parent downloads it from there, checked file by file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prefect import flow

from tasks.model import fetch_model
from tasks.quantization import quantize_checkpoint
from tasks.storage import fetch_stored_file, share_dir

SCRATCH_ENV = "TURBOQUANT_SCRATCH"


@flow(name="quantize_method", log_prints=True)
def quantize_method(model_dir: str, config_json: str, calib_path: str | None, out: str,
                    device: str | None = None, storage: str | None = None, revision: str | None = None) -> str:
    """The checkpoint's path (``out``), or with ``storage`` its URL there."""
    if storage is None:
        return quantize_checkpoint(model_dir, config_json, calib_path, out, device=device)
    scratch = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()) / "turboquant-scratch" / out
    model = fetch_model(model_dir, revision)["path"]
    calib = fetch_stored_file(calib_path, str(scratch / "calibration")) if calib_path else None
    local = quantize_checkpoint(model, config_json, calib, str(scratch / "checkpoint"), device=device)
    return share_dir(local, storage, out)
