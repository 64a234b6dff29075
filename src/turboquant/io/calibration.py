"""Calibration sets: token windows drawn reproducibly from text, saved with the recipe that made them.

Sources are read with ``datasets`` (local .txt / .json / .jsonl / .parquet files, or a Hub dataset id when online),
joined, tokenized once, and ``n_samples`` windows of ``seqlen`` tokens are cut at seeded random offsets — GPTQ's and
AutoAWQ's recipe. The saved file (safetensors: ``input_ids`` + the recipe as metadata) is byte-identical for the same
recipe, source bytes and tokenizer, so DVC can track it and a rebuild can be checked.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from turboquant.errors import check_keys, ConfigError, DataError
from turboquant.fsutil import sha256_file
from turboquant.io.files import TOKENIZER_FILES
from turboquant.io.loaders import load_tokenizer
from turboquant.io.provenance import md5_file, relative_to_cwd

CALIB_FORMAT = "turboquant-calibration/1"


@dataclass(frozen=True)
class CalibrationRecipe:
    """What a calibration set is made of; the same recipe on the same bytes gives the same tokens."""

    sources: tuple[str, ...]
    n_samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    text_field: str = "text"
    chat_template: bool = False

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("no calibration data was given", "pass --data FILE (text, JSON lines or Parquet)")
        for name, value, low in (("n_samples", self.n_samples, 1), ("seqlen", self.seqlen, 2), ("seed", self.seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}={value!r} is invalid", f"use an integer >= {low}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = list(self.sources)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CalibrationRecipe":
        known = {f.name for f in fields(cls)}
        check_keys(data, known, "unknown calibration key(s) {unknown}")
        return cls(**{**data, "sources": tuple(data.get("sources", ()))})


@dataclass
class CalibrationSet:
    """Token windows ``[n_samples, seqlen]`` plus the provenance needed to rebuild them."""

    input_ids: torch.Tensor
    recipe: CalibrationRecipe
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One metadata key: safetensors writes its metadata map in hash order, so several keys would make
        # the bytes of two identical saves differ.
        meta = {"turboquant": json.dumps({"format": CALIB_FORMAT, "recipe": self.recipe.to_dict(),
                                          "provenance": self.provenance}, sort_keys=True)}
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_file({"input_ids": self.input_ids.to(torch.int32).contiguous()}, str(tmp), metadata=meta)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationSet":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"calibration file {path} does not exist", "build one with `turboquant calibrate`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                ids = f.get_tensor("input_ids").long()
        except Exception as e:  # safetensors raises several exception types for corrupt files
            raise DataError(f"{path} is not a calibration file ({str(e).splitlines()[0]})",
                            "rebuild it with `turboquant calibrate`") from None
        info = json.loads(meta.get("turboquant", "{}"))
        if info.get("format") != CALIB_FORMAT:
            raise DataError(f"{path} is not a TurboQuant calibration file", "rebuild it with `turboquant calibrate`")
        return cls(ids, CalibrationRecipe.from_dict(info["recipe"]), info.get("provenance", {}))


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    """sha256 over the tokenizer files of a model directory (identifies the vocabulary exactly)."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = Path(tokenizer_dir) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def read_documents(sources: tuple[str, ...], text_field: str = "text") -> list[str]:
    """Documents from local files (one per .txt file, one per JSON/Parquet record) or Hub dataset ids."""
    import datasets

    quiet = datasets.is_progress_bar_enabled() and not sys.stderr.isatty()  # no bars in logs / under a job
    if quiet:
        datasets.disable_progress_bars()
    try:
        return _read_documents(datasets, sources, text_field)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _read_documents(datasets: Any, sources: tuple[str, ...], text_field: str) -> list[str]:
    docs: list[str] = []
    for src in sources:
        path = Path(src)
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix in (".json", ".jsonl"):
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
            elif suffix == ".parquet":
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            else:
                ds = datasets.load_dataset("text", data_files=str(path), split="train", sample_by="document")
        elif path.exists() or "/" not in src or src.startswith((".", "/")):
            raise DataError(f"calibration source {src} does not exist", "pass existing files or a Hub dataset id")
        else:
            try:
                ds = datasets.load_dataset(src, split="train")
            except Exception as e:
                raise DataError(f"cannot load dataset '{src}' ({str(e).splitlines()[0]})",
                                "check the id and network access, or pass local files") from None
        text_col = "text" if path.is_file() and path.suffix.lower() not in (".json", ".jsonl", ".parquet") else text_field
        if text_col not in ds.column_names:
            raise DataError(f"{src} has no '{text_col}' column (columns: {ds.column_names})",
                            "pass --text-field with the column holding the text")
        docs.extend(t for t in ds[text_col] if isinstance(t, str) and t.strip())
    if not docs:
        raise DataError("the calibration data holds no text", "pass files with non-empty text")
    return docs


def source_fingerprints(sources: tuple[str, ...]) -> dict[str, str]:
    """sha256 of each local source file (Hub datasets are identified by id only)."""
    return {s: sha256_file(Path(s)) if Path(s).is_file() else "hub-dataset" for s in sources}


def build_calibration(recipe: CalibrationRecipe, tokenizer_dir: str | Path, max_context: int | None = None
                      ) -> CalibrationSet:
    """Tokenize the recipe's sources with the model's tokenizer and cut seeded random windows."""

    seqlen = min(recipe.seqlen, max_context) if max_context else recipe.seqlen
    if seqlen != recipe.seqlen:
        recipe = CalibrationRecipe(**{**recipe.to_dict(), "sources": recipe.sources, "seqlen": seqlen})
    tokenizer = load_tokenizer(tokenizer_dir)
    check_tokenizer_fits(tokenizer, tokenizer_dir)
    docs = read_documents(recipe.sources, recipe.text_field)
    if recipe.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template", "drop --chat-template for base models")
        ids_list = [tokenizer.apply_chat_template([{"role": "user", "content": d}], tokenize=True) for d in docs]
        ids = torch.tensor([t for seq in ids_list for t in _as_ids(seq)], dtype=torch.long)
    else:
        ids = torch.tensor(tokenizer("\n\n".join(docs))["input_ids"], dtype=torch.long)
    if ids.numel() < seqlen + 1:
        raise DataError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}",
                        "add more text or lower --seqlen")
    gen = torch.Generator().manual_seed(recipe.seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (recipe.n_samples,), generator=gen)
    windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    provenance = {
        "sources_sha256": source_fingerprints(recipe.sources),
        "sources_abs": {s: str(Path(s).resolve()) for s in recipe.sources if Path(s).is_file()},
        "tokenizer_sha256": tokenizer_hash(tokenizer_dir),
        "n_text_tokens": ids.numel(),
    }
    return CalibrationSet(windows, recipe, provenance)


def _as_ids(seq: Any) -> list[int]:
    if isinstance(seq, dict) or hasattr(seq, "keys"):
        seq = seq["input_ids"]
    return list(seq)


LOADER_SOURCE = "<calib_loader>"


def calibration_from_batches(batches: Iterable[Any]) -> CalibrationSet:
    """A ``CalibrationSet`` from a ``calib_loader``: batches of token ids ``[b, s]`` / ``[s]``, mappings with
    ``input_ids`` (an ``attention_mask`` must mark every token), or tuples whose first item is the ids.

    Block-wise solvers calibrate on whole windows of one length, so padded or ragged batches are refused rather
    than trimmed: trimming would change the data the user gave.
    """
    rows: list[torch.Tensor] = []
    for i, batch in enumerate(batches):
        mask = None
        if hasattr(batch, "keys"):
            if "input_ids" not in batch:
                raise DataError(f"calib_loader batch {i} has no input_ids (keys: {', '.join(map(str, batch.keys()))})",
                                "yield token ids, or mappings with an input_ids entry")
            ids, mask = batch["input_ids"], batch.get("attention_mask")
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            ids = batch[0]
        else:
            ids = batch
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dim() not in (1, 2) or ids.shape[-1] < 2:
            raise DataError(f"calib_loader batch {i} is not token ids (shape {tuple(ids.shape)}, {ids.dtype})",
                            "yield integer token ids [batch, seqlen] with seqlen >= 2")
        ids = ids.reshape(-1, ids.shape[-1])
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise DataError(f"calib_loader batch {i} is padded (its attention_mask has zeros)",
                            "yield unpadded windows of one length (pack the text), or pass calib_dataset")
        if rows and ids.shape[1] != rows[0].shape[1]:
            raise DataError(f"calib_loader batch {i} has windows of {ids.shape[1]} tokens, batch 0 of "
                            f"{rows[0].shape[1]}", "yield windows of one length, or pass calib_dataset")
        rows.append(ids.long())
    if not rows:
        raise DataError("calib_loader yielded no batches", "pass an iterable of token-id batches")
    ids = torch.cat(rows)
    recipe = CalibrationRecipe((LOADER_SOURCE,), n_samples=ids.shape[0], seqlen=ids.shape[1])
    digest = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
    return CalibrationSet(ids, recipe, {"input_ids_sha256": digest})


def check_vocab(calib: CalibrationSet, vocab_size: int) -> None:
    """Refuse a calibration set made with another tokenizer (token ids beyond the model's vocabulary)."""
    top = int(calib.input_ids.max())
    if top >= vocab_size:
        raise DataError(f"calibration token id {top} is outside the model's vocabulary ({vocab_size})",
                        "rebuild the calibration set with this model's tokenizer")


def check_tokenizer_fits(tokenizer: Any, model_dir: str | Path) -> None:
    """Refuse a tokenizer with more tokens than the model's embedding has rows (another model's tokenizer): its
    ids would index past the vocabulary. A model whose vocab_size is padded beyond the tokenizer is fine."""
    cfg = Path(model_dir) / "config.json"
    try:
        vocab = json.loads(cfg.read_text()).get("vocab_size") if cfg.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        vocab = None
    if isinstance(vocab, int) and vocab > 0 and len(tokenizer) > vocab:
        raise DataError(f"the tokenizer in {model_dir} has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{vocab}", "use the tokenizer the model was trained with (copy its tokenizer files next to "
                        "config.json)")


def load_calibration(path: str | Path) -> "CalibrationSet":
    """``CalibrationSet.load`` plus the file's identity (path, md5) in its provenance, which ``quantize`` copies
    into the checkpoint and the manifest records as the calibration data's DVC md5."""

    calib = CalibrationSet.load(path)
    calib.provenance = {**calib.provenance, "file": relative_to_cwd(path), "file_abs": str(Path(path).resolve()),
                        "file_md5": md5_file(path)}
    return calib


def calibration_for(tokenizer_dir: str | Path, max_context: int | None, *, calib: str | Path | None = None,
                    data: Iterable[str] = (), n_samples: int = 128, seqlen: int = 2048, seed: int = 0
                    ) -> "CalibrationSet | None":
    """The calibration set a command asked for: a saved file (``calib``, loaded with its md5 for the manifest), or
    one built now from ``data`` with the given recipe, or None when neither was given."""
    data = tuple(data)
    if calib and data:
        raise ConfigError("both --calib and --data were given", "pass one of them")
    if calib:
        return load_calibration(calib)
    if data:
        recipe = CalibrationRecipe(data, n_samples=n_samples, seqlen=seqlen, seed=seed)
        return build_calibration(recipe, tokenizer_dir, max_context)
    return None
