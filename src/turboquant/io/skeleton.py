"""Module skeletons on the meta device: transformers' own modelling classes, built without memory or init cost.

Evaluation, block-by-block forward passes and architecture discovery all start from one: real tensors are then
assigned into the parts a step needs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from turboquant.errors import ModelLoadError
from turboquant.io.experts import unfuse_experts


def build_skeleton(config_dir: Path, dtype: torch.dtype = torch.float32, real_buffers: bool = False
                   ) -> torch.nn.Module:
    """The transformers model for ``config_dir``'s config, on the meta device (no memory, no init cost).

    ``real_buffers``: parameters stay on meta but buffers are computed for real (RoPE frequencies, embedding
    scales: whatever a family derives from its config), so running the model's own forward needs only the weights
    assigned in. Fused experts become per-expert linears named as the checkpoint names them (``io.experts``), and
    modules transformers renames on load carry their checkpoint names (``checkpoint_module_names``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_dir, trust_remote_code=False)
    with torch.device("meta"):  # thread-local, unlike patching nn.Module: other threads keep building real modules
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=False)
        unfuse_experts(model, str(cfg.model_type))
    checkpoint_module_names(model, str(cfg.model_type))
    if real_buffers:
        compute_buffers(model)
    return model.eval()


def checkpoint_module_names(model: torch.nn.Module, model_type: str) -> None:
    """Give modules the names the family's checkpoints use where transformers renames them on load (Mixtral's
    ``block_sparse_moe`` is ``mlp`` in memory), from its conversion mapping's plain segment renamings: the state
    dict then has the checkpoint's names, while the forward still finds the module under its own attribute."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        sources = getattr(rule, "_original_source_patterns", None) or []
        targets = getattr(rule, "_original_target_patterns", None) or []
        if type(rule).__name__ != "WeightRenaming" or len(sources) != 1 or len(targets) != 1:
            continue
        old = re.fullmatch(r"\\?\.(\w+)\\?\.", sources[0])
        new = re.fullmatch(r"\\?\.(\w+)\\?\.", targets[0])
        if old is None or new is None:
            continue
        for module in list(model.modules()):
            child = module._modules.get(new.group(1))
            if child is not None and old.group(1) not in module._modules:
                module._modules = {(old.group(1) if k == new.group(1) else k): v for k, v in module._modules.items()}
                object.__setattr__(module, new.group(1), child)


def compute_buffers(model: torch.nn.Module) -> None:
    """Give every meta buffer real values the way transformers does after loading on meta: the family's own
    ``_init_weights`` recomputes it. A buffer it leaves unset (still NaN) is refused, never used."""
    for name, module in model.named_modules():
        pending = [k for k, b in module._buffers.items() if b is not None and b.is_meta]
        if not pending:
            continue
        for k in pending:
            meta = module._buffers[k]
            module._buffers[k] = torch.full(meta.shape, _unset(meta.dtype), dtype=meta.dtype)
        with torch.no_grad():
            model._init_weights(module)
        for k in pending:
            b = module._buffers[k]
            if bool((torch.isnan(b) if b.is_floating_point() else b == _unset(b.dtype)).any()):
                raise ModelLoadError(f"buffer {name}.{k} of '{model.config.model_type}' is not computed by its "
                                     "modelling class's _init_weights", "this family needs a dedicated entry")


def _unset(dtype: torch.dtype) -> float | int | bool:
    """What a buffer holds until ``_init_weights`` sets it: NaN, or the integer type's minimum."""
    if dtype.is_floating_point:
        return float("nan")
    if dtype == torch.bool:
        raise ModelLoadError("a boolean buffer cannot be checked for being computed",
                             "this family needs a dedicated entry")
    return torch.iinfo(dtype).min


def materialize(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Assign real tensors into a skeleton built with ``real_buffers`` (its buffers are already real)."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False, assign=True)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    missing = [k for k in result.missing_keys if _is_meta(module, k)]
    if missing:
        raise ModelLoadError(
            f"weights for {missing[0]} (and {len(missing) - 1} more) are missing", "re-fetch the checkpoint"
        )
    buffers = [name for name, b in module.named_buffers() if b.is_meta]
    if buffers:
        raise ModelLoadError(f"buffer {buffers[0]} was never computed (the skeleton was built on meta)",
                             "build the skeleton with build_skeleton(..., real_buffers=True)")


def _is_meta(module: torch.nn.Module, key: str) -> bool:
    try:
        return module.get_parameter(key).is_meta
    except AttributeError:
        return False
