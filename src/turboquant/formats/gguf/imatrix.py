"""Importance matrices (llama.cpp's ``imatrix``): per linear weight, how much each input channel matters.

For a linear ``y = W x`` quantized to minimise ``E[(W x - Q x)²]``, the error of row ``w`` is
``(w - q)ᵀ H (w - q)`` with ``H = E[x xᵀ]``; llama.cpp's K-quant and legacy-quant solvers keep only the diagonal,
``diag(H)_j = E[x_j²]``, and weight each element's rounding error by it (llama.cpp PR #4861, "importance matrix").
We compute exactly what its ``llama-imatrix`` tool accumulates — per input channel the sum of ``x_j²`` over every
calibration token (``in_sum2``) and the number of tokens (``counts``) — but block-sequentially with
``quantize.runner.BlockRunner`` on the model being quantized, so a model never has to be loaded whole. Only the diagonal
is accumulated (``n·d`` work per linear, not the ``n·d²`` of the full ``H`` that ``BlockRunner.capture`` builds for
GPTQ); ``in_sum2 / counts`` equals ``diag(H)`` of that capture on the same inputs.

Files: the GGUF imatrix (``general.type = imatrix``; tensors ``<weight>.in_sum2`` F32 ``[in]`` and
``<weight>.counts`` F32 ``[1]``; ``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``), which
llama-imatrix writes by default and llama-quantize reads, and the legacy ``.dat`` binary (read only). Names are
whatever the caller keys them by: ``compute_imatrix`` returns Hugging Face module names; the GGUF exporter renames
them to GGUF tensor names (``blk.0.attn_q.weight``) before writing. llama.cpp divides ``in_sum2`` by ``counts``
before use, so only the per-channel mean reaches the quantizer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from turboquant.errors import DataError
from turboquant.io.arch import arch_for
from turboquant.io.checkpoint import METADATA_FILE, QuantizedCheckpoint
from turboquant.io.model import ModelSource, open_model, OpenedModel
from turboquant.quantize.runner import BlockRunner, input_of
from turboquant.io.calibration import CalibrationSet


IMATRIX_TYPE = "imatrix"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"


@dataclass
class ImportanceMatrix:
    """Per weight name: ``sums[name][j]`` = sum of ``x_j²`` over ``counts[name]`` calibration tokens."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def mean(self, name: str) -> np.ndarray:
        """``E[x_j²]`` per input channel: what llama.cpp's quantizer receives (``in_sum2 / counts``)."""
        n = self.counts[name]
        return (self.sums[name] / n).astype(np.float32) if n > 0 else np.ones_like(self.sums[name])

    def renamed(self, rename: Callable[[str], str]) -> "ImportanceMatrix":
        return ImportanceMatrix({rename(k): v for k, v in self.sums.items()},
                                {rename(k): v for k, v in self.counts.items()},
                                list(self.datasets), self.chunk_count, self.chunk_size)

    def __len__(self) -> int:
        return len(self.sums)


# ---------------------------------------------------------------------------------------------------------------
# Computing
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_imatrix(model: "str | Path | OpenedModel", calib: CalibrationSet, *, batch_size: int = 8,
                    dataset_name: str | None = None, progress: bool = False) -> ImportanceMatrix:
    """Sum of ``x²`` per input channel of every block linear over ``calib``, keyed by module name.

    ``model`` is a Hugging Face model directory, an ``OpenedModel``, or a TurboQuant canonical checkpoint (whose
    quantized weights are dequantized block by block: the imatrix is then that of the model being re-quantized).
    Blocks run one at a time on the float activations of the blocks before them, as llama-imatrix's full forward
    passes do; the LM head is skipped, as llama-imatrix does unless told ``--process-output``.
    """
    from tqdm.auto import tqdm

    opened = open_for_imatrix(model)
    runner = BlockRunner.start(opened, calib.input_ids, batch_size=batch_size)
    out = ImportanceMatrix(datasets=[dataset_name or _dataset_name(calib)],
                           chunk_count=int(calib.input_ids.shape[0]), chunk_size=int(calib.input_ids.shape[1]))
    for i in tqdm(range(opened.n_layers), desc="imatrix", unit="block", disable=not progress, leave=False):
        block = runner.load_block(i)
        prefix = opened.arch.block_prefix(i)
        linears = opened.arch.linears_at(i)
        sums = {name: torch.zeros(block.get_submodule(name).in_features, dtype=torch.float64) for name in linears}
        counts = dict.fromkeys(linears, 0)
        outputs = runner.forward(block, hooks=[(block.get_submodule(name), _accumulate(sums, counts, name))
                                               for name in linears])
        for name in linears:
            out.sums[prefix + name] = sums[name].to(torch.float32).numpy()
            out.counts[prefix + name] = float(counts[name])
        runner.release_block(i)
        runner.advance(outputs)
    return out


def _accumulate(sums: dict[str, torch.Tensor], counts: dict[str, int], name: str):
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = input_of(args, kwargs)
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        sums[name] += x.square().sum(0)
        counts[name] += x.shape[0]

    return hook


def _dataset_name(calib: CalibrationSet) -> str:
    sources = ",".join(Path(s).name for s in calib.recipe.sources)
    return f"{sources} ({calib.recipe.n_samples}x{calib.recipe.seqlen} tokens, seed {calib.recipe.seed})"


def open_for_imatrix(model: "str | Path | OpenedModel") -> OpenedModel:
    """An ``OpenedModel`` whose blocks hold float weights (canonical checkpoints are dequantized per block)."""
    if isinstance(model, OpenedModel):
        return model
    if (Path(model) / METADATA_FILE).is_file():
        return DequantizedModel.open(Path(model))
    return open_model(model)


@dataclass
class DequantizedModel(OpenedModel):
    """A canonical checkpoint seen as a float model: ``block(i)`` returns its weights dequantized."""

    ckpt: QuantizedCheckpoint | None = None

    @classmethod
    def open(cls, path: Path) -> "DequantizedModel":
        ckpt = QuantizedCheckpoint.open(path)
        config = ckpt.config
        return cls(ModelSource(path=path.resolve()), config, arch_for(config, path), ckpt.tensors, ckpt)

    def block(self, index: int) -> dict[str, torch.Tensor]:
        prefix = self.arch.block_prefix(index)
        state = self.checkpoint.load([n for n in self.ckpt.plain_names() if n.startswith(prefix)])
        for module in self.ckpt.modules:
            if module.startswith(prefix):
                state[f"{module}.weight"] = self.ckpt.quantized_tensor(module).dequantize(torch.float32)
        return state


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def write_imatrix(path: str | Path, imatrix: ImportanceMatrix) -> Path:
    """Write the GGUF imatrix llama-imatrix writes (and llama-quantize ``--imatrix`` reads)."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch="")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix's files name no architecture
    try:
        writer.add_type(IMATRIX_TYPE)
        writer.add_array(KEY_DATASETS, list(imatrix.datasets))
        writer.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        writer.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        for name in sorted(imatrix.sums):
            writer.add_tensor(name + SUMS_SUFFIX, np.ascontiguousarray(imatrix.sums[name], dtype=np.float32)[None, :])
            writer.add_tensor(name + COUNTS_SUFFIX, np.array([[imatrix.counts[name]]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def read_imatrix(path: str | Path) -> ImportanceMatrix:
    """Read a GGUF imatrix or a legacy ``.dat`` one (sums are then ``mean * ncall``, counts ``ncall``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"imatrix file {path} does not exist", "pass a file written by llama-imatrix or TurboQuant")
    with path.open("rb") as fh:
        magic = fh.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf(path: Path) -> ImportanceMatrix:
    import gguf

    reader = gguf.GGUFReader(str(path))
    kind = _field(reader, "general.type")
    if kind != IMATRIX_TYPE:
        raise DataError(f"{path} is a GGUF file of type {kind!r}, not an imatrix", "pass an imatrix file")
    out = ImportanceMatrix(datasets=list(_field(reader, KEY_DATASETS) or []),
                           chunk_count=int(_field(reader, KEY_CHUNK_COUNT) or 0),
                           chunk_size=int(_field(reader, KEY_CHUNK_SIZE) or 0))
    tensors = {t.name: t for t in reader.tensors}
    for tname, t in tensors.items():
        if not tname.endswith(SUMS_SUFFIX):
            continue
        name = tname.removesuffix(SUMS_SUFFIX)
        counts = tensors.get(name + COUNTS_SUFFIX)
        if counts is None:
            raise DataError(f"{path}: {tname} has no {name + COUNTS_SUFFIX}", "re-create the imatrix")
        c = np.asarray(counts.data, dtype=np.float32).reshape(-1)
        if c.size != 1:
            raise DataError(f"{path}: {name} holds {c.size} matrices (MoE experts)",
                            "only dense models are supported by this reader")
        out.sums[name] = np.asarray(t.data, dtype=np.float32).reshape(-1).copy()
        out.counts[name] = float(c[0])
    return out


def _field(reader, key: str):
    f = reader.get_field(key)
    if f is None:
        return None
    return f.contents()


def _read_legacy(path: Path) -> ImportanceMatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise DataError(f"{path} is truncated or not an imatrix file", "pass a file written by llama-imatrix")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    out = ImportanceMatrix()
    (n_entries,) = take("<i")
    if not 0 < n_entries < 1 << 20:
        raise DataError(f"{path} is not an imatrix file (it claims {n_entries} entries)", "pass an imatrix file")
    for _ in range(n_entries):
        (length,) = take("<i")
        name = bytes(take(f"<{length}s")[0]).decode("utf-8")
        ncall, nval = take("<ii")
        values = np.array(take(f"<{nval}f"), dtype=np.float32)
        out.sums[name] = values
        out.counts[name] = float(ncall)
    if pos + 4 <= len(data):  # optional trailer: the last chunk count and the dataset name
        (out.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            out.datasets = [bytes(take(f"<{length}s")[0]).decode("utf-8", "replace")]
    return out


__all__ = ["ImportanceMatrix", "compute_imatrix", "read_imatrix", "write_imatrix"]
