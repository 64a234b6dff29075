"""MLX checkpoints in mlx-lm's layout (what ``mlx_lm.load`` / ``mlx_lm.generate`` and LM Studio's MLX engine read).

Per quantized linear ``M`` ``[out, in]`` with groups of ``g`` input columns (``G = in / g``), MLX's "affine" mode:

* ``M.weight`` uint32 ``[out, in * bits / 32]``: the codes of each row as one least-significant-bit-first stream
  (for 3, 5 and 6 bits codes straddle bytes and words exactly as ``mx.quantize`` packs them: 8 codes in 3 / 5 bytes,
  4 six-bit codes in 3 bytes), which is our canonical ``pack_bits`` stream read as little-endian words;
* ``M.scales`` and ``M.biases`` ``[out, G]`` in the artifact's float dtype, with ``w = code * scale + bias``.

Our weight is ``(code - zero) * scale``, so ``bias = -zero * scale``; codes and scales are copied, never re-rounded.
Fractional (HQQ) zero points fit the same formula. ``bias`` is computed exactly in float32 (a product of two
float16-exact numbers) and then stored in the artifact dtype:

* ``dtype=float32``: scales and biases are exact, ``code * scale + bias`` reproduces our weights bit for bit;
* ``dtype=float16`` (the default, what mlx-lm writes): scales are exact (they are float16 already); a bias is
  rounded to the nearest float16 unless it is already one (always the case for symmetric schemes, where
  ``zero = 2**(bits-1)`` only shifts the exponent). The weight error is the bias rounding,
  ``|dW| <= 2**-11 * |zero * scale|`` (half an ulp; ``2**-25`` absolute in float16's subnormal range), i.e. at most
  ``qmax / 2048`` of one quantization step.

config.json gains ``quantization`` (and the same dict as ``quantization_config``, as mlx-lm writes it):
``{"group_size": g, "bits": b, "mode": "affine"}`` for the most common scheme, plus one entry per module whose
scheme differs (``"model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8}``), which mlx-lm applies per layer,
so mixed-precision checkpoints are representable. Linears left in float keep a plain ``weight`` (mlx-lm leaves a
module unquantized when it has no ``scales``). MLX groups are 32, 64 or 128 inputs; a per-channel (or per-tensor)
scheme fits only where ``in_features`` is one of those; act-order (g_idx) is not representable.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from turboquant.errors import first_line
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.io.experts import expert_names, expert_of, ExpertNames
from turboquant.formats.base import (
    FormatError, has_act_order, register_format, write_packed_shards, schemes, source_config, write_json,
)
from turboquant.tensor import PER_TENSOR, QuantizedTensor, QuantScheme, pack_words

#: Bit widths and group sizes of MLX's affine quantization (mlx 0.32: ``mx.quantize`` / ``quantized_matmul``).
MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
#: Artifact dtypes; bfloat16 is not offered: it would re-round the float16 scales (8 vs 11 significant bits).
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def mlx_group_size(scheme: QuantScheme, in_features: int) -> int:
    """The MLX group of a module: the scheme's group, or the whole row for per-channel / per-tensor scales."""
    return scheme.group_size if scheme.group_size > 0 else in_features


def check_family(config: dict[str, Any]) -> None:
    """Refuse a model mlx-lm cannot build: no model class for its family, or a config form its class misreads."""
    from mlx_lm.utils import MODEL_REMAPPING

    model_type = str(config.get("model_type"))
    module = f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}"
    if importlib.util.find_spec(module) is None:
        raise FormatError(f"mlx-lm {_mlx_lm_version()} has no model class for '{model_type}'",
                          "export this family to gptq, compressed-tensors or onnx")
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            importlib.import_module(module)
    except (ImportError, SystemExit) as e:  # mlx-lm's olmo prints what it needs and exits
        why = said.getvalue().strip() or first_line(e) or type(e).__name__
        raise FormatError(f"mlx-lm's '{model_type}' class cannot be imported here ({why})",
                          "export this family to gptq, compressed-tensors or onnx") from None
    types = config.get("layer_types") or []
    if "sliding_attention" in types and "full_attention" not in types:
        raise FormatError(f"every layer of this {model_type} model slides a window, and mlx-lm's class indexes its "
                          "first full-attention layer", "export this model to gptq, compressed-tensors or onnx")
    if model_type == "qwen2_moe" and config.get("norm_topk_prob"):
        raise FormatError("mlx-lm's qwen2_moe never renormalises the top-k routing weights, and this config's "
                          "norm_topk_prob is true", "export this model to compressed-tensors")
    if model_type == "exaone4" and isinstance(config.get("sliding_window_pattern"), int):
        raise FormatError("mlx-lm reads exaone4's sliding_window_pattern only as a layer string ('LLLG'); this "
                          "config has the integer form", "write it as a string in config.json, or export to gptq / "
                          "compressed-tensors / onnx")


def _mlx_lm_version() -> str:
    from importlib.metadata import version

    return version("mlx-lm")


def check(ckpt: QuantizedCheckpoint, options: dict[str, Any]) -> None:
    check_family(ckpt.config)
    check_experts(ckpt)
    if not schemes(ckpt):
        raise FormatError(f"{ckpt.path} holds no quantized weights (method '{ckpt.method}')",
                          "quantize with a weight method (rtn, gptq, awq, hqq) before exporting to mlx")
    if options["dtype"] not in DTYPES:
        raise FormatError(f"dtype={options['dtype']!r} is not an MLX artifact dtype",
                          f"use one of {sorted(DTYPES)} (float16 scales are stored exactly in both)")
    if has_act_order(ckpt):
        raise FormatError("the checkpoint uses act-order groups (g_idx), which MLX's contiguous groups cannot store",
                          "export it to gptq or compressed-tensors, "
                          "or re-quantize GPTQ with --option static_groups=true")
    for module, info in ckpt.modules.items():
        check_module(module, ckpt.scheme(module), info["shape"][1])


def switch_name(module: str, names: ExpertNames | None) -> str:
    """mlx-lm's name for ``module``: an expert's projection lives in its block's ``switch_mlp`` (SwitchGLU), all
    experts stacked along a leading axis, as ``gate_proj`` / ``up_proj`` / ``down_proj``; others keep theirs."""
    m = re.fullmatch(r"(.*)\.experts\.(\d+)\.(\w+)", module)
    if names is None or m is None:
        return module
    role = {names.gate: "gate_proj", names.up: "up_proj", names.down: "down_proj"}[m.group(3)]
    return f"{m.group(1)}.switch_mlp.{role}"


def check_experts(ckpt: QuantizedCheckpoint) -> None:
    """Experts stacked into one SwitchGLU tensor share one quantization: refuse experts of one projection with
    different schemes (mixed precision), or an experts module with an expert missing."""
    names = expert_names(str(ckpt.config.get("model_type")))
    stacks: dict[str, dict[int, tuple]] = {}
    for module in ckpt.modules:
        found = expert_of(module)
        if found is None or names is None:
            continue
        scheme = ckpt.scheme(module)
        stacks.setdefault(switch_name(module, names), {})[found[1]] = (scheme.bits, scheme.group_size)
    for name, per_expert in sorted(stacks.items()):
        if len(set(per_expert.values())) > 1:
            raise FormatError(f"the experts of {name} are quantized with different schemes, and mlx-lm stacks them "
                              "into one tensor with one scheme", "quantize experts uniformly, or export to "
                              "compressed-tensors")
        if sorted(per_expert) != list(range(len(per_expert))):
            raise FormatError(f"{name} is missing experts {sorted(set(range(max(per_expert) + 1)) - set(per_expert))}",
                              "re-create the checkpoint with `turboquant quantize`")


def stack_experts(tensors: dict[str, torch.Tensor], names: ExpertNames | None) -> dict[str, torch.Tensor]:
    """One shard's tensors with every experts module's per-expert tensors stacked as mlx-lm's ``switch_mlp``."""
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, part = key.rpartition(".")
        found = expert_of(module)
        if found is None or names is None:
            out[key] = t
        else:
            stacks.setdefault(f"{switch_name(module, names)}.{part}", {})[found[1]] = t
    for key, per_expert in stacks.items():
        out[key] = torch.stack([per_expert[e] for e in range(len(per_expert))]).contiguous()
    return out


def check_module(module: str, scheme: QuantScheme, in_features: int) -> None:
    """Refuse one linear whose bit width or group MLX's affine quantization does not have."""
    if scheme.bits not in MLX_BITS:
        raise FormatError(f"{module} has {scheme.bits}-bit codes; MLX holds {', '.join(map(str, MLX_BITS))}-bit",
                          "re-quantize with --bits 4 (or 2, 3, 5, 6, 8), or export to gguf / gptq")
    group = mlx_group_size(scheme, in_features)
    if group not in MLX_GROUP_SIZES:
        what = (f"groups of {group}" if scheme.group_size > 0
                else f"one scale per {scheme.granularity} ({in_features} inputs)")
        raise FormatError(f"{module} ({scheme.describe()}) has {what}; MLX groups are "
                          f"{', '.join(map(str, MLX_GROUP_SIZES))} inputs",
                          "re-quantize with --group-size 64 (or 32, 128), or export to gptq / compressed-tensors")


def pack_module(qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weight``, ``scales``, ``biases`` of one linear (names relative to the module)."""
    scale, zero = qt.scale, qt.zero
    if qt.scheme.group_size == PER_TENSOR:  # one scale per tensor is one group per row, repeated
        scale, zero = scale.expand(qt.shape[0], 1), zero.expand(qt.shape[0], 1)
    bias = -(zero.float() * scale.float())  # exact in float32: float16-exact zero times float16 scale
    biases = bias.to(dtype)
    if not bool(torch.isfinite(biases).all()):
        raise FormatError(f"a bias -zero*scale overflows {dtype} (|bias| up to {bias.abs().max().item():.3g})",
                          "export with --option dtype=float32")
    return {
        "weight": pack_words(qt.codes, qt.scheme.bits, torch.int32).view(torch.uint32),
        "scales": scale.to(dtype).contiguous(),
        "biases": biases.contiguous(),
    }


def quantization_config(ckpt: QuantizedCheckpoint) -> dict[str, Any]:
    """mlx-lm's ``quantization`` dict: the most common (group_size, bits) plus per-module overrides."""
    names = expert_names(str(ckpt.config.get("model_type")))
    per_module = {switch_name(m, names): (mlx_group_size(ckpt.scheme(m), info["shape"][1]), ckpt.scheme(m).bits)
                  for m, info in ckpt.modules.items()}
    counts = Counter(per_module.values())
    group_size, bits = max(sorted(counts), key=lambda k: counts[k])
    config: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for module, (g, b) in sorted(per_module.items()):
        if (g, b) != (group_size, bits):
            config[module] = {"group_size": g, "bits": b, "mode": "affine"}
    return config


def mlx_config(ckpt: QuantizedCheckpoint) -> dict[str, Any]:
    """config.json for mlx-lm: the source config with transformers 5's ``rope_parameters`` spelled out as the
    top-level keys mlx-lm's model classes read (they ignore ``rope_parameters``)."""
    config = source_config(ckpt)
    config.update({k: v for k, v in mlx_rope_keys(config).items() if k not in config})
    config.update({k: v for k, v in hub_key_aliases(config).items() if k not in config})
    has_head = any(name.startswith("lm_head.") for name in ckpt.tensors.tensors)
    config.setdefault("tie_word_embeddings", not has_head)  # mlx-lm's default is True, transformers' often False
    qcfg = quantization_config(ckpt)
    config["quantization"] = qcfg
    config["quantization_config"] = dict(qcfg)
    return config


def hub_key_aliases(config: dict[str, Any]) -> dict[str, Any]:
    """Config keys under the names the family's Hub configs use where transformers 5 saves another (its config
    class's ``attribute_map``: Qwen3-MoE's ``num_experts`` is saved as ``num_local_experts``); mlx-lm reads those."""
    from transformers import AutoConfig

    try:
        cls = type(AutoConfig.for_model(str(config.get("model_type"))))
    except ValueError:
        return {}
    return {alias: config[name] for alias, name in getattr(cls, "attribute_map", {}).items() if name in config}


def mlx_rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 4's top-level RoPE keys from ``rope_parameters``: ``rope_theta``, ``partial_rotary_factor``
    and ``rope_scaling`` (None for plain RoPE); with per-layer-type parameters (Gemma 3's sliding / full
    attention) the full layers' ``rope_theta``, the sliding layers' as ``rope_local_base_freq`` and the period of
    ``layer_types`` as ``sliding_window_pattern``."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        out = {k: v for k, v in mlx_rope_keys({"rope_parameters": rope.get("full_attention") or {}}).items()}
        local = rope.get("sliding_attention") or {}
        if "rope_theta" in local:
            out["rope_local_base_freq"] = local["rope_theta"]
        types = list(config.get("layer_types") or [])
        if "full_attention" in types:
            out["sliding_window_pattern"] = types.index("full_attention") + 1
        return out
    out: dict[str, Any] = {k: v for k, v in rope.items() if k in ("rope_theta", "partial_rotary_factor")}
    out["rope_scaling"] = ({k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
                           if rope.get("rope_type", "default") != "default" else None)
    return out


def cast_plain(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float tensors (embeddings, norms, unquantized linears) in the artifact dtype; refuses values it overflows."""
    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    for name, t in out.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FormatError(f"{name} has values beyond the range of {dtype}", "export with --option dtype=float32")
    return out


@register_format("mlx", description="mlx-lm affine layout (uint32 weight, scales, biases; per-layer bits)",
                 runtime="mlx-lm (Apple silicon; Linux CPU via mlx[cpu])", check=check,
                 options={"dtype": "float16"})
def write(ckpt: QuantizedCheckpoint, out: Path, options: dict[str, Any]) -> None:
    dtype = DTYPES[options["dtype"]]
    names = expert_names(str(ckpt.config.get("model_type")))
    write_packed_shards(ckpt, out, lambda qt: pack_module(qt, dtype), plain=lambda t: cast_plain(t, dtype),
                        regroup=lambda t: stack_experts(t, names))
    write_json(out / "config.json", mlx_config(ckpt))
