"""One method × scheme on one model: the unit of work a pool's worker runs (deployed per pool in
``deployments/prefect.yaml``; the parent ``quantize_model`` starts it with ``run_deployment``)."""

from __future__ import annotations

from prefect import flow

from tasks.quantization import quantize_checkpoint


@flow(name="quantize_method", log_prints=True)
def quantize_method(model_dir: str, config_json: str, calib_path: str | None, out: str,
                    device: str | None = None) -> str:
    return quantize_checkpoint(model_dir, config_json, calib_path, out, device=device)
