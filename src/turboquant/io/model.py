"""Load HF causal-LM checkpoints lazily (safetensors only) and walk their decoder blocks one at a time.

A quantization run never holds more than one decoder block's weights: tensors are read through
``safetensors.safe_open`` per block (sharded checkpoints through their index), and the model skeleton is built on
the ``meta`` device so that blocks can be materialised and released one by one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch

from turboquant.errors import first_line, ModelLoadError
from turboquant.io.arch import ArchSpec, arch_for
from turboquant.io.files import AUX_FILE_PATTERNS, matching_files
from turboquant.io.hub import fetch_snapshot
from turboquant.io.source_encoding import DEQUANTIZED_HEADER, EncodedTensor, source_encoding, SourceEncoding

# ---------------------------------------------------------------------------------------------------------------
# Model sources
# ---------------------------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: a Hub repo at a resolved commit, or a local directory; ``encoding`` when its
    weights are stored encoded (FP8, MXFP4) and are dequantized on read."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit_sha: str | None = None
    encoding: SourceEncoding | None = None

    def describe(self) -> dict:
        """The source as manifests record it (``source_encoding`` only for an encoded source, so a plain source's
        record is unchanged)."""
        out = {
            "path": str(self.path),
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit_sha": self.commit_sha,
        }
        if self.encoding is not None:
            out["source_encoding"] = self.encoding.describe()
        return out

    def content_hash(self) -> str:
        """sha256 over the names and bytes of the weight, config and tokenizer files (for local models)."""
        h = hashlib.sha256()
        for f in sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")):
            h.update(f.name.encode() + b"\0")
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
        return h.hexdigest()


def resolve_model(model: str | Path, revision: str | None = None, allow_pickle: bool = False) -> ModelSource:
    """A local directory as is, or a Hub repo id fetched at ``revision`` and pinned to its commit sha."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ModelLoadError(
                f"--revision was given for the local directory {path}", "drop --revision or pass a Hub repo id"
            )
        return ModelSource(path=path.resolve())
    if path.exists():
        raise ModelLoadError(f"{path} is a file, not a model directory", "pass the directory holding config.json")
    local, sha = fetch_snapshot(str(model), revision, allow_pickle=allow_pickle)
    return ModelSource(path=local, repo_id=str(model), revision=revision, commit_sha=sha)


def read_config(path: Path) -> dict:
    """``config.json`` of a model directory, with clear errors when missing or malformed."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{path} has no config.json", "pass a Hugging Face model directory (with config.json)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({e})", "restore config.json from the model's repo") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{cfg_path} is not a JSON object", "restore config.json from the model's repo")
    return config


# ---------------------------------------------------------------------------------------------------------------
# Lazy tensor access
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass
class LazyCheckpoint:
    """Name → file map over a checkpoint's weight files; tensors are read only when asked for.

    With an ``encoding`` (FP8 / MXFP4 sources), ``tensors`` holds the logical tensors, dequantized names and shapes
    with dtype BF16, and ``load`` rebuilds them from their stored parts (``stored``, by ``encoded``): scales and
    activation scales are never reported.
    """

    path: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    pickled: bool = False
    encoding: SourceEncoding | None = None
    stored: dict[str, TensorInfo] = field(default_factory=dict)
    encoded: dict[str, EncodedTensor] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, allow_pickle: bool = False, encoding: SourceEncoding | None = None
             ) -> "LazyCheckpoint":
        files = sorted(p for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        if files:
            ckpt = cls(path=path, encoding=encoding)
            ckpt._index_safetensors(files)
            if encoding is not None:
                ckpt._apply_encoding(encoding)
            return ckpt
        pickles = sorted(p for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if not pickles:
            raise ModelLoadError(f"{path} holds no weight files", "pass a directory with *.safetensors weights")
        if not allow_pickle:
            raise ModelLoadError(
                f"{path} has only pickle weights ({pickles[0].name}), which can run arbitrary code when loaded",
                "convert the checkpoint to safetensors, or pass --allow-pickle if you trust its source",
            )
        if encoding is not None:
            raise ModelLoadError(f"{path} stores {encoding.quant_method} weights in pickle files, which are not read",
                                 "use the release's *.safetensors weights")
        ckpt = cls(path=path, pickled=True)
        ckpt._index_pickles(pickles)
        return ckpt

    def _index_safetensors(self, files: list[Path]) -> None:
        from safetensors import safe_open

        index_path = self.path / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelLoadError(
                    f"{index_path.name} is malformed ({e})", "restore the index file from the model's repo"
                ) from None
            needed = sorted(set(weight_map.values()))
            missing = [name for name in needed if not (self.path / name).is_file()]
            if missing:
                raise ModelLoadError(
                    f"shard {missing[0]} named in {index_path.name} is missing from {self.path}",
                    "download the missing shard (or re-fetch the whole model)",
                )
            files = [self.path / name for name in needed]
        for f in files:
            try:
                with safe_open(f, framework="pt") as handle:
                    for name in handle.keys():
                        sl = handle.get_slice(name)
                        self.tensors[name] = TensorInfo(f, tuple(sl.get_shape()), sl.get_dtype())
            except Exception as e:  # safetensors raises several exception types for corrupt files
                raise ModelLoadError(
                    f"{f.name} is not a readable safetensors file ({first_line(e)})",
                    "the file is truncated or corrupt: download it again",
                ) from None
            _check_file_size(f, self.tensors)

    def _index_pickles(self, files: list[Path]) -> None:
        for f in files:
            state = _torch_load(f)
            for name, t in state.items():
                self.tensors[name] = TensorInfo(f, tuple(t.shape), str(t.dtype))

    def _apply_encoding(self, encoding: SourceEncoding) -> None:
        """Replace the stored tensors by the logical ones, in file order (an encoded tensor where its codes are)."""
        layout = encoding.layout(self.tensors)
        by_codes = {entry.codes: entry for entry in layout.encoded.values()}
        self.stored, self.encoded, self.tensors = self.tensors, layout.encoded, {}
        for name, info in self.stored.items():
            if name in by_codes:
                entry = by_codes[name]
                self.tensors[entry.name] = TensorInfo(info.file, entry.shape, DEQUANTIZED_HEADER)
            elif name not in layout.hidden:
                self.tensors[name] = info

    def names(self) -> list[str]:
        return list(self.tensors)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read ``names``, opening each file once; encoded tensors come back dequantized (bfloat16).

        safetensors returns tensors backed by the mapped file: their pages count in RSS until the tensors are
        freed, so callers release a block's tensors before reading the next.
        """
        if self.encoding is None:
            return self._read(names, self.tensors)
        names = list(names)
        for name in names:
            if name not in self.tensors:
                raise ModelLoadError(f"tensor {name} is missing from {self.path}", "re-fetch the complete checkpoint")
        parts = [p for n in names for p in (self.encoded[n].parts if n in self.encoded else (n,))]
        raw = self._read(parts, self.stored)
        return {n: self.encoded[n].decode(raw[self.encoded[n].codes], raw[self.encoded[n].scales])
                if n in self.encoded else raw[n] for n in names}

    def _read(self, names: Iterable[str], infos: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
        """The stored tensors ``names`` (described by ``infos``), opening each file once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in infos:
                raise ModelLoadError(f"tensor {name} is missing from {self.path}", "re-fetch the complete checkpoint")
            by_file.setdefault(infos[name].file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for f, wanted in by_file.items():
            if self.pickled:
                state = _torch_load(f)
                out.update({n: state[n].clone() for n in wanted})
                continue
            from safetensors import safe_open

            try:
                with safe_open(f, framework="pt") as handle:
                    for n in wanted:
                        out[n] = handle.get_tensor(n)
            except Exception as e:
                raise ModelLoadError(
                    f"reading {f.name} failed ({first_line(e)})", "the file is corrupt: download it again"
                ) from None
        return out

    def block_names(self, arch: ArchSpec, index: int) -> list[str]:
        prefix = arch.block_prefix(index)
        return [n for n in self.tensors if n.startswith(prefix)]

    def non_block_names(self, arch: ArchSpec) -> list[str]:
        prefix = arch.blocks_prefix + "."
        return [n for n in self.tensors if not n.startswith(prefix)]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def _check_file_size(f: Path, tensors: dict[str, TensorInfo]) -> None:
    """Refuse a file whose tensors need more bytes than it holds (a truncated download)."""
    need = 0
    for info in tensors.values():
        if info.file == f:
            n = 1
            for d in info.shape:
                n *= d
            need += n * _DTYPE_BYTES.get(info.dtype, 1)
    if f.stat().st_size < need:
        raise ModelLoadError(f"{f.name} is truncated ({f.stat().st_size} bytes < {need})", "download it again")


def _torch_load(f: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ModelLoadError(f"{f.name} could not be loaded as weights ({first_line(e)})", "re-download it") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{f.name} does not hold a state dict", "pass a checkpoint saved with save_pretrained")
    return state


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN/Inf weights before any work, naming the first bad tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not torch.isfinite(torch.stack(torch.aminmax(t))).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise ModelLoadError(
                f"tensor {name} holds {bad} NaN/Inf value(s)",
                "the checkpoint is corrupt or was saved after a diverged training step: use a good revision",
            )


# ---------------------------------------------------------------------------------------------------------------
# Opened models
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class OpenedModel:
    """A resolved, validated model: its config, architecture entry and lazy weights."""

    source: ModelSource
    config: dict
    arch: ArchSpec
    checkpoint: LazyCheckpoint

    @property
    def n_layers(self) -> int:
        return int(self.arch.n_layers)

    def checkpoint_dtype(self, name: str) -> torch.dtype:
        """The dtype a tensor has in the source checkpoint (outputs keep untouched tensors in it)."""
        info = self.checkpoint.tensors.get(name)
        if info is None:
            return torch.float32
        return _SAFETENSORS_DTYPES.get(info.dtype) or getattr(torch, info.dtype.removeprefix("torch."), torch.float32)

    def block(self, index: int) -> dict[str, torch.Tensor]:
        return self.checkpoint.load(self.checkpoint.block_names(self.arch, index))

    def linear_inputs(self) -> dict[str, int]:
        """Input width of every linear a weight method quantizes (full module names)."""
        names = self.arch.linear_names()
        return {name: int(self.checkpoint.tensors[f"{name}.weight"].shape[-1]) for name in names}

    def iter_blocks(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for i in range(self.n_layers):
            yield i, self.block(i)

    def aux_files(self) -> list[Path]:
        """Config, tokenizer, generation config and license files that travel with every output."""
        return matching_files(self.source.path, AUX_FILE_PATTERNS)


def open_model(model: str | Path, revision: str | None = None, allow_pickle: bool = False) -> OpenedModel:
    """Resolve, read config, pick the architecture entry and index the weights; no weights are read yet.

    Custom modelling code shipped in a repo (``auto_map``) is never imported: only architectures transformers
    implements natively are accepted, so ``trust_remote_code`` is never needed.
    """
    source = resolve_model(model, revision, allow_pickle=allow_pickle)
    config = read_config(source.path)
    encoding = source_encoding(config)
    n_layers = config.get("num_hidden_layers", 1)
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ModelLoadError(f"config.json has num_hidden_layers={n_layers!r}", "restore the model's config.json")
    arch = arch_for(config, source.path)
    checkpoint = LazyCheckpoint.open(source.path, allow_pickle=allow_pickle, encoding=encoding)
    if encoding is not None:
        source = replace(source, encoding=encoding)
    opened = OpenedModel(source, config, arch, checkpoint)
    _check_blocks_present(opened)
    return opened


def open_source_checkpoint(path: Path) -> LazyCheckpoint:
    """A source model's weights as the pipeline reads them: dequantized when its config.json says they are
    encoded (for readers that compare against, or count, a model's source weights)."""
    encoding = source_encoding(read_config(path)) if (path / "config.json").is_file() else None
    return LazyCheckpoint.open(path, encoding=encoding)


def _check_blocks_present(model: OpenedModel) -> None:
    pattern = re.compile(re.escape(model.arch.blocks_prefix) + r"\.(\d+)\.")
    seen = {int(m.group(1)) for n in model.checkpoint.names() if (m := pattern.match(n))}
    missing = sorted(set(range(model.n_layers)) - seen)
    if missing:
        raise ModelLoadError(
            f"the checkpoint has no weights for decoder block(s) {missing[:5]} of {model.n_layers}",
            "re-fetch the complete checkpoint, or fix num_hidden_layers in config.json",
        )
    for i in range(model.n_layers):
        names = set(model.checkpoint.block_names(model.arch, i))
        for linear in model.arch.linears_at(i):
            key = f"{model.arch.block_prefix(i)}{linear}.weight"
            if key not in names:
                raise ModelLoadError(
                    f"{key} is missing: the weights do not match the '{model.arch.name}' layout",
                    "check that config.json's model_type matches the weights",
                )
            dtype = model.checkpoint.tensors[key].dtype
            if dtype not in _FLOAT_WEIGHT_DTYPES:
                raise ModelLoadError(
                    f"{key} is stored as {dtype}, not as a floating-point weight",
                    "the file's header is wrong or the checkpoint is already quantized: use the original "
                    "float16/bfloat16/float32 checkpoint",
                )


#: What a linear weight may be stored as (safetensors names, and torch names for allowed pickles).
_FLOAT_WEIGHT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "torch.float64", "torch.float32", "torch.float16",
                                  "torch.bfloat16"})
