"""bitsandbytes through transformers: a model directory loaded with its linears quantized, and saved as the
transformers checkpoint that is the artifact (see ``methods.bnb`` for the schemes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from turboquant.methods.bnb import BnbConfig, quantization_config


def load_quantized(model_dir: str | Path, cfg: BnbConfig, dtype: "torch.dtype | str" = torch.float32) -> nn.Module:
    """The model at ``model_dir`` loaded on CPU with its linears quantized by bitsandbytes (``dtype``: the rest)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map="cpu",
                                                quantization_config=quantization_config(cfg)).eval()


def save_artifact(model_dir: str | Path, cfg: BnbConfig, tmp: Path, aux_files: list[Path]) -> None:
    """Write the transformers bitsandbytes checkpoint of ``model_dir`` into the (temporary) directory ``tmp``.

    Non-quantized tensors keep the source dtype; tokenizer and license files are copied beside it.
    """
    model = load_quantized(model_dir, cfg, dtype="auto")
    model.save_pretrained(str(tmp))
    for f in aux_files:
        if not (tmp / f.name).exists():  # config.json / generation_config.json come from save_pretrained
            shutil.copyfile(f, tmp / f.name)
