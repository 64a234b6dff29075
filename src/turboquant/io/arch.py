"""What a model's decoder blocks hold: where the blocks are, their linear layers, groups and the block layout.

Any decoder family transformers ships is *discovered* from its own modelling classes built on the meta device
(``discover``): the decoder block list and each block's ``nn.Linear`` layers. Which linears share an input (a
``LinearGroup``) is traced later, in a real block forward (``quantize.runner.trace_groups``). The table (``ARCHITECTURES``) is an
optional speed-up for families proven equal to discovery (a test holds them to it): it names the groups up front
and the ``BlockLayout`` that lets the calibrated pipeline run a pre-norm block one sub-layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from turboquant.errors import first_line, ModelLoadError
from turboquant.io.experts import expert_modules, router_names
from turboquant.io.skeleton import build_skeleton



@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input, and the op that produces it (a norm or a linear).

    ``feeder`` is the module whose output is the group's input (None when no module's output is: a reshaped
    attention context, a gated activation, the residual stream): AWQ folds scales into it. GPTQ quantizes groups
    in the order they run (``true_sequential``).
    """

    feeder: str | None
    linears: tuple[str, ...]
    #: a norm feeder that multiplies by ``fold_offset + weight`` (Gemma's ``1 + w``); 0 for plain norms and linears
    fold_offset: float = 0.0


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
    """Where a model keeps its decoder blocks and which linear layers each block has.

    ``groups`` (the table's families) lists the linears by shared input in execution order; None when they are
    traced from a real block forward (``quantize.runner.trace_groups``). ``layout`` is set when the block is the
    standard pre-norm residual pair whose four linear groups (in ``groups`` order) read: the attention norm's
    output, ``attn_out``'s input, the MLP norm's output and ``mlp_out``'s input.
    """

    name: str
    blocks_prefix: str
    linears: tuple[str, ...]
    n_layers: int | None = None
    groups: tuple[LinearGroup, ...] | None = None
    layout: BlockLayout | None = None
    #: modules routing tokens between experts, kept in high precision by design (``io.experts.router_names``)
    routers: tuple[str, ...] = ()
    #: experts per mixture-of-experts module (0: a dense family)
    n_experts: int = 0
    #: each block's linears when blocks differ (DeepSeek's dense first layers before its MoE ones); else None
    block_linears: tuple[tuple[str, ...], ...] | None = None

    @property
    def discovered(self) -> bool:
        return self.groups is None

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_prefix}.{index}."

    def linears_at(self, index: int) -> tuple[str, ...]:
        """Block ``index``'s linears (names relative to the block)."""
        return self.block_linears[index] if self.block_linears is not None else self.linears

    def linear_names(self) -> list[str]:
        """Every planned linear of the model, by full name, block by block."""
        return [f"{self.block_prefix(i)}{n}" for i in range(self.n_layers or 0) for n in self.linears_at(i)]

    def with_layers(self, n_layers: int) -> "ArchSpec":
        return replace(self, n_layers=n_layers)


_LLAMA_GROUPS = (
    LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    LinearGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    LinearGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    LinearGroup("mlp.up_proj", ("mlp.down_proj",)),
)

#: Families whose groups and pre-norm layout are known up front (a speed-up; ``discover`` covers every family).
ARCHITECTURES: dict[str, ArchSpec] = {
    name: ArchSpec(name, "model.layers", tuple(n for g in _LLAMA_GROUPS for n in g.linears), groups=_LLAMA_GROUPS,
                   layout=BlockLayout())
    for name in ("llama", "mistral", "qwen2", "qwen3")
}


def arch_for(config: dict, config_dir: Path, *, use_table: bool = True) -> ArchSpec:
    """The architecture of the model at ``config_dir``: its table entry when it has one, else discovered.

    The block count always comes from the modelling class (``num_hidden_layers`` or the family's own key).
    """
    discovered = discover(config, config_dir)
    entry = ARCHITECTURES.get(str(config.get("model_type"))) if use_table else None
    if entry is not None and entry.blocks_prefix == discovered.blocks_prefix \
            and set(entry.linears) == set(discovered.linears):
        return entry.with_layers(discovered.n_layers)
    return discovered


def discover(config: dict, config_dir: Path) -> ArchSpec:
    """Blocks and linears of any decoder transformers implements natively, from its modelling class on meta.

    Refuses what the pipeline could not quantize completely: no decoder block list, blocks whose linears differ
    (heterogeneous stacks), or a matrix weight in a block that is not an ``nn.Linear`` (it would stay float).
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"architecture '{model_type}' is not a causal LM that transformers {transformers.__version__} implements",
            "use a model of a family transformers ships natively (custom `auto_map` code is never run)",
        )
    try:
        skeleton = build_skeleton(config_dir)
    except (ValueError, KeyError, TypeError, ImportError) as e:
        raise ModelLoadError(
            f"transformers cannot build architecture '{model_type}' from this config.json ({first_line(e)})",
            "restore the model's config.json from its repo",
        ) from None
    prefix, blocks = _decoder_blocks(skeleton, model_type)
    per_block = tuple(_block_linears(block, router_names(block)) for block in blocks)
    routers = tuple(dict.fromkeys(r for block in blocks for r in router_names(block)))
    linears = per_block[0]
    checked: set[tuple[str, ...]] = set()
    for i, (block, mine) in enumerate(zip(blocks, per_block)):
        if mine != linears and not _differ_in_feed_forward(block, blocks[0]):
            extra = sorted(set(mine) ^ set(linears))
            raise ModelLoadError(
                f"decoder block {i} of '{model_type}' has other linear layers than block 0 ({', '.join(extra[:3])})",
                "this family's blocks differ in more than a dense vs mixture-of-experts feed-forward",
            )
        if mine not in checked:
            checked.add(mine)
            _check_covered(block, mine, router_names(block), model_type)
    if not linears:
        raise ModelLoadError(f"the decoder blocks of '{model_type}' hold no nn.Linear layers",
                             "this family stores its projections in another module type, which is not supported")
    heterogeneous = any(mine != linears for mine in per_block)
    if heterogeneous:
        linears = tuple(dict.fromkeys(n for mine in per_block for n in mine))
    n_experts = max((m.num_experts for b in blocks for m in expert_modules(b).values()), default=0)
    return ArchSpec(str(model_type), prefix, linears, n_layers=len(blocks), routers=routers, n_experts=n_experts,
                    block_linears=per_block if heterogeneous else None)


def _check_covered(block: nn.Module, linears: tuple[str, ...], routers: tuple[str, ...], model_type: object) -> None:
    """Refuse a block with a matrix weight that is neither a planned linear nor a router (it would stay float)."""
    owned = {f"{n}.weight" for n in linears + routers}
    for name, p in sorted(block.named_parameters(), key=lambda np: -np[1].dim()):
        if p.dim() >= 2 and name not in owned:
            raise ModelLoadError(
                f"'{model_type}' block weight {name} {tuple(p.shape)} is not an nn.Linear and would stay unquantized",
                "this family's checkpoints store fused 3-D expert tensors, which are not supported yet: use a "
                "release that stores per-expert linears" if any(q.dim() == 3 for q in block.parameters())
                else "this family needs a dedicated entry",
            )


def _differ_in_feed_forward(block: nn.Module, first: nn.Module) -> bool:
    """Blocks whose only differing child is the feed-forward, with experts in one and a dense MLP in the other
    (DeepSeek's ``first_k_dense_replace``, Qwen2-MoE's ``mlp_only_layers``)."""
    differing = [n for n, c in block.named_children() if type(c) is not type(first._modules.get(n))]
    return len(differing) == 1 and bool(expert_modules(block._modules[differing[0]])) != bool(
        expert_modules(first._modules[differing[0]]))


def _block_linears(block: nn.Module, routers: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n for n, m in block.named_modules() if isinstance(m, nn.Linear) and n not in routers)


def _decoder_blocks(skeleton: nn.Module, model_type: object) -> tuple[str, nn.ModuleList]:
    """The model's decoder block list: the largest ``nn.ModuleList`` of one repeated module class."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, m in skeleton.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[0]:
                best = (size, name, m)
    if best is None or best[0] == 0:
        raise ModelLoadError(f"no decoder block list was found in '{model_type}'",
                             "pass a decoder-only causal language model")
    return best[1], best[2]
