"""What a model family's decoder blocks hold: where the blocks are, their linear groups and the block layout.

A ``LinearGroup`` is the set of linears that read one input and the module (a norm or a linear) that produces it:
calibrated methods capture one Hessian per group, AWQ folds its scales into the feeder. ``BlockLayout`` names the
sub-modules of a standard pre-norm block, which lets the calibrated pipeline run a block one sub-layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from turboquant.errors import ModelLoadError



@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input, and the op that produces it (a norm or a linear).

    ``feeder`` is the module whose output is the group's input: AWQ folds scales into it; GPTQ quantizes groups in
    this order (``true_sequential``).
    """

    feeder: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class BlockLayout:
    """The modules of a pre-norm decoder block: ``h1 = h + attn(attn_norm(h))``, ``out = h1 + mlp(mlp_norm(h1))``.

    ``attn_out`` / ``mlp_out`` are the last linears of the two branches (their inputs are the attention context
    and the gated MLP activation). Knowing this lets the calibrated pipeline run a block one sub-layer at a time
    (``quantize.runner.run_staged``) instead of re-running the whole block for every linear group.
    """

    attn_norm: str = "input_layernorm"
    attn: str = "self_attn"
    attn_out: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    mlp: str = "mlp"
    mlp_out: str = "mlp.down_proj"


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its decoder blocks and which linear layers each block has.

    ``layout`` is set when the block is the standard pre-norm residual pair whose four linear groups (in
    ``groups`` order) read: the attention norm's output, ``attn_out``'s input, the MLP norm's output and
    ``mlp_out``'s input.
    """

    name: str
    blocks_prefix: str
    groups: tuple[LinearGroup, ...]
    n_layers_key: str = "num_hidden_layers"
    layout: BlockLayout | None = None

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears)

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_prefix}.{index}."


_LLAMA_GROUPS = (
    LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    LinearGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    LinearGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    LinearGroup("mlp.up_proj", ("mlp.down_proj",)),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    name: ArchSpec(name, "model.layers", _LLAMA_GROUPS, layout=BlockLayout())
    for name in ("llama", "mistral", "qwen2", "qwen3")
}


def arch_for(config: dict) -> ArchSpec:
    """The table entry for a config's ``model_type``; unsupported types fail with the supported list."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"architecture '{model_type}' is not supported",
            f"use a model of a supported family: {', '.join(sorted(ARCHITECTURES))}",
        )
    return ARCHITECTURES[model_type]
