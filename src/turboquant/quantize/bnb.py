"""bitsandbytes through transformers: a model directory loaded with its linears quantized, and saved as the
transformers checkpoint that is the artifact (see ``methods.bnb`` for the schemes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from turboquant.errors import ModelLoadError
from turboquant.io.model import read_config
from turboquant.io.source_encoding import source_encoding
from turboquant.methods.bnb import BnbConfig, quantization_config


def load_quantized(model_dir: str | Path, cfg: BnbConfig, dtype: "torch.dtype | str" = torch.float32) -> nn.Module:
    """The model at ``model_dir`` loaded on CPU with its linears quantized by bitsandbytes (``dtype``: the rest).

    An FP8 / MXFP4 source is refused: transformers would load it with its own quantization_config and ignore
    bitsandbytes' (TurboQuant's own dequantizing reader is not what transformers loads through)."""
    from transformers import AutoModelForCausalLM

    encoding = source_encoding(read_config(Path(model_dir)))
    if encoding is not None:
        raise ModelLoadError(f"bnb-* methods load the model through transformers, which keeps the "
                             f"{encoding.quant_method} source's own quantization and ignores bitsandbytes'",
                             "quantize the model's bfloat16 release with bnb-*, or use rtn / gptq / awq / hqq")
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
