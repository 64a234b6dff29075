"""Mixture-of-experts blocks seen as per-expert linears.

transformers 5 keeps a block's experts as fused 3-D parameters (``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``) and merges the checkpoint's per-expert linears into them on load, by its
conversion mapping. Quantization works per expert linear, so every skeleton gets its fused experts module
replaced by ``PerExpertLinears``: one ``nn.Linear`` per expert and projection, named as the checkpoint names them
(read from that same conversion mapping), computing the fused module's own forward. The block then loads the
checkpoint's tensors as they are, every expert is calibrated and quantized like any other linear, and the
canonical checkpoint keeps the release's own per-expert names, which transformers merges again on load.

The layout of the fused tensors (gate and up concatenated or interleaved, transposed or not, biases) comes from
the attributes transformers' ``use_experts_implementation`` gives every experts class; the gating is the class's
own ``_apply_gate``. Routers stay in high precision (``router_names``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Attributes ``transformers.integrations.moe.use_experts_implementation`` sets on every experts class.
_EXPERT_ATTRS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


@dataclass(frozen=True)
class ExpertNames:
    """The leaf names a checkpoint gives one expert's projections (``w1``/``w3``/``w2`` for Mixtral)."""

    gate: str
    up: str
    down: str


def expert_names(model_type: str) -> ExpertNames | None:
    """Per-expert projection names of ``model_type``'s checkpoints, from transformers' conversion mapping (the
    converters that merge ``experts.*.<gate>.weight`` and ``experts.*.<up>.weight`` into ``experts.gate_up_proj``);
    None when the checkpoints store the fused tensors themselves."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    gate_up = down = None
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        sources = list(getattr(conv, "_original_source_patterns", None) or getattr(conv, "source_patterns", []))
        targets = list(getattr(conv, "_original_target_patterns", None) or getattr(conv, "target_patterns", []))
        leaves = [m.group(1) for s in sources if (m := re.search(r"experts\.\*\.(\w+)\.weight$", s))]
        if len(leaves) != len(sources) or not targets:
            continue
        if targets[0].endswith("experts.gate_up_proj") and len(leaves) == 2:
            gate_up = leaves
        elif targets[0].endswith("experts.down_proj") and len(leaves) == 1:
            down = leaves[0]
    if gate_up is None or down is None:
        return None
    return ExpertNames(gate_up[0], gate_up[1], down)


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module holding 3-D expert tensors (decorated by ``use_experts_implementation``)."""
    return all(hasattr(module, a) for a in _EXPERT_ATTRS) and isinstance(getattr(module, "down_proj", None),
                                                                         torch.Tensor)


class Expert(nn.Module):
    """One expert's projections as linears (``gate`` absent for non-gated experts)."""

    def __init__(self, names: ExpertNames, hidden: int, intermediate: int, gated: bool, bias: bool,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        kw: dict[str, Any] = dict(bias=bias, device=device, dtype=dtype)
        if gated:
            self.add_module(names.gate, nn.Linear(hidden, intermediate, **kw))
        self.add_module(names.up, nn.Linear(hidden, intermediate, **kw))
        self.add_module(names.down, nn.Linear(intermediate, hidden, **kw))


class PerExpertLinears(nn.ModuleList):
    """A fused experts module as one ``Expert`` per expert, with the fused module's forward.

    ``all_experts`` (calibration only): every expert also runs on every token, so its linears' input statistics
    see the whole calibration set; the output still sums the routed experts only. ``routed`` counts, while not
    None, the tokens the router sent to each expert.
    """

    def __init__(self, fused: nn.Module, names: ExpertNames) -> None:
        gated, bias = bool(fused.has_gate), bool(fused.has_bias)
        down = fused.down_proj
        n_experts = down.shape[0]
        hidden, intermediate = (down.shape[2], down.shape[1]) if fused.is_transposed else (down.shape[1], down.shape[2])
        super().__init__([Expert(names, hidden, intermediate, gated, bias, down.device, down.dtype)
                          for _ in range(n_experts)])
        self.names = names
        self.num_experts = n_experts
        self.gated, self.concatenated = gated, bool(fused.is_concatenated)
        self.post_norm = getattr(fused, "post_expert_norm", None) if getattr(fused, "has_post_expert_norm", False) \
            else None
        object.__setattr__(self, "_fused", fused)  # its gating and activation, not its (meta) tensors
        self.all_experts = False
        self.routed: torch.Tensor | None = None

    def split(self, fused: nn.Module) -> dict[str, torch.Tensor]:
        """``fused``'s real tensors as this module's state dict (the inverse of transformers' merge)."""
        def matrix(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(-1, -2) if fused.is_transposed else t

        state: dict[str, torch.Tensor] = {}
        n = self.names
        for e in range(self.num_experts):
            if self.gated:
                gu = matrix(fused.gate_up_proj[e])
                gate, up = (gu.chunk(2, 0) if self.concatenated else (gu[0::2], gu[1::2]))
                state[f"{e}.{n.gate}.weight"], state[f"{e}.{n.up}.weight"] = gate, up
                if self.has_bias:
                    b = fused.gate_up_proj_bias[e]
                    gb, ub = b.chunk(2, 0) if self.concatenated else (b[0::2], b[1::2])
                    state[f"{e}.{n.gate}.bias"], state[f"{e}.{n.up}.bias"] = gb, ub
            else:
                state[f"{e}.{n.up}.weight"] = matrix(fused.up_proj[e])
                if self.has_bias:
                    state[f"{e}.{n.up}.bias"] = fused.up_proj_bias[e]
            state[f"{e}.{n.down}.weight"] = matrix(fused.down_proj[e])
            if self.has_bias:
                state[f"{e}.{n.down}.bias"] = fused.down_proj_bias[e]
        return {k: v.contiguous() for k, v in state.items()}

    @property
    def has_bias(self) -> bool:
        return bool(self._fused.has_bias)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        expert, n = self[e], self.names
        up = getattr(expert, n.up)(x)
        if self.gated:
            gate = getattr(expert, n.gate)(x)
            joined = torch.cat([gate, up], -1) if self.concatenated else torch.stack([gate, up], -1).flatten(-2)
            act = self._fused._apply_gate(joined)
        else:
            act = self._fused.act_fn(up)
        out = getattr(expert, n.down)(act)
        return self.post_norm(out) if self.post_norm is not None else out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == e)
            if self.routed is not None:
                self.routed[e] += token_idx.numel()
            if self.all_experts:
                out = self._expert(e, hidden_states)[token_idx]
            elif token_idx.numel():
                out = self._expert(e, hidden_states[token_idx])
            else:
                continue
            out = out * top_k_weights[token_idx, slot, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def unfuse_experts(model: nn.Module, model_type: str) -> int:
    """Replace every fused experts module of ``model`` by ``PerExpertLinears`` named as ``model_type``'s
    checkpoints name them; returns how many were replaced (0 when the family stores fused tensors on disk)."""
    names = expert_names(model_type)
    if names is None:
        return 0
    targets = [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]
    for name, fused in targets:
        parent, _, leaf = name.rpartition(".")
        model.get_submodule(parent).add_module(leaf, PerExpertLinears(fused, names))
    return len(targets)


def expert_modules(module: nn.Module) -> dict[str, PerExpertLinears]:
    """The ``PerExpertLinears`` inside ``module``, by name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, PerExpertLinears)}


def router_names(block: nn.Module) -> tuple[str, ...]:
    """Modules of ``block`` that route between experts (kept in high precision): the siblings of an experts
    module that are not themselves experts, whose weight has one row per expert, or a single row (a shared
    expert's gate)."""
    found: list[str] = []
    for name, experts in expert_modules(block).items():
        parent_name = name.rpartition(".")[0]
        parent = block.get_submodule(parent_name) if parent_name else block
        for child_name, child in parent.named_children():
            weight = getattr(child, "weight", None)
            if child is experts or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            if weight.shape[0] in (1, experts.num_experts):
                found.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return tuple(found)


def expert_of(linear: str) -> tuple[str, int] | None:
    """``('mlp.experts', 3)`` for ``mlp.experts.3.gate_proj``: the experts module and index a linear belongs to,
    when ``linear`` is an expert's (by the name ``PerExpertLinears`` gives it)."""
    m = re.match(r"^(.*\.?experts)\.(\d+)\.\w+$", linear)
    return (m.group(1), int(m.group(2))) if m else None


def merge_expert_groups(groups: list[list[str]]) -> list[list[str]]:
    """Linear groups in run order with each experts module's per-expert groups of one projection merged into one,
    at the first one's place: experts never read each other's outputs, so one calibration pass serves them all
    (the down projections, each reading its own expert's activation, then come after every gate/up)."""
    merged: list[list[str]] = []
    slot: dict[tuple, int] = {}
    for names in groups:
        owners = {expert_of(n) for n in names}
        if None in owners or len({o[0] for o in owners}) != 1:
            merged.append(list(names))
            continue
        key = (next(iter(owners))[0], tuple(sorted(n.rpartition(".")[2] for n in names)))
        if key in slot:
            merged[slot[key]].extend(names)
        else:
            slot[key] = len(merged)
            merged.append(list(names))
    return merged
