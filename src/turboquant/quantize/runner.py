"""Block-sequential calibration: activations go through the model one decoder block at a time.

The model skeleton lives on the ``meta`` device; only the embeddings and the current block hold real weights.
Block ``i`` sees the outputs of blocks ``0..i-1`` *after* they were quantized (GPTQ's sequential mode), so each
block's solver works on the inputs it will really get. Statistics are accumulated in float32: per input group
(linears that share an input) the Hessian proxy ``H = XᵀX / n``, the mean ``|x|`` per input channel, and — when the
runner also carries the float model's activations (``float_hidden``, for GPTAQ) — the cross term
``D = (X_float - X)ᵀ X / n`` between the float model's input of the group and this (quantized-path) input.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from turboquant.device import ActivationStore, to_device
from turboquant.errors import ModelLoadError
from turboquant.io.arch import ArchSpec, BlockLayout, LinearGroup
from turboquant.io.experts import expert_modules, expert_of
from turboquant.io.model import OpenedModel
from turboquant.io.skeleton import build_skeleton
from turboquant.io.tiny import replica_config


class StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the block is not computed."""


#: A forward pre-hook registered ``with_kwargs``: ``hook(module, args, kwargs)``.
PreHook = Callable[[nn.Module, tuple, dict], None]


@dataclass
class InputStats:
    """Accumulated statistics of one linear group's input ``X``: ``H = XᵀX / n``, when asked for the mean ``|x|``,
    and with ``cross`` the term ``D = (X_float - X)ᵀ X / n`` against the float model's input ``X_float``."""

    H: torch.Tensor
    abs_mean: torch.Tensor | None = None
    n: int = 0
    D: torch.Tensor | None = None

    @classmethod
    def empty(cls, features: int, abs_mean: bool = False, cross: bool = False,
              device: torch.device | str = "cpu") -> "InputStats":
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=device)

        return cls(zeros(features, features), zeros(features) if abs_mean else None,
                   D=zeros(features, features) if cross else None)

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        total = self.n + x.shape[0]
        self.H.mul_(self.n / total).addmm_(x.T, x, alpha=1.0 / total)
        if self.abs_mean is not None:
            self.abs_mean.mul_(self.n / total).add_(x.abs().sum(0), alpha=1.0 / total)
        if self.D is not None:
            delta = x_float.reshape(x.shape).float() - x
            self.D.mul_(self.n / total).addmm_(delta.T, x, alpha=1.0 / total)
        self.n = total


@dataclass
class BlockRunner:
    """Holds the current block inputs ``[n_samples, seqlen, hidden]`` and runs blocks over them in batches.

    ``layer_calls[i]`` are the keyword arguments the model's own forward passes decoder layer ``i`` (position
    embeddings, its attention mask: sliding-window or full, whatever the family computes), recorded for one sample
    and broadcast over every batch; ``layer_kwargs`` is the current block's (set by ``load_block``).

    The current block, its call arguments and the statistics live on ``store.device``; the activations
    (``hidden``, ``float_hidden``, block outputs) are kept by ``store`` (on the device within its budget, else in
    host memory) and every batch is fetched to the device to compute (``batch``). The embeddings stay on the host.
    """

    opened: OpenedModel
    skeleton: nn.Module
    hidden: torch.Tensor
    layer_calls: list[dict]
    batch_size: int = 8
    #: the float model's block inputs for the same samples, when a method needs them (GPTAQ); else None
    float_hidden: torch.Tensor | None = None
    #: what a method changed from what was asked, for the manifest and the card (e.g. AWQ groups left unscaled)
    notes: dict[str, Any] = field(default_factory=dict)
    store: ActivationStore = field(default_factory=ActivationStore)
    #: mixture-of-experts blocks: every expert's statistics see every token (the output keeps the real routing)
    all_experts: bool = True
    layer_kwargs: dict = field(init=False)
    _blocks: nn.ModuleList = field(init=False)
    _groups: dict[tuple[str, ...], tuple[LinearGroup, ...]] = field(init=False, default_factory=dict)
    _index: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._blocks = self.skeleton.get_submodule(self.opened.arch.blocks_prefix)
        self.layer_calls = to_device(self.layer_calls, self.device)
        self.layer_kwargs = self.layer_calls[0]
        if self.opened.arch.groups is not None:
            self._groups[self.opened.arch.linears] = self.opened.arch.groups

    @property
    def device(self) -> torch.device:
        return self.store.device

    @classmethod
    def start(cls, opened: OpenedModel, input_ids: torch.Tensor, batch_size: int = 8,
              store: ActivationStore | None = None) -> "BlockRunner":
        """Run the model's own forward up to its first decoder block (embeddings, scaling, masks, RoPE: whatever
        the family does, on the host) and record what every block is called with."""
        store = store if store is not None else ActivationStore()
        skeleton = build_skeleton(opened.source.path, dtype=torch.float32, real_buffers=True)
        base_name = opened.arch.blocks_prefix.rpartition(".")[0]
        base = skeleton.get_submodule(base_name)
        _load_base(base, base_name, opened)
        blocks = skeleton.get_submodule(opened.arch.blocks_prefix)
        calls = layer_calls(base, blocks, input_ids[:1])
        hidden = torch.cat([layer_calls(base, blocks, input_ids[i : i + batch_size], upto=0)[0]["hidden_states"]
                            for i in range(0, input_ids.shape[0], batch_size)]).float()
        for c in calls:
            del c["hidden_states"]
        return cls(opened, skeleton, store.keep(hidden, "hidden"), calls, batch_size, store=store)

    def load_block(self, index: int) -> nn.Module:
        """Block ``index`` with its real weights in float32; its call arguments become ``layer_kwargs``."""
        block = self._blocks[index]
        prefix = self.opened.arch.block_prefix(index)
        state = {k.removeprefix(prefix): v.float() for k, v in self.opened.block(index).items()}
        _assign(block, state, prefix, self.opened)
        block.to(self.device)
        self.layer_kwargs = self.layer_calls[index]
        self._index = index
        return block

    def batch(self, t: torch.Tensor, rows: slice) -> torch.Tensor:
        """Rows ``rows`` of a kept activation, on the device."""
        return self.store.fetch(t[rows])

    def batches(self, n: int) -> list[slice]:
        return [slice(i, i + self.batch_size) for i in range(0, n, self.batch_size)]

    def keep_float_stream(self) -> None:
        """Start the float model's activations (GPTAQ): a kept copy of the block inputs."""
        self.float_hidden = self.store.keep(self.hidden.clone(), "float_hidden")

    def groups(self, block: nn.Module) -> tuple[LinearGroup, ...]:
        """The loaded block's linears by shared input, in the order they run: the table's, or traced once from
        the first block of each kind (blocks of one kind have the same linears, ``io.arch.discover``); every
        expert runs on every token for the trace, so none is missed for lack of routed tokens."""
        linears = self.opened.arch.linears_at(self._index)
        if linears not in self._groups:
            with all_experts(block):
                self._groups[linears] = trace_groups(block, self.batch(self.hidden, slice(0, 1)),
                                                     self.layer_kwargs, linears)
        return self._groups[linears]

    def release_block(self, index: int) -> None:
        self._blocks[index] = self._blocks[index].to("meta")

    @torch.no_grad()
    def forward(self, block: nn.Module, hidden: torch.Tensor | None = None,
                hooks: list[tuple[nn.Module, PreHook]] = ()) -> torch.Tensor:
        """The block's output for every sample (batched to bound attention memory), with ``hooks`` attached
        meanwhile (observers only: a forward that must return its output cannot stop early)."""
        hidden = self.hidden if hidden is None else hidden
        out: torch.Tensor | None = None
        with attached(hooks):
            for rows in self.batches(hidden.shape[0]):
                y = first_output(block(self.batch(hidden, rows), **self.layer_kwargs))
                if out is None:
                    out = self.store.empty((hidden.shape[0], *y.shape[1:]), "block output", y.dtype)
                out[rows] = y
        return out

    @torch.no_grad()
    def capture(self, block: nn.Module, linears: list[str], abs_mean: bool = False,
                reference: nn.Module | None = None) -> dict[str, InputStats]:
        """Input statistics of ``linears`` (names relative to the block); stops each pass once all were seen.

        With ``reference`` (the float block) and ``float_hidden``, each batch first runs the float block on the
        float model's activations, and the stats carry the cross term ``D`` against those inputs.
        """
        modules = {name: block.get_submodule(name) for name in linears}
        cross = reference is not None and self.float_hidden is not None
        # routed-only expert statistics: the float and the quantized path route different tokens, no pairing
        paired = {n for n in linears if self.all_experts or expert_of(n) is None} if cross else set()
        if cross and len(paired) < len(linears):
            self.notes["unpaired_experts"] = True
        stats = {name: InputStats.empty(m.in_features, abs_mean, name in paired, self.device)
                 for name, m in modules.items()}
        references = {name: reference.get_submodule(name) for name in paired}
        cross = bool(references)
        with all_experts(block, self.all_experts), all_experts(reference, self.all_experts):
            self._capture(block, modules, stats, reference if cross else None, references)
        return stats

    def _capture(self, block: nn.Module, modules: dict[str, nn.Module], stats: dict[str, InputStats],
                 reference: nn.Module | None, references: dict[str, nn.Module]) -> None:
        cross = reference is not None
        for rows in self.batches(self.hidden.shape[0]):
            floats: dict[str, torch.Tensor] | None = None
            if cross:
                floats = {}
                run_with_hooks(reference, self.batch(self.float_hidden, rows), self.layer_kwargs,
                               _record_hooks(references, floats), batch=self.batch_size)
            run_with_hooks(block, self.batch(self.hidden, rows), self.layer_kwargs,
                           _capture_hooks(modules, stats, floats), batch=self.batch_size)

    def advance(self, outputs: torch.Tensor) -> None:
        self.hidden = outputs


#: Largest MLP activation (``mlp_out``'s input for every sample) ``run_staged`` keeps; above it, it is recomputed.
STAGE_CACHE_BYTES = 2 << 30

Solve = Callable[[list[str], dict[str, "InputStats"]], None]


@torch.no_grad()
def run_staged(runner: BlockRunner, block: nn.Module, layout: BlockLayout, groups: list[list[str]], solve: Solve,
               reference: nn.Module | None = None) -> torch.Tensor:
    """Capture, solve and run a pre-norm block one linear group at a time; returns the block's output.

    ``groups`` are the four input groups in ``layout`` order (attention-norm readers, ``attn_out``, MLP-norm
    readers, ``mlp_out``). Before each group's inputs are captured, ``solve(names, stats)`` has replaced the
    weights of every earlier group, so each group sees the error of those before it (``true_sequential``) — at the
    cost of about one block forward in all, instead of one per group: the attention runs once (its context is
    kept for ``attn_out``), the residual sums are formed from kept pieces, and the output is assembled from them.

    With ``reference`` (an unquantized copy of the block) and ``runner.float_hidden``, the float block runs beside
    it on the float model's activations, every group's stats carry the cross term ``D`` (``InputStats``), and
    ``runner.float_hidden`` is advanced to the float block's output.
    """
    if len(groups) != 4:
        raise ValueError(f"run_staged needs the 4 input groups of a pre-norm block, got {len(groups)}")
    h, kwargs, store, dev = runner.hidden, runner.layer_kwargs, runner.store, runner.store.fetch
    attn_norm, mlp_norm = block.get_submodule(layout.attn_norm), block.get_submodule(layout.mlp_norm)
    attn, mlp = block.get_submodule(layout.attn), block.get_submodule(layout.mlp)
    attn_out, mlp_out = block.get_submodule(layout.attn_out), block.get_submodule(layout.mlp_out)
    batches = runner.batches(h.shape[0])
    hf = runner.float_hidden if reference is not None else None
    if hf is not None:
        f_attn_norm, f_mlp_norm = reference.get_submodule(layout.attn_norm), reference.get_submodule(layout.mlp_norm)
        f_attn, f_mlp = reference.get_submodule(layout.attn), reference.get_submodule(layout.mlp)
        f_attn_out, f_mlp_out = reference.get_submodule(layout.attn_out), reference.get_submodule(layout.mlp_out)

    def stats_for(names: list[str], features: int) -> dict[str, InputStats]:
        shared = InputStats.empty(features, cross=hf is not None, device=runner.device)
        return {name: shared for name in names}

    stats = stats_for(groups[0], h.shape[-1])
    for b in batches:
        stats[groups[0][0]].add(attn_norm(dev(h[b])), f_attn_norm(dev(hf[b])) if hf is not None else None)
    solve(groups[0], stats)

    context = store.empty((*h.shape[:2], attn_out.in_features), "attention context")
    context_f = store.empty(context.shape, "float attention context") if hf is not None else None
    stats = stats_for(groups[1], attn_out.in_features)
    for b in batches:
        c = context[b] = input_before(attn, attn_out, attn_norm(dev(h[b])), kwargs)
        cf = None
        if hf is not None:
            cf = context_f[b] = input_before(f_attn, f_attn_out, f_attn_norm(dev(hf[b])), kwargs)
        stats[groups[1][0]].add(c, cf)
    solve(groups[1], stats)

    h1 = store.empty(h.shape, "block output")
    h1f = store.empty(h.shape, "float block output") if hf is not None else None
    stats = stats_for(groups[2], h.shape[-1])
    for b in batches:
        r = h1[b] = dev(h[b]) + attn_out(dev(context[b]))
        rf = None
        if hf is not None:
            rf = h1f[b] = dev(hf[b]) + f_attn_out(dev(context_f[b]))
        stats[groups[2][0]].add(mlp_norm(r), f_mlp_norm(rf) if hf is not None else None)
    del context, context_f
    solve(groups[2], stats)

    keep = h.shape[0] * h.shape[1] * mlp_out.in_features * 4 <= STAGE_CACHE_BYTES
    act = store.empty((*h.shape[:2], mlp_out.in_features), "MLP activation") if keep else None
    stats = stats_for(groups[3], mlp_out.in_features)
    for b in batches:
        m = input_before(mlp, mlp_out, mlp_norm(dev(h1[b])))
        if hf is not None:
            mf = input_before(f_mlp, f_mlp_out, f_mlp_norm(dev(h1f[b])))
            h1f[b] = dev(h1f[b]) + f_mlp_out(mf)  # the float block's output
        stats[groups[3][0]].add(m, mf if hf is not None else None)
        if act is not None:
            act[b] = m
    solve(groups[3], stats)

    for b in batches:
        m = dev(act[b]) if act is not None else input_before(mlp, mlp_out, mlp_norm(dev(h1[b])))
        h1[b] = dev(h1[b]) + mlp_out(m)
    if hf is not None:
        runner.float_hidden = h1f
    return h1


def _load_base(base: nn.Module, base_name: str, opened: OpenedModel) -> None:
    """Real weights for the base model's parameters outside the decoder blocks (embeddings, final norm)."""
    prefix = f"{base_name}." if base_name else ""
    blocks = opened.arch.blocks_prefix + "."
    wanted = [n for n in opened.checkpoint.non_block_names(opened.arch) if n.startswith(prefix)]
    state = {k.removeprefix(prefix): v.float() if v.is_floating_point() else v
             for k, v in opened.checkpoint.load(wanted).items()}
    _assign(base, state, prefix, opened, skip=blocks)


def _assign(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, opened: OpenedModel,
            skip: str | None = None) -> None:
    """Assign ``state`` into the meta ``module``; a parameter left on meta (outside ``skip``) is a missing tensor."""
    module.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in module.named_parameters() if p.is_meta and not (skip and (prefix + n).startswith(skip))]
    if left:
        raise ModelLoadError(f"tensor {prefix}{left[0]} is missing from {opened.source.path}",
                             "re-fetch the complete checkpoint")


@torch.no_grad()
def layer_calls(base: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, upto: int | None = None
                ) -> list[dict]:
    """The keyword arguments (with ``hidden_states``) the base model's own forward calls blocks ``0..upto`` with.

    Every block is replaced by a pass-through for the pass, so nothing but the base model's own preamble runs.
    """
    last = len(blocks) - 1 if upto is None else upto
    calls: list[dict] = []
    names = list(inspect.signature(type(blocks[0]).forward).parameters)[1:]  # one block class (io.arch)

    def recorder(index: int) -> Callable[..., torch.Tensor]:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            kwargs.update(zip(names, args))
            kwargs.pop("past_key_values", None)
            kwargs.pop("layer_past", None)
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            calls.append(kwargs)
            if index == last:
                raise StopForward
            return kwargs["hidden_states"]

        return forward

    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i)
        base(input_ids=input_ids, use_cache=False)
    except StopForward:
        pass
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    if len(calls) != last + 1 or "hidden_states" not in calls[0]:
        raise ModelLoadError(f"{type(base).__name__}'s forward called {len(calls)} of {last + 1} decoder blocks "
                             "with a hidden_states input", "this family's forward is not a plain block stack")
    return calls


@torch.no_grad()
def replica_block(config: dict, arch: ArchSpec, seqlen: int = 16, seed: int = 0
                  ) -> tuple[nn.Module, torch.Tensor, dict]:
    """Block 0 of a small random replica of the model ``config`` describes (``io.tiny.replica_config``: its
    family, flags and layer pattern at small widths), its input for ``seqlen`` random tokens, and the keyword
    arguments the replica's own forward calls it with: a structural question (who feeds which linear) answered
    before any weight is read."""
    from transformers import AutoModelForCausalLM

    small = replica_config(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(small, dtype=torch.float32).eval()
    base_name = arch.blocks_prefix.rpartition(".")[0]
    blocks = model.get_submodule(arch.blocks_prefix)
    ids = torch.randint(0, small.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(seed))
    kwargs = layer_calls(model.get_submodule(base_name), blocks, ids, upto=0)[0]
    return blocks[0], kwargs.pop("hidden_states"), kwargs


def trace_groups(block: nn.Module, hidden: torch.Tensor, kwargs: dict, linears: tuple[str, ...]
                 ) -> tuple[LinearGroup, ...]:
    """Group ``linears`` by the tensor they read in one forward of ``block``, in call order; a group's feeder is
    the innermost module whose output is that very tensor (None when none is)."""
    inputs: dict[str, torch.Tensor] = {}
    producers: dict[int, tuple[torch.Tensor, str]] = {}
    modules = dict(block.named_modules())

    def on_input(name: str) -> PreHook:
        def hook(_m: nn.Module, args: tuple, kw: dict) -> None:
            inputs.setdefault(name, input_of(args, kw))

        return hook

    def on_output(name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            out = first_output(out)
            if isinstance(out, torch.Tensor):
                producers.setdefault(id(out), (out, name))

        return hook

    handles = [modules[n].register_forward_hook(on_output(n)) for n in modules if n]
    try:
        with torch.no_grad(), attached([(modules[n], on_input(n)) for n in linears]):
            block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    unseen = [n for n in linears if n not in inputs]
    if unseen:
        raise ModelLoadError(f"linear {unseen[0]} is never called in its block's forward, so it cannot be calibrated",
                             "use a calibration-free method (rtn, hqq) for this family")
    groups: dict[int, list[str]] = {}
    for name in inputs:  # insertion order: the order the linears ran
        groups.setdefault(id(inputs[name]), []).append(name)
    return tuple(LinearGroup(producers.get(key, (None, None))[1], tuple(names)) for key, names in groups.items())


@contextmanager
def all_experts(module: nn.Module | None, on: bool = True) -> Iterator[None]:
    """While inside, every expert of ``module``'s mixture-of-experts blocks also runs on every token (statistics
    only: the output keeps the real routing, ``io.experts.PerExpertLinears``)."""
    experts = list(expert_modules(module).values()) if module is not None else []
    was = [m.all_experts for m in experts]
    for m in experts:
        m.all_experts = on
    try:
        yield
    finally:
        for m, w in zip(experts, was):
            m.all_experts = w


@contextmanager
def routed_tokens(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Counts, while inside, the tokens the router sends to each expert of ``module``: {experts module: counts}."""
    experts = expert_modules(module)
    counts = {name: torch.zeros(m.num_experts, dtype=torch.long) for name, m in experts.items()}
    for name, m in experts.items():
        m.routed = counts[name]
    try:
        yield counts
    finally:
        for m in experts.values():
            m.routed = None


def input_before(module: nn.Module, last: nn.Module, x: torch.Tensor, kwargs: dict | None = None) -> torch.Tensor:
    """What ``module(x, **kwargs)`` feeds its final linear ``last`` (the forward stops there)."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise StopForward

    handle = last.register_forward_pre_hook(hook)
    try:
        module(x, **(kwargs or {}))
    except StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(module).__name__} never called its output projection")
    return seen[0]


def _capture_hooks(modules: dict[str, nn.Module], stats: dict[str, InputStats],
                   floats: dict[str, torch.Tensor] | None = None) -> list[tuple[nn.Module, PreHook]]:
    """Pre-hooks feeding ``stats`` for one pass; inputs shared by several linears are accumulated once, and the pass
    stops once every linear has seen its input. ``floats``: the float model's input of each linear for the same
    batch (the cross term's other side)."""
    seen: set[str] = set()
    shared: dict[int, tuple[torch.Tensor, str]] = {}  # holds the tensors so their ids cannot be reused

    def hook_for(name: str) -> PreHook:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = input_of(args, kwargs)
            key = shared.setdefault(id(x), (x, name))[1]
            if key == name:
                stats[name].add(x, floats.get(name) if floats is not None else None)
            else:
                stats[name] = stats[key]
            seen.add(name)
            if len(seen) == len(modules):
                raise StopForward

        return hook

    return [(m, hook_for(name)) for name, m in modules.items()]


def _record_hooks(modules: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> list[tuple[nn.Module, PreHook]]:
    """Pre-hooks keeping each module's input of one pass in ``inputs``; the pass stops once all were seen."""

    def hook_for(name: str) -> PreHook:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[name] = input_of(args, kwargs)
            if len(inputs) == len(modules):
                raise StopForward

        return hook

    return [(m, hook_for(name)) for name, m in modules.items()]


def run_with_hooks(block: nn.Module, hidden: torch.Tensor, layer_kwargs: dict, hooks: list[tuple[nn.Module, PreHook]],
                   batch: int) -> None:
    """Run ``block`` over ``hidden`` ``batch`` samples at a time with ``hooks`` attached meanwhile; a hook that
    raises ``StopForward`` ends that batch's forward early (nothing later in the block is needed).

    ``layer_kwargs`` must broadcast over the batch (position embeddings with batch dimension 1).
    """
    with attached(hooks):
        for i in range(0, hidden.shape[0], batch):
            try:
                block(hidden[i : i + batch], **layer_kwargs)
            except StopForward:
                pass


@contextmanager
def attached(hooks: Iterable[tuple[nn.Module, PreHook]]) -> Iterator[None]:
    """``hooks`` registered as forward pre-hooks (``with_kwargs``) for the duration of the block, then removed."""
    handles = [m.register_forward_pre_hook(fn, with_kwargs=True) for m, fn in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The first input of a module call seen by a ``with_kwargs`` pre-hook."""
    return args[0] if args else next(iter(kwargs.values()))


def first_output(out: Any) -> torch.Tensor:
    """A module's main output (decoder layers and attention return tuples in some families)."""
    return out[0] if isinstance(out, (tuple, list)) else out


