"""Triage before download: whether a Hub release can be processed, per (quantization, format), from its config,
tokenizer files and file list alone.

The model is discovered from transformers' modelling class on meta (``io.arch``), its linears' shapes come from
that skeleton, and every planned combination runs through the same checks as for a downloaded model
(``Plan.check_formats``). An unsupported release costs no weight download.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from turboquant.errors import ModelLoadError, TurboQuantError
from turboquant.io.arch import arch_for
from turboquant.io.hub import fetch_config
from turboquant.io.model import LazyCheckpoint, ModelSource, OpenedModel, read_config, TensorInfo
from turboquant.io.skeleton import build_skeleton
from turboquant.io.source_encoding import source_encoding
from turboquant.pipeline.plan import Plan

#: config.json's dtype names as safetensors headers spell them (what the planned checkpoint records).
_HEADER_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class Triage:
    """One release's verdict: ``unsupported`` when nothing can be made of it, else per artifact
    (``(quantization, format label)``) the error that says why it cannot be made, or None."""

    repo_id: str
    sha: str
    unsupported: TurboQuantError | None = None
    artifacts: dict[tuple[str, str], TurboQuantError | None] = field(default_factory=dict)

    @property
    def processable(self) -> bool:
        return self.unsupported is None and all(reason is None for reason in self.artifacts.values())

    def reasons(self) -> list[str]:
        """``unsupported: <reason>`` lines, one per artifact that cannot be made (or one for the model)."""
        if self.unsupported is not None:
            return [f"unsupported: {self.unsupported}"]
        return [f"{q} -> {label}: unsupported: {err}" for (q, label), err in self.artifacts.items() if err is not None]


def shapes_only(config_dir: Path, files: list[str], repo_id: str | None = None, sha: str | None = None
                ) -> OpenedModel:
    """An ``OpenedModel`` whose tensors are only names and shapes, from the modelling class on meta."""
    config = read_config(config_dir)
    source_encoding(config)
    if not any(f.endswith(".safetensors") for f in files):
        pickles = any(f.endswith((".bin", ".pt", ".pth")) for f in files)
        raise ModelLoadError(f"'{repo_id}' has {'only pickle' if pickles else 'no'} weight files",
                             "watch a release with *.safetensors weights")
    arch = arch_for(config, config_dir)
    dtype = _HEADER_DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), "F32")
    skeleton = build_skeleton(config_dir)
    tensors = {name: TensorInfo(config_dir / "model.safetensors", tuple(p.shape), dtype)
               for name, p in skeleton.state_dict().items()}
    source = ModelSource(path=config_dir, repo_id=repo_id, commit_sha=sha)
    return OpenedModel(source, config, arch, LazyCheckpoint(path=config_dir, tensors=tensors))


def triage(plan: Plan, repo_id: str, revision: str | None = None, *, token: str | None = None) -> Triage:
    """Fetch only the release's config (``io.hub.fetch_config``) and check every planned artifact against it."""
    config_dir, sha, files = fetch_config(repo_id, revision, token=token)
    try:
        opened = shapes_only(config_dir, files, repo_id, sha)
    except TurboQuantError as e:
        return Triage(repo_id, sha, unsupported=e)
    return Triage(repo_id, sha, artifacts={(q, label): e for q, label, e in plan.check_formats(opened)})
