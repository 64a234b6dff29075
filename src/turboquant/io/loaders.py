"""Loading what evaluation and calibration read: text files, tokenizers, token ids and whole models.

``load_model`` opens an HF directory or a canonical quantized checkpoint (dequantized), always without remote code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from turboquant.errors import DataError
from turboquant.io.checkpoint import METADATA_FILE, QuantizedCheckpoint
from turboquant.io.model import open_model
from turboquant.io.skeleton import build_skeleton, materialize


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist", "pass an existing UTF-8 text file with --text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text", "convert it to UTF-8") from None
    if not text.strip():
        raise DataError(f"text file {path} is empty", "pass a file with evaluation text")
    return text


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise DataError(
            f"no usable tokenizer in {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
            "copy the model's tokenizer files (tokenizer.json, tokenizer_config.json) next to its config.json",
        ) from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids ``[N]`` of the whole text (with the tokenizer's BOS, if it adds one)."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> torch.nn.Module:
    """A model ready for evaluation: an HF directory, or a canonical quantized checkpoint dequantized."""
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return QuantizedCheckpoint.open(path).load_model(dtype)
    opened = open_model(path, allow_pickle=allow_pickle)
    model = build_skeleton(opened.source.path, dtype=dtype, real_buffers=True)
    materialize(model, opened.checkpoint.load(opened.checkpoint.names()), dtype=dtype)
    return model
